"""Records of the kernel objects a bus created, kept in its bus directory.

SysV objects outlive the processes that made them.  Every object ipcbus
creates is written down here (one small msgspec-JSON file per object, under
``<busdir>/objects/``) with its creator's pid, uid and the pid's start time,
so that ``ipcbus ls`` can show it and ``ipcbus gc`` can remove it once its
owner is dead — and never touch an object that is not ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec


class NotRegularFile(OSError):
    """A path that must name a regular file names something else (a FIFO, a device)."""


def open_regular(path: Path | str, flags: int, mode: int = 0o600) -> int:
    """Open ``path``, which must be a regular file, without blocking or following links.

    A FIFO put in the place of a pid, key or record file (by a member of a
    group bus, say) would make a plain ``open`` wait for a writer or a
    reader forever, freezing the event loop: ``O_NONBLOCK`` makes it return
    (or fail with ``ENXIO``), and :class:`NotRegularFile` is raised for
    anything that is not a regular file.  Other errors are the ``OSError``
    of ``open`` (``ELOOP`` for a symbolic link).
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing that nobody reads
            raise NotRegularFile(errno.ENXIO, "not a regular file", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd

__all__ = [
    "FOLDER_LOCK",
    "PENDING_PREFIX",
    "NotRegularFile",
    "ObjectKind",
    "ObjectRecord",
    "create_keyed",
    "forget_object",
    "list_records",
    "open_regular",
    "pid_start_time",
    "process_alive",
    "record_object",
    "stale_temp_records",
]

ObjectKind = Literal["msq", "shm", "sem", "fifo", "posix_sem"]


class ObjectRecord(msgspec.Struct, frozen=True):
    """One kernel object created by a bus participant."""

    kind: str
    ident: str
    key: int | None = None
    creator_pid: int = 0
    creator_uid: int = 0
    creator_start: int | None = None  # /proc/<pid>/stat starttime, to tell a reused pid
    created: float = 0.0
    extra: dict[str, Any] = {}

    @property
    def creator_alive(self) -> bool:
        """True while the creating process (the same one, not a reused pid) lives."""
        return process_alive(self.creator_pid, self.creator_start)


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(ObjectRecord)
_MAX_RECORD = 64 * 1024  # bytes read of a record file (ours are ~200)


def _stat(pid: int) -> tuple[bytes, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from
    ``/proc/<pid>/stat``, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it does not exist."""
    st = _stat(pid)
    return None if st is None else st[1]


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (and, when given, still has the same start time).

    A zombie (exited, not yet reaped by its parent) is dead: it holds no file,
    lock or mapping any more, only its pid.
    """
    if pid <= 0:
        return False
    st = _stat(pid)
    if st is None or st[0] in (b"Z", b"X", b"x"):
        return False
    return start_time is None or st[1] == start_time


def _path(busdir: Path, kind: str, ident: int | str) -> Path:
    # POSIX object names start with '/': keep file names flat and unambiguous.
    safe = str(ident).replace("%", "%25").replace("/", "%2F")
    return Path(busdir) / "objects" / f"{kind}-{safe}.json"


def record_object(
    busdir: Path,
    kind: ObjectKind,
    ident: int | str,
    *,
    key: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write down that this process created object ``kind``/``ident`` for the bus."""
    with FOLDER_LOCK:
        return _record(Path(busdir), kind, ident, key, extra)


FOLDER_LOCK: Final = threading.RLock()
"""Held while this process writes a record, or removes a records folder it
emptied (:func:`ipcbus.gc.remove_pool_dir`): a folder that one thread finds
empty is never removed under another thread's record."""


def _record(
    busdir: Path, kind: ObjectKind, ident: int | str, key: int | None, extra: dict[str, Any] | None
) -> Path:
    # The folder may have just been removed (its last record forgotten):
    # made again, private (mkdir's parents=True would use the umask's mode).
    busdir.mkdir(mode=0o700, exist_ok=True)
    d = busdir / "objects"
    d.mkdir(mode=0o700, exist_ok=True)
    pid = os.getpid()
    rec = ObjectRecord(
        kind=kind,
        ident=str(ident),
        key=key,
        creator_pid=pid,
        creator_uid=os.getuid(),
        creator_start=pid_start_time(pid),
        created=time.time(),
        extra=extra or {},
    )
    p = _path(busdir, kind, ident)
    tmp = p.with_name(p.name + f".{pid}.tmp")
    # O_NONBLOCK: a FIFO planted under this name fails with ENXIO, never blocks.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_enc.encode(rec))
    os.replace(tmp, p)
    return p


PENDING_PREFIX: Final = "key-"
"""Starts the ``ident`` of a record written before its SysV object existed
(:func:`create_keyed`): the object is found by the record's ``key``."""

_T = TypeVar("_T")


def create_keyed(
    busdir: Path | None,
    kind: ObjectKind,
    create: Callable[[int], _T],
    ident: Callable[[_T], int],
    exists: type[BaseException] | tuple[type[BaseException], ...],
    extra: dict[str, Any] | None = None,
    *,
    key: int | None = None,
    remove: Callable[[_T], object] | None = None,
) -> _T:
    """Create a SysV object under a key, recorded before it exists.

    The kernel picks an object's id when it creates it, so a record written
    afterwards misses the object if this process dies in between (SIGKILL
    mid-``connect``): nothing would ever remove it.  Here a record naming
    the key (ident ``key-<hex>``) is written first, then ``create(key)``
    runs, then the record names the id.  ``ipcbus gc`` finds an object of a
    dead creator by either.  Without ``key``, a fresh random key is used and
    ``exists`` (what ``create`` raises for a key in use) makes it try
    another; with ``key``, ``exists`` is raised.  If the record naming the id
    cannot be written, ``remove(obj)`` undoes the creation (else the object
    would stay, recorded by key, until this process is gone).  Without
    ``busdir``, nothing is recorded.
    """
    for _ in range(1 if key is not None else 64):
        # Positive: /proc/sysvipc prints keys signed; 0 is IPC_PRIVATE.
        k = key if key is not None else secrets.randbits(31) or 1
        if busdir is None:
            try:
                return create(k)
            except exists:
                if key is not None:
                    raise
                continue
        pending = record_object(busdir, kind, f"{PENDING_PREFIX}{k & 0xFFFFFFFF:x}", key=k, extra=extra)
        try:
            obj = create(k)
        except exists:
            pending.unlink(missing_ok=True)
            if key is not None:
                raise
            continue
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        try:
            record_object(busdir, kind, ident(obj), key=k, extra=extra)
        except BaseException:
            if remove is None:
                raise  # the first record stays: gc finds the object by its key
            remove(obj)
            pending.unlink(missing_ok=True)
            raise
        pending.unlink(missing_ok=True)
        return obj
    raise OSError(errno.EEXIST, f"no free SysV key for a new {kind} after 64 tries")


_TEMP_RE = re.compile(r".+\.json\.([1-9][0-9]{0,9})\.tmp\Z")


def stale_temp_records(busdir: Path) -> list[Path]:
    """Half-written record files (``<record>.<pid>.tmp``) of ours whose process is gone.

    :func:`record_object` writes a temporary file and renames it into
    place; a process killed in between leaves the temporary file.  Records
    are written before the objects they name are made, so there is no
    object to remove with it.
    """
    d = Path(busdir) / "objects"
    out: list[Path] = []
    uid = os.getuid()
    with contextlib.suppress(OSError):
        for p in d.iterdir():
            m = _TEMP_RE.match(p.name)
            if m is None or process_alive(int(m[1])):
                continue
            with contextlib.suppress(OSError):
                if p.lstat().st_uid == uid:  # another member's files are its own to remove
                    out.append(p)
    return sorted(out)


def forget_object(busdir: Path, kind: ObjectKind, ident: int | str) -> None:
    """Remove the record of an object (after removing the object itself)."""
    with contextlib.suppress(FileNotFoundError):
        _path(busdir, kind, ident).unlink()


def list_records(busdir: Path) -> list[tuple[Path, ObjectRecord | None]]:
    """Every record file in ``busdir``; ``None`` stands for a record not to act on.

    That is a corrupted one, or a forged one: a record file is written by its
    creator, so one owned by another user than the ``creator_uid`` it claims
    was written by someone else (any member can write in a group bus's
    ``objects/``) to make the creator's gc remove objects of the creator's.
    """
    d = Path(busdir) / "objects"
    out: list[tuple[Path, ObjectRecord | None]] = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            fd = open_regular(p, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                data = os.read(fd, _MAX_RECORD)
            finally:
                os.close(fd)
            rec: ObjectRecord | None = _dec.decode(data)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            rec = None
        if rec is not None and st.st_uid != rec.creator_uid:
            rec = None
        out.append((p, rec))
    return out
