"""The FusionBench-style evaluation table on scikit-learn's digits (``fusion-engine evaluate``).

Part 1, multi-task merging (:mod:`fusion_engine.bench.tasks`): one pre-trained MLP, K tasks (rotated /
mirrored digits), one briefly fine-tuned model per task. Rows: the pre-trained model, the individual
fine-tuned models (each on its own task), a model trained on all tasks jointly, and the merges —
simple average, task arithmetic, TIES, DARE, the 2024–26 task-vector methods (TSV, Iso-C, Iso-CTS, MagMax,
consensus/TALL, PCB, WUDI, task arithmetic + LiNeS), Fisher, RegMean, AdaMerging (task- and layer-wise) —
and the output ensemble of the fine-tuned models, and SMILE's upscaling of them into a sparse mixture of
low-rank experts (:mod:`fusion_engine.upscaling`; a bigger model, not a merge). Columns: test accuracy per
task, their average, and the time the merge took (statistics, coefficient search and merging included).
The scaling λ of task arithmetic, TIES, DARE and the 2024–26 methods (LiNeS: β), and SMILE's ranks, are
chosen on a validation split, as FusionBench does; the 2024–26 methods' other hyper-parameters are the
published defaults.

Part 2, alignment: two MLPs trained from different seeds on the upright digits. Naive averaging sits
on a loss barrier; weight matching (Git Re-Basin) and OT fusion align the hidden units first. The loss
along the linear paths (and along a fitted Bezier curve) is plotted to ``barrier.png``.

``main(argv)`` prints the tables and writes ``<out>/results.md`` and ``<out>/barrier.png``.
Everything is seeded and runs in seconds on two CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops
from ..averaging import load_state, uniform_soup
from ..connectivity import PathScan, fit_curve, interpolate, loss_barrier
from ..ensemble import Ensemble
from ..methods import merge_tensors
from ..methods.lines import lines_scale
from .digits import evaluate, make_mlp, train
from .tasks import MultiTaskSetup, TaskConfig, build_tasks, make_tasks, train_multitask
from .trajectory import TrajectoryConfig, trajectory_methods

LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 21))  # 0.1 … 2.0


@dataclass(frozen=True)
class EvalConfig:
    """Everything the evaluation builds; the defaults are the published table's configuration."""

    tasks: TaskConfig = TaskConfig()
    trajectory: TrajectoryConfig = TrajectoryConfig()  # training-time averaging rows (LAWA, SWAG, ...)
    lambda_grid: tuple[float, ...] = LAMBDA_GRID   # λ of the task-vector merges (LiNeS: β), chosen on validation
    ties_density: float = 0.2
    dare_density: float = 0.5
    iso_cts_fraction: float = 0.8                  # the 2024–26 task-vector methods, published defaults
    consensus_k: int = 2
    tall_lambda: float = 0.6
    pcb_ratio: float = 0.1
    wudi_iterations: int = 300
    wudi_lr: float = 1e-5
    fisher_examples: int = 256                     # per task, from its training split
    gram_examples: int = 256                       # per task, from its training split (RegMean)
    adamerging_steps: int = 100
    adamerging_lr: float = 1e-2
    adamerging_batch: int = 32                     # unlabeled test inputs per task and step
    smile_gate_k: tuple[int, ...] = (2, 4, 8, 16, 32)  # SMILE router ranks, chosen on validation
    smile_k: tuple[int, ...] = (8, 16, 32)              # SMILE expert ranks, chosen on validation
    pair_hidden: tuple[int, ...] = (64, 64)        # part 2: two independently trained models
    pair_epochs: int = 30
    pair_seeds: tuple[int, int] = (1, 2)
    barrier_steps: int = 11
    curve_epochs: int = 10
    seed: int = 0


@dataclass
class Row:
    """One line of the merging table: accuracy per task (fractions), the time it took, a note."""

    method: str
    accuracies: list[float]
    seconds: float | None = None
    note: str = ""

    @property
    def average(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)


@dataclass
class PairRow:
    """One line of the alignment table."""

    method: str
    loss: float
    accuracy: float
    barrier: float | None = None
    seconds: float | None = None
    note: str = ""


@dataclass
class Report:
    config: EvalConfig
    task_names: list[str]
    rows: list[Row]
    pair_rows: list[PairRow]
    curves: dict[str, PathScan] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, method: str) -> Row:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)


@contextlib.contextmanager
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the duration, then the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# part 1: multi-task merging


def _per_tensor(setup: MultiTaskSetup, merge: Callable[[str, torch.Tensor, list[torch.Tensor]], torch.Tensor]):
    """A state dict built tensor by tensor: ``merge(name, base, finetuned tensors)`` for float tensors."""
    base = setup.pretrained.state_dict()
    sds = [m.state_dict() for m in setup.finetuned]
    return {name: merge(name, b, [sd[name] for sd in sds]) if b.is_floating_point() else b.clone()
            for name, b in base.items()}


def _best_lambda(setup: MultiTaskSetup, merge_at: Callable[[float], dict], grid) -> tuple[dict, float]:
    """The merge whose λ (from ``grid``) has the best mean validation accuracy (ties: the smaller λ)."""
    best = None
    for lam in grid:
        sd = merge_at(lam)
        score = setup.mean_accuracy(load_state(setup.pretrained, sd), split="val")
        if best is None or score > best[0]:
            best = (score, lam, sd)
    return best[2], best[1]


def _scaled(setup: MultiTaskSetup, unit: dict, scale: Callable[[str], float]) -> dict:
    """b + scale(name) · (unit − b) per floating tensor: a merged task vector rescaled."""
    base = setup.pretrained.state_dict()
    return {n: b + scale(n) * (unit[n] - b) if b.is_floating_point() else b.clone() for n, b in base.items()}


def _linear_depth(setup: MultiTaskSetup) -> tuple[dict[str, int], int]:
    """Tensor name → index of its Linear layer in the MLP (0-based), and the number of Linear layers."""
    linears = [name for name, module in setup.pretrained.named_modules() if isinstance(module, torch.nn.Linear)]
    depth = {f"{name}.{p}": i for i, name in enumerate(linears) for p in ("weight", "bias")}
    return depth, len(linears)


def _task_batches(task, n: int, batch_size: int = 64):
    x, y = task.x_train[:n], task.y_train[:n]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def _adamerging_batches(setup: MultiTaskSetup, batch: int) -> list[torch.Tensor]:
    """Unlabeled test inputs, each batch holding ``batch`` examples of every task (AdaMerging's setting)."""
    n = min(len(t.x_test) for t in setup.tasks)
    return [torch.cat([t.x_test[i:i + batch] for t in setup.tasks]) for i in range(0, n, batch)]


def merge_methods(setup: MultiTaskSetup, config: EvalConfig) -> dict[str, Callable[[], tuple[dict, str]]]:
    """Method name → a function building the merged state dict (and a note with chosen hyper-parameters)."""
    from .. import data_aware

    K = len(setup.finetuned)

    def simple_average():
        return uniform_soup(setup.finetuned), ""

    def task_arithmetic():
        sd, lam = _best_lambda(setup, lambda lam: _per_tensor(
            setup, lambda name, b, xs: ops.task_arithmetic(b, xs, lam=lam)), config.lambda_grid)
        return sd, f"λ={lam:g}"

    def ties():
        sd, lam = _best_lambda(setup, lambda lam: _per_tensor(
            setup, lambda name, b, xs: ops.ties_merge(b, xs, None, config.ties_density, lam=lam)), config.lambda_grid)
        return sd, f"density={config.ties_density:g}, λ={lam:g}"

    def dare():
        sd, lam = _best_lambda(setup, lambda lam: _per_tensor(
            setup, lambda name, b, xs: ops.dare_merge(b, xs, None, config.dare_density, seed=config.seed,
                                                      stream=ops.stream_id(name), lam=lam)), config.lambda_grid)
        return sd, f"density={config.dare_density:g}, λ={lam:g}"

    def fisher():
        fishers = [data_aware.estimate_fisher(m, _task_batches(t, config.fisher_examples))
                   for m, t in zip(setup.finetuned, setup.tasks)]
        return data_aware.fisher_merge_models(setup.finetuned, fishers), f"{config.fisher_examples} examples/task"

    def regmean():
        grams = [data_aware.collect_gram(m, _task_batches(t, config.gram_examples))
                 for m, t in zip(setup.finetuned, setup.tasks)]
        return data_aware.regmean_merge(setup.finetuned, grams), f"α=0.95, {config.gram_examples} examples/task"

    def adamerging(mode):
        def run():
            result = data_aware.adamerging(setup.pretrained, setup.finetuned,
                                           _adamerging_batches(setup, config.adamerging_batch), mode=mode,
                                           steps=config.adamerging_steps, lr=config.adamerging_lr)
            lam = result.coefficients.reshape(K, -1).mean(1)
            return result.state_dict, "mean λ per task " + " ".join(f"{v:.2f}" for v in lam.tolist())
        return run

    def task_vector_method(method: str, parameters: dict, note: str):
        """A registered method merged once at λ = 1, then λ chosen on validation (a final scale)."""
        def run():
            unit = _per_tensor(setup, lambda name, b, xs: merge_tensors(
                [b, *xs], method, base_index=0, name=name, parameters={**parameters, "lambda": 1.0}))
            sd, lam = _best_lambda(setup, lambda lam: _scaled(setup, unit, lambda name: lam), config.lambda_grid)
            return sd, (note + ", " if note else "") + f"λ={lam:g}"
        return run

    def ta_lines():
        """Task arithmetic (Σ τ) with LiNeS: α = 1/K (the paper's norm-ratio rule for a sum), β on validation."""
        depth, layers = _linear_depth(setup)
        unit = _per_tensor(setup, lambda name, b, xs: ops.task_arithmetic(b, xs, lam=1.0))
        alpha = 1.0 / K
        sd, beta = _best_lambda(setup, lambda beta: _scaled(
            setup, unit, lambda name: lines_scale(depth.get(name), layers, alpha, beta)), config.lambda_grid)
        return sd, f"α=1/K={alpha:g}, β={beta:g}"

    c = config
    return {
        "Simple average": simple_average,
        "Task arithmetic": task_arithmetic,
        "TIES": ties,
        "DARE": dare,
        "TSV": task_vector_method("tsv", {}, ""),
        "Iso-C": task_vector_method("iso_c", {}, ""),
        "Iso-CTS": task_vector_method("iso_cts", {"common_space_fraction": c.iso_cts_fraction},
                                      f"common_space_fraction={c.iso_cts_fraction:g}"),
        "MagMax": task_vector_method("magmax", {}, ""),
        "Consensus (TALL)": task_vector_method("consensus", {"k": c.consensus_k, "tall_lambda": c.tall_lambda},
                                               f"k={c.consensus_k}, tall_lambda={c.tall_lambda:g}"),
        "PCB": task_vector_method("pcb", {"ratio": c.pcb_ratio}, f"ratio={c.pcb_ratio:g}"),
        "WUDI": task_vector_method("wudi", {"iterations": c.wudi_iterations, "lr": c.wudi_lr},
                                   f"{c.wudi_iterations} Adam steps, lr={c.wudi_lr:g}"),
        "Task arithmetic + LiNeS": ta_lines,
        "Fisher": fisher,
        "RegMean": regmean,
        "AdaMerging (task-wise)": adamerging("task"),
        "AdaMerging (layer-wise)": adamerging("layer"),
    }


def _progress(text: str) -> None:
    """One line per row as it is built, on stderr (the tables go to stdout at the end)."""
    print(f"evaluate: {text}", file=sys.stderr, flush=True)


class _Rows(list):
    """The rows of a table, each announced on stderr as it is added."""

    def append(self, row) -> None:
        super().append(row)
        seconds = f" ({row.seconds:.1f} s)" if getattr(row, "seconds", None) is not None else ""
        _progress(f"{row.method}{seconds}")


def merge_table(setup: MultiTaskSetup, config: EvalConfig) -> list[Row]:
    """The rows of part 1 (see the module docstring)."""
    rows = _Rows()
    rows.append(Row("Pre-trained", setup.accuracies(setup.pretrained)))
    rows.append(Row("Individual fine-tuned", [setup.accuracies(m)[k] for k, m in enumerate(setup.finetuned)],
                    note="model k on task k"))
    multitask, seconds = _timed(lambda: train_multitask(setup))
    rows.append(Row("Multi-task trained", setup.accuracies(multitask), seconds, "training time"))
    for method, build in trajectory_methods(setup, config.trajectory).items():
        (model, note), seconds = _timed(build)
        rows.append(Row(method, setup.accuracies(model), seconds, note + "; training time"))
    for method, build in merge_methods(setup, config).items():
        (state_dict, note), seconds = _timed(build)
        rows.append(Row(method, setup.accuracies(load_state(setup.pretrained, state_dict)), seconds, note))
    ensemble, seconds = _timed(lambda: Ensemble(setup.finetuned, mode="mean").eval())
    rows.append(Row("Ensemble (mean logits)", setup.accuracies(ensemble), seconds,
                    f"{len(setup.finetuned)}× the inference cost"))
    (smile, note), seconds = _timed(lambda: _smile(setup, config))
    rows.append(Row("SMILE upscaling (MoE)", setup.accuracies(smile), seconds, note))
    return list(rows)


def _smile(setup: MultiTaskSetup, config: EvalConfig):
    """SMILE's sparse low-rank MoE (top-1 routing), router and expert ranks chosen on validation."""
    from ..upscaling import smile_upscale

    best = None
    for gate_k in config.smile_gate_k:
        for k in config.smile_k:
            model = smile_upscale(setup.pretrained, setup.finetuned, gate_k=gate_k, k=k, top_k=1)
            score = setup.mean_accuracy(model, split="val")
            if best is None or score > best[0]:
                best = (score, model, gate_k, k)
    _, model, gate_k, k = best
    return model, f"gate rank {gate_k}, expert rank {k}, top-1 routing"


# ----------------------------------------------------------------------------------------------
# part 2: two independently trained models, alignment and the loss barrier


def alignment_study(config: EvalConfig) -> tuple[list[PairRow], dict[str, PathScan]]:
    """Naive average vs weight matching vs OT fusion of two MLPs trained from different seeds."""
    from .. import alignment

    (upright,), _ = make_tasks(dataclasses.replace(config.tasks, tasks=("upright",)))
    x, y = upright.x_train, upright.y_train
    seed_a, seed_b = config.pair_seeds
    model_a = train(make_mlp(config.pair_hidden, seed=seed_a), x, y, epochs=config.pair_epochs, seed=seed_a)
    model_b = train(make_mlp(config.pair_hidden, seed=seed_b), x, y, epochs=config.pair_epochs, seed=seed_b)

    def test_score(model):
        return evaluate(model, upright.x_test, upright.y_test)

    def test_loss(model):
        return test_score(model).loss

    rows, curves = _Rows(), {}
    for name, model in (("Model A", model_a), ("Model B", model_b)):
        s = test_score(model)
        rows.append(PairRow(name, s.loss, s.accuracy, note=f"seed {seed_a if model is model_a else seed_b}"))

    def add(method, merged, seconds, curve_end=None, curve_label=None, note=""):
        s = test_score(merged)
        barrier = None
        if curve_end is not None:
            curves[curve_label] = loss_barrier(model_a, curve_end, test_loss, steps=config.barrier_steps)
            barrier = curves[curve_label].height
        rows.append(PairRow(method, s.loss, s.accuracy, barrier, seconds, note))

    naive, seconds = _timed(lambda: interpolate(model_a, model_b, 0.5))
    add("Naive average", naive, seconds, model_b, "linear A → B", "barrier along A→B")

    spec = alignment.mlp_permutation_spec(model_a)

    def weight_matched():
        perms = alignment.weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=config.seed)
        return load_state(model_b, alignment.apply_permutation(spec, model_b.state_dict(), perms))

    aligned_b, seconds = _timed(weight_matched)
    merged = interpolate(model_a, aligned_b, 0.5)
    add("Weight matching + average", merged, seconds, aligned_b, "linear A → π(B), weight matching",
        "barrier along A→π(B)")

    for method, kwargs, note in (("OT fusion (exact)", dict(exact=True), "exact transport: a permutation per layer"),
                                 ("OT fusion (Sinkhorn)", dict(reg=0.01), "entropic transport, reg 0.01")):
        fused, seconds = _timed(lambda: alignment.ot_fusion([model_a, model_b], spec=spec, **kwargs))
        add(method, load_state(model_a, fused), seconds, note=note)

    train_batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)]
    curve, seconds = _timed(lambda: fit_curve(model_a, model_b, train_batches, "bezier",
                                              epochs=config.curve_epochs, seed=config.seed))
    curves["Bezier curve A → B, fitted"] = scan = curve.scan(test_loss, config.barrier_steps)
    mid = test_score(curve.model_at(0.5))
    rows.append(PairRow("Bezier curve midpoint", mid.loss, mid.accuracy, scan.height, seconds,
                        "control point trained A→B"))
    return list(rows), curves


# ----------------------------------------------------------------------------------------------
# output


def run(config: EvalConfig = EvalConfig(), *, alignment: bool = True) -> Report:
    """Build both parts of the evaluation (deterministic algorithms on)."""
    start = time.perf_counter()
    with deterministic():
        setup = build_tasks(config.tasks)
        rows = merge_table(setup, config)
        pair_rows, curves = alignment_study(config) if alignment else ([], {})
    return Report(config, [t.name for t in setup.tasks], rows, pair_rows, curves, time.perf_counter() - start)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _secs(s: float | None) -> str:
    return "—" if s is None else f"{s:.3f}"


def merge_table_markdown(report: Report) -> str:
    header = ["Method", *report.task_names, "Avg", "Time (s)", "Notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    for r in report.rows:
        lines.append("| " + " | ".join([r.method, *map(_pct, r.accuracies), f"**{_pct(r.average)}**",
                                        _secs(r.seconds), r.note]) + " |")
    return "\n".join(lines)


def pair_table_markdown(report: Report) -> str:
    lines = ["| Method | Test loss | Test acc. | Barrier B | Time (s) | Notes |", "|---|---:|---:|---:|---:|---|"]
    for r in report.pair_rows:
        barrier = "—" if r.barrier is None else f"{r.barrier:.3f}"
        lines.append(f"| {r.method} | {r.loss:.3f} | {_pct(r.accuracy)} | {barrier} | {_secs(r.seconds)} | {r.note} |")
    return "\n".join(lines)


def render_markdown(report: Report, plot_name: str | None = "barrier.png") -> str:
    c = report.config
    t = c.tasks
    parts = [
        "# fusion_engine evaluation on scikit-learn's digits",
        "",
        f"Generated by `fusion-engine evaluate` in {report.seconds:.1f} s (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, seed {t.seed}, deterministic algorithms).",
        "",
        "## Multi-task merging",
        "",
        f"A {'×'.join(map(str, t.hidden))} MLP pre-trained on {' + '.join(t.pretrain_tasks)} digits "
        f"({t.pretrain_epochs} epochs), "
        f"fine-tuned for {t.finetune_epochs} epochs on each task: {', '.join(report.task_names)} "
        f"(transformed 8×8 images, the same 10 labels). Test accuracy (%) per task; λ of task arithmetic, "
        f"TIES, DARE and the task-vector methods (LiNeS: β) chosen on a validation split from {len(c.lambda_grid)} values in "
        f"[{min(c.lambda_grid):g}, {max(c.lambda_grid):g}]; "
        f"AdaMerging: {c.adamerging_steps} Adam steps (lr {c.adamerging_lr:g}) of entropy minimisation on "
        f"unlabeled test inputs. Time: building the merge, statistics and λ search included.",
        "",
        merge_table_markdown(report),
    ]
    if report.pair_rows:
        parts += [
            "",
            "## Two independently trained models: alignment and the loss barrier",
            "",
            f"Two {'×'.join(map(str, c.pair_hidden))} MLPs trained from seeds {c.pair_seeds[0]} and "
            f"{c.pair_seeds[1]} on the upright digits ({c.pair_epochs} epochs). Barrier "
            f"B = max_t [L(φ(t)) − ((1−t) L(A) + t L(B))] of the test loss over {c.barrier_steps} points.",
            "",
            pair_table_markdown(report),
        ]
        if plot_name:
            parts += ["", f"![loss along the paths]({plot_name})"]
    return "\n".join(parts) + "\n"


def save_barrier_plot(curves: dict[str, PathScan], path: str) -> None:
    """Test loss along each path, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, scan in curves.items():
        ax.plot(scan.ts, scan.losses, marker="o", markersize=3, label=f"{name} (B={scan.height:.3f})")
    ax.set_xlabel("t (0 = model A, 1 = model B)")
    ax.set_ylabel("test cross-entropy")
    ax.set_title("Loss along the paths between two digits MLPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: Report, out_dir: str) -> tuple[str, str | None]:
    """``<out_dir>/results.md`` and (with part 2) ``<out_dir>/barrier.png``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    plot = os.path.join(out_dir, "barrier.png") if report.curves else None
    if plot:
        save_barrier_plot(report.curves, plot + ".tmp.png")
        os.replace(plot + ".tmp.png", plot)
    md = os.path.join(out_dir, "results.md")
    with open(md + ".tmp", "w", encoding="utf-8") as f:
        f.write(render_markdown(report, os.path.basename(plot) if plot else None))
    os.replace(md + ".tmp", md)
    return md, plot


def main(argv=None) -> int:
    """``fusion-engine evaluate [--out DIR] [--seed N] [--no-alignment]``: print the tables, write the files."""
    parser = argparse.ArgumentParser(prog="fusion-engine evaluate",
                                     description="Merge methods on scikit-learn's digits: the evaluation table.")
    parser.add_argument("--out", default="fusion-engine-eval",
                        help="output folder for results.md and barrier.png (default: ./fusion-engine-eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, training and merges")
    parser.add_argument("--no-alignment", action="store_true", help="skip part 2 (two models, barrier plot)")
    args = parser.parse_args(argv)
    config = EvalConfig(tasks=TaskConfig(seed=args.seed), seed=args.seed)
    _progress("training the models and building the tables, one line per row")
    report = run(config, alignment=not args.no_alignment)
    print(render_markdown(report, plot_name=None))
    md, plot = write_report(report, args.out)
    print(f"wrote {md}" + (f" and {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
