"""``alignment:`` in a merge config: HF checkpoints permuted onto the reference while streaming.

A planted case (B is a permuted copy of A: the aligned linear merge is A itself) and two independently
initialised Llama models with grouped-query attention (the output equals the in-memory
``interpolate(A, apply_permutation(B, weight_matching(A, B)))``), for weight matching and for
activation matching on a token-id file.
"""

from __future__ import annotations

import os

import pytest
import torch

from fusion_engine.alignment import (
    activation_matching,
    apply_permutation,
    interpolate,
    transformer_permutation_spec,
    weight_matching,
)

from cli_fixtures import load_dir, run_cli, scratch, write

pytest.importorskip("transformers")
from fusion_engine.bench.tiny_lm import make_lm  # noqa: E402


def save(model, state, name) -> str:
    model.load_state_dict(state)
    path = os.path.join(scratch(name), "model")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models():
    a, c = make_lm(seed=0), make_lm(seed=1)
    spec = transformer_permutation_spec(a)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sc = {k: v.clone() for k, v in c.state_dict().items()}
    planted = apply_permutation(spec, sa, spec.random(seed=5))
    return spec, sa, sc, save(a, sa, "a"), save(a, planted, "b"), save(c, sc, "c")


def merge(a_path, b_path, alignment="weight_matching"):
    """Run ``fusion-engine merge`` on a linear 50/50 merge of the two models with ``alignment:``."""
    folder = scratch("align_merge")
    cfg = write(folder, "config.yaml", f"""merge_method: linear
alignment: {alignment}
models:
  - model: {a_path}
    parameters: {{weight: 0.5}}
  - model: {b_path}
    parameters: {{weight: 0.5}}
dtype: float32
""")
    out = os.path.join(folder, "out")
    return run_cli("merge", cfg, out, "--quiet"), out


def assert_merged(rc, out, expected):
    assert rc == 0
    merged = load_dir(out)
    assert set(merged) <= set(expected)
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")


def test_planted_permutation_merges_back_to_the_reference(models):
    spec, sa, _, a_path, b_path, _ = models
    assert_merged(*merge(a_path, b_path), sa)


def test_independent_models_match_the_python_alignment(models):
    spec, sa, sc, a_path, _, c_path = models
    expected = interpolate(sa, apply_permutation(spec, sc, weight_matching(spec, sa, sc)), 0.5)
    assert_merged(*merge(a_path, c_path), expected)


def test_unknown_alignment_is_a_config_error(models, capsys):
    _, _, _, a_path, b_path, _ = models
    rc, _ = merge(a_path, b_path, alignment="zipit")
    assert rc != 0
    assert "alignment: zipit is not available" in capsys.readouterr().err


def token_file():
    folder = scratch("tokens")
    path = os.path.join(folder, "ids.pt")
    torch.save({"input_ids": torch.randint(0, 16, (16, 12), generator=torch.Generator().manual_seed(0))}, path)
    return path


def test_activation_matching_from_a_config(models):
    spec, sa, sc, a_path, b_path, c_path = models
    data = token_file()
    alignment = f"{{method: activation_matching, data: {data}}}"
    assert_merged(*merge(a_path, b_path, alignment=alignment), sa)
    a, c = make_lm(seed=0), make_lm(seed=1)
    a.load_state_dict(sa)
    c.load_state_dict(sc)
    ids = torch.load(data)["input_ids"]
    perms = activation_matching(transformer_permutation_spec(a), a, c, [ids[i:i + 8] for i in range(0, 16, 8)])
    expected = interpolate(sa, apply_permutation(spec, sc, perms), 0.5)
    assert_merged(*merge(a_path, c_path, alignment=alignment), expected)


def test_activation_matching_without_data_is_a_config_error(models, capsys):
    _, _, _, a_path, b_path, _ = models
    rc, _ = merge(a_path, b_path, alignment="activation_matching")
    assert rc != 0
    assert "needs model inputs" in capsys.readouterr().err


def test_aligned_merge_under_two_ranks_equals_one_process(models):
    """``alignment:`` under torchrun: rank 0 finds the permutations, both ranks read through them; the
    output is byte-identical to the single-process merge."""
    import sys

    from cli_fixtures import _ROOT
    from utils import launch_ranks

    spec, sa, sc, a_path, _, c_path = models
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same products, bit for bit
    try:
        rc, single = merge(a_path, c_path)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    cfg = os.path.join(os.path.dirname(single), "config.yaml")
    out = os.path.join(scratch("align_ranks"), "out")
    for rc, _, stderr in launch_ranks([sys.executable, "-m", "fusion_engine", "merge", cfg, out, "--quiet"], 2,
                                      cwd=_ROOT, timeout=180, env={"HF_HUB_OFFLINE": "1"}):
        assert rc == 0, stderr[-3000:]
    got, want = load_dir(out), load_dir(single)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
