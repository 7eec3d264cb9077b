"""The analysis report: task-vector geometry, interpolation curves, barriers per layer, CKA, loss plane.

:func:`analyze` computes whatever its inputs allow; :func:`write_report` writes ``report.md`` and its PNG
figures (matplotlib, Agg) into a folder, each file written beside its final name and renamed into place.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .cka import LayerCKA, representation_cka
from .geometry import TaskVectorGeometry, models_and_labels, task_vector_geometry
from .landscape import Curve1D, LossPlane, interpolation_curve, layerwise_barriers, loss_plane


@dataclass
class AnalysisReport:
    """Everything :func:`analyze` measured (a section is None when its inputs were not given)."""

    title: str
    labels: list[str]
    geometry: TaskVectorGeometry | None = None
    curve: Curve1D | None = None
    layer_barriers: "OrderedDict[str, Curve1D] | None" = None
    cka: LayerCKA | None = None
    plane: LossPlane | None = None
    notes: list[str] = field(default_factory=list)


def analyze(models: Sequence, *, base=None, labels: Sequence[str] | None = None, evaluate: Callable | None = None,
            cka_batches: Iterable | None = None, forward: Callable | None = None, steps: int = 11,
            plane_grid: int = 11, energy: float = 0.9, title: str = "Model analysis") -> AnalysisReport:
    """Measure the models the merging literature's way.

    * with ``base``: the task-vector geometry of ``models`` (:func:`~.geometry.task_vector_geometry`);
    * with ``evaluate`` (model → (loss, accuracy)) and ≥ 2 models: the linear interpolation curve and the
      barrier per layer between the first two (:mod:`.landscape`), and with ≥ 3 the loss plane through the
      first three;
    * with ``cka_batches`` and ≥ 2 models: linear CKA between the first two, layer by layer (:mod:`.cka`).

    ``models`` are ``nn.Module`` (state dicts or checkpoints suffice for the geometry alone).
    """
    models, labels = models_and_labels("analyze", models, labels)
    report = AnalysisReport(title, labels)
    if base is not None:
        report.geometry = task_vector_geometry(base, models, labels=labels, energy=energy)
    needs_modules = evaluate is not None or cka_batches is not None
    if needs_modules and len(models) >= 2 and not all(isinstance(m, nn.Module) for m in models):
        raise ConfigError("analyze: curves, barriers, CKA and the loss plane need nn.Module models")
    if evaluate is not None and len(models) >= 2:
        report.curve = interpolation_curve(models[0], models[1], evaluate, steps)
        report.layer_barriers = layerwise_barriers(models[0], models[1], evaluate, steps)
        if len(models) >= 3:
            report.plane = loss_plane(models[0], models[1], models[2], evaluate, grid=plane_grid)
    if cka_batches is not None and len(models) >= 2:
        report.cka = representation_cka(models[0], models[1], cka_batches, forward=forward)
    return report


# ----------------------------------------------------------------------------------------------
# markdown


def _matrix_md(labels: list[str], m: torch.Tensor, fmt: str = "{:.3f}") -> list[str]:
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for label, row in zip(labels, m.tolist()):
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in row) + " |")
    return lines


def render_markdown(report: AnalysisReport, figures: dict[str, str]) -> str:
    """The report as markdown; ``figures`` maps a section to its PNG's file name."""
    out = [f"# {report.title}", ""]
    out += [f"- {note}" for note in report.notes] + ([""] if report.notes else [])
    g = report.geometry
    if g is not None:
        out += ["## Task vectors", "", "Cosine similarity of the whole task vectors τ_i = θ_i − θ_base:", ""]
        out += _matrix_md(g.labels, g.cosine)
        out += ["", "Per tensor, mean over model pairs: cosine, sign-conflict rate (among entries where both are "
                "non-zero), and singular-subspace overlap (0: no shared direction, 1: one inside the other; "
                "ranks keep 90% of the energy):", "",
                "| tensor | shape | cosine | sign conflicts | subspace overlap | ranks |", "|---|---|---:|---:|---:|---|"]
        for t, c, s, o in zip(g.tensors, g.mean_offdiagonal("cosine"), g.mean_offdiagonal("sign_conflict"),
                              g.mean_offdiagonal("overlap")):
            ranks = "—" if t.ranks is None else ", ".join(map(str, t.ranks))
            over = "—" if t.overlap is None else f"{o:.3f}"
            out.append(f"| {t.name} | {'×'.join(map(str, t.shape))} | {c:.3f} | {s:.3f} | {over} | {ranks} |")
        out += [""] + ([f"![task-vector geometry per tensor]({figures['geometry']})", ""] if "geometry" in figures else [])
    if report.curve is not None:
        c, (a, b) = report.curve, report.labels[:2]
        out += ["## Linear interpolation", "", f"From {a} (t = 0) to {b} (t = 1): loss barrier "
                f"{c.loss_barrier:.4f}" + ("" if c.accuracy_barrier is None else
                                           f", accuracy barrier {c.accuracy_barrier:.4f}") + ".", "",
                "| t | loss | accuracy |", "|---:|---:|---:|"]
        for i, t in enumerate(c.ts):
            acc = "—" if c.accuracies is None else f"{c.accuracies[i]:.4f}"
            out.append(f"| {t:.2f} | {c.losses[i]:.4f} | {acc} |")
        out += [""] + ([f"![interpolation]({figures['curve']})", ""] if "curve" in figures else [])
    if report.layer_barriers:
        out += ["## Barrier per layer", "", "Only the layer's tensors move along the path; the rest stay at "
                f"{report.labels[0]}'s.", "", "| layer | loss barrier | accuracy barrier |", "|---|---:|---:|"]
        for layer, c in report.layer_barriers.items():
            acc = "—" if c.accuracy_barrier is None else f"{c.accuracy_barrier:.4f}"
            out.append(f"| {layer} | {c.loss_barrier:.4f} | {acc} |")
        out += [""] + ([f"![barrier per layer]({figures['layers']})", ""] if "layers" in figures else [])
    if report.cka is not None:
        k = report.cka
        out += ["## Representation similarity (linear CKA)", "", f"{report.labels[0]} (rows) against "
                f"{report.labels[1]} (columns); the diagonal compares corresponding layers:", ""]
        out += ["| layer | CKA with the same layer |", "|---|---:|"]
        out += [f"| {name} | {v:.4f} |" for name, v in zip(k.layers_a, k.diagonal())]
        out += [""] + ([f"![CKA]({figures['cka']})", ""] if "cka" in figures else [])
    if report.plane is not None:
        p = report.plane
        out += ["## Loss plane", "", "The plane through the first three models (Garipov et al., 2018); they sit at "
                + ", ".join(f"{lab} ({x:.3g}, {y:.3g})" for lab, (x, y) in zip(report.labels, p.model_coordinates))
                + f". Lowest loss on the grid {float(p.losses.min()):.4f}, highest {float(p.losses.max()):.4f}.", ""]
        out += ([f"![loss plane]({figures['plane']})", ""] if "plane" in figures else [])
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# figures


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _figures(report: AnalysisReport, out_dir: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    g = report.geometry
    if g is not None and g.tensors and len(g.labels) >= 2:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(g.tensors)), 4), dpi=110)
        x = range(len(g.tensors))
        ax.plot(x, g.mean_offdiagonal("cosine"), marker="o", label="cosine")
        ax.plot(x, g.mean_offdiagonal("sign_conflict"), marker="s", label="sign-conflict rate")
        ax.plot(x, g.mean_offdiagonal("overlap"), marker="^", label="subspace overlap")
        ax.set_xticks(list(x), [t.name for t in g.tensors], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Task vectors per tensor (mean over model pairs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        files["geometry"] = "geometry.png"
        _save(fig, os.path.join(out_dir, files["geometry"]))
    if report.curve is not None:
        c = report.curve
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        ax.plot(c.ts, c.losses, marker="o", color="C0", label="loss")
        ax.set_xlabel(f"t (0 = {report.labels[0]}, 1 = {report.labels[1]})")
        ax.set_ylabel("loss", color="C0")
        if c.accuracies is not None:
            ax2 = ax.twinx()
            ax2.plot(c.ts, c.accuracies, marker="s", color="C1", label="accuracy")
            ax2.set_ylabel("accuracy", color="C1")
        ax.set_title(f"Linear interpolation (loss barrier {c.loss_barrier:.3f})")
        ax.grid(alpha=0.3)
        files["curve"] = "interpolation.png"
        _save(fig, os.path.join(out_dir, files["curve"]))
    if report.layer_barriers:
        names = list(report.layer_barriers)
        fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(names)), 4), dpi=110)
        ax.bar(range(len(names)), [c.loss_barrier for c in report.layer_barriers.values()])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("loss barrier")
        ax.set_title("Barrier when only one layer is interpolated")
        ax.grid(alpha=0.3, axis="y")
        files["layers"] = "layer_barriers.png"
        _save(fig, os.path.join(out_dir, files["layers"]))
    if report.cka is not None:
        k = report.cka
        fig, ax = plt.subplots(figsize=(5 + 0.2 * len(k.layers_b), 4 + 0.2 * len(k.layers_a)), dpi=110)
        im = ax.imshow(k.matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(k.layers_b)), k.layers_b, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(k.layers_a)), k.layers_a, fontsize=7)
        ax.set_xlabel(report.labels[1])
        ax.set_ylabel(report.labels[0])
        ax.set_title("Linear CKA")
        fig.colorbar(im, ax=ax)
        files["cka"] = "cka.png"
        _save(fig, os.path.join(out_dir, files["cka"]))
    if report.plane is not None:
        p = report.plane
        fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
        cs = ax.contourf(p.xs, p.ys, p.losses.numpy(), levels=20, cmap="magma_r")
        fig.colorbar(cs, ax=ax, label="loss")
        for label, (x, y) in zip(report.labels, p.model_coordinates):
            ax.plot(x, y, "o", color="cyan")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), color="cyan", fontsize=8)
        ax.set_title("Loss on the plane through three models")
        files["plane"] = "loss_plane.png"
        _save(fig, os.path.join(out_dir, files["plane"]))
    return files


def write_report(report: AnalysisReport, out_dir: str) -> str:
    """Write ``<out_dir>/report.md`` and its figures; returns the markdown's path."""
    os.makedirs(out_dir, exist_ok=True)
    figures = _figures(report, out_dir)
    path = os.path.join(out_dir, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(render_markdown(report, figures))
    os.replace(path + ".tmp", path)
    return path


__all__ = ["AnalysisReport", "analyze", "render_markdown", "write_report"]
