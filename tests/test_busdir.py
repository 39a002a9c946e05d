"""The bus directory: names, the root and its permissions, hub locking and recovery."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sysv_ipc

from ipcbus.busdir import (
    MAX_BUS_NAME,
    BadBusName,
    BusDir,
    bus_root,
    check_bus_path,
    client_fifo_names,
    default_root,
    remove_stale_fifos,
    resolve_group,
    stale_fifos,
    validate_bus_name,
)
from ipcbus.errors import BusBusy, BusNotFound, IpcBusError, PermissionRefused
from ipcbus.records import pid_start_time, process_alive
from ipcbus.transports.sysv import FTOK_PROJ
from ipcbus.transports.sysv import bus_key as sysv_bus_key

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
USERS_GID = 100


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh bus root (not yet created) that IPCBUS_DIR points at."""
    r = tmp_path / "root"
    monkeypatch.setenv("IPCBUS_DIR", str(r))
    return r


@pytest.fixture
def bus(bus_root: str) -> Iterator[BusDir]:
    bd = BusDir(f"b-{secrets.token_hex(4)}").ensure()
    try:
        yield bd
    finally:
        shutil.rmtree(bd.path, ignore_errors=True)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class Child:
    """A ``tests.fifo_peer`` child that prints a line when it is ready."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fifo_peer", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdin:
            self.proc.stdin.close()
        if self.proc.stdout:
            self.proc.stdout.close()


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orders", "a", "svc.payments", "x_y-z", "A9", "n" * MAX_BUS_NAME])
def test_valid_bus_names(name: str) -> None:
    assert validate_bus_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("/etc", "'/'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("../x", "'/'"),
        (".", "it starts with '.'"),
        (".hidden", "it starts with '.'"),
        ("-flag", "it starts with '-'"),
        ("has space", "it contains ' '"),
        ("nul\0byte", "NUL"),
        ("é", "it contains 'é'"),
        ("a:b", "it contains ':'"),
        ("fifo://orders", "use the name 'orders' and transport='fifo'"),
        ("shm://a.b", "connect('a.b', transport='shm')"),
        ("tcp://orders", "'/'"),
        ("n" * (MAX_BUS_NAME + 1), "characters long"),
    ],
)
def test_bad_bus_names_are_refused(name: str, reason: str) -> None:
    with pytest.raises(BadBusName, match="invalid bus name") as info:
        validate_bus_name(name)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, IpcBusError)
    with pytest.raises(BadBusName):
        BusDir(name)


def test_bus_name_must_be_a_string() -> None:
    with pytest.raises(BadBusName, match="expected a str"):
        validate_bus_name(7)  # type: ignore[arg-type]


# -- the root ----------------------------------------------------------------


def test_default_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IPCBUS_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "x"))
    assert default_root() == tmp_path / "a"
    monkeypatch.delenv("IPCBUS_DIR")
    assert default_root() == tmp_path / "x" / "ipcbus"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_root() == Path(f"/tmp/ipcbus-{os.geteuid()}")


def test_bus_root_is_created_private(root: Path) -> None:
    old = os.umask(0)
    try:
        assert bus_root() == root
    finally:
        os.umask(old)
    assert _mode(root) == 0o700
    assert bus_root() == root  # existing and fine


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o750, 0o703, 0o770])
def test_bus_root_with_looser_permissions_is_refused(root: Path, mode: int) -> None:
    root.mkdir()
    root.chmod(mode)
    with pytest.raises(PermissionRefused, match=f"mode {mode:04o}.*chmod 700"):
        bus_root()


def test_bus_root_search_only_bits_are_accepted(root: Path) -> None:
    root.mkdir()
    root.chmod(0o711)  # what a group bus sets: others can reach, not list
    assert bus_root() == root


def test_bus_root_of_another_owner_is_refused(root: Path) -> None:
    root.mkdir(mode=0o700)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(PermissionRefused, match="belongs to uid 65534"):
        bus_root()
    # Joining a group bus under a root another member made is fine if only
    # its owner can write it.
    assert bus_root(group=USERS_GID) == root
    root.chmod(0o777)
    with pytest.raises(PermissionRefused):
        bus_root(group=USERS_GID)


def test_bus_root_symlink_or_file_is_refused(root: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    root.symlink_to(real)
    with pytest.raises(PermissionRefused, match="symbolic link"):
        bus_root()
    root.unlink()
    root.write_text("")
    with pytest.raises(PermissionRefused, match="not a directory"):
        bus_root()


# -- one bus's folder --------------------------------------------------------


def test_ensure_creates_a_private_folder(root: Path) -> None:
    old = os.umask(0o022)
    try:
        bd = BusDir("orders").ensure()
    finally:
        os.umask(old)
    assert bd.path == root / "orders"
    assert _mode(bd.path) == 0o700
    assert bd.door == bd.path / "door"
    assert stat.S_ISREG(os.lstat(bd.keyfile).st_mode)
    # The one key file of the folder is the one the SysV bus queue is keyed on.
    assert sysv_bus_key(bd.path) == sysv_ipc.ftok(str(bd.keyfile), FTOK_PROJ, silence_warning=True)
    assert sorted(p.name for p in bd.path.iterdir()) == ["objects", bd.keyfile.name]
    assert (bd.path / "objects").is_dir()
    assert bd.gid is None and bd.mode == 0o600
    assert bd.ensure() is bd  # idempotent
    assert bd.check() is bd


def test_ensure_refuses_a_loose_foreign_or_symlinked_folder(root: Path, tmp_path: Path) -> None:
    bus_root()
    loose = root / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(PermissionRefused, match=r"mode 0755; expected 0700.*chmod 700"):
        BusDir("loose").ensure()
    foreign = root / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(PermissionRefused, match="belongs to uid 65534"):
        BusDir("foreign").ensure()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (root / "linked").symlink_to(elsewhere)
    with pytest.raises(PermissionRefused, match="symbolic link"):
        BusDir("linked").ensure()


def test_check_on_a_missing_bus_is_bus_not_found(root: Path) -> None:
    with pytest.raises(BusNotFound, match="ipcbus hub ghost"):
        BusDir("ghost").check()


def test_group_bus_folder(root: Path) -> None:
    bd = BusDir("shared", group="users").ensure()
    st = os.lstat(bd.path)
    assert bd.gid == USERS_GID and bd.mode == 0o660
    assert stat.S_IMODE(st.st_mode) == 0o3770 and st.st_gid == USERS_GID
    assert _mode(root) & 0o011 == 0o011  # members can reach it; nobody can list the root
    assert _mode(root) & 0o066 == 0
    assert bus_root() == root  # still acceptable as a private root
    assert check_bus_path(bd.path).st_gid == USERS_GID  # inferred from the setgid bit
    with pytest.raises(PermissionRefused, match="not to the bus group"):
        check_bus_path(bd.path, gid=NOBODY)
    os.chmod(bd.path, 0o3777)
    with pytest.raises(PermissionRefused, match="outside its group"):
        bd.check()


def test_resolve_group() -> None:
    assert resolve_group(None) is None
    assert resolve_group("users") == USERS_GID
    assert resolve_group(USERS_GID) == USERS_GID
    with pytest.raises(ValueError, match="unknown group 'no-such-group'"):
        resolve_group("no-such-group")
    with pytest.raises(ValueError, match="invalid gid"):
        resolve_group(-1)
    with pytest.raises(TypeError):
        resolve_group(1.5)  # type: ignore[arg-type]


# -- hub lock, pid file, recovery --------------------------------------------


def test_a_hub_waits_out_a_brief_lock_that_is_no_live_hubs(bus: BusDir) -> None:
    """``ipcbus gc`` holds the hub lock while it removes a dead hub's files (for
    microseconds): a hub starting then waits for it instead of failing BusBusy."""
    import fcntl
    import threading

    fd = os.open(bus.pidfile, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    os.write(fd, b"999999999\n12345\n")  # a dead hub's pid file, locked by gc
    fcntl.flock(fd, fcntl.LOCK_EX)
    releaser = threading.Timer(0.03, os.close, (fd,))
    releaser.start()
    try:
        with bus.lock_hub() as lock:
            assert lock.held and bus.hub_pid() == os.getpid()
    finally:
        releaser.join()


def test_two_hubs_for_one_bus(bus: BusDir) -> None:
    lock = bus.lock_hub()
    try:
        assert bus.hub_pid() == os.getpid()
        assert bus.pidfile.read_text().split() == [str(os.getpid()), str(pid_start_time(os.getpid()))]
        assert bus.hub_transports() is None  # not said
        with pytest.raises(BusBusy, match=f"already served by hub pid {os.getpid()}"):
            bus.lock_hub()
    finally:
        lock.release()
    lock.release()  # idempotent
    assert not bus.pidfile.exists()
    assert bus.hub_pid() is None
    with bus.lock_hub() as again:
        assert again.held
    assert not again.held


def test_pid_file_names_the_hubs_transports(bus: BusDir) -> None:
    assert bus.hub_transports() is None  # no pid file
    with bus.lock_hub(("sysv", "shm")):
        me = os.getpid()
        assert bus.pidfile.read_text() == f"{me}\n{pid_start_time(me)}\nsysv,shm\n"
        assert bus.hub_pid() == me
        assert bus.hub_transports() == ("sysv", "shm")
    assert bus.hub_transports() is None


def test_a_dead_hub_not_yet_reaped_does_not_block_the_next(bus: BusDir) -> None:
    """A zombie (exited, its parent has not waited) holds no lock and no file: the
    next hub recovers its pid file and door (it refused, naming a live process)."""
    child = Child("hold-lock", bus.name, str(bus.root))
    try:
        assert child.first_line == "locked"
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rpartition(")")[2].split()[0] == "Z"
        assert pid_start_time(child.pid) is not None  # the pid still exists
        assert not process_alive(child.pid) and bus.hub_pid() is None
        with bus.lock_hub():
            assert bus.hub_pid() == os.getpid()
    finally:
        child.kill()  # reaps it


def test_an_explicit_root_is_checked_like_the_default(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(PermissionRefused, match="mode 0777"):
        BusDir("b", root=loose)
    link = tmp_path / "link"
    link.symlink_to(loose)
    with pytest.raises(PermissionRefused, match="symbolic link"):
        BusDir("b", root=link)
    fresh = tmp_path / "fresh" / "root"
    assert BusDir("b", root=fresh).root == fresh  # created, 0700
    assert _mode(fresh) == 0o700


def test_hub_in_another_process_then_sigkilled(bus: BusDir, caplog: pytest.LogCaptureFixture) -> None:
    child = Child("hold-lock", bus.name, str(bus.root))
    try:
        assert child.first_line == "locked"
        assert bus.hub_pid() == child.pid
        with pytest.raises(BusBusy, match=f"already served by hub pid {child.pid}"):
            bus.lock_hub()
        dead_client = _dead_pid()
        stale = [bus.path / n for n in client_fifo_names(dead_client, secrets.token_hex(8))]
        for p in stale:
            os.mkfifo(p, 0o600)
    finally:
        child.kill()  # SIGKILL: no cleanup ran
    assert bus.door.exists() and bus.pidfile.exists()
    assert bus.hub_pid() is None  # the pid file names a dead process
    caplog.set_level(logging.WARNING, "ipcbus.busdir")
    with bus.lock_hub():
        assert bus.hub_pid() == os.getpid()
        assert not bus.door.exists(), "the dead hub's door was not removed"
        assert not any(p.exists() for p in stale), "the dead client's FIFOs were not removed"
    assert f"hub pid {child.pid} died without cleaning up" in caplog.text


def test_stale_pidfile_of_a_dead_pid_is_recovered(bus: BusDir) -> None:
    bus.pidfile.write_text(f"{_dead_pid()}\n12345\n")
    with bus.lock_hub() as lock:
        assert lock.pid == os.getpid()
        assert bus.pidfile.read_text().split()[0] == str(os.getpid())


def test_pidfile_naming_a_live_process_without_the_lock_is_refused(bus: BusDir) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        start = None
        while start is None:  # /proc/<pid>/stat exists as soon as fork returned
            start = pid_start_time(sleeper.pid)
        bus.pidfile.write_text(f"{sleeper.pid}\n{start}\n")
        with pytest.raises(BusBusy, match=f"names live process {sleeper.pid}"):
            bus.lock_hub()
        # A reused pid (same number, another start time) is not the old hub.
        bus.pidfile.write_text(f"{sleeper.pid}\n{start + 1}\n")
        assert bus.hub_pid() is None
        with bus.lock_hub():
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
        assert sleeper.stdin is not None
        sleeper.stdin.close()


def test_door_read_by_a_process_without_the_lock_is_refused(bus: BusDir) -> None:
    os.mkfifo(bus.door, 0o600)
    reader = os.open(bus.door, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BusBusy, match="is reading its door"):
            bus.lock_hub()
    finally:
        os.close(reader)
        bus.door.unlink()


def test_pidfile_symlink_and_door_of_the_wrong_type_are_refused(bus: BusDir, tmp_path: Path) -> None:
    bus.pidfile.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionRefused, match="symbolic link"):
        bus.lock_hub()
    bus.pidfile.unlink()
    bus.door.write_text("")
    with pytest.raises(PermissionRefused, match="not a FIFO"):
        bus.lock_hub()
    bus.door.unlink()


def test_cleanup_removes_door_and_own_pidfile(bus: BusDir) -> None:
    lock = bus.lock_hub()
    os.mkfifo(bus.door, 0o600)
    bus.cleanup()
    assert not bus.door.exists() and not bus.pidfile.exists()
    lock.release()
    # Another process's pid file is left alone.
    bus.pidfile.write_text("1\n")
    bus.cleanup()
    assert bus.pidfile.exists()
    bus.pidfile.unlink()


def test_stale_fifo_sweep(bus: BusDir) -> None:
    dead = [bus.path / n for n in client_fifo_names(_dead_pid(), secrets.token_hex(8))]
    live = [bus.path / n for n in client_fifo_names(os.getpid(), secrets.token_hex(8))]
    for p in (*dead, *live):
        os.mkfifo(p, 0o600)
    odd = bus.path / "fifo-1-notatoken.c2h"
    odd.write_text("")
    try:
        assert sorted(stale_fifos(bus.path)) == sorted(dead)
        assert sorted(remove_stale_fifos(bus.path)) == sorted(dead)
        assert all(p.exists() for p in live) and odd.exists()
    finally:
        for p in (*live, odd):
            p.unlink()


def test_client_fifo_names() -> None:
    assert client_fifo_names(42, "0123456789abcdef") == (
        "fifo-42-0123456789abcdef.c2h",
        "fifo-42-0123456789abcdef.h2c",
    )
    with pytest.raises(ValueError):
        client_fifo_names(42, "../../etc")
