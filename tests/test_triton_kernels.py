"""Every @triton.jit function of triton_kernels/ against the Triton releases torch pulls in (3.6 and
newer): no parameter named like a launch option, and every specialisation the ops launch compiles
ahead of time for sm_90 (Hopper) through the whole pipeline, ptxas included, with no GPU here."""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusion_engine.triton_kernels as kernels_pkg
from fusion_engine._dispatch import backends, triton_interpret

pytestmark = pytest.mark.skipif(not backends()["triton"].usable, reason="triton backend unusable here")

ROOT = Path(__file__).resolve().parents[1]

# Keyword names a Triton launch ``kernel[grid](*args, **kwargs)`` takes for itself, read from
# triton/runtime/jit.py of 3.6.0 and 3.9.0: ``JITFunction.run(*args, grid, warmup, **kwargs)``,
# ``_pack_args`` asserting on ``stream``/``device``/``device_type``, and the backend's options
# (``parse_options`` takes every keyword named like a field of CUDAOptions). A kernel parameter of
# one of these names is read as the option (3.6 raised "stream option is deprecated" for DARE).
LAUNCH_KEYWORDS = frozenset({
    "grid", "warmup", "stream", "device", "device_type",
    # CUDAOptions fields, 3.6.0 and 3.9.0
    "num_warps", "num_ctas", "num_stages", "warp_size", "maxnreg", "ptx_version", "ptx_options",
    "ir_override", "enable_fp_fusion", "enable_reflect_ftz", "launch_cooperative_grid", "launch_pdl",
    "supported_fp8_dtypes", "deprecated_fp8_dot_operand_dtypes", "default_dot_input_precision",
    "allowed_dot_input_precisions", "max_num_imprecise_acc_default", "extern_libs", "debug",
    "backend_name", "sanitize_overflow", "arch", "instrumentation_mode", "sched4reg", "clc",
    "fpsan_homomorphic_casts", "min_shared_mem",
})


def _installed_option_names() -> set[str]:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return set()
    return set(CUDAOptions.__dataclass_fields__)


def jit_functions():
    """(module name, name, python function) of every @triton.jit function in triton_kernels/."""
    found = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and "triton" in type(obj).__module__:
                found.append((module.__name__, name, fn))
    return found


def test_jit_functions_found():
    names = {name for _, name, _ in jit_functions()}
    assert {"_dare_merge_kernel", "_cost_matrix_kernel", "_level_kernel", "_ties_merge_kernel"} <= names


def test_no_parameter_is_a_launch_option():
    reserved = LAUNCH_KEYWORDS | _installed_option_names()
    clashes = [f"{module}.{name}({param})" for module, name, fn in jit_functions()
               for param in inspect.signature(fn).parameters if param in reserved]
    assert not clashes, f"kernel parameters named like Triton launch options (rename them): {clashes}"


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# FUSION_ENGINE_AOT_ALL=1: the full product of every op's options, each recorded specialisation
# compiled (~200, ~10 minutes on 2 cores); by default each option value once per dtype, the others
# at a default, and of those launches a covering subset (every flag value and type once per kernel)
ALL = os.environ.get("FUSION_ENGINE_AOT_ALL", "0") not in ("", "0")


def option_sets(**choices) -> list[dict]:
    """The product of the choices (ALL), or the first choice of each with one option varied at a time."""
    names = list(choices)
    if ALL:
        return [dict(zip(names, values)) for values in itertools.product(*choices.values())]
    default = {name: values[0] for name, values in choices.items()}
    sets = [default]
    for name, values in choices.items():
        sets += [{**default, name: value} for value in values[1:]]
    return sets


def _launch_every_specialisation() -> None:
    """Call every triton op with tiny inputs over its dtypes and kernel-selecting options."""
    from fusion_engine.ops import (cost_matrix, dare_merge, fisher_merge, linear_merge, magnitude_mask, sinkhorn,
                                   task_arithmetic, ties_merge)
    from fusion_engine.ops.cost_matrix import METRICS

    gen = torch.Generator().manual_seed(0)
    n, K = 96, 2
    kw = dict(backend="triton")
    for dtype in DTYPES:
        base = torch.randn(n, generator=gen).to(dtype)
        xs = [torch.randn(n, generator=gen).to(dtype) for _ in range(K)]
        fishers = [torch.rand(n, generator=gen).to(dtype) for _ in range(K)]
        for out in (None, torch.float32):
            linear_merge(xs, [0.3, 0.7], out_dtype=out, **kw)
            task_arithmetic(base, xs, [0.3, 0.7], out_dtype=out, **kw)
            fisher_merge(xs, fishers, out_dtype=out, **kw)
        fisher_merge(xs, [f.float() for f in fishers], **kw)
        for tie in ("index", "threshold"):
            magnitude_mask(xs[0], 0.3, tie=tie, **kw)
        for options in option_sets(rescale=(None, "l1"), tie=("index", "threshold"), sign=("sum", "count"),
                                   sign_on=("weighted", "unweighted"), divisor=("weights", "count"),
                                   normalize=(True, False)):
            ties_merge(base, xs, [0.4, 0.6], 0.5, **options, **kw)
        for options in option_sets(rescale=("density", None, "l1"), consensus=(None, "sum", "count"),
                                   sign_on=("weighted", "unweighted"), divisor=("weights", "count"),
                                   normalize=(False, True)):
            dare_merge(base, xs, [0.4, 0.6], 0.5, seed=3, stream=1, **options, **kw)
        x = torch.randn(2, 5, 7, generator=gen).to(dtype)
        y = torch.randn(2, 6, 7, generator=gen).to(dtype)
        for metric in METRICS:
            cost_matrix(x, y, metric=metric, **kw)
    cost = torch.rand(2, 5, 6, generator=gen)
    sinkhorn(cost, reg=0.5, max_iter=20, **kw)
    sinkhorn(cost, reg=0.5, max_iter=20, eps_scaling=0.5, **kw)


def _compile(specs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    """Compile recorded specialisations in a process without the interpreter; the Python (and so the
    Triton) that compiles is ``FUSION_ENGINE_AOT_PYTHON`` if set (e.g. a venv with triton==3.6.0)."""
    python = os.environ.get("FUSION_ENGINE_AOT_PYTHON") or sys.executable
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the package as this process sees it
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([python, str(ROOT / "tests" / "triton_aot.py"), str(path), "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=1500, cwd=tmp_path)


# specialisations are recorded from interpreted launches; natively, every launch compiles anyway
needs_interpreter = pytest.mark.skipif(not triton_interpret(), reason="records launches under TRITON_INTERPRET=1")


@needs_interpreter
def test_correlation_cost_matrix_compiles_for_sm90(tmp_path):
    """The specialisation that failed on Triton 3.6 (an OptimizeThreadLocality assertion)."""
    from fusion_engine.ops import cost_matrix

    from triton_aot import record_specialisations

    x = torch.randn(1, 4, 3)
    with record_specialisations() as specs:
        cost_matrix(x, x, metric="correlation", backend="triton")
    assert [s["constexprs"]["METRIC"] for s in specs] == [4]
    result = _compile(specs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@needs_interpreter
def test_every_specialisation_compiles_for_sm90(tmp_path):
    from triton_aot import covering, record_specialisations

    with record_specialisations() as specs:
        _launch_every_specialisation()
    kernels = {s["kernel"] for s in specs}
    expected = {name for _, name, fn in jit_functions() if name.startswith("_") and name.endswith("_kernel")}
    assert kernels == expected, f"kernels never launched by the call matrix: {expected - kernels}"
    result = _compile(specs if ALL else covering(specs), tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
