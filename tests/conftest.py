"""Test configuration: the triton interpreter on CPU, backend parametrization, GPU marker, hypothesis.

* Without a CUDA GPU, ``TRITON_INTERPRET=1`` is set before anything imports triton, so the triton
  backend runs (slowly) on CPU tensors; tests keep its inputs to a few thousand elements.
* A test that takes a ``backend`` argument runs once per backend (triton, cuda, cpp, torch). A backend
  that is unusable here, or (for a test module declaring ``OP = "<op>"``) has no kernel for that op yet,
  is skipped with the reason; cuda parameters carry the ``gpu`` marker.
* ``@pytest.mark.gpu`` tests are skipped without CUDA.
* Hypothesis profiles: ``ci`` (default: few examples, no deadline, derandomized) and ``dev`` (more
  examples, random); choose with ``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import os


def _cuda_available() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# after TRITON_INTERPRET: the backends are probed lazily, then cached
from fusion_engine._dispatch import BACKENDS, backends  # noqa: E402

from utils import kernel_missing_reason  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def backend_params(op: str | None = None) -> list:
    """One ``pytest.param`` per backend, skipped (with the reason) where it cannot run here."""
    status = backends()
    params = []
    for name in BACKENDS:
        marks = [pytest.mark.gpu] if name == "cuda" else []
        if not status[name].usable:
            marks.append(pytest.mark.skip(reason=f"backend {name} unusable: {status[name].reason}"))
        elif op is not None:
            missing = kernel_missing_reason(op, name)
            if missing:
                marks.append(pytest.mark.skip(reason=missing))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def pytest_configure(config):
    # the triton interpreter evaluates masked-off lanes too (0/0 there is harmless): not our warning
    config.addinivalue_line(
        "filterwarnings", "ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter"
    )
    config.addinivalue_line(
        "filterwarnings", "ignore:overflow encountered:RuntimeWarning:triton.runtime.interpreter"
    )
    config.addinivalue_line(
        "filterwarnings", "ignore:divide by zero encountered:RuntimeWarning:triton.runtime.interpreter"
    )


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        op = getattr(metafunc.module, "OP", None)
        metafunc.parametrize("backend", backend_params(op))


# Tests that take many seconds each under the Triton CPU interpreter (native, and fast, on a GPU):
# their [triton] cases are marked slow without a GPU (run them with `pytest -m slow`).
SLOW_UNDER_TRITON_INTERPRETER = {"test_every_switch", "test_chunking", "test_matches_reference",
                                 "test_per_problem_convergence"}


# tests/compat's ops-vs-mergekit / ops-vs-PEFT comparisons repeat, on the Triton interpreter, the cpp and
# torch comparisons of a backend whose every op tests/ops checks against the reference: slow without a GPU
OPS_VS_REFERENCE_FILES = ("test_ops_vs_mergekit.py", "test_ops_vs_peft.py")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        name, _, params = item.name.partition("[")
        if params.startswith("triton") and (name in SLOW_UNDER_TRITON_INTERPRETER
                                            or item.path.name in OPS_VS_REFERENCE_FILES):
            item.add_marker(pytest.mark.slow)
