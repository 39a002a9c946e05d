"""Garbage collection of what crashed bus participants left behind.

SysV objects survive the processes that made them.  ``collect()`` walks a
bus directory's records (:mod:`ipcbus.records`) and removes an object only
when all of these hold:

* the record parses, and its file belongs to the creator it names (a
  corrupted or forged record is reported and skipped);
* its creator is dead — the pid *and* its start time, so a reused pid is
  never mistaken for the creator;
* the object still exists with the recorded id, is owned by this uid, and
  was created no earlier than the record says (a different object that
  reused the id is left alone);
* for a segment, nobody is still attached (``nattch`` 0, or only dead pids).

Then it removes the stale pid file and door FIFO of a dead hub.  It never
touches anything owned by another user.  ``/proc/sysvipc`` supplies the
``IPC_STAT`` fields (owner, creator, ctime, depth) without attaching.

A worker pool over shared memory records the objects it makes for a worker
in a folder of its process under the bus root, ``_pool-<pid>-<start time>``,
until the worker has attached (after which nothing can leak); so does a
direct shm link (``ShmLink.create(None)``) until its peer has attached.
:func:`reclaim_pools` collects the folders of pools whose process is gone:
``ipcbus gc --all`` runs it, and so does every pool that makes shm links.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .busdir import BusDir, fifo_has_reader, read_pidfile
from .records import (
    FOLDER_LOCK,
    PENDING_PREFIX,
    ObjectRecord,
    list_records,
    open_regular,
    pid_start_time,
    process_alive,
    stale_temp_records,
)
from .sysv import proc_table

__all__ = [
    "Finding",
    "collect",
    "pool_dir_name",
    "process_folder",
    "reclaim_pools",
    "remove_pool_dir",
    "scan",
    "sysv_table",
]

log = logging.getLogger("ipcbus.gc")

_CTIME_SLACK = 5.0

_POOL_DIR_RE = re.compile(r"_pool-([1-9][0-9]{0,9})-([0-9]{1,20})\Z")

_KIND_TABLE = {"msq": "msg", "shm": "shm", "sem": "sem"}


sysv_table = proc_table
"""``/proc/sysvipc/<kind>`` by id (:func:`ipcbus.sysv.proc_table`)."""


@dataclass
class Finding:
    """One thing gc looked at: what, the verdict, and why."""

    what: str
    action: str  # "remove", "removed", "skip", "keep"
    reason: str
    path: Path | None = None

    def __str__(self) -> str:
        return f"{self.action:8} {self.what}: {self.reason}"


def _remove_sysv(kind: str, ident: int) -> None:
    import sysv_ipc

    if kind == "msq":
        sysv_ipc.remove_message_queue(ident)
    elif kind == "shm":
        sysv_ipc.remove_shared_memory(ident)
    else:
        sysv_ipc.remove_semaphore(ident)


def _judge(rec: ObjectRecord, tables: dict[str, dict[int, dict[str, int]]]) -> tuple[str, str, int]:
    """("remove"|"skip"|"keep"|"forget", reason, the SysV id or -1) for one record."""
    uid = os.getuid()
    if rec.creator_uid != uid:
        return "skip", f"recorded by uid {rec.creator_uid}, not ours ({uid})", -1
    if rec.creator_alive:
        return "keep", f"creator pid {rec.creator_pid} is alive", -1
    if rec.kind not in _KIND_TABLE:
        return (*_judge_file(rec, uid), -1)
    table = tables[_KIND_TABLE[rec.kind]]
    if rec.ident.startswith(PENDING_PREFIX) and rec.key:
        # Recorded before it was made (records.create_keyed): found by its key, if made at all.
        ident = next((i for i, row in table.items() if row["key"] == rec.key), -1)
        if ident < 0:
            return "forget", "object was never made, or is gone", -1
    else:
        try:
            ident = int(rec.ident)
        except ValueError:
            return "skip", f"record names a non-numeric id {rec.ident!r}", -1
    row = table.get(ident)
    if row is None:
        return "forget", "object no longer exists", -1
    if row["uid"] != uid or row["cuid"] != uid:
        return "skip", f"object {ident} belongs to uid {row['uid']} (creator {row['cuid']})", -1
    if rec.key is not None and rec.key != 0 and row["key"] != rec.key:
        return "skip", f"object {ident} has key {row['key']:#x}, record says {rec.key:#x}", -1
    if row["ctime"] + _CTIME_SLACK < rec.created:
        return "skip", f"object {ident} is older than the record: the id was reused", -1
    if rec.kind == "shm" and row["nattch"] > 0:
        alive = [p for p in (row["cpid"], row["lpid"]) if process_alive(p)]
        if alive:
            return "keep", f"segment {ident} still attached (nattch {row['nattch']})", -1
    return "remove", f"creator pid {rec.creator_pid} is dead", ident


def _judge_file(rec: ObjectRecord, uid: int) -> tuple[str, str]:
    """The verdict on a dead creator's POSIX semaphore or FIFO."""
    if rec.kind == "posix_sem":
        name = rec.ident.lstrip("/")
        if not name or "/" in name:
            return "skip", f"record names an odd semaphore {rec.ident!r}"
        try:
            st = os.lstat(f"/dev/shm/sem.{name}")
        except FileNotFoundError:
            return "forget", "semaphore no longer exists"
        if st.st_uid != uid:
            return "skip", f"semaphore {name} belongs to uid {st.st_uid}"
        if st.st_ctime + _CTIME_SLACK < rec.created:
            return "skip", f"semaphore {name} is older than the record: the name was reused"
        return "remove", f"creator pid {rec.creator_pid} is dead"
    if rec.kind == "fifo":
        p = Path(rec.ident)
        try:
            st = p.lstat()
        except FileNotFoundError:
            return "forget", "FIFO no longer exists"
        if not stat.S_ISFIFO(st.st_mode):
            return "skip", f"{p} is not a FIFO"
        if st.st_uid != uid:
            return "skip", f"{p} belongs to uid {st.st_uid}"
        return "remove", f"creator pid {rec.creator_pid} is dead"
    return "skip", f"unknown object kind {rec.kind!r}"


def scan(busdir: Path) -> list[tuple[Finding, ObjectRecord | None]]:
    """Judge every record of one bus directory without changing anything."""
    tables = {k: sysv_table(k) for k in ("msg", "shm", "sem")}
    out: list[tuple[Finding, ObjectRecord | None]] = []
    found = list_records(busdir)
    # A creator killed between its two records leaves both: the object is removed once.
    by_id = {(r.kind, r.ident) for _, r in found if r is not None and not r.ident.startswith(PENDING_PREFIX)}
    for path, rec in found:
        if rec is None:
            out.append(
                (Finding(path.name, "skip", "corrupted or forged record (left in place)", path), None)
            )
            continue
        verdict, reason, ident = _judge(rec, tables)
        if ident >= 0 and rec.ident != str(ident):  # a pending record, its object found by key
            if (rec.kind, str(ident)) in by_id:
                verdict, reason = "forget", f"its object is recorded by id ({ident}) too"
            else:
                rec = msgspec.structs.replace(rec, ident=str(ident))
        out.append((Finding(f"{rec.kind} {rec.ident}", verdict, reason, path), rec))
    for path in stale_temp_records(busdir):
        out.append((Finding(path.name, "remove", "half-written record of a dead process", path), None))
    return out


def collect(busdir: Path, *, dry_run: bool = False) -> list[Finding]:
    """Remove the dead objects of one bus directory; return what was found and done."""
    busdir = Path(busdir)
    findings: list[Finding] = []
    for finding, rec in scan(busdir):
        if rec is None and finding.action == "remove" and finding.path is not None:  # a .tmp record
            findings.append(_remove_file(finding.path, "record", dry_run))
            continue
        if finding.action in ("remove", "forget") and rec is not None:
            if dry_run:
                findings.append(finding)
                continue
            try:
                if finding.action == "remove":
                    if rec.kind == "fifo":
                        Path(rec.ident).unlink()
                    elif rec.kind == "posix_sem":
                        import posix_ipc

                        posix_ipc.unlink_semaphore("/" + rec.ident.lstrip("/"))
                    else:
                        _remove_sysv(rec.kind, int(rec.ident))
                    finding.action = "removed"
                else:
                    finding.action = "forgot"
                if finding.path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        finding.path.unlink()
                log.info("gc %s: %s", busdir.name, finding)
            except Exception as exc:  # an object vanishing under us is fine; report the rest
                finding.action = "skip"
                finding.reason = f"removal failed: {exc}"
        findings.append(finding)
    from .busdir import stale_fifos

    for fifo in stale_fifos(busdir):
        try:
            owner = fifo.lstat().st_uid
        except FileNotFoundError:
            continue
        if owner != os.getuid():
            findings.append(Finding(f"fifo {fifo.name}", "skip", f"owned by uid {owner}", fifo))
            continue
        findings.append(_remove_file(fifo, "FIFO of a dead client", dry_run))
    findings.extend(_stale_hub_files(busdir, dry_run))
    return findings


def _stale_hub_files(busdir: Path, dry_run: bool) -> list[Finding]:
    """The pid file and door FIFO of a hub that is no longer alive.

    Decided and removed while holding the hub lock (the pid file's
    ``flock``), as a starting hub does: a hub that starts meanwhile either
    holds the lock (nothing is removed) or locks a fresh pid file after us.
    """
    out: list[Finding] = []
    pidfile = busdir / "hub.pid"
    try:
        fd = open_regular(pidfile, os.O_RDWR)
    except OSError:  # none (then no door is stale either), or not a file to touch
        return out
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return out  # a hub holds it (perhaps still starting: its pid not yet written)
        st = os.fstat(fd)
        try:
            cur = os.lstat(pidfile)
        except FileNotFoundError:
            return out
        if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
            return out  # replaced meanwhile: a hub starts
        rec = read_pidfile(fd)
        if rec is not None and process_alive(*rec):
            return out
        out.append(_remove_file(pidfile, "stale hub pid file", dry_run))
        door = busdir / "door"
        if _unread_fifo(door):
            out.append(_remove_file(door, "stale door FIFO", dry_run))
    finally:
        os.close(fd)  # unlocks
    return out


def _unread_fifo(door: Path) -> bool:
    """Whether ``door`` is a FIFO of ours that no process has open for reading."""
    try:
        st = door.lstat()
    except OSError:
        return False
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.getuid():
        return False
    try:
        return not fifo_has_reader(door)
    except OSError:
        return False


def _remove_file(p: Path, what: str, dry_run: bool) -> Finding:
    if dry_run:
        return Finding(f"{what} {p.name}", "remove", "its owner is dead", p)
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
    return Finding(f"{what} {p.name}", "removed", "its owner is dead", p)


def describe(findings: list[Finding]) -> list[dict[str, Any]]:
    """Findings as plain dicts (for JSON output)."""
    return [
        {"what": f.what, "action": f.action, "reason": f.reason, "path": str(f.path or "")}
        for f in findings
    ]


# -- the records folders of worker pools ------------------------------------------


def pool_dir_name(pid: int | None = None) -> str:
    """The folder (under the bus root) where the pools of process ``pid`` (default:
    this one) record the shm and SysV objects they make for their workers."""
    if pid is None:
        pid = os.getpid()
    return f"_pool-{pid}-{pid_start_time(pid) or 0}"


def process_folder() -> BusDir:
    """This process's records folder (:func:`pool_dir_name`), made if missing.

    Its worker pools and direct shm links record their objects there.
    Raises what :meth:`~ipcbus.busdir.BusDir.ensure` raises.
    """
    with FOLDER_LOCK:  # not removed half-made by another thread emptying it
        return BusDir(pool_dir_name()).ensure()


def remove_pool_dir(path: Path) -> bool:
    """Remove a pool's records folder if no record is left in it; return whether it went."""
    with FOLDER_LOCK:  # no thread of this process records into it meanwhile
        try:
            if any((path / "objects").iterdir()):
                return False
        except FileNotFoundError:
            pass
        except OSError:
            return False
        from .busdir import KEYFILE_NAME

        for leftover in ("objects", KEYFILE_NAME):
            target = path / leftover
            try:
                if target.is_dir() and not target.is_symlink():
                    target.rmdir()
                else:
                    target.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                pass
            except OSError:  # a record came (another process's gc?): leave it all
                return False
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:  # something else was put there: leave it
            return False
        return True


def reclaim_pools(root: Path, *, dry_run: bool = False) -> list[Finding]:
    """Collect the records of worker pools whose process is gone and remove their folders.

    Folders of live pools (the pid with the same start time) are left alone.
    """
    out: list[Finding] = []
    try:
        entries = sorted(Path(root).iterdir())
    except FileNotFoundError:
        return out
    for entry in entries:
        m = _POOL_DIR_RE.match(entry.name)
        if m is None or entry.is_symlink() or not entry.is_dir():
            continue
        start = int(m[2])
        if process_alive(int(m[1]), start or None):
            continue
        with contextlib.suppress(OSError):
            if entry.lstat().st_uid != os.getuid():
                out.append(Finding(f"folder {entry.name}", "skip", "owned by another user", entry))
                continue
        out.extend(collect(entry, dry_run=dry_run))
        if dry_run:
            out.append(Finding(f"folder {entry.name}", "remove", "its worker pool is dead", entry))
        elif remove_pool_dir(entry):
            out.append(Finding(f"folder {entry.name}", "removed", "its worker pool is dead", entry))
    return out
