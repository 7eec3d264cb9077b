"""fusion_engine.compat.scipy: scipy's linear_sum_assignment, on fusion_engine's solver.

scipy's own tests of the function (shipped in the scipy wheel) pass with it patched in; the
arguments, results (ties included) and errors are scipy's on the inputs scipy users pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import scipy
import scipy.optimize
import torch

from fusion_engine.compat import scipy as fe_scipy

ROOT = Path(__file__).resolve().parents[2]
SCIPY_TESTS = Path(scipy.__file__).parent / "optimize" / "tests" / "test_linear_assignment.py"


def _outcomes(report: Path, *plugin: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "compat")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin, f"--junitxml={report}",
                          "-o", "addopts=", str(SCIPY_TESTS)], cwd=report.parent, env=env, capture_output=True,
                         text=True, timeout=600)
    assert not plugin or "fusion_engine patched into scipy: True" in run.stdout, run.stdout[-2000:]
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kind
    return outcomes


def test_scipys_own_tests_pass_with_fusion_engine_patched_in(tmp_path):
    if not SCIPY_TESTS.is_file():
        pytest.skip(f"this scipy ships no tests ({SCIPY_TESTS})")
    plain = _outcomes(tmp_path / "plain.xml")
    patched = _outcomes(tmp_path / "patched.xml", "-p", "scipy_suite_plugin")
    passing = {name for name, kind in plain.items() if kind == "passed"}
    assert len(passing) > 20, plain
    broken = sorted(name for name in passing if patched.get(name) != "passed")
    assert not broken, broken


@pytest.mark.parametrize("maximize", [False, True, 1, 0, "yes", None])
def test_same_pairs_as_scipy_on_tie_heavy_inputs(maximize):
    rng = np.random.default_rng(7)
    for trial in range(40):
        n, m = rng.integers(1, 12, size=2)
        cost = rng.integers(0, 3, size=(n, m))
        if trial % 4 == 1:
            cost = cost.astype(bool)
        elif trial % 4 == 2:
            cost = cost / 4 + 0.125
        expected = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
        got = fe_scipy.linear_sum_assignment(cost.tolist() if trial % 4 == 3 else cost, maximize=maximize)
        for e, g in zip(expected, got):
            assert g.dtype == np.int64 and np.array_equal(e, g), (trial, cost)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_inputs_and_errors_as_in_scipy():
    ours, theirs = fe_scipy.linear_sum_assignment, scipy.optimize.linear_sum_assignment
    for good in (np.matrix([[1, 2], [3, 0]]), np.array([[2**64 - 1, 0], [0, 1]], dtype=np.uint64),
                 np.identity(3, dtype=np.float16), [[]], np.empty((0, 4)), torch.tensor([[3.0, 1.0], [1.0, 3.0]])):
        expected = theirs(good.numpy() if isinstance(good, torch.Tensor) else good)
        got = ours(good)
        assert all(np.array_equal(e, g) for e, g in zip(expected, got)), good
    for bad in ([1, 2, 3], 3.0, np.zeros((2, 2, 2)), np.identity(3).astype(str), np.identity(2) * 1j,
                np.array([[1, 2], [3, 4]], dtype=object), np.diag([np.nan, 1.0]), np.diag([1.0, -np.inf]),
                np.array([[np.inf, np.inf], [1.0, 2.0]])):
        with pytest.raises(Exception) as scipy_error:
            theirs(bad)
        with pytest.raises(scipy_error.type) as our_error:
            ours(bad)
        assert str(scipy_error.value) in str(our_error.value), (bad, scipy_error.value, our_error.value)


def test_patch_and_unpatch():
    original = scipy.optimize.linear_sum_assignment
    try:
        fe_scipy.patch()
        fe_scipy.patch()  # idempotent
        assert fe_scipy.is_patched() and scipy.optimize.linear_sum_assignment is fe_scipy.linear_sum_assignment
        from scipy.optimize import linear_sum_assignment
        assert linear_sum_assignment is fe_scipy.linear_sum_assignment
    finally:
        fe_scipy.unpatch()
    assert not fe_scipy.is_patched() and scipy.optimize.linear_sum_assignment is original
    fe_scipy.unpatch()  # no-op
