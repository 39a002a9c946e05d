"""The door: the well-known FIFO through which clients knock on a bus's hub.

A client joins a bus by writing one :class:`Knock` into ``<bus folder>/door``.
On the wire a knock is a 4-byte big-endian length followed by the knock
encoded as MessagePack (a map, so a C client can build it by hand), and the
whole write is at most ``PIPE_BUF`` (4096) bytes.  POSIX guarantees that a
write of at most ``PIPE_BUF`` bytes to a pipe is *atomic*: its bytes land
contiguously, never interleaved with another writer's.  So any number of
clients can knock at once, and the hub reads whole knocks back to back.

The hub side, :class:`Door`, opens its FIFO ``O_RDWR``.  On a FIFO that is
the right trick (Linux defines it; POSIX leaves it unspecified): the open
never blocks, and because the hub itself counts as a writer, ``read()``
never reports end of file when the last client closes its end — the door
simply waits for the next knock.

Bad input never stops the door: a knock whose length is zero or above the
limit, bytes that are not a knock, or a truncated knock are logged on the
``ipcbus.door`` logger and skipped.  Because honest knocks are atomic, a
knock is always whole in the pipe; bytes left over once the pipe is drained
can only be garbage, and are dropped — that is how the door resynchronises.

:func:`admit` and :func:`serve_door` turn knocks into links: they dispatch
on :attr:`Knock.transport` to an acceptor, run each handshake in its own
task (a slow or malicious client cannot hold up the others), and log every
refusal with the client's pid and uid.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import select
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

import anyio
import msgspec

from ..busdir import DOOR_NAME, close_in_forked_children, closing_for_good
from ..errors import (
    BusBusy,
    BusNotFound,
    DoorFull,
    HandshakeTimeout,
    IpcBusError,
    PermissionRefused,
    ProtocolError,
)
from ..frames import HEADER, PROTOCOL_VERSION
from .base import Link
from .pipe import enlarge_pipe

__all__ = [
    "MAX_KNOCK",
    "Acceptor",
    "Door",
    "DoorFull",
    "HandshakeTimeout",
    "Knock",
    "admit",
    "decode_knock",
    "encode_knock",
    "send_knock",
    "serve_door",
]

log = logging.getLogger("ipcbus.door")

MAX_KNOCK: Final = select.PIPE_BUF
"""Largest knock on the wire, length prefix included: ``PIPE_BUF``, so the write is atomic."""

_READ_CHUNK: Final = 65536
_DOOR_PIPE_SIZE: Final = 1 << 20  # room for thousands of queued knocks


class Knock(msgspec.Struct, frozen=True):
    """A client's request to join a bus, written into the door in one atomic write."""

    version: int
    """The client's :data:`ipcbus.frames.PROTOCOL_VERSION`."""
    transport: str
    """Which transport the client wants: ``"fifo"``, ``"sysv"`` or ``"shm"``."""
    pid: int
    """The client's pid."""
    uid: int
    """The client's uid as claimed; the acceptor verifies it (file owner, ``IPC_STAT``)."""
    name: str = ""
    """The client's name, shown by ``ipcbus ls``."""
    params: dict[str, int | str] = {}
    """Transport-specific parameters (FIFO paths, SysV ids, ``mtype``...)."""


class Acceptor(Protocol):
    """What :func:`admit` needs from a transport's hub side (e.g. ``FifoAcceptor``)."""

    async def accept(self, knock: Knock) -> Link:
        """Validate the knock and return the connected link, or raise to refuse it."""
        ...


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Knock)


def encode_knock(knock: Knock) -> bytes:
    """Length-prefix and encode a knock, refusing one that would not be atomic."""
    body = _encoder.encode(knock)
    if HEADER.size + len(body) > MAX_KNOCK:
        raise ValueError(
            f"knock of {HEADER.size + len(body)} bytes exceeds PIPE_BUF ({MAX_KNOCK} bytes), "
            "so it could interleave with other clients' knocks; shorten the client name "
            "or the transport parameters"
        )
    return HEADER.pack(len(body)) + body


def decode_knock(body: bytes | bytearray | memoryview) -> Knock:
    """Decode one knock body (without its length prefix); ProtocolError if malformed."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed knock ({len(body)} bytes): {exc}") from None


def send_knock(busdir: Path, knock: Knock) -> None:
    """Knock on the hub of the bus whose folder is ``busdir``; never blocks.

    Raises :class:`~ipcbus.errors.BusNotFound` when there is no door or nobody
    reads it (no hub, or a dead hub's door), :class:`~ipcbus.errors.PermissionRefused`
    when the door is not a FIFO or is a symbolic link, :class:`DoorFull` when
    the hub is not reading, and ``ValueError`` for a knock over ``PIPE_BUF``.
    """
    data = encode_knock(knock)
    busdir = Path(busdir)
    door = busdir / DOOR_NAME
    try:
        # O_NONBLOCK: a plain O_WRONLY open of a FIFO would block until a reader
        # shows up; non-blocking, it fails at once with ENXIO instead.
        fd = os.open(door, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BusNotFound(busdir.name, str(busdir.parent)) from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a door nobody reads: its hub is dead
            raise BusNotFound(busdir.name, str(busdir.parent)) from None
        if exc.errno == errno.ELOOP:
            raise PermissionRefused(f"door {door} is a symbolic link; refusing it") from None
        if exc.errno == errno.EACCES:
            raise PermissionRefused(f"may not knock on {door}: {exc.strerror}") from None
        raise
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise PermissionRefused(f"door {door} is not a FIFO; refusing to write to it")
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            raise DoorFull(
                f"the door of bus {busdir.name!r} is full: its hub is not reading knocks "
                "(overloaded or hung); retry later or restart the hub"
            ) from None
        except BrokenPipeError:  # the hub closed the door between open and write
            raise BusNotFound(busdir.name, str(busdir.parent)) from None
        if n != len(data):  # pragma: no cover - the kernel guarantees atomicity
            raise ProtocolError(f"partial knock write ({n} of {len(data)} bytes)")
    finally:
        os.close(fd)


class Door:
    """The hub side of the door: an async context manager and a source of knocks.

    On entry it creates ``<busdir>/door`` (mode ``mode``, group ``gid``),
    replacing a stale one nobody reads, and opens it ``O_RDWR`` (see the
    module docstring).  :meth:`knocks` yields each well-formed knock;
    malformed input is logged and skipped.  On exit the FIFO is removed.
    """

    def __init__(
        self, busdir: Path, *, mode: int = 0o600, gid: int | None = None, max_knock: int = MAX_KNOCK
    ) -> None:
        self.busdir = Path(busdir)
        self.path = self.busdir / DOOR_NAME
        self.mode = mode
        self.gid = gid
        self.max_knock = max_knock
        self.knocks_read = 0
        """Well-formed knocks read so far."""
        self.garbage = 0
        """Malformed knocks or chunks of garbage skipped so far."""
        self._fd = -1
        self._ident: tuple[int, int] | None = None
        self._buf = bytearray()
        self._queue: collections.deque[Knock] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once the door is closed."""
        return self._closed

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> None:
        assert self._loop is not None
        try:
            # 0600 at first whatever we want later: never wider than intended.
            os.mkfifo(self.path, 0o600)
        except FileExistsError:
            self._remove_stale()
            os.mkfifo(self.path, 0o600)
        # O_RDWR on a FIFO never blocks and keeps a writer open (our own), so
        # the door never reads as end of file between clients.
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode):  # pragma: no cover - replaced under our feet
                raise PermissionRefused(f"{self.path} is not a FIFO")
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.mode)
            enlarge_pipe(fd, _DOOR_PIPE_SIZE)
            self._loop.add_reader(fd, self._on_readable)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        self._fd = fd
        self._ident = (st.st_dev, st.st_ino)
        close_in_forked_children(fd, self._forked_off)

    def _forked_off(self) -> None:
        # In a forked child: the door stays the parent's (closing it here
        # would remove the parent's FIFO).
        self._fd = -1
        self._closed = True

    def _remove_stale(self) -> None:
        st = os.lstat(self.path)
        if not stat.S_ISFIFO(st.st_mode):
            raise PermissionRefused(
                f"{self.path} exists and is not a FIFO; refusing to replace it. Remove it"
            )
        try:
            probe = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            log.info("replacing the stale door %s (nobody reads it)", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        os.close(probe)
        raise BusBusy(f"another process is serving the door {self.path}")

    def close(self) -> None:
        """Stop reading, close and remove the door FIFO.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, -1
        if fd >= 0:
            closing_for_good(fd)
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_readable(self) -> None:
        fd = self._fd
        got = False
        while fd >= 0:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # pragma: no cover - a FIFO read has no other failure
                log.error("reading the door %s failed: %s", self.path, exc)
                break
            if not chunk:  # pragma: no cover - we hold a writer: no EOF
                break
            got = True
            self._buf += chunk
            self._parse()
        if got and self._buf:
            # The pipe is drained, so a partial knock cannot be completed by a
            # later read (honest knocks are written atomically): it is garbage.
            self._reject(f"{len(self._buf)} stray bytes (a truncated knock)")
        if self._queue:
            self._wake()

    def _reject(self, what: str) -> None:
        self.garbage += 1
        log.warning("door of %s: skipped %s; the door keeps serving", self.busdir.name, what)
        self._buf.clear()

    def _parse(self) -> None:
        buf = self._buf
        hsize = HEADER.size
        pos = 0
        while len(buf) - pos >= hsize:
            (n,) = HEADER.unpack_from(buf, pos)
            if n == 0 or hsize + n > self.max_knock:
                del buf[:pos]
                self._reject(
                    f"garbage: a knock announced as {n} bytes (knocks are 1 to "
                    f"{self.max_knock - hsize} bytes); dropped {len(buf)} buffered bytes"
                )
                return
            if len(buf) - pos - hsize < n:
                break
            body = bytes(buf[pos + hsize : pos + hsize + n])
            pos += hsize + n
            try:
                knock = decode_knock(body)
            except ProtocolError as exc:
                self.garbage += 1
                log.warning("door of %s: skipped %s", self.busdir.name, exc)
                continue
            self.knocks_read += 1
            self._queue.append(knock)
        if pos:
            del buf[:pos]

    async def knocks(self) -> AsyncIterator[Knock]:
        """Yield each well-formed knock, in arrival order, until the door is closed."""
        if self._loop is None:
            raise RuntimeError("use `async with Door(...)` before reading knocks")
        while True:
            while self._queue:
                yield self._queue.popleft()
            if self._closed:
                return
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._fd >= 0 else "new")
        return f"<Door {self.path} {state} knocks={self.knocks_read} garbage={self.garbage}>"


async def admit(knock: Knock, acceptors: Mapping[str, Acceptor]) -> Link | None:
    """Hand a knock to its transport's acceptor; log and return None if refused.

    Refusals (wrong protocol version, unknown transport, any
    :class:`~ipcbus.errors.IpcBusError`, ``OSError`` or ``ValueError`` from the acceptor) are
    logged at WARNING on ``ipcbus.door`` with the client's pid and uid.
    """
    who = f"pid {knock.pid} uid {knock.uid}" + (f" ({knock.name!r})" if knock.name else "")
    if knock.version != PROTOCOL_VERSION:
        log.warning(
            "refused knock from %s: protocol version %d, this hub speaks %d",
            who,
            knock.version,
            PROTOCOL_VERSION,
        )
        return None
    acceptor = acceptors.get(knock.transport)
    if acceptor is None:
        log.warning(
            "refused knock from %s: unknown transport %r (this hub accepts %s)",
            who,
            knock.transport,
            ", ".join(sorted(acceptors)) or "nothing",
        )
        return None
    try:
        return await acceptor.accept(knock)
    except (IpcBusError, OSError, ValueError) as exc:
        log.warning("refused %s knock from %s: %s", knock.transport, who, exc)
        return None
    except Exception as exc:  # e.g. sysv_ipc/posix_ipc errors: one client's, not the hub's
        log.error(
            "refused %s knock from %s: %s: %s", knock.transport, who, type(exc).__name__, exc,
            exc_info=True,
        )
        return None


async def serve_door(
    door: Door,
    acceptors: Mapping[str, Acceptor],
    on_link: Callable[[Link, Knock], object],
    *,
    max_pending: int = 256,
    on_refused: Callable[[Knock], object] | None = None,
) -> None:
    """Serve knocks until the door closes (or this is cancelled).

    Each knock's handshake runs in its own task, at most ``max_pending`` at
    once, so a client that knocks and never opens its side costs the others
    nothing, and a flood of knocks waits in the door.  ``on_link(link,
    knock)`` takes ownership of each accepted link; if it raises, the error
    is logged and the link closed.  ``on_refused(knock)`` is told of each
    refused knock (the refusal is logged already).
    """
    limiter = anyio.CapacityLimiter(max_pending)

    async def one(knock: Knock, token: object) -> None:
        try:
            link = await admit(knock, acceptors)
        finally:
            limiter.release_on_behalf_of(token)
        if link is None:
            if on_refused is not None:
                on_refused(knock)
            return
        try:
            on_link(link, knock)
        except Exception:
            log.exception("the hub failed to take the link of pid %d; closing it", knock.pid)
            await link.aclose()

    async with anyio.create_task_group() as tg:
        async for knock in door.knocks():
            token = object()  # a Knock holds a dict: not hashable, so not a borrower
            await limiter.acquire_on_behalf_of(token)
            tg.start_soon(one, knock, token)
