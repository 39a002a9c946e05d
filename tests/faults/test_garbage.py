"""Garbage in the door FIFO, in a link FIFO, in the SysV queues and in an shm ring header.

Each time: the affected link (and only it) closes with a protocol error, or
the garbage is discarded where it cannot be attributed to a link; the hub
keeps accepting; every other client keeps working and receives everything
acknowledged to it.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import time
from typing import Any

import msgspec
import pytest
import sysv_ipc

import ipcbus
from ipcbus.busdir import BusDir
from ipcbus.frames import HEADER
from ipcbus.sysv import read_limits
from ipcbus.transports.sysv import HUB_ADDRESS, MSG_HEADER, T_TO_HUB

from .harness import (
    LinkWatch,
    Peer,
    agents,
    assert_clean,
    elapsed_until,
    intact,
    link_of,
    settle,
    sysv_ids,
    wait_stopped,
)

pytestmark = pytest.mark.single_loop


async def still_working(pub: Peer, subs: list[Peer], src: str, count: int = 50) -> int:
    """``pub`` publishes ``count`` numbered messages; every sub must read them all, intact."""
    acked = int((await pub.call("pubseq", subject="load", src=src, count=count, size=1000))["acked"])
    for p in subs:
        intact(await p.call("wait_seq", name="s", src=src, n=acked))
    return acked


# -- the door ----------------------------------------------------------------------

DOOR_JUNK = {
    "absurd length": b"\xff\xff\xff\xff" + b"x" * 100,
    "zero length": b"\x00\x00\x00\x00",
    "not msgpack": HEADER.pack(5) + b"\xc1" * 5,
    "wrong knock fields": HEADER.pack(12) + msgspec.msgpack.encode({"version": "x"}).ljust(12, b"\0"),
    "truncated knock": HEADER.pack(100) + b"abc",
    "random bytes": bytes(range(256)) * 12,
}


async def test_garbage_in_the_door(bus_name: str, record: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ipcbus")
    before = sysv_ids()
    async with ipcbus.Hub(bus_name) as hub, agents(bus_name, "fifo", "sysv", "shm") as (pub, s1, s2):
        watch = LinkWatch(hub)
        for p in (s1, s2):
            await p.call("seqsub", name="s", subject="load")
        acked = await still_working(pub, [s1, s2], "A")
        door = BusDir(bus_name).door
        for what, junk in DOOR_JUNK.items():
            seen = len(caplog.records)
            fd = os.open(door, os.O_WRONLY | os.O_NONBLOCK)
            try:
                assert os.write(fd, junk) == len(junk)
            finally:
                os.close(fd)
            # The hub logs each piece of garbage it skips (a log line is the only trace).
            assert await settle(lambda: len(caplog.records) > seen), what  # noqa: B023 - awaited here
            # ...and keeps admitting clients: one joins on each transport.
            async with agents(bus_name, "fifo", "sysv", "shm") as newcomers:
                for p in newcomers:
                    assert (await p.call("hub_stats"))["hub_pid"] == os.getpid()
        acked += await still_working(pub, [s1, s2], "B")
        assert not {pub.pid, s1.pid, s2.pid} & set(watch.closed)  # no established link noticed
        skipped = [r.getMessage() for r in caplog.records if r.name == "ipcbus.door"]
        assert len(skipped) >= len(DOOR_JUNK), skipped
        record(
            scenario="garbage in the door FIFO",
            transport="fifo",
            acked=acked,
            received=acked,
            lost=0,
            notes=f"{len(DOOR_JUNK)} kinds of junk skipped and logged; clients admitted after each",
        )
    await assert_clean(bus_name, before)
    record(clean=True)


# -- a link FIFO -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "junk"),
    [
        ("garbage", b"\xc1 not a frame".hex()),  # a well-framed frame of garbage
        ("raw", "7fffffff00"),  # a 2 GiB length prefix (the limit is 64 MiB)
        ("raw", "00000000"),  # an empty frame
    ],
    ids=["bad-frame", "absurd-length", "empty-frame"],
)
async def test_garbage_in_a_link_fifo(op: str, junk: str, bus_name: str, record: Any) -> None:
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, "fifo", "fifo", "fifo", "shm") as (
            bad,
            pub,
            s1,
            s2,
        ),
    ):
        watch = LinkWatch(hub)
        for p in (bad, s1, s2):
            await p.call("seqsub", name="s", subject="load")
        acked = await still_working(pub, [bad, s1, s2], "A")
        t0 = time.monotonic()
        await bad.call(op, hex=junk)
        reason, t_closed = await watch.wait(bad.pid)
        assert reason.startswith("protocol error"), reason
        closed, _ = await elapsed_until(t0, bad.expect("closed"))
        assert "protocol_error" in closed["notices"], closed
        acked += await still_working(pub, [s1, s2], "B")
        record(
            scenario=f"garbage in a link FIFO ({op}: {junk[:12]})",
            transport="fifo",
            acked=acked,
            received=acked,
            lost=0,
            time_to_error_s=t_closed - t0,
            blocked="hub: link closed, ProtocolError",
            notes="that link closed with ProtocolError, others unaffected",
        )
    await assert_clean(bus_name, before)
    record(clean=True)


# -- the SysV queues -----------------------------------------------------------------


def _queue(key: int) -> Any:
    return sysv_ipc.MessageQueue(key, max_message_size=read_limits().msgmax)


async def test_junk_on_the_sysv_bus_queue(bus_name: str, record: Any) -> None:
    """Raw msgsnd of junk into the bus queue: type 1 (the hub's) with an unknown sender,
    with a client's address as sender (spoofed), a too-short message, an unknown type."""
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, "sysv", "sysv", "sysv", "fifo") as (
            victim,
            pub,
            s1,
            s2,
        ),
    ):
        watch = LinkWatch(hub)
        acc: Any = hub._acceptors["sysv"]
        for p in (victim, s1, s2):
            await p.call("seqsub", name="s", subject="load")
        acked = await still_working(pub, [victim, s1, s2], "A")
        q = _queue(acc.key)
        # Unattributable junk: discarded and counted, nobody's link is touched.
        q.send(MSG_HEADER.pack(1, 1, 0, 0, 0xDEAD, 0, 1) + b"junk", True, T_TO_HUB)
        q.send(b"abc", True, T_TO_HUB)
        q.send(b"who reads type 77?", True, 77)
        await pub.call("flush")  # through the same queue, behind the junk (FIFO)
        assert acc.garbage >= 3, acc.garbage
        assert not watch.closed
        acked += await still_working(pub, [victim, s1, s2], "B")
        # Junk under a live client's address: that link, and only it, ends.
        address = int(link_of(hub, victim.pid)["objects"]["address"])
        t0 = time.monotonic()
        q.send(MSG_HEADER.pack(9, 1, 0, 0, address, 0, 1) + b"\xc1" * 40, True, T_TO_HUB)
        reason, t_closed = await watch.wait(victim.pid)
        assert reason.startswith("protocol error") or "abort" in reason, reason
        closed, _ = await elapsed_until(t0, victim.expect("closed"))
        assert closed["reason"], closed
        acked_b = await still_working(pub, [s1, s2], "C")
        assert HUB_ADDRESS == T_TO_HUB == 1
        record(
            scenario="junk msgsnd into the bus queue (type 1, spoofed sender, unknown type)",
            transport="sysv",
            acked=acked + acked_b,
            received=acked + acked_b,
            lost=0,
            time_to_error_s=t_closed - t0,
            blocked="hub: spoofed link closed",
            notes=f"{acc.garbage} unattributable messages discarded; spoofed link closed: {reason[:60]}",
        )
    await assert_clean(bus_name, before)
    record(clean=True)


async def test_junk_on_a_client_queue(bus_name: str, record: Any) -> None:
    """Raw msgsnd of junk into a client's queue with its own type: that client's link ends."""
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, "sysv", "sysv", "sysv", "shm") as (victim, pub, s1, s2),
    ):
        watch = LinkWatch(hub)
        for p in (victim, s1, s2):
            await p.call("seqsub", name="s", subject="load")
        acked = await still_working(pub, [victim, s1, s2], "A")
        objs = link_of(hub, victim.pid)["objects"]
        q = _queue(int(objs["key"]))
        t0 = time.monotonic()
        q.send(b"\x01\x01\x00\x00" + b"\xff" * 40, True, int(objs["address"]))
        closed, t_client = await elapsed_until(t0, victim.expect("closed"))
        assert closed["reason"].startswith("protocol error"), closed
        # The client says BYE even so: the hub drops its side at once, with no
        # traffic toward the victim needed to find out.
        reason, t_hub = await watch.wait(victim.pid)
        acked += await still_working(pub, [s1, s2], "B")
        record(
            scenario="junk msgsnd into a client's queue (its own type)",
            transport="sysv",
            acked=acked,
            received=acked,
            lost=0,
            time_to_error_s=t_client,
            blocked="client: link closed, ProtocolError",
            detect_s=t_hub - t0,
            notes=f"client link: {closed['reason'][:50]}; hub side: {reason[:40]}",
        )
    await assert_clean(bus_name, before)
    record(clean=True)


# -- the shm ring header -------------------------------------------------------------


# Offsets from docs/transports/shm.md ("Layout"): a 4096-byte header, ring 0 (client to
# hub), ring 1 (hub to client); ring 1's head (written by the hub) and tail (by the client).
SHM_HEADER, HEAD1, TAIL1 = 4096, 256, 320


@pytest.mark.parametrize("what", ["head", "record"])
async def test_scribble_on_the_shm_ring(what: str, bus_name: str, record: Any) -> None:
    """Attach a link's segment by id and scribble on what its (stopped) reader reads next:
    ring 1's head counter, or the tag of the first unread record."""
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, "shm", "shm", "shm", "fifo") as (victim, pub, s1, s2),
    ):
        watch = LinkWatch(hub)
        for p in (victim, s1, s2):
            await p.call("seqsub", name="s", subject="load")
        acked = await still_working(pub, [victim, s1, s2], "A")
        objs = link_of(hub, victim.pid)["objects"]
        shmid, ring = int(objs["shmid"]), int(objs["ring_size"])
        victim.signal(signal.SIGSTOP)
        await wait_stopped(victim.pid)
        # A second mapping, by id, as any process of this uid could make (Linux
        # lets one attach a segment already marked IPC_RMID).
        seg = sysv_ipc.attach(shmid)
        mv = memoryview(seg)
        hq = mv[:SHM_HEADER].cast("Q")
        try:
            h0 = hq[HEAD1 // 8]
            # Records the victim will find when it runs again (committed: the hub is
            # this process and committed them before pub's flush came back).
            acked += (await pub.call("pubseq", subject="load", src="B", count=10, size=1000))["acked"]
            assert hq[HEAD1 // 8] > h0
            if what == "head":
                hq[HEAD1 // 8] = hq[TAIL1 // 8] + 3 * ring  # far outside [tail, tail + ring]
            else:
                struct.pack_into("=II", mv, SHM_HEADER + ring + h0 % ring, 0x77, 0)  # no such tag
        finally:
            hq.release()
            mv.release()  # views first: detaching under a live view would segfault
            seg.detach()
        t0 = time.monotonic()
        victim.signal(signal.SIGCONT)
        closed, t_closed = await elapsed_until(t0, victim.expect("closed"))
        assert closed["reason"].startswith("protocol error"), closed
        reason, _ = await watch.wait(victim.pid)  # the victim said EOF: the hub lets go
        for p in (s1, s2):
            intact(await p.call("wait_seq", name="s", src="B", n=10))
        acked += await still_working(pub, [s1, s2], "C")
        record(
            scenario=f"scribble on the shm ring ({'head counter' if what == 'head' else 'record tag'})",
            transport="shm",
            acked=acked,
            received=acked,
            lost=0,
            time_to_error_s=t_closed,
            blocked="reader: link closed, ProtocolError",
            notes=f"reader: {closed['reason'][:60]}; hub: {reason[:30]}",
        )
    await assert_clean(bus_name, before)
    record(clean=True)
