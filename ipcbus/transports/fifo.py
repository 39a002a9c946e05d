"""The FIFO transport: two named pipes per link, met through the hub's door.

Rendezvous (``docs/transports/fifo.md`` has the byte-level description)::

    client                                        hub
    mkfifo c2h, h2c in the bus folder (0600)
    open h2c O_RDONLY|O_NONBLOCK
    open c2h O_RDWR   (temporary, see below)
    write Knock{c2h, h2c} into the door  ---->    validate the knock and both FIFOs
                                                  open h2c O_WRONLY|O_NONBLOCK
                                                  open c2h O_RDONLY|O_NONBLOCK
                                        <----     write ACK (1 byte) on h2c
    read ACK from h2c
    open c2h O_WRONLY|O_NONBLOCK, close O_RDWR fd
    write ACK (1 byte) on c2h            ---->    read ACK from c2h
    unlink both FIFOs                             unlink both FIFOs (whoever is first)
    ... length-prefixed frames both ways (FdStreamLink) ...

Why each step (the FIFO rules of the Linux IPC guide):

* ``open()`` of a FIFO blocks until the other end opens.  Every open here is
  ``O_NONBLOCK``, which never blocks: ``O_RDONLY`` succeeds at once, and
  ``O_WRONLY`` fails with ``ENXIO`` while nobody reads.  The client opens its
  read end before knocking, so the hub's ``O_WRONLY`` open of h2c succeeds;
  a client that knocks without opening makes the hub retry (a FIFO has no
  event for "a reader arrived") until a deadline, then give up.
* The client cannot open c2h ``O_WRONLY`` before the hub reads it, so it
  holds it ``O_RDWR`` meanwhile — the one place where ``O_RDWR`` is the right
  trick: it never blocks, and it makes the client a writer from the start,
  so the hub's read end sees end of file if the client dies at any point.
  Once the hub's ACK proves the hub reads c2h, the client reopens it
  ``O_WRONLY`` and closes the ``O_RDWR`` fd: otherwise the client would be a
  reader of its own FIFO and a dead hub would never give it ``EPIPE``.
* A read with no writer yet is not end of stream.  ``read()`` on such a
  FIFO returns 0 just like at end of file, but the kernel does not report it
  readable (it suppresses ``EPOLLHUP`` until a writer has come and gone), and
  these fds are only ever read when the event loop reports them readable.
* Unlinking a FIFO does not break an open link: the files are removed as
  soon as both sides hold their fds, so none is left behind by a link,
  however it ends.  A client SIGKILLed before the handshake completes leaves
  files that the hub removes when it gives up, or that ``remove_stale_fifos``
  sweeps (their names carry the dead pid).
* A writer whose reader is gone gets ``EPIPE`` (Python ignores ``SIGPIPE``):
  the link turns it into :class:`~ipcbus.errors.ConnectionClosed`.

Security (``docs/security.md``): the hub opens only FIFOs that sit directly in
the bus folder (opened relative to the folder's fd with ``O_NOFOLLOW``), are
FIFOs (checked with ``lstat`` before opening and ``fstat`` after, same inode),
belong to the bus owner (or the bus group) and to the uid the knock claims,
and are not open to other users.  Anything else is refused with
:class:`~ipcbus.errors.PermissionRefused`, and the hub keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from ..busdir import FIFO_NAME_RE, check_bus_path, client_fifo_names, remove_stale_fifos
from ..errors import BusNotFound, ConnectionClosed, PermissionRefused, ProtocolError
from ..frames import DEFAULT_MAX_FRAME, PROTOCOL_VERSION
from ..records import process_alive
from . import door as _door
from .base import DEFAULT_HIGH_WATER
from .door import HandshakeTimeout, Knock
from .pipe import enlarge_pipe
from .stream import FdStreamLink

__all__ = [
    "ACK",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "FifoAcceptor",
    "FifoLink",
    "connect_fifo",
    "fifo_pair",
]

ACK: Final = b"\x06"
"""The one byte each side writes once its ends are open, before any frame."""

DEFAULT_HANDSHAKE_TIMEOUT: Final = 5.0
"""Seconds either side waits for the other to open its ends."""

_RD: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_WR: Final = os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_RDWR: Final = os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FifoLink(FdStreamLink):
    """A link over two FIFOs: read from one, write to the other.

    The FIFO files are already unlinked when a ``FifoLink`` exists (an open
    FIFO keeps working without its name), so closing it has nothing to remove.
    """

    def __init__(
        self,
        rfd: int,
        wfd: int,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        high_water: int = DEFAULT_HIGH_WATER,
        peer_pid: int | None = None,
        peer_uid: int | None = None,
        peer_name: str = "",
        fifos: tuple[str, str] | None = None,
    ) -> None:
        objects: dict[str, object] = {}
        if fifos is not None:
            objects = {"read": fifos[0], "write": fifos[1]}
        super().__init__(
            rfd,
            wfd,
            transport="fifo",
            max_frame=max_frame,
            high_water=high_water,
            peer_pid=peer_pid,
            peer_uid=peer_uid,
            peer_name=peer_name,
            objects=objects,
        )


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _ftype(mode: int) -> str:
    for test, what in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return what
    return "not a FIFO"


async def _wait_readable(fd: int, deadline: float, other: int = -1) -> int | None:
    """Wait until ``fd`` (or ``other``, e.g. a pidfd) is readable; the fd, or None at deadline."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def ready(which: int) -> None:
        if not fut.done():
            fut.set_result(which)

    loop.add_reader(fd, ready, fd)
    if other >= 0:
        loop.add_reader(other, ready, other)
    try:
        async with asyncio.timeout_at(deadline):
            return await fut
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)
        if other >= 0:
            loop.remove_reader(other)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class FifoAcceptor:
    """The hub side of the FIFO transport: turns knocks into :class:`FifoLink` s.

    Use as an async context manager (it holds an fd of the bus folder, through
    which every client FIFO is opened, and sweeps FIFOs of dead clients on
    entry).  ``mode``/``gid`` describe the bus: 0600 private, or 0660 with
    group ``gid``.  ``timeout`` bounds each handshake.  Run each
    :meth:`accept` in its own task (``serve_door`` does): it waits for the client.
    """

    def __init__(
        self,
        busdir: Path,
        *,
        mode: int = 0o600,
        gid: int | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        high_water: int = DEFAULT_HIGH_WATER,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.busdir = Path(busdir)
        self.mode = mode
        self.gid = gid
        self.max_frame = max_frame
        self.high_water = high_water
        self.timeout = timeout
        self.owner_uid = -1
        self._dirfd = -1
        self._in_progress: set[tuple[int, int, int]] = set()  # FIFO pairs being handshaken
        self._real = ""

    async def __aenter__(self) -> Self:
        self._open_dir()
        return self

    def _open_dir(self) -> None:
        try:
            fd = os.open(self.busdir, _DIR)
        except FileNotFoundError:
            raise BusNotFound(self.busdir.name, str(self.busdir.parent)) from None
        except OSError as exc:
            raise PermissionRefused(f"cannot open bus folder {self.busdir}: {exc}") from None
        self._dirfd = fd
        self.owner_uid = os.fstat(fd).st_uid
        self._real = os.path.realpath(self.busdir)
        remove_stale_fifos(self.busdir)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._dirfd = self._dirfd, -1
        if fd >= 0:
            os.close(fd)

    # -- validation --------------------------------------------------------

    def _name(self, knock: Knock, kind: str) -> str:
        raw = knock.params.get(kind)
        if not isinstance(raw, str) or not raw:
            raise ProtocolError(
                f"a fifo knock must name its FIFOs in params 'c2h' and 'h2c' (strings); got {kind}={raw!r}"
            )
        parent, name = os.path.split(raw)
        # A bare name is in the bus folder (it is opened relative to it); a
        # path (older clients send one) must lead there.
        if parent and os.path.realpath(parent) != self._real:
            raise PermissionRefused(
                f"{kind} FIFO {raw!r} is outside the bus folder {self.busdir}; "
                "client FIFOs must be made directly inside it"
            )
        m = FIFO_NAME_RE.match(name)
        if m is None or int(m.group(1)) != knock.pid or m.group(3) != kind:
            raise ProtocolError(
                f"{kind} FIFO name {name!r} is not fifo-<pid>-<16 hex digits>.{kind} "
                f"with the knocking pid {knock.pid}"
            )
        return name

    def _check_owner(self, st: os.stat_result, name: str, kind: str, knock: Knock) -> None:
        path = self.busdir / name
        mode = stat.S_IMODE(st.st_mode)
        if self.gid is None:
            if st.st_uid != self.owner_uid:
                raise PermissionRefused(
                    f"{kind} FIFO {path} belongs to {_who(st.st_uid)}; only the bus owner "
                    f"({_who(self.owner_uid)}) may join this private bus"
                )
            if mode & 0o077:
                raise PermissionRefused(
                    f"{kind} FIFO {path} has mode {mode:04o}, open to other users; expected 0600"
                )
        else:
            if st.st_uid != self.owner_uid and st.st_gid != self.gid:
                raise PermissionRefused(
                    f"{kind} FIFO {path} belongs to {_who(st.st_uid)} and group {st.st_gid}; "
                    f"only the bus owner and group {self.gid} may join this bus"
                )
            if mode & 0o007:
                raise PermissionRefused(
                    f"{kind} FIFO {path} has mode {mode:04o}, open to users outside the "
                    "bus group; expected 0660"
                )
        if st.st_uid != knock.uid:
            raise PermissionRefused(
                f"{kind} FIFO {path} belongs to {_who(st.st_uid)}, but the knock claims uid {knock.uid}"
            )

    def _lstat(self, name: str, kind: str, knock: Knock) -> os.stat_result:
        path = self.busdir / name
        try:
            st = os.stat(name, dir_fd=self._dirfd, follow_symlinks=False)
        except FileNotFoundError:
            raise ProtocolError(
                f"{kind} FIFO {path} does not exist (a client makes both FIFOs before knocking)"
            ) from None
        if stat.S_ISLNK(st.st_mode):
            raise PermissionRefused(f"{kind} FIFO {path} is a symbolic link; refused")
        if not stat.S_ISFIFO(st.st_mode):
            raise PermissionRefused(f"{kind} {path} is {_ftype(st.st_mode)}, not a FIFO; refused")
        self._check_owner(st, name, kind, knock)
        return st

    def _check_opened(self, fd: int, before: os.stat_result, name: str, kind: str, knock: Knock) -> None:
        # fstat on the fd we hold: whatever happened to the path since lstat,
        # this is the file we will use (no time-of-check/time-of-use gap).
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or not _same(st, before):
            raise PermissionRefused(
                f"{kind} FIFO {self.busdir / name} was replaced while the hub opened it; refused"
            )
        self._check_owner(st, name, kind, knock)

    def _open(self, name: str, flags: int, kind: str) -> int:
        try:
            return os.open(name, flags, dir_fd=self._dirfd)
        except OSError as exc:
            path = self.busdir / name
            if exc.errno == errno.ELOOP:
                raise PermissionRefused(f"{kind} FIFO {path} is a symbolic link; refused") from None
            if exc.errno == errno.ENOENT:
                raise ProtocolError(f"{kind} FIFO {path} vanished during the handshake") from None
            if exc.errno == errno.ENXIO:
                raise
            raise PermissionRefused(f"cannot open {kind} FIFO {path}: {exc.strerror}") from None

    async def _open_writer(self, name: str, knock: Knock, deadline: float) -> int:
        loop = asyncio.get_running_loop()
        delay = 0.001
        while True:
            try:
                return self._open(name, _WR, "h2c")
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            # ENXIO: the client has not opened its read end yet.  A FIFO gives
            # no event when a reader arrives, so poll with backoff until the
            # deadline -- honest clients open before knocking and never get here.
            if not process_alive(knock.pid):
                raise ConnectionClosed(f"client pid {knock.pid} exited before opening its FIFOs")
            if loop.time() + delay > deadline:
                raise HandshakeTimeout(
                    f"client pid {knock.pid} knocked but did not open its FIFOs within "
                    f"{self.timeout:g} s; gave up"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _unlink_if_same(self, name: str, st: os.stat_result) -> None:
        # Called from ``finally``: never raise (a missing file was unlinked by
        # the client already; EBADF means the acceptor was closed meanwhile).
        with contextlib.suppress(OSError):
            if _same(os.stat(name, dir_fd=self._dirfd, follow_symlinks=False), st):
                os.unlink(name, dir_fd=self._dirfd)

    # -- accept ------------------------------------------------------------

    async def accept(self, knock: Knock) -> FifoLink:
        """Validate a fifo knock, open the client's FIFOs, handshake, return the link.

        Raises :class:`~ipcbus.errors.PermissionRefused` (outside the bus
        folder, not a FIFO, symbolic link, wrong owner or mode),
        :class:`~ipcbus.errors.ProtocolError` (malformed parameters, missing
        FIFOs, bad handshake byte), :class:`~ipcbus.transports.door.HandshakeTimeout`
        (the client never opened its ends) or
        :class:`~ipcbus.errors.ConnectionClosed` (the client went away).
        FIFOs that passed the checks are removed whatever the outcome; files
        that failed them are not touched.
        """
        if self._dirfd < 0:
            raise ConnectionClosed("FifoAcceptor is not open (use `async with`)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        c2h = self._name(knock, "c2h")
        h2c = self._name(knock, "h2c")
        if c2h[:-4] != h2c[:-4]:
            raise ProtocolError(f"FIFO names {c2h!r} and {h2c!r} do not form a pair")
        st_c = self._lstat(c2h, "c2h", knock)
        st_h = self._lstat(h2c, "h2c", knock)
        pair = (st_c.st_dev, st_c.st_ino, st_h.st_ino)
        if pair in self._in_progress:
            # A second knock naming a pair being accepted (a member of a group
            # bus can see the names): a second handshake would write a second
            # ACK into, or steal a byte from, the first client's link.
            raise ProtocolError(f"FIFO pair {c2h[:-4]!r} is already being accepted; knock refused")
        self._in_progress.add(pair)
        rfd = wfd = -1
        ok = False
        try:
            wfd = await self._open_writer(h2c, knock, deadline)
            self._check_opened(wfd, st_h, h2c, "h2c", knock)
            rfd = self._open(c2h, _RD, "c2h")
            self._check_opened(rfd, st_c, c2h, "c2h", knock)
            enlarge_pipe(wfd)
            try:
                os.write(wfd, ACK)  # the pipe is empty: one byte cannot block
            except BrokenPipeError:
                raise ConnectionClosed(
                    f"client pid {knock.pid} closed its FIFOs during the handshake"
                ) from None
            if await _wait_readable(rfd, deadline) is None:
                raise HandshakeTimeout(
                    f"client pid {knock.pid} did not finish the FIFO handshake within "
                    f"{self.timeout:g} s; gave up"
                )
            # Exactly one byte: frames the client sends next stay in the pipe.
            byte = os.read(rfd, 1)
            if not byte:
                raise ConnectionClosed(f"client pid {knock.pid} closed its FIFOs during the handshake")
            if byte != ACK:
                raise ProtocolError(
                    f"client pid {knock.pid} answered the handshake with {byte!r}, not {ACK!r}"
                )
            ok = True
        finally:
            if not ok:
                for fd in (rfd, wfd):
                    if fd >= 0:
                        os.close(fd)
            # Both passed the checks, so they are the client's FIFOs: remove
            # them now (an open FIFO works without its name), success or not.
            self._unlink_if_same(c2h, st_c)
            self._unlink_if_same(h2c, st_h)
            self._in_progress.discard(pair)
        return FifoLink(
            rfd,
            wfd,
            max_frame=self.max_frame,
            high_water=self.high_water,
            peer_pid=knock.pid,
            peer_uid=st_c.st_uid,
            peer_name=knock.name,
            fifos=(str(self.busdir / c2h), str(self.busdir / h2c)),
        )

    def __repr__(self) -> str:
        state = "open" if self._dirfd >= 0 else "closed"
        return f"<FifoAcceptor {self.busdir} {state}>"


def _pidfd(pid: int, busdir: Path) -> int:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise BusNotFound(busdir.name, str(busdir.parent)) from None


async def connect_fifo(
    busdir: Path,
    *,
    hub_pid: int,
    name: str = "",
    max_frame: int = DEFAULT_MAX_FRAME,
    send_knock: Callable[[Knock], None] | None = None,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    high_water: int = DEFAULT_HIGH_WATER,
    mode: int | None = None,
) -> FifoLink:
    """Join the hub of the bus in ``busdir`` over a pair of FIFOs; return the link.

    ``hub_pid`` (``0`` if unknown) is watched with a pidfd, so a hub that dies
    during the handshake fails it at once.  ``mode`` defaults to 0600, or
    0660 in a group bus folder.  Raises :class:`~ipcbus.errors.BusNotFound`
    (no folder, no hub), :class:`~ipcbus.errors.PermissionRefused` (folder not
    trusted, no right to create FIFOs), :class:`~ipcbus.transports.door.HandshakeTimeout`
    (the hub did not answer: it refused the knock, see its log) or
    :class:`~ipcbus.errors.ConnectionClosed` (the hub went away).  Nothing is
    left in the bus folder whatever happens.
    """
    busdir = Path(busdir)
    st_dir = check_bus_path(busdir)
    if mode is None:
        mode = 0o660 if st_dir.st_mode & stat.S_ISGID else 0o600
    knock_fn = send_knock if send_knock is not None else (lambda k: _door.send_knock(busdir, k))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pid = os.getpid()
    c2h, h2c = client_fifo_names(pid, secrets.token_hex(8))
    dirfd = os.open(busdir, _DIR)
    made: list[str] = []
    rfd = tmp = wfd = pidfd = -1
    ok = False
    try:
        for n in (c2h, h2c):
            try:
                os.mkfifo(n, 0o600, dir_fd=dirfd)
            except PermissionError as exc:
                raise PermissionRefused(
                    f"may not create FIFOs in the bus folder {busdir}: {exc.strerror}"
                ) from None
            made.append(n)
        # Read end of h2c first: O_RDONLY|O_NONBLOCK succeeds without a writer,
        # and the hub's O_WRONLY open can then succeed.
        rfd = os.open(h2c, _RD, dir_fd=dirfd)
        # c2h O_WRONLY would fail (ENXIO) until the hub reads it; O_RDWR never
        # blocks and makes us c2h's writer from now on (see the module docstring).
        tmp = os.open(c2h, _RDWR, dir_fd=dirfd)
        for fd in (rfd, tmp):
            os.fchmod(fd, mode)  # exact mode, whatever the umask
        if hub_pid > 0:
            pidfd = _pidfd(hub_pid, busdir)
        knock_fn(
            Knock(
                version=PROTOCOL_VERSION,
                transport="fifo",
                pid=pid,
                uid=os.geteuid(),
                name=name,
                # Names in the bus folder, not paths: a knock must fit in one
                # atomic write (PIPE_BUF), however long the bus root's path is.
                params={"c2h": c2h, "h2c": h2c},
            )
        )
        which = await _wait_readable(rfd, deadline, pidfd)
        hub = f"hub pid {hub_pid}" if hub_pid > 0 else "the hub"
        if which is None:
            raise HandshakeTimeout(
                f"{hub} of bus {busdir.name!r} did not answer the knock within {timeout:g} s: "
                "it refused it (see the hub's log, logger 'ipcbus.door'), is overloaded, "
                "or is stopped (`ipcbus ls` shows its state)"
            )
        if which == pidfd:
            raise ConnectionClosed(f"{hub} of bus {busdir.name!r} exited during the handshake")
        byte = os.read(rfd, 1)
        if not byte:
            raise ConnectionClosed(
                f"{hub} of bus {busdir.name!r} closed the FIFOs during the handshake "
                "(it refused the knock: see its log, logger 'ipcbus.door')"
            )
        if byte != ACK:
            raise ProtocolError(f"{hub} answered the FIFO handshake with {byte!r}, not {ACK!r}")
        # The hub reads c2h now: reopen it write-only so that, once we drop our
        # own read side, a dead hub means EPIPE instead of a pipe that fills up.
        try:
            wfd = os.open(c2h, _WR, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise ConnectionClosed(f"{hub} closed the FIFOs during the handshake") from None
            raise
        if not _same(os.fstat(wfd), os.fstat(tmp)):
            raise PermissionRefused(f"FIFO {busdir / c2h} was replaced during the handshake")
        os.close(tmp)
        tmp = -1
        enlarge_pipe(wfd)
        try:
            os.write(wfd, ACK)
        except BrokenPipeError:
            raise ConnectionClosed(f"{hub} closed the FIFOs during the handshake") from None
        ok = True
    finally:
        for fd in (pidfd, tmp) if ok else (pidfd, tmp, rfd, wfd):
            if fd >= 0:
                os.close(fd)
        for n in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(n, dir_fd=dirfd)
        os.close(dirfd)
    return FifoLink(
        rfd,
        wfd,
        max_frame=max_frame,
        high_water=high_water,
        peer_pid=hub_pid if hub_pid > 0 else None,
        peer_uid=st_dir.st_uid,
        peer_name=busdir.name,
        fifos=(str(busdir / h2c), str(busdir / c2h)),
    )


async def fifo_pair(
    busdir: Path,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    high_water: int = DEFAULT_HIGH_WATER,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> tuple[FifoLink, FifoLink]:
    """Two connected FIFO links in this process, (hub side, client side), for tests and benchmarks.

    Runs the real handshake in ``busdir`` (an existing bus folder) without a door.
    """
    loop = asyncio.get_running_loop()
    knocked: asyncio.Future[Knock] = loop.create_future()
    client = asyncio.ensure_future(
        connect_fifo(
            busdir,
            hub_pid=os.getpid(),
            max_frame=max_frame,
            high_water=high_water,
            timeout=timeout,
            send_knock=knocked.set_result,
        )
    )
    try:
        async with FifoAcceptor(
            busdir, max_frame=max_frame, high_water=high_water, timeout=timeout
        ) as acceptor:
            waiters: list[asyncio.Future[Any]] = [client, knocked]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not knocked.done():
                await client  # it failed before knocking: raise its error
            hub = await acceptor.accept(knocked.result())
        try:
            return hub, await client
        except BaseException:
            await hub.aclose()
            raise
    finally:
        if not client.done():
            client.cancel()
            with contextlib.suppress(BaseException):
                await client
