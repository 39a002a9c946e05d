"""``ipcbus ls`` and ``ipcbus gc``: what a bus holds, and cleaning up after the dead.

Stale objects are made the honest way: a child process creates a real SysV
queue, records it with :func:`ipcbus.records.record_object` and exits, so its
creator is dead.  Foreign records and objects are written or changed by hand.
gc must report and skip what is not ours, and never remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import sysv_ipc
from click.testing import CliRunner

import ipcbus
from ipcbus.busdir import BusDir
from ipcbus.cli import main
from ipcbus.gc import collect, scan, sysv_table
from ipcbus.records import ObjectRecord, list_records, record_object

try:
    from hub_client import REPO, peers, start_hub
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.hub_client import REPO, peers, start_hub

NOBODY = 65534
_names = itertools.count()

_MAKE_STALE = """
import sys, sysv_ipc
from pathlib import Path
from ipcbus.records import record_object
q = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=8192)
q.send(b"left behind", type=1)
record_object(Path(sys.argv[1]), "msq", q.id, key=q.key, extra={"role": "test"})
print(q.id, flush=True)
"""


@pytest.fixture
def bus_name() -> str:
    """A bus name no other test uses."""
    return f"g{os.getpid()}-{next(_names)}"


@pytest.fixture
def busdir(bus_name: str) -> Iterator[BusDir]:
    """The bus folder, created (as a hub would)."""
    yield BusDir(bus_name).ensure()


async def run(*args: str, timeout: float = 20.0, columns: str | None = "250") -> tuple[int, str, str]:
    """Run ``ipcbus ARGS`` (``columns``: $COLUMNS, wide for the tables): (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ipcbus", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO, env=env,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def make_stale_queue(bd: BusDir) -> tuple[int, int]:
    """A queue created and recorded by a child that has exited: (queue id, dead pid)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MAKE_STALE, str(bd.path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return int(out), proc.pid


def queue_exists(ident: int) -> bool:
    return ident in sysv_table("msg")


@contextlib.contextmanager
def removing(*idents: int) -> Iterator[None]:
    """Remove these queues after the block, whatever gc did (the leak check wants them gone)."""
    try:
        yield
    finally:
        for i in idents:
            with contextlib.suppress(sysv_ipc.ExistentialError):
                sysv_ipc.remove_message_queue(i)


def write_record(bd: BusDir, name: str, rec: ObjectRecord | bytes) -> Path:
    p = bd.path / "objects" / name
    p.write_bytes(rec if isinstance(rec, bytes) else msgspec.json.encode(rec))
    return p


# -- gc -------------------------------------------------------------------------------


@pytest.mark.single_loop
async def test_gc_removes_a_dead_creators_queue(busdir: BusDir) -> None:
    qid, dead = await make_stale_queue(busdir)
    with removing(qid):
        assert queue_exists(qid)
        [(path, rec)] = list_records(busdir.path)
        assert rec is not None and rec.creator_pid == dead and not rec.creator_alive

        code, out, err = await run("gc", "--bus", busdir.name, "--dry-run")
        assert code == 0, err
        assert f"msq {qid}: creator pid {dead} is dead" in out
        assert "gc: would remove 1 object(s)" in out
        assert queue_exists(qid) and path.exists()  # a dry run changes nothing

        code, out, err = await run("gc", "--bus", busdir.name)
        assert code == 0, err
        assert f"removed  msq {qid}" in out and "gc: removed 1 object(s)" in out
        assert not queue_exists(qid) and not path.exists()

        code, out, _ = await run("gc", "--bus", busdir.name)
        assert (code, out.strip()) == (0, f"{busdir.name}: nothing to collect\ngc: removed 0 object(s)")


_KILLED_WHILE_MAKING = """
import asyncio, os, posix_ipc, signal, sys
from pathlib import Path
import ipcbus.transports.shm as shm
import ipcbus.transports.sysv as sysv

busdir, point = Path(sys.argv[1]), sys.argv[2]


def then_die(make):
    def made_it(*args, **kwargs):
        make(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # killed between making an object and its next step
    return made_it


if point == "segment":
    shm._shm_create = then_die(shm._shm_create)
elif point == "semaphore":
    posix_ipc.Semaphore = then_die(posix_ipc.Semaphore)
elif point == "bell":
    os.mkfifo = then_die(os.mkfifo)
elif point == "record":
    os.replace = then_die(lambda *a: None)  # killed with the record's temporary file written
elif point == "queue":
    sysv.open_handle = then_die(sysv.open_handle)
elif point in ("id-record", "hub-queue"):
    import ipcbus.records as records

    write = records.record_object

    def record_object(busdir, kind, ident, **kw):
        path = write(busdir, kind, ident, **kw)
        if kind == "msq" and not str(ident).startswith(records.PENDING_PREFIX):
            os.kill(os.getpid(), signal.SIGKILL)  # both records written, the first not yet removed
        return path

    records.record_object = record_object


async def main():
    if point in ("queue", "id-record"):
        sysv.SysvPairLink.create(busdir)
    elif point == "hub-queue":
        acceptor = sysv.SysvAcceptor(busdir)
        await acceptor.__aenter__()
    else:
        shm.ShmLink.create(busdir, ring_size=shm.MIN_RING_SIZE)

asyncio.run(main())
"""


@pytest.mark.single_loop
@pytest.mark.parametrize(
    "point", ["segment", "semaphore", "bell", "record", "queue", "id-record", "hub-queue"]
)
async def test_gc_removes_what_a_process_killed_while_making_it_left(busdir: BusDir, point: str) -> None:
    """Every object is recorded before it is made (a segment or queue, whose id
    the kernel picks, by its key): a creator killed right after making one
    leaves nothing that gc cannot find."""
    from ipcbus.testing import own_kernel_objects

    before = own_kernel_objects()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_WHILE_MAKING, str(busdir.path), point,
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == -9, err.decode()
    left = own_kernel_objects() - before
    objects = sorted(p.name for p in (busdir.path / "objects").iterdir())
    assert bool(left) == (point != "record")
    assert objects  # a record (or its temporary file) names what was made
    findings = collect(busdir.path)  # once is enough, whatever was left
    assert all(f.action in ("removed", "forgot") for f in findings), findings
    assert own_kernel_objects() - before == set()
    assert not list((busdir.path / "objects").iterdir())
    if point == "hub-queue":  # the bus is usable again: no queue of unknown origin in the way
        async with ipcbus.Hub(busdir.name, transports=("sysv",)):
            pass
    assert not [p for p in busdir.path.iterdir() if p.name.endswith(".bell")]


def test_a_failed_id_record_undoes_the_object(busdir: BusDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """create_keyed: if the record naming the id cannot be written (a full disk),
    the object is removed, not left recorded by key while its creator lives."""
    from ipcbus import records
    from ipcbus.sysv import open_handle

    write = records.record_object

    def record_object(bd: Path, kind: Any, ident: Any, **kw: Any) -> Path:
        if not str(ident).startswith(records.PENDING_PREFIX):
            raise OSError(28, "No space left on device")
        return write(bd, kind, ident, **kw)

    monkeypatch.setattr(records, "record_object", record_object)
    before = set(sysv_table("msg"))
    with pytest.raises(OSError, match="No space"):
        records.create_keyed(
            busdir.path,
            "msq",
            lambda k: open_handle(k, sysv_ipc.IPC_CREX, 0o600, 8192),
            lambda made: made[0].id,
            Exception,
            remove=lambda made: made[0].remove(),
        )
    assert set(sysv_table("msg")) == before
    assert not list((busdir.path / "objects").iterdir())


def test_gc_leaves_another_users_half_written_records(busdir: BusDir) -> None:
    objects = busdir.path / "objects"
    objects.mkdir(exist_ok=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    theirs = objects / f"msq-1.json.{int(dead.stdout)}.tmp"
    ours = objects / f"msq-2.json.{int(dead.stdout)}.tmp"
    theirs.write_bytes(b"{")
    ours.write_bytes(b"{")
    os.chown(theirs, NOBODY, NOBODY)
    findings = collect(busdir.path)
    assert theirs.exists() and not ours.exists()
    assert [f.what for f in findings] == [f"record {ours.name}"]


@pytest.mark.single_loop
async def test_gc_reports_and_skips_what_is_not_ours(busdir: BusDir) -> None:
    qid, dead = await make_stale_queue(busdir)
    ours = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=8192)
    given = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=8192)
    with removing(qid, ours.id, given.id):
        uid = os.getuid()
        # 1. A record written by another user (creator uid 65534) naming a queue of ours.
        foreign = ObjectRecord(
            kind="msq", ident=str(ours.id), key=ours.key, creator_pid=dead,
            creator_uid=NOBODY, created=0.0,
        )  # fmt: skip
        p_foreign = write_record(busdir, f"msq-{ours.id}.json", foreign)
        os.chown(p_foreign, NOBODY, -1)  # that user's own file, as it would be
        # 1b. A forged record: written by another user, claiming to be ours.
        forged = ObjectRecord(
            kind="msq", ident=str(ours.id), key=ours.key, creator_pid=dead, creator_uid=uid,
        )  # fmt: skip
        p_forged = write_record(busdir, "msq-forged.json", forged)
        os.chown(p_forged, NOBODY, -1)
        # 2. Our record, dead creator, but the queue now belongs to another user.
        given.uid = NOBODY
        p_given = write_record(
            busdir,
            f"msq-{given.id}.json",
            ObjectRecord(kind="msq", ident=str(given.id), key=given.key, creator_pid=dead, creator_uid=uid),
        )
        # 3. A corrupted record, 4. files gc has no business with, 5. a live creator's record.
        p_bad = write_record(busdir, "msq-999999.json", b"{this is not json")
        stray = busdir.path / "notes.txt"
        stray.write_text("mine, not gc's")
        odd_fifo = busdir.path / "my-own.fifo"
        os.mkfifo(odd_fifo, 0o600)
        p_live = record_object(busdir.path, "msq", 424242)  # this process: alive

        try:
            verdicts = {f.what: (f.action, f.reason) for f, _ in scan(busdir.path)}
            assert verdicts[f"msq {ours.id}"] == ("skip", f"recorded by uid {NOBODY}, not ours ({uid})")
            assert verdicts[f"msq {given.id}"][0] == "skip"
            assert f"belongs to uid {NOBODY}" in verdicts[f"msq {given.id}"][1]
            assert verdicts["msq-999999.json"] == ("skip", "corrupted or forged record (left in place)")
            assert verdicts["msq-forged.json"] == ("skip", "corrupted or forged record (left in place)")
            assert verdicts["msq 424242"][0] == "keep"
            assert verdicts[f"msq {qid}"][0] == "remove"

            code, out, err = await run("gc", "--bus", busdir.name)
            assert code == 0, err
            assert f"recorded by uid {NOBODY}, not ours" in out
            assert f"belongs to uid {NOBODY}" in out
            assert "corrupted or forged record" in out
            assert f"creator pid {os.getpid()} is alive" in out
            assert "gc: removed 1 object(s)" in out
            # Only the dead creator's own queue went.
            assert not queue_exists(qid)
            assert queue_exists(ours.id) and queue_exists(given.id)
            for p in (p_foreign, p_forged, p_given, p_bad, p_live, stray, odd_fifo):
                assert p.exists() or p.is_fifo(), p
        finally:
            odd_fifo.unlink()


async def test_gc_removes_dead_clients_fifos_and_a_dead_hubs_files(busdir: BusDir) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    dead = proc.pid
    fifo = busdir.path / f"fifo-{dead}-{secrets.token_hex(8)}.c2h"
    os.mkfifo(fifo, 0o600)
    busdir.pidfile.write_text(f"{dead}\n12345\n")
    os.mkfifo(busdir.door, 0o600)
    found = {f.what: f.action for f in collect(busdir.path, dry_run=True)}
    assert found == {
        f"FIFO of a dead client {fifo.name}": "remove",
        "stale hub pid file hub.pid": "remove",
        "stale door FIFO door": "remove",
    }
    assert fifo.is_fifo() and busdir.door.is_fifo()
    done = {f.what: f.action for f in collect(busdir.path)}
    assert set(done.values()) == {"removed"}
    assert not fifo.exists() and not busdir.pidfile.exists() and not busdir.door.exists()


async def leave_dead_clients_objects(hub: ipcbus.Hub) -> tuple[Path, int]:
    """What clients killed while connecting leave in a running hub's folder:
    a dead client's FIFO and a queue recorded by a dead process."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    fifo = hub.path / f"fifo-{proc.pid}-{secrets.token_hex(8)}.c2h"
    os.mkfifo(fifo, 0o600)
    qid, _dead = await make_stale_queue(hub.busdir)
    return fifo, qid


@pytest.mark.single_loop
async def test_a_running_hub_collects_what_dead_clients_left(
    bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients killed while connecting leave objects (here a dead client's
    FIFO and a queue recorded by a dead process); a hub that runs for weeks
    removes them as it goes, not only when it starts."""
    import ipcbus.hub as hub_module

    monkeypatch.setattr(hub_module, "GC_INTERVAL", 0.05)
    async with ipcbus.Hub(bus_name, transports=("fifo",)) as hub:
        collected = asyncio.Event()
        real = hub._collect

        def collect() -> None:
            real()
            collected.set()

        monkeypatch.setattr(hub, "_collect", collect)
        fifo, qid = await leave_dead_clients_objects(hub)
        with removing(qid):
            collected.clear()
            with anyio.fail_after(10):
                await collected.wait()  # a collection that started after they were left
            assert not fifo.exists() and not queue_exists(qid)
            assert list_records(hub.path) == []
            async with ipcbus.connect(bus_name) as bus:  # the hub serves on
                stats = (await bus.request("$SYS.stats", timeout=5)).decode(dict[str, Any])
                assert stats["transports"] == ["fifo"]


@pytest.mark.single_loop
async def test_a_hub_collects_what_dead_clients_left_when_it_closes(bus_name: str) -> None:
    """What clients killed since the last periodic collection left went with
    the hub's close (the next hub, or `ipcbus gc`, found it)."""
    async with ipcbus.Hub(bus_name, transports=("fifo",)) as hub:
        fifo, qid = await leave_dead_clients_objects(hub)
        with removing(qid):
            await hub.aclose()  # well within hub.GC_INTERVAL (60 s) of its start
            assert not queue_exists(qid) and not fifo.exists()
            assert list_records(hub.path) == []


def test_gc_leaves_the_pid_file_of_a_hub_still_starting(busdir: BusDir) -> None:
    # A hub locks its pid file, then writes its pid: in between, the file is
    # empty but held.  gc must not take it for a dead hub's and remove it (the
    # hub would then serve a file nobody finds, and clients see no hub).
    import fcntl

    fd = os.open(busdir.pidfile, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert busdir.hub_locked() and busdir.hub_pid() is None
        collect(busdir.path)
        assert busdir.pidfile.exists()
    finally:
        os.close(fd)
    assert not busdir.hub_locked()
    collect(busdir.path)
    assert not busdir.pidfile.exists()  # now it is a dead hub's: removed


def test_gc_decides_on_a_dead_hubs_files_while_holding_the_hub_lock(
    busdir: BusDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hub that starts between gc's look at the pid file and its removal
    # would lose its pid file and door (and a third hub could start): gc
    # decides and removes while it holds the lock a starting hub takes.
    import ipcbus.gc

    busdir.pidfile.write_text("999999999\n12345\n")
    seen: list[bool] = []

    def alive(pid: int, start: int | None = None) -> bool:
        seen.append(busdir.hub_locked())
        return False

    monkeypatch.setattr(ipcbus.gc, "process_alive", alive)
    assert [f.what for f in collect(busdir.path)] == ["stale hub pid file hub.pid"]
    assert seen == [True]
    assert not busdir.hub_locked()


_FIFO_IN_PLACE = """
import asyncio, json, os, sys
from pathlib import Path
import ipcbus
from ipcbus.busdir import BusDir
from ipcbus.gc import collect
from ipcbus.records import list_records
name, case = sys.argv[1], sys.argv[2]
bd = BusDir(name).ensure()
if case == "pidfile":
    os.mkfifo(bd.pidfile, 0o600)
    async def attempt():
        await ipcbus.connect(name)
    try:
        asyncio.run(attempt())
    except ipcbus.IpcBusError as exc:
        print("connect:", type(exc).__name__)
    print("gc:", [f.what for f in collect(bd.path)])
    os.unlink(bd.pidfile)
elif case == "record":
    os.mkfifo(bd.path / "objects" / "planted.json", 0o600)
    print("records:", [(p.name, r) for p, r in list_records(bd.path)])
    os.unlink(bd.path / "objects" / "planted.json")
else:
    os.unlink(bd.keyfile)
    os.mkfifo(bd.keyfile, 0o600)
    try:
        BusDir(name).ensure()
    except ipcbus.IpcBusError as exc:
        print("ensure:", type(exc).__name__, exc)
    os.unlink(bd.keyfile)
"""


@pytest.mark.parametrize("case", ["pidfile", "record", "keyfile"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(bus_name: str, case: str) -> None:
    """A FIFO put where a pid, record or key file belongs (any member of a group
    bus can) would block a plain open() forever, and the event loop with it."""
    out = subprocess.run(
        [sys.executable, "-c", _FIFO_IN_PLACE, bus_name, case],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    expected = {
        "pidfile": "connect: BusNotFound\ngc: []\n",
        "record": "records: [('planted.json', None)]\n",
        "keyfile": "is not a regular file; remove it",
    }[case]
    assert expected in out.stdout, out.stdout
    shutil.rmtree(BusDir(bus_name).path)


async def test_gc_leaves_a_live_hub_alone(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=("fifo",)) as hub:
        before = sorted(os.listdir(hub.path))
        assert collect(hub.path) == []
        assert sorted(os.listdir(hub.path)) == before
        assert hub.busdir.hub_pid() == os.getpid()


@pytest.mark.single_loop
async def test_gc_cli_all_and_missing_bus(bus_name: str) -> None:
    code, out, err = await run("gc", "--bus", bus_name, "--dry-run")
    assert code == 0, err
    assert "no directory" in out and "nothing to collect" in out
    code, out, err = await run("gc", "--all", "--dry-run")
    assert code == 0, err
    assert "gc: would remove" in out


# -- ls -------------------------------------------------------------------------------


@pytest.mark.single_loop
async def test_ls_with_no_hub_and_no_records(bus_name: str) -> None:
    code, out, err = await run("ls", "--bus", bus_name)
    assert code == 1, (out, err)
    assert "no hub is running and no records" in out
    assert f"ipcbus hub {bus_name}" in out
    code, out, _ = await run("ls", "--bus", bus_name, "--json")
    assert code == 1
    info = json.loads(out)
    assert info["hub"] is None and info["objects"] == []


@pytest.mark.single_loop
async def test_ls_from_records_without_a_hub(busdir: BusDir) -> None:
    qid, dead = await make_stale_queue(busdir)
    with removing(qid):
        code, out, err = await run("ls", "--bus", busdir.name, "--json")
        assert code == 0, err
        info = json.loads(out)
        assert info["hub"] is None
        [obj] = info["objects"]
        assert obj["kind"] == "msq" and obj["ident"] == str(qid)
        assert obj["creator_pid"] == dead and obj["creator_alive"] is False
        assert obj["messages"] == 1 and obj["bytes"] == len(b"left behind")
        assert obj["mode"] == "0o600" and obj["owner_uid"] == os.getuid()
        assert obj["state"].startswith("remove")
        code, out, err = await run("ls", "--bus", busdir.name)
        assert code == 0, err
        assert "no hub running" in out
        assert f"{qid}" in out and "1 msgs, 11 B" in out


@pytest.mark.single_loop
async def test_ls_against_a_live_hub(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=("fifo",)) as hub, peers(bus_name, 1) as (p,):
        await p.call("sub", name="w", subject="work.>", queue="crew")
        await p.call("pub", subject="work.x", count=3)
        code, out, err = await run("ls", "--bus", bus_name, "--json")
        assert code == 0, err
        info: dict[str, Any] = json.loads(out)
        assert info["hub"]["pid"] == os.getpid()
        assert info["hub"]["transports"] == ["fifo"]
        [link] = info["links"]  # ls's own link is left out
        assert link["peer_pid"] == p.pid and link["transport"] == "fifo"
        assert link["msgs_in"] >= 3 and link["dropped"] == 0
        assert {"link": link["name"], "pid": p.pid, "subject": "work.>", "queue": "crew"} in info[
            "subscriptions"
        ]
        code, out, err = await run("ls", "--bus", bus_name)
        assert code == 0, err
        assert f"hub pid {os.getpid()}" in out
        assert "transports fifo" in out
        assert str(p.pid) in out and "work.>" in out and "crew" in out
        # Into a pipe with no COLUMNS set: the tables are not cut to 80 columns.
        code, out, err = await run("ls", "--bus", bus_name, columns=None)
        assert code == 0, err
        assert "…" not in out and "transport" in out and "crew" in out
        assert hub.stats()["accepted"] >= 4  # p, and the three ls runs


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", ["sysv", "shm"])
async def test_ls_against_a_hub_without_fifos(bus_name: str, transport: str) -> None:
    """ls reads which transports the hub accepts (its pid file) and knocks with one of them."""
    async with ipcbus.Hub(bus_name, transports=(transport,)) as hub:
        code, out, err = await run("ls", "--bus", bus_name, "--json")
        assert code == 0, err
        info: dict[str, Any] = json.loads(out)
        assert "error" not in info, info
        assert info["hub"]["pid"] == os.getpid() and info["hub"]["transports"] == [transport]
        assert hub.stats()["refused"] == 0


def test_gc_never_follows_a_bus_folder_that_is_a_symbolic_link(bus_name: str, tmp_path: Path) -> None:
    """gc removes files: through a symlinked bus folder it would remove them elsewhere."""
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "hub.pid").write_text("999999\n1\n")  # names a dead pid
    os.mkfifo(victim / "door", 0o600)
    os.mkfifo(victim / "fifo-999999-0123456789abcdef.c2h", 0o600)
    before = sorted(os.listdir(victim))
    link = BusDir(bus_name).path
    link.symlink_to(victim)
    try:
        res = CliRunner().invoke(main, ["gc", "--bus", bus_name])
        assert res.exit_code == 0, res.output
        assert "skipped" in res.output and "symbolic link" in res.output
        assert sorted(os.listdir(victim)) == before
    finally:
        link.unlink()
        for name in ("door", "fifo-999999-0123456789abcdef.c2h"):  # no FIFO left in pytest's tmp
            (victim / name).unlink(missing_ok=True)


@pytest.mark.single_loop
async def test_ls_against_a_stopped_hub_says_it_runs_but_does_not_answer(bus_name: str) -> None:
    import signal

    hp = await start_hub(bus_name)
    try:
        os.kill(hp.pid, signal.SIGSTOP)
        code, out, err = await run("ls", "--bus", bus_name, timeout=30)
        assert code == 1, (out, err)
        assert f"hub pid {hp.pid} is running but did not answer" in out
        assert "no hub" not in out
        code, out, err = await run("pub", "x", "1", "--bus", bus_name, timeout=60)
        assert code == 9, (out, err)  # HandshakeTimeout, as on every transport
        assert "did not answer" in err and "is stopped" in err, err
    finally:
        os.kill(hp.pid, signal.SIGCONT)
        await hp.stop()
        hp.err.close()
