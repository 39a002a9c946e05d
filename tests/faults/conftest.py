"""Fixtures of the fault-injection suite, and the recorder behind docs/reliability.md.

Each scenario test calls ``record(scenario=..., transport=..., sent=..., ...)``
with what it measured; the values travel in the test report's
``user_properties``.  When ``$IPCBUS_FAULTS_RESULTS`` names a file, one JSON
line per test (its id, outcome over all phases — the root conftest's leak
check included — and the recorded values) is appended to it;
``python -m tests.faults.report`` runs the suite that way and renders the
results.  The root conftest's leak checks apply to every test here.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

RESULTS_ENV = "IPCBUS_FAULTS_RESULTS"

_names = itertools.count()
_state: dict[str, dict[str, Any]] = {}


@pytest.fixture
def bus_name() -> str:
    """A bus name no other test uses."""
    return f"f{os.getpid()}-{next(_names)}"


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(**values)``: add measured values to this test's row in docs/reliability.md."""

    def add(**values: Any) -> None:
        request.node.user_properties.append(("fault", values))

    return add


def _outcome(report: pytest.TestReport) -> str | None:
    if report.failed:
        return "failed" if report.when == "call" else f"error in {report.when}"
    if report.skipped:
        return "xfailed" if hasattr(report, "wasxfail") else "skipped"
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect each test's outcome over setup, call and teardown; write it after teardown."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    st = _state.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0, "values": {}})
    st["duration"] += report.duration
    bad = _outcome(report)
    if bad is not None and st["outcome"] == "passed":
        st["outcome"] = bad
        if report.failed:
            st["error"] = str(report.longreprtext).strip().splitlines()[-1:] or [""]
        elif hasattr(report, "wasxfail"):
            st["xfail_reason"] = report.wasxfail
    if report.when != "teardown":
        return
    for key, values in report.user_properties:
        if key == "fault":
            st["values"].update(values)
    line = {"id": report.nodeid, **_state.pop(report.nodeid)}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
