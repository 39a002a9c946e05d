"""The SysV message-queue transport: conformance, multi-process, crash safety, bad input.

Multi-process tests run this file as a script in a child process (see
``child_main`` at the bottom).  Knocks travel over the child's stdout/stdin
as one JSON line, standing in for the door.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import sysv_ipc

from ipcbus.errors import (
    BusBusy,
    ConnectionClosed,
    EndOfStream,
    FrameTooLarge,
    HandshakeTimeout,
    PermissionRefused,
    ProtocolError,
)
from ipcbus.records import list_records
from ipcbus.sysv import open_handle, proc_msg_table, read_limits
from ipcbus.testing import check_link
from ipcbus.transports.base import Link
from ipcbus.transports.door import Knock
from ipcbus.transports.sysv import (
    DEFAULT_QUEUE_BYTES,
    FLAG_FIRST,
    FLAG_LAST,
    HUB_ADDRESS,
    KEY_FILE,
    KIND_FRAGMENT,
    KIND_FRAMES,
    MSG_HEADER,
    WIRE_VERSION,
    SysvAcceptor,
    bus_key,
    connect_sysv,
)

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
HAS_SETPRIV = shutil.which("setpriv") is not None and os.getuid() == 0
NOBODY = 65534


# -- helpers ---------------------------------------------------------------------


@pytest.fixture
def busdir(bus_root: str) -> Path:
    d = Path(bus_root) / f"sysv-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
async def acceptor(busdir: Path) -> AsyncIterator[SysvAcceptor]:
    async with SysvAcceptor(busdir) as acc:
        yield acc


async def connect_here(acc: SysvAcceptor, **kw: Any) -> tuple[Link, Link]:
    """Connect an in-process client; return (client link, hub link)."""
    tasks: list[asyncio.Task[Link]] = []

    def knock(k: Knock) -> None:
        tasks.append(asyncio.ensure_future(acc.accept(k)))

    client = await connect_sysv(acc.busdir, hub_pid=os.getpid(), send_knock=knock, **kw)
    return client, await tasks[0]


def pair_factory(acc: SysvAcceptor, hub_first: bool, polling: bool = False) -> Callable[[], Any]:
    """``polling``: both links' loops poll (Link.keep_polling), so they take their queues."""

    @contextlib.asynccontextmanager
    async def make_pair() -> AsyncIterator[tuple[Link, Link]]:
        client, hub = await connect_here(acc)
        if polling:
            client.keep_polling = hub.keep_polling = lambda: True
        try:
            yield (hub, client) if hub_first else (client, hub)
        finally:
            await client.aclose()
            await hub.aclose()

    return make_pair


def bus_handle(acc: SysvAcceptor) -> sysv_ipc.MessageQueue:
    q, _ = open_handle(acc.key, 0)
    return q


def header(kind: int, sender: int, seq: int, total: int, flags: int = 0) -> bytes:
    return MSG_HEADER.pack(WIRE_VERSION, kind, flags, 0, sender, seq, total)


def frames_msg(sender: int, seq: int, *frames: bytes) -> bytes:
    body = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    return header(KIND_FRAMES, sender, seq, len(frames)) + body


def knock_line(k: Knock) -> str:
    return "KNOCK " + msgspec.json.encode(k).decode()


class Child:
    """A child process speaking one line per event on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def expect(self, tag: str, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"child exited before printing {tag!r}")
                line = raw.decode().rstrip("\n")
                if line.startswith(tag):
                    return line[len(tag):].strip()

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def accept(self, acc: SysvAcceptor) -> Link:
        k = msgspec.json.decode(await self.expect("KNOCK"), type=Knock)
        return await acc.accept(k)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


@contextlib.asynccontextmanager
async def child(*args: str, prefix: list[str] | None = None) -> AsyncIterator[Child]:
    proc = await asyncio.create_subprocess_exec(
        *(prefix or []), sys.executable, str(THIS), *args,
        cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    c = Child(proc)
    try:
        yield c
    finally:
        await c.stop()


def as_nobody() -> list[str]:
    # A genuine other user: uid/gid 65534, with file-access overrides kept so
    # it can run this interpreter, but no CAP_IPC_OWNER: SysV permission
    # checks apply to it as to any unprivileged process.
    return [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "--inh-caps=+dac_override,+dac_read_search",
        "--ambient-caps=+dac_override,+dac_read_search",
    ]


def queue_exists(qid: int) -> bool:
    return qid in proc_msg_table()


async def run(*cmd: str) -> str:
    """Run a command to completion without blocking the loop; return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


# -- conformance ------------------------------------------------------------------


@pytest.mark.parametrize("polling", [False, True], ids=["thread", "loop-polls"])
async def test_check_link_client_to_hub(acceptor: SysvAcceptor, polling: bool) -> None:
    await check_link(pair_factory(acceptor, hub_first=False, polling=polling))


@pytest.mark.parametrize("polling", [False, True], ids=["thread", "loop-polls"])
async def test_check_link_hub_to_client(acceptor: SysvAcceptor, polling: bool) -> None:
    await check_link(pair_factory(acceptor, hub_first=True, polling=polling))


async def test_the_hub_loop_takes_the_bus_queue_while_it_polls(acceptor: SysvAcceptor) -> None:
    """The bus-queue thread gives the queue to a polling hub loop; two clients' streams
    stay whole and in order while it changes hands."""
    polling = [True]
    (c1, h1), (c2, h2) = await connect_here(acceptor), await connect_here(acceptor)
    try:
        h1.keep_polling = h2.keep_polling = lambda: polling[0]
        await c1.send(b"hello")
        assert await h1.recv() == b"hello"
        await c1.send(b"again")
        assert await h1.recv() == b"again"
        turn = acceptor._turn
        assert turn is not None and turn.loop_has and turn.given >= 1
        given = turn.given
        for i in range(20):  # the thread waits: only the loop can receive these
            await c2.send(b"%d" % i)
            assert await h2.recv() == b"%d" % i
        assert turn.loop_has and turn.given == given
        expect = {c: [bytes([k]) * (1 + i * 37 % 9000) for i in range(600)] for k, c in ((1, c1), (2, c2))}
        for i in range(600):
            for c in (c1, c2):
                c.send_nowait(expect[c][i])
            if i % 40 == 0:
                polling[0] = not polling[0]
                await asyncio.sleep(0.001 if i % 80 else 0)  # past the grace: the thread again
        with anyio.fail_after(20):
            assert [await h1.recv() for _ in range(600)] == expect[c1]
            assert [await h2.recv() for _ in range(600)] == expect[c2]
        assert turn.given > given
    finally:
        for lk in (c1, c2, h1, h2):
            await lk.aclose()


@pytest.mark.parametrize("hub_first", [False, True])
async def test_take_ready_hands_over_received_frames_in_order(
    acceptor: SysvAcceptor, hub_first: bool
) -> None:
    # The node takes a whole batch per wake-up; take_ready must give the frames
    # recv() would, in order, bounded by max_bytes, and nothing twice.
    async with pair_factory(acceptor, hub_first)() as (a, b):
        frames = [bytes([i]) * (1000 + i) for i in range(40)]
        for f in frames:
            a.send_nowait(f)
        await a.drain()
        got = [await b.recv()]
        took = 0  # frames of one SysV message arrive together: some are ready at once
        with anyio.fail_after(10):
            while len(got) < len(frames):
                batch = b.take_ready(5000)
                assert sum(map(len, batch[:-1])) < 5000, "take_ready went past max_bytes"
                got += batch
                took += len(batch)
                if not batch:
                    got.append(await b.recv())
        assert got == frames
        assert took >= 1
        assert b.take_ready() == []


async def test_objects_are_recorded_and_forgotten(acceptor: SysvAcceptor) -> None:
    client, hub = await connect_here(acceptor, name="rec")
    recs = {r.ident: r for _, r in list_records(acceptor.busdir) if r is not None}
    own = client.info.objects["queue"]
    assert recs[str(acceptor.queue_id)].extra["role"] == "bus"
    assert recs[str(own)].extra["role"] == "client"
    assert recs[str(own)].key == client.info.objects["key"]
    assert hub.info.peer_pid == os.getpid() and hub.info.peer_name == "rec"
    assert client.info.transport == hub.info.transport == "sysv"
    st = acceptor.stat()
    assert st.mode == 0o600 and st.uid == os.getuid()
    await client.aclose()
    await hub.aclose()
    assert not queue_exists(own)
    assert {r.ident for _, r in list_records(acceptor.busdir) if r} == {str(acceptor.queue_id)}


async def test_interleaved_fragments_from_two_clients(acceptor: SysvAcceptor) -> None:
    """Two clients send multi-fragment frames at once: each is reassembled per sender."""
    (c1, h1), (c2, h2) = await connect_here(acceptor), await connect_here(acceptor)
    big1, big2 = bytes(range(256)) * 1000, b"\xaa" * 300_000
    try:
        for _ in range(3):
            c1.send_nowait(big1)
            c2.send_nowait(big2)
        for _ in range(3):
            assert await h1.recv() == big1
            assert await h2.recv() == big2
    finally:
        for link in (c1, c2, h1, h2):
            await link.aclose()


# -- multi-process -----------------------------------------------------------------


@pytest.mark.single_loop
async def test_child_client_echo(acceptor: SysvAcceptor) -> None:
    async with child("echo", str(acceptor.busdir), str(os.getpid())) as c:
        hub = await c.accept(acceptor)
        sizes = [1, 100, 8000, 8200, 100_000, 3_000_000]
        for i, n in enumerate(sizes):
            await hub.send(bytes([i]) * n)
        for i, n in enumerate(sizes):
            assert await hub.recv() == bytes([i]) * n
        await hub.aclose()  # BYE: the child sees EndOfStream and exits 0
        assert await c.proc.wait() == 0


@pytest.mark.single_loop
async def test_slow_client_does_not_stall_others(acceptor: SysvAcceptor) -> None:
    """One client stops reading: its own queue fills, the others keep flowing."""
    async with child("slow", str(acceptor.busdir), str(os.getpid())) as c:
        slow = await c.accept(acceptor)
        await c.expect("READY")
        fast_client, fast = await connect_here(acceptor)
        try:
            frame = b"s" * 60_000
            # More than the client buffers before it stops draining (1 MiB),
            # plus its queue, plus this link's high-water mark: cannot all leave.
            sent = (1 << 20) // len(frame) + slow.high_water // len(frame) + 20
            for _ in range(sent):
                slow.send_nowait(frame)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await slow.drain()
            assert slow.pending_out > slow.high_water // 2  # stuck on this link
            # The slow client's own queue is full; the shared bus queue is not.
            slow_q, _ = open_handle(slow.info.objects["key"], 0)
            capacity = slow_q.max_size
            row = proc_msg_table()[slow_q.id]
            assert row["cbytes"] > capacity - read_limits().msgmax
            assert proc_msg_table()[acceptor.queue_id]["cbytes"] < read_limits().msgmax
            # Meanwhile the other client gets everything, both ways.
            for i in range(2000):
                fast.send_nowait(i.to_bytes(4, "big") * 50)
            for i in range(2000):
                assert await fast_client.recv() == i.to_bytes(4, "big") * 50
            await fast_client.send(b"still here")
            assert await fast.recv() == b"still here"
            assert slow.pending_out > slow.high_water // 2  # backpressure stays on its link
            # Let the slow client read: everything arrives, in order.
            c.tell("go")
            await slow.drain()
            await slow.aclose()
            assert await c.expect("COUNT") == f"{sent} ok"
        finally:
            await fast_client.aclose()
            await fast.aclose()


async def test_hub_not_reading_one_client_throttles_only_it(acceptor: SysvAcceptor) -> None:
    """Credit: a client the hub does not read is held back; another keeps flowing."""
    (c1, h1), (c2, h2) = await connect_here(acceptor), await connect_here(acceptor)
    try:
        frame = b"c" * 65536
        for _ in range(64):  # 4 MiB, far beyond the 512 KiB window
            c1.send_nowait(frame)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await c1.drain()
        assert c1.pending_out > 0, "c1 was not held back by credit"
        held = h1._rx_held  # type: ignore[attr-defined]
        # Credit stops at half a window of unread frames; at most a window more
        # can be in flight by then.
        bound = acceptor.window // 2 + acceptor.window + len(frame)
        assert held <= bound, "the hub buffered beyond its credit bound"
        for i in range(500):
            await c2.send(i.to_bytes(4, "big"))
        for i in range(500):
            assert await h2.recv() == i.to_bytes(4, "big")
        for _ in range(64):
            assert await h1.recv() == frame
        await c1.drain()
    finally:
        for link in (c1, c2, h1, h2):
            await link.aclose()


@pytest.mark.single_loop
async def test_client_sigkilled_mid_fragment(acceptor: SysvAcceptor) -> None:
    async with child("partial", str(acceptor.busdir), str(os.getpid())) as c:
        hub = await c.accept(acceptor)
        objects = msgspec.json.decode(await c.expect("SENT"))
        other_client, other = await connect_here(acceptor)
        try:
            c.proc.send_signal(signal.SIGKILL)
            await c.proc.wait()
            assert await hub.recv() == b"complete frame"  # sent before dying
            with pytest.raises(EndOfStream):  # ... and no half frame, ever
                async with asyncio.timeout(10):
                    await hub.recv()
            with pytest.raises(ConnectionClosed):
                await hub.send(b"to the dead")
            await hub.aclose()
            # Its queue (and whatever it never read) is purged, its record forgotten.
            assert not queue_exists(objects["queue"])
            idents = {r.ident for _, r in list_records(acceptor.busdir) if r}
            assert str(objects["queue"]) not in idents
            # The hub keeps serving.
            await other_client.send(b"alive")
            assert await other.recv() == b"alive"
            await other.send(b"yes")
            assert await other_client.recv() == b"yes"
        finally:
            await other_client.aclose()
            await other.aclose()


@pytest.mark.single_loop
async def test_hub_sigkilled_then_next_hub_takes_over(busdir: Path) -> None:
    async with child("hub", str(busdir)) as hub_proc:
        old_q = int(await hub_proc.expect("HUB"))

        def knock(k: Knock) -> None:
            hub_proc.tell(knock_line(k))

        client = await connect_sysv(busdir, hub_pid=hub_proc.proc.pid, send_knock=knock)
        await client.send(b"ping")
        assert await client.recv() == b"ping"
        hub_proc.proc.send_signal(signal.SIGKILL)
        await hub_proc.proc.wait()
        with pytest.raises(EndOfStream):
            async with asyncio.timeout(10):
                await client.recv()
        with pytest.raises(ConnectionClosed):
            await client.send(b"anyone?")
        await client.aclose()
    assert queue_exists(old_q), "a SysV queue outlives its creator"
    async with SysvAcceptor(busdir) as acc:  # finds the stale queue through the records
        assert not queue_exists(old_q)
        assert acc.queue_id != old_q
        c2, h2 = await connect_here(acc)
        await c2.send(b"new hub")
        assert await h2.recv() == b"new hub"
        await c2.aclose()
        await h2.aclose()
    assert not queue_exists(acc.queue_id if False else old_q)


@pytest.mark.single_loop
async def test_ipcrm_under_load(acceptor: SysvAcceptor) -> None:
    """Removing the bus queue under load: every side gets ConnectionClosed promptly."""
    async with child("echo", str(acceptor.busdir), str(os.getpid())) as c1, \
            child("echo", str(acceptor.busdir), str(os.getpid())) as c2:
        links = [await c1.accept(acceptor), await c2.accept(acceptor)]
        local_client, local = await connect_here(acceptor)
        stop = asyncio.Event()
        errors: list[BaseException] = []

        async def load(link: Link) -> None:
            try:
                while not stop.is_set():
                    for _ in range(20):
                        link.send_nowait(b"L" * 5000)
                    for _ in range(20):
                        await link.recv()
            except ConnectionClosed as exc:
                errors.append(exc)

        tasks = [asyncio.create_task(load(lk)) for lk in links]
        for lk in links:  # the load is flowing
            lk.send_nowait(b"mark")
        old = acceptor.queue_id
        await run("ipcrm", "-q", str(old))
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
            with pytest.raises(ConnectionClosed):
                await local_client.recv()
            with pytest.raises(ConnectionClosed):
                await local.recv()
            for proc in (c1, c2):
                assert await proc.expect("CLOSED") == "ConnectionClosed"
                assert await proc.proc.wait() == 3
        assert len(errors) == 2
        assert acceptor.recreated == 1 and acceptor.queue_id != old
        for lk in (*links, local, local_client):
            await lk.aclose()
        # The recreated queue serves new clients.
        c3, h3 = await connect_here(acceptor)
        await c3.send(b"again")
        assert await h3.recv() == b"again"
        await c3.aclose()
        await h3.aclose()


async def test_drain_after_the_peer_closed(acceptor: SysvAcceptor) -> None:
    """drain() fails only if frames were still queued when the link broke."""
    client, hub = await connect_here(acceptor)
    await client.send(b"one")
    assert await hub.recv() == b"one"
    await hub.aclose()
    with pytest.raises(EndOfStream):
        async with asyncio.timeout(10):
            await client.recv()
    await client.drain()  # nothing was lost: no error
    with pytest.raises(ConnectionClosed):
        client.send_nowait(b"two")
    await client.aclose()


async def test_a_send_on_the_removed_bus_queue_does_not_cut_off_the_hubs_last_frames(
    busdir: Path,
) -> None:
    """A hub that closes queues its last frames and BYE, then removes the bus
    queue; the client's next send fails on the removed queue before its thread
    has handed over what is waiting: those frames still arrive, then a clean end."""
    async with SysvAcceptor(busdir) as acc:
        client, hub = await connect_here(acc)
        hub.send_nowait(b"last words")
        await hub.aclose()
    assert not queue_exists(client.info.objects["bus_queue"])
    client.send_nowait(b"into the void")  # sent at once: fails on the removed queue
    async with asyncio.timeout(10):
        assert await client.recv() == b"last words"
        with pytest.raises(EndOfStream):
            await client.recv()
    with pytest.raises(ConnectionClosed):
        client.send_nowait(b"again")
    await client.aclose()


async def test_ipcrm_of_a_client_queue(acceptor: SysvAcceptor) -> None:
    client, hub = await connect_here(acceptor)
    await run("ipcrm", "-q", str(client.info.objects["queue"]))
    with pytest.raises(ConnectionClosed, match="removed"):
        async with asyncio.timeout(10):
            await client.recv()
    hub.send_nowait(b"into the void")
    with pytest.raises(ConnectionClosed):
        await hub.recv()
    with pytest.raises(ConnectionClosed):
        await hub.send(b"again")
    await client.aclose()
    await hub.aclose()


@pytest.mark.single_loop
@pytest.mark.skipif(not HAS_SETPRIV, reason="needs root and setpriv to run as another user")
async def test_group_bus_with_a_client_of_another_uid(busdir: Path) -> None:
    os.chmod(busdir, 0o755)
    async with SysvAcceptor(busdir, mode=0o660, gid=NOBODY) as acc:
        assert acc.stat().gid == NOBODY and acc.stat().mode == 0o660
        async with child("echo", str(busdir), str(os.getpid()), "--group", str(NOBODY),
                         prefix=as_nobody()) as c:
            hub = await c.accept(acc)
            assert hub.info.peer_uid == NOBODY
            await hub.send(b"across users")
            assert await hub.recv() == b"across users"
            await hub.aclose()
            assert await c.proc.wait() == 0


# -- bad input ----------------------------------------------------------------------


async def roundtrip(client: Link, hub: Link) -> None:
    """One frame client -> hub: everything queued on the bus queue before it is processed."""
    await client.send(b"sync")
    assert await hub.recv() == b"sync"


async def test_unknown_type_and_malformed_messages_are_discarded(
    acceptor: SysvAcceptor, caplog: pytest.LogCaptureFixture
) -> None:
    client, hub = await connect_here(acceptor)
    q = bus_handle(acceptor)
    caplog.set_level(logging.WARNING, "ipcbus.transports.sysv")
    q.send(b"who reads type 7?", False, 7)
    q.send(b"abc", False, 1)  # shorter than a header
    q.send(frames_msg(999_999, 0, b"forged"), False, 1)  # nobody has this address
    await roundtrip(client, hub)
    assert acceptor.garbage == 3
    text = caplog.text
    assert "unknown type 7" in text
    assert "shorter than the 16-byte header" in text
    assert "unknown sender address 999999" in text
    await roundtrip(client, hub)  # the link is untouched
    await client.aclose()
    await hub.aclose()


async def test_malformed_fragment_closes_only_that_link(acceptor: SysvAcceptor) -> None:
    (c1, h1), (c2, h2) = await connect_here(acceptor), await connect_here(acceptor)
    q = bus_handle(acceptor)
    addr = c1.info.objects["address"]
    seq = c1._seq_out  # type: ignore[attr-defined]
    q.send(header(9, addr, seq, 0) + b"???", False, 1)  # an unknown message kind
    with pytest.raises(ProtocolError, match="kind"):
        await h1.recv()
    with pytest.raises(ConnectionClosed, match="aborted"):  # the client is told
        async with asyncio.timeout(10):
            await c1.recv()
    await roundtrip(c2, h2)  # the other link keeps running
    for link in (c1, c2, h1, h2):
        await link.aclose()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("gap", "sequence gap"),
        ("continuation", "without a first fragment"),
        ("overflow", "overflow"),
        ("short_last", "ends the frame"),
        ("frames_mid_fragment", "incomplete"),
    ],
)
async def test_broken_fragment_sequences(acceptor: SysvAcceptor, case: str, match: str) -> None:
    client, hub = await connect_here(acceptor)
    q = bus_handle(acceptor)
    addr = client.info.objects["address"]
    s = client._seq_out  # type: ignore[attr-defined]
    chunk = b"f" * 1000
    first = header(KIND_FRAGMENT, addr, s, 5000, FLAG_FIRST) + chunk
    msgs = {
        "gap": [first, header(KIND_FRAGMENT, addr, s + 2, 0) + chunk],
        "continuation": [header(KIND_FRAGMENT, addr, s, 0) + chunk],
        "overflow": [first] + [header(KIND_FRAGMENT, addr, s + i, 0) + chunk * 2
                               for i in (1, 2, 3)],
        "short_last": [first, header(KIND_FRAGMENT, addr, s + 1, 0, FLAG_LAST) + chunk],
        "frames_mid_fragment": [first, frames_msg(addr, s + 1, b"whole")],
    }[case]
    for m in msgs:
        q.send(m, False, 1)
    with pytest.raises(ProtocolError, match=match):
        async with asyncio.timeout(10):
            await hub.recv()
    await client.aclose()
    await hub.aclose()


@pytest.mark.parametrize(
    ("tail", "match"),
    [(b"\x00\x00\x00\x01", "trailing bytes"), (b"\x00\x00\x00\x09abc", "truncated")],
)
async def test_a_refused_frames_message_delivers_none_of_its_frames(
    acceptor: SysvAcceptor, tail: bytes, match: str
) -> None:
    """Its frames were delivered as they were parsed, before what followed
    them got the message refused."""
    client, hub = await connect_here(acceptor)
    q = bus_handle(acceptor)
    addr = client.info.objects["address"]
    s = client._seq_out  # type: ignore[attr-defined]
    first = b"from a refused message"
    if match == "truncated":  # two frames announced, the second cut short
        bad = header(KIND_FRAMES, addr, s, 2) + len(first).to_bytes(4, "big") + first + tail
    else:
        bad = frames_msg(addr, s, first) + tail
    q.send(bad, False, 1)
    with pytest.raises(ProtocolError, match=match):
        async with asyncio.timeout(10):
            got = await hub.recv()
            pytest.fail(f"delivered {got!r}")
    await client.aclose()
    await hub.aclose()


async def test_oversized_frame_refused_at_first_fragment(busdir: Path) -> None:
    async with SysvAcceptor(busdir, max_frame=100_000) as acc:
        client, hub = await connect_here(acc)
        assert client.max_frame == 100_000  # learned from the WELCOME
        with pytest.raises(FrameTooLarge):
            client.send_nowait(b"x" * 100_001)  # refused locally, nothing sent
        q = bus_handle(acc)
        addr = client.info.objects["address"]
        seq = client._seq_out  # type: ignore[attr-defined]
        # Announce 1 GiB but send just the first fragment: refused right there.
        q.send(header(KIND_FRAGMENT, addr, seq, 1 << 30, FLAG_FIRST) + b"x" * 8000, False, 1)
        with pytest.raises(FrameTooLarge) as info:
            await hub.recv()
        assert (info.value.size, info.value.limit) == (1 << 30, 100_000)
        await client.aclose()
        await hub.aclose()


async def test_client_exceeding_its_credit_window_is_cut_off(acceptor: SysvAcceptor) -> None:
    client, hub = await connect_here(acceptor)
    addr = client.info.objects["address"]
    seq = client._seq_out  # type: ignore[attr-defined]
    frame = b"w" * 8000
    n = 2 * acceptor.window // len(frame)  # twice the window, never waiting for ACKs

    def flood() -> None:
        q = bus_handle(acceptor)
        for i in range(n):
            q.send(frames_msg(addr, seq + i, frame), True, 1)

    await asyncio.to_thread(flood)  # the hub reads nothing meanwhile: no credit returns
    got = 0
    with pytest.raises(ProtocolError, match="credit window"):
        while True:
            assert await hub.recv() == frame
            got += 1
    assert got * len(frame) <= acceptor.window * 2
    await client.aclose()
    await hub.aclose()


async def test_queue_capacity_raised_only_where_permitted(acceptor: SysvAcceptor) -> None:
    client, hub = await connect_here(acceptor)
    own, _ = open_handle(client.info.objects["key"], 0)
    for st_bytes in (acceptor.stat().max_bytes, own.max_size):
        if _cap_sys_resource():
            assert st_bytes == DEFAULT_QUEUE_BYTES
        else:  # refused by the kernel without CAP_SYS_RESOURCE: kept msgmnb, no error
            assert st_bytes == read_limits().msgmnb
    await client.aclose()
    await hub.aclose()


def _cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


async def test_unknown_type_on_a_client_queue(
    acceptor: SysvAcceptor, caplog: pytest.LogCaptureFixture
) -> None:
    client, hub = await connect_here(acceptor)
    caplog.set_level(logging.WARNING, "ipcbus.transports.sysv")
    own, _ = open_handle(client.info.objects["key"], 0)
    own.send(b"stray", False, 200)  # a reserved control type nobody defined
    await hub.send(b"after")
    assert await client.recv() == b"after"
    assert "unknown type 200" in caplog.text
    # Malformed data of the client's own type kills that link (only).
    own.send(b"\x01\x01", False, client.info.objects["address"])
    with pytest.raises(ProtocolError, match="shorter than"):
        async with asyncio.timeout(10):
            await client.recv()
    await client.aclose()  # still says BYE: the hub need not wait for its death
    with pytest.raises(EndOfStream):
        async with asyncio.timeout(10):
            await hub.recv()
    await hub.aclose()


async def test_knock_naming_another_users_queue_is_refused(acceptor: SysvAcceptor) -> None:
    seen: list[BaseException] = []
    tasks: list[asyncio.Future[None]] = []

    def knock(k: Knock) -> None:
        q, _ = open_handle(int(k.params["key"]), 0)
        q.uid = NOBODY  # hand the queue to another user before the hub looks

        async def accept() -> None:
            try:
                await acceptor.accept(k)
            except PermissionRefused as exc:
                seen.append(exc)

        tasks.append(asyncio.ensure_future(accept()))

    with pytest.raises(PermissionRefused, match="not its own"):  # told through REFUSE
        await connect_sysv(acceptor.busdir, hub_pid=os.getpid(), send_knock=knock)
    assert seen and "hijack" in str(seen[0])
    assert acceptor.links == []


@pytest.mark.parametrize(
    ("tamper", "exc", "match"),
    [
        (lambda k: msgspec.structs.replace(k, params={}), ProtocolError, "params\\['key'\\]"),
        (lambda k: msgspec.structs.replace(k, uid=NOBODY), PermissionRefused, "claims uid"),
        (lambda k: msgspec.structs.replace(k, version=99), ProtocolError, "version"),
        (lambda k: msgspec.structs.replace(k, params={**k.params, "msqid": 1}),
         ProtocolError, "not 1 as claimed"),
        (lambda k: msgspec.structs.replace(k, params={**k.params, "address": 5}),
         ProtocolError, "address 5 outside"),
        # key 0 is IPC_PRIVATE: opening it would *create* a queue (never removed)
        (lambda k: msgspec.structs.replace(k, params={**k.params, "key": 0}),
         ProtocolError, "IPC_PRIVATE"),
        # a key above 32 bits would be cut to another key
        (lambda k: msgspec.structs.replace(k, params={**k.params, "key": (1 << 40) + int(k.params["key"])}),
         ProtocolError, "32-bit"),
    ],
)
async def test_bad_knocks_are_refused(
    acceptor: SysvAcceptor, tamper: Callable[[Knock], Knock], exc: type[Exception], match: str
) -> None:
    errors: list[BaseException] = []
    tasks: list[asyncio.Future[None]] = []

    def knock(k: Knock) -> None:
        async def accept() -> None:
            try:
                await acceptor.accept(tamper(k))
            except Exception as e:
                errors.append(e)

        tasks.append(asyncio.ensure_future(accept()))

    with pytest.raises((HandshakeTimeout, ProtocolError, PermissionRefused)):
        await connect_sysv(acceptor.busdir, hub_pid=os.getpid(), send_knock=knock, timeout=0.5)
    assert len(errors) == 1 and isinstance(errors[0], exc), errors
    assert errors[0].args and __import__("re").search(match, str(errors[0]))


async def test_world_writable_client_queue_is_refused(acceptor: SysvAcceptor) -> None:
    def knock(k: Knock) -> None:
        q, _ = open_handle(int(k.params["key"]), 0)
        q.mode = 0o666
        asyncio.ensure_future(acceptor.accept(k)).add_done_callback(lambda f: f.exception())

    with pytest.raises(PermissionRefused, match="every user"):
        await connect_sysv(acceptor.busdir, hub_pid=os.getpid(), send_knock=knock)


async def test_existing_queue_with_the_bus_key_without_record(busdir: Path) -> None:
    (busdir / KEY_FILE).touch(mode=0o600)
    squatter = sysv_ipc.MessageQueue(bus_key(busdir), sysv_ipc.IPC_CREX, mode=0o600)
    try:
        with pytest.raises(PermissionRefused, match="no record"):
            async with SysvAcceptor(busdir):
                pass
        assert queue_exists(squatter.id)  # left alone
    finally:
        squatter.remove()


@pytest.mark.single_loop
@pytest.mark.skipif(not HAS_SETPRIV, reason="needs root and setpriv to run as another user")
async def test_queue_with_the_bus_key_by_another_user(busdir: Path) -> None:
    (busdir / KEY_FILE).touch(mode=0o600)
    key = bus_key(busdir)
    code = (
        "import sysv_ipc\n"
        f"q = sysv_ipc.MessageQueue({key}, sysv_ipc.IPC_CREX, mode=0o600)\n"
        "print(q.id)\n"
    )
    qid = int(await run(*as_nobody(), sys.executable, "-c", code))
    try:
        with pytest.raises(PermissionRefused, match=f"uid {NOBODY}") as info:
            async with SysvAcceptor(busdir):
                pass
        assert "another user" in str(info.value)
        row = proc_msg_table()[qid]
        assert row["cuid"] == NOBODY  # untouched
    finally:
        sysv_ipc.remove_message_queue(qid)


async def test_second_acceptor_on_a_live_bus_is_busy(acceptor: SysvAcceptor) -> None:
    with pytest.raises(BusBusy, match="live hub"):
        async with SysvAcceptor(acceptor.busdir):
            pass


@pytest.mark.single_loop
@pytest.mark.skipif(not HAS_SETPRIV, reason="needs root and setpriv to run as another user")
async def test_permission_denied_opening_the_bus_queue(acceptor: SysvAcceptor) -> None:
    os.chmod(acceptor.busdir, 0o755)
    async with child("try-connect", str(acceptor.busdir), str(os.getpid()),
                     prefix=as_nobody()) as c:
        result = await c.expect("ERROR")
        assert result.startswith("PermissionRefused"), result
        assert "may not use its SysV queue" in result
        assert await c.proc.wait() == 0
    assert acceptor.links == []


async def test_connect_without_a_bus(busdir: Path) -> None:
    from ipcbus.errors import BusNotFound

    with pytest.raises(BusNotFound):
        await connect_sysv(busdir, hub_pid=os.getpid(), send_knock=lambda k: None)


async def test_connect_times_out_when_nobody_answers(acceptor: SysvAcceptor) -> None:
    with pytest.raises(HandshakeTimeout, match="did not answer"):
        await connect_sysv(acceptor.busdir, hub_pid=os.getpid(), send_knock=lambda k: None,
                           timeout=0.2)
    assert [r for _, r in list_records(acceptor.busdir) if r and r.extra.get("role") == "client"] \
        == []


# -- the child processes ---------------------------------------------------------------


async def child_main(argv: list[str]) -> int:
    mode, busdir = argv[0], Path(argv[1])
    if mode == "hub":
        return await child_hub(busdir)
    hub_pid = int(argv[2])
    extra: dict[str, Any] = {}
    if "--group" in argv:
        extra = {"gid": int(argv[argv.index("--group") + 1]), "mode": 0o660}

    def knock(k: Knock) -> None:
        print(knock_line(k), flush=True)

    try:
        link = await connect_sysv(busdir, hub_pid=hub_pid, send_knock=knock, name=mode, **extra)
    except Exception as exc:
        print("ERROR", type(exc).__name__, exc, flush=True)
        return 0 if mode == "try-connect" else 1
    loop = asyncio.get_running_loop()
    try:
        if mode == "echo":
            try:
                while True:
                    await link.send(await link.recv())
            except EndOfStream:
                return 0
            except ConnectionClosed as exc:
                print("CLOSED", type(exc).__name__, flush=True)
                return 3
        if mode == "slow":
            print("READY", flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)  # wait for "go"
            n = 0
            try:
                while True:
                    f = await link.recv()
                    assert f == b"s" * 60_000
                    n += 1
            except EndOfStream:
                print("COUNT", n, "ok", flush=True)
                return 0
        if mode == "partial":
            await link.send(b"complete frame")
            await link.drain()
            addr = link.info.objects["address"]
            seq = link._seq_out  # type: ignore[attr-defined]
            q, _ = open_handle(bus_key(busdir), 0)
            total = 100_000
            q.send(header(KIND_FRAGMENT, addr, seq, total, FLAG_FIRST) + b"p" * 8000, True, 1)
            q.send(header(KIND_FRAGMENT, addr, seq + 1, 0) + b"p" * 8000, True, 1)
            print("SENT", msgspec.json.encode(link.info.objects).decode(), flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)  # until SIGKILL
            return 0
        raise SystemExit(f"unknown child mode {mode}")
    finally:
        await link.aclose()


async def child_hub(busdir: Path) -> int:
    loop = asyncio.get_running_loop()
    async with SysvAcceptor(busdir) as acc:
        print("HUB", acc.queue_id, flush=True)
        tasks = set()

        async def echo(link: Link) -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await link.send(await link.recv())

        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return 0
            if line.startswith("KNOCK "):
                k = msgspec.json.decode(line[6:], type=Knock)
                t = asyncio.create_task(echo(await acc.accept(k)))
                tasks.add(t)


if __name__ == "__main__":
    assert HUB_ADDRESS == 1
    sys.exit(asyncio.run(child_main(sys.argv[1:])))


async def test_acceptor_window_limits(tmp_path: Path) -> None:
    busdir = tmp_path / "bus"
    busdir.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="32 bits"):
        SysvAcceptor(busdir, window=2**32)
    with pytest.raises(ValueError, match="at least 4 credit units"):
        SysvAcceptor(busdir, window=1000, credit_unit=4096)
    with pytest.raises(ValueError, match="too small to hold two messages"):
        SysvAcceptor(busdir, window=64, credit_unit=1)
    # 4 units, but not two messages of msgmax (8 KiB here) and a unit: messages
    # are cut to fit instead, and a client is welcomed.
    async with SysvAcceptor(busdir, window=16384, credit_unit=4096) as acc:
        client, hub = await connect_here(acc)
        frame = os.urandom(50_000)  # fragmented into the smaller messages
        await client.send(frame)
        assert await hub.recv() == frame
        await client.aclose()
        await hub.aclose()


_BIG_MSGMAX = """
import asyncio, os, sys
import ipcbus
from ipcbus.sysv import read_limits

async def main():
    limits = read_limits()
    assert limits.msgmax > limits.msgmnb, limits
    data = os.urandom(100_000)
    async with ipcbus.Hub("bigmsgmax", transports=("sysv",)) as hub:
        await hub.bus.serve("echo", lambda m: m.data)
        async with ipcbus.connect("bigmsgmax", transport="sysv") as bus:
            assert (await bus.request("echo", data, timeout=10)).data == data
            await bus.publish("echo", data[:20_000])
            await bus.flush()
    env = dict(os.environ, PYTHONPATH=sys.argv[1])
    async with ipcbus.WorkerPool("pool_workers:setup", workers=1, transport="sysv", env=env) as pool:
        assert (await pool.bus.request("echo", data, timeout=10)).data == data
    print("ok", limits.msgmax, limits.msgmnb)

asyncio.run(main())
"""


def test_messages_fit_the_queue_where_msgmax_is_above_its_capacity() -> None:
    """kernel.msgmax above a queue's msg_qbytes (legal: msgmax 65536, msgmnb
    16384): messages were cut to msgmax and never entered the queue, so every
    frame above its capacity waited forever.  Run in a private IPC namespace
    (the host's limits stay as they are)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.getuid() != 0:
        pytest.skip("needs unshare(1) and root for a private IPC namespace with its own limits")
    tests = str(THIS.parent)
    script = f"sysctl -qw kernel.msgmax=65536 kernel.msgmnb=16384 && exec {sys.executable} -c \"$0\" \"$1\""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, str(REPO)]))
    res = subprocess.run(
        [unshare, "--ipc", "sh", "-c", script, _BIG_MSGMAX, os.pathsep.join([tests, str(REPO)])],
        capture_output=True, text=True, timeout=120, env=env,
    )
    if res.returncode != 0 and "unshare failed" in res.stderr:
        pytest.skip(f"no private IPC namespace here: {res.stderr.strip()}")
    assert res.returncode == 0 and "ok 65536 16384" in res.stdout, res.stdout + res.stderr


@contextlib.asynccontextmanager
async def linked(acc: SysvAcceptor, n: int) -> AsyncIterator[list[tuple[Link, Link]]]:
    """``n`` in-process clients of ``acc`` (client link, hub link), all closed at the end
    (those appended meanwhile too)."""
    pairs: list[tuple[Link, Link]] = []
    try:
        for _ in range(n):
            pairs.append(await connect_here(acc))
        yield pairs
    finally:
        for c, h in pairs:
            await c.aclose()
            await h.aclose()


async def test_more_than_64_links_in_one_process(acceptor: SysvAcceptor) -> None:
    """Addresses were pid << 6 | n mod 64: the 65th link reused the first's, and
    the hub refused it (BusBusy) while the first was open."""
    async with linked(acceptor, 70) as pairs:
        assert len({c.info.objects["address"] for c, _ in pairs}) == 70
        for c, h in (pairs[0], pairs[64], pairs[69]):
            await roundtrip(c, h)


async def test_a_process_out_of_addresses_is_told_so(
    acceptor: SysvAcceptor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ipcbus.transports.sysv as sysv_transport

    monkeypatch.setattr(sysv_transport, "ADDRESS_SLOTS", 3)
    async with linked(acceptor, 3) as pairs:
        with pytest.raises(ConnectionClosed, match="already holds 3 SysV links to hubs"):
            await connect_here(acceptor)
        c, h = pairs.pop(0)
        await c.aclose()  # gives its address back
        await h.aclose()
        pairs.append(await connect_here(acceptor))
        for c, h in pairs:
            await roundtrip(c, h)


async def test_an_empty_data_message_from_another_process_is_a_protocol_error(
    acceptor: SysvAcceptor,
) -> None:
    """Only the link's own end marker is an empty data message: one written by
    anyone else ended the link as if the hub had exited (EndOfStream)."""
    client, hub = await connect_here(acceptor)
    own = sysv_ipc.MessageQueue(client.info.objects["key"])
    own.send(b"", False, client.info.objects["address"])
    with pytest.raises(ProtocolError, match="did not send itself"):
        async with asyncio.timeout(10):
            await client.recv()
    await client.aclose()
    await hub.aclose()
