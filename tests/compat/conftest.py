"""tests/compat: the ops-vs-mergekit / ops-vs-PEFT comparisons on the Triton interpreter run with the
slow tests (``pytest -m slow``). They repeat the cpp and torch comparisons on a backend whose every op
is checked against the torch reference in tests/ops, at about ten times the cost on a CPU."""

import pytest

from utils import device_for

OPS_VS_REFERENCE = ("test_ops_vs_mergekit.py", "test_ops_vs_peft.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (item.path.name in OPS_VS_REFERENCE and callspec is not None
                and callspec.params.get("backend") == "triton" and device_for("triton").type == "cpu"):
            item.add_marker(pytest.mark.slow)
