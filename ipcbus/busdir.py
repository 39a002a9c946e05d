"""The bus directory: where a bus's hub is found, locked and cleaned up.

Layout (see ``docs/security.md``)::

    <root>/                      $IPCBUS_DIR, else $XDG_RUNTIME_DIR/ipcbus, else /tmp/ipcbus-<uid>
        <bus>/                   one folder per bus name: 0700 (03770 + group for a group bus)
            door                 the hub's well-known FIFO; clients knock here
            hub.pid              "<pid>\\n<start time>\\n", flock()ed by the live hub
            sysv.key             an empty file whose inode keys the SysV bus queue (ftok)
            objects/             records of the kernel objects the bus created
            fifo-<pid>-<token>.c2h / .h2c   a client's FIFO pair during its handshake

Everything is checked before it is trusted: the root and the bus folder must
be real directories (not symbolic links) owned by the caller, and must not
let other users list or write them.  A directory that fails a check is
refused with :class:`~ipcbus.errors.PermissionRefused` naming the path, what
is wrong and the command that fixes it.

This module is a leaf: it imports only :mod:`ipcbus.errors` and
:mod:`ipcbus.records`, so the transports and the hub can both use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import pwd
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final

from .errors import BadBusName, BusBusy, BusNotFound, PermissionRefused
from .records import NotRegularFile, open_regular, pid_start_time, process_alive

__all__ = [
    "DOOR_NAME",
    "FIFO_NAME_RE",
    "KEYFILE_NAME",
    "MAX_BUS_NAME",
    "PIDFILE_NAME",
    "BadBusName",
    "BusDir",
    "HubLock",
    "bus_root",
    "check_bus_path",
    "client_fifo_names",
    "default_root",
    "fifo_has_reader",
    "flocked",
    "read_pidfile",
    "remove_stale_fifos",
    "resolve_group",
    "stale_fifos",
    "validate_bus_name",
]

log = logging.getLogger("ipcbus.busdir")

MAX_BUS_NAME: Final = 64
"""Longest accepted bus name, in characters (ASCII only, so also in bytes)."""

DOOR_NAME: Final = "door"
"""File name of the hub's door FIFO inside a bus folder."""

PIDFILE_NAME: Final = "hub.pid"
"""File name of the hub's pid file (also its lock) inside a bus folder."""

KEYFILE_NAME: Final = "sysv.key"
"""File name of the file whose inode keys the bus's SysV queue (``ftok``; :mod:`ipcbus.transports.sysv`)."""

FIFO_NAME_RE: Final = re.compile(r"fifo-([1-9][0-9]{0,9})-([0-9a-f]{16})\.(c2h|h2c)\Z")
"""Names of client FIFOs: ``fifo-<client pid>-<16 hex digits>.c2h`` (client to hub) / ``.h2c``."""

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")

# Group and other may at most *search* the root (``--x``): a group bus needs
# its members to reach its folder, but nobody else may list or create entries.
_ROOT_FORBIDDEN_BITS: Final = 0o066
_PRIVATE_MODE: Final = 0o700
# A group bus folder: setgid, so files made inside belong to the bus's group
# whoever makes them; sticky, so a member can remove only their own files.
_GROUP_MODE: Final = 0o3770


def validate_bus_name(name: str) -> str:
    """Return ``name`` if it can be a bus folder name, else raise :class:`BadBusName`."""
    if not isinstance(name, str):
        raise BadBusName(name, f"expected a str, got {type(name).__name__}")
    if not name:
        raise BadBusName(name, "it is empty")
    if len(name) > MAX_BUS_NAME:
        raise BadBusName(name, f"it is {len(name)} characters long (maximum {MAX_BUS_NAME})")
    scheme, sep, rest = name.partition("://")
    if sep and scheme in ("fifo", "sysv", "shm") and rest:
        raise BadBusName(
            name,
            f"a bus is named, not addressed by a URL: use the name {rest!r} and "
            f"transport={scheme!r} (connect({rest!r}, transport={scheme!r}))",
        )
    if "/" in name or "\0" in name:
        raise BadBusName(name, "it contains '/' or a NUL byte")
    if ".." in name:
        raise BadBusName(name, "it contains '..'")
    if name[0] in ".-":
        raise BadBusName(name, f"it starts with {name[0]!r}")
    if not _NAME_RE.match(name):
        bad = next(c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-")))
        raise BadBusName(name, f"it contains {bad!r}")
    return name


def resolve_group(group: str | int | None) -> int | None:
    """A group name or gid as a gid (``None`` stays ``None``); unknown names raise ValueError."""
    if group is None:
        return None
    if isinstance(group, bool) or not isinstance(group, (str, int)):
        raise TypeError(f"group must be a group name or a gid, not {type(group).__name__}")
    if isinstance(group, int):
        if group < 0:
            raise ValueError(f"invalid gid {group}: must be >= 0")
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r}: no such Unix group on this host") from None


_LOCK_LINE: Final = re.compile(r"\bFLOCK\s+\S+\s+\S+\s+\d+\s+([0-9a-f]+:[0-9a-f]+:\d+)\s")


def flocked(path: Path) -> bool:
    """Whether some process holds an ``flock`` on ``path`` (per ``/proc/locks``)."""
    try:
        st = os.lstat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return False
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(m.group(1) == want for m in _LOCK_LINE.finditer(table))


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _my_groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def default_root() -> Path:
    """Where the bus root is, without creating or checking it."""
    env = os.environ.get("IPCBUS_DIR")
    if env:
        return Path(env).absolute()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg).absolute() / "ipcbus"
    return Path(f"/tmp/ipcbus-{os.geteuid()}")


def _check_root(root: Path, *, shared: bool) -> None:
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise BusNotFound("*", str(root)) from None
    if stat.S_ISLNK(st.st_mode):
        raise PermissionRefused(
            f"bus root {root} is a symbolic link; refusing it (it could point anywhere). "
            f"Remove it, or set IPCBUS_DIR to a real directory"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionRefused(f"bus root {root} exists but is not a directory; remove it")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        # A group bus may live under a root another member (or an admin) made,
        # as long as only its owner can write it.
        if shared and not mode & 0o022:
            return
        raise PermissionRefused(
            f"bus root {root} belongs to {_who(st.st_uid)}, not to you ({_who(os.geteuid())}); "
            f"refusing it. Set IPCBUS_DIR to a directory of your own"
        )
    if mode & _ROOT_FORBIDDEN_BITS:
        raise PermissionRefused(
            f"bus root {root} has mode {mode:04o}, which lets other users list or write it; "
            f"expected 0700. Run `chmod 700 {root}` (or remove it) and retry"
        )


def bus_root(*, group: int | None = None, root: Path | None = None) -> Path:
    """The bus root directory, created (mode 0700) if missing and checked.

    ``root`` if given, else ``$IPCBUS_DIR``, else ``$XDG_RUNTIME_DIR/ipcbus``,
    else ``/tmp/ipcbus-<uid>``.  Refused with :class:`~ipcbus.errors.PermissionRefused` when it is a
    symbolic link, not a directory, owned by another user, or readable or
    writable by group or others (search-only ``0711`` is accepted: group buses
    need it).  With ``group`` (joining a group bus), a root owned by another
    user is accepted if only its owner may write it.
    """
    root = default_root() if root is None else Path(root)
    try:
        root.mkdir(mode=_PRIVATE_MODE, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise PermissionRefused(f"cannot create bus root {root}: {exc.strerror}") from None
    else:
        os.chmod(root, _PRIVATE_MODE)  # mkdir's mode was filtered by the umask
    _check_root(root, shared=group is not None)
    return root


def check_bus_path(
    path: Path, *, gid: int | None = None, bus: str | None = None, private: bool = False
) -> os.stat_result:
    """Check that an existing bus folder may be trusted by this process; return its lstat.

    Raises :class:`~ipcbus.errors.BusNotFound` when it does not exist and
    :class:`~ipcbus.errors.PermissionRefused` when it is a symbolic link or not
    a directory, or when it is neither private to us (ours, no group/other
    bits) nor a group bus folder (setgid, group ``gid`` when given, no bits
    for others) of a group we belong to.  ``private=True`` accepts only the
    former.
    """
    path = Path(path)
    name = bus or path.name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BusNotFound(name, str(path.parent)) from None
    if stat.S_ISLNK(st.st_mode):
        raise PermissionRefused(f"bus folder {path} is a symbolic link; refusing it. Remove it")
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionRefused(f"bus folder {path} is not a directory; remove it")
    mode = stat.S_IMODE(st.st_mode)
    euid = os.geteuid()
    group_bus = gid is not None or (bool(mode & stat.S_ISGID) and not private)
    if not group_bus:
        if st.st_uid != euid:
            raise PermissionRefused(
                f"bus folder {path} belongs to {_who(st.st_uid)}, not to you ({_who(euid)}); refusing it"
            )
        if mode & 0o077:
            raise PermissionRefused(
                f"bus folder {path} has mode {mode:04o}; expected 0700. Run `chmod 700 {path}` or remove it"
            )
        return st
    if gid is not None and st.st_gid != gid:
        raise PermissionRefused(
            f"bus folder {path} belongs to group {st.st_gid}, not to the bus group {gid}; "
            f"run `chgrp {gid} {path}` or remove it"
        )
    if mode & 0o007:
        raise PermissionRefused(
            f"bus folder {path} has mode {mode:04o}, which lets users outside its group in; "
            f"expected 3770. Run `chmod 3770 {path}`"
        )
    if st.st_uid != euid and st.st_gid not in _my_groups() and euid != 0:
        raise PermissionRefused(
            f"bus {name!r} is shared with group {st.st_gid}, which you ({_who(euid)}) are not a member of"
        )
    return st


def client_fifo_names(pid: int, token: str) -> tuple[str, str]:
    """The (client-to-hub, hub-to-client) FIFO names of a client, per :data:`FIFO_NAME_RE`."""
    c2h, h2c = f"fifo-{pid}-{token}.c2h", f"fifo-{pid}-{token}.h2c"
    if not FIFO_NAME_RE.match(c2h):
        raise ValueError(f"bad FIFO name parts: pid={pid!r} token={token!r} (16 hex digits)")
    return c2h, h2c


def stale_fifos(path: Path) -> list[Path]:
    """Client FIFOs in a bus folder whose creating process is dead."""
    out: list[Path] = []
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return out
    for entry in entries:
        m = FIFO_NAME_RE.match(entry.name)
        if m is None:
            continue
        try:
            if not stat.S_ISFIFO(entry.stat(follow_symlinks=False).st_mode):
                continue
        except OSError:
            continue
        if not process_alive(int(m.group(1))):
            out.append(Path(entry.path))
    return out


def remove_stale_fifos(path: Path) -> list[Path]:
    """Remove the FIFOs :func:`stale_fifos` finds (left by SIGKILLed clients); return them."""
    removed: list[Path] = []
    for p in stale_fifos(path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d FIFO(s) of dead clients in %s", len(removed), path)
    return removed


def read_pidfile(fd: int | Path) -> tuple[int, int | None] | None:
    """(pid, start time) from a pid file, given open or by path."""
    data = _pidfile_bytes(fd)
    if data is None:
        return None
    parts = data.split()[:2]
    try:
        pid = int(parts[0])
    except (IndexError, ValueError):
        return None
    start: int | None = None
    if len(parts) > 1:
        with contextlib.suppress(ValueError):
            start = int(parts[1])
    return pid, start


def _pidfile_bytes(file: int | Path) -> bytes | None:
    """The start of a pid file (an open fd, or a path opened without following links)."""
    try:
        if isinstance(file, int):
            return os.pread(file, 256, 0)
        fd = open_regular(file, os.O_RDONLY)  # a FIFO in its place must not block us
        try:
            return os.pread(fd, 256, 0)
        finally:
            os.close(fd)
    except OSError:
        return None


# Descriptors a forked child must not keep: the hub's lock (a child holding it
# keeps the bus locked after the hub dies, however it dies) and its door (the
# next hub would see someone reading it).  Closed in the child right after
# fork(); their owners there take them as gone, and remove nothing.
_NOT_INHERITED: dict[int, Callable[[], None]] = {}


def fifo_has_reader(path: Path) -> bool:
    """Whether some process has the FIFO ``path`` open for reading (a non-blocking
    write-only open fails with ``ENXIO`` when none has).  Other errors are raised."""
    try:
        probe = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    os.close(probe)
    return True


def close_in_forked_children(fd: int, forget: Callable[[], None]) -> None:
    """Have ``fd`` closed in any child this process forks; ``forget()`` is called
    there first, so that its owner drops it without touching the parent's files."""
    _NOT_INHERITED[fd] = forget


def closing_for_good(fd: int) -> None:
    """``fd`` is about to be closed here: stop watching it for forks."""
    _NOT_INHERITED.pop(fd, None)


def _after_fork_in_child() -> None:
    owned = list(_NOT_INHERITED.items())
    _NOT_INHERITED.clear()
    for fd, forget in owned:
        with contextlib.suppress(Exception):
            forget()
        with contextlib.suppress(OSError):
            os.close(fd)


os.register_at_fork(after_in_child=_after_fork_in_child)


class HubLock:
    """Proof that this process serves a bus: an exclusive ``flock`` on its pid file.

    The kernel drops the lock when the process dies, however it dies, so a
    SIGKILLed hub never blocks the next one.  :meth:`release` removes the pid
    file (while still holding the lock) and then unlocks.
    """

    def __init__(self, busdir: BusDir, fd: int) -> None:
        self.busdir = busdir
        self.pid = os.getpid()
        self._fd = fd
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)
        close_in_forked_children(fd, self._forked_off)

    def _forked_off(self) -> None:
        self._fd = -1  # in a forked child: the lock stays the parent's

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd >= 0

    def release(self) -> None:
        """Remove the pid file and drop the lock.  Idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        closing_for_good(fd)
        try:
            # Unlink before unlocking: a hub that opens the path after this
            # gets a fresh file, and one that opened the old file re-checks
            # the path after locking (see BusDir.lock_hub).
            st = os.lstat(self.busdir.pidfile)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.busdir.pidfile)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> HubLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<HubLock bus={self.busdir.name!r} pid={self.pid} {state}>"


class BusDir:
    """One bus's folder under the bus root (see the module docstring for its layout).

    ``group`` (a name or a gid) makes a bus shared by a Unix group: the folder
    is mode 3770 with that group, and its objects 0660.
    Constructing a ``BusDir`` validates the name and creates/checks the root;
    :meth:`ensure` (hub side) creates the folder, :meth:`check` (client side)
    verifies an existing one.
    """

    def __init__(self, name: str, *, root: Path | None = None, group: str | int | None = None) -> None:
        self.name = validate_bus_name(name)
        self.gid = resolve_group(group)
        # An explicit root gets the same checks as $IPCBUS_DIR.
        self.root = bus_root(group=self.gid, root=root)
        self.path = self.root / self.name
        self.door = self.path / DOOR_NAME
        self.pidfile = self.path / PIDFILE_NAME
        self.keyfile = self.path / KEYFILE_NAME

    @property
    def mode(self) -> int:
        """Mode for the bus's kernel objects and files: 0600, or 0660 for a group bus."""
        return 0o600 if self.gid is None else 0o660

    def ensure(self) -> BusDir:
        """Create the folder (0700, or 3770 + chgrp for a group bus) if missing, and check it.

        Also creates the ``ftok`` key file and the ``objects/`` folder.
        Raises :class:`~ipcbus.errors.PermissionRefused` for a symbolic link,
        a folder of another owner or looser permissions, or a group we cannot
        give the folder to.
        """
        path = self.path
        created = False
        try:
            os.mkdir(path, _PRIVATE_MODE)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise PermissionRefused(f"cannot create bus folder {path}: {exc.strerror}") from None
        if created and self.gid is not None:
            try:
                os.chown(path, -1, self.gid, follow_symlinks=False)
            except PermissionError:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                raise PermissionRefused(
                    f"cannot give bus {self.name!r} to group {self.gid}: you "
                    f"({_who(os.geteuid())}) are not a member of it"
                ) from None
            os.chmod(path, _GROUP_MODE, follow_symlinks=False)
        elif created:
            os.chmod(path, _PRIVATE_MODE, follow_symlinks=False)
        if self.gid is not None:
            self._open_root_for_group()
        check_bus_path(path, gid=self.gid, bus=self.name, private=self.gid is None)
        dir_mode = _PRIVATE_MODE if self.gid is None else _GROUP_MODE
        objects = path / "objects"
        with contextlib.suppress(FileExistsError):
            os.mkdir(objects, dir_mode & 0o777)
            os.chmod(objects, dir_mode, follow_symlinks=False)
        try:
            fd = open_regular(self.keyfile, os.O_WRONLY | os.O_CREAT)
        except NotRegularFile:
            raise PermissionRefused(f"{self.keyfile} is not a regular file; remove it") from None
        try:
            if self.gid is not None:
                os.fchmod(fd, 0o640)
        finally:
            os.close(fd)
        return self

    def _open_root_for_group(self) -> None:
        # Members of the group must be able to *reach* the bus folder: give the
        # root search permission (--x) for group and others, never read/write.
        with contextlib.suppress(OSError):
            st = os.lstat(self.root)
            if st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
                mode = stat.S_IMODE(st.st_mode)
                if mode & 0o011 != 0o011:
                    os.chmod(self.root, mode | 0o011)

    def check(self) -> BusDir:
        """Client side: verify the existing folder may be trusted (see :func:`check_bus_path`)."""
        check_bus_path(self.path, gid=self.gid, bus=self.name)
        return self

    def hub_pid(self) -> int | None:
        """The pid of the live hub serving this bus, or None.

        Reads the pid file and checks that the process is alive and is the same
        process (its start time matches), so a reused pid is not mistaken for
        the hub.
        """
        rec = read_pidfile(self.pidfile)
        if rec is None:
            return None
        pid, start = rec
        return pid if process_alive(pid, start) else None

    def hub_transports(self) -> tuple[str, ...] | None:
        """The transports the bus's hub accepts, from the third line of its pid
        file; ``None`` if the file is missing or does not say.  Check
        :meth:`hub_pid` for whether that hub is alive."""
        data = _pidfile_bytes(self.pidfile)
        lines = [] if data is None else data.decode("ascii", "replace").splitlines()
        if len(lines) < 3 or not lines[2].strip():
            return None
        return tuple(t for t in lines[2].strip().split(",") if t)

    def hub_locked(self) -> bool:
        """Whether a process holds the pid file's lock: a hub runs, possibly still
        starting (its pid not yet written).  Reads ``/proc/locks``; takes no lock
        itself, so it never makes a starting hub see the bus as busy."""
        return flocked(self.pidfile)

    def lock_hub(self, transports: tuple[str, ...] = ()) -> HubLock:
        """Become this bus's hub: lock the pid file and write our pid, start time
        and (comma-separated, if given) the ``transports`` we accept.

        Raises :class:`~ipcbus.errors.BusBusy` naming the other hub's pid if
        one holds the lock.  A pid file or door FIFO left by a hub that was
        SIGKILLed is recovered once the old pid is checked to be dead; FIFOs of
        dead clients are removed too.  Call :meth:`ensure` first.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in range(100):
            try:
                fd = os.open(self.pidfile, flags, 0o600)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PermissionRefused(
                        f"{self.pidfile} is a symbolic link; refusing it. Remove it"
                    ) from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rec = read_pidfile(fd)
                os.close(fd)
                if attempt < 50 and (rec is None or not process_alive(*rec)):
                    # Not a live hub: one starting up, or `ipcbus gc` removing a
                    # dead hub's files under the lock (for microseconds).
                    time.sleep(0.002)
                    continue
                who = f"hub pid {rec[0]}" if rec else "another hub (starting up)"
                raise BusBusy(
                    f"bus {self.name!r} is already served by {who}; "
                    f"connect to it, or stop it first (its pid file is {self.pidfile})"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous hub unlinks the pid file before unlocking; if we
            # opened the old file just before that, we locked an orphan inode.
            # Only a lock on the file the path names now counts.
            st = os.fstat(fd)
            try:
                cur = os.lstat(self.pidfile)
                same = (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - needs 100 hubs racing in lockstep
            raise BusBusy(f"bus {self.name!r}: could not lock {self.pidfile} (hubs racing)")
        try:
            if not stat.S_ISREG(st.st_mode):
                raise PermissionRefused(f"{self.pidfile} is not a regular file; remove it")
            self._recover(fd)
            me = os.getpid()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{me}\n{pid_start_time(me)}\n{','.join(transports)}\n".encode(), 0)
            os.fchmod(fd, 0o600 if self.gid is None else 0o640)
        except BaseException:
            os.close(fd)
            raise
        return HubLock(self, fd)

    def _recover(self, fd: int) -> None:
        """We hold the lock: whatever a previous hub left is stale, once checked."""
        rec = read_pidfile(fd)
        if rec is not None:
            pid, start = rec
            if pid != os.getpid() and process_alive(pid, start):
                raise BusBusy(
                    f"bus {self.name!r}: the pid file names live process {pid}, which does not "
                    f"hold the hub lock; if it is not a hub, remove {self.pidfile}"
                )
            log.warning(
                "bus %r: hub pid %d died without cleaning up; recovering its pid file",
                self.name,
                pid,
            )
        try:
            st = os.lstat(self.door)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISFIFO(st.st_mode):
                raise PermissionRefused(f"{self.door} is not a FIFO; remove it")
            if not fifo_has_reader(self.door):  # a dead hub's door
                log.warning("bus %r: removing the stale door FIFO of a dead hub", self.name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.door)
            else:
                raise BusBusy(
                    f"bus {self.name!r}: a process without the hub lock is reading its door "
                    f"{self.door}; stop it first"
                )
        remove_stale_fifos(self.path)

    def cleanup(self) -> None:
        """Hub exit: remove the door FIFO, and the pid file if it names this process."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISFIFO(os.lstat(self.door).st_mode):
                os.unlink(self.door)
        rec = read_pidfile(self.pidfile)
        if rec is not None and rec[0] == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pidfile)

    def __repr__(self) -> str:
        g = f" group={self.gid}" if self.gid is not None else ""
        return f"<BusDir {self.name!r} at {self.path}{g}>"
