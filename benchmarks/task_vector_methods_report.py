"""The 2024–26 task-vector methods (issue 18): ``merge_tensors`` against FusionBench's implementations
on the same tensors (same numbers, time ratio), and the expected time of a 1.1B Llama ``tsv`` merge.

    python benchmarks/task_vector_methods_report.py            # the sizes of RESULTS.md
    python benchmarks/task_vector_methods_report.py --quick    # small sizes, a few seconds

Part 1: one Llama-like layer's 2-D tensors (hidden ``h``, MLP ``3h`` wide, grouped K/V ``h/8`` rows)
plus a norm vector, K fine-tuned models; each method merges them with fusion_engine (one
``merge_tensors`` per tensor) and with FusionBench's function on the task-vector state dicts
(``compute_and_sum_svd_mem_reduction``, ``iso_c``, ``iso_cts``, ``wudi_merging``, MagMax's ``>=``
selection loop, TALL masks + consensus), timed once each after a warm-up on a small case; the
largest relative difference of the merged tensors is reported beside the ratio.

Part 2: ``tsv`` on the tensor shapes of one TinyLlama-1.1B layer and its embedding, scaled down by
``--scale`` in every dimension (a full-size run needs minutes per layer on a 2-core VM); the time of
the full model (22 layers, embedding and head) is extrapolated with the SVD cost m·n·min(m, n), i.e.
× scale³, which overestimates: small SVDs run at a lower FLOP rate than large ones.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time

import torch

import fusion_engine as fe

TINYLLAMA = dict(hidden=2048, intermediate=5632, kv=256, vocab=32000, layers=22)


def layer_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, ...]]:
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate),
            "input_layernorm": (hidden,)}


def models(shapes: dict, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    fts = [{n: b + 1e-3 * torch.randn(b.shape, generator=g) for n, b in base.items()} for _ in range(k)]
    return base, fts


def ours(method, base, fts, params):
    return {n: fe.merge_tensors([base[n], *[sd[n] for sd in fts]], method, base_index=0, parameters=params)
            for n in base}


def fusion_bench_runners(iterations: int):
    """method → (our parameters, FusionBench function(base, fts) → merged state dict), or {} without it."""
    try:
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
        from fusion_bench.method.magmax.magmax import _magmax_select
        from fusion_bench.method.tall_mask.utils import generate_task_masks
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
        from fusion_bench.method.wudi.wudi import wudi_merging
    except ImportError:
        return {}

    def tvs(base, fts):
        return [{n: sd[n] - base[n] for n in base} for sd in fts]

    def added(base, merged, lam=1.0):
        return {n: base[n] + lam * merged[n].detach() for n in base}

    def consensus(base, fts):
        out = {}
        for n, b in base.items():
            ft = torch.stack([sd[n].reshape(-1) for sd in fts])
            tv = ft - b.reshape(-1)
            masks = generate_task_masks(tv, ft, b.reshape(-1), tv=tv.sum(0), tall_mask_lambda=0.6)
            out[n] = (b.reshape(-1) + tv.sum(0) * (masks.sum(0) >= 2)).reshape(b.shape)
        return out

    return {
        "tsv": ({}, lambda b, f: added(b, compute_and_sum_svd_mem_reduction(tvs(b, f), accelerator="cpu"))),
        "iso_c": ({}, lambda b, f: added(b, iso_c(tvs(b, f), accelerator="cpu"))),
        "iso_cts": ({}, lambda b, f: added(b, iso_cts(tvs(b, f), common_space_fraction=0.8, accelerator="cpu"))),
        "wudi": ({"iterations": iterations}, lambda b, f: added(b, wudi_merging(tvs(b, f), accelerator="cpu",
                                                                                 iter_num=iterations))),
        "magmax": ({}, lambda b, f: added(b, _magmax_select(tvs(b, f)), 0.5)),
        "consensus": ({}, consensus),
    }


def timed(fn):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start


def rel_diff(a: dict, b: dict) -> tuple[float, int]:
    """Largest |a − b| relative to max |b| over the tensors, and how many entries differ by more than
    1e-4 of it (masks flipped by fp32 rounding at a threshold)."""
    worst, count = 0.0, 0
    for n in a:
        err = (a[n].double() - b[n].double()).abs()
        scale = float(b[n].double().abs().max().clamp(min=1e-30))
        worst = max(worst, float(err.max()) / scale)
        count += int((err > 1e-4 * scale).sum())
    return worst, count


def part1(hidden: int, k: int, iterations: int) -> list[str]:
    runners = fusion_bench_runners(iterations)
    if not runners:
        return ["(fusion_bench is not installed: `pip install fusion-bench` for the comparison)"]
    shapes = layer_shapes(hidden, 3 * hidden, max(1, hidden // 8))
    base, fts = models(shapes, k)
    warm_base, warm_fts = models(layer_shapes(16, 48, 2), k, seed=1)
    total = sum(t.numel() for t in base.values())
    lines = [f"| method | ours (s) | FusionBench (s) | speed-up | max rel. diff | entries > 1e-4 (of {total:,}) |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, (params, theirs) in runners.items():
        timed(lambda: (ours(method, warm_base, warm_fts, params), theirs(warm_base, warm_fts)))
        mine, t_ours = timed(lambda: ours(method, base, fts, params))
        ref, t_ref = timed(lambda: theirs(base, fts))
        worst, count = rel_diff(mine, ref)
        lines.append(f"| {method} | {t_ours:.2f} | {t_ref:.2f} | {t_ref / t_ours:.2f}× | {worst:.1e} | {count} |")
    return lines


def part2(scale: int, k: int) -> list[str]:
    c = {key: (v if key == "layers" else max(1, v // scale)) for key, v in TINYLLAMA.items()}
    layer = layer_shapes(c["hidden"], c["intermediate"], c["kv"])
    base, fts = models(layer, k)
    _, t_layer = timed(lambda: ours("tsv", base, fts, {}))
    emb = {"embed_tokens": (c["vocab"], c["hidden"])}
    base, fts = models(emb, k)
    _, t_embed = timed(lambda: ours("tsv", base, fts, {}))
    total = c["layers"] * t_layer + 2 * t_embed  # the embedding and the untied head
    full = total * scale ** 3
    return [f"TinyLlama-1.1B shapes / {scale} (hidden {c['hidden']}, MLP {c['intermediate']}, K/V {c['kv']}, "
            f"vocab {c['vocab']}), K = {k}: one layer {t_layer:.2f} s, embedding {t_embed:.2f} s → "
            f"{total:.1f} s for the scaled model (22 layers + embedding + head); × {scale}³ → "
            f"**≈ {full / 60:.0f} min** expected for the full 1.1B merge on this CPU (an upper estimate)."]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of part 1's layer (default 512)")
    parser.add_argument("--models", type=int, default=3, help="K fine-tuned models (default 3)")
    parser.add_argument("--wudi-iterations", type=int, default=300)
    parser.add_argument("--scale", type=int, default=4, help="part 2's down-scaling of TinyLlama (default 4)")
    parser.add_argument("--part", type=int, choices=(1, 2), help="run only this part")
    args = parser.parse_args(argv)
    hidden, iterations, scale = (64, 20, 16) if args.quick else (args.hidden, args.wudi_iterations, args.scale)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if args.part in (None, 1):
        print(f"\nPart 1: one layer, hidden {hidden}, K = {args.models}, WUDI {iterations} steps\n")
        print("\n".join(part1(hidden, args.models, iterations)))
    if args.part in (None, 2):
        print("\nPart 2: tsv, scaled-down TinyLlama\n")
        print("\n".join(part2(scale, args.models)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
