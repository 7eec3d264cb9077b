"""pytest plugin (``-p scipy_suite_plugin``): fusion_engine's linear_sum_assignment is patched into
scipy before any test module is collected, so that ``from scipy.optimize import linear_sum_assignment``
in scipy's own tests gets it."""

import scipy.optimize

from fusion_engine.compat import scipy as fe_scipy


def pytest_configure(config):
    fe_scipy.patch()
    assert scipy.optimize.linear_sum_assignment is fe_scipy.linear_sum_assignment


def pytest_report_header(config):
    return f"fusion_engine patched into scipy: {fe_scipy.is_patched()}"
