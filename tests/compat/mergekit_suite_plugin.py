"""pytest plugin (``-p mergekit_suite_plugin``) that runs a test session with fusion_engine installed
into mergekit: ``fusion_engine.compat.mergekit.install()`` before collection; the report header
names the methods installed. Used by test_mergekit_suite.py."""

import fusion_engine.compat.mergekit as fe_mergekit


def pytest_configure(config):
    fe_mergekit.install()


def pytest_report_header(config):
    return f"fusion_engine installed into mergekit for: {', '.join(fe_mergekit.installed())}"

