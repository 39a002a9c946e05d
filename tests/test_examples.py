"""The documentation runs: every runnable example, and the README's quickstart.

An example is runnable when it has an ``if __name__ == "__main__":`` entry;
it is run as ``python examples/NAME.py`` from the repository root, as the docs
say, and must exit 0 within its timeout.  Where a code block ``print``s
something with a trailing ``# expected output`` comment, the output must
match those comments, in order.  Any hub daemon an example autostarts is
stopped afterwards.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ipcbus.busdir import BusDir

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0

# Scripts that join a hub someone else runs; examples/hub_pair.py runs them.
_NEEDS_HUB = "run by examples/hub_pair.py"
_RUNNABLE = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)


def runnable_examples() -> list[Path]:
    """The examples with a ``__main__`` entry."""
    return sorted(
        p
        for p in (REPO / "examples").glob("*.py")
        if _RUNNABLE.search(p.read_text()) and _NEEDS_HUB not in p.read_text()
    )


def expected_output(code: str) -> list[str]:
    """The ``# comment`` after each ``print(...)`` call, in order: what the code should print."""
    out: list[str] = []
    for line in code.splitlines():
        m = re.match(r"\s*print\(.*\)\s*#\s?(.*)$", line)
        if m:
            out.append(m.group(1).rstrip())
    return out


def readme_quickstart() -> str:
    """The first ```python block after the README's "Quickstart" heading."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Quickstart")
    m = re.search(r"```python\n(.*?)```", text[start:], re.DOTALL)
    assert m is not None, "README.md has no ```python block under ## Quickstart"
    return m.group(1)


def _live_hubs(root: Path) -> dict[str, int]:
    hubs: dict[str, int] = {}
    if not root.is_dir():
        return hubs
    for d in root.iterdir():
        if d.is_dir() and (d / "hub.pid").exists():
            pid = BusDir(d.name, root=root).hub_pid()
            if pid is not None:
                hubs[d.name] = pid
    return hubs


def _stop(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a daemon hub (not our child) and wait until it is gone."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        select.select([fd], [], [], timeout)  # a pidfd turns readable when the process exits
    finally:
        os.close(fd)


def run_python(args: list[str], *, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` from the repository root; stop any hub daemon it left running."""
    root = Path(os.environ["IPCBUS_DIR"])
    before = _live_hubs(root)
    try:
        return subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    finally:
        for name, pid in _live_hubs(root).items():
            if before.get(name) != pid:
                _stop(pid)


def test_expected_output_parser() -> None:
    code = 'x = 1\nprint(x)  # 1\nprint("no comment")\n    print(f(y))   # {\'a\': 2}\n'
    assert expected_output(code) == ["1", "{'a': 2}"]


@pytest.mark.parametrize("path", runnable_examples(), ids=lambda p: p.name)
def test_example_runs(path: Path) -> None:
    res = run_python([str(path.relative_to(REPO))])  # fails past TIMEOUT
    assert res.returncode == 0, f"{path.name} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    want = expected_output(path.read_text())
    if want:
        got = res.stdout.splitlines()
        assert _in_order(want, got), f"{path.name}: expected {want} in order, got {got}"


def _in_order(want: list[str], got: list[str]) -> bool:
    it = iter(got)
    return all(any(line.strip() == w for line in it) for w in want)


def test_readme_quickstart_runs() -> None:
    code = readme_quickstart()
    ast.parse(code)  # a syntax error fails here, with a clear message
    want = expected_output(code)
    assert want, "the quickstart should show what it prints in # comments"
    res = run_python(["-c", code])
    assert res.returncode == 0, f"README quickstart exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    assert res.stdout.splitlines() == want, res.stdout
