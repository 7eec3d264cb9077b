"""The C library (libfusion_engine) through ctypes, against the Python package.

Every C merge op is compared with the op of ``fusion_engine.ops`` (``backend="torch"``, the
reference, within the dtype's tolerance; and ``backend="cpp"``, the same kernels, bit for bit),
the safetensors reader/writer with the ``safetensors`` package in both directions, and the
load-time merger with the ops it is specified by.

The library: ``$FUSION_ENGINE_LIB`` if set; else ``build/libfusion_engine.so`` when it is newer than
every C/C++ source (and not a sanitizer build); else one CPU-only ``-O1`` build with cmake into a
temporary directory, shared by the module (about 15 s on 2 cores). Skipped when cmake or a C++
compiler is missing.
"""

from __future__ import annotations

import ctypes as C
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_engine import backends
from fusion_engine.errors import CheckpointError
from fusion_engine.io import parse_header
from fusion_engine.ops import dare_merge, fisher_merge, linear_merge, magnitude_mask, stream_id, task_arithmetic, ties_merge
from utils import SAFETENSORS_CORPUS, assert_verbose_allclose, corpus_case, max_abs, tolerance

REPO = Path(__file__).resolve().parents[1]
MAX_DIMS = 8
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.bool: 4,
               torch.uint8: 5, torch.int8: 6, torch.int16: 7, torch.int32: 9, torch.int64: 11}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
SHAPES = [(1,), (7, 13), (3, 5, 67)]
FE_OK, FE_ERR_INVALID_ARGUMENT, FE_ERR_DTYPE_MISMATCH, FE_ERR_SHAPE_MISMATCH = 0, 1, 2, 3
FE_ERR_NONFINITE, FE_ERR_NOT_FOUND, FE_ERR_IO, FE_ERR_FORMAT = 6, 7, 8, 9
CPP_USABLE = backends()["cpp"].usable
_KEEP_ALIVE: list = []  # stride arrays referenced by views


# ----------------------------------------------------------------------------------------------
# the ABI, as declared in csrc/include/fusion_engine/fusion_engine.h

Ptr = C.POINTER(C.c_double)


class TensorView(C.Structure):
    _fields_ = [("data", C.c_void_p), ("dtype", C.c_int), ("ndim", C.c_int32), ("shape", C.c_int64 * MAX_DIMS),
                ("strides", C.POINTER(C.c_int64)), ("device", C.c_int), ("stream", C.c_void_p)]


class LinearParams(C.Structure):
    _fields_ = [("weights", Ptr), ("normalize", C.c_bool), ("check_finite", C.c_bool), ("n_threads", C.c_int32)]


class TaskArithmeticParams(C.Structure):
    _fields_ = [("weights", Ptr), ("lam", C.c_double), ("check_finite", C.c_bool), ("n_threads", C.c_int32)]


class MagnitudeMaskParams(C.Structure):
    _fields_ = [("density", C.c_double), ("tie", C.c_int), ("check_finite", C.c_bool), ("n_threads", C.c_int32)]


class TiesParams(C.Structure):
    _fields_ = [("weights", Ptr), ("density", C.c_double), ("densities", Ptr), ("consensus", C.c_int),
                ("sign_weighted", C.c_bool), ("divisor", C.c_int), ("normalize", C.c_bool), ("lam", C.c_double),
                ("rescale", C.c_int), ("tie", C.c_int), ("check_finite", C.c_bool), ("n_threads", C.c_int32)]


class DareParams(C.Structure):
    _fields_ = [("weights", Ptr), ("density", C.c_double), ("densities", Ptr), ("seed", C.c_uint64),
                ("stream_id", C.c_uint32), ("offset", C.c_int64), ("consensus", C.c_int),
                ("sign_weighted", C.c_bool), ("divisor", C.c_int), ("rescale", C.c_int), ("normalize", C.c_bool),
                ("lam", C.c_double), ("check_finite", C.c_bool), ("n_threads", C.c_int32)]


class FisherParams(C.Structure):
    _fields_ = [("weights", Ptr), ("eps", C.c_double), ("check_finite", C.c_bool), ("n_threads", C.c_int32)]


class Adapter(C.Structure):
    _fields_ = [("path", C.c_char_p), ("kind", C.c_int), ("weight", C.c_double), ("density", C.c_double),
                ("lora_scale", C.c_double), ("name_prefix", C.c_char_p)]


class MergerParams(C.Structure):
    _fields_ = [("method", C.c_int), ("lam", C.c_double), ("normalize", C.c_bool), ("consensus", C.c_int),
                ("sign_weighted", C.c_bool), ("divisor", C.c_int), ("rescale", C.c_int), ("tie", C.c_int),
                ("seed", C.c_uint64), ("check_finite", C.c_bool), ("n_threads", C.c_int32)]


class TensorInfo(C.Structure):
    _fields_ = [("name", C.c_char_p), ("dtype", C.c_int), ("ndim", C.c_int32), ("shape", C.c_int64 * MAX_DIMS),
                ("n_adapters", C.c_int32)]


CONSENSUS = {None: 0, "sum": 1, "count": 2}
RESCALE = {None: 0, "density": 1, "l1": 2}
TIE = {"index": 0, "threshold": 1}
ADAPTER_FULL, ADAPTER_DELTA, ADAPTER_LORA = 0, 1, 2
MERGE_LINEAR, MERGE_TASK_ARITHMETIC, MERGE_TIES, MERGE_DARE = 0, 1, 2, 3

VP, V = C.POINTER(TensorView), TensorView
SIGNATURES = {
    "fe_version": (C.c_char_p, []),
    "fe_last_error": (C.c_char_p, []),
    "fe_status_string": (C.c_char_p, [C.c_int]),
    "fe_stream_id": (C.c_uint32, [C.c_char_p]),
    "fe_linear_default_params": (LinearParams, []),
    "fe_task_arithmetic_default_params": (TaskArithmeticParams, []),
    "fe_magnitude_mask_default_params": (MagnitudeMaskParams, []),
    "fe_ties_default_params": (TiesParams, []),
    "fe_dare_default_params": (DareParams, []),
    "fe_fisher_default_params": (FisherParams, []),
    "fe_merger_default_params": (MergerParams, [C.c_int]),
    "fe_adapter_default": (Adapter, [C.c_char_p, C.c_int]),
    "fe_linear_merge": (C.c_int, [VP, C.c_int32, C.POINTER(LinearParams), VP]),
    "fe_task_arithmetic": (C.c_int, [VP, VP, C.c_int32, C.POINTER(TaskArithmeticParams), VP]),
    "fe_magnitude_mask": (C.c_int, [VP, C.POINTER(MagnitudeMaskParams), VP]),
    "fe_ties_merge": (C.c_int, [VP, VP, C.c_int32, C.POINTER(TiesParams), VP]),
    "fe_dare_merge": (C.c_int, [VP, VP, C.c_int32, C.POINTER(DareParams), VP]),
    "fe_fisher_merge": (C.c_int, [VP, VP, C.c_int32, C.POINTER(FisherParams), VP]),
    "fe_st_open": (C.c_int, [C.c_char_p, C.POINTER(C.c_void_p)]),
    "fe_st_open_memory": (C.c_int, [C.c_void_p, C.c_size_t, C.POINTER(C.c_void_p)]),
    "fe_st_close": (None, [C.c_void_p]),
    "fe_st_tensor_count": (C.c_int64, [C.c_void_p]),
    "fe_st_tensor_name": (C.c_char_p, [C.c_void_p, C.c_int64]),
    "fe_st_find": (C.c_int, [C.c_void_p, C.c_char_p, VP]),
    "fe_st_metadata_value": (C.c_char_p, [C.c_void_p, C.c_char_p]),
    "fe_st_writer_create": (C.c_int, [C.c_char_p, C.POINTER(C.c_void_p)]),
    "fe_st_writer_set_metadata": (C.c_int, [C.c_void_p, C.c_char_p, C.c_char_p]),
    "fe_st_writer_add": (C.c_int, [C.c_void_p, C.c_char_p, VP]),
    "fe_st_writer_finish": (C.c_int, [C.c_void_p]),
    "fe_merger_create": (C.c_int, [C.c_char_p, C.POINTER(Adapter), C.c_int32, C.POINTER(MergerParams),
                                   C.POINTER(C.c_void_p)]),
    "fe_merger_free": (None, [C.c_void_p]),
    "fe_merger_tensor_count": (C.c_int64, [C.c_void_p]),
    "fe_merger_tensor_info": (C.c_int, [C.c_void_p, C.c_int64, C.POINTER(TensorInfo)]),
    "fe_merger_merge_tensor": (C.c_int, [C.c_void_p, C.c_int64, VP]),
}


# ----------------------------------------------------------------------------------------------
# finding or building the library


def _newest_source() -> float:
    paths = [REPO / "CMakeLists.txt", *REPO.glob("cmake/*"), *REPO.glob("csrc/**/*")]
    return max(p.stat().st_mtime for p in paths if p.is_file())


def _reusable(build: Path) -> Path | None:
    lib = build / "libfusion_engine.so"
    cache = build / "CMakeCache.txt"
    if not lib.exists() or not cache.exists() or lib.stat().st_mtime < _newest_source():
        return None
    text = cache.read_text(errors="replace")
    if "FUSION_ENGINE_SANITIZE:BOOL=ON" in text:  # would need the sanitizer runtimes preloaded
        return None
    return lib


def _build(tmp_dir: Path) -> Path:
    cmake = shutil.which("cmake")
    if cmake is None or not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("cmake or a C++ compiler is missing: libfusion_engine cannot be built")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [cmake, "-S", str(REPO), "-B", str(tmp_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
         "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG", "-DFUSION_ENGINE_BUILD_TESTS=OFF", "-DFUSION_ENGINE_CUDA=OFF"],
        [cmake, "--build", str(tmp_dir), "--target", "fusion_engine", "--parallel", str(os.cpu_count() or 2)],
    ]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"building libfusion_engine failed: {' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return tmp_dir / "libfusion_engine.so"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    path = os.environ.get("FUSION_ENGINE_LIB") or _reusable(REPO / "build") or _build(tmp_path_factory.mktemp("libfe"))
    lib = C.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


# ----------------------------------------------------------------------------------------------
# helpers


def view(t: torch.Tensor) -> TensorView:
    """A view of a CPU tensor (strided when it is not contiguous); the tensor must outlive it."""
    v = TensorView(data=t.data_ptr(), dtype=DTYPE_CODES[t.dtype], ndim=t.dim(), device=0)
    for d, size in enumerate(t.shape):
        v.shape[d] = size
    if not t.is_contiguous():
        strides = (C.c_int64 * max(1, t.dim()))(*t.stride())
        v.strides = C.cast(strides, C.POINTER(C.c_int64))
        _KEEP_ALIVE.append(strides)
    return v


def views(tensors) -> C.Array:
    return (TensorView * len(tensors))(*[view(t) for t in tensors])


def doubles(values) -> C.Array:
    return (C.c_double * len(values))(*values)


def call(lib, fn, *args) -> None:
    status = fn(*args)
    assert status == FE_OK, f"{fn.__name__}: {lib.fe_status_string(status).decode()}: {lib.fe_last_error().decode()}"


def expect_error(lib, status: int, expected: int, fragment: str) -> None:
    message = lib.fe_last_error().decode()
    assert status == expected, f"status {status} (expected {expected}): {message}"
    assert fragment in message, message


def inputs(shape, dtype, k, seed=0, base_scale=1.0, delta_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = (base_scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    xs = [(base.double() + delta_scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
          for _ in range(k)]
    return base, xs


def compare(lib_out, op, *args, **kwargs):
    """The C output against the op's torch reference (tolerance) and cpp backend (bit for bit)."""
    expected = op(*args, backend="torch", **kwargs)
    scale = max_abs([a for a in args if isinstance(a, torch.Tensor)] +
                    [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)])
    atol, rtol = tolerance(lib_out.dtype, scale)
    assert_verbose_allclose(lib_out, expected, 2 * atol, 2 * rtol, what=f"{op.__name__} vs torch")
    if CPP_USABLE:
        same = op(*args, backend="cpp", **kwargs)
        differ = int((lib_out != same).sum())
        assert differ == 0, f"{op.__name__}: {differ} elements of the C result differ from the cpp backend's"


# ----------------------------------------------------------------------------------------------
# ops


def test_version_and_defaults(lib):
    assert lib.fe_version().decode() == "0.1.0"
    d = lib.fe_dare_default_params()  # a misplaced field would show up as a wrong default
    assert (d.density, d.seed, d.offset, d.consensus, d.sign_weighted, d.rescale, d.normalize, d.lam,
            d.check_finite, d.n_threads) == (1.0, 0, 0, 0, True, 1, False, 1.0, True, 0)
    t = lib.fe_ties_default_params()
    assert (t.consensus, t.divisor, t.normalize, t.lam, t.rescale, t.tie, t.check_finite) == (1, 0, True, 1.0, 0, 0, True)
    assert lib.fe_fisher_default_params().eps == 1e-8
    m = lib.fe_merger_default_params(MERGE_DARE)
    assert (m.method, m.normalize, m.rescale, m.seed, m.check_finite) == (MERGE_DARE, False, 1, 0, True)
    for name in ("", "model.layers.0.self_attn.q_proj.weight", "caf\u00e9"):
        assert lib.fe_stream_id(name.encode()) == stream_id(name)


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS.get)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_and_task_arithmetic(lib, dtype, shape):
    base, xs = inputs(shape, dtype, 3, seed=1)
    w = [0.5, 1.25, -0.25]
    out = torch.empty(shape, dtype=dtype)
    p = lib.fe_linear_default_params()
    p.weights = doubles(w)
    call(lib, lib.fe_linear_merge, views(xs), 3, C.byref(p), C.byref(view(out)))
    compare(out, linear_merge, xs, w)

    out32 = torch.empty(shape, dtype=torch.float32)
    p = lib.fe_task_arithmetic_default_params()
    p.weights, p.lam = doubles(w), 0.7
    call(lib, lib.fe_task_arithmetic, C.byref(view(base)), views(xs), 3, C.byref(p), C.byref(view(out32)))
    compare(out32, task_arithmetic, base, xs, w, lam=0.7, out_dtype=torch.float32)


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS.get)
@pytest.mark.parametrize("tie", ["index", "threshold"])
def test_magnitude_mask(lib, dtype, tie):
    x = torch.randn(9, 57, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, :10] = x[1, :10]  # ties
    out = torch.empty(x.shape, dtype=torch.bool)
    p = lib.fe_magnitude_mask_default_params()
    p.density, p.tie = 0.3, TIE[tie]
    call(lib, lib.fe_magnitude_mask, C.byref(view(x)), C.byref(p), C.byref(view(out)))
    assert torch.equal(out, magnitude_mask(x, 0.3, tie=tie, backend="torch"))


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS.get)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["mergekit", "peft_l1_threshold"])
def test_ties(lib, dtype, shape, variant):
    base, xs = inputs(shape, dtype, 3, seed=3)
    w, rho = [1.0, 0.5, 2.0], [0.2, 0.5, 0.9]
    kwargs = dict(sign="sum", sign_on="weighted", divisor="weights", rescale=None, tie="index", lam=1.0)
    if variant != "mergekit":
        kwargs = dict(sign="count", sign_on="unweighted", divisor="count", rescale="l1", tie="threshold", lam=0.8)
    out = torch.empty(shape, dtype=dtype)
    p = lib.fe_ties_default_params()
    p.weights, p.densities = doubles(w), doubles(rho)
    p.consensus, p.sign_weighted = CONSENSUS[kwargs["sign"]], kwargs["sign_on"] == "weighted"
    p.divisor, p.rescale, p.tie, p.lam = int(kwargs["divisor"] == "count"), RESCALE[kwargs["rescale"]], TIE[kwargs["tie"]], kwargs["lam"]
    call(lib, lib.fe_ties_merge, C.byref(view(base)), views(xs), 3, C.byref(p), C.byref(view(out)))
    compare(out, ties_merge, base, xs, w, rho, **kwargs)


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS.get)
@pytest.mark.parametrize("consensus,rescale", [(None, "density"), ("sum", "l1"), ("count", None)])
def test_dare(lib, dtype, consensus, rescale):
    shape = (5, 203)
    base, xs = inputs(shape, dtype, 2, seed=4)
    w, rho, seed = [0.6, 1.4], [0.3, 0.75], 2**40 + 7
    sid = stream_id("model.layers.3.mlp.down_proj.weight")
    out = torch.empty(shape, dtype=dtype)
    p = lib.fe_dare_default_params()
    p.weights, p.densities, p.seed, p.stream_id, p.offset = doubles(w), doubles(rho), seed, sid, 1000
    p.consensus, p.rescale, p.normalize, p.lam = CONSENSUS[consensus], RESCALE[rescale], consensus is not None, 0.9
    call(lib, lib.fe_dare_merge, C.byref(view(base)), views(xs), 2, C.byref(p), C.byref(view(out)))
    compare(out, dare_merge, base, xs, w, rho, seed=seed, stream=sid, offset=1000, consensus=consensus,
            rescale=rescale, normalize=consensus is not None, lam=0.9)


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS.get)
def test_fisher(lib, dtype):
    _, xs = inputs((11, 31), dtype, 3, seed=5)
    g = torch.Generator().manual_seed(6)
    fishers = [torch.rand(11, 31, generator=g) for _ in range(3)]  # F32 fishers with any tensor dtype
    out = torch.empty(11, 31, dtype=dtype)
    p = lib.fe_fisher_default_params()
    p.weights = doubles([1.0, 2.0, 0.5])
    call(lib, lib.fe_fisher_merge, views(xs), views(fishers), 3, C.byref(p), C.byref(view(out)))
    compare(out, fisher_merge, xs, fishers, [1.0, 2.0, 0.5])


def test_non_contiguous_views(lib):
    base, xs = inputs((40, 30), torch.float32, 2, seed=7)
    xt = [x.t() for x in xs]  # strided inputs, gathered by the library
    out = torch.empty(40, 30).t()  # a strided output, scattered by the library
    p = lib.fe_ties_default_params()
    p.density = 0.4
    call(lib, lib.fe_ties_merge, C.byref(view(base.t())), views(xt), 2, C.byref(p), C.byref(view(out)))
    compare(out.contiguous(), ties_merge, base.t().contiguous(), [x.contiguous() for x in xt], None, 0.4)


def test_errors(lib):
    x = torch.ones(4)
    y = torch.ones(5)
    out = torch.empty(4)
    expect_error(lib, lib.fe_linear_merge(views([x, y]), 2, None, C.byref(view(out))), FE_ERR_SHAPE_MISMATCH,
                 "tensors[1] has shape [5]")
    expect_error(lib, lib.fe_linear_merge(views([x, x.half()]), 2, None, C.byref(view(out))), FE_ERR_DTYPE_MISMATCH,
                 "tensors[1] has dtype F16")
    expect_error(lib, lib.fe_linear_merge(views([x]), 0, None, C.byref(view(out))), FE_ERR_INVALID_ARGUMENT,
                 "at least one tensor")
    expect_error(lib, lib.fe_linear_merge(None, 1, None, C.byref(view(out))), FE_ERR_INVALID_ARGUMENT, "tensors is NULL")
    p = lib.fe_ties_default_params()
    p.density = 1.5
    expect_error(lib, lib.fe_ties_merge(C.byref(view(x)), views([x]), 1, C.byref(p), C.byref(view(out))),
                 FE_ERR_INVALID_ARGUMENT, "outside [0, 1]")
    nan = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    expect_error(lib, lib.fe_task_arithmetic(C.byref(view(x)), views([x, nan]), 2, None, C.byref(view(out))),
                 FE_ERR_NONFINITE, "tensors[1] holds NaN")


# ----------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_round_trip(lib, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    load_file, save_file = st.load_file, st.save_file

    g = torch.Generator().manual_seed(8)
    tensors = {
        "embed.weight": torch.randn(17, 8, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(8, generator=g).half(),
        "head.weight": torch.randn(3, 8, generator=g).double(),
        "position_ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "tokens": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
    }
    # ours -> the safetensors package (a strided view is written in row-major order)
    ours = tmp_path / "ours.safetensors"
    writer = C.c_void_p()
    call(lib, lib.fe_st_writer_create, str(ours).encode(), C.byref(writer))
    keep = []
    for name, t in tensors.items():
        v = view(t)
        keep.append(v)
        call(lib, lib.fe_st_writer_add, writer, name.encode(), C.byref(v))
    transposed = torch.randn(6, 4, generator=g).t()
    call(lib, lib.fe_st_writer_add, writer, b"transposed", C.byref(view(transposed)))
    call(lib, lib.fe_st_writer_set_metadata, writer, b"format", b"pt")
    call(lib, lib.fe_st_writer_finish, writer)
    loaded = load_file(str(ours))
    assert set(loaded) == set(tensors) | {"transposed"}
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    assert torch.equal(loaded["transposed"], transposed)
    assert [p.name for p in tmp_path.iterdir()] == ["ours.safetensors"]  # no temporaries left

    # the safetensors package -> ours (zero-copy views of the mapped file)
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata={"format": "pt", "origin": "test"})
    handle = C.c_void_p()
    call(lib, lib.fe_st_open, str(theirs).encode(), C.byref(handle))
    try:
        assert lib.fe_st_tensor_count(handle) == len(tensors)
        names = [lib.fe_st_tensor_name(handle, i).decode() for i in range(len(tensors))]
        assert names == sorted(tensors)
        assert lib.fe_st_metadata_value(handle, b"origin") == b"test"
        for name, t in tensors.items():
            v = TensorView()
            call(lib, lib.fe_st_find, handle, name.encode(), C.byref(v))
            assert v.dtype == DTYPE_CODES[t.dtype] and list(v.shape[: v.ndim]) == list(t.shape)
            nbytes = t.numel() * t.element_size()
            assert C.string_at(v.data, nbytes) == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        expect_error(lib, lib.fe_st_find(handle, b"missing", C.byref(TensorView())), FE_ERR_NOT_FOUND, "'missing'")
    finally:
        lib.fe_st_close(handle)

    # malformed and missing files
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(theirs.read_bytes()[:-1])
    expect_error(lib, lib.fe_st_open(str(bad).encode(), C.byref(handle)), FE_ERR_FORMAT, "data section")
    expect_error(lib, lib.fe_st_open(str(tmp_path / "nope").encode(), C.byref(handle)), FE_ERR_IO, "No such file")


@pytest.mark.parametrize("path, opens", [corpus_case(p) for p in SAFETENSORS_CORPUS])
def test_corpus_verdicts_are_the_python_readers(lib, path, opens):
    """One list of cases for both readers (fuzz/corpus; the Python side runs in tests/io)."""
    handle = C.c_void_p()
    status = lib.fe_st_open(str(path).encode(), C.byref(handle))
    lib.fe_st_close(handle if status == FE_OK else None)
    assert status == (FE_OK if opens else FE_ERR_FORMAT), lib.fe_last_error().decode()


def _python_opens(path: Path) -> bool:
    try:
        parse_header(str(path))
    except CheckpointError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SAFETENSORS_CORPUS), edits=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)),
                                                                max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 300)), tail=st.binary(max_size=6))
def test_mutated_corpus_files_get_one_verdict_from_both_readers(lib, tmp_path, seed, edits, cut, tail):
    """Byte edits, truncation and appended bytes on corpus files: the C and the Python reader agree."""
    raw = bytearray(seed.read_bytes()[:20_000])
    for i, b in edits:
        if i < len(raw):
            raw[i] = b
    raw = bytes(raw[:cut] if cut is not None else raw) + tail
    path = tmp_path / "mutant.safetensors"
    path.write_bytes(raw)
    handle = C.c_void_p()
    status = lib.fe_st_open_memory(raw, len(raw), C.byref(handle))
    lib.fe_st_close(handle if status == FE_OK else None)
    assert status in (FE_OK, FE_ERR_FORMAT), lib.fe_last_error().decode()
    c_message = lib.fe_last_error().decode() if status != FE_OK else ""
    assert _python_opens(path) == (status == FE_OK), f"C says {c_message or 'ok'} for {raw[:300]!r}"


def test_error_messages_are_utf8_whatever_the_file_holds(lib):
    """A message quoting header bytes that are not UTF-8 shows them as \\xNN (a hypothesis find: a lone
    surrogate escape whose next byte became 0x80)."""
    seed = next(p for p in SAFETENSORS_CORPUS if p.name == "bad_high_surrogate_alone.safetensors")
    raw = bytearray(seed.read_bytes())
    raw[12] = 0x80
    handle = C.c_void_p()
    assert lib.fe_st_open_memory(bytes(raw), len(raw), C.byref(handle)) == FE_ERR_FORMAT
    message = lib.fe_last_error().decode("utf-8")  # strict: must not raise
    assert "\\x80" in message, message


# ----------------------------------------------------------------------------------------------
# the merger


def adapter(lib, path, kind) -> Adapter:
    a = lib.fe_adapter_default(None, kind)
    a.path = str(path).encode()  # assigned from Python, so the struct keeps the bytes alive
    return a


def _merge_all(lib, base_path, adapters, params, dtypes):
    arr = (Adapter * len(adapters))(*adapters)
    merger = C.c_void_p()
    call(lib, lib.fe_merger_create, str(base_path).encode(), arr, len(adapters), C.byref(params), C.byref(merger))
    out = {}
    try:
        for i in range(lib.fe_merger_tensor_count(merger)):
            info = TensorInfo()
            call(lib, lib.fe_merger_tensor_info, merger, i, C.byref(info))
            name = info.name.decode()
            t = torch.empty(list(info.shape[: info.ndim]), dtype=dtypes.get(name, torch.float32))
            call(lib, lib.fe_merger_merge_tensor, merger, i, C.byref(view(t)))
            out[name] = t
    finally:
        lib.fe_merger_free(merger)
    return out


def test_merger_full_adapters(lib, tmp_path):
    """All adapters FULL: the merger is exactly ops.<method>(b, [x_i]) per tensor."""
    save_file = pytest.importorskip("safetensors.torch").save_file

    g = torch.Generator().manual_seed(9)
    base = {"a.weight": torch.randn(16, 12, generator=g).to(torch.bfloat16),
            "b.weight": torch.randn(33, generator=g).to(torch.bfloat16)}
    models = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
              for _ in range(2)]
    del models[1]["b.weight"]  # absent: x_2 = b
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, m in enumerate(models):
        save_file(m, str(tmp_path / f"m{i}.safetensors"))
    adapters = [adapter(lib, tmp_path / f"m{i}.safetensors", ADAPTER_FULL) for i in range(2)]
    adapters[0].weight, adapters[0].density = 0.7, 0.3
    adapters[1].weight, adapters[1].density = 1.3, 0.6
    for method in (MERGE_TIES, MERGE_DARE):
        params = lib.fe_merger_default_params(method)
        params.seed = 123
        merged = _merge_all(lib, tmp_path / "base.safetensors", adapters, params, {})
        for name, b in base.items():
            xs = [m.get(name, b) for m in models]
            if method == MERGE_TIES:
                compare(merged[name], ties_merge, b, xs, [0.7, 1.3], [0.3, 0.6], out_dtype=torch.float32)
            else:
                compare(merged[name], dare_merge, b, xs, [0.7, 1.3], [0.3, 0.6], seed=123, stream=stream_id(name),
                        out_dtype=torch.float32)


def test_merger_lora_and_delta(lib, tmp_path):
    """LoRA and task-vector adapters: y = b + ops.<method>(0, [delta_i], out_dtype=float32)."""
    save_file = pytest.importorskip("safetensors.torch").save_file

    g = torch.Generator().manual_seed(10)
    base = {"model.layers.0.q_proj.weight": torch.randn(24, 20, generator=g),
            "model.layers.0.k_proj.weight": torch.randn(24, 20, generator=g),
            "model.norm.weight": torch.randn(20, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    rank, alpha = 4, 8.0
    lora = {}
    for module in ("model.layers.0.q_proj", "model.layers.0.k_proj"):
        lora[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn(rank, 20, generator=g)
        lora[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn(24, rank, generator=g)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    delta = {"model.layers.0.q_proj.weight": 0.02 * torch.randn(24, 20, generator=g)}
    save_file(delta, str(tmp_path / "delta.safetensors"))

    adapters = [adapter(lib, tmp_path / "lora.safetensors", ADAPTER_LORA),
                adapter(lib, tmp_path / "delta.safetensors", ADAPTER_DELTA)]
    adapters[0].lora_scale, adapters[0].density, adapters[1].weight, adapters[1].density = alpha / rank, 0.5, 0.5, 0.4
    params = lib.fe_merger_default_params(MERGE_TIES)
    merged = _merge_all(lib, tmp_path / "base.safetensors", adapters, params, {})

    for name, b in base.items():
        module = name.removesuffix(".weight")
        deltas = [torch.zeros_like(b), delta.get(name, torch.zeros_like(b))]
        if f"base_model.model.{module}.lora_A.weight" in lora:
            a_, b_ = lora[f"base_model.model.{module}.lora_A.weight"], lora[f"base_model.model.{module}.lora_B.weight"]
            deltas[0] = (alpha / rank) * (b_ @ a_)
        if name == "model.norm.weight":
            assert torch.equal(merged[name], b)  # untouched
            continue
        expected = b + ties_merge(torch.zeros_like(b), deltas, [1.0, 0.5], [0.5, 0.4], backend="torch",
                                  out_dtype=torch.float32)
        # the LoRA product is summed in another order than torch's matmul: allow its rounding, and
        # entries whose delta sits at the trim threshold may flip; nearly all must agree
        close = torch.isclose(merged[name], expected, atol=1e-5, rtol=1e-5)
        assert close.float().mean() > 0.98, f"{name}: {int((~close).sum())} of {close.numel()} entries differ"

    bad = adapter(lib, tmp_path / "delta.safetensors", ADAPTER_LORA)
    merger = C.c_void_p()
    expect_error(lib, lib.fe_merger_create(str(tmp_path / "base.safetensors").encode(), C.byref(bad), 1,
                                           C.byref(params), C.byref(merger)), FE_ERR_FORMAT, "is not a LoRA factor")
