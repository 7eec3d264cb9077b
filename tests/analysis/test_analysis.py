"""Analysis tools on cases with known answers, and the report / CLI end to end."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

from fusion_engine.analysis import (
    analyze,
    interpolation_curve,
    layerwise_barriers,
    linear_cka,
    loss_plane,
    representation_cka,
    task_vector_geometry,
    write_report,
)
from fusion_engine.analysis.geometry import effective_rank
from fusion_engine.errors import ConfigError, MissingTensorError, ShapeMismatchError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cli"))
from cli_fixtures import tiny_llamas  # noqa: E402


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


# ----------------------------------------------------------------------------------------------
# task-vector geometry


def test_identical_task_vectors_have_cosine_one_no_conflicts_full_overlap():
    base = {"w": torch.zeros(5, 4), "b": torch.zeros(4)}
    tau = {"w": torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), "b": torch.randn(4)}
    ft = {k: base[k] + v for k, v in tau.items()}
    geo = task_vector_geometry(base, [ft, copy.deepcopy(ft)], labels=["a", "b"], energy=1.0)
    torch.testing.assert_close(geo.cosine, torch.ones(2, 2, dtype=torch.float64))
    for t in geo.tensors:
        torch.testing.assert_close(t.cosine, torch.ones(2, 2, dtype=torch.float64))
        assert float(t.sign_conflict.max()) == 0.0
    w = geo.tensors[0]
    torch.testing.assert_close(w.overlap, torch.ones(2, 2, dtype=torch.float64))


def test_orthogonal_task_vectors_have_cosine_zero_and_disjoint_subspaces():
    base = {"w": torch.ones(4, 4)}
    a = torch.zeros(4, 4)
    a[:2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.zeros(4, 4)
    b[2:, 2:] = torch.tensor([[5.0, -1.0], [2.0, 1.0]])
    geo = task_vector_geometry(base, [{"w": base["w"] + a}, {"w": base["w"] + b}])
    t = geo.tensors[0]
    assert float(t.cosine[0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert float(t.overlap[0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert float(t.sign_conflict[0, 1]) == 0.0  # no entry is non-zero in both


def test_sign_conflicts_and_cosine_by_hand():
    base = {"v": torch.zeros(6)}
    a = torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0, -1.0])
    b = torch.tensor([2.0, 2.0, -1.0, 5.0, 0.0, -3.0])
    geo = task_vector_geometry(base, [{"v": a}, {"v": b}])
    t = geo.tensors[0]
    # both non-zero at 0, 1, 2, 5; opposite signs at 1 and 2
    assert float(t.sign_conflict[0, 1]) == pytest.approx(2 / 4)
    assert float(t.cosine[0, 1]) == pytest.approx(float(a @ b / (a.norm() * b.norm())))
    assert t.overlap is None


def test_effective_rank_and_errors():
    assert effective_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0]), 0.9) == 3
    assert effective_rank(torch.zeros(3), 0.9) == 0
    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(MissingTensorError, match="'w'"):
        task_vector_geometry(base, [{"x": torch.zeros(2, 2)}])
    with pytest.raises(ShapeMismatchError, match="'w'"):
        task_vector_geometry(base, [{"w": torch.zeros(3, 2)}])
    with pytest.raises(ConfigError, match="energy"):
        task_vector_geometry(base, [base], energy=0.0)


# ----------------------------------------------------------------------------------------------
# landscape


def _evaluate(x, y):
    def evaluate(model):
        with torch.no_grad():
            logits = model(x)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())
    return evaluate


def test_identical_models_have_no_barrier_anywhere():
    model = _mlp(0)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    curve = interpolation_curve(model, copy.deepcopy(model), _evaluate(x, y), steps=5)
    assert curve.loss_barrier == pytest.approx(0.0, abs=1e-7)
    assert curve.accuracy_barrier == pytest.approx(0.0, abs=1e-7)
    for c in layerwise_barriers(model, copy.deepcopy(model), _evaluate(x, y), steps=5).values():
        assert c.loss_barrier == pytest.approx(0.0, abs=1e-7)


def test_barrier_and_layerwise_paths_follow_their_definitions():
    a, b = _mlp(0), _mlp(1)
    seen = []

    def evaluate(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        w = model[0].weight
        return float((w ** 2).sum()), None

    curve = interpolation_curve(a, b, evaluate, steps=3)
    mid = (0.5 * (a[0].weight + b[0].weight)).detach()
    torch.testing.assert_close(seen[1]["0.weight"], mid)
    wa, wb = a[0].weight.detach(), b[0].weight.detach()
    expected = float((mid ** 2).sum()) - 0.5 * (float((wa ** 2).sum()) + float((wb ** 2).sum()))
    assert curve.loss_barrier == pytest.approx(max(0.0, expected), abs=1e-5)
    seen.clear()
    layers = layerwise_barriers(a, b, evaluate, steps=3)
    assert list(layers) == ["0", "2"]
    # while layer "2" moves, layer "0" stays model a's
    torch.testing.assert_close(seen[4]["0.weight"], a[0].weight.detach())
    torch.testing.assert_close(seen[4]["2.weight"], (0.5 * (a[2].weight + b[2].weight)).detach())


def test_loss_plane_puts_the_models_at_their_coordinates():
    m1, m2 = _mlp(0), _mlp(1)
    m3 = copy.deepcopy(m1)
    with torch.no_grad():  # θ3 = θ1 + ½(θ2 − θ1) + an orthogonal-ish bump: its projection lies inside [0, ‖u‖]
        for p1, p2, p3 in zip(m1.parameters(), m2.parameters(), m3.parameters()):
            p3.copy_(p1 + 0.5 * (p2 - p1) + 0.3 * torch.randn_like(p1))
    target = torch.cat([p.detach().reshape(-1) for p in m2.parameters()])

    def evaluate(model):
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return float(((theta - target) ** 2).sum()), None

    plane = loss_plane(m1, m2, m3, evaluate, grid=3, margin=0.0)
    (x1, y1), (x2, y2), (x3, y3) = plane.model_coordinates
    assert (x1, y1, y2) == (0.0, 0.0, 0.0) and y3 > 0 and 0 < x3 < x2
    assert plane.xs[0] == pytest.approx(0.0) and plane.xs[-1] == pytest.approx(x2)
    assert float(plane.losses[0, -1]) == pytest.approx(0.0, abs=1e-4)          # at model 2
    assert float(plane.losses[0, 0]) == pytest.approx(evaluate(m1)[0], rel=1e-5)  # at model 1
    with pytest.raises(ConfigError, match="collinear"):
        loss_plane(m1, m2, copy.deepcopy(m2), evaluate)


# ----------------------------------------------------------------------------------------------
# CKA


def test_linear_cka_matches_the_hsic_formula_and_its_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=g, dtype=torch.float64) + 0.5 * torch.randn(50, 4, generator=g,
                                                                                    dtype=torch.float64)
    h = torch.eye(50, dtype=torch.float64) - 1.0 / 50
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    hsic = lambda a, b: float((a * b).sum())  # noqa: E731
    expected = hsic(kx, ky) / (hsic(kx, kx) * hsic(ky, ky)) ** 0.5
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)


def test_representation_cka_is_one_for_identical_and_permuted_networks():
    a = _mlp(0)
    b = copy.deepcopy(a)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # permute the hidden units of b: same function, permuted first-layer outputs
        b[0].weight.copy_(a[0].weight[perm])
        b[0].bias.copy_(a[0].bias[perm])
        b[2].weight.copy_(a[2].weight[:, perm])
    batches = [torch.randn(20, 6) for _ in range(3)]
    result = representation_cka(a, b, batches)
    assert result.layers_a == ["0", "2"]
    for v in result.diagonal():
        assert v == pytest.approx(1.0, rel=1e-9)
    # streamed over batches == all rows at once
    x = torch.cat(batches)
    assert float(result.matrix[0, 1]) == pytest.approx(linear_cka(a[0](x).detach(), b[2](torch.relu(b[0](x))).detach()),
                                                       rel=1e-9)


# ----------------------------------------------------------------------------------------------
# report and CLI


def test_analyze_writes_a_report_with_every_section(tmp_path):
    base = _mlp(0)
    models = []
    for seed in (1, 2, 3):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        models.append(m)
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    report = analyze(models, base=base, labels=["a", "b", "c"], evaluate=_evaluate(x, y), cka_batches=[x],
                     steps=3, plane_grid=3)
    path = write_report(report, str(tmp_path / "out"))
    text = open(path, encoding="utf-8").read()
    for heading in ("## Task vectors", "## Linear interpolation", "## Barrier per layer",
                    "## Representation similarity", "## Loss plane"):
        assert heading in text
    for png in ("geometry.png", "interpolation.png", "layer_barriers.png", "cka.png", "loss_plane.png"):
        with open(tmp_path / "out" / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text


def test_cli_analyze_checkpoints_with_prompts(tmp_path, capsys):
    from fusion_engine.cli import main

    models = tiny_llamas()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox jumps\nover the lazy dog again\nhello world, merging models\n")
    out = tmp_path / "report"
    rc = main(["analyze", models["model_0"], models["model_1"], models["model_2"], "--base", models["base"],
               "--data", str(prompts), "--out", str(out), "--steps", "3"])
    assert rc == 0, capsys.readouterr().err
    text = (out / "report.md").read_text()
    assert "model.layers.0.self_attn.q_proj.weight" in text and "## Loss plane" in text


def test_cli_analyze_errors(tmp_path, capsys):
    from fusion_engine.cli import main

    for argv in (["analyze", "--out", str(tmp_path / "x")], ["analyze", "m", "--out", str(tmp_path / "x")],
                 ["analyze", "m", "--example", "digits"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    models = tiny_llamas()
    rc = main(["analyze", models["model_0"], models["model_1"], "--data", str(tmp_path / "missing.txt"),
               "--out", str(tmp_path / "y")])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_examples_run_offline(tmp_path):
    from fusion_engine.analysis.examples import digits_analysis, tiny_lm_analysis

    for report in (digits_analysis(steps=3, plane_grid=3), tiny_lm_analysis(steps=3, plane_grid=3, train_steps=10)):
        assert report.geometry is not None and report.cka is not None and report.plane is not None
        write_report(report, str(tmp_path / report.title.split(":")[0]))
