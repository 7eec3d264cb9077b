"""The digits evaluation table (``fusion-engine evaluate``): data-aware merges beat simple averaging."""

from __future__ import annotations

import pytest
import torch

from fusion_engine.bench import evaluate as ev
from fusion_engine.bench.tasks import TaskConfig, build_tasks

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

MERGES = ["Simple average", "Task arithmetic", "TIES", "DARE", "TSV", "Iso-C", "Iso-CTS", "MagMax",
          "Consensus (TALL)", "PCB", "WUDI", "Task arithmetic + LiNeS", "Fisher", "RegMean",
          "AdaMerging (task-wise)", "AdaMerging (layer-wise)"]
TRAJECTORY = ["LAWA (multi-task run)", "SWAG (multi-task run)", "Lookahead (multi-task run)",
              "Snapshot ensemble (multi-task run)", "FGE (multi-task run)"]


@pytest.fixture(scope="module")
def report():
    return ev.run(ev.EvalConfig())  # the published configuration (seed 0), both parts


def test_table_has_every_row(report):
    methods = [r.method for r in report.rows]
    assert methods == ["Pre-trained", "Individual fine-tuned", "Multi-task trained", *TRAJECTORY, *MERGES,
                       "Ensemble (mean logits)", "SMILE upscaling (MoE)"]
    assert report.task_names == list(TaskConfig().tasks)
    for r in report.rows:
        assert len(r.accuracies) == len(report.task_names)
        assert all(0.0 <= a <= 1.0 for a in r.accuracies)


def test_data_aware_merges_beat_simple_averaging(report):
    average = report.row("Simple average").average
    for method in ("Fisher", "RegMean", "AdaMerging (task-wise)", "AdaMerging (layer-wise)"):
        assert report.row(method).average >= average + 0.05, (method, report.row(method).average, average)


def test_the_table_is_meaningful(report):
    pre, individual = report.row("Pre-trained").average, report.row("Individual fine-tuned").average
    multitask, average = report.row("Multi-task trained").average, report.row("Simple average").average
    assert individual > 0.9 and multitask > 0.85  # the fine-tunings learn their tasks
    assert pre < 0.5                              # which the pre-trained model cannot do
    assert average < individual - 0.2             # averaging loses a lot: there is something to recover
    assert report.row("Task arithmetic").average > average


def test_training_time_averaging_rows_learn_the_tasks(report):
    """Every training-time average comes from a run that learns all tasks (the multi-task run's level)."""
    multitask = report.row("Multi-task trained").average
    for method in TRAJECTORY:
        assert report.row(method).average > multitask - 0.05, (method, report.row(method).average, multitask)


def test_smile_upscaling_beats_every_merge(report):
    """A routed MoE of low-rank task experts keeps more of each fine-tuning than any single merged model."""
    smile = report.row("SMILE upscaling (MoE)").average
    assert smile > max(report.row(m).average for m in MERGES) + 0.02
    assert smile <= report.row("Individual fine-tuned").average


def test_alignment_part(report):
    rows = {r.method: r for r in report.pair_rows}
    naive, matched = rows["Naive average"], rows["Weight matching + average"]
    assert naive.barrier > 0.2 and matched.barrier < naive.barrier / 3
    assert matched.accuracy > naive.accuracy + 0.1
    assert rows["OT fusion (exact)"].accuracy > naive.accuracy
    assert rows["Bezier curve midpoint"].barrier < naive.barrier
    assert set(report.curves) == {"linear A → B", "linear A → π(B), weight matching", "Bezier curve A → B, fitted"}


def test_write_report_and_main(report, tmp_path, monkeypatch, capsys):
    md, png = ev.write_report(report, str(tmp_path / "eval"))
    text = open(md, encoding="utf-8").read()
    assert "| Fisher |" in text and "| RegMean |" in text and "barrier.png" in text
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # main: argument handling and output, on the already-built report
    monkeypatch.setattr(ev, "run", lambda config, alignment=True: report)
    assert ev.main(["--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "| AdaMerging (layer-wise) |" in out and "results.md" in out
    assert (tmp_path / "cli" / "results.md").exists() and (tmp_path / "cli" / "barrier.png").exists()


def test_setup_is_deterministic():
    config = TaskConfig(finetune_epochs=1, pretrain_epochs=1)
    one, two = build_tasks(config), build_tasks(config)
    for m1, m2 in zip([one.pretrained, *one.finetuned], [two.pretrained, *two.finetuned]):
        for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
            assert torch.equal(a, b), k
