"""The digits table's Fisher and RegMean rows, reproduced through `measure` statistics and `fusion-engine merge`."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from fusion_engine.averaging import load_state
from fusion_engine.bench import evaluate as ev
from fusion_engine.bench.tasks import TaskConfig, build_tasks
from fusion_engine.cli import main
from fusion_engine.data_aware.measure import measure_statistics
from fusion_engine.io.statistics import save_statistics

pytest.importorskip("sklearn")


def _load(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_fisher_and_regmean_rows_through_the_cli(tmp_path):
    config = ev.EvalConfig()
    with ev.deterministic():
        setup = build_tasks(TaskConfig())
        for k, (model, task) in enumerate(zip(setup.finetuned, setup.tasks)):
            folder = tmp_path / f"ft{k}"
            folder.mkdir()
            save_file({n: v.contiguous() for n, v in model.state_dict().items()}, str(folder / "model.safetensors"))
            stats = measure_statistics(model, ev._task_batches(task, config.fisher_examples))
            save_statistics(stats, str(tmp_path / f"ft{k}.stats.safetensors"))
        rows = ev.merge_methods(setup, config)
        for method, row, key, extra in (("fisher", "Fisher", "fisher", ""),
                                        ("regmean", "RegMean", "gram", "parameters: {alpha: 0.95}\n")):
            models = "".join(f"  - model: {tmp_path}/ft{k}\n    parameters: {{{key}: {tmp_path}/ft{k}.stats.safetensors}}\n"
                             for k in range(len(setup.finetuned)))
            (tmp_path / f"{method}.yaml").write_text(f"merge_method: {method}\n{extra}models:\n{models}")
            assert main(["merge", str(tmp_path / f"{method}.yaml"), str(tmp_path / f"{method}_out"), "--quiet"]) == 0
            merged = _load(tmp_path / f"{method}_out")
            expected, _ = rows[row]()
            for name, value in expected.items():
                torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-5, msg=name)
            assert setup.accuracies(load_state(setup.pretrained, merged)) == \
                setup.accuracies(load_state(setup.pretrained, expected))
