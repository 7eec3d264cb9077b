"""mergekit-yaml's command line on ``fusion-engine merge`` / ``fusion-engine-yaml`` (issue 14): every
option of mergekit 0.1.5's MergeOptions, the shard size unit, the model card, logging, exit codes, and
a command line that imports no torch before it has to."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cli_fixtures import load_dir, run_cli, scratch, tiny_llamas, write
from fusion_engine.cli import _parser, yaml_main
from fusion_engine.mergekit_flags import parse_shard_size

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def linear_config(m: dict) -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {m['model_0']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {m['model_1']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")


def dare_config(m: dict, extra: str = "") -> str:
    return (f"merge_method: dare_ties\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['model_0']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            f"  - model: {m['model_1']}\n    parameters: {{weight: 0.5, density: 0.5}}\n{extra}")


def run_python(code: str, *, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=cwd or scratch("py"))


# ------------------------------------------------------------------------------ every mergekit option


def mergekit_command_line() -> list[str]:
    """One mergekit-yaml command line naming every MergeOptions field (non-default values where harmless)."""
    options = pytest.importorskip("mergekit.options")
    argv = []
    for name, info in options.MergeOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "verbosity":
            argv += ["-v", "-v"]
        elif name == "num_threads":
            argv += ["-j", "2"]
        elif name in ("cuda", "gpu_rich", "unsafe_truncate_embeddings"):
            argv += [] if name == "gpu_rich" else ["--no-" + flag[2:]]
        elif name == "device":
            argv += [flag, "cpu"]
        elif name == "out_shard_size":
            argv += [flag, "5B"]
        elif name in ("write_threads", "random_seed"):
            argv += [flag, "2"]
        elif info.annotation is bool:
            argv += [flag] if name != "quiet" else ["--quiet"]
        else:
            argv += [flag, "/tmp/unused"]
    return argv


def test_every_merge_option_of_mergekit_is_accepted_by_both_commands():
    options = pytest.importorskip("mergekit.options")
    for name, info in options.MergeOptions.model_fields.items():
        flag = {"verbosity": "-v", "num_threads": "-j", "gpu_rich": "--gpu-rich"}.get(name, "--" + name.replace("_", "-"))
        value = [] if info.annotation is bool or name in ("verbosity", "gpu_rich") else ["1"]
        args = _parser().parse_args(["merge", "c.yml", "out", flag, *value])
        assert args.command == "merge"
        if info.annotation is bool and name != "gpu_rich":
            _parser().parse_args(["merge", "c.yml", "out", "--no-" + name.replace("_", "-")])


def test_a_mergekit_command_line_runs_and_says_which_options_are_no_ops(caplog):
    m = tiny_llamas()
    folder = scratch("mkflags")
    config = write(folder, "config.yaml", linear_config(m))
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="fusion_engine"):
            assert run_cli("merge", config, os.path.join(folder, "out"), *mergekit_command_line()) == 0
        assert torch.get_num_threads() == 2  # -j 2, as mergekit's --num-threads
    finally:
        torch.set_num_threads(threads)
    text = caplog.text
    for flag in ("--allow-crimes", "--trust-remote-code", "--lazy-unpickle", "--clone-tensors", "--low-cpu-memory",
                 "--read-to-gpu", "--multi-gpu", "--transformers-cache", "--lora-merge-cache", "--async-write",
                 "--write-threads"):
        assert f"{flag}: accepted for mergekit compatibility, no effect here" in text, flag
    assert "backends that ran: cpp" in text
    assert run_cli("merge", config, os.path.join(folder, "plain"), "--quiet") == 0
    ours, plain = load_dir(os.path.join(folder, "out")), load_dir(os.path.join(folder, "plain"))
    assert sorted(ours) == sorted(plain) and all(torch.equal(ours[k], plain[k]) for k in plain)
    assert sorted(os.listdir(os.path.join(folder, "out"))) == sorted(os.listdir(os.path.join(folder, "plain")))


def test_no_op_options_are_silent_by_default(caplog):
    m = tiny_llamas()
    folder = scratch("mkquiet")
    config = write(folder, "config.yaml", linear_config(m))
    with caplog.at_level(logging.WARNING, logger="fusion_engine"):
        assert run_cli("merge", config, os.path.join(folder, "out"), "--quiet", "--allow-crimes",
                       "--trust-remote-code") == 0
    assert "no effect here" not in caplog.text


@pytest.mark.parametrize("flag", ["--no-safe-serialization", "--unsafe-truncate-embeddings"])
def test_options_that_would_change_the_output_unsupported_are_refused(flag, capsys):
    m = tiny_llamas()
    folder = scratch("refused")
    config = write(folder, "config.yaml", linear_config(m))
    assert run_cli("merge", config, os.path.join(folder, "out"), flag) == 2
    assert flag in capsys.readouterr().err and sorted(os.listdir(folder)) == ["config.yaml"]


def test_cuda_means_device_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here: --cuda would run")
    m = tiny_llamas()
    folder = scratch("cuda")
    config = write(folder, "config.yaml", linear_config(m))
    assert run_cli("merge", config, os.path.join(folder, "out"), "--cuda") == 2
    assert "--device cuda: no CUDA GPU is usable here" in capsys.readouterr().err


# ------------------------------------------------------------------------------ shard size


@pytest.mark.parametrize("text", ["5B", "500M", "10K", "10k", "123", "2b"])
def test_shard_size_counts_are_mergekits(text):
    common = pytest.importorskip("mergekit.common")
    assert parse_shard_size(text) == common.parse_kmb(text)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                       ("100KB", 100_000), ("1.5B", 1_500_000_000)])
def test_shard_size_with_a_byte_unit_is_bytes(text, size):
    assert parse_shard_size(text) == size


def test_default_5B_writes_one_shard_and_a_count_splits_like_mergekit():
    m = tiny_llamas()
    folder = scratch("shardunit")
    config = write(folder, "config.yaml", linear_config(m))
    assert run_cli("merge", config, os.path.join(folder, "one"), "--quiet", "--out-shard-size", "5B") == 0
    assert [f for f in os.listdir(os.path.join(folder, "one")) if f.endswith(".safetensors")] == ["model.safetensors"]
    assert run_cli("merge", config, os.path.join(folder, "split"), "--quiet", "--out-shard-size", "200K") == 0
    with open(os.path.join(folder, "split", "model.safetensors.index.json")) as f:
        index = json.load(f)
    tensors = load_dir(os.path.join(folder, "split"))
    per_shard: dict[str, int] = {}
    for name, shard in index["weight_map"].items():
        per_shard[shard] = per_shard.get(shard, 0) + tensors[name].numel() * tensors[name].element_size()
    assert len(per_shard) > 1
    biggest = max(t.numel() * t.element_size() for t in tensors.values())
    assert all(size <= max(200_000, biggest) for size in per_shard.values())


# ------------------------------------------------------------------------------ model card, tokenizer, seed


def normalized(card: str) -> list[str]:
    """The card's lines with the model bullets sorted (mergekit lists them in a set's order)."""
    lines = card.splitlines()
    bullets = sorted(line for line in lines if line.startswith("* "))
    rest = [line for line in lines if not line.startswith("* ")]
    return rest + bullets


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_model_card_is_mergekits(method):
    card_module = pytest.importorskip("mergekit.card")
    from mergekit.config import MergeConfiguration

    m = tiny_llamas()
    folder = scratch("card")
    if method == "ties":
        text = (f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['model_0']}\n"
                f"    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {m['model_1']}\n"
                f"    parameters: {{weight: 0.5, density: 0.5}}\n# a comment kept as written\n")
    else:
        text = (f"merge_method: slerp\nbase_model: {m['base']}\nmodels:\n  - model: {m['base']}\n"
                f"  - model: {m['model_0']}\nparameters:\n  t: 0.3\n")
    config = write(folder, "config.yaml", text)
    out = os.path.join(folder, "my-merge")
    assert run_cli("merge", config, out, "--quiet") == 0
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        ours = f.read()
    theirs = card_module.generate_card(MergeConfiguration.model_validate(yaml.safe_load(text)), text, "my-merge")
    assert normalized(ours) == normalized(theirs)
    assert "# my-merge" in ours and "```yaml\n" + text in ours
    with open(os.path.join(out, "mergekit_config.yml"), encoding="utf-8") as f:
        assert f.read() == text


def test_no_write_model_card_and_no_copy_tokenizer():
    m = tiny_llamas()
    folder = scratch("nocard")
    config = write(folder, "config.yaml", linear_config(m))
    assert run_cli("merge", config, os.path.join(folder, "with"), "--quiet") == 0
    assert run_cli("merge", config, os.path.join(folder, "without"), "--quiet", "--no-write-model-card",
                   "--no-copy-tokenizer") == 0
    with_files, without = set(os.listdir(os.path.join(folder, "with"))), set(os.listdir(os.path.join(folder, "without")))
    assert {"README.md", "tokenizer.json", "tokenizer_config.json"} <= with_files
    assert with_files - without == {"README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} \
        & with_files
    assert not any(f.startswith("tokenizer") for f in without) and "README.md" not in without


def test_random_seed_seeds_the_random_methods_unless_the_config_does():
    m = tiny_llamas()
    folder = scratch("seed")
    config = write(folder, "config.yaml", dare_config(m))
    seeded = write(folder, "seeded.yaml", dare_config(m, "parameters:\n  random_seed: 7\n"))
    outs = {}
    for key, cfg, argv in (("s1", config, ["--random-seed", "1"]), ("s1b", config, ["--random-seed", "1"]),
                           ("s2", config, ["--random-seed", "2"]), ("cfg7", seeded, ["--random-seed", "2"]),
                           ("cfg7b", seeded, [])):
        assert run_cli("merge", cfg, os.path.join(folder, key), "--quiet", *argv) == 0
        outs[key] = load_dir(os.path.join(folder, key))["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(outs["s1"], outs["s1b"]) and not torch.equal(outs["s1"], outs["s2"])
    assert torch.equal(outs["cfg7"], outs["cfg7b"])


# ------------------------------------------------------------------------------ order of checks, exit codes


def test_config_errors_come_before_the_output_folder_check(capsys):
    m = tiny_llamas()
    folder = scratch("order")
    config = write(folder, "config.yaml", linear_config(m).replace("linear", "linaer"))
    os.makedirs(os.path.join(folder, "out"))
    assert run_cli("merge", config, os.path.join(folder, "out")) == 2
    err = capsys.readouterr().err
    assert "unknown merge_method 'linaer'" in err and "exists" not in err


def test_ctrl_c_exits_130_and_leaves_nothing(monkeypatch, capsys):
    from fusion_engine.checkpoint import executor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    m = tiny_llamas()
    folder = scratch("ctrlc")
    config = write(folder, "config.yaml", linear_config(m))
    monkeypatch.setattr(executor, "merge_bound", interrupted)
    assert run_cli("merge", config, os.path.join(folder, "out"), "--quiet") == 130
    assert "interrupted" in capsys.readouterr().err and sorted(os.listdir(folder)) == ["config.yaml"]


def test_fusion_engine_yaml_is_mergekit_yaml_without_mergekit():
    m = tiny_llamas()
    folder = scratch("feyaml")
    config = write(folder, "config.yaml", linear_config(m))
    assert yaml_main([config, os.path.join(folder, "in_process"), "--quiet", "--no-copy-tokenizer"]) == 0
    code = (f"import sys; sys.modules['mergekit'] = None\nfrom fusion_engine.cli import yaml_main\n"
            f"sys.exit(yaml_main([{config!r}, {os.path.join(folder, 'out')!r}, '--quiet', '--lazy-unpickle', "
            f"'--out-shard-size', '5B', '--random-seed', '3']))")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    ours, ref = load_dir(os.path.join(folder, "out")), load_dir(os.path.join(folder, "in_process"))
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_console_scripts_point_at_the_cli():
    import importlib
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"fusion-engine", "fusion-engine-yaml"} <= set(scripts)
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_compat_mergekit_without_mergekit_exits_2_with_the_fix():
    code = ("import runpy, sys; sys.modules['mergekit'] = None; sys.argv = ['x', 'c.yml', 'out']\n"
            "runpy.run_module('fusion_engine.compat.mergekit', run_name='__main__')")
    result = run_python(code)
    assert result.returncode == 2 and "pip install mergekit" in result.stderr
    assert "Traceback" not in result.stderr and "fusion-engine-yaml" in result.stderr


def test_demo_without_transformers_exits_2_with_the_fix():
    code = ("import sys; sys.modules['transformers'] = None\nfrom fusion_engine.cli import main\n"
            "sys.exit(main(['demo', '--quiet']))")
    result = run_python(code)
    assert result.returncode == 2 and 'pip install "fusion_engine[demo]"' in result.stderr, result.stderr


# ------------------------------------------------------------------------------ lazy imports, logging


def test_the_command_line_imports_no_torch_until_a_command_needs_it():
    code = ("import sys\nimport fusion_engine.cli, fusion_engine.__main__\nfrom fusion_engine.cli import main\n"
            "for argv in (['--help'], ['merge', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import fusion_engine\n"
            "assert 'torch' not in sys.modules\n"
            "assert callable(fusion_engine.merge_tensors) and fusion_engine.ops.linear_merge\n"
            "assert fusion_engine.backends()['torch'].usable and 'ops' in dir(fusion_engine)\n"
            "from fusion_engine import merge_state_dicts, methods, BackendStatus\n"
            "import fusion_engine.data_aware.adamerging\n"  # a submodule named like the function it exports
            "from fusion_engine.data_aware import adamerging, merge_with_coefficients\n"
            "assert callable(adamerging) and callable(merge_with_coefficients)\n"
            "from fusion_engine.moe import build_moe\nfrom fusion_engine.evolve import evolve\n"
            "from fusion_engine.analysis import analyze\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_compiled_backend_missing_warns_once_with_the_fix(monkeypatch, caplog):
    from fusion_engine import _dispatch, ops

    real_probe = _dispatch._probe
    monkeypatch.setattr(_dispatch, "_probe", lambda name: _dispatch.BackendStatus(False, "extension not built")
                        if name == "cpp" else real_probe(name))
    _dispatch._warn_fallback.cache_clear()
    before = _dispatch.backends_used().get("torch", 0)
    xs = [torch.randn(64), torch.randn(64)]
    with caplog.at_level(logging.WARNING, logger="fusion_engine"):
        for _ in range(3):
            ops.linear_merge(xs, [0.5, 0.5])
    warnings = [r for r in caplog.records if "cpp backend cannot run" in r.getMessage()]
    assert len(warnings) == 1 and "python setup.py build_ext --inplace" in warnings[0].getMessage()
    assert _dispatch.backends_used()["torch"] >= before + 3
    _dispatch._warn_fallback.cache_clear()


def test_evaluate_writes_outside_the_package_by_default_and_reports_rows(capsys):
    from fusion_engine.bench import evaluate

    args = _parser().parse_args(["evaluate"])
    assert args.out == "fusion-engine-eval"
    rows = evaluate._Rows()
    rows.append(evaluate.Row("Pre-trained", [0.5], 1.25))
    assert capsys.readouterr().err == "evaluate: Pre-trained (1.2 s)\n"
