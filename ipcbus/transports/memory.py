"""An in-process link pair, for unit tests of the reactor.

It behaves like a kernel-backed link: a bounded "kernel buffer" per
direction (whole frames), a user-space outbound queue in front of it,
end of stream after the peer closes, ``ConnectionClosed`` once the peer is
gone.  It passes :func:`ipcbus.testing.check_link`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from ..errors import ConnectionClosed, EndOfStream, ProtocolError
from ..frames import DEFAULT_MAX_FRAME
from .base import DEFAULT_HIGH_WATER, Link, LinkInfo, WriteWaiters

__all__ = ["MemoryLink", "memory_pair"]


class _Channel:
    """One direction: the simulated kernel buffer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.frames: collections.deque[bytes] = collections.deque()
        self.nbytes = 0
        self.writer_closed = False
        self.reader_closed = False


class MemoryLink(Link):
    """One end of an in-memory link; create pairs with :func:`memory_pair`."""

    def __init__(
        self,
        inbound: _Channel,
        outbound: _Channel,
        *,
        max_frame: int,
        high_water: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._in = inbound
        self._out = outbound
        self.max_frame = max_frame
        self.high_water = high_water
        self.info = LinkInfo(transport="memory")
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._closed = False
        self._wwaiters = WriteWaiters()
        self._rwaiter: asyncio.Future[None] | None = None
        self.peer: MemoryLink | None = None

    def _pump(self) -> None:
        """Move queued frames into the peer's channel while it has room."""
        out = self._out
        if out.reader_closed:
            self._pending.clear()
            self._pending_bytes = 0
        moved = False
        while self._pending and (not out.frames or out.nbytes < out.capacity):
            f = self._pending.popleft()
            self._pending_bytes -= len(f)
            out.frames.append(f)
            out.nbytes += len(f)
            moved = True
        if moved and self.peer is not None:
            self.peer._wake_reader()
        self._wwaiters.wake(self._pending_bytes)

    def send_nowait(self, frame: bytes) -> None:
        """Queue one whole frame."""
        if self._closed:
            raise ConnectionClosed("link is closed")
        if self._out.reader_closed:
            raise ConnectionClosed("memory link: the peer is gone")
        self.check_size(frame)
        if not frame:
            raise ProtocolError("refusing to send an empty frame")
        self._pending.append(bytes(frame))
        self._pending_bytes += len(frame)
        self.info.msgs_out += 1
        self.info.bytes_out += len(frame)
        self._pump()

    @property
    def pending_out(self) -> int:
        """Bytes queued but not yet in the simulated kernel buffer."""
        return self._pending_bytes

    async def wait_writable(self, threshold: int | None = None) -> None:
        """Wait until at most ``threshold`` bytes are queued."""
        limit = self.high_water // 2 if threshold is None else threshold
        while self._pending_bytes > limit:
            if self._closed:
                raise ConnectionClosed("link is closed")
            if self._out.reader_closed:
                raise ConnectionClosed("memory link: the peer is gone")
            fut = self._loop.create_future()
            self._wwaiters.add(limit, fut)
            await fut
        if self._out.reader_closed and not self._closed:
            raise ConnectionClosed("memory link: the peer is gone")

    def _wake_reader(self) -> None:
        w = self._rwaiter
        if w is not None and not w.done():
            w.set_result(None)

    async def recv(self) -> bytes:
        """Return the next frame."""
        while True:
            if self._closed:
                raise ConnectionClosed("link is closed")
            ch = self._in
            if ch.frames:
                f = ch.frames.popleft()
                ch.nbytes -= len(f)
                self.info.msgs_in += 1
                self.info.bytes_in += len(f)
                if self.peer is not None:
                    self.peer._pump()
                return f
            if ch.writer_closed:
                raise EndOfStream("memory link: peer closed")
            self._rwaiter = self._loop.create_future()
            try:
                await self._rwaiter
            finally:
                self._rwaiter = None

    @property
    def closed(self) -> bool:
        """True after :meth:`aclose`."""
        return self._closed

    def abort(self) -> None:
        """Close at once (what a crash looks like to the peer)."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._pending_bytes = 0
        self._out.writer_closed = True
        self._in.reader_closed = True
        self._in.frames.clear()
        self._in.nbytes = 0
        self._wwaiters.release(ConnectionClosed("link is closed"))
        self._wake_reader()
        if self.peer is not None:
            self.peer._wake_reader()
            self.peer._pump()

    async def aclose(self) -> None:
        """Flush briefly, then close."""
        if self._closed:
            return
        try:
            if self._pending:
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self.drain()
        finally:
            self.abort()


def memory_pair(
    *,
    capacity: int = 65536,
    max_frame: int = DEFAULT_MAX_FRAME,
    high_water: int = DEFAULT_HIGH_WATER,
) -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-memory links (call inside a running event loop)."""
    ab, ba = _Channel(capacity), _Channel(capacity)
    a = MemoryLink(ba, ab, max_frame=max_frame, high_water=high_water)
    b = MemoryLink(ab, ba, max_frame=max_frame, high_water=high_water)
    a.peer, b.peer = b, a
    return a, b
