"""Run every benchmark case side by side in one process and write a results table.

    python benchmarks/report.py [--ops ties_merge,dare_merge] [--quick] [--device cuda] [--n N] [--ks 3,8]
                                [--dtypes bfloat16,float32]

For each case: the best of several runs per provider (one run for the slow references), the
achieved GB/s counting the op's minimum bytes, the ratio to the bandwidth floor (minimum bytes ÷
the copy bandwidth measured at the start of this run), and the speed-up of fusion_engine over
each reference.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cases import DTYPES, KS, N, OPS, copy_bandwidth, make_case, timed  # noqa: E402

import fusion_engine as fe  # noqa: E402

SLOW = ("mergekit", "peft", "torch-reference")


def best_time(fn, repeats: int, device: str) -> float:
    timed(fn, device)  # warm-up (compilation, thread pool, first-touch pages)
    return min(timed(fn, device) for _ in range(repeats))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


MARKER = "<!-- sections below: written by the other benchmark scripts, kept by report.py -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--quick", action="store_true", help="K=3 only, one run of each slow reference")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--n", type=int, default=N, help="elements per tensor")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="numbers of models, e.g. 3,8")
    parser.add_argument("--dtypes", default=",".join(str(d).replace("torch.", "") for d in DTYPES),
                        help="torch dtype names, e.g. bfloat16,float32")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    args = parser.parse_args()
    ks = tuple(int(k) for k in args.ks.split(","))
    dtypes = tuple(getattr(torch, name) for name in args.dtypes.split(","))
    ours = "fusion_engine-cpp" if args.device == "cpu" else "fusion_engine-triton"

    bandwidth = copy_bandwidth(device=args.device)
    rows = []
    for op in args.ops.split(","):
        for dtype in dtypes:
            for K in ((1,) if op == "magnitude_mask" else (ks[:1] if args.quick else ks)):
                case = make_case(op, dtype, K, n=args.n, device=args.device)
                floor = case.floor_bytes / bandwidth
                times = {}
                for provider, fn in case.providers.items():
                    if provider == "torch-reference" and K not in (1, ks[0]):
                        continue  # the eager oracle is slow; timed at the first K only
                    times[provider] = best_time(fn, 1 if provider in SLOW else 5, args.device)
                    print(f"{op:16s} {str(dtype):15s} K={K} {provider:20s} {times[provider] * 1e3:10.2f} ms",
                          flush=True)
                rows.append((case, floor, times))
                del case
                write_table(args, rows, bandwidth, ours)  # after every case: a run cut short keeps its rows


def write_table(args, rows, bandwidth: float, ours: str) -> None:
    """The results table so far, as the head of ``args.out`` (the sections below MARKER kept)."""
    simd = fe._C.simd_level() if fe.backends()["cpp"].usable else "n/a"
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, cpp SIMD clone `{simd}`")
    lines = [
        "# Benchmark results",
        "",
        f"Command: `python benchmarks/report.py {' '.join(sys.argv[1:])}` "
        f"(pytest-benchmark suites: `pytest benchmarks/`)",
        f"Machine: {machine}, torch {torch.__version__}",
        f"Date: {datetime.date.today().isoformat()}",
        f"Tensors: {args.n:,} elements each, density {0.2} where it applies. "
        f"Copy bandwidth measured in this run: **{bandwidth / 1e9:.1f} GB/s** (read + write of 256 MiB).",
        "",
        "Floor = minimum bytes (each input read once per pass the algorithm needs, output written once) ÷ copy "
        "bandwidth. GB/s counts those minimum bytes. `× floor` = time ÷ floor. `speed-up` = reference time ÷ "
        f"{ours} time.",
        "",
        f"| op | dtype | K | floor | provider | time (ms) | GB/s | × floor | speed-up of {ours.split('-')[1]} |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for case, floor, times in rows:
        mine = times.get(ours)
        for provider, t in times.items():
            speedup = f"{t / mine:.1f}×" if mine and provider != ours else ""
            lines.append(
                f"| {case.op} | {str(case.dtype).replace('torch.', '')} | {case.K} | "
                f"{case.floor_passes}, {floor * 1e3:.3g} ms | {provider} | {t * 1e3:.3g} | "
                f"{case.floor_bytes / t / 1e9:.1f} | {t / floor:.2f} | {speedup} |"
            )
    # the merge-op table is the head of RESULTS.md; the sections below the marker come from the other
    # report scripts (alignment, sinkhorn, checkpoints, ...) and are kept as they are
    tail = MARKER + "\n"
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = f.read()
        if MARKER in old:
            tail = old[old.index(MARKER):]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n\n" + tail)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
