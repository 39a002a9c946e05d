"""The hub: a node that accepts links from unrelated processes on one bus.

A hub owns its bus directory (an exclusive lock on the pid file means one hub
per bus), a door FIFO where clients knock, and one acceptor per transport
(FIFO pairs, a SysV message queue, shared-memory rings).  Every accepted
link joins the hub's node, which routes exactly as any node does.

The hub answers ``$SYS.stats`` (everything ``ipcbus ls`` shows),
``$SYS.links`` and ``$SYS.subs`` with msgspec-encoded replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, cast

import anyio

from . import frames as fr
from .busdir import BusDir, resolve_group
from .client import ASKER_WAIT, Bus, encode_payload, serving_node
from .errors import IpcBusError, SlowConsumer
from .node import (
    DEFAULT_MAX_LINK_SUBS,
    DEFAULT_OUTBOUND_LIMIT,
    ERROR_MSG_HEADER,
    ERROR_TYPE_HEADER,
    LinkState,
    Node,
    SubscriptionCore,
    shielded,
)
from .stats import HubStats, HubSubscription, NodeCounters
from .transports.base import Link
from .transports.door import Acceptor, Door, Knock, serve_door

__all__ = ["ALL_TRANSPORTS", "GC_INTERVAL", "Hub", "HubTransport"]

log = logging.getLogger("ipcbus.hub")

HubTransport = Literal["fifo", "sysv", "shm"]
"""How a client reaches a hub (``connect(transport=)``, ``Hub(transports=)``)."""

ALL_TRANSPORTS: tuple[HubTransport, ...] = ("fifo", "sysv", "shm")

GC_INTERVAL = 60.0
"""Seconds between two collections of what dead clients left (see ``ipcbus gc``) while a hub runs."""



class _Acceptor(Acceptor, Protocol):
    """A transport's hub side: what :func:`~ipcbus.transports.door.admit` needs, plus its lifetime."""

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: Any) -> Any: ...


def _acceptor(transport: str, path: Path, mode: int, gid: int | None, max_frame: int) -> _Acceptor:
    if transport == "fifo":
        from .transports.fifo import FifoAcceptor

        return FifoAcceptor(path, mode=mode, gid=gid, max_frame=max_frame)
    if transport == "sysv":
        from .transports.sysv import SysvAcceptor

        return SysvAcceptor(path, mode=mode, gid=gid, max_frame=max_frame)
    if transport == "shm":
        from .transports.shm import ShmAcceptor

        return ShmAcceptor(path, mode=mode, gid=gid, max_frame=max_frame)
    raise ValueError(f"unknown transport {transport!r}; choose from {', '.join(ALL_TRANSPORTS)}")


class Hub:
    """A bus daemon, embeddable in any asyncio program::

        async with ipcbus.Hub("orders") as hub:
            await hub.bus.publish("orders.new", {...})   # the hub's own bus
            await hub.wait_closed()                       # serve until aclose()

    ``group`` opens the bus to a Unix group (directory 0770, objects 0660);
    otherwise only the owner may connect.  ``transports`` limits which
    transports are accepted.  ``outbound_limit`` bounds the bytes queued
    toward one slow client before its messages are dropped and reported.
    ``spin_us`` is the busy-poll window while replies are due (:mod:`ipcbus.spin`).
    ``max_link_subs`` bounds the distinct subscriptions one client may make
    (see :class:`~ipcbus.node.Node`).
    """

    def __init__(
        self,
        name: str = "default",
        *,
        group: str | int | None = None,
        root: Path | str | None = None,
        transports: Iterable[HubTransport] = ALL_TRANSPORTS,
        max_frame: int = fr.DEFAULT_MAX_FRAME,
        outbound_limit: int = DEFAULT_OUTBOUND_LIMIT,
        spin_us: float | None = None,
        max_link_subs: int = DEFAULT_MAX_LINK_SUBS,
    ) -> None:
        if isinstance(transports, str | bytes) or not isinstance(transports, Iterable):
            raise TypeError(
                f"transports must be a tuple of transport names, e.g. ('fifo',), not {transports!r}"
            )
        transports = tuple(transports)
        if not transports:
            raise ValueError(
                f"transports is empty: a hub needs at least one of {', '.join(ALL_TRANSPORTS)} "
                "for clients to connect over"
            )
        for t in transports:
            if t not in ALL_TRANSPORTS:
                raise ValueError(f"unknown transport {t!r}; choose from {', '.join(ALL_TRANSPORTS)}")
        self.name = name
        self.gid = resolve_group(group)
        self.busdir = BusDir(name, root=Path(root) if root is not None else None, group=self.gid)
        self.transports = tuple(transports)
        self.node = Node(
            name=f"hub:{name}",
            max_frame=max_frame,
            outbound_limit=outbound_limit,
            spin_us=spin_us,
            max_link_subs=max_link_subs,
        )
        self.max_frame = self.node.max_frame  # checked (a whole float made an int)
        self.bus = Bus(self.node)
        self.started = 0.0
        self.accepted = 0
        self.refused = 0
        self._stack = contextlib.AsyncExitStack()
        self._closed = anyio.Event()
        self._closing = False
        self._acceptors: dict[str, _Acceptor] = {}
        self._background: asyncio.Task[None] | None = None  # a close asked from a handler

    @property
    def path(self) -> Path:
        """The bus directory."""
        return self.busdir.path

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await shielded(self._stack.aclose())
            raise
        return self

    async def _start(self) -> None:
        self.busdir.ensure()
        lock = self.busdir.lock_hub(self.transports)
        self._stack.callback(self.busdir.cleanup)
        self._stack.callback(lock.release)
        self._collect()
        # And once more at the close, after the acceptors removed the hub's
        # own objects and before the lock goes: what clients killed since the
        # last collection left is not left for the next hub (or `ipcbus gc`).
        self._stack.callback(self._collect)
        mode = 0o660 if self.gid is not None else 0o600
        for t in self.transports:
            acc = _acceptor(t, self.busdir.path, mode, self.gid, self.max_frame)
            await self._stack.enter_async_context(acc)
            self._acceptors[t] = acc
        # Exit order (LIFO): door, then the node (clients told, links closed),
        # then the acceptors (kernel objects removed), a last collection, then
        # the directory and lock.
        await self.node.start()
        self._stack.push_async_callback(self.node.aclose)
        door = Door(self.busdir.path, mode=mode, gid=self.gid)
        await self._stack.enter_async_context(door)
        self.started = time.time()
        self.node.task_group.start_soon(self._accept_loop, door, name="ipcbus-hub-door")
        self.node.task_group.start_soon(self._collect_loop, name="ipcbus-hub-gc")
        for subject, answer in (
            ("$SYS.stats", self.stats),
            ("$SYS.links", lambda: self.node.stats()["links"]),
            ("$SYS.subs", self._subscriptions),
        ):
            core = self.node.subscribe(subject)
            self.node.task_group.start_soon(self._serve_sys, core, answer, name=f"ipcbus-hub-{subject}")
        log.info(
            "hub %s serving %s (pid %d, transports %s)",
            self.name,
            self.busdir.path,
            os.getpid(),
            ",".join(self.transports),
        )

    def _collect(self) -> None:
        """Remove what dead processes left in the bus folder (``ipcbus gc``)."""
        with contextlib.suppress(Exception):
            from .gc import collect

            for item in collect(self.busdir.path, dry_run=False):
                if item.action in ("removed", "forgot"):  # not what it keeps (live objects)
                    log.info("hub %s: removed stale %s", self.name, item)

    async def _collect_loop(self) -> None:
        """Collect every :data:`GC_INTERVAL` seconds while serving: clients killed
        while connecting leave kernel objects (an shm client's segment and
        semaphores, a FIFO) that would otherwise pile up until the next start."""
        while True:
            await anyio.sleep(GC_INTERVAL)
            self._collect()

    async def _serve_sys(self, core: SubscriptionCore, answer: Callable[[], Any]) -> None:
        """Answer the requests of one ``$SYS`` subscription, never waiting on a link.

        Not ``Bus.serve``: a service's reply waits while the link it goes out
        on is above its high-water mark, so one stopped requester would stall
        the hub's ``$SYS`` replies (and ``ipcbus ls``) for everyone behind it.
        A reply goes to one requester only: queue it with ``publish_nowait``.
        """
        while True:
            try:
                m = await core.get()
            except SlowConsumer:
                continue
            if m is None:
                return
            if m.reply is None:
                continue
            headers: dict[str, str] | None = None
            try:
                payload = encode_payload(answer())
            except Exception as exc:  # report it to the requester as RemoteError
                payload = b""
                headers = {ERROR_TYPE_HEADER: type(exc).__name__, ERROR_MSG_HEADER: str(exc)}
            with contextlib.suppress(IpcBusError):
                self.node.publish_nowait(m.reply, payload, headers=headers)

    async def _accept_loop(self, door: Door) -> None:
        # Version checks, transport dispatch, refusal logging and the limit on
        # handshakes at once (a flood of knocks waits in the door) are the door's.
        await serve_door(door, self._acceptors, self._on_link, on_refused=self._on_refused)

    def _on_refused(self, knock: Knock) -> None:
        self.refused += 1

    def _on_link(self, link: Link, knock: Knock) -> None:
        self.node.task_group.start_soon(self._take, link, knock, name="ipcbus-hub-accept")

    async def _take(self, link: Link, knock: Knock) -> None:
        who = f"{knock.name or 'client'}(pid {knock.pid})"
        if self._closing:
            await link.aclose()
            return
        try:
            await self.node.add_link(link, name=who)
        except IpcBusError as exc:
            self.refused += 1
            log.warning("hub %s: link to %s failed during the handshake: %s", self.name, who, exc)
            return
        self.accepted += 1
        log.info("hub %s: connected %s over %s", self.name, who, knock.transport)

    def _subscriptions(self) -> list[HubSubscription]:
        out: list[HubSubscription] = []
        for ls in self.node.links:
            for subject, queue in sorted(ls.remote_keys, key=lambda k: (k[0], k[1] or "")):
                if subject.startswith("_INBOX."):
                    continue
                out.append(
                    {
                        "link": ls.name,
                        "pid": ls.link.info.peer_pid,
                        "subject": subject,
                        "queue": queue,
                    }
                )
        return out

    def stats(self) -> HubStats:
        """What ``ipcbus ls`` shows: hub, links, subscriptions, kernel objects."""
        from .records import list_records

        objects: list[dict[str, Any]] = []
        for path, rec in list_records(self.busdir.path):
            objects.append(
                {"file": path.name, "record": None}
                if rec is None
                else {
                    "kind": rec.kind,
                    "ident": rec.ident,
                    "key": rec.key,
                    "creator_pid": rec.creator_pid,
                    "creator_alive": rec.creator_alive,
                    **rec.extra,
                }
            )
        node = self.node.stats()
        return {
            "bus": self.name,
            "directory": str(self.busdir.path),
            "hub_pid": os.getpid(),
            "uptime": time.time() - self.started if self.started else 0.0,
            "transports": list(self.transports),
            "accepted": self.accepted,
            "refused": self.refused,
            "node": cast(NodeCounters, {k: v for k, v in node.items() if k != "links"}),
            "links": node["links"],
            "subscriptions": self._subscriptions(),
            "objects": objects,
        }

    @property
    def links(self) -> list[LinkState]:
        """The links currently connected."""
        return list(self.node.links)

    async def wait_closed(self) -> None:
        """Wait until :meth:`aclose` (e.g. from a signal handler) finished."""
        await self._closed.wait()

    async def aclose(self) -> None:
        """Stop accepting, tell clients, drain, remove the FIFOs and records.  Idempotent.

        Called from a handler of a service on the hub's node (a "shutdown"
        request to ``hub.bus``), it closes in the background and returns at
        once: the close waits for that handler, which finishes first.
        """
        if serving_node() is self.node:
            if not self._closing:
                self._closing = True
                self._background = asyncio.get_running_loop().create_task(
                    self._close(asyncio.current_task()), context=contextvars.Context()
                )
            return
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        await self._close()

    async def _close(self, asker: asyncio.Task[Any] | None = None) -> None:
        if asker is not None:  # the handler that asked finishes (and answers) first
            await asyncio.wait([asker], timeout=ASKER_WAIT)
        try:
            await shielded(self._stack.aclose())
        finally:
            self._closed.set()
            log.info("hub %s stopped", self.name)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
