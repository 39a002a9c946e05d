"""The Link contract every transport satisfies.

A link is one bidirectional, ordered, reliable channel of whole frames
between two nodes.  It knows bytes and kernel objects, never subjects.

Sending is split in two so that the reactor can fan a message out to many
links without awaiting each one:

* :meth:`Link.send_nowait` hands one whole frame to the link's outbound
  buffer.  It never blocks; the frame is either queued whole or refused
  (:class:`~ipcbus.errors.FrameTooLarge`, :class:`~ipcbus.errors.ConnectionClosed`).
* :meth:`Link.wait_writable` awaits until the outbound buffer is back under
  the low-water mark: this is the backpressure.
* :meth:`Link.send` is both: queue, then wait if above the high-water mark.
  Because the frame is queued whole before the wait, cancelling ``send`` can
  never lose half a frame or duplicate one.

A peer that dies or closes shows as :class:`~ipcbus.errors.EndOfStream` on
:meth:`Link.recv` (after every frame it sent has been received) and as
:class:`~ipcbus.errors.ConnectionClosed` on send — never as SIGPIPE, a hang,
or a partial frame.
"""

from __future__ import annotations

import abc
import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

from ..errors import FrameTooLarge
from ..frames import DEFAULT_MAX_FRAME, Msg

__all__ = ["DEFAULT_HIGH_WATER", "Link", "LinkInfo", "WriteWaiters", "stored"]

_E = TypeVar("_E", bound=BaseException)


def stored(exc: _E) -> _E:
    """``exc``, a link's stored error, with its traceback cleared, to raise again.

    Each raise of one exception object adds the raising frames to its
    traceback, keeping them (and every payload they refer to) alive: a caller
    that retries on a broken link in a loop would grow it without bound.
    """
    return exc.with_traceback(None)


class WriteWaiters:
    """The tasks in a link's :meth:`Link.wait_writable`, kept by the level each waits for.

    Waking them costs a step per distinct level plus one per task woken, and
    a waiter is never looked for in a list: a storm of 20,000 requests
    waiting on one full link must not make each write (or each waiter's
    exit) scan all the others.  A cancelled waiter stays until its level is
    reached; each level's list drops them when it doubles in length.
    """

    __slots__ = ("_levels",)

    def __init__(self) -> None:
        # level -> [length that triggers the next clean-up, its futures]
        self._levels: dict[int, tuple[list[int], list[asyncio.Future[None]]]] = {}

    def __bool__(self) -> bool:
        return bool(self._levels)

    def __len__(self) -> int:
        """Waiters held, cancelled ones not yet dropped included."""
        return sum(len(futs) for _, futs in self._levels.values())

    def add(self, level: int, fut: asyncio.Future[None]) -> None:
        """Hold ``fut`` until the queue is at or below ``level`` bytes (or :meth:`release`)."""
        entry = self._levels.get(level)
        if entry is None:
            self._levels[level] = ([64], [fut])
            return
        mark, futs = entry
        futs.append(fut)
        if len(futs) >= mark[0]:
            futs[:] = [f for f in futs if not f.done()]
            mark[0] = max(64, 2 * len(futs))

    def lowest(self) -> int | None:
        """The lowest level waited for, or ``None`` when nobody waits."""
        return min(self._levels) if self._levels else None

    def wake(self, pending: int) -> None:
        """Wake every waiter whose level ``pending`` (the bytes queued now) has reached."""
        levels = self._levels
        for level in [lv for lv in levels if pending <= lv]:
            for fut in levels.pop(level)[1]:
                if not fut.done():
                    fut.set_result(None)

    def release(self, exc: BaseException | None = None) -> None:
        """Wake every waiter: with ``exc`` raised in each, or to look at the link again."""
        levels, self._levels = self._levels, {}
        for _, futs in levels.values():
            for fut in futs:
                if not fut.done():
                    if exc is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(exc)


DEFAULT_HIGH_WATER = 4 * 1024 * 1024
"""Bytes buffered in user space above which :meth:`Link.send` waits."""


@dataclass
class LinkInfo:
    """What a link is and what it has carried.  Counters are updated by the link."""

    transport: str
    peer_pid: int | None = None
    peer_uid: int | None = None
    peer_name: str = ""
    local_pid: int = field(default_factory=os.getpid)
    since: float = field(default_factory=time.time)
    msgs_in: int = 0
    msgs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    objects: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A plain-dict snapshot, suitable for msgspec/JSON encoding."""
        return asdict(self)


class Link(abc.ABC):
    """One ordered, reliable, bidirectional channel of whole frames.

    Subclasses own their file descriptors and kernel objects and release
    them in :meth:`aclose`, which is safe to call more than once.
    """

    info: LinkInfo
    max_frame: int = DEFAULT_MAX_FRAME
    high_water: int = DEFAULT_HIGH_WATER

    # -- sending ---------------------------------------------------------

    @abc.abstractmethod
    def send_nowait(self, frame: bytes) -> None:
        """Queue one whole frame for sending; never blocks.

        Raises :class:`~ipcbus.errors.FrameTooLarge` (nothing queued) when
        ``len(frame) > max_frame`` and :class:`~ipcbus.errors.ConnectionClosed`
        when the link is closed or broken.
        """

    @property
    @abc.abstractmethod
    def pending_out(self) -> int:
        """Bytes queued by :meth:`send_nowait` that the kernel has not taken yet."""

    @abc.abstractmethod
    async def wait_writable(self, threshold: int | None = None) -> None:
        """Wait until :attr:`pending_out` is at or below ``threshold``.

        ``threshold`` defaults to half the high-water mark; ``0`` waits until
        everything queued has been handed to the kernel object.  Raises
        :class:`~ipcbus.errors.ConnectionClosed` if the link breaks while
        waiting with frames still queued.
        """

    async def send(self, frame: bytes) -> None:
        """Queue one frame, then wait while the link is above its high-water mark.

        Cancel-safe: the frame is queued whole before any wait, so a
        cancelled ``send`` has queued the frame entirely, never partly.
        """
        self.send_nowait(frame)
        if self.pending_out > self.high_water:
            await self.wait_writable()

    async def drain(self) -> None:
        """Wait until every queued frame has been handed to the kernel object."""
        await self.wait_writable(0)

    def check_size(self, frame: bytes | bytearray | memoryview) -> None:
        """Raise :class:`~ipcbus.errors.FrameTooLarge` if ``frame`` is over ``max_frame``."""
        if len(frame) > self.max_frame:
            raise FrameTooLarge(len(frame), self.max_frame)

    # -- receiving -------------------------------------------------------

    @abc.abstractmethod
    async def recv(self) -> bytes | Msg:
        """Return the next whole frame (or, see :attr:`decode_large`, a decoded Msg).

        Raises :class:`~ipcbus.errors.EndOfStream` once the peer has closed and
        every frame it sent has been returned, :class:`~ipcbus.errors.ProtocolError`
        on malformed input (the link is then unusable), and
        :class:`~ipcbus.errors.ConnectionClosed` after :meth:`aclose`.
        """

    def send_parts(self, head: bytes, body: bytes) -> None:
        """Queue one frame given as two parts, ``head + body`` (as :meth:`send_nowait`).

        For large payloads (:func:`ipcbus.frames.msg_head`): transports that
        write the parts one after the other override it, so the body is never
        copied into a frame of its own.  The default joins them.
        """
        self.send_nowait(head + body)

    def send_now(self, frame: bytes) -> None:
        """:meth:`send_nowait`, then :meth:`flush_now`: for a request or a reply.

        Transports may do both in one step (one system call, nothing scheduled).
        """
        self.send_nowait(frame)
        self.flush_now()

    def flush_now(self) -> None:
        """Hand queued frames to the kernel object now, if it takes them without waiting.

        Used for requests and replies, where a loop iteration of batching costs
        more latency than it saves.  The default does nothing (frames leave on
        the transport's own schedule).
        """
        return None

    poll_after_request: bool = False
    """True for transports whose frames reach the event loop through a thread.

    Each hop over such a link costs two wake-ups (the thread's, then the
    loop's) when the loop sleeps; a node that received frames over it
    therefore keeps polling for one spin window (:meth:`ipcbus.spin.Spinner.linger`),
    so that the next ones find the loop awake (and, see :attr:`keep_polling`,
    need no thread at all).
    """

    keep_polling: Callable[[], bool] | None = None
    """Set by the reactor on links with :attr:`poll_after_request` when its
    node busy-polls (:mod:`ipcbus.spin`): whether the event loop is polling
    right now.  Such a link may then take its frames from the kernel itself,
    on every loop turn, instead of through its thread (one thread-to-loop
    hand-off less per hop), and gives the queue back to its thread once this
    says no; it may also retry a send to a full queue from the loop rather
    than wait in a thread.  ``None``: frames always come through the thread."""

    start_polling: Callable[[], None] | None = None
    """Set by the reactor with :attr:`keep_polling`: makes the node poll for
    one spin window (:meth:`ipcbus.spin.Spinner.linger`).  A SysV link whose
    peer's queue is full calls it, and tries the send again on every loop
    turn while :attr:`keep_polling` says yes, rather than wait in a thread;
    a spinner that gives way to busy processes ends that early."""

    on_frames: Callable[[], None] | None = None
    """Set by the reactor: called from the transport's read callback when
    frames arrived while a :meth:`recv` waits, so that they are handled right
    there (one loop iteration and one task switch less per hop).  The callback
    takes them with :meth:`take_ready`; whatever it leaves, the waiting
    :meth:`recv` returns as usual.  Transports that do not support it never
    call it."""

    _interrupt: BaseException | None = None  # raised by the next recv(): see interrupt()

    def interrupt(self, exc: BaseException) -> None:
        """Make the waiting (or next) :meth:`recv` raise ``exc``.

        Used by an :attr:`on_frames` callback that failed on a frame: the task
        reading the link handles the failure as if ``recv()`` had.  A
        transport that calls :attr:`on_frames` checks ``_interrupt`` at the
        top of its ``recv()`` and provides ``_wake_reader()``.
        """
        self._interrupt = exc
        self._wake_reader()

    def _wake_reader(self) -> None:
        """Wake a pending :meth:`recv` (transports that call :attr:`on_frames`)."""
        raise NotImplementedError(f"{type(self).__name__} does not deliver frames by callback")

    decode_large: Callable[[memoryview], Msg | None] | None = None
    """Set by the reactor.  A transport that reads frames where they lie
    (shared memory) may decode a large frame with it in place, saving the
    copy into a frame of its own: :meth:`recv` and :meth:`take_ready` then
    return the decoded :class:`~ipcbus.frames.Msg` instead of the bytes.
    It returns ``None`` for anything else (the transport then returns the
    bytes as usual, and the reactor reports what is wrong with them)."""

    def take_ready(self, max_bytes: int = 1 << 20) -> Sequence[bytes | Msg]:
        """Frames already received and waiting, up to about ``max_bytes``, without awaiting.

        Lets the reactor handle a whole batch per wake-up.  Transports that
        queue received frames override it; the default returns nothing.
        """
        return []

    # -- lifetime --------------------------------------------------------

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once :meth:`aclose` was called or the link broke."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Flush what is queued (briefly), then release every fd and kernel object.

        Idempotent.  The peer sees end of stream after the frames already sent.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        i = self.info
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {i.transport} peer_pid={i.peer_pid} {state}>"
