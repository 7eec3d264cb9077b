"""The program Nsight Compute profiles in benchmarks/gpu_suite.sh: one bf16 ties_merge (density 0.2,
K models of n elements) per usable GPU backend, after a warm-up call that compiles the triton kernels.

    ncu --kernel-name regex:... python -P benchmarks/gpu_profile_target.py --n 67108864 --K 8
"""

from __future__ import annotations

import argparse

import torch

import fusion_engine as fe
from fusion_engine.ops import ties_merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--K", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.n, generator=gen).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(args.n, generator=gen)).to(torch.bfloat16).to(args.device)
          for _ in range(args.K)]
    base = base.to(args.device)
    usable = fe.backends()
    for backend in ("triton", "cuda"):
        if not usable[backend].usable:
            print(f"{backend}: {usable[backend].reason}")
            continue
        for _ in range(2):  # warm-up (compilation), then the profiled call
            ties_merge(base, xs, None, 0.2, backend=backend)
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"{backend}: ties_merge bf16 K={args.K} n={args.n} done")


if __name__ == "__main__":
    main()
