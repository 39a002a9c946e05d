"""Entry point of a WorkerPool child: ``python -m ipcbus.worker SPEC TARGET NAME MAX_FRAME PPID SPIN_US``.

``SPEC`` names the link to the parent: ``pipe:R,W`` (inherited pipe fds),
``shm:{...}`` (the ids of a shared-memory ring pair the parent created) or
``sysv:{...}`` (the ids and keys of the two SysV message queues it created).
``PPID`` is the parent's pid, ``SPIN_US`` the busy-poll window the pool was
given (:mod:`ipcbus.spin`).

The child wraps its inherited pipe ends in a link to the parent's node,
imports ``TARGET`` (``"module:function"``), runs ``await setup(bus)``, and
sends a ``ready`` notice (or ``setup_failed`` with the error, then exits 1).
It runs until the parent closes the link — or dies, which the child sees as
end of stream — and then exits, so a dead parent never leaves orphans.  A
worker that cannot exit that way (its setup or a handler blocks the event
loop, or swallows the cancellation) is ended by a watchdog thread
:data:`ORPHAN_GRACE` seconds after the parent died.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import select
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec

from . import frames as fr
from .busdir import bus_root
from .checks import split_target
from .client import Bus
from .errors import ConnectionClosed, IpcBusError
from .gc import collect, pool_dir_name, remove_pool_dir
from .node import LinkState, Node
from .records import pid_start_time, process_alive
from .transports.base import Link
from .transports.pipe import PipeLink

__all__ = ["ORPHAN_GRACE", "TERM_DRAIN", "load_target", "main", "run_worker", "watch_parent"]

_PARENT_EXIT_WAIT = 1.0  # seconds from the link's end to the parent's death being reported
_TERM_EXIT_WAIT = 0.5  # the same, for a worker given SIGTERM (see run_worker)
TERM_DRAIN: Final = 5.0
"""Seconds a worker given SIGTERM lets its services answer the requests they took."""

ORPHAN_GRACE = 5.0
"""Seconds a worker may outlive its parent before its watchdog ends it (:func:`watch_parent`)."""

_links: list[Link] = []  # this worker's link to its parent, once open (for the watchdog)


def load_target(target: str) -> Callable[[Bus], Awaitable[Any]]:
    """Import ``"module:function"`` and return the function."""
    module_name, func_name = split_target(target)
    module = importlib.import_module(module_name)
    try:
        func = getattr(module, func_name)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no function {func_name!r}") from None
    if not callable(func):
        raise TypeError(f"{target!r} is not callable")
    return func  # type: ignore[no-any-return]


async def _open_link(spec: str, parent_pid: int, max_frame: int) -> Link:
    """The link to the parent from its argv spec: ``pipe:R,W``, ``shm:{...}`` or ``sysv:{...}``."""
    kind, _, rest = spec.partition(":")
    if kind == "pipe":
        r, w = (int(x) for x in rest.split(","))
        # Passed to this process inheritable; a process the plugin starts
        # (os.system, Popen(close_fds=False)) must not keep them open: the
        # parent would never see this worker's end of stream when it dies.
        os.set_inheritable(r, False)
        os.set_inheritable(w, False)
        return PipeLink(r, w, max_frame=max_frame, peer_pid=parent_pid)
    if kind == "shm":
        from .transports.shm import ShmLink

        params = msgspec.json.decode(rest.encode(), type=dict[str, int | str])
        return await ShmLink.attach(params, peer_pid=parent_pid, max_frame=max_frame)
    if kind == "sysv":
        from .transports.sysv import SysvPairLink

        pair = msgspec.json.decode(rest.encode(), type=dict[str, int | str])
        return await SysvPairLink.attach(pair, peer_pid=parent_pid, max_frame=max_frame)
    raise ValueError(f"unknown worker link spec {spec!r}")


async def run_worker(
    spec: str, target: str, name: str, max_frame: int, parent_pid: int, spin_us: float | None = None
) -> int:
    """Run one worker until its parent goes away; return the exit code."""
    # Over shm and SysV the parent records the kernel objects it makes for its
    # workers in a folder of its own; see _left_behind.
    records = _pool_records(spec, parent_pid)
    try:
        parent = os.pidfd_open(parent_pid) if records is not None else None
    except OSError:  # gone already, or no pidfd: leave the folder to gc
        parent = None
    # SIGTERM (see _terminate) is taken from here on; one that comes while the
    # link is being opened is acted on once it is open.
    terminated = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminated.set)
    try:
        async with Node(name=name, max_frame=max_frame, spin_us=spin_us) as node:
            try:
                link = await _open_link(spec, parent_pid, max_frame)
                ls = await node.add_link(link, name="parent", wait=False)
            except ConnectionClosed:
                # The kernel objects are gone, or the link broke at once: the pool
                # closed before this worker attached (a sibling failed to start) or
                # its process died.  Nothing to report here; the parent reports
                # its own failure.
                return 1
            except (IpcBusError, OSError) as exc:
                # One line, not a traceback; the parent's WorkerStartError says
                # which worker never attached.
                print(
                    f"ipcbus worker (pool {name!r}, pid {os.getpid()}): cannot open the link "
                    f"to the pool's process {parent_pid}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            node.upstream = ls
            _links.append(link)
            # The worker's bus owns its node: a plugin that closes it is done,
            # and the worker exits (the pool restarts it, as for a crash),
            # rather than running on serving nothing.
            bus = Bus(node, owns_node=True)
            node.task_group.start_soon(
                _terminate, terminated, bus, ls, parent_pid, name="ipcbus-worker-sigterm"
            )
            try:
                setup = load_target(target)
                result = setup(bus)
                if inspect.isawaitable(result):
                    await _unless_closed(result, ls, node)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # an Exception, or a BaseException of the plugin's own
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                    raise  # this task is cancelled: not the plugin's failure
                msg = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(ConnectionClosed):  # the parent may be gone too
                    link.send_nowait(fr.encode_frame(fr.Notice("setup_failed", msg[:3000])))
                await link.aclose()
                await node.aclose()
                return 1
            if not ls.closed.is_set():
                # Make sure the interest set up by `setup` reaches the parent before "ready".
                with contextlib.suppress(ConnectionClosed):
                    link.send_nowait(fr.encode_frame(fr.Notice("ready")))
            await ls.closed.wait()
            if ls.said_goodbye and not node.closed and not terminated.is_set():
                # The pool closes, or retires this worker (recycle, resize),
                # after waiting for the requests it sent here: one still being
                # answered was given up on there.  The handlers of published
                # messages still running finish before the exit.
                for svc in list(bus._services):
                    svc._drop_requests()
                with anyio.move_on_after(TERM_DRAIN), contextlib.suppress(IpcBusError):
                    await bus._drain_services()
            # The plugin closed its bus (and with it the node and the link):
            # the parent lives on and sees this worker go.
            plugin_closed = node.closed and not terminated.is_set()
            await node.aclose()
        if records is not None and parent is not None and not (ls.said_goodbye or plugin_closed):
            # SIGTERM'd: the parent may be dying of the same signal (a service
            # manager's stop), or alive (this worker alone was stopped, and
            # the pool is waiting for it to exit): wait less for its death.
            await _left_behind(records, parent, _TERM_EXIT_WAIT if terminated.is_set() else _PARENT_EXIT_WAIT)
        return 128 + signal.SIGTERM if terminated.is_set() else 0
    finally:
        if parent is not None:
            os.close(parent)


async def _unless_closed(setup: Awaitable[Any], ls: LinkState, node: Node) -> None:
    """Await the setup function, unless the link to the parent ends first (the
    parent died or closed the pool): then it is cancelled, and the worker exits
    instead of running on as an orphan for as long as its setup takes."""
    with anyio.CancelScope() as scope:

        async def parent_gone() -> None:
            await ls.closed.wait()
            scope.cancel()  # a no-op once setup is over

        # In the node's task group, not one of our own: setup's failure is then
        # raised here as it is, not wrapped in an exception group.
        node.task_group.start_soon(parent_gone, name="ipcbus-worker-parent-watch")
        await setup


async def _terminate(terminated: asyncio.Event, bus: Bus, ls: LinkState, parent_pid: int) -> None:
    """On SIGTERM (``terminated``): finish what was taken, close the link and
    exit, leaving no kernel object behind.

    The services first stop taking requests (the parent sends new ones to the
    other workers) and answer those they have, for up to :data:`TERM_DRAIN`
    seconds, the pool's own drain time: a service manager stopping the
    program sends SIGTERM to all of its processes at once, and the parent,
    draining, waits for those answers.  Sent to the whole process group, it
    may also reach a parent that dies at once: if the link ended without a
    goodbye, wait briefly for that, and if the parent died, remove the SysV
    queue it read as well (nobody else will).  Sent to this worker alone, the
    parent sees the link close and removes its side itself.
    """
    await terminated.wait()
    node, link = bus.node, ls.link
    if not ls.closed.is_set():
        # Told before the services withdraw: the pool waits for this worker's
        # restart rather than answering NoResponders meanwhile.
        with contextlib.suppress(IpcBusError, OSError):
            link.send_nowait(fr.encode_frame(fr.Notice("stopping", "SIGTERM")))
        with anyio.move_on_after(TERM_DRAIN), contextlib.suppress(IpcBusError):
            await bus._drain_services()
    if ls.closed.is_set() and not ls.said_goodbye:
        with contextlib.suppress(OSError):  # no such process: it is gone already
            parent = os.pidfd_open(parent_pid)  # our own: _left_behind may wait on the other
            try:
                with anyio.move_on_after(_PARENT_EXIT_WAIT):
                    await anyio.wait_readable(parent)
            finally:
                os.close(parent)
    forget_peer = getattr(link, "forget_peer", None)  # a SysV pair link
    if forget_peer is not None and not process_alive(parent_pid):
        forget_peer()
    await node.aclose()


def _pool_records(spec: str, parent_pid: int) -> Path | None:
    """The records folder of the parent's pools (see :mod:`ipcbus.gc`), for a
    worker linked by kernel objects (not pipes); found while the parent runs."""
    if spec.startswith("pipe:"):
        return None
    try:
        return bus_root() / pool_dir_name(parent_pid)
    except (IpcBusError, OSError):
        return None


async def _left_behind(records: Path, parent: int, wait: float) -> None:
    """The parent closed the link without saying goodbye: if it died, clean up after it.

    This worker has removed its kernel objects and their records by now.  A
    parent that shuts down cleanly removes the pool's records folder itself;
    one that was killed cannot, so the last worker out removes it (only if no
    record is left in it).  A parent that dies closes its end of the link
    before the kernel reports it dead (its pidfd becomes readable), so wait
    for that, ``wait`` seconds at most.
    """
    with anyio.move_on_after(wait):
        await anyio.wait_readable(parent)
        _collect_after_parent(records)


def _collect_after_parent(records: Path) -> None:
    """The pool's process is dead: remove what it recorded (gc: objects whose
    creator is gone), and the folder if nothing is left in it."""
    with contextlib.suppress(Exception):
        # Records the parent had no time to forget (it died before it read
        # a worker's ATTACHED) name objects that are gone: gc forgets them.
        collect(records)
        remove_pool_dir(records)


def watch_parent(parent_pid: int, spec: str, grace: float = ORPHAN_GRACE) -> threading.Thread | None:
    """Start the watchdog that ends this worker ``grace`` seconds after its parent died.

    A worker sees its parent's death as the end of its link and exits by
    itself, unless plugin code keeps it from running that exit: a setup or
    handler that blocks the event loop (``time.sleep``, a busy loop), or
    catches the cancellation and goes on.  The watchdog is a daemon thread
    waiting on a pidfd of the parent, so it runs whatever the event loop
    does.  If the process is still there ``grace`` seconds after the parent
    died, it removes its link's SysV queues and what the parent recorded for
    its pools (as the last worker out does, :func:`_left_behind`), says so on stderr
    and calls ``os._exit(1)``.  Returns the thread, or ``None`` when this
    kernel has no pidfds.
    """
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        pidfd = -1  # gone already: the grace starts now
    except OSError:
        return None
    parent_start, own_start = pid_start_time(parent_pid), pid_start_time(os.getpid())
    if pidfd >= 0 and parent_start is not None and own_start is not None and parent_start > own_start:
        # Started after this process: not the pool's process, whose pid it
        # reuses (the pool died while this worker was starting).
        os.close(pidfd)
        pidfd = -1
    # Named after the parent's start time: found while it runs.
    records = _pool_records(spec, parent_pid) if pidfd >= 0 else None

    def watch() -> None:
        if pidfd >= 0:
            select.select([pidfd], [], [])  # readable once the parent has exited
        threading.Event().wait(grace)
        for link in _links:  # a SysV pair's queues outlive processes (shm's are unlinked on attach)
            remove_queues = getattr(link, "remove_queues", None)
            if remove_queues is not None:
                with contextlib.suppress(Exception):
                    remove_queues()
        if records is not None:
            _collect_after_parent(records)
        with contextlib.suppress(OSError):
            os.write(
                2,
                f"ipcbus worker (pid {os.getpid()}): still running {grace:g} s after the pool's "
                f"process {parent_pid} died (its setup or a handler blocks the event loop or "
                "ignores cancellation); exiting\n".encode(),
            )
        os._exit(1)

    t = threading.Thread(target=watch, name="ipcbus-worker-orphan-watch", daemon=True)
    t.start()
    return t


def main(argv: list[str] | None = None) -> None:
    """Parse the argv the pool passes and run the worker on uvloop when available."""
    args = sys.argv[1:] if argv is None else argv
    spec, target, name = args[0], args[1], args[2]
    max_frame, parent_pid = int(args[3]), int(args[4])
    spin_us = float(args[5]) if len(args) > 5 else None
    # The parent handles Ctrl-C (and a terminal's hang-up) and shuts workers
    # down through their links; a worker whose parent died sees its link end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch_parent(parent_pid, spec)
    sys.path.insert(0, "")
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    code = anyio.run(
        run_worker,
        spec,
        target,
        name,
        max_frame,
        parent_pid,
        spin_us,
        backend_options=backend_options,
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
