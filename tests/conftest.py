"""Shared test set-up: import paths, and the rule that CI never skips a lab test."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT / "services", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Tests that need the real engine or root may skip on a laptop without them, but
# in CI such a skip would hide that nothing was tested: it counts as a failure.
_MUST_RUN_IN_CI = ("docker", "netns", "vm")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and any(item.get_closest_marker(m) for m in _MUST_RUN_IN_CI):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which must run it: {reason}"
