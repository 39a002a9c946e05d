"""Parent-side helpers of the fault-injection suite: processes, watches, kernel tables.

Clients are :mod:`tests.faults.agent` children driven through
:class:`tests.hub_client.Peer`; a hub is embedded in the test process
(``ipcbus.Hub``) when the fault hits a client, or runs as a child
(``python -m ipcbus hub NAME``) when the fault hits the hub or when the
test inspects the hub's ``/proc`` entry.  Events are ordered by the
children's output lines, flush round trips, link-closed callbacks and pidfds.
The only polling is :func:`settle`, which waits for kernel tables and
``/proc`` counters to reach a value *after* the events (as the root
conftest's leak check does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

# pytest puts tests/ on sys.path (tests/ has no __init__.py): the same module test_hub uses.
from hub_client import HubProc, Peer, wait_gone
from hub_client import hub_proc as _hub_proc
from hub_client import start_hub as _start_hub

import ipcbus
from ipcbus.busdir import BusDir
from ipcbus.node import LinkState
from ipcbus.sysv import proc_table

REPO = Path(__file__).resolve().parents[2]
TRANSPORTS = ("fifo", "sysv", "shm")
BOUND = 10.0
"""Seconds within which every blocked call must fail with a clear error (their own
timeouts are 60 s, so an answer inside the bound is the fault's doing, not a timeout)."""

__all__ = [
    "BOUND",
    "REPO",
    "TRANSPORTS",
    "HubProc",
    "LinkWatch",
    "Peer",
    "acked_beyond",
    "acked_in",
    "agents",
    "assert_clean",
    "bus_leftovers",
    "elapsed_until",
    "hub_proc",
    "intact",
    "link_of",
    "ls_json",
    "other",
    "posix_sems",
    "proc_counts",
    "rest",
    "settle",
    "spawn_agent",
    "start_hub",
    "sysv_ids",
    "sysv_of",
    "wait_gone",
    "wait_stopped",
]


def other(transport: str) -> str:
    """A transport different from ``transport`` (for the bystander clients)."""
    return "fifo" if transport != "fifo" else "sysv"


# -- clients -----------------------------------------------------------------------


async def spawn_agent(bus: str, transport: str = "fifo", *args: str, connected: bool = True) -> Peer:
    """Start a ``tests.faults.agent`` child on ``bus``; with ``connected``, wait until it is linked."""
    # stderr into a file, never a pipe: a child that logs a lot must not block on it.
    err = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the Peer, closed when reaped
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.faults.agent", bus, "--transport", transport, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=REPO,
    )  # fmt: skip
    peer = Peer(proc, err)
    if connected:
        try:
            peer.info = await peer.expect("connected")
        except BaseException:
            await peer.kill()
            raise
    return peer


@contextlib.asynccontextmanager
async def agents(bus: str, *transports: str, args: tuple[str, ...] = ()) -> AsyncIterator[list[Peer]]:
    """One connected agent per transport named; each is reaped (killed if need be) on exit."""
    started: list[Peer] = []
    try:
        for t in transports:
            started.append(await spawn_agent(bus, t, *args))
        yield started
    finally:
        for p in started:
            if p.proc.returncode is None:
                await p.quit()
            else:
                with contextlib.suppress(Exception):
                    p.stderr.close()


async def rest(peer: Peer, timeout: float = BOUND) -> list[dict[str, Any]]:
    """Every event ``peer`` printed that was not consumed yet, up to its exit (it must be dying)."""
    events = list(peer.backlog)
    peer.backlog.clear()
    assert peer.proc.stdout is not None
    async with asyncio.timeout(timeout):
        while line := await peer.proc.stdout.readline():
            events.append(json.loads(line))
    return events


async def elapsed_until(t0: float, aw: Any) -> tuple[Any, float]:
    """Await ``aw`` (bounded by :data:`BOUND`); return its result and seconds since ``t0``."""
    async with asyncio.timeout(BOUND):
        result = await aw
    return result, time.monotonic() - t0


async def wait_stopped(pid: int) -> None:
    """Wait until our child ``pid`` is stopped (SIGSTOP delivered), without reaping it."""
    await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)


def acked_in(events: list[dict[str, Any]], src: str, floor: int = 0) -> int:
    """The highest ``acked`` count of ``src`` among a streamer's events (at least ``floor``)."""
    return max([floor] + [int(e["n"]) for e in events if e.get("ev") == "acked" and e.get("src") == src])


def intact(summary: dict[str, Any]) -> None:
    """No gap, duplicate, reordering or corrupted payload in a checker's summary."""
    assert summary["gaps"] == 0 and summary["dups"] == 0 and summary["corrupt"] == 0, summary


async def acked_beyond(peer: Peer, src: str, more: int) -> int:
    """Wait until a streaming ``peer`` has been acknowledged ``more`` messages beyond now.

    Returns the last acknowledged count read (its ``acked`` events are consumed).
    """
    mark = n = int((await peer.expect("acked", src=src))["n"])
    while n < mark + more:
        n = int((await peer.expect("acked", src=src))["n"])
    return n


# -- an embedded hub ---------------------------------------------------------------


class LinkWatch:
    """Records the links a hub's node drops: peer pid -> (close reason, monotonic time)."""

    def __init__(self, hub: ipcbus.Hub) -> None:
        self.closed: dict[int | None, tuple[str, float]] = {}
        self._changed = asyncio.Event()
        hub.node.on_link_closed.append(self._on_closed)

    def _on_closed(self, ls: LinkState) -> None:
        self.closed[ls.link.info.peer_pid] = (ls.close_reason, time.monotonic())
        self._changed.set()

    async def wait(self, pid: int, timeout: float = BOUND) -> tuple[str, float]:
        """The close reason of ``pid``'s link and when it closed (waits for it)."""
        async with asyncio.timeout(timeout):
            while pid not in self.closed:
                self._changed.clear()
                await self._changed.wait()
        return self.closed[pid]


def link_of(hub: ipcbus.Hub, pid: int) -> dict[str, Any]:
    """The hub's stats entry for the link of client ``pid``."""
    for lk in hub.stats()["links"]:
        if lk.get("peer_pid") == pid:
            return dict(lk)
    raise AssertionError(f"the hub has no link to pid {pid}")


# -- a hub child -------------------------------------------------------------------


async def start_hub(name: str, transports: str = "fifo,sysv,shm") -> HubProc:
    """Start a hub child on every transport and wait for its "serving" line."""
    return await _start_hub(name, transports)


def hub_proc(name: str, transports: str = "fifo,sysv,shm") -> AbstractAsyncContextManager[HubProc]:
    """A hub child for the block; SIGKILLed on exit if the test did not stop it."""
    return _hub_proc(name, transports, stop_signal=signal.SIGKILL)


# -- what is left ------------------------------------------------------------------


def sysv_ids() -> set[tuple[str, int]]:
    """Every SysV object on the host as (kind, id), from /proc/sysvipc."""
    return {(kind, ident) for kind in ("msg", "shm", "sem") for ident in proc_table(kind)}


def sysv_of(pids: set[int]) -> set[tuple[str, int]]:
    """SysV queues and segments that processes ``pids`` created or last used (from /proc/sysvipc).

    Lets a test count its own objects while other programs on the host make theirs.
    """
    cols = {"msg": ("lspid", "lrpid"), "shm": ("cpid", "lpid")}
    out: set[tuple[str, int]] = set()
    for kind, wanted in cols.items():
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
            head = lines[0].split()
            for line in lines[1:]:
                row = dict(zip(head, line.split(), strict=False))
                if any(int(row[c]) in pids for c in wanted):
                    out.add((kind, int(row[head[1]])))
    return out


def posix_sems(pids: set[int] | None = None) -> set[str]:
    """ipcbus's POSIX named semaphores in /dev/shm (``sem.ipcbus.<creator pid>.*``).

    With ``pids``, only those that these processes created.
    """
    with contextlib.suppress(OSError):
        names = {n for n in os.listdir("/dev/shm") if n.startswith("sem.ipcbus.")}
        if pids is None:
            return names
        return {n for n in names if n.split(".")[2].isdigit() and int(n.split(".")[2]) in pids}
    return set()


def bus_leftovers(name: str) -> list[str]:
    """What a bus folder still holds that a clean shutdown removes: FIFOs, pid file, records."""
    bd = BusDir(name)
    left: list[str] = []
    if not bd.path.is_dir():
        return left
    for dirpath, _dirs, files in os.walk(bd.path):
        for f in files:
            p = Path(dirpath) / f
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                rel = str(p.relative_to(bd.path))
                if stat.S_ISFIFO(st.st_mode) or rel == "hub.pid" or rel.startswith("objects/"):
                    left.append(rel)
    return sorted(left)


def proc_counts(pid: int) -> dict[str, int]:
    """Open fds and threads of process ``pid`` (from /proc)."""
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


async def settle(check: Callable[[], bool], timeout: float = BOUND) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes; return whether it held.

    Only for kernel tables and /proc counters, which give no event when they
    change (a process's fd count, /proc/sysvipc); never to order test events.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def assert_clean(bus: str, sysv_before: set[tuple[str, int]]) -> None:
    """Wait (bounded) until no new SysV object and nothing in the bus folder is left; assert it."""
    ok = await settle(lambda: not (sysv_ids() - sysv_before) and not bus_leftovers(bus))
    assert ok, f"left behind: SysV {describe_sysv(sysv_ids() - sysv_before)}, bus folder {bus_leftovers(bus)}"


def describe_sysv(ids: set[tuple[str, int]]) -> list[str]:
    """The /proc/sysvipc rows of ``ids`` (creator pid, nattch...), for a failure message."""
    out: list[str] = []
    for kind in ("msg", "shm", "sem"):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
            head = lines[0].split()
            for line in lines[1:]:
                row = dict(zip(head, line.split(), strict=False))
                if (kind, int(row[head[1]])) in ids:
                    out.append(f"{kind} {row}")
    return out


async def ls_json(bus: str) -> dict[str, Any]:
    """``ipcbus ls --bus BUS --json``, parsed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ipcbus", "ls", "--bus", bus, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    return dict(json.loads(out))
