"""Suite-wide fixtures: both event loops, an isolated bus directory, leak checks.

Every test runs under the default asyncio loop and under uvloop (pytest-asyncio's
``pytest_asyncio_loop_factories`` hook), except tests marked ``single_loop``.

After each test the ``no_leaks`` fixture checks that the test left no SysV
message queue, shared-memory segment or semaphore set, no /dev/shm file, no
FIFO under the bus directory, no thread and no child process behind.  A leak
fails the test (and is cleaned up, so one leak does not cascade).  The session
adopts orphaned descendants (``PR_SET_CHILD_SUBREAPER``), so a detached
process a test left running (a daemon, a grandchild) counts as a child too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from ipcbus.testing import own_kernel_objects, remove_kernel_objects

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

# One private bus directory for the whole session; tests never touch the user's.
_BUS_ROOT = tempfile.mkdtemp(prefix="ipcbus-test-")
os.chmod(_BUS_ROOT, 0o700)
os.environ["IPCBUS_DIR"] = _BUS_ROOT
# Removed at the session's end (pytest_sessionfinish), and at exit when no
# session ran (a usage error); not by a forked child leaving.
_SUITE_PID = os.getpid()
atexit.register(lambda: os.getpid() == _SUITE_PID and shutil.rmtree(_BUS_ROOT, ignore_errors=True))
REPO = Path(__file__).resolve().parent.parent

# Hypothesis's per-example deadline (200 ms) measures this shared 2-CPU
# machine's load, not the code: off (performance is for `make bench`).
settings.register_profile("ipcbus", deadline=None)
settings.load_profile("ipcbus")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "single_loop: run under uvloop only (heavy multi-process test)")


_ROOT_ONLY = ("chown(", "setpriv", "setresuid", "setuid(", "os.setgid", "IPC_SET")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that impersonate another user need root; elsewhere they are skipped, saying so."""
    if os.geteuid() == 0:
        return
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            continue
        if any(marker in src for marker in _ROOT_ONLY):
            item.add_marker(pytest.mark.skip(reason="needs root to act as another user"))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {}
    if item.get_closest_marker("single_loop") is None or uvloop is None:
        factories["asyncio"] = asyncio.new_event_loop
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


# -- leak checks -------------------------------------------------------------


def fifos_under(root: str) -> set[str]:
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with contextlib.suppress(OSError):
                if stat.S_ISFIFO(os.lstat(p).st_mode):
                    found.add(p)
    return found


def _become_subreaper() -> None:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER) instead of leaving them to init.

    A hub a test started with ``--daemon``, or a pool worker whose parent
    process a test killed, is re-parented to this process when its parent
    exits, so the leak check sees it (and kills it) if it is still running
    after the test.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


_become_subreaper()


def children() -> set[int]:
    """Running child processes of this process (adopted orphans included); zombies are reaped."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    running: set[int] = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X"):
            # Exited: an adopted orphan nobody else will wait for, or a child
            # the test did not wait for.  Either way it runs no more.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        else:
            running.add(pid)
    return running


_IGNORED_THREADS = ("AnyIO worker thread", "asyncio_", "ThreadPoolExecutor", "Dummy-")


def threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith(_IGNORED_THREADS)
    }


def _settle(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling the kernel's tables after the test; not ordering test events


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves kernel objects, FIFOs, threads or children behind."""
    from ipcbus.testing import host_lock

    # Another test session or a benchmark at the same time would look like a leak.
    with host_lock():
        yield from _leak_checked()


def _leak_checked() -> Iterator[None]:
    before_objects = own_kernel_objects()
    before_fifos = fifos_under(_BUS_ROOT)
    before_kids = children()
    before_threads = threads()
    yield
    problems: list[str] = []

    if not _settle(lambda: not (children() - before_kids)):
        kids = children() - before_kids
        problems.append(f"child processes left running: {sorted(kids)}")
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    if not _settle(lambda: not (threads() - before_threads)):
        problems.append(f"threads left running: {sorted(t.name for t in threads() - before_threads)}")
    if not _settle(lambda: not (own_kernel_objects() - before_objects), 2.0):
        leaked = own_kernel_objects() - before_objects
        problems.append(f"SysV objects or /dev/shm files left behind: {sorted(leaked, key=str)}")
        remove_kernel_objects(leaked)
    if not _settle(lambda: not (fifos_under(_BUS_ROOT) - before_fifos), 2.0):
        leaked_f = fifos_under(_BUS_ROOT) - before_fifos
        problems.append(f"FIFOs left behind: {sorted(leaked_f)}")
        for p in leaked_f:
            with contextlib.suppress(OSError):
                os.unlink(p)
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def bus_root() -> str:
    """The session's private bus directory root ($IPCBUS_DIR)."""
    return _BUS_ROOT


@pytest.fixture
def python() -> str:
    """The interpreter running the suite (use it to spawn child processes)."""
    return sys.executable


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    shutil.rmtree(_BUS_ROOT, ignore_errors=True)
