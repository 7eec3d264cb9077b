"""Ahead-of-time compilation of the triton kernels for a GPU that is not here.

Two halves, because the interpreter and the compiler cannot share a process (``TRITON_INTERPRET``
is read when ``@triton.jit`` runs):

* :func:`record_specialisations` runs op calls under ``TRITON_INTERPRET=1`` and records, for every
  kernel launch, the specialisation the native launcher would compile: argument types and
  divisibility attributes from Triton's own ``native_specialize_impl`` (so ``1`` becomes a
  constexpr and 16-divisible ints and pointers get ``tt.divisibility`` as on a GPU), the
  constexpr values and the launch options (num_warps, num_stages, enable_fp_fusion);
* ``python tests/triton_aot.py SPECS.json [--arch 90]`` (without ``TRITON_INTERPRET``) compiles each
  recorded specialisation with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
  through the whole pipeline: TTIR, TTGIR, LLVM IR, PTX and ptxas to a cubin. It prints one line per
  specialisation and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


DTYPE_TAG = "tl.dtype:"


def _encode(value):
    """A constexpr value as JSON: Triton dtypes (ELT=tl.bfloat16, ...) as a tagged name."""
    import triton.language as tl

    return f"{DTYPE_TAG}{value.name}" if isinstance(value, tl.dtype) else value


def _decode(value):
    import triton.language as tl

    if isinstance(value, str) and value.startswith(DTYPE_TAG):
        return tl.dtype(value[len(DTYPE_TAG):])
    return value


def _spec_of_launch(fn, args: tuple, kwargs: dict) -> dict:
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip((p.name for p in params), args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for p in params:
        value = bound[p.name] if p.name in bound else p.default
        if _is_constexpr(p):
            signature[p.name] = "constexpr"
            constexprs[p.name] = _encode(getattr(value, "value", value))
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = value
        elif attr:
            attrs[p.name] = attr
        if isinstance(value, torch.Tensor) and not kind.startswith("*"):
            raise TypeError(f"{fn.__name__}: tensor argument {p.name} specialised as {kind}")
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature, constexprs=constexprs,
                attrs=attrs, options=options)


@contextlib.contextmanager
def record_specialisations() -> Iterator[list[dict]]:
    """Within the block, every interpreted kernel launch appends its specialisation (deduplicated)
    to the yielded list; the launches still run."""
    from triton.runtime.interpreter import InterpretedFunction

    recorded: list[dict] = []
    seen: set[str] = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        spec = _spec_of_launch(self.fn, args, kwargs)
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            recorded.append(spec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield recorded
    finally:
        InterpretedFunction.run = original


def covering(specs: list[dict]) -> list[dict]:
    """A subset of ``specs`` in which every (kernel, parameter, type or constexpr value) and every
    kernel's launch options still occur: each flag's compiled branch is built at least once."""
    seen: set[tuple] = set()
    kept = []
    for spec in specs:
        facts = {(spec["kernel"], "options", json.dumps(spec["options"], sort_keys=True))}
        facts |= {(spec["kernel"], k, json.dumps(v)) for k, v in spec["constexprs"].items()}
        facts |= {(spec["kernel"], k, v) for k, v in spec["signature"].items() if v != "constexpr"}
        if facts - seen:
            kept.append(spec)
            seen |= facts
    return kept


def compile_spec(spec: dict, arch: int) -> tuple[str, str | None]:
    """Compile one recorded specialisation for ``sm_<arch>``; returns (name, error or None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    names = fn.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in spec["attrs"].items() if "D" in v}
    constexprs = {(names.index(k),): _decode(v) for k, v in spec["constexprs"].items()}
    source = ASTSource(fn, spec["signature"], constexprs=constexprs, attrs=attrs)
    label = f"{spec['kernel']}[{', '.join(f'{k}={v}' for k, v in spec['constexprs'].items())}]"
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))
        if not compiled.asm.get("cubin"):
            return label, "no cubin produced"
    except Exception as exc:  # noqa: BLE001 - report every failure, keep compiling the others
        lines = [line for line in str(exc).splitlines() if line.strip() and line.strip() != "^"]
        return label, f"{type(exc).__name__}: {' | '.join(lines[-3:])}"
    return label, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", help="JSON list written from record_specialisations()")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    with open(args.specs) as fh:
        specs = json.load(fh)
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for label, error in pool.map(compile_spec, specs, [args.arch] * len(specs)):
            print(f"{'FAIL' if error else 'ok  '} sm_{args.arch} {label}" + (f": {error}" if error else ""), flush=True)
            failed += error is not None
    import triton

    compiled = len(specs) - failed
    print(f"triton {triton.__version__}: {compiled}/{len(specs)} specialisations compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
