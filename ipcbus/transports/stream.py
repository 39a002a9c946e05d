"""A Link over a pair of non-blocking byte-stream file descriptors.

Both the anonymous-pipe and the FIFO transports end up here: once their
rendezvous is done they are just one fd to read and one fd to write.

The link owns both fds.  It sets them non-blocking and waits on them through
the event loop (``add_reader``/``add_writer``), so nothing blocks the loop.
Like trio's ``_unix_pipes``, closing sets the fd fields to -1 so that a late
use fails with EBADF instead of touching an fd number the process has since
reused for something else.

Writes: frames are queued whole (length prefix + body) and flushed on the
next loop iteration with ``writev``, so every frame queued during one
iteration leaves in as few system calls as possible.  ``EAGAIN`` means the
kernel buffer is full: wait for writability.  ``EPIPE`` means the reader is
gone: Python ignores SIGPIPE, so this surfaces as ``ConnectionClosed``.

Reads: one ``readv`` into a reusable buffer per readiness callback, framed by
:class:`~ipcbus.frames.FrameReader`.  Reading pauses while more than the
high-water mark of decoded frames wait for ``recv()``, so a stalled consumer
fills the kernel pipe and the writer feels backpressure.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import select
from typing import Any

from ..busdir import close_in_forked_children, closing_for_good
from ..errors import ConnectionClosed, EndOfStream, FrameTooLarge, ProtocolError
from ..frames import DEFAULT_MAX_FRAME, HEADER, FrameReader
from .base import DEFAULT_HIGH_WATER, Link, LinkInfo, WriteWaiters, stored

__all__ = ["FdStreamLink"]

_IOV_MAX = 1024
_EAGER_BYTES = 64 * 1024  # queued bytes that are written at once, without waiting for the turn
_URGENT_BYTES = 1024  # the same, for urgent frames (send_now): someone waits on each
# Queued buffers this small on average are joined and written with one write():
# each iovec of a writev costs the kernel more than copying a small one here.
_JOIN_AVERAGE = 512
_READ_CHUNK = 1 << 20  # the most one read takes
_FIRST_READ = 64 * 1024  # a new link's read buffer; it grows (x4) while reads fill it
_CLOSE_FLUSH_TIMEOUT = 2.0


class FdStreamLink(Link):
    """A :class:`~ipcbus.transports.base.Link` over a read fd and a write fd.

    Must be created inside a running event loop.  The link takes ownership of
    ``rfd`` and ``wfd`` (they may be the same fd) and closes them.
    """

    pending_out: int = 0
    """Bytes queued in this process, not yet written to the kernel (a plain
    attribute here: a requester reads it on every request)."""

    def __init__(
        self,
        rfd: int,
        wfd: int,
        *,
        transport: str,
        max_frame: int = DEFAULT_MAX_FRAME,
        high_water: int = DEFAULT_HIGH_WATER,
        peer_pid: int | None = None,
        peer_uid: int | None = None,
        peer_name: str = "",
        objects: dict[str, Any] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._rfd = rfd
        self._wfd = wfd
        os.set_blocking(rfd, False)
        if wfd != rfd:
            os.set_blocking(wfd, False)
        self.max_frame = max_frame
        self.high_water = high_water
        self.info = LinkInfo(
            transport=transport,
            peer_pid=peer_pid,
            peer_uid=peer_uid,
            peer_name=peer_name,
            objects=dict(objects or {}),
        )
        self._framer = FrameReader(max_frame)
        # Small at first: a hub holds one per client, most of them quiet.
        self._rbuf = bytearray(_FIRST_READ)
        self._rq: collections.deque[bytes] = collections.deque()
        self._rq_bytes = 0
        self._reading = False
        self._eof = False
        self._reads = 0  # successful reads (see _reader_gone)
        self._rerror: BaseException | None = None
        self._rwaiter: asyncio.Future[None] | None = None
        self._wq: collections.deque[bytes | memoryview] = collections.deque()
        self.pending_out = 0
        self._flush_scheduled = False
        self._eager_used = False
        self._writer_added = False
        self._werror: ConnectionClosed | None = None
        self._wwaiters = WriteWaiters()
        self._closed = False
        # A child this process forks (os.fork, multiprocessing's "fork") must
        # not keep the link's fds: the peer would never see end of stream
        # when this process dies.
        for fd in {rfd, wfd}:
            close_in_forked_children(fd, self._forked_off)
        self._resume_reading()

    def _forked_off(self) -> None:
        # In a forked child, whose copy of the link is dead: forget the fds
        # (closed right after), touch nothing of the parent's loop.
        self._closed = True
        self._rfd = self._wfd = -1

    # -- sending ---------------------------------------------------------

    def send_nowait(self, frame: bytes) -> None:
        """Queue one whole frame; it leaves on the next loop iteration."""
        n = len(frame)
        if not 0 < n <= 65536 or n > self.max_frame or self._werror is not None or self._closed:
            # Large (not copied into a frame of its own), empty or refused: the general path.
            self.send_parts(b"", frame)
            return
        self._wq.append(HEADER.pack(n) + frame)
        self._queued(n)

    def send_parts(self, head: bytes, body: bytes) -> None:
        """Queue one frame given as ``head + body``; ``writev`` sends both, unjoined."""
        if self._werror is not None or self._closed:
            raise stored(self._werror) if self._werror else ConnectionClosed("link is closed")
        n = len(head) + len(body)
        if not 0 < n <= self.max_frame:
            if n:
                raise FrameTooLarge(n, self.max_frame)
            raise ProtocolError("refusing to send an empty frame")
        self._wq.append(HEADER.pack(n) + head)
        if body:
            self._wq.append(body)
        self._queued(n)

    def _queued(self, n: int) -> None:
        """Count a frame of ``n`` bytes just queued, and see that it leaves."""
        self.pending_out += n + 4
        info = self.info
        info.msgs_out += 1
        info.bytes_out += n
        if not self._writer_added:
            if self.pending_out >= _EAGER_BYTES:
                # A burst: hand the kernel what is queued now, so the reader
                # starts on it while this task keeps producing, instead of
                # everything waiting for the high-water mark or the next turn.
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    async def wait_writable(self, threshold: int | None = None) -> None:
        """Wait until the outbound queue is at or below ``threshold`` bytes."""
        limit = self.high_water // 2 if threshold is None else threshold
        while self.pending_out > limit:
            if self._werror is not None:
                raise stored(self._werror)
            if self._closed:
                raise ConnectionClosed("link is closed")
            fut = self._loop.create_future()
            self._wwaiters.add(limit, fut)
            await fut
        if self._werror is not None:
            raise stored(self._werror)

    def send_now(self, frame: bytes) -> None:
        """Queue one frame and write it at once if nothing is queued before it.

        The eager write of this loop iteration (see :meth:`flush_now`), in one
        ``write`` and without scheduling a flush; otherwise as :meth:`send_nowait`.
        """
        n = len(frame)
        if not 0 < n <= 65536 or n > self.max_frame or self._werror is not None or self._closed:
            self.send_nowait(frame)  # the general path: large, empty or refused
            self.flush_now()
            return
        if self._eager_used:
            # Not the iteration's first urgent write: it joins the queue (as
            # send_nowait), and mostly a flush is on its way already (_queued, inlined).
            self._wq.append(HEADER.pack(n) + frame)
            self.pending_out += n + 4
            info = self.info
            info.msgs_out += 1
            info.bytes_out += n
            if self._writer_added:
                return
            if self.pending_out >= _URGENT_BYTES:
                # Urgent frames piling up in this turn (a requester pipelining, a
                # service answering a batch): the peer starts on these while
                # this process makes the rest, both CPUs busy.
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
            return
        if self._wq or self._writer_added:  # the first, behind others: all go now
            self._wq.append(HEADER.pack(n) + frame)
            self._queued(n)
            self.flush_now()
            return
        self._eager_used = True
        self._loop.call_soon(self._reset_eager)
        data = HEADER.pack(n) + frame
        self.info.msgs_out += 1
        self.info.bytes_out += n
        try:
            written = os.write(self._wfd, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            self._write_failed(exc)
            raise stored(self._werror) if self._werror else ConnectionClosed("link is closed") from None
        if written < len(data):  # the pipe is full: the rest waits for writability
            rest = memoryview(data)[written:]
            self._wq.append(rest)
            self.pending_out += len(rest)
            self._loop.add_writer(self._wfd, self._flush)
            self._writer_added = True

    def flush_now(self) -> None:
        """Write what is queued now, at most once per loop iteration.

        The first urgent frame of an iteration leaves at once (the peer can
        start on it while we go on); later ones batch into the iteration's
        writev, so a burst costs one system call, not one per frame.
        """
        if self._wq and not self._writer_added and not self._eager_used:
            self._eager_used = True
            self._loop.call_soon(self._reset_eager)
            self._flush()

    def _reset_eager(self) -> None:
        self._eager_used = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        fd = self._wfd
        wq = self._wq
        while wq:
            if fd < 0:
                return
            k = len(wq)
            try:
                if k == 1:
                    n = os.write(fd, wq[0])
                elif k <= _IOV_MAX and self.pending_out <= _JOIN_AVERAGE * k:
                    n = os.write(fd, b"".join(wq))
                else:
                    n = os.writev(fd, list(wq) if k <= _IOV_MAX else [wq[i] for i in range(_IOV_MAX)])
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                self._write_failed(exc)
                return
            self.pending_out -= n
            if not self.pending_out:  # all of it went (the common case)
                wq.clear()
                break
            while n:
                head = wq[0]
                hl = len(head)
                if n >= hl:
                    wq.popleft()
                    n -= hl
                else:
                    wq[0] = memoryview(head)[n:]
                    n = 0
        if wq:
            if not self._writer_added and fd >= 0:
                self._loop.add_writer(fd, self._flush)
                self._writer_added = True
        elif self._writer_added:
            self._loop.remove_writer(fd)
            self._writer_added = False
        if self._wwaiters:
            self._wwaiters.wake(self.pending_out)

    def _write_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            msg = f"{self.info.transport} link: the reader is gone (EPIPE)"
        else:
            msg = f"{self.info.transport} link: write failed: {exc}"
        self._werror = ConnectionClosed(msg)
        self._wq.clear()
        self.pending_out = 0
        if self._writer_added:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._wfd)
            self._writer_added = False
        self._wwaiters.release(self._werror)
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            self._loop.call_soon(self._reader_gone)

    def _reader_gone(self) -> None:
        """The peer no longer reads: a link that can only go one way is over.

        A peer that died has closed its writing end too (``POLLHUP`` here):
        what it wrote before is read to its end of stream, as always, however
        long the application takes to read it.  One still running that closed
        only its reading end (a plugin closing file descriptors) would keep
        the link open for ever, half of it dead: ``recv()`` raises
        ``ConnectionClosed`` after the frames already received.
        """
        if self._eof or self._rerror is not None or self._closed or self._rfd < 0:
            return
        poller = select.poll()
        poller.register(self._rfd, select.POLLIN)
        if any(ev & select.POLLHUP for _fd, ev in poller.poll(0)):
            return  # the writer is gone too: its end of stream comes
        # What it wrote before it stopped reading is delivered first (read
        # now, even while reading is paused: at most a pipe's worth).
        while not self._eof and self._rerror is None and not self._closed:
            got = self._reads
            self._on_readable()
            if self._reads == got:  # nothing more there now (EAGAIN)
                break
        if self._eof or self._rerror is not None or self._closed:
            return
        self._rerror = ConnectionClosed(
            f"{self.info.transport} link: the peer stopped reading (EPIPE) but still runs"
        )
        self._pause_reading()
        self._wake_reader()

    # -- receiving -------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self._reading and not self._eof and self._rfd >= 0 and self._rerror is None:
            self._loop.add_reader(self._rfd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._rfd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            n = os.readv(self._rfd, [self._rbuf])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._rerror = ConnectionClosed(f"{self.info.transport} link: read failed: {exc}")
            self._pause_reading()
            self._wake_reader()
            return
        self._reads += 1
        if n == 0:
            self._eof = True
            self._pause_reading()
            if not self._framer.at_boundary():
                self._rerror = ProtocolError(
                    f"{self.info.transport} link: peer closed in the middle of a frame "
                    f"({self._framer.buffered} bytes of it received)"
                )
            self._wake_reader()
            return
        buf = self._rbuf
        if n == len(buf) and n < _READ_CHUNK:  # more may wait: read more at a time from now on
            self._rbuf = bytearray(min(4 * n, _READ_CHUNK))
        try:
            frames = self._framer.feed(memoryview(buf)[:n])
        except ProtocolError as exc:
            self._rerror = exc
            self._pause_reading()
            self._wake_reader()
            return
        if frames:
            rq = self._rq
            rq.extend(frames)
            self._rq_bytes += sum(map(len, frames))
            hook = self.on_frames
            if hook is not None and self._rwaiter is not None and self._interrupt is None:
                hook()  # the reader is idle: handle the frames in this callback
            if rq:
                if self._rq_bytes > self.high_water:
                    self._pause_reading()
                self._wake_reader()
        if self._framer.error is not None:  # a bad header after these good frames
            self._rerror = self._framer.error
            self._pause_reading()
            self._wake_reader()

    def _wake_reader(self) -> None:
        w = self._rwaiter
        if w is not None and not w.done():
            w.set_result(None)

    async def recv(self) -> bytes:
        """Return the next whole frame (see :meth:`Link.recv` for what it raises)."""
        while True:
            if self._interrupt is not None:
                exc, self._interrupt = self._interrupt, None
                raise exc
            if self._closed:  # closed here: what is still buffered is dropped with it
                raise ConnectionClosed("link is closed")
            rq = self._rq
            if rq:
                frame = rq.popleft()
                n = len(frame)
                self._rq_bytes -= n
                self.info.msgs_in += 1
                self.info.bytes_in += n
                if not self._reading and self._rq_bytes <= self.high_water // 2:
                    self._resume_reading()
                return frame
            if self._closed:
                raise ConnectionClosed("link is closed")
            if self._rerror is not None:
                raise stored(self._rerror)
            if self._eof:
                raise EndOfStream(f"{self.info.transport} link: peer closed")
            self._rwaiter = self._loop.create_future()
            try:
                await self._rwaiter
            finally:
                self._rwaiter = None

    def take_ready(self, max_bytes: int = 1 << 20) -> list[bytes]:
        """Frames already decoded and waiting, up to about ``max_bytes`` (no await)."""
        rq = self._rq
        if not rq or self._closed:
            return []
        if self._rq_bytes <= max_bytes:  # all of it (the common case): no loop
            frames = list(rq)
            rq.clear()
            taken = self._rq_bytes
        else:
            frames = []
            taken = 0
            pop = rq.popleft
            while rq and taken < max_bytes:
                f = pop()
                taken += len(f)
                frames.append(f)
        self._rq_bytes -= taken
        self.info.msgs_in += len(frames)
        self.info.bytes_in += taken
        if not self._reading and self._rq_bytes <= self.high_water // 2:
            self._resume_reading()
        return frames

    # -- lifetime --------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once closed locally or broken for writing."""
        return self._closed

    def abort(self) -> None:
        """Close at once, dropping whatever is still queued for writing."""
        if self._closed:
            return
        self._closed = True
        self._pause_reading()
        if self._writer_added:
            self._loop.remove_writer(self._wfd)
            self._writer_added = False
        rfd, wfd = self._rfd, self._wfd
        self._rfd = self._wfd = -1
        for fd in {rfd, wfd}:
            if fd >= 0:
                closing_for_good(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wq.clear()
        self.pending_out = 0
        closed = ConnectionClosed("link is closed")
        self._wwaiters.release(closed)
        self._wake_reader()

    async def aclose(self) -> None:
        """Flush queued frames (for at most two seconds), then close both fds."""
        if self._closed:
            return
        try:
            if self._wq and self._werror is None:
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT):
                        await self.drain()
        finally:
            self.abort()
