"""The shared-memory transport: conformance, real processes, crashes, bad input.

Peers run as real processes (``tests/shm_peer.py``); events are ordered by
the lines they print, never by sleeping.  The suite's leak check (conftest)
verifies after every test that no segment, semaphore file, thread or child
is left behind; the crash tests also check ``/proc/sysvipc`` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import pytest
from pairs import created_pair

from ipcbus import records
from ipcbus.errors import (
    ConnectionClosed,
    EndOfStream,
    FrameTooLarge,
    PermissionRefused,
    ProtocolError,
)
from ipcbus.frames import PROTOCOL_VERSION
from ipcbus.sysv import proc_table
from ipcbus.testing import check_link
from ipcbus.transports.door import Door, HandshakeTimeout, Knock
from ipcbus.transports.shm import (
    _OFF_HEAD0,
    _OFF_MAGIC,
    _OFF_TAIL1,
    _OFF_VERSION,
    HEADER_SIZE,
    ShmAcceptor,
    ShmLink,
    connect_shm,
)

PEER = Path(__file__).with_name("shm_peer.py")
KiB = 1024
MiB = 1024 * KiB


# -- helpers ---------------------------------------------------------------------


def pair(ring_size: int = 4 * MiB, **attach: Any) -> AbstractAsyncContextManager[tuple[ShmLink, ShmLink]]:
    """A creator and an attacher in this process."""
    return created_pair(
        lambda: ShmLink.create(None, ring_size=ring_size),
        lambda params: ShmLink.attach(params, peer_pid=os.getpid(), **attach),
        lambda a: a.wait_attached(),
    )


class Peer:
    """A tests/shm_peer.py child; killed and reaped on exit."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        with anyio.fail_after(30):
            raw = await self.proc.stdout.readline()
        assert raw, f"peer exited early with status {await self.proc.wait()}"
        return raw.decode().strip()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)


@contextlib.asynccontextmanager
async def spawn(mode: str, **spec: Any) -> AsyncIterator[Peer]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PEER), mode, json.dumps(spec), stdout=asyncio.subprocess.PIPE
    )
    peer = Peer(proc)
    try:
        yield peer
    finally:
        peer.kill()
        await proc.wait()


def sysv_ids(kind: str) -> set[int]:
    return set(proc_table(kind))


SHM_DEST = 0o1000  # shown in /proc/sysvipc/shm perms once IPC_RMID is marked


def shm_perms(shmid: int) -> int:
    for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1]) == shmid:
            return int(f[2], 8)
    raise AssertionError(f"segment {shmid} does not exist")


def sem_files(params: dict[str, Any]) -> set[str]:
    """Which of the link's four semaphore files exist."""
    names = {"sem." + str(params[f"sem{i}"]).lstrip("/") for i in range(4)}
    return names & set(os.listdir("/dev/shm"))


def gone(params: dict[str, Any]) -> bool:
    """True when the link's segment and semaphores no longer exist anywhere."""
    return params["shmid"] not in sysv_ids("shm") and not sem_files(params)


# -- conformance ---------------------------------------------------------------------


async def test_check_link() -> None:
    """The Link contract, including backpressure and a 64 MiB frame through a 4 MiB ring."""
    await check_link(pair)


@pytest.mark.parametrize("ring_size", [4096, 64 * KiB])
async def test_small_ring_streams_every_size(ring_size: int) -> None:
    """Frames larger than the ring stream through in pieces; the reader gets them whole."""
    sizes = [
        1,
        7,
        8,
        100,
        ring_size // 2 - 8,
        ring_size // 2,
        ring_size - 8,
        ring_size,
        3 * ring_size + 5,
        300 * KiB,
    ]
    frames = [os.urandom(s) for s in sizes] * 3
    async with pair(ring_size) as (a, b), anyio.create_task_group() as tg:

        async def produce() -> None:
            for f in frames:
                await a.send(f)

        tg.start_soon(produce)
        for f in frames:
            got = await b.recv()
            assert got == f, f"{len(f)}-byte frame corrupted ({len(got)} bytes received)"


@pytest.mark.parametrize("hook", [False, True], ids=["recv", "on_frames"])
async def test_reader_keeps_going_when_a_pass_ends_inside_a_frame(
    monkeypatch: pytest.MonkeyPatch, hook: bool
) -> None:
    """A pass over the ring that spends its whole record budget on pieces of
    one frame (nothing delivered yet) must not leave the reader asleep: the
    writer, waiting for the room those pieces hold, will not ring again.  The
    budget is cut to 1 record (it takes 512 pieces, rings of 32 MiB, at the
    real one), and a frame twice the ring's size must still arrive."""
    import ipcbus.transports.shm as shm_mod

    monkeypatch.setattr(shm_mod, "_RX_BATCH", 1)
    frame = os.urandom(2 * MiB + 5)
    async with pair(1 * MiB) as (a, b), anyio.create_task_group() as tg:
        tg.start_soon(a.send, frame)
        with anyio.fail_after(10):
            if not hook:
                assert await b.recv() == frame
                return
            got: list[bytes | object] = []
            arrived = anyio.Event()

            def on_frames() -> None:
                got.extend(b.take_ready())
                arrived.set()

            async def idle_reader() -> None:
                with pytest.raises(ConnectionClosed):
                    await b.recv()  # idles until the link is closed below

            b.on_frames = on_frames  # frames handled in the bell's callback, as a node does
            tg.start_soon(idle_reader)
            await arrived.wait()
            assert got == [frame]
            await b.aclose()


@pytest.mark.parametrize("ring_size", [4096, 64 * KiB])
async def test_small_frames_share_records_and_keep_their_order(ring_size: int) -> None:
    """Frames under 512 bytes are packed into FRAMES records; mixed with larger
    ones (whole FRAME records, streamed ones) and with a full ring, every frame
    arrives whole and in order, and the counters match."""
    rnd = random.Random(ring_size)
    sizes = [rnd.choice([1, 3, 64, 200, 511, 512, 513, 3000, ring_size + 9]) for _ in range(3000)]
    frames = [bytes([i % 251]) * s for i, s in enumerate(sizes)]
    async with pair(ring_size) as (a, b), anyio.create_task_group() as tg:

        async def produce() -> None:
            for k, f in enumerate(frames):
                a.send_nowait(f)
                if a.pending_out > ring_size or k % 97 == 0:
                    await a.drain()

        tg.start_soon(produce)
        for k, f in enumerate(frames):
            got = await b.recv()
            assert got == f, f"frame {k}: {len(f)} bytes sent, {len(got)} received"
        assert b.info.msgs_in == len(frames)
        assert b.info.bytes_in == a.info.bytes_out == sum(sizes)


async def test_small_frames_of_one_turn_go_into_one_record() -> None:
    async with pair(64 * KiB) as (a, b):
        frames = [b"x" * 10, b"y" * 100, b"z" * 1000]
        for f in frames:
            a.send_nowait(f)
        assert a.pending_out == sum(4 + len(f) for f in frames)  # gathered, not in the ring yet
        await a.drain()  # into the ring: one FRAMES record
        assert a._hq is not None
        hdr = int(a._hq[HEADER_SIZE // 8])
        tag, length = (hdr, hdr >> 32) if sys.byteorder == "little" else (hdr >> 32, hdr)
        assert (tag & 0xFF, length & 0xFFFFFFFF) == (7, sum(4 + len(f) for f in frames))
        for f in frames:
            assert await b.recv() == f


async def test_small_frames_sent_just_before_close_arrive_before_the_end() -> None:
    async with pair(64 * KiB) as (a, b):
        for i in range(500):
            a.send_nowait(b"last words %d" % i)
        await a.aclose()  # no loop turn in between: the packed frames go out first
        for i in range(500):
            assert await b.recv() == b"last words %d" % i
        with anyio.fail_after(5), pytest.raises(EndOfStream):
            await b.recv()


async def test_large_messages_are_decoded_in_the_ring() -> None:
    """With decode_large set (the reactor sets it), a large Msg comes out decoded, copied once."""
    from ipcbus import frames as fr
    from ipcbus.node import _decode_large

    big = os.urandom(300 * KiB)
    async with pair(4 * MiB) as (a, b):
        b.decode_large = _decode_large
        a.send_parts(fr.msg_head("big.one", "_INBOX.x.1", {"k": "v"}, len(big)), big)
        a.send_nowait(fr.encode_frame(fr.Msg("small", payload=b"tiny")))
        junk = b"\xc1" * (100 * KiB)  # large, and not a frame: handed over as bytes
        a.send_nowait(junk)
        got = await b.recv()
        assert got == fr.Msg("big.one", "_INBOX.x.1", {"k": "v"}, big)
        assert await b.recv() == fr.encode_frame(fr.Msg("small", payload=b"tiny"))
        assert await b.recv() == junk
        assert b.info.msgs_in == 3
        assert b.info.bytes_in == a.info.bytes_out


async def test_both_directions_interleaved() -> None:
    async with pair(64 * KiB) as (a, b):
        for i in range(200):
            a.send_nowait(b"a%d" % i)
            b.send_nowait(b"b%d" % i)
        for i in range(200):
            assert await b.recv() == b"a%d" % i
            assert await a.recv() == b"b%d" % i


async def test_frames_sent_before_attach_wait_in_the_ring() -> None:
    a, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        a.send_nowait(b"early")
        a.send_nowait(b"x" * (100 * KiB))  # larger than the ring: part of it waits in memory
        assert not a.attached
        b = await ShmLink.attach(params, peer_pid=os.getpid())
        try:
            assert await b.recv() == b"early"
            assert await b.recv() == b"x" * (100 * KiB)
            await a.wait_attached(peer_pid=os.getpid())
            assert a.attached and a.info.peer_pid == os.getpid()
        finally:
            await b.aclose()
    finally:
        await a.aclose()


async def test_closing_wakes_every_waiter() -> None:
    """aclose() wakes a pending recv and a pending wait_writable; threads are joined."""
    async with pair(4096) as (a, _b):
        a.close_timeout = 0.01  # b never reads: do not wait for the queue to drain
        while a.pending_out <= a.high_water:
            a.send_nowait(b"z" * 60000)
        async with anyio.create_task_group() as tg:
            results: list[BaseException] = []

            async def reader() -> None:
                try:
                    await a.recv()
                except ConnectionClosed as exc:
                    results.append(exc)

            async def writer() -> None:
                try:
                    await a.wait_writable()
                except ConnectionClosed as exc:
                    results.append(exc)

            tg.start_soon(reader)
            tg.start_soon(writer)
            await asyncio.sleep(0)  # let both block (a yield, not a timed wait)
            await a.aclose()
        assert len(results) == 2
        assert a.closed


# -- two processes ---------------------------------------------------------------------


async def test_two_processes_large_frames() -> None:
    link, params = ShmLink.create(None, ring_size=1 * MiB)
    try:
        async with spawn("echo", params=params, peer_pid=os.getpid()) as peer:
            assert await peer.line() == "attached"
            await link.wait_attached(peer_pid=peer.proc.pid)
            # Both attached: the names are unlinked already, the segment marked IPC_RMID.
            assert not sem_files(params)
            assert shm_perms(int(params["shmid"])) & SHM_DEST
            frames = [os.urandom(n) for n in (1, 4095, 64 * KiB, 1 * MiB, 5 * MiB + 3)]
            for f in frames:
                await link.send(f)
                assert await link.recv() == f
            await link.aclose()
            assert await peer.proc.wait() == 0
    finally:
        await link.aclose()
    assert gone(params)


async def test_a_request_for_room_survives_a_full_bell() -> None:
    """A reader whose loop stalls while the writer commits batch after batch gets
    its bell filled with rings; the writer's request for room, rung once the ring
    is full, must still reach it, or the writer waits for room forever."""
    link, params = ShmLink.create(None, ring_size=2 * MiB)
    try:
        async with spawn("sink", params=params, peer_pid=os.getpid()) as peer:
            assert await peer.line() == "attached"
            await link.wait_attached(peer_pid=peer.proc.pid)
            peer.proc.send_signal(signal.SIGSTOP)  # its loop stops: nobody drains its bell
            sent = 0
            with anyio.fail_after(60):
                while not link._tx_blocked:  # one batch (and one ring) per loop turn
                    link.send_nowait(sent.to_bytes(8, "big"))
                    sent += 1
                    await asyncio.sleep(0)
            for _ in range(100):  # and more, queued behind the full ring
                link.send_nowait(sent.to_bytes(8, "big"))
                sent += 1
            assert sent > 70_000  # more rings than the bell holds (64 KiB)
            peer.proc.send_signal(signal.SIGCONT)
            with anyio.fail_after(60):
                await link.drain()  # everything queued got into the ring: room came back
            await link.aclose()
            assert await peer.line() == f"received {sent}"
            assert await peer.proc.wait() == 0
    finally:
        await link.aclose()
    assert gone(params)


async def test_writer_killed_mid_frame() -> None:
    """The reader gets the whole frames before, never the partial one, then ConnectionClosed."""
    link, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        async with spawn("midframe", params=params, peer_pid=os.getpid(), big=32 * MiB) as peer:
            assert await peer.line() == "blocked"  # stuck in the middle of the 32 MiB frame
            peer.kill()
            assert await link.recv() == b"first"
            assert await link.recv() == b"second"
            with anyio.fail_after(10):
                with pytest.raises(ConnectionClosed) as info:
                    await link.recv()
            assert not isinstance(info.value, EndOfStream)
            assert "partial frame was discarded" in str(info.value)
            with pytest.raises(ConnectionClosed):
                await link.send(b"to the dead")
    finally:
        await link.aclose()
    assert gone(params)


async def test_reader_killed_writer_does_not_block_forever() -> None:
    link, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        async with spawn("stall", params=params, peer_pid=os.getpid()) as peer:
            assert await peer.line() == "attached"
            await link.wait_attached()
            while link.pending_out <= link.high_water:  # ring full, then the queue
                link.send_nowait(b"w" * 50000)
            peer.kill()
            with anyio.fail_after(10):
                with pytest.raises(ConnectionClosed, match="exited"):  # bell EOF or pidfd
                    await link.wait_writable()
            with pytest.raises(EndOfStream):
                await link.recv()
    finally:
        await link.aclose()
    assert gone(params)


async def test_idle_peer_killed_ends_the_stream() -> None:
    """A recv waiting in the waiter thread sees EndOfStream when the peer dies between frames."""
    link, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        async with spawn("echo", params=params, peer_pid=os.getpid()) as peer:
            assert await peer.line() == "attached"
            await link.send(b"ping")
            assert await link.recv() == b"ping"
            async with anyio.create_task_group() as tg:

                async def waiting() -> None:
                    with anyio.fail_after(10), pytest.raises(EndOfStream):
                        await link.recv()

                tg.start_soon(waiting)
                await asyncio.sleep(0)
                peer.kill()
    finally:
        await link.aclose()


async def test_creator_killed_attacher_sees_end_of_stream() -> None:
    """The other way round: the process that made the objects dies (a client, seen by a hub)."""
    async with spawn("create", peer_pid=os.getpid()) as peer:
        params = json.loads(await peer.line())
        link = await ShmLink.attach(params, peer_pid=peer.proc.pid)
        try:
            assert await peer.line() == "attached"
            await link.send(b"x" * 100_000)
            assert await link.recv() == b"x" * 100_000
            await link.send(b"unanswered")
            peer.kill()
            with anyio.fail_after(10):
                got = []
                with pytest.raises(EndOfStream):
                    while True:  # the echo may or may not have made it before the kill
                        got.append(await link.recv())
            assert got in ([], [b"unanswered"])
        finally:
            await link.aclose()
        await peer.proc.wait()
    assert gone(params)


async def test_peer_dies_before_attaching() -> None:
    link, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        with anyio.fail_after(10), pytest.raises(ConnectionClosed, match="before attaching"):
            await link.wait_attached(peer_pid=proc.pid)
        await proc.wait()
    finally:
        await link.aclose()
    assert gone(params)


def process_folders() -> list[Path]:
    """The per-process records folders (``_pool-<pid>-<start>``) under the bus root."""
    root = Path(os.environ["IPCBUS_DIR"])
    return sorted(p for p in root.iterdir() if p.name.startswith("_pool-"))


def existing(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


async def test_direct_link_of_a_creator_killed_before_attach_is_collected() -> None:
    """A direct link (no bus) records its objects in its process's folder:
    the creator killed before anyone attached leaves nothing gc cannot find."""
    async with spawn("create", peer_pid=os.getpid()) as peer:
        params = json.loads(await peer.line())
        peer.kill()
        await peer.proc.wait()
    (folder,) = [d for d in process_folders() if d.name.startswith(f"_pool-{peer.proc.pid}-")]
    recs = [rec for _, rec in records.list_records(folder) if rec is not None]
    kinds = ["fifo", "fifo", "posix_sem", "posix_sem", "posix_sem", "posix_sem", "shm"]
    assert sorted(rec.kind for rec in recs) == kinds
    bells = [str(params["bell0"]), str(params["bell1"])]
    assert not gone(params) and existing(bells) == bells
    gc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ipcbus", "gc", "--all", stdout=asyncio.subprocess.PIPE
    )
    out = (await gc.communicate())[0].decode()
    assert gc.returncode == 0 and "removed 7 object(s)" in out, out
    assert gone(params) and existing(bells) == []
    assert process_folders() == []


async def test_direct_link_leaves_no_records_folder() -> None:
    """Attached (or closed before anyone attached): its records, and the folder, go."""
    async with spawn("create", peer_pid=os.getpid()) as peer:
        params = json.loads(await peer.line())
        assert len(process_folders()) == 1
        link = await ShmLink.attach(params, peer_pid=peer.proc.pid)
        try:
            assert await peer.line() == "attached"
            await link.send(b"ping")
            assert await link.recv() == b"ping"
            with anyio.fail_after(10):
                while process_folders():  # the creator forgets them when it reads ATTACHED
                    await asyncio.sleep(0.01)
        finally:
            await link.aclose()
    link, params = ShmLink.create(None, ring_size=64 * KiB)
    (folder,) = process_folders()
    assert folder.name.startswith(f"_pool-{os.getpid()}-")
    await link.aclose()
    assert process_folders() == [] and gone(params)


def test_direct_links_in_two_threads_share_the_records_folder() -> None:
    """Each thread's link adds records to, and drops, the one folder of the
    process: a folder one thread emptied was removed under the other's record
    (FileNotFoundError from create, ENOTEMPTY from aclose, the folder made
    again with the umask's mode and then refused)."""
    made: list[int] = []
    errors: list[str] = []

    async def churn() -> None:
        for _ in range(60):
            link = None
            try:
                link, _ = ShmLink.create(None, ring_size=64 * KiB)
                busdir = link._busdir
                assert busdir is not None, "made unrecorded"
                made.append(os.stat(busdir).st_mode & 0o777)
            except Exception as exc:
                errors.append(f"create: {exc!r}")
            if link is not None:
                try:
                    await link.aclose()
                except Exception as exc:
                    errors.append(f"aclose: {exc!r}")
                    link.close_now()

    threads = [threading.Thread(target=asyncio.run, args=(churn(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert made == [0o700] * 120
    assert process_folders() == []


async def test_connect_through_the_door(tmp_path: Path) -> None:
    """A client process joins through the real door; records disappear once attached."""
    busdir = tmp_path / "bus"
    busdir.mkdir(mode=0o700)
    async with (
        Door(busdir) as door,
        ShmAcceptor(busdir) as acceptor,
        spawn("client", busdir=str(busdir), hub_pid=os.getpid()) as peer,
    ):
        knocks = door.knocks()
        with anyio.fail_after(10):
            knock = await anext(knocks)
        assert knock.transport == "shm" and knock.pid == peer.proc.pid
        kinds = sorted(r.kind for _p, r in records.list_records(busdir) if r is not None)
        assert kinds == ["fifo"] * 2 + ["posix_sem"] * 4 + ["shm"]
        link = await acceptor.accept(knock)
        try:
            assert await peer.line() == "attached"
            assert link.info.peer_name == "peer"
            await link.send(b"hello" * 1000)
            assert await link.recv() == b"hello" * 1000
            assert records.list_records(busdir) == []  # nothing left that could leak
        finally:
            await link.aclose()
        assert await peer.proc.wait() == 0


async def test_connect_times_out_and_cleans_up(tmp_path: Path) -> None:
    busdir = tmp_path / "bus"
    busdir.mkdir(mode=0o700)
    knocks: list[Knock] = []
    with pytest.raises(HandshakeTimeout):
        await connect_shm(
            busdir, hub_pid=os.getpid(), send_knock=knocks.append, ring_size=64 * KiB, attach_timeout=0.2
        )
    assert len(knocks) == 1 and knocks[0].version == PROTOCOL_VERSION
    assert records.list_records(busdir) == []
    assert gone(dict(knocks[0].params))


async def test_acceptor_refuses_a_foreign_uid_on_a_private_bus(tmp_path: Path) -> None:
    acceptor = ShmAcceptor(tmp_path)
    knock = Knock(version=PROTOCOL_VERSION, transport="shm", pid=os.getpid(), uid=os.getuid() + 1, params={})
    with pytest.raises(PermissionRefused, match="private"):
        await acceptor.accept(knock)


# -- bad input ---------------------------------------------------------------------------


async def _attach_fails(params: dict[str, Any], exc: type[Exception], match: str, **kw: Any) -> None:
    with pytest.raises(exc, match=match):
        await ShmLink.attach(params, peer_pid=kw.pop("peer_pid", os.getpid()), **kw)


@pytest.mark.parametrize(
    ("offset", "data", "match"),
    [(_OFF_MAGIC, b"NOTOURS!", "no ipcbus header"), (_OFF_VERSION, b"\x07\0\0\0", "version 7")],
)
async def test_corrupted_header_on_attach(offset: int, data: bytes, match: str) -> None:
    a, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        assert a._mv is not None
        a._mv[offset : offset + len(data)] = data
        await _attach_fails(params, ProtocolError, match)
    finally:
        await a.aclose()


async def test_names_that_do_not_belong_to_the_segment_are_refused_and_left_alone() -> None:
    """Swapped names, or names of another link, are refused before anything is
    opened or unlinked (attach unlinked whatever it was given)."""
    a, params = ShmLink.create(None, ring_size=64 * KiB)
    other, other_params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        swaps = [
            {**params, "bell0": params["bell1"], "bell1": params["bell0"]},
            {**params, "sem0": params["sem1"], "sem1": params["sem0"]},
            {**params, "sem0": other_params["sem0"]},
            {**params, "bell0": other_params["bell0"]},
        ]
        for bad in swaps:
            await _attach_fails(bad, ProtocolError, "do not belong to this segment")
        assert len(sem_files(other_params)) == 4 and not gone(other_params)  # untouched
        bells = {os.path.basename(str(other_params[k])) for k in ("bell0", "bell1")}
        assert bells <= set(os.listdir(os.path.dirname(str(other_params["bell0"]))))
        b = await ShmLink.attach(params, peer_pid=os.getpid())  # the real params still work
        await a.wait_attached()
        await a.send(b"still fine")
        assert await b.recv() == b"still fine"
        await b.aclose()
    finally:
        await a.aclose()
        await other.aclose()


async def test_segment_of_another_uid_is_refused() -> None:
    a, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        await _attach_fails(params, PermissionRefused, "belongs to uid", peer_uid=os.getuid() + 1)
        if os.getuid() == 0:  # really give the segment away (IPC_SET), then ask for it
            a._shm.uid = 4242
            await _attach_fails(params, PermissionRefused, "belongs to uid 4242")
            a._shm.uid = 0
    finally:
        await a.aclose()


async def test_segment_that_is_not_ours_is_refused() -> None:
    a, params_a = ShmLink.create(None, ring_size=64 * KiB)
    b, params_b = ShmLink.create(None, ring_size=64 * KiB)
    try:
        # b's segment announced with a's nonce and semaphores: not the segment a made.
        forged = {**params_a, "shmid": params_b["shmid"]}
        await _attach_fails(forged, PermissionRefused, "nonce")
        # a's segment, but claimed to come from another process
        await _attach_fails(params_a, PermissionRefused, "not by the peer", peer_pid=1)
        # a semaphore that belongs to someone else
        if os.getuid() == 0:
            path = "/dev/shm/sem." + str(params_a["sem2"]).lstrip("/")
            os.chown(path, 4242, -1)
            await _attach_fails(params_a, PermissionRefused, "semaphore .* belongs to uid 4242")
            os.chown(path, 0, -1)
        # a bell that is not a FIFO, or not the peer's
        bell = str(params_a["bell1"])
        os.rename(bell, bell + ".moved")
        try:
            os.close(os.open(bell, os.O_CREAT | os.O_WRONLY, 0o600))  # a plain file
            await _attach_fails(params_a, PermissionRefused, "not the kind of file")
            os.unlink(bell)
            if os.getuid() == 0:
                os.mkfifo(bell, 0o600)
                os.chown(bell, 4242, -1)
                await _attach_fails(params_a, PermissionRefused, "bell .* belongs to uid 4242")
                os.unlink(bell)
        finally:
            os.rename(bell + ".moved", bell)
        # a semaphore file too small to be one: sem_open would map it, its first use SIGBUS
        path = "/dev/shm/sem." + str(params_a["sem1"]).lstrip("/")
        os.rename(path, path + ".moved")  # the creator keeps its own mapping of the real one
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # 0 bytes
            await _attach_fails(params_a, ProtocolError, "smaller than a semaphore")
            os.unlink(path)
        finally:
            os.rename(path + ".moved", path)
        await _attach_fails({**params_a, "bell0": "relative.bell"}, ProtocolError, "bell path")
        await _attach_fails({**params_a, "shmid": "x"}, ProtocolError, "'shmid' must be")
        await _attach_fails({**params_a, "layout": 9}, ProtocolError, "layout version 9")
    finally:
        await a.aclose()
        await b.aclose()


async def test_second_attach_is_refused() -> None:
    async with pair(64 * KiB) as (_a, _b):
        pass
    a, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        b = await ShmLink.attach(params, peer_pid=os.getpid())
        try:
            # the names are unlinked and the segment marked: a replayed knock finds nothing
            with pytest.raises((PermissionRefused, ConnectionClosed)):
                await ShmLink.attach(params, peer_pid=os.getpid())
        finally:
            await b.aclose()
    finally:
        await a.aclose()


_HOLD_BELL = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


async def test_two_attachers_at_once_only_one_gets_in() -> None:
    """The header's attached mark comes after the checks: two processes
    attaching at the same moment both passed them (both got the frames).  A
    second attacher that finds the first one's claim (its lock on the bell)
    is refused; once the claim is gone, an attach succeeds."""
    a, params = ShmLink.create(None, ring_size=64 * KiB)
    try:
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLD_BELL, str(params["bell1"]),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert await holder.stdout.readline() == b"held\n"
            with pytest.raises(PermissionRefused, match="another process is attaching"):
                await ShmLink.attach(params, peer_pid=os.getpid())
        finally:
            holder.kill()
            await holder.wait()
        b = await ShmLink.attach(params, peer_pid=os.getpid())
        try:
            await a.send(b"one")
            assert await b.recv() == b"one"
        finally:
            await b.aclose()
    finally:
        await a.aclose()
    assert gone(params)


async def test_head_counter_outside_the_ring() -> None:
    async with pair(64 * KiB) as (a, b):
        await a.send(b"fine")
        assert await b.recv() == b"fine"
        await a.send(b"then scribbled")
        await asyncio.sleep(0)  # the batch is committed at the end of this loop iteration
        assert a._hq is not None
        a._hq[_OFF_HEAD0 // 8] = 1 << 40
        with anyio.fail_after(5), pytest.raises(ProtocolError, match="head counter"):
            await b.recv()
        assert b.closed
        with pytest.raises(ConnectionClosed):
            await b.send(b"x")


async def test_tail_counter_outside_the_ring() -> None:
    async with pair(4096) as (a, b):
        for _ in range(3):
            await a.send(b"t" * 1000)
            assert await b.recv() == b"t" * 1000
        assert a._hq is not None
        a._hq[_OFF_TAIL1 // 8] = 1 << 50  # the tail of the ring b writes (a reads)
        with anyio.fail_after(5):
            with pytest.raises(ConnectionClosed, match="tail counter"):
                for _ in range(20):
                    await b.send(b"u" * 1000)
            with pytest.raises(ProtocolError, match="tail counter"):
                await b.recv()


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ((0x77, 8), "unknown record tag"),
        ((1, 1 << 20), "past the end"),
        ((2, 0), "empty frame"),
        ((3, 16), "outside a streamed frame"),
        ((4, 16), "does not reach the end"),
        ((7, 0), "empty FRAMES record"),
        ((7, 30), "a frame of 40 bytes in a FRAMES record with 26"),  # cut short
        ((7, 2), "ends inside a frame length"),
    ],
)
async def test_scribbled_record_is_a_protocol_error(record: tuple[int, int], match: str) -> None:
    async with pair(64 * KiB) as (a, b):
        await a.send(b"a" * 40)
        await asyncio.sleep(0)  # committed
        assert a._mv is not None
        tag, n = record
        a._mv[HEADER_SIZE : HEADER_SIZE + 8] = (tag | 0x100).to_bytes(4, sys.byteorder) + (
            n.to_bytes(4, sys.byteorder)
        )
        with anyio.fail_after(5), pytest.raises(ProtocolError, match=match):
            await b.recv()


@pytest.mark.parametrize(("length", "match"), [(0, "a frame of 0 bytes"), (41, "a frame of 41 bytes")])
async def test_scribbled_length_inside_a_frames_record(length: int, match: str) -> None:
    async with pair(64 * KiB) as (a, b):
        await a.send(b"a" * 40)  # small: one FRAMES record holding [u32 40][40 bytes]
        await asyncio.sleep(0)  # committed
        assert a._mv is not None
        a._mv[HEADER_SIZE + 8 : HEADER_SIZE + 12] = length.to_bytes(4, sys.byteorder)
        with anyio.fail_after(5), pytest.raises(ProtocolError, match=match):
            await b.recv()


async def test_frames_record_inside_a_streamed_frame() -> None:
    async with pair(64 * KiB) as (a, b):
        await a.send(b"a" * 40)  # one 56-byte FRAMES record, committed alone
        await asyncio.sleep(0)
        assert a._mv is not None
        # Rewrite it as BEGIN (a 100-byte streamed frame) and then a FRAMES record.
        le = sys.byteorder
        a._mv[HEADER_SIZE : HEADER_SIZE + 8] = (2).to_bytes(4, le) + (100).to_bytes(4, le)
        a._mv[HEADER_SIZE + 8 : HEADER_SIZE + 16] = (7 | 0x100).to_bytes(4, le) + (40).to_bytes(4, le)
        with anyio.fail_after(5), pytest.raises(ProtocolError, match="FRAMES record in the middle"):
            await b.recv()


@pytest.mark.parametrize("size", [3000, 200 * KiB])
async def test_frame_over_the_readers_maximum_is_refused_before_copying(size: int) -> None:
    """A whole frame (FRAME) or a streamed one (BEGIN) larger than max_frame closes the link."""
    async with pair(64 * KiB, max_frame=2048) as (a, b):
        a.send_nowait(b"s" * size)
        with anyio.fail_after(5), pytest.raises(FrameTooLarge) as info:
            await b.recv()
        assert info.value.size == size and info.value.limit == 2048


async def test_sender_refuses_bad_frames() -> None:
    async with pair(64 * KiB) as (a, b):
        a.max_frame = 1000
        with pytest.raises(FrameTooLarge):
            a.send_nowait(b"x" * 1001)
        with pytest.raises(ProtocolError, match="empty"):
            a.send_nowait(b"")
        a.send_nowait(bytearray(b"buffer"))  # type: ignore[arg-type]  # bytes-like, snapshotted
        assert await b.recv() == b"buffer"


def test_bad_create_arguments() -> None:
    with pytest.raises(ValueError, match="ring_size"):
        ShmLink.create(None, ring_size=1000)
    with pytest.raises(ValueError, match="mode"):
        ShmLink.create(None, mode=0o666)
    # A group link's bells must be where the group can open them: not in a
    # private folder of the creator's.
    with pytest.raises(ValueError, match=r"group link \(gid=4242\) needs busdir"):
        ShmLink.create(None, mode=0o660, gid=4242)


async def test_records_kept_until_attached(tmp_path: Path) -> None:
    a, params = ShmLink.create(tmp_path, ring_size=64 * KiB)
    try:
        recs = {(r.kind, r.ident) for _p, r in records.list_records(tmp_path) if r is not None}
        assert ("shm", str(params["shmid"])) in recs and len(recs) == 7
        assert ("fifo", params["bell0"]) in recs
    finally:
        await a.aclose()  # never attached: removes the segment, the names and the records
    assert records.list_records(tmp_path) == []
    assert gone(params)
    with pytest.raises(ConnectionClosed, match="does not exist"):
        await ShmLink.attach(params, peer_pid=os.getpid())


async def test_group_bus_objects_are_0660_with_the_group(tmp_path: Path) -> None:
    gid = 4242 if os.getuid() == 0 else os.getgid()
    a, params = ShmLink.create(tmp_path, ring_size=64 * KiB, mode=0o660, gid=gid)
    try:
        assert shm_perms(int(params["shmid"])) & 0o777 == 0o660
        for path in [
            *(str(params[f"bell{i}"]) for i in range(2)),
            *("/dev/shm/sem." + str(params[f"sem{i}"]).lstrip("/") for i in range(4)),
        ]:
            st = os.stat(path)
            assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid), path
        b = await ShmLink.attach(params, peer_pid=os.getpid())
        try:
            await b.send(b"group")
            assert await a.recv() == b"group"
        finally:
            await b.aclose()
    finally:
        await a.aclose()
    assert gone(params) and records.list_records(tmp_path) == []
