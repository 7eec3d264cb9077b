"""Shared test helpers: tolerances, verbose comparisons, input builders, hypothesis strategies.

The torch reference of each op (``fusion_engine/ops/<op>.py``) is the oracle; nothing here
re-implements an op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from hypothesis import strategies as st

from fusion_engine._dispatch import _REGISTRY, BACKEND_DTYPES

# ----------------------------------------------------------------------------------------------
# tolerances

# (atol, rtol) per output dtype. fp16 / bf16 compare two computations rounded to that dtype:
# one ulp of the output dtype (rtol 2^-10 / 2^-7) plus a small atol for values near zero.
TOLERANCES = {
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-12, 1e-10),
    torch.float16: (1e-5, 2.0**-10),
    torch.bfloat16: (1e-5, 2.0**-7),
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype``. ``scale`` is the magnitude of the largest summand of
    the computation (rounding errors of cancelling sums are relative to it, not to the result);
    it widens atol only."""
    atol, rtol = TOLERANCES[dtype]
    return atol * max(1.0, float(scale)), rtol


def max_abs(tensors: Sequence[torch.Tensor]) -> float:
    """Largest finite |value| over some tensors (0 for empty ones)."""
    best = 0.0
    for t in tensors:
        if t.numel():
            v = t.detach().double().abs()
            v = v[torch.isfinite(v)]
            if v.numel():
                best = max(best, float(v.max()))
    return best


# ----------------------------------------------------------------------------------------------
# comparisons


def _index(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(out))


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                            max_print: int = 8, what: str = "") -> None:
    """Assert |actual − expected| ≤ atol + rtol·|expected| elementwise (NaN matches NaN, ±Inf must
    match exactly). On failure report how many elements differ, the worst ones and their indices."""
    prefix = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    finite = ~(a_nan | e_nan | a_inf | e_inf)
    bad = (finite & (diff > tol)) | (a_nan != e_nan) | ((a_inf | e_inf) & ~(a_nan | e_nan) & (a != e))
    count = int(bad.sum())
    if count == 0:
        return
    excess = torch.where(finite, diff - tol, torch.full_like(diff, math.inf))
    excess = torch.where(bad, excess, torch.full_like(diff, -math.inf))
    worst = torch.argsort(excess, descending=True, stable=True)[: min(max_print, count)]
    lines = [
        f"{prefix}{count} of {a.numel()} elements differ ({100.0 * count / a.numel():.3g}%) "
        f"with atol={atol:.3g}, rtol={rtol:.3g}; "
        f"max |diff| of those = {float(diff[bad].max()):.6g} "
        f"(dtype {actual.dtype} vs {expected.dtype}, shape {tuple(actual.shape)})",
        "worst mismatches (index: actual vs expected, |diff|, allowed):",
    ]
    for i in worst.tolist():
        lines.append(f"  {_index(i, actual.shape)}: {a[i].item()!r} vs {e[i].item()!r}, "
                     f"{diff[i].item():.6g}, {tol[i].item():.6g}")
    raise AssertionError("\n".join(lines))


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "", max_print: int = 8) -> None:
    """Assert same shape, dtype and bits (NaN payloads included); report the differing indices."""
    prefix = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{prefix}dtype {actual.dtype} != {expected.dtype}"
    a, e = _bits(actual), _bits(expected)
    bad = (a != e).nonzero().reshape(-1)
    if bad.numel() == 0:
        return
    av, ev = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    lines = [f"{prefix}{bad.numel()} of {a.numel()} elements are not bit-identical "
             f"(dtype {actual.dtype}, shape {tuple(actual.shape)}); first ones (index: actual vs expected):"]
    for i in bad[:max_print].tolist():
        lines.append(f"  {_index(i, actual.shape)}: {av[i].item()!r} vs {ev[i].item()!r}")
    raise AssertionError("\n".join(lines))


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A copy of every byte of ``t``'s storage (the gaps of a strided view included)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).clone()


class InputGuard:
    """Snapshot inputs (whole storage, shape, strides) and check later that nothing was written."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]):
        self.items = [(name, t, storage_bytes(t), t.shape, t.stride(), t.storage_offset()) for name, t in named]

    def check(self) -> None:
        for name, t, before, shape, stride, offset in self.items:
            assert (t.shape, t.stride(), t.storage_offset()) == (shape, stride, offset), f"{name}'s view changed"
            after = storage_bytes(t)
            changed = int((after != before).sum())
            assert changed == 0, f"input {name} was modified: {changed} bytes of its storage changed"


# ----------------------------------------------------------------------------------------------
# backends


def kernel_missing_reason(op: str, backend: str) -> str | None:
    """Why ``op`` has no ``backend`` kernel to test yet (none registered, or its module is not
    written), else None. Only absence skips: a kernel module that exists but fails to import is
    left to fail in the tests."""
    kernels = _REGISTRY.get(op)
    if kernels is None or not kernels.has(backend):
        return f"{op} registers no {backend} kernel"
    if backend == "torch":
        return None
    try:
        kernels.loaders[backend]()
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(("fusion_engine.triton_kernels", "fusion_engine.launchers")):
            return f"{op}: the {backend} kernel is not written yet ({exc.name} does not exist)"
        return None
    except AttributeError as exc:
        return f"{op}: the {backend} kernel is not written yet ({exc})"
    except Exception:  # noqa: BLE001 - a broken kernel module must fail loudly in the tests, not skip
        return None
    return None


def skip_unless_kernel(op: str, backend: str) -> None:
    reason = kernel_missing_reason(op, backend)
    if reason:
        pytest.skip(reason)


def dtypes_for(backend: str) -> tuple[torch.dtype, ...]:
    return tuple(d for d in FLOAT_DTYPES if d in BACKEND_DTYPES[backend])


def skip_unless_dtype(backend: str, dtype: torch.dtype) -> None:
    if dtype not in BACKEND_DTYPES[backend]:
        pytest.skip(f"backend {backend} has no {DTYPE_IDS[dtype]} kernels")


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# sizes: the triton interpreter is slow, so it gets at most a few thousand elements; cpp (and a GPU)
# also get sizes that cross OpenMP thread chunks
SMALL_SHAPES = [
    (0,), (1,), (2,), (3,), (7,), (31,), (64,), (127,), (129,), (1023,), (1025,), (4099,),
    (0, 3), (3, 0), (1, 1), (2, 3), (5, 123), (3, 7, 11), (33, 65), (2, 3, 4, 5), (17, 64),
]
LARGE_SHAPES = [(100_003,), (317, 331), (3, 33_335)]


def skip_large(backend: str, shape) -> None:
    """Large sizes run where they cross thread chunks (cpp) or on a GPU; torch alone gains nothing from
    them (it is its own oracle, and runs on large inputs as the oracle of the others)."""
    if tuple(shape) in LARGE_SHAPES:
        if backend == "torch":
            pytest.skip("torch is the oracle: large sizes run as the reference of the other backends")
        if backend == "triton" and device_for(backend).type == "cpu":
            pytest.skip("too large for the triton interpreter")


def shapes_for(backend: str) -> list[tuple[int, ...]]:
    return SMALL_SHAPES + (LARGE_SHAPES if backend in ("cpp", "cuda") or device_for(backend).type == "cuda" else [])




# ----------------------------------------------------------------------------------------------
# inputs

LAYOUTS = ("contiguous", "transposed", "strided", "offset", "broadcast")
KINDS = ("normal", "int", "zero_delta", "sparse", "wide")


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``values`` (contiguous) stored with the given layout. The unused storage of
    strided and offset layouts is filled with NaN, so a kernel that reads outside the view sees it."""
    shape = values.shape
    if values.numel() == 0 or layout == "contiguous":
        return values.clone()
    if layout == "transposed" and values.dim() >= 2 and shape[-1] > 1 and shape[-2] > 1:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "broadcast" and values.dim() >= 2 and shape[0] > 1:
        row = values[:1].clone()  # every row equals the first: a stride-0 expanded view
        return row.expand(shape)
    if layout == "offset":
        buf = torch.full((values.numel() + 1,), math.nan, dtype=values.dtype, device=values.device)
        buf[1:] = values.reshape(-1)
        return buf[1:].view(shape)
    # "strided" (and the fallback of the others): every second element of a wider buffer
    buf = torch.full((*shape[:-1], 2 * shape[-1]), math.nan, dtype=values.dtype, device=values.device)
    buf[..., ::2] = values
    return buf[..., ::2]


def random_values(gen: torch.Generator, shape, kind: str) -> torch.Tensor:
    """fp64 values of one kind: normal, int (many equal magnitudes and zeros), sparse, wide."""
    if kind == "int":
        return torch.randint(-3, 4, shape, generator=gen).double()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "sparse":
        x = x * (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3)
    elif kind == "wide":
        x = x * torch.pow(10.0, torch.rand(shape, generator=gen, dtype=torch.float64) * 5 - 3)
    return x


@dataclass
class MergeInputs:
    base: torch.Tensor
    tensors: list[torch.Tensor]
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str
    layouts: list[str] = field(default_factory=list)

    @property
    def named(self) -> list[tuple[str, torch.Tensor]]:
        return [("base", self.base)] + [(f"tensors[{i}]", t) for i, t in enumerate(self.tensors)]

    def scale(self) -> float:
        """Largest |value| of the inputs (task vectors are at most twice that)."""
        return max_abs([self.base, *self.tensors])

    def __repr__(self) -> str:
        return (f"MergeInputs(shape={self.shape}, dtype={self.dtype}, K={len(self.tensors)}, kind={self.kind}, "
                f"layouts={self.layouts})")


def make_inputs(shape, dtype, k: int, *, kind: str = "normal", layouts: Sequence[str] | None = None,
                seed: int = 0, device="cpu") -> MergeInputs:
    """A base and K fine-tuned tensors (x_i = base + δ_i) of one shape/dtype, each with its layout."""
    gen = torch.Generator().manual_seed(seed)
    layouts = list(layouts) if layouts is not None else ["contiguous"] * (k + 1)
    base_values = random_values(gen, shape, "int" if kind == "int" else "normal")
    base = with_layout(base_values.to(dtype).to(device), layouts[0])
    base_now = base.contiguous()  # the values base really holds (a broadcast layout repeats rows)
    tensors = []
    for i in range(k):
        if kind == "zero_delta":
            values = base_now.clone()
        else:
            values = (base_now.double() + random_values(gen, shape, kind).to(device)).to(dtype)
        tensors.append(with_layout(values, layouts[i + 1]))
    return MergeInputs(base, tensors, dtype, tuple(shape), kind, layouts)


# ----------------------------------------------------------------------------------------------
# hypothesis strategies

# Dyadic weights (k/8) keep weighted sums of integer-valued data exact in every dtype, so a sign
# election or a divisor never depends on accumulation order; negative weights are dyadic too.
dyadic = st.integers(-16, 16).map(lambda n: n / 8)
positive = st.floats(0.05, 2.0, allow_nan=False, allow_infinity=False)
unit_floats = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)
density_values = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.1, 0.9]), unit_floats)


def weights_for(k: int):
    """None, a scalar, or one weight per model (dyadic of any sign, or positive floats)."""
    return st.one_of(
        st.none(),
        dyadic.filter(lambda w: w != 0),
        st.lists(dyadic, min_size=k, max_size=k),
        st.lists(positive, min_size=k, max_size=k),
    )


def densities_for(k: int):
    """A scalar density or one per model, 0 and 1 included."""
    return st.one_of(density_values, st.lists(density_values, min_size=k, max_size=k))


def as_list(value, k: int, default: float) -> list[float]:
    if value is None:
        return [default] * k
    if isinstance(value, (int, float)):
        return [float(value)] * k
    return [float(v) for v in value]


@st.composite
def merge_inputs(draw, backend: str, max_k: int = 4, kinds: Sequence[str] = KINDS, k: int | None = None,
                 dtypes: Sequence[torch.dtype] | None = None):
    dtype = draw(st.sampled_from(list(dtypes or dtypes_for(backend))))
    shape = draw(st.sampled_from(shapes_for(backend)))
    k = k if k is not None else draw(st.integers(1, max_k))
    kind = draw(st.sampled_from(list(kinds)))
    layouts = draw(st.lists(st.sampled_from(LAYOUTS), min_size=k + 1, max_size=k + 1))
    seed = draw(st.integers(0, 2**31 - 1))
    return make_inputs(shape, dtype, k, kind=kind, layouts=layouts, seed=seed, device=device_for(backend))


# ----------------------------------------------------------------------------------------------
# the common contract of an op call


def check_call(fn: Callable, args: tuple, kwargs: dict, backend: str, named: Sequence[tuple[str, torch.Tensor]], *,
               scale: float = 1.0, exact: bool = False, expected_dtype: torch.dtype | None = None,
               repeat: bool = True) -> torch.Tensor:
    """Call ``fn(*args, **kwargs, backend=backend)`` and check the contract every op shares:

    * a compiled backend: same result as ``backend="torch"`` (bit-exact when ``exact``, else within
      the dtype tolerance). The torch backend IS the reference: its values are not compared here
      (that would compare it with itself) but against independent float64 oracles in
      tests/ops/test_op_contract.py; here it gets the other checks only;
    * bit-identical when called twice (unless ``repeat=False``); inputs (their whole storage) unmodified;
    * output shape = the inputs' shape, dtype = ``expected_dtype``, device = the inputs' device, and a new
      tensor (never a view of an input, even when one input alone is the answer).
    """
    guard = InputGuard(named)
    actual = fn(*args, **kwargs, backend=backend)
    again = fn(*args, **kwargs, backend=backend) if repeat else actual
    guard.check()
    first = named[0][1]
    assert actual.shape == first.shape, f"output shape {tuple(actual.shape)} != input shape {tuple(first.shape)}"
    if expected_dtype is not None:
        assert actual.dtype == expected_dtype, f"output dtype {actual.dtype} != {expected_dtype}"
    assert actual.device == first.device, f"output on {actual.device}, inputs on {first.device}"
    for name, t in named:
        if t.numel() and actual.numel():
            assert actual.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), \
                f"the output shares memory with input {name}"
    assert_bitwise_equal(again, actual, f"{backend}: the same call twice")
    if backend == "torch":
        return actual  # the reference itself: see the docstring
    expected = fn(*args, **kwargs, backend="torch")
    if exact:
        assert_bitwise_equal(actual, expected, f"{backend} vs torch")
    else:
        atol, rtol = tolerance(actual.dtype, scale)
        assert_verbose_allclose(actual, expected, atol, rtol, what=f"{backend} vs torch")
    return actual


def draw_task_merge(data, backend: str, switches: dict | None = None):
    """One hypothesis draw of a task-vector merge: inputs, per-model weights and densities, and
    (with ``switches``: name -> allowed values) one value per switch plus a λ."""
    inputs = data.draw(merge_inputs(backend))
    k = len(inputs.tensors)
    weights = data.draw(weights_for(k))
    density = data.draw(densities_for(k))
    kw = {}
    if switches is not None:
        kw = data.draw(st.fixed_dictionaries({name: st.sampled_from(values) for name, values in switches.items()}))
        kw["lam"] = data.draw(st.one_of(st.just(1.0), dyadic, st.floats(-2.0, 2.0)))
    return inputs, weights, density, kw


# ----------------------------------------------------------------------------------------------
# the safetensors corpus shared by the C and the Python reader

SAFETENSORS_CORPUS = sorted((Path(__file__).resolve().parents[1] / "fuzz" / "corpus").glob("*.safetensors"))


def corpus_case(path: Path):
    """A ``pytest.param`` of one corpus file with the verdict both readers must give: True (opens) for
    ``valid_*`` and ``package_*`` files, False (rejected as malformed) for ``bad_*`` ones."""
    return pytest.param(path, not path.name.startswith("bad_"), id=path.stem)


# ----------------------------------------------------------------------------------------------
# mergekit alongside


_MERGEKIT_DRIVER = """\
import sys
from mergekit.scripts.run_yaml import main
extra = sys.argv[1].split()
for config, out in zip(sys.argv[2::2], sys.argv[3::2]):
    main([config, out, "--quiet", *extra], standalone_mode=False)
"""


def merge_alongside_mergekit(jobs: Sequence[tuple[str, str, str]], run_ours: Callable[[str, str], None],
                             mergekit_flags: str = "--no-write-model-card", timeout: float = 300) -> None:
    """For ``jobs`` = [(config, our output, mergekit's output)]: ``mergekit-yaml`` runs every config in one
    child process (offline; its import dominates the time) while ``run_ours(config, out)`` runs ours."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    child = subprocess.Popen([sys.executable, "-c", _MERGEKIT_DRIVER, mergekit_flags,
                              *[a for config, _, theirs in jobs for a in (config, theirs)]],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for config, ours, _ in jobs:
            run_ours(config, ours)
        log, _ = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, log[-4000:]


def load_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (all shards)."""
    import glob
    import os

    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


# ----------------------------------------------------------------------------------------------
# multi-process (torchrun-like) runs


def launch_ranks(argv: Sequence[str], world: int, *, cwd: str | None = None, timeout: float = 120,
                 env: dict | None = None) -> list[tuple[int, str, str]]:
    """Run ``argv`` as ``world`` ranks of one gloo job, as torchrun would start them (MASTER_ADDR/PORT,
    WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE; one thread each); ``(returncode, stdout, stderr)``
    per rank. A rank still running after ``timeout`` seconds is killed."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ, **(env or {}), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                        OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(list(argv), cwd=cwd, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        results.append((p.returncode, stdout, stderr))
    return results

