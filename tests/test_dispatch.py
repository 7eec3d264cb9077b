"""Dispatch: the backend registry, explicit choice, FUSION_ENGINE_BACKEND, automatic choice and fallback."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusion_engine
from fusion_engine import _dispatch
from fusion_engine._dispatch import BACKENDS, BackendStatus, backends, resolve
from fusion_engine.errors import BackendUnavailableError, ConfigError
from fusion_engine.ops import linear_merge
from fusion_engine.ops.linear_merge import linear_merge_reference
from utils import kernel_missing_reason

OPS = ("linear_merge", "task_arithmetic", "magnitude_mask", "ties_merge", "dare_merge", "fisher_merge")
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()


def test_backends_report():
    status = backends()
    assert tuple(status) == ("triton", "cuda", "cpp", "torch")
    assert all(isinstance(s, BackendStatus) for s in status.values())
    assert status["torch"].usable and repr(status["torch"]) == "usable"
    for name, s in status.items():
        if not s.usable:
            assert s.reason, f"{name} is unusable without a reason"
            assert s.reason in repr(s)
    if not HAS_CUDA:
        assert not status["cuda"].usable


def test_public_backends_survives_launcher_import():
    import fusion_engine.launchers._marshal  # noqa: F401  (what loading the cpp kernels does)

    assert callable(fusion_engine.backends), f"fusion_engine.backends is {fusion_engine.backends!r}"
    assert fusion_engine.backends()["torch"].usable


def test_explicit_torch():
    for op in OPS:
        name, fn = resolve(op, CPU, torch.float32, "torch")
        assert name == "torch" and fn.__name__.endswith("_reference")
    assert resolve("linear_merge", CPU, torch.float32, "TORCH")[0] == "torch"  # case-insensitive
    y = linear_merge([torch.ones(3), torch.zeros(3)], backend="torch")
    assert torch.equal(y, torch.full((3,), 0.5))


def test_unknown_backend():
    with pytest.raises(ConfigError, match="choose one of triton, cuda, cpp, torch") as info:
        linear_merge([torch.ones(3)], backend="numpy")
    assert "'numpy'" in str(info.value)


@pytest.mark.parametrize("name", BACKENDS)
def test_explicit_unusable_backend_raises_with_reason(name):
    status = backends()[name]
    if status.usable:
        pytest.skip(f"{name} is usable here")
    with pytest.raises(BackendUnavailableError) as info:
        linear_merge([torch.ones(3)], backend=name)
    message = str(info.value)
    assert name in message and status.reason in message and "fusion_engine.backends()" in message


def test_explicit_backend_without_a_dtype_kernel():
    if not backends()["triton"].usable:
        pytest.skip("triton unusable here")
    with pytest.raises(BackendUnavailableError, match="float64"):
        linear_merge([torch.ones(3, dtype=torch.float64)], backend="triton")


def _missing_kernel():
    from fusion_engine.launchers.no_such_module import fake_op  # noqa: F401  (fails: no such module)


def test_explicit_backend_whose_kernel_does_not_load(monkeypatch):
    if not backends()["cpp"].usable:
        pytest.skip("cpp unusable here: the explicit request fails earlier")
    monkeypatch.setitem(_dispatch._REGISTRY, "fake_op",
                        _dispatch.OpKernels(linear_merge_reference, {"cpp": _missing_kernel}))
    with pytest.raises(BackendUnavailableError, match="cpp"):
        resolve("fake_op", CPU, torch.float32, "cpp")


def test_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv("FUSION_ENGINE_BACKEND", "torch")
    for op in OPS:
        assert resolve(op, CPU, torch.float32)[0] == "torch"
    monkeypatch.setenv("FUSION_ENGINE_BACKEND", "no-such-backend")
    with pytest.raises(ConfigError, match="no-such-backend"):
        linear_merge([torch.ones(3)])
    if not backends()["cuda"].usable:
        monkeypatch.setenv("FUSION_ENGINE_BACKEND", "cuda")
        with pytest.raises(BackendUnavailableError, match="cuda"):
            linear_merge([torch.ones(3)])
        # an explicit backend= wins over the environment
        assert torch.equal(linear_merge([torch.ones(3)], backend="torch"), torch.ones(3))
    monkeypatch.setenv("FUSION_ENGINE_BACKEND", "")
    assert resolve("linear_merge", CPU, torch.float32)[0] in ("cpp", "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_auto_choice_on_cpu(monkeypatch, op, dtype, caplog):
    """CPU tensors: cpp when usable and its kernel loads, else torch; never triton (not even interpreted)."""
    monkeypatch.delenv("FUSION_ENGINE_BACKEND", raising=False)
    with caplog.at_level(logging.DEBUG, logger="fusion_engine"):
        name, _ = resolve(op, CPU, dtype)
    assert name != "triton"
    if backends()["cpp"].usable and not kernel_missing_reason(op, "cpp"):
        assert name == "cpp"
    else:
        assert name == "torch"
        assert "skipping backend cpp" in caplog.text


def test_auto_falls_back_when_a_kernel_does_not_load(monkeypatch, caplog):
    monkeypatch.delenv("FUSION_ENGINE_BACKEND", raising=False)
    monkeypatch.setitem(_dispatch._REGISTRY, "fake_op",
                        _dispatch.OpKernels(linear_merge_reference, {"cpp": _missing_kernel}))
    with caplog.at_level(logging.DEBUG, logger="fusion_engine"):
        name, fn = resolve("fake_op", CPU, torch.float32)
    assert name == "torch" and fn.__name__ == "linear_merge_reference"
    assert "skipping backend cpp" in caplog.text


def _run(code: str, cwd, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, from an empty folder (so that the installed fusion_engine, not a
    source checkout in the working directory, is imported)."""
    full_env = dict(os.environ, **env)
    full_env.pop("FUSION_ENGINE_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU triton is usable without the interpreter")
def test_triton_needs_the_interpreter_on_cpu(tmp_path):
    out = _run("""
        import torch
        from fusion_engine._dispatch import backends
        from fusion_engine.errors import BackendUnavailableError
        from fusion_engine.ops import linear_merge
        status = backends()["triton"]
        assert not status.usable and "TRITON_INTERPRET" in status.reason, status
        try:
            linear_merge([torch.ones(3)], backend="triton")
        except BackendUnavailableError as exc:
            assert "TRITON_INTERPRET" in str(exc), exc
        else:
            raise SystemExit("backend='triton' ran without the interpreter")
        print("ok")
    """, tmp_path, TRITON_INTERPRET="0")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_without_the_extension(tmp_path):
    """A missing compiled extension never breaks `import fusion_engine`: auto falls back to torch, an
    explicit request raises with the reason."""
    out = _run("""
        import sys
        sys.modules["fusion_engine._C"] = None  # as if the extension were not built
        import torch
        import fusion_engine
        from fusion_engine._dispatch import backends, resolve
        from fusion_engine.errors import BackendUnavailableError
        from fusion_engine.ops import ties_merge
        status = backends()["cpp"]
        assert not status.usable and "fusion_engine._C" in status.reason, status
        assert resolve("ties_merge", torch.device("cpu"), torch.float32)[0] == "torch"
        y = ties_merge(torch.zeros(4), [torch.ones(4)], None, 0.5)
        assert y.tolist() == [1.0, 1.0, 0.0, 0.0], y
        try:
            ties_merge(torch.zeros(4), [torch.ones(4)], None, 0.5, backend="cpp")
        except BackendUnavailableError as exc:
            assert "fusion_engine._C" in str(exc), exc
        else:
            raise SystemExit("backend='cpp' ran without the extension")
        print("ok")
    """, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_auto_choice_on_cuda(monkeypatch, op):
    monkeypatch.delenv("FUSION_ENGINE_BACKEND", raising=False)
    name, _ = resolve(op, torch.device("cuda"), torch.float32)
    order = ("cuda", "triton") if op in _dispatch._CUDA_FIRST else ("triton", "cuda")
    expected = next((b for b in order if backends()[b].usable and not kernel_missing_reason(op, b)), "torch")
    assert name == expected
    if backends()["cpp"].usable:
        with pytest.raises(BackendUnavailableError, match="does not run on cuda"):
            resolve(op, torch.device("cuda"), torch.float32, "cpp")


def test_auto_order_on_cuda_is_per_op(monkeypatch):
    """With every backend usable, CUDA tensors get the measured faster kernel first: cuda for the
    selection ops (magnitude_mask, ties_merge) and DARE, triton for the others."""
    monkeypatch.delenv("FUSION_ENGINE_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_probe", lambda name: BackendStatus(True))
    monkeypatch.setattr(_dispatch, "_load", lambda kernels, name: name)
    chosen = {op: resolve(op, torch.device("cuda"), torch.bfloat16)[0]
              for op in ("magnitude_mask", "ties_merge", "dare_merge", "linear_merge", "task_arithmetic")}
    assert chosen == {"magnitude_mask": "cuda", "ties_merge": "cuda", "dare_merge": "cuda",
                      "linear_merge": "triton", "task_arithmetic": "triton"}
    assert resolve("magnitude_mask", torch.device("cuda"), torch.bfloat16, "triton")[0] == "triton"


def test_cpp_extension_is_built():
    """pip install builds fusion_engine._C on every supported platform: a missing extension here
    means a broken build, which would otherwise only show up as skipped cpp tests."""
    status = backends()["cpp"]
    assert status.usable, status.reason
    from fusion_engine import _C

    assert _C.simd_level() in ("avx512", "avx2", "baseline")


def test_helper_ops_fall_back_to_torch_for_a_backend_they_have_no_kernel_for(monkeypatch):
    """Philox words, inner products and the non-finite check run inside a merge on its behalf:
    ``backend="triton"`` on the merge runs their torch reference; a merge op itself would raise."""
    monkeypatch.delenv("FUSION_ENGINE_BACKEND", raising=False)
    for op in ("philox_words", "inner_products", "any_nonfinite"):
        name, fn = resolve(op, CPU, torch.float32, "triton")
        assert name == "torch" and fn is _dispatch.registered()[op].torch
    with pytest.raises(BackendUnavailableError, match="no cpp kernel"):
        resolve("cost_matrix", CPU, torch.float32, "cpp")


def test_registrations_are_callables_not_strings():
    for op, kernels in _dispatch.registered().items():
        assert callable(kernels.torch), op
        assert all(callable(loader) for loader in kernels.loaders.values()), op


def test_enum_codes_are_checked_against_the_extension():
    from fusion_engine.launchers._marshal import ExtensionMismatchError, check_codes

    if not backends()["cpp"].usable:
        pytest.skip("cpp unusable here")
    from fusion_engine import _C

    check_codes(_C)  # the built extension agrees with _marshal.py
    stale = type("Stale", (), {"__name__": "fusion_engine._C", "DTYPE_CODES": {**_C.DTYPE_CODES, "float16": 2},
                               "CONSENSUS_CODES": _C.CONSENSUS_CODES, "RESCALE_CODES": _C.RESCALE_CODES})
    with pytest.raises(ExtensionMismatchError, match="DTYPE_CODES.*rebuild"):
        check_codes(stale)


def test_bindings_take_keywords_only():
    if not backends()["cpp"].usable:
        pytest.skip("cpp unusable here")
    from fusion_engine import _C

    out = torch.empty(2)
    with pytest.raises(TypeError):  # positional arguments (e.g. two swapped booleans) are refused
        _C.magnitude_mask(out.data_ptr(), out.data_ptr(), 0, 2, 1, True, 1)


def test_only_dispatch_reaches_the_kernels():
    """No module but _dispatch reads the backend variable; only the launchers import the extensions;
    kernels and launchers import nothing from ops or _dispatch."""
    import pathlib
    import re

    root = pathlib.Path(fusion_engine.__file__).parent
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        if rel != "_dispatch.py":
            assert "FUSION_ENGINE_BACKEND\")" not in text and "environ.get(\"FUSION_ENGINE_BACKEND" not in text, rel
            assert "_probe" not in text, rel
        if not rel.startswith("launchers/"):
            assert not re.search(r"import _C(_cuda)?\b|from \.+ import _C", text), rel
        if rel.startswith(("launchers/", "triton_kernels/")):
            assert not re.search(r"^from (fusion_engine|\.\.)\.?(ops|_dispatch)", text, re.M), rel
