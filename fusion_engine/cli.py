"""The ``fusion-engine`` command.

    fusion-engine demo        merge three small seeded models with every op, on every usable
                              backend, check each against the torch reference, print the times
    fusion-engine backends    which backends can run here, and why not

Exit codes: 0 ok, 2 bad arguments, 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import __version__, backends, ops
from .errors import FusionEngineError


def _demo_models(K: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A seeded pre-trained MLP state dict and K fine-tuned variants (small random task vectors)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (256, 64), "0.bias": (256,), "2.weight": (256, 256), "2.bias": (256,),
              "4.weight": (10, 256), "4.bias": (10,)}
    base = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    finetuned = [{name: (w + torch.randn(w.shape, generator=g) * 0.01).to(torch.bfloat16) for name, w in base.items()}
                 for _ in range(K)]
    return {name: w.to(torch.bfloat16) for name, w in base.items()}, finetuned


def _methods(base, finetuned, name):
    xs = [m[name] for m in finetuned]
    b = base[name]
    weights = [1.0 / len(xs)] * len(xs)
    return {
        "linear_merge": lambda backend: ops.linear_merge(xs, weights, backend=backend),
        "task_arithmetic": lambda backend: ops.task_arithmetic(b, xs, weights, lam=1.0, backend=backend),
        "ties_merge": lambda backend: ops.ties_merge(b, xs, weights, 0.2, backend=backend),
        "dare_merge": lambda backend: ops.dare_merge(b, xs, weights, 0.5, seed=0, stream=ops.stream_id(name),
                                                     consensus="sum", backend=backend),
        "fisher_merge": lambda backend: ops.fisher_merge(xs, [x.abs() for x in xs], weights, backend=backend),
    }


def demo(K: int = 3) -> int:
    usable = [name for name, status in backends().items() if status.usable and name != "cuda"]
    usable = [name for name in usable if name != "triton" or torch.cuda.is_available()]
    print(f"fusion_engine {__version__}: merging {K} fine-tuned bf16 MLPs into their base; backends: {', '.join(usable)}")
    base, finetuned = _demo_models(K)
    worst = 0.0
    for method in _methods(base, finetuned, "0.weight"):
        line = [f"  {method:16s}"]
        for backend in usable:
            _methods(base, finetuned, "0.weight")[method](backend)  # warm-up: thread pool, page faults
            start = time.perf_counter()
            merged = {name: _methods(base, finetuned, name)[method](backend) for name in base}
            elapsed = time.perf_counter() - start
            reference = {name: _methods(base, finetuned, name)[method]("torch") for name in base}
            diff = max(float((merged[n].float() - reference[n].float()).abs().max()) for n in base)
            worst = max(worst, diff)
            line.append(f"{backend}: {elapsed * 1e3:6.2f} ms (max |Δ| vs torch {diff:.1e})")
        print("  ".join(line))
    n_params = sum(w.numel() for w in base.values())
    print(f"merged {len(base)} tensors, {n_params:,} parameters per model; all backends agree with the reference "
          f"to {worst:.1e}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusion-engine", description="Fast, exact model merging.")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="merge small seeded models with every op and backend")
    p_demo.add_argument("--models", type=int, default=3, help="number of fine-tuned models (default 3)")
    sub.add_parser("backends", help="show which backends can run here")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            if args.models < 1:
                parser.error("--models must be >= 1")
            return demo(args.models)
        for name, status in backends().items():
            print(f"{name:8s} {status!r}")
        return 0
    except FusionEngineError as exc:
        print(f"fusion-engine: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI reports, it does not trace back
        print(f"fusion-engine: failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
