"""weight_matching on a ResNet-20 at 4× width: fusion_engine vs a straightforward torch + scipy implementation.

The reference below is what the Git Re-Basin code does, written with torch and scipy: for each
permutation (same seeded order), for each (weight, axis) it acts on, apply every other permutation
to B's weight, flatten, ``A += W_a W_bᵀ``; solve with ``scipy.optimize.linear_sum_assignment``;
stop after a sweep without improvement. Both must return the same permutations.

Run:  pytest benchmarks/bench_weight_matching.py                        (pytest-benchmark, side by side)
      python benchmarks/bench_weight_matching.py --width 1,4,8 --repeats 5  (markdown table)
      python benchmarks/bench_weight_matching.py --device cuda             (weights on the GPU: the products
          there, each LAP on the host; the reference copies each similarity matrix to the host for scipy)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment

from fusion_engine.alignment import resnet_permutation_spec, weight_matching
from fusion_engine.alignment.models import resnet20
from fusion_engine.alignment.weight_matching import matched_params

try:
    import pytest
except ImportError:  # the script mode needs no pytest
    pytest = None


def reference_weight_matching(spec, params_a, params_b, *, max_iter=100, seed=0):
    """Git Re-Basin's loop in torch + scipy (specs whose permutations act on whole axes, one copy)."""
    used = matched_params(spec)
    names = list(spec.perm_sizes)
    device = next(iter(params_a.values())).device
    perms = {p: torch.arange(n, device=device) for p, n in spec.perm_sizes.items()}
    axes_to_perm = spec.axes_to_perm

    def permuted_b(name, except_axis):
        w = params_b[name]
        for axis, p in enumerate(axes_to_perm[name]):
            if axis != except_axis and p is not None:
                w = w.index_select(axis, perms[p])
        return w

    g = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for j in torch.randperm(len(names), generator=g).tolist():
            p = names[j]
            n = spec.perm_sizes[p]
            sim = None
            for name, axis in spec.perm_to_axes[p]:
                if name not in used:
                    continue
                w_a = params_a[name].movedim(axis, 0).reshape(n, -1)
                w_b = permuted_b(name, axis).movedim(axis, 0).reshape(n, -1)
                sim = w_a @ w_b.T if sim is None else sim + w_a @ w_b.T
            sim = sim.cpu()
            _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
            cols = torch.from_numpy(cols).long()
            old = sim.double()[torch.arange(n), perms[p].cpu()].sum()
            new = sim.double()[torch.arange(n), cols].sum()
            progress = progress or bool(new > old + 1e-12)
            perms[p] = cols.to(device)
        if not progress:
            break
    return {p: t.cpu() for p, t in perms.items()}


def make_case(width: int = 4, device: str = "cpu"):
    a, b = resnet20(width, seed=0), resnet20(width, seed=1)
    spec = resnet_permutation_spec(a)
    return spec, {k: v.to(device) for k, v in a.state_dict().items()}, {k: v.to(device) for k, v in b.state_dict().items()}


def _synchronized(fn, device: str):
    """fn, followed by a device synchronisation (both providers return host tensors already)."""
    def run(*args):
        out = fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run


PROVIDERS = {
    "fusion_engine": lambda spec, sa, sb: weight_matching(spec, sa, sb, seed=0),
    "torch+scipy reference": lambda spec, sa, sb: reference_weight_matching(spec, sa, sb, seed=0),
}


def time_providers(width: int = 4, repeats: int = 5, device: str = "cpu") -> dict[str, tuple[float, float]]:
    """(median, min) seconds per provider over ``repeats`` rounds; the providers alternate within a
    round, so a busy spell of a shared machine hits both. Asserts both find the same permutations."""
    spec, sa, sb = make_case(width, device)
    providers = {name: _synchronized(fn, device) for name, fn in PROVIDERS.items()}
    results = {name: fn(spec, sa, sb) for name, fn in providers.items()}  # warm-up, and the check
    ours, ref = results["fusion_engine"], results["torch+scipy reference"]
    if not all(torch.equal(ours[p], ref[p]) for p in spec.perm_sizes):
        raise AssertionError(f"width {width}: fusion_engine and the reference found different permutations")
    samples: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn(spec, sa, sb)
            samples[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


if pytest is not None:
    @pytest.mark.parametrize("provider", list(PROVIDERS))
    def test_weight_matching_resnet20x4(benchmark, provider):
        spec, sa, sb = make_case(4)
        perms = benchmark.pedantic(PROVIDERS[provider], args=(spec, sa, sb), rounds=3, iterations=1)
        ref = reference_weight_matching(spec, sa, sb, seed=0) if provider == "fusion_engine" else perms
        assert all(torch.equal(perms[p], ref[p]) for p in spec.perm_sizes)
        benchmark.extra_info.update(model="resnet20x4", n_perms=len(spec.perm_sizes))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=str, default="4", help="width multiplier(s), comma-separated, e.g. 1,4,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the weights live")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.width.split(",")]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"weight_matching, ResNet-20, {args.repeats} alternating rounds, {where} "
          f"(same permutations from both, checked)\n")
    print("| width | params | provider | median (ms) | min (ms) | speed-up (median) | speed-up (min) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for width in widths:
        times = time_providers(width, args.repeats, args.device)
        ref_med, ref_min = times["torch+scipy reference"]
        n_params = sum(p.numel() for p in resnet20(width).parameters())
        for name, (med, low) in times.items():
            print(f"| ×{width} | {n_params / 1e6:.2f} M | {name} | {med * 1e3:.1f} | {low * 1e3:.1f} | "
                  f"{ref_med / med:.2f}× | {ref_min / low:.2f}× |")


if __name__ == "__main__":
    main()
