"""Time linear_assignment and cost_matrix side by side with scipy / torch.cdist and print markdown tables.

    python benchmarks/alignment_ops_report.py [--device cuda] [--quick] [--ops linear_assignment,cost_matrix]
                                              [--out FILE]

linear_assignment: a batch of 8 cost matrices per case (see bench_linear_assignment.py), end to end
from the torch tensor; the speed-up is scipy's time ÷ ours, and the total cost of both is checked
equal. cost_matrix: per metric, GFLOP/s (2·B·n·m·d), GB/s of the minimum bytes, the ratio to the bare
GEMM of the same shape (``× GEMM``: the compute floor) and to the copy-bandwidth floor.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cost_matrix as CM  # noqa: E402
import bench_linear_assignment as LA  # noqa: E402
from _cases import copy_bandwidth, timed  # noqa: E402
from report import cpu_name  # noqa: E402


def best_time(fn, repeats: int, device: str = "cpu") -> float:
    timed(fn, device)  # warm-up
    return min(timed(fn, device) for _ in range(repeats))


def assignment_section(sizes, kinds) -> list[str]:
    lines = [
        f"### linear_assignment: batch of {LA.BATCH}, {torch.get_num_threads()} threads",
        "",
        "| case | n | provider | time (ms) | per problem (ms) | speed-up vs scipy | same assignment |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    from scipy.optimize import linear_sum_assignment

    for n in sizes:
        for kind in kinds:
            case = LA.make_case(kind, n)
            times = {name: best_time(fn, 3 if name == "fusion_engine-cpp" else 1)
                     for name, fn in case.providers.items()}
            rows, cols = LA.linear_assignment(case.cost)
            differ = [b for b in range(case.batch)
                      if cols[b].tolist() != linear_sum_assignment(case.cost[b].double().numpy())[1].tolist()]
            same = "yes" if not differ else f"NO (problems {differ})"
            for name, t in times.items():
                speedup = f"{times['scipy'] / t:.2f}×" if "scipy" in times else ""
                lines.append(f"| {kind} | {n} | {name} | {t * 1e3:.1f} | {t * 1e3 / case.batch:.1f} | {speedup} | "
                             f"{same if name == 'fusion_engine-cpp' else ''} |")
            print("\n".join(lines[-len(times):]), file=sys.stderr, flush=True)
            del case
    return lines


def cost_matrix_section(device: str, shape, bandwidth: float) -> list[str]:
    b, n, m, d = shape
    lines = [
        f"### cost_matrix: B={b}, n={n}, m={m}, d={d} on {device}",
        "",
        "| metric | dtype | provider | time (ms) | GFLOP/s | GB/s | × GEMM | × bandwidth floor |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for dtype in CM.DTYPES[device]:
        for metric in CM.METRICS:
            case = CM.make_case(metric, dtype, device, shape)
            times = {name: best_time(fn, 5, device) for name, fn in case.providers.items()}
            gemm = times["torch.mm"]
            floor = case.floor_bytes / bandwidth
            for name, t in times.items():
                lines.append(f"| {metric} | {str(dtype).replace('torch.', '')} | {name} | {t * 1e3:.2f} | "
                             f"{case.flops / t / 1e9:.0f} | {case.floor_bytes / t / 1e9:.1f} | {t / gemm:.2f} | "
                             f"{t / floor:.1f} |")
            print("\n".join(lines[-len(times):]), file=sys.stderr, flush=True)
            del case
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="linear_assignment,cost_matrix")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="n=1024 only, smaller cost matrices")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    args = parser.parse_args()
    ops = args.ops.split(",")

    bandwidth = copy_bandwidth(device=args.device)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    lines = [
        "## Alignment ops",
        "",
        f"Command: `python benchmarks/alignment_ops_report.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine}, torch {torch.__version__}  ",
        f"Date: {datetime.date.today().isoformat()}; copy bandwidth in this run: {bandwidth / 1e9:.1f} GB/s",
        "",
    ]
    if "linear_assignment" in ops:
        sizes = (1024,) if args.quick else LA.SIZES
        lines += assignment_section(sizes, LA.KINDS) + [""]
    if "cost_matrix" in ops:
        shape = CM.SHAPE[args.device]
        if args.quick:
            shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3] // 2)
        lines += cost_matrix_section(args.device, shape, bandwidth) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
