"""``ipcbus.connect()``: join a hub's bus over a transport.

``bus = await ipcbus.connect("orders", transport="fifo")`` or
``async with ipcbus.connect("orders") as bus: ...``.

With ``autostart=True`` a missing hub is started as a daemon
(``ipcbus hub NAME --daemon``, which returns once the hub serves; when
several clients race, the pid-file lock lets exactly one hub win and the
others find it).  With ``reconnect=True`` a lost hub is waited for and the
node re-announces its subscriptions on the new link, so they survive a hub
restart; requests in flight when the hub died still fail with
``ConnectionClosed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from types import CoroutineType, TracebackType
from typing import Any, Final

import anyio

from . import frames as fr
from .busdir import BusDir, validate_bus_name
from .checks import check_count, check_name, check_path
from .client import Bus, _timeout_or_none
from .errors import BusClosed, BusNotFound, ConnectionClosed, IpcBusError
from .hub import ALL_TRANSPORTS, HubTransport
from .node import LinkState, Node, first_of
from .spin import spin_window
from .transports.base import Link

__all__ = ["ClientBus", "Connecting", "connect", "open_link", "options_of"]

log = logging.getLogger("ipcbus.connect")

TRANSPORTS = ALL_TRANSPORTS
_AUTOSTART_TIMEOUT = 15.0


async def open_link(
    busdir: BusDir,
    transport: str,
    *,
    name: str,
    max_frame: int,
    options: dict[str, Any] | None = None,
) -> Link:
    """Knock on the bus's door and return a link to its hub (``BusNotFound`` if none)."""
    hub_pid = busdir.hub_pid()
    if hub_pid is None:
        raise BusNotFound(busdir.name, str(busdir.path))
    served = busdir.hub_transports()
    if served is not None and transport in TRANSPORTS and transport not in served:
        # Its door would refuse the knock, and a refused client hears nothing.
        raise ConnectionClosed(
            f"the hub of bus {busdir.name!r} (pid {hub_pid}) accepts {', '.join(served) or 'nothing'}, "
            f"not {transport!r}: connect with one of those, or start the hub with {transport!r} "
            f"among its transports"
        )
    opts = dict(options or {})
    connector = _connector(transport)
    return await connector(busdir.path, hub_pid=hub_pid, name=name, max_frame=max_frame, **opts)


def _connector(transport: str) -> Callable[..., Awaitable[Link]]:
    """The function that opens a client link over ``transport``."""
    if transport == "fifo":
        from .transports.fifo import connect_fifo

        return connect_fifo
    if transport == "sysv":
        from .transports.sysv import connect_sysv

        return connect_sysv
    if transport == "shm":
        from .transports.shm import connect_shm

        return connect_shm
    raise ValueError(f"unknown transport {transport!r}; choose from {', '.join(TRANSPORTS)}")


# Parameters of the connectors that connect() sets itself.
_SET_BY_CONNECT: Final = frozenset({"busdir", "hub_pid", "name", "max_frame", "send_knock"})


def options_of(transport: str) -> list[str]:
    """The options ``connect(..., transport=transport, **options)`` passes on to the transport."""
    params = inspect.signature(_connector(transport)).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _SET_BY_CONNECT]


def _check_options(transport: str, options: dict[str, Any]) -> None:
    """``TypeError`` for an option ``transport`` does not take, named with the ones it does."""
    known = options_of(transport)
    for key in options:
        if key not in known:
            raise TypeError(
                f"connect() got an unexpected option {key!r} for transport {transport!r}; "
                f"it takes {', '.join(known) or 'none'} (besides connect()'s own arguments)"
            )


class ClientBus(Bus):
    """A :class:`~ipcbus.Bus` connected to a hub (what :func:`connect` returns)."""

    _checks_link = True  # _check_open() looks at the link to the hub too

    def __init__(
        self,
        node: Node,
        busdir: BusDir,
        transport: str,
        *,
        name: str,
        reconnect: bool,
        options: dict[str, Any],
    ) -> None:
        super().__init__(node, owns_node=True)
        self.busdir = busdir
        self.transport = transport
        self.name = name
        self.reconnect = reconnect
        self._options = options
        self.hub_link: LinkState | None = None
        self._lost = ""
        self.reconnects = 0
        self._connected = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None  # closes the node once the hub is gone

    def _check_open(self) -> None:
        why = self._why_closed()
        if why:
            raise BusClosed(f"bus {self.busdir.name!r} is closed{why}")
        super()._check_open()
        # ``link.closed``: the transport may have broken (peer gone, queue removed)
        # before the node's link task has run to drop it; a publisher that never
        # yields would otherwise keep "publishing" into the broken link.
        ls = self.hub_link
        if ls is None or ls.closed.is_set() or ls.link.closed:
            # The transport may have ended before the node dropped the link
            # (_on_link_closed, which says why): say what is known already.
            # No goodbye yet is no proof of a kill: it may still be on its way.
            lost = self._lost or (
                "the hub shut down: hub link closed" if ls is not None and ls.said_goodbye
                else "the hub link closed" if ls is not None else ""
            )
            raise ConnectionClosed(
                f"not connected to the hub of bus {self.busdir.name!r}"
                + (f": {lost}" if lost else "")
                + ("; reconnecting" if self.reconnect else "")
            )

    def _why_closed(self) -> str:
        if self._lost and self._node._closed and not self._closed:
            # Closed by losing its hub, not by its owner: say so.
            return f": {self._lost}; connect again (connect(..., reconnect=True) rides out a hub restart)"
        return ""

    async def _attach(self) -> None:
        link = await open_link(
            self.busdir,
            self.transport,
            name=self.name,
            max_frame=self._node.max_frame,
            options=self._options,
        )
        ls = await self._node.add_link(link, name="hub")
        if ls.closed.is_set():
            # The hub went away during the handshake, before this link was the
            # hub link (_on_link_closed ignored it): not connected, try again.
            raise ConnectionClosed(f"the hub link closed as it opened ({ls.close_reason})")
        self.hub_link = ls
        self._node.upstream = ls
        self._connected.set()

    def _on_link_closed(self, ls: LinkState) -> None:
        if ls is not self.hub_link or self.closed:
            return
        # A hub that stops cleanly says goodbye first; one killed does not.
        gone = "the hub shut down" if ls.said_goodbye else "the hub went away without a goodbye (killed?)"
        self._lost = f"{gone}: hub link closed ({ls.close_reason})"
        self._connected.clear()
        if self.reconnect:
            log.warning("bus %s: %s; reconnecting", self.busdir.name, self._lost)
            self._node.task_group.start_soon(self._reconnect_loop, name="ipcbus-reconnect")
        else:
            log.warning("bus %s: %s", self.busdir.name, self._lost)
            # Not in the node's task group: aclose() waits for that group to end.
            self._closer = asyncio.get_running_loop().create_task(self._node.aclose())

    async def _reconnect_loop(self) -> None:
        delay = 0.05
        while not self.closed:
            try:
                await self._attach()
            except (IpcBusError, OSError) as exc:
                log.debug("reconnect to %s failed: %s", self.busdir.name, exc)
                await anyio.sleep(delay)  # retry backoff while the hub is down
                delay = min(delay * 2, 1.0)
                continue
            self.reconnects += 1
            self._lost = ""
            log.info("bus %s: reconnected", self.busdir.name)
            return

    async def flush(self, timeout: float | None = 10.0) -> None:
        """Wait until the hub has processed everything sent so far.

        Raises :class:`~ipcbus.errors.ConnectionClosed` when the link to the hub
        breaks before the hub confirmed it: what was sent may not have arrived,
        so a flush that returns is an acknowledgement.  A hub that is closing
        confirms nothing more (it may no longer pass messages on): the flush
        then raises as its link closes.
        """
        self._check_open()
        limit = _timeout_or_none(timeout)
        ls = self.hub_link
        assert ls is not None  # _check_open
        try:
            await self._node.ping(ls, limit)
        except ConnectionClosed as exc:
            raise ConnectionClosed(
                f"the link to the hub of bus {self.busdir.name!r} closed before the hub "
                f"confirmed what was sent: {exc}"
            ) from None

    async def wait_connected(self, timeout: float | None = 10.0) -> None:
        """Wait until the link to the hub is up (after a reconnect).

        Raises ``TimeoutError`` after ``timeout`` seconds (``None``: no
        limit), and :class:`~ipcbus.errors.BusClosed` at once when the bus is
        closed (without ``reconnect``, a lost hub closes it).
        """
        with anyio.fail_after(_timeout_or_none(timeout)):
            if not self.closed and not self._connected.is_set():
                await first_of(self._connected, self._node.closing)
        if self.closed:
            lost = f": {self._lost}" if self._lost else ""
            raise BusClosed(f"bus {self.busdir.name!r} is closed{lost}")


async def _autostart(busdir: BusDir, group: str | int | None) -> None:
    """Start a hub daemon for the bus and return once a hub serves it."""
    cmd = [sys.executable, "-m", "ipcbus", "hub", busdir.name, "--daemon"]
    if group is not None:
        cmd += ["--group", str(group)]
    # The daemon serves the bus where this client looks for it (connect(root=...)).
    env = {**os.environ, "IPCBUS_DIR": str(busdir.root)}
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(_AUTOSTART_TIMEOUT):
            _out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise BusNotFound(busdir.name, str(busdir.path)) from None
    # Exit code 0: our daemon serves.  BusBusy (another racer won): also fine,
    # but the winner may hold the lock without having opened its door yet.
    if not await _wait_serving(busdir, _AUTOSTART_TIMEOUT):
        raise IpcBusError(
            f"could not start a hub for bus {busdir.name!r}: "
            f"{err.decode(errors='replace').strip() or f'exit code {proc.returncode}'}"
        )


def _door_open(busdir: BusDir) -> bool:
    """Whether someone reads the bus's door FIFO (a non-blocking open for writing succeeds)."""
    try:
        fd = os.open(busdir.door, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # ENOENT: no door yet; ENXIO: nobody reads it
        return False
    os.close(fd)
    return True


async def _wait_serving(busdir: BusDir, timeout: float) -> bool:
    """Wait until a live hub reads the door; False if no hub holds the bus or time runs out.

    A FIFO gives no event when its reader arrives, so this polls with backoff;
    a hub is normally ready before the first retry.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.002
    # A hub that holds the pid file's lock may not have written its pid yet.
    while busdir.hub_pid() is not None or busdir.hub_locked():
        if _door_open(busdir):
            return True
        if asyncio.get_running_loop().time() + delay > deadline:
            return False
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return False


async def _connect(
    bus: str,
    transport: str,
    name: str,
    autostart: bool,
    reconnect: bool,
    max_frame: int,
    root: Path | str | None,
    group: str | int | None,
    spin_us: float,
    options: dict[str, Any],
) -> ClientBus:
    # (connect() checked the arguments.)  With a group, the root may be the
    # bus owner's (bus_root(group=...) accepts it).
    busdir = BusDir(bus, root=Path(root) if root is not None else None, group=group)
    if busdir.hub_pid() is None:
        if not autostart:
            raise BusNotFound(bus, str(busdir.path))
        await _autostart(busdir, group)
    node = Node(name=name or f"client-{transport}", max_frame=max_frame, spin_us=spin_us)
    await node.start()
    client = ClientBus(node, busdir, transport, name=node.name, reconnect=reconnect, options=options)
    node.on_link_closed.append(client._on_link_closed)
    try:
        await client._attach()
    except BaseException:
        await node.aclose()  # to its end, even when this is a cancellation
        raise
    return client


class Connecting(Coroutine[Any, Any, ClientBus]):
    """What :func:`connect` returns: a coroutine of the :class:`ClientBus`
    that is also an async context manager.

    ``bus = await connect(...)``, ``async with connect(...) as bus:``, or run
    it as a task (``asyncio.create_task(connect(...))``, ``TaskGroup.create_task``).
    Like any coroutine it runs once, and one never awaited is reported
    (``RuntimeWarning: coroutine ... was never awaited``).
    """

    __name__ = __qualname__ = "connect"  # what a task's repr shows

    def __init__(self, coro: CoroutineType[Any, Any, ClientBus]) -> None:
        self._coro = coro
        self._bus: ClientBus | None = None

    def __await__(self) -> Generator[Any, None, ClientBus]:
        coro = self._coro
        # A coroutine refuses a second awaiter while the first one waits on it
        # (its __await__ wrapper skips that check: made here).
        if coro.cr_running or coro.cr_await is not None:
            raise RuntimeError("coroutine is being awaited already")
        return coro.__await__()

    @property
    def cr_running(self) -> bool:
        """Coroutine protocol (``inspect.getcoroutinestate``): running now."""
        return self._coro.cr_running

    @property
    def cr_frame(self) -> Any:
        """Coroutine protocol: the frame of the connect (``None`` once finished)."""
        return self._coro.cr_frame

    @property
    def cr_await(self) -> Any:
        """Coroutine protocol: what the connect waits on now."""
        return self._coro.cr_await

    @property
    def cr_suspended(self) -> bool:
        """Coroutine protocol (Python 3.12+): suspended at an ``await``."""
        return bool(getattr(self._coro, "cr_suspended", False))

    @property
    def cr_code(self) -> Any:
        """Coroutine protocol: the code object of the connect."""
        return self._coro.cr_code

    def send(self, value: Any) -> Any:
        """Coroutine protocol (what a task drives): resume the connect."""
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Coroutine protocol: raise an exception (a cancellation) inside the connect."""
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        """Coroutine protocol: stop a connect under way (closes what it made);
        a connect closed before it started never runs."""
        self._coro.close()

    async def __aenter__(self) -> ClientBus:
        self._bus = await self
        return self._bus

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bus is not None:
            await self._bus.aclose()


def connect(
    bus: str = "default",
    *,
    transport: HubTransport = "fifo",
    name: str = "",
    autostart: bool = False,
    reconnect: bool = False,
    max_frame: int = fr.DEFAULT_MAX_FRAME,
    root: Path | str | None = None,
    group: str | int | None = None,
    spin_us: float | None = None,
    **transport_options: Any,
) -> Connecting:
    """Connect to the hub of ``bus`` over ``transport`` (``"fifo"``, ``"sysv"`` or ``"shm"``).

    Await the result (``bus = await connect(...)``) or use it as an async
    context manager.  Raises :class:`~ipcbus.errors.BusNotFound` (naming the
    command that starts a hub) when no hub serves the bus, unless
    ``autostart`` is set.  ``transport_options`` go to the transport (for
    example ``ring_size=`` for shm).  ``spin_us`` is the busy-poll window
    while replies are due (:mod:`ipcbus.spin`; ``None``: ``$IPCBUS_SPIN_US`` or the
    default, ``0``: off).

    Raises at once, before anything is opened: :class:`~ipcbus.errors.BadBusName`
    for a bad bus name (a URL such as ``"fifo://orders"`` included: name the
    bus, pick the transport with ``transport=``), ``ValueError`` for an
    unknown transport or a bad ``spin_us`` or ``max_frame`` or a ``name``
    over 256 characters, ``TypeError`` for an option the transport does not
    take (the error lists those it does), a ``name`` that is not a str or a
    ``root`` that is not a path.
    """
    window = spin_window(spin_us)
    validate_bus_name(bus)
    check_name("name", name)
    check_path("root", root)
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose from {', '.join(TRANSPORTS)}")
    _check_options(transport, transport_options)
    max_frame = check_count("max_frame", max_frame, fr.MIN_MAX_FRAME, "bytes", fr.MAX_MAX_FRAME)
    coro = _connect(
        bus, transport, name, autostart, reconnect, max_frame, root, group, window, transport_options
    )
    assert isinstance(coro, CoroutineType)  # an async def's: the cr_* attributes Connecting shows
    return Connecting(coro)
