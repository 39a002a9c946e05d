"""WorkerPool: child processes connected to this process's node by anonymous pipes.

Each worker is a fresh interpreter (``python -m ipcbus.worker``; no fork of a
running event loop, nothing pickled) that receives its two pipe ends by
inheritance, builds its own node and :class:`~ipcbus.Bus`, and runs the
user's ``async def setup(bus)`` given as ``"module:function"``.  When setup
returns, the worker tells the parent it is ready; if setup raises, it sends
the error and exits, and :class:`WorkerPool` start fails with
:class:`~ipcbus.errors.WorkerStartError`.

A worker that dies is noticed at once (end of stream on its pipe): requests
in flight to it fail with :class:`~ipcbus.errors.WorkerCrashed`, and it is
restarted with exponential backoff.  A worker that dies again before its
setup finishes is not restarted forever: after ``max_start_failures``
consecutive failures it is reported (``pool.errors``, the log) and left down.
A worker whose parent dies sees end of stream and exits: no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import msgspec

from . import frames as fr
from .checks import MAX_NAME, check_count, check_env, check_name, check_path, check_seconds, split_target
from .client import Bus
from .errors import BusClosed, IpcBusError, NoResponders, RequestTimeout, WorkerStartError
from .gc import process_folder, reclaim_pools, remove_pool_dir
from .node import Key, LinkState, Node, SubscriptionCore, first_of, say_goodbye, shielded
from .spin import spin_window
from .stats import PoolStats, WorkerState
from .subjects import matches
from .transports.base import Link
from .transports.pipe import ChildPipes

__all__ = ["PoolTransport", "WorkerPool"]

log = logging.getLogger("ipcbus.pool")

PoolTransport = Literal["pipe", "shm", "sysv"]
"""What links a pool's parent to its workers (``WorkerPool(transport=)``)."""

_START_TIMEOUT = 30.0
# A worker in a slot that the pool is restarting, or will restart once it has
# exited ("retiring" in a slot: it was given SIGTERM, see on_notice in _spawn).
_COMING_BACK = ("crashed", "restarting", "starting", "retiring")
# The names of the pools running on each node: two of one name would give
# their workers the same names (in links, logs and errors).
_POOL_NAMES: weakref.WeakKeyDictionary[Node, set[str]] = weakref.WeakKeyDictionary()
_STOP_TIMEOUT = 5.0
_LINK_AFTER_EXIT = 1.0  # how long a worker's link may outlive its process (see _reap)
_EXIT_WAIT = 2.0  # how long a worker whose link ended may take to exit before it is killed
_STABLE_AFTER = 10.0  # seconds up after which a worker that dies is restarted at the first backoff again
_RETIRE_DRAIN = 30.0  # how long a worker being replaced or removed may take to answer what it took
_CHECK_EVERY = 0.1  # seconds between checks of max_messages (max_rss: every _RSS_EVERY)
_RSS_EVERY = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")
_HOLD_MAX = 10_000  # messages held per subscription of a worker being restarted


@dataclass(eq=False)  # compared (and hashed) by identity: two processes of one slot are two workers
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    link: LinkState | None = None
    starts: int = 0
    start_failures: int = 0
    crashes: int = 0
    started_at: float = 0.0
    ready_at: float = 0.0
    backoff: float = 0.0  # the wait before its last restart (doubles while it keeps dying)
    state: WorkerState = "starting"
    last_error: str = ""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    on_exit: Callable[[], None] | None = None  # for the current process, once it is reaped
    killed_for: str = ""  # why the pool killed the current process (it hung)
    served: tuple[str, ...] = ()  # the patterns it subscribed to when its link last ended
    recycles: int = 0
    msgs_at_ready: int = 0  # messages sent to it when it became ready (max_messages counts from there)
    successor: _Worker | None = None  # a fresh process starting to take its place (recycle)
    recycle_after: float = 0.0  # monotonic time before which it is not recycled again (a failed try)
    rss_exempt: bool = False  # over max_rss as it started: recycling it would not help
    spawning: asyncio.Event | None = None  # set once the start under way (_spawn) is over
    removed: bool = False  # out of its slot for good (replaced, or removed by a resize)
    # Stand-ins for its subscriptions while it is restarted, on a bus given to
    # the pool: what comes for them is held, and handed to it once it is back.
    holding: list[SubscriptionCore] = field(default_factory=list)


class WorkerPool:
    """A pool of worker processes on this process's node.

    ``target`` is ``"module:function"``, an ``async def setup(bus)`` that
    registers the worker's services and subscriptions.  Use as an async
    context manager; ``pool.bus`` publishes, subscribes and requests across
    every worker.  Requests to a service the workers serve in one queue group
    go to the least busy worker.

    ``transport`` is ``"pipe"`` (two anonymous pipes per worker, the default),
    ``"shm"`` (a shared-memory ring pair per worker, for large payloads;
    ``ring_size`` bytes per direction) or ``"sysv"`` (two System V message
    queues per worker, :class:`~ipcbus.transports.sysv.SysvPairLink`).  ``spin_us`` is the busy-poll window
    while replies are due, in the parent and every worker (:mod:`ipcbus.spin`).

    A request on :attr:`bus` to a service whose workers are being restarted
    waits for them, within its timeout (on a bus given with ``bus=``,
    requests from other processes too: the pool holds them meanwhile).  A worker that dies is restarted
    after ``restart_backoff`` seconds,
    doubling up to ``max_backoff`` while it keeps dying (failing to start,
    or dying within 10 s of becoming ready); one that fails
    ``max_start_failures`` starts in a row is given up on (its error is in
    ``pool.errors`` and ``stats()``).  Workers run ``python`` (default: this
    interpreter) with ``env`` (default: this process's environment);
    ``max_frame`` bounds one message, ``name`` names the pool in logs and its
    workers ``<name>-<index>`` (at most 256 characters).

    ``bus`` puts the workers on the node of a bus this process has already
    (from :func:`~ipcbus.connect`, a :class:`~ipcbus.Hub`, another pool)
    instead of a node of the pool's own: they then reach, and are reached
    from, everything that bus reaches.  The pool's close leaves that bus open.

    ``hang_timeout`` (seconds, default ``None``: off) kills and restarts a
    worker whose event loop does not answer a ping for that long (a handler
    that blocks it, a deadlock, a stopped process); its requests in flight
    fail with :class:`~ipcbus.errors.WorkerCrashed`.  Only the time this
    process's own loop runs counts: a parent that stood still does not take
    its workers for hung.

    Workers can be replaced by fresh processes while the pool runs, one at a
    time, each new one ready before the old one stops taking work, so that no
    request fails for it (:meth:`recycle`; the old one answers what it took,
    for up to 30 s, then exits).  ``max_messages`` does so for a worker that
    was sent that many messages (requests and published messages; checked
    every 0.1 s, so a busy worker may take a few more), ``max_rss`` for one
    whose resident memory reached that many bytes (checked every second):
    plugins that leak run on.  :meth:`resize` changes the number of workers.
    """

    def __init__(
        self,
        target: str,
        workers: int = 4,
        *,
        name: str = "pool",
        transport: PoolTransport = "pipe",
        ring_size: int = 8 * 1024 * 1024,
        max_frame: int = fr.DEFAULT_MAX_FRAME,
        max_start_failures: int = 3,
        restart_backoff: float = 0.1,
        max_backoff: float = 5.0,
        python: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        spin_us: float | None = None,
        hang_timeout: float | None = None,
        bus: Bus | None = None,
        max_messages: int | None = None,
        max_rss: int | None = None,
    ) -> None:
        split_target(target)
        workers = check_count("workers", workers)
        if transport not in ("pipe", "shm", "sysv"):
            raise ValueError(f"unknown pool transport {transport!r}; use 'pipe', 'shm' or 'sysv'")
        if transport == "shm":
            from .transports.shm import check_ring_size

            ring_size = check_ring_size(ring_size)
        max_frame = check_count("max_frame", max_frame, fr.MIN_MAX_FRAME, "bytes", fr.MAX_MAX_FRAME)
        if bus is not None:
            if not isinstance(bus, Bus):
                raise TypeError(
                    f"bus must be an ipcbus.Bus (from connect(), a Hub, another pool), not {bus!r}"
                )
            if bus.node.max_frame != max_frame and max_frame != fr.DEFAULT_MAX_FRAME:
                raise ValueError(
                    f"max_frame={max_frame} differs from the max_frame of the bus given "
                    f"({bus.node.max_frame}); the workers take the bus's: leave max_frame out"
                )
            max_frame = bus.node.max_frame
        self.target = target
        # Each worker's node is named after the pool: "<name>-<index>".
        self.name = check_name("name", name, MAX_NAME - 1 - len(str(workers - 1)))
        self.transport = transport
        self.ring_size = ring_size
        self.max_frame = max_frame
        self.max_start_failures = check_count("max_start_failures", max_start_failures, 0)
        self.restart_backoff = check_seconds("restart_backoff", restart_backoff)
        self.max_backoff = check_seconds("max_backoff", max_backoff, infinite=True)
        self.python = check_path("python", python) or sys.executable
        self.env = check_env(env)
        self.spin_us = spin_window(spin_us)
        if hang_timeout is not None:
            hang_timeout = check_seconds("hang_timeout", hang_timeout)
            if not hang_timeout > 0:
                raise ValueError(
                    "hang_timeout must be more than 0 seconds (None: no hang detection), not 0"
                )
        self.hang_timeout = hang_timeout
        self.max_messages = None if max_messages is None else check_count("max_messages", max_messages)
        self.max_rss = None if max_rss is None else check_count("max_rss", max_rss, 1 << 20, "bytes")
        self.errors: list[str] = []
        self._changed = asyncio.Event()
        self._workers = [_Worker(i) for i in range(workers)]
        # Processes not in a slot: replacements starting, workers retiring.
        self._extra: list[_Worker] = []
        self._replacing = asyncio.Lock()  # one recycle or resize at a time
        self._node: Node | None = None
        self._bus: Bus | None = None
        self._shared = bus  # the bus whose node the workers join, if not one of our own
        self._stopping: asyncio.Future[None] | None = None  # the shutdown, once it started
        self._tg_cm: Any = None
        self._records: Path | None = None  # this process's pool records folder, once used
        self._reclaimed = False

    @property
    def bus(self) -> Bus:
        """The parent's bus: publish, subscribe, request across the workers
        (the bus given as ``bus=``, else one on the pool's own node)."""
        if self._bus is None:
            raise BusClosed("the pool is not started; use `async with WorkerPool(...)`")
        return self._bus

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait_ready(self, timeout: float | None = 30.0) -> None:
        """Wait until every worker that has not been given up on is ready again.

        Use after a crash to wait for the restart.  Raises ``TimeoutError``
        after ``timeout`` seconds (``None``: no limit), and
        :class:`~ipcbus.errors.BusClosed` for a pool not started or closing.
        """
        try:
            async with asyncio.timeout(timeout):
                while any(w.state not in ("ready", "failed") for w in self._workers):
                    self._check_running()
                    await self._changed.wait()
        except TimeoutError:
            waiting = [f"{w.index} ({w.state})" for w in self._workers if w.state not in ("ready", "failed")]
            raise TimeoutError(
                f"worker pool {self.name!r}: workers {', '.join(waiting)} not ready within {timeout:g} s"
            ) from None

    @property
    def size(self) -> int:
        """The number of workers it runs (``workers=``, then :meth:`resize`)."""
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        """Pids of the workers currently running."""
        return [w.proc.pid for w in self._workers if w.proc is not None and w.state == "ready"]

    def stats(self) -> PoolStats:
        """Per-worker state, restarts, crashes and recycles, the messages it was
        sent and its resident memory, plus the node's counters."""
        return {
            "workers": [
                {
                    "index": w.index,
                    "pid": w.proc.pid if w.proc else None,
                    "state": w.state,
                    "starts": w.starts,
                    "crashes": w.crashes,
                    "recycles": w.recycles,
                    "messages": w.link.messages_out - w.msgs_at_ready if w.link and w.state == "ready" else 0,
                    "rss": _rss(w.proc.pid) if w.proc and w.proc.returncode is None else None,
                    "last_error": w.last_error,
                }
                for w in self._workers
            ],
            "errors": list(self.errors),
            "node": self._node.stats() if self._node else None,
        }

    async def __aenter__(self) -> Self:
        if self._node is not None:
            raise RuntimeError(
                f"worker pool {self.name!r} was started already; a WorkerPool runs once: make a new one"
            )
        if self._shared is not None:
            # BusClosed for a bus not started or closed (not for a client
            # whose hub is away and that reconnects: its node goes on).
            Bus._check_open(self._shared)
            names = _POOL_NAMES.setdefault(self._shared.node, set())
            if self.name in names:
                raise ValueError(
                    f"a worker pool named {self.name!r} already runs on the node of this bus; "
                    "give each pool on a bus its own name (WorkerPool(..., name=...))"
                )
            self._node, self._bus = self._shared.node, self._shared
        else:
            self._node = Node(name=self.name, max_frame=self.max_frame, spin_us=self.spin_us)
            await self._node.start()
            self._bus = _PoolBus(self._node, self)
        _POOL_NAMES.setdefault(self._node, set()).add(self.name)
        self._node.on_link_closed.append(self._on_link_closed)
        try:
            with anyio.fail_after(_START_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    for w in self._workers:
                        tg.start_soon(self._start, w)
        except BaseException as exc:
            await self._shutdown()
            if isinstance(exc, TimeoutError):
                late = [str(w.index) for w in self._workers if w.state != "ready"]
                raise WorkerStartError(
                    f"worker(s) {', '.join(late)} of pool {self.name!r} did not finish "
                    f"{self.target!r} within {_START_TIMEOUT:g} s (a setup that never returns?)"
                ) from None
            if isinstance(exc, BaseExceptionGroup):
                raise _first(exc) from None
            raise
        if self.max_messages is not None or self.max_rss is not None:
            self._node.task_group.start_soon(self._recycler, name=f"ipcbus-recycler-{self.name}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Left because of a cancellation (a deadline, a failing sibling task):
        # no waiting for requests in flight, they fail at once.
        await self._shutdown(drain=not isinstance(exc, asyncio.CancelledError))

    @property
    def _closing(self) -> bool:
        """Whether the pool's shutdown started."""
        return self._stopping is not None

    @property
    def _start_failed(self) -> WorkerState:
        """The state of a worker whose start failed: given up on ("failed"), or
        cut short by the pool closing ("stopped")."""
        return "stopped" if self._closing else "failed"

    def _records_dir(self) -> Path | None:
        """Where the kernel objects made for a worker are recorded (see :mod:`ipcbus.gc`).

        Shm objects stay recorded until the worker attached, SysV queues until
        they are removed.  If this process dies meanwhile (and, for SysV, the
        worker too), ``ipcbus gc --all`` or the next pool that makes shm or
        SysV links removes them.  Also collects the folders of pools that
        died, once per pool.
        """
        try:
            bd = process_folder()
        except (IpcBusError, OSError) as exc:
            log.warning(
                "worker pool %r: cannot record its kernel objects (%s); if this process "
                "is killed while a worker starts, they stay behind",
                self.name,
                exc,
            )
            return None
        self._records = bd.path
        if not self._reclaimed:
            self._reclaimed = True
            try:
                for f in reclaim_pools(bd.root):
                    log.info("worker pool %r: gc %s", self.name, f)
            except Exception:  # collecting others' leftovers must never stop a start
                log.exception("worker pool %r: collecting dead pools' objects failed", self.name)
        return bd.path

    async def _spawn(self, w: _Worker, replacing: _Worker | None = None) -> None:
        """Start worker ``w`` and wait until its setup finished (or failed).

        ``replacing``: the worker whose slot ``w`` takes once ready (a recycle);
        it is withdrawn from routing at that moment (see :meth:`_replace`).
        A worker removed from the pool meanwhile (:meth:`resize`) is stopped
        again and raises :class:`~ipcbus.errors.WorkerStartError`.
        """
        done = w.spawning = asyncio.Event()
        try:
            await self._start_process(w, replacing)
        finally:
            w.spawning = None
            done.set()

    async def _start_within(self, w: _Worker, replacing: _Worker | None = None) -> None:
        """:meth:`_spawn`, within the start limit (:data:`_START_TIMEOUT`): a setup
        that takes longer is a failed start (:class:`~ipcbus.errors.WorkerStartError`)."""
        try:
            with anyio.fail_after(_START_TIMEOUT):
                await self._spawn(w, replacing)
        except TimeoutError:
            raise WorkerStartError(
                f"worker {w.index} of pool {self.name!r} failed to start {self.target!r}: "
                f"setup did not finish within {_START_TIMEOUT:g} s"
            ) from None

    async def _start_process(self, w: _Worker, replacing: _Worker | None) -> None:
        assert self._node is not None
        w.ready = asyncio.Event()
        w.exited = asyncio.Event()
        w.proc = None  # (the previous one is reaped: a late _reaped() of it must not set the new event)
        w.state = "starting"
        w.starts += 1
        link: Link
        sysv_link = None
        if self.transport == "sysv":
            # Two queues the parent makes; the child opens them by the keys in its argv.
            from .transports.sysv import SysvPairLink

            sysv_link, sysv_params = SysvPairLink.create(self._records_dir(), max_frame=self.max_frame)
            spec = "sysv:" + msgspec.json.encode(sysv_params).decode()
            pass_fds: tuple[int, ...] = ()
            pipes = None
        elif self.transport == "shm":
            # The parent creates the segment; the child attaches with the ids
            # from its argv, and the parent waits for that (or the child's death).
            from .transports.shm import ShmLink

            shm_link, params = ShmLink.create(
                self._records_dir(), ring_size=self.ring_size, max_frame=self.max_frame
            )
            spec = "shm:" + msgspec.json.encode(params).decode()
            pass_fds = ()
            pipes = None
        else:
            pipes = ChildPipes.create()
            spec = f"pipe:{pipes.child_r},{pipes.child_w}"
            pass_fds = pipes.child_fds
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "ipcbus.worker",
                spec,
                self.target,
                f"{self.name}-{w.index}",
                str(self.max_frame),
                str(os.getpid()),
                repr(self.spin_us),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=pass_fds,
                env=self.env,
            )
        except BaseException as exc:
            if pipes is not None:
                pipes.close()
            elif sysv_link is not None:
                await sysv_link.aclose()
            else:
                await shm_link.aclose()
            w.proc = None  # nothing started (an earlier process, if any, is reaped)
            w.exited.set()
            if isinstance(exc, OSError):  # no such interpreter, not executable, no fork...
                w.state = self._start_failed
                w.last_error = f"cannot run {self.python!r}: {exc}"
                raise WorkerStartError(
                    f"worker {w.index} of pool {self.name!r} failed to start: {w.last_error}"
                ) from exc
            raise
        w.proc = proc
        w.started_at = time.monotonic()
        if pipes is not None:
            link = pipes.parent_link(peer_pid=proc.pid, max_frame=self.max_frame)
        elif sysv_link is not None:
            link = sysv_link
            sysv_link.start(proc.pid)
        else:
            link = shm_link
            w.on_exit = None
            self._node.task_group.start_soon(self._reap, w, proc)
            try:
                with anyio.fail_after(_START_TIMEOUT):
                    await shm_link.wait_attached(peer_pid=proc.pid)
            except BaseException as exc:
                await shm_link.aclose()
                await w.exited.wait()
                w.state = self._start_failed
                w.last_error = f"worker never attached its shared-memory link: {exc}"
                raise WorkerStartError(
                    f"worker {w.index} of pool {self.name!r} failed to start "
                    f"{self.target!r}: {w.last_error} (exit code {proc.returncode})"
                ) from None
        if pipes is not None or sysv_link is not None:
            # A SysV worker killed outright leaves the queue it read: the parent removes it.
            w.on_exit = sysv_link.forget_peer if sysv_link is not None else None
            self._node.task_group.start_soon(self._reap, w, proc)
        failure: list[str] = []

        def on_notice(n: fr.Notice) -> None:
            if n.code == "ready":
                w.ready.set()
            elif n.code == "setup_failed":
                failure.append(n.message)
                w.ready.set()
            elif n.code == "stopping" and w.state == "ready" and not self._closing:
                # Given SIGTERM by someone else (an operator): it drains and exits,
                # then is restarted; requests for what it serves wait for that.
                w.state = "retiring"
                w.served = _served(ls)
                # What it withdraws as it drains is held for its successor.
                ls.on_unsub = lambda key: self._hold(w, ls, key)
                self._notify()

        try:
            ls = await self._node.add_link(
                link, name=f"{self.name}-{w.index}", crash_error="WorkerCrashed", wait=False, held=True
            )
        except BusClosed:
            raise
        ls.on_notice = on_notice
        w.link = ls
        async with anyio.create_task_group() as tg:
            if w.removed:  # by a resize, as it started: not waited for
                tg.cancel_scope.cancel()

            async def wait_ready() -> None:
                await w.ready.wait()
                tg.cancel_scope.cancel()

            async def wait_closed() -> None:
                await ls.closed.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait_ready)
            tg.start_soon(wait_closed)
        if w.ready.is_set() and not failure and ls.closed.is_set():
            # It went away between "ready" and now; _on_link_closed saw it
            # still starting and left it to us.
            failure.append(f"the worker's link closed right after setup ({ls.close_reason})")
        if replacing is not None and not failure and (
            self._closing or w.index >= len(self._workers) or self._workers[w.index] is not replacing
        ):
            failure.append("the pool closed while it started")
        if w.removed:
            # Removed from the pool as it started (while this waited, or
            # before): not left running.  (_retire_one waits for this.)
            await self._end_process(w, _EXIT_WAIT)
            raise WorkerStartError(f"worker {w.index} of pool {self.name!r} was removed as it started")
        if failure or not w.ready.is_set():
            if not failure:
                await w.exited.wait()
            reason = failure[0] if failure else f"worker exited with code {proc.returncode}"
            w.state = self._start_failed
            w.last_error = reason
            raise WorkerStartError(
                f"worker {w.index} of pool {self.name!r} failed to start {self.target!r}: {reason}"
            )
        w.state = "ready"
        w.ready_at = time.monotonic()
        w.start_failures = 0
        w.msgs_at_ready = ls.messages_out
        if self.max_rss is not None:
            rss = _rss(proc.pid)
            w.rss_exempt = rss is not None and rss >= self.max_rss
            if w.rss_exempt:  # a fresh process would be over it too: recycling would only repeat
                log.warning(
                    "pool %s: worker %d uses %d MiB as its setup finished, over max_rss=%d bytes: "
                    "it is not recycled for its memory (raise max_rss)",
                    self.name, w.index, (rss or 0) >> 20, self.max_rss,
                )
        if replacing is not None:
            self._workers[w.index] = w
            w.crashes, w.last_error = replacing.crashes, replacing.last_error  # (it may have died meanwhile)
        # Its services subscribed as its setup ran; it takes requests only now
        # that the setup is done.
        self._node.release(ls)
        if replacing is not None and replacing.link is not None:
            # No await since the release: each message goes to one of the two.
            # Released first, withdrawn second: the interest other nodes see
            # never drops to none in between.
            self._node.withdraw_link(replacing.link)
        self._unhold(w, ls)  # what came for it while it was restarted
        if replacing is not None:
            self._unhold(replacing, ls)
        self._notify()
        log.info("pool %s: worker %d ready (pid %d)", self.name, w.index, proc.pid)
        if self.hang_timeout is not None:
            watch = f"ipcbus-watch-{self.name}-{w.index}"
            self._node.task_group.start_soon(self._watch, w, ls, proc, name=watch)

    async def _watch(self, w: _Worker, ls: LinkState, proc: asyncio.subprocess.Process) -> None:
        """Ping ``w`` now and then; kill it if its loop leaves a ping unanswered
        for :attr:`hang_timeout` seconds of this process's running time."""
        assert self._node is not None and self.hang_timeout is not None
        node, limit = self._node, self.hang_timeout
        every = min(limit / 2, 1.0)
        step = min(limit / 4, 0.1)
        while not ls.closed.is_set():  # through a close's drain too: a hung worker would hold it
            try:
                token, pong = node.send_ping(ls)
            except IpcBusError:  # the link broke under the write: its close restarts the worker
                return
            waited = 0.0
            seen = ls.link.info.msgs_in
            try:
                while not pong.done() and waited < limit:
                    t = time.monotonic()
                    await asyncio.wait([pong], timeout=step)
                    if ls.link.info.msgs_in != seen:
                        # Frames still come from it: it runs, and its pong is
                        # behind them (a worker streaming to a slow reader here).
                        seen = ls.link.info.msgs_in
                        waited = 0.0
                    else:
                        # A step that took much longer means this loop stood still
                        # (and could not read the pong): that time does not count.
                        waited += min(time.monotonic() - t, 2 * step)
            finally:
                ls.pongs.pop(token, None)
            if not pong.done():
                break
            if pong.exception() is not None:  # the link closed: the usual crash path
                return
            await anyio.sleep(every)  # the ping interval
        if ls.closed.is_set() or w.link is not ls:
            return
        why = f"its event loop did not answer a ping for {limit:g} s (hung)"
        log.warning(
            "pool %s: worker %d (pid %d): %s, a handler that blocks it or a stopped process; "
            "killing it",
            self.name, w.index, proc.pid, why,
        )
        w.last_error = w.killed_for = why
        ls.ending = f"worker {w.index} was killed: {why}"
        _signal(proc, signal.SIGKILL)

    async def _start(self, w: _Worker) -> None:
        await self._spawn(w)

    async def _reap(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        with anyio.CancelScope(shield=self._closing):
            await proc.wait()
        self._reaped(w, proc)
        ls = w.link
        if ls is not None and w.proc is proc and not self._closing:
            # Gone, and its link normally ends with it (end of stream).  If it
            # does not, another process holds the link's other end (a copy of
            # a pipe fd the worker passed on): close it, so that its requests
            # fail now (WorkerCrashed) and it is restarted.
            with anyio.move_on_after(_LINK_AFTER_EXIT):
                await ls.closed.wait()
            if not ls.closed.is_set():
                log.warning(
                    "pool %s: worker %d (pid %d) exited but its link stayed open "
                    "(a process it started holds the other end); closing it",
                    self.name,
                    w.index,
                    proc.pid,
                )
                abort = getattr(ls.link, "abort", None)
                if abort is not None:
                    abort()
                else:
                    await ls.link.aclose()

    @staticmethod
    def _reaped(w: _Worker, proc: asyncio.subprocess.Process) -> None:
        """``proc``, ``w``'s current process, has exited: clean up after it, once."""
        if w.proc is proc and not w.exited.is_set():
            if w.on_exit is not None:
                w.on_exit()
            w.exited.set()

    def _check_running(self) -> Node:
        """The pool's node; :class:`~ipcbus.errors.BusClosed` for a pool not
        started, closing or closed, or whose bus closed."""
        if self._node is None:
            raise BusClosed(f"worker pool {self.name!r} is not started; use `async with WorkerPool(...)`")
        if self._closing:
            raise BusClosed(f"worker pool {self.name!r} is closed")
        if self._node.closed:
            raise BusClosed(f"the bus of worker pool {self.name!r} is closed: its workers are stopped")
        return self._node

    async def recycle(self, workers: int | Iterable[int] | None = None) -> None:
        """Replace workers with fresh processes, one at a time, without failing a request.

        ``workers``: an index or a list of them (default: every worker).  For
        each, a new process starts and runs the setup again (importing the
        target's module afresh: new plugin code takes effect); once it is
        ready it takes the slot, and the old process gets no more work,
        answers what it took (for up to 30 s) and exits.  A worker being
        restarted after a crash is skipped (it gets a fresh process anyway);
        one given up on (``failed``) is started again, so that once its
        plugin code is fixed, ``recycle()`` brings it back.

        Raises :class:`~ipcbus.errors.WorkerStartError` if a new process
        fails to start (the old one keeps serving; later workers are not
        recycled), :class:`~ipcbus.errors.BusClosed` for a pool not running,
        ``TypeError``/``ValueError`` for indexes that are not those of the
        pool's workers.
        """
        self._check_running()
        size = len(self._workers)
        if workers is None:
            indexes = list(range(size))
        else:
            given: Iterable[object] = [workers]  # one index (checked below, as each of a list)
            if isinstance(workers, Iterable) and not isinstance(workers, str | bytes):
                given = workers
            indexes = [check_count("worker index", i, 0) for i in given]
            wrong = [i for i in indexes if i >= size]
            if wrong:
                raise ValueError(
                    f"no worker {wrong[0]} in pool {self.name!r}: its workers are 0 to {size - 1}"
                )
        async with self._replacing:
            for i in indexes:
                self._check_running()
                w = self._workers[i] if i < len(self._workers) else None
                if w is not None and w.state == "ready":
                    await self._replace(w, "recycled")
                elif w is not None and w.state == "failed":
                    await self._revive(w)

    async def _revive(self, w: _Worker) -> None:
        """Start ``w``, given up on after failed restarts, once more (:meth:`recycle`)."""
        w.start_failures = 0
        try:
            await self._start_within(w)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._end_process(w, _EXIT_WAIT)
            w.state = self._start_failed
            raise
        log.info("pool %s: worker %d, given up on before, started again (pid %d)",
                 self.name, w.index, w.proc.pid if w.proc else -1)

    async def resize(self, workers: int) -> None:
        """Grow or shrink the pool to ``workers`` workers.

        New workers get the next indexes and start as at the pool's start; it
        returns once they are ready.  If one fails to start, the new ones are
        stopped again, the pool keeps its size and
        :class:`~ipcbus.errors.WorkerStartError` is raised.  Shrinking removes
        the workers with the highest indexes: they get no more work, answer
        what they took (for up to 30 s) and exit; it returns once they did.

        Raises ``TypeError``/``ValueError`` for a count that is not an int of
        1 or more (or that would make worker names too long), and
        :class:`~ipcbus.errors.BusClosed` for a pool not running.
        """
        n = check_count("workers", workers)
        check_name("name", self.name, MAX_NAME - 1 - len(str(n - 1)))
        self._check_running()
        async with self._replacing:
            self._check_running()
            have = len(self._workers)
            if n < have:
                gone = self._workers[n:]
                del self._workers[n:]
                self._notify()
                await self._retire(gone, "removed by resize()")
            elif n > have:
                new = [_Worker(i) for i in range(have, n)]
                self._workers.extend(new)
                self._notify()
                try:
                    with anyio.fail_after(_START_TIMEOUT):
                        async with anyio.create_task_group() as tg:
                            for w in new:
                                tg.start_soon(self._spawn, w)
                except BaseException as exc:
                    del self._workers[have:]
                    self._notify()
                    await self._retire(new, "stopped: resize() failed")
                    if self._closing:
                        raise BusClosed(
                            f"worker pool {self.name!r} closed while resize() started new workers"
                        ) from None
                    if isinstance(exc, TimeoutError):
                        raise WorkerStartError(
                            f"resize() of pool {self.name!r}: new workers did not finish "
                            f"{self.target!r} within {_START_TIMEOUT:g} s"
                        ) from None
                    raise _first(exc) if isinstance(exc, BaseExceptionGroup) else exc from None

    async def _replace(self, w: _Worker, why: str) -> None:
        """Start a fresh process for ``w``'s slot; once it is ready, retire ``w``.

        Raises :class:`~ipcbus.errors.WorkerStartError` if it fails to start:
        ``w`` keeps the slot (restarted as usual if it crashed meanwhile).
        """
        assert self._node is not None
        nw = _Worker(w.index, starts=w.starts, crashes=w.crashes, recycles=w.recycles + 1)
        w.successor = nw
        self._extra.append(nw)
        try:
            await self._start_within(nw, replacing=w)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._end_process(nw, _EXIT_WAIT)
            if w.state == "crashed" and self._keeps(w):
                self._node.task_group.start_soon(self._restart, w)  # it died meanwhile
            if self._closing and isinstance(exc, Exception):
                raise BusClosed(
                    f"worker pool {self.name!r} closed while worker {w.index} was recycled"
                ) from None
            raise
        finally:
            w.successor = None
            self._extra.remove(nw)
        log.info(
            "pool %s: worker %d %s: pid %s replaced by pid %s",
            self.name, w.index, why if w.state == "ready" else "(it ended meanwhile)",
            w.proc.pid if w.proc else None, nw.proc.pid if nw.proc else None,
        )
        if w.state == "ready":
            await self._retire([w], why)

    async def _retire(self, ws: list[_Worker], why: str) -> None:
        """Take workers no longer in a slot out of service, and wait until they exited.

        At once, they get no new work.  Then each answers what it took (up
        to :data:`_RETIRE_DRAIN` s), is told goodbye and exits (killed if it
        does not within :data:`_STOP_TIMEOUT` s).  That runs in the node's
        task group: a caller cancelled meanwhile does not cut it short, and
        the pool's close (which sees them in :attr:`_extra`) stops them too.
        """
        node = self._node
        assert node is not None
        for w in ws:
            w.state = "retiring"
            w.removed = True
            self._extra.append(w)
            self._unhold(w, None, f"worker {w.index} of pool {self.name!r} was {why} as it restarted")
            if w.link is not None:
                node.withdraw_link(w.link)
        done = anyio.Event()

        async def retire_all() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    for w in ws:
                        tg.start_soon(self._retire_one, w, why)
            finally:
                done.set()

        node.task_group.start_soon(retire_all, name=f"ipcbus-retire-{self.name}")
        await done.wait()

    async def _retire_one(self, w: _Worker, why: str) -> None:
        try:
            while True:
                ls = w.link
                if ls is not None and not ls.closed.is_set():
                    with anyio.move_on_after(_RETIRE_DRAIN):
                        while ls.inflight and not ls.closed.is_set():
                            await asyncio.sleep(0.01)  # as the pool's close drains: polled, off the hot path
                    ls.crash_error = "ConnectionClosed"
                    ls.ending = f"worker {w.index} of pool {self.name!r} was {why} before answering"
                    await say_goodbye([ls.link], f"worker {why}")
                elif w.proc is not None:
                    _signal(w.proc, signal.SIGTERM)  # still starting: it has no link to be told on
                await self._end_process(w, _STOP_TIMEOUT)
                if w.spawning is None:
                    break
                # A restart was under way (after a crash): the process it
                # starts sees the worker removed and stops; then look again.
                await w.spawning.wait()
        finally:
            self._extra.remove(w)
            w.state = "stopped"
            self._notify()

    async def _end_process(self, w: _Worker, grace: float) -> None:
        """Wait up to ``grace`` seconds for ``w``'s process to exit, then kill it."""
        proc = w.proc
        if proc is None:
            return
        if w.link is not None and not w.link.closed.is_set():
            await say_goodbye([w.link.link], "worker not needed")
        with anyio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            _signal(proc, signal.SIGKILL)
            await proc.wait()
        self._reaped(w, proc)

    async def _recycler(self) -> None:
        """Recycle workers past ``max_messages`` or ``max_rss``, one at a time."""
        rss_at = 0.0
        while not self._closing and self._node is not None and not self._node.closed:
            with anyio.move_on_after(_CHECK_EVERY):
                await self._changed.wait()  # (woken early by a close)
            now = time.monotonic()
            check_rss = self.max_rss is not None and now - rss_at >= _RSS_EVERY
            if check_rss:
                rss_at = now
            for w in list(self._workers):
                why = self._due(w, check_rss)
                if why is None or now < w.recycle_after or self._closing:
                    continue
                async with self._replacing:
                    if w not in self._workers or w.state != "ready" or self._closing:
                        continue
                    try:
                        await self._replace(w, why)
                    except Exception as exc:  # its replacement failed to start (or the pool closes)
                        # Never out of this task: it runs in the node's task
                        # group, whose failure would close the node (a bus given
                        # to the pool, too).
                        if self._closing or isinstance(exc, BusClosed):
                            return
                        w.recycle_after = time.monotonic() + min(max(self.max_backoff, 1.0), 60.0)
                        w.last_error = f"recycling it failed ({exc}); it keeps running"
                        log.warning("pool %s: %s", self.name, exc)

    def _due(self, w: _Worker, check_rss: bool) -> str | None:
        """Why ``w`` is to be recycled now (``None``: it is not)."""
        ls = w.link
        if w.state != "ready" or ls is None or w.proc is None:
            return None
        if self.max_messages is not None:
            sent = ls.messages_out - w.msgs_at_ready
            if sent >= self.max_messages:
                return f"recycled after {sent} messages (max_messages={self.max_messages})"
        if check_rss and self.max_rss is not None and not w.rss_exempt:
            rss = _rss(w.proc.pid)
            if rss is not None and rss >= self.max_rss:
                return f"recycled at {rss >> 20} MiB resident (max_rss={self.max_rss})"
        return None

    async def _wait_back(self, subject: str, deadline: float | None, timeout: float | None) -> bool:
        """A request on ``subject`` found no responder: if a worker that served
        it is being restarted, wait (until ``deadline``, loop time) for it.
        True once it is ready (try again); False when none is coming back.
        Raises :class:`~ipcbus.errors.RequestTimeout` at the deadline."""
        # By slot: a worker replaced meanwhile (recycle) is another object.
        slots = [
            w.index for w in self._workers
            if w.state in _COMING_BACK and any(matches(p, subject) for p in w.served)
        ]
        loop = asyncio.get_running_loop()
        while slots:
            waiting = [self._workers[i] for i in slots if i < len(self._workers)]
            if self._closing:
                raise BusClosed(
                    f"worker pool {self.name!r} closed while this request on {subject!r} "
                    "waited for its worker's restart"
                )
            if any(w.state == "ready" for w in waiting):
                return True
            if not any(w.state in _COMING_BACK for w in waiting):
                return False  # given up on
            changed = self._changed
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise RequestTimeout(subject, timeout if timeout is not None else 0.0)
            with anyio.move_on_after(left):
                await changed.wait()
        return False

    def _requests_to_workers(self, node: Node) -> list[asyncio.Future[fr.Msg]]:
        """The futures of this process's requests in flight to the workers
        (all of them on a node of the pool's own)."""
        futures = node.inbox.futures
        if self._shared is None:
            return list(futures.values())
        toward = {r for w in self._all() if w.link is not None for r in w.link.inflight}
        return [f for r, f in futures.items() if r in toward]

    def _all(self) -> list[_Worker]:
        """Every worker with a process: those in the slots, and those starting
        to replace one or retiring."""
        return [*self._workers, *self._extra]

    def _on_link_closed(self, ls: LinkState) -> None:
        for w in self._all():
            if w.link is ls:
                w.link = None
                # (Still known here: owners hear of a link's end before its interest goes.)
                if w.state != "retiring":  # (given SIGTERM: kept from before its services withdrew)
                    w.served = _served(ls)
                if self._closing or w.state not in ("ready", "retiring") or w not in self._workers:
                    return
                if self._node is not None and self._node.closed:
                    # The bus given to the pool closed under it: its workers
                    # see their links end and exit; nothing is restarted.
                    w.state = "stopped"
                    self._notify()
                    return
                w.state = "crashed"
                w.crashes += 1
                for key in list(ls.remote_keys):  # (still counted: owners hear first)
                    self._hold(w, ls, key)
                if w.successor is not None:
                    # A fresh process is starting for its slot: no restart (see _replace).
                    w.last_error = f"it ended as it was being replaced: {ls.close_reason}"
                    log.warning("pool %s: worker %d: %s", self.name, w.index, w.last_error)
                    return
                assert self._node is not None
                self._node.task_group.start_soon(self._restart, w)
                return

    def _hold(self, w: _Worker, ls: LinkState, key: Key) -> None:
        """``w``, to be restarted, stops serving ``key`` on ``ls`` (its link
        ended, or it drains after SIGTERM and withdrew it): on a bus given to
        the pool, subscribe a stand-in for it, so that what other processes
        send it waits for the new worker (requests would get
        ``NoResponders``, messages would be lost).  Called before the node
        forgets the interest: nothing changes upstream.

        A queue group's subscription is stood in for only while nobody else
        on the node has it (else the group's other members take the work; one
        that appears later takes it over, see :meth:`_watch_holding`); a plain
        one always (the worker's own copy of each message: other subscribers
        get theirs).  (On the pool's own bus, requests wait in
        :meth:`_wait_back` instead.)"""
        node = self._node
        if self._shared is None or node is None or node.closed or self._closing or w.removed:
            return
        if key[0].startswith("_INBOX.") or key in ls.held_keys:
            return  # its inbox, or interest not routed yet
        if any((c.subject, c.queue) == key for c in w.holding):
            return
        if key[1] is not None and node.announced(key) != 1:
            return
        core = node.subscribe(key[0], queue=key[1], max_pending=_HOLD_MAX)
        core.serving = True  # a request past _HOLD_MAX is refused at once (SlowConsumer)
        core.refusal = (
            f"{_HOLD_MAX} messages are held already for worker {w.index} of pool {self.name!r}, "
            f"which serves {key[0]!r} and is being restarted; retry once it is back"
        )
        w.holding.append(core)
        if len(w.holding) == 1:
            node.task_group.start_soon(self._watch_holding, w, ls, name=f"ipcbus-hold-{self.name}-{w.index}")

    async def _watch_holding(self, w: _Worker, ls: LinkState) -> None:
        """While ``w``'s stand-ins hold: a queue group's member that appears
        meanwhile (a sibling back from its restart, a new pool of a reload)
        takes over what is held for the group, and what comes next."""
        node = self._node
        assert node is not None
        while w.holding and not node.closed:
            # Woken when interest changes (a member appears) or the pool does
            # (the worker is back, given up on, removed; the pool closes).
            await first_of(node.interest_event(), self._changed)
            for core in [c for c in w.holding if c.queue is not None]:
                key = (core.subject, core.queue)
                own = key in ls.remote_keys and key not in ls.held_keys  # (the old link, still draining)
                if node.announced(key) - 1 - own > 0:
                    w.holding.remove(core)
                    why = (
                        f"worker {w.index} of pool {self.name!r} is being restarted, and the "
                        f"member of queue group {core.queue!r} that took over its work left"
                    )
                    self._release(core, None, why)

    def _unhold(self, w: _Worker, to: LinkState | None, why: str = "") -> None:
        """Remove ``w``'s stand-ins; hand what they held to ``to`` (its new link)."""
        cores, w.holding = w.holding, []
        for core in cores:
            self._release(core, to, why)

    def _release(self, core: SubscriptionCore, to: LinkState | None, why: str) -> None:
        """Remove stand-in ``core``; hand what it held to ``to``, else to another
        member of its queue group, else fail the requests among it
        (``ConnectionClosed``, ``why``).  A plain subscription's copies go
        nowhere else (other subscribers had theirs)."""
        node = self._node
        if node is None or node.closed:
            return
        node.unsubscribe(core)
        while core.pending:
            m = core.pending.popleft()
            if to is not None:
                node.hand_to(to, m, core.queue)
            elif core.queue is not None and not node.route_to_group(m, core.queue) and m.reply is not None:
                node.closed_status(m.reply, "ConnectionClosed", why)

    def _keeps(self, w: _Worker) -> bool:
        """Whether ``w`` is to be restarted: the pool and its node run, and ``w``
        still has its slot (not removed by :meth:`resize`)."""
        return not self._closing and not (self._node is not None and self._node.closed) and w in self._workers

    async def _restart(self, w: _Worker) -> None:
        if w.backoff and time.monotonic() - w.ready_at < _STABLE_AFTER:
            delay = min(w.backoff * 2, self.max_backoff)  # it died soon after its last restart
        else:
            delay = self.restart_backoff
        while self._keeps(w):
            w.backoff = delay
            # Usually the link closed because the worker died; one still running
            # (its link ended, a failed start) is killed if it does not exit.
            await self._end_process(w, _EXIT_WAIT)
            if not self._keeps(w):
                return  # not restarted: the pool closes (its shutdown reports nothing more), or shrank
            if w.proc is not None and w.state == "crashed":  # logged once it is reaped: how it ended
                w.last_error = w.killed_for or f"it {_how_it_ended(w.proc.returncode)}"
                w.killed_for = ""
                log.warning(
                    "pool %s: worker %d (pid %s) %s; restarting in %g s",
                    self.name,
                    w.index,
                    w.proc.pid,
                    _how_it_ended(w.proc.returncode),
                    delay,
                )
            await anyio.sleep(delay)  # backoff between restarts, not event ordering
            if not self._keeps(w):
                return
            try:
                # As at the pool's start: a worker whose setup hangs counts as
                # a failed start (the loop's top kills it before the next try).
                await self._start_within(w)
                return
            except Exception as exc:  # kernel objects refused (ENOSPC...), a timeout: a failed start
                if not self._keeps(w):
                    return  # stopped by the pool's close or a resize
                w.start_failures += 1
                if w.start_failures >= self.max_start_failures:
                    msg = (
                        f"worker {w.index} of pool {self.name!r} failed to restart "
                        f"{w.start_failures} times; giving up: {exc}"
                    )
                    w.state = "failed"
                    self.errors.append(msg)
                    self._unhold(w, None, msg)
                    self._notify()
                    log.error("%s", msg)
                    return
                delay = min(delay * 2, self.max_backoff)
                if self._closing:
                    return
                w.state = "restarting"  # not given up on: wait_ready() waits for it
                self._notify()

    async def _shutdown(self, drain: bool = True) -> None:
        """Drain in-flight requests, close every link, wait for the children,
        close the node and remove the records folder (if no record is left).

        Runs to its end even when the caller is cancelled meanwhile (see
        :func:`~ipcbus.node.shielded`); a second call waits for the first.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_workers(drain))
        await shielded(self._stopping)

    async def _stop_workers(self, drain: bool) -> None:
        self._notify()  # requests waiting for a restart (_wait_back) learn of the close
        for w in self._all():
            self._unhold(w, None, "the worker pool closed while this request waited for its worker's restart")
        node = self._node
        if node is not None:
            if self._shared is not None:
                # New work goes elsewhere from now on: to another pool on the
                # bus serving the same subjects (a reload), else NoResponders.
                for w in self._all():
                    if w.link is not None:
                        node.withdraw_link(w.link)
            pending = [f for f in self._requests_to_workers(node) if not f.done()]
            if drain and self._shared is not None:
                # Let every request the workers have finish, other nodes' too:
                # those have no future here to wait on (polled, at close only).
                with anyio.move_on_after(_STOP_TIMEOUT):
                    while any(w.link is not None and w.link.inflight for w in self._all()):
                        await asyncio.sleep(0.01)
            elif pending and drain:
                # Let this process's requests to the workers finish (their futures
                # are the events: answered, failed or timed out, each completes).
                await asyncio.wait(pending, timeout=_STOP_TIMEOUT)
            if self._shared is None and isinstance(self._bus, _PoolBus):
                # From now on, new requests raise BusClosed (not on a bus given
                # to the pool: that may be another pool's, which runs on).
                self._bus.refuse_new()
            # Still running (those made during the wait too): the pool
            # closes, no worker crashed.
            waited = set(pending)
            for f in self._requests_to_workers(node):
                if f.done():
                    continue
                if not drain:
                    why = "the worker pool closed (its block was cancelled) before this request was answered"
                elif f in waited:
                    why = (
                        f"the worker pool closed after waiting {_STOP_TIMEOUT:g} s "
                        "for this request to be answered"
                    )
                else:
                    why = (
                        "the worker pool was closing when this request was made, "
                        "and closed before it was answered"
                    )
                f.set_exception(BusClosed(why))
            # Requests that other nodes sent them (through a bus given to
            # the pool) fail as the links close: no worker crashed.
            for w in self._all():
                if w.link is not None:
                    w.link.crash_error, w.link.ending = "ConnectionClosed", "the worker pool closed"
            # Goodbye first: a worker whose link ends without one takes it that
            # this process died (ipcbus.worker).  All at once: N stopped
            # workers must not take N times a link's flush timeout.
            await say_goodbye([w.link.link for w in self._all() if w.link is not None], "pool closing")
        for w in self._all():
            proc = w.proc
            if w.state != "ready" and proc is not None and proc.returncode is None:
                # Still starting (a restart under way): its interpreter may not
                # run its loop yet, to read the goodbye (or it has no link to
                # be told on), and would be waited for in vain.  SIGTERM: it
                # closes its link if it has one by then (ipcbus.worker).
                _signal(proc, signal.SIGTERM)
        # One limit for all of them, not one each: N stuck workers take 5 s, not 5N.
        with anyio.move_on_after(_STOP_TIMEOUT):
            for w in self._all():
                if w.proc is not None:
                    # Not only w.exited: its reaper ran in the node's task group,
                    # gone if the node of a bus given to the pool closed.
                    proc = w.proc
                    await proc.wait()
                    self._reaped(w, proc)
        for w in self._all():
            proc = w.proc
            if proc is not None and proc.returncode is None:
                log.warning(
                    "pool %s: worker %d (pid %d) did not exit within %g s of the close "
                    "(stopped, or stuck in its code); killing it",
                    self.name,
                    w.index,
                    proc.pid,
                    _STOP_TIMEOUT,
                )
                _signal(proc, signal.SIGKILL)
                await proc.wait()
            w.state = "stopped"
        self._notify()
        if node is not None:
            if self._shared is None:
                await node.aclose()
            else:  # the bus given stays open for its owner
                node.on_link_closed.remove(self._on_link_closed)
            _POOL_NAMES.get(node, set()).discard(self.name)
        if self._records is not None:
            remove_pool_dir(self._records)  # only if no record is left in it


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Send ``sig`` to a worker not reaped yet, without reaping it.

    ``proc.terminate()``/``kill()`` on asyncio's default loop go through
    ``Popen.send_signal``, which first polls the child: one that has just died
    is reaped there, behind the child watcher's back, which then reports exit
    code 255 for it.  While the child is not reaped its pid cannot be reused.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _served(ls: LinkState) -> tuple[str, ...]:
    """The patterns a worker's link subscribed to (its inbox aside)."""
    return tuple(k[0] for k in ls.remote_keys if not k[0].startswith("_INBOX."))


def _rss(pid: int) -> int | None:
    """Resident memory of process ``pid`` in bytes (``None``: it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of an exception group, nested groups opened."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _how_it_ended(returncode: int | None) -> str:
    """A worker's end in words, from its exit status."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class _PoolBus(Bus):
    """The pool's bus (:attr:`WorkerPool.bus`), on the node the pool owns."""

    def __init__(self, node: Node, pool: WorkerPool) -> None:
        super().__init__(node)
        self._pool = pool

    async def _no_responders(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, str] | None,
        timeout: float | None,
    ) -> tuple[list[Link], float]:
        """A request to a service whose workers are being restarted waits for
        them (within ``timeout``) instead of raising NoResponders at once."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = None if timeout is None else t0 + timeout
        while await self._pool._wait_back(subject, deadline, timeout):
            try:
                return self._node.send_request(subject, payload, reply, headers), loop.time() - t0
            except NoResponders:
                continue  # ready again, but not serving it (or gone again): look once more
        return await super()._no_responders(subject, payload, reply, headers, timeout)

    def refuse_new(self) -> None:
        """The pool is closing: new requests, publishes and subscriptions raise BusClosed."""
        self._closed = True


def _child_env() -> dict[str, str]:
    return dict(os.environ)
