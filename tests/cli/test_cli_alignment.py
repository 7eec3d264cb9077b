"""``alignment: weight_matching`` in a merge config: HF checkpoints permuted onto the reference while streaming.

A planted case (B is a permuted copy of A: the aligned linear merge is A itself) and two independently
initialised Llama models with grouped-query attention (the output equals the in-memory
``interpolate(A, apply_permutation(B, weight_matching(A, B)))``).
"""

from __future__ import annotations

import os

import pytest
import torch

from fusion_engine.alignment import apply_permutation, interpolate, transformer_permutation_spec, weight_matching

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


def test_planted_permutation_merges_back_to_the_reference(models):
    spec, sa, _, a_path, b_path, _ = models
    rc, out = merge(a_path, b_path)
    assert rc == 0
    merged = load_dir(out)
    for k, v in sa.items():
        if k in merged:
            torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")


def test_independent_models_match_the_python_alignment(models):
    spec, sa, sc, a_path, _, c_path = models
    rc, out = merge(a_path, c_path)
    assert rc == 0
    expected = interpolate(sa, apply_permutation(spec, sc, weight_matching(spec, sa, sc)), 0.5)
    merged = load_dir(out)
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")


def test_unknown_alignment_is_a_config_error(models, capsys):
    _, _, _, a_path, b_path, _ = models
    rc, _ = merge(a_path, b_path, alignment="zipit")
    assert rc != 0
    assert "alignment: zipit is not available" in capsys.readouterr().err
