"""SIGKILL of a publisher, a subscriber, a responder mid-request, a pool worker, the hub.

Every client scenario runs on each transport (the victim and one survivor
use it; a bystander uses another transport), with the hub embedded in the
test process.  After the kill: every message acknowledged before it is
received, in order, intact and once; every blocked call fails with a clear
error within :data:`~faults.harness.BOUND`; the survivors keep working; the
root conftest then checks that no SysV object, FIFO or process is left.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

import ipcbus
from ipcbus import WorkerCrashed, WorkerPool
from ipcbus.busdir import BusDir

from .harness import (
    BOUND,
    REPO,
    TRANSPORTS,
    LinkWatch,
    acked_beyond,
    acked_in,
    agents,
    assert_clean,
    elapsed_until,
    hub_proc,
    intact,
    other,
    rest,
    sysv_ids,
    wait_gone,
)

pytestmark = pytest.mark.single_loop

SIZE = 20_000  # > one SysV message (8 KiB): every frame crosses the queue in fragments
BIG = 5 << 20  # > a pipe (1 MiB) and > half an shm ring: written in pieces, streamed through the ring


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("size", [SIZE, BIG], ids=["20KB", "5MiB"])
async def test_kill_publisher(transport: str, size: int, bus_name: str, record: Any) -> None:
    """Killed between frames or, with 5 MiB frames, almost surely in the middle of one:
    no partial frame is ever delivered, and everything acknowledged arrives."""
    count, every = (100, 10) if size == SIZE else (4, 2)
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, transport, transport, other(transport)) as (
            pub,
            sub,
            bystander,
        ),
    ):
        watch = LinkWatch(hub)
        for p in (sub, bystander):
            await p.call("seqsub", name="s", subject="load")
        first = (await pub.call("pubseq", subject="load", src="P", count=count, size=size))["acked"]
        await pub.call("stream", subject="load", src="P", size=size, every=every)
        floor = await acked_beyond(pub, "P", every)
        t0 = time.monotonic()
        pub.signal(signal.SIGKILL)
        acked = acked_in(await rest(pub), "P", max(first, floor))
        await pub.proc.wait()
        reason, t_closed = await watch.wait(pub.pid)
        # Killed between frames: end of stream.  Killed in the middle of a 5 MiB
        # write: the FIFO ends inside a frame, which the hub discards (checked
        # below: no partial frame reaches anyone) and names as such.
        assert (
            reason == "peer closed"
            or reason.startswith("connection closed")
            or "peer closed in the middle of a frame" in reason
        ), reason

        received = []
        for p in (sub, bystander):
            s = await p.call("check", name="s")
            intact(s)
            assert s["next"]["P"] >= acked, (s, acked)  # nothing acknowledged is lost
            received.append(s["next"]["P"])
        assert received[0] == received[1]  # both got the same prefix
        # The survivors keep working, across transports.
        await bystander.call("pubseq", subject="load", src="B", count=50, size=SIZE)
        for p in (sub, bystander):
            intact(await p.call("wait_seq", name="s", src="B", n=50))
        record(
            scenario="SIGKILL publisher" + (" (5 MiB frames)" if size == BIG else ""),
            transport=transport,
            acked=acked,
            received=min(received),
            lost=max(0, acked - min(received)),
            detect_s=t_closed - t0,
        )
    await assert_clean(bus_name, before)
    record(clean=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_kill_subscriber(transport: str, bus_name: str, record: Any) -> None:
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, transport, transport, transport, other(transport)) as (victim, pub, sub, bystander),
    ):
        watch = LinkWatch(hub)
        for p in (victim, sub, bystander):
            await p.call("seqsub", name="s", subject="load")
        await pub.call("stream", subject="load", src="P", size=SIZE, every=10)
        await victim.call("wait_seq", name="s", src="P", n=20)
        t0 = time.monotonic()
        await victim.kill()
        _reason, t_closed = await watch.wait(victim.pid)
        # The publisher is not held up: it keeps being acknowledged after the death.
        await acked_beyond(pub, "P", 50)
        acked = (await pub.call("stop_stream", src="P"))["acked"]
        received = []
        for p in (sub, bystander):
            s = await p.call("wait_seq", name="s", src="P", n=acked)
            intact(s)
            assert s["next"]["P"] == acked, s
            received.append(s["next"]["P"])
        record(
            scenario="SIGKILL subscriber",
            transport=transport,
            acked=acked,
            received=min(received),
            lost=acked - min(received),
            detect_s=t_closed - t0,
        )
    await assert_clean(bus_name, before)
    record(clean=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_kill_responder_mid_request(transport: str, bus_name: str, record: Any) -> None:
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, transport, transport, other(transport)) as (
            responder,
            requester,
            bystander,
        ),
    ):
        watch = LinkWatch(hub)
        await responder.call("serve", subject="echo")
        await responder.call("serve", subject="svc", mode="block")
        acked = (await requester.call("reqseq", subject="echo", src="Q", count=100, size=SIZE))["acked"]
        await requester.send("req", subject="svc", data="in flight", timeout=60)
        await responder.expect("request", subject="svc")
        t0 = time.monotonic()
        responder.signal(signal.SIGKILL)
        err, took = await elapsed_until(t0, requester.answer("req"))
        assert err["ev"] == "error" and err["type"] == "ConnectionClosed", err
        assert "closed" in err["msg"], err
        await responder.proc.wait()
        _reason, t_closed = await watch.wait(responder.pid)
        # Survivors: another responder takes over the service, on another transport.
        await bystander.call("serve", subject="svc")
        assert (await requester.call("req", subject="svc", data="again"))["data"] == "again"
        await bystander.call("serve", subject="echo")
        more = (await requester.call("reqseq", subject="echo", src="Q", count=50, size=SIZE))["acked"]
        assert more == acked + 50
        record(
            scenario="SIGKILL responder mid-request",
            transport=transport,
            sent=more + 2,
            acked=more + 1,
            received=more + 1,
            lost=0,
            blocked="request -> ConnectionClosed",
            time_to_error_s=took,
            detect_s=t_closed - t0,
        )
    await assert_clean(bus_name, before)
    record(clean=True)


async def test_kill_pool_worker(record: Any) -> None:
    """A worker SIGKILLed with requests in flight: each fails with WorkerCrashed or is answered."""
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    async with WorkerPool("pool_workers:setup", workers=3, env=env, restart_backoff=0.01) as pool:
        bus = pool.bus
        started = await bus.subscribe("started")
        await bus.flush()
        acked = 0
        for i in range(100):
            assert (await bus.request("echo", i, timeout=10)).decode() == i
            acked += 1
        hang = asyncio.ensure_future(bus.request("slow.hang", b"", timeout=60))
        victim = (await started.next(timeout=BOUND)).decode(int)
        # Echo requests in flight to every worker (the victim included) when it dies.
        burst = [asyncio.ensure_future(bus.request("echo", i, timeout=60)) for i in range(60)]
        await asyncio.sleep(0)  # let them be routed before the kill (ordering, not timing)
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            await elapsed_until(t0, hang)
        took = time.monotonic() - t0
        async with asyncio.timeout(BOUND):
            results = await asyncio.gather(*burst, return_exceptions=True)
        answered = sum(1 for i, r in enumerate(results) if isinstance(r, ipcbus.Msg) and r.decode() == i)
        crashed = sum(1 for r in results if isinstance(r, WorkerCrashed))
        assert answered + crashed == len(burst), results  # none vanished, none timed out
        # The pool restarted the worker; everything works again on all three.
        async with asyncio.timeout(BOUND):
            while len(pool.pids) < 3 or victim in pool.pids:
                await asyncio.sleep(0.02)  # a restart has no event: poll the pool's state
        seen = set()
        for _ in range(60):
            seen.add((await bus.request("pid", timeout=10)).decode(int))
        assert seen == set(pool.pids), (seen, pool.pids)
        record(
            scenario="SIGKILL pool worker",
            transport="pipe",
            sent=acked + 1 + len(burst),
            acked=acked + answered,
            received=acked + answered,
            lost=0,
            errors=f"{crashed + 1} x WorkerCrashed",
            blocked="request -> WorkerCrashed",
            time_to_error_s=took,
        )
    await wait_gone(victim)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_kill_hub(transport: str, bus_name: str, record: Any) -> None:
    before = sysv_ids()
    bd = BusDir(bus_name)
    async with (
        hub_proc(bus_name) as hub,
        agents(bus_name, transport, args=("--reconnect",)) as (sub,),
        agents(bus_name, transport, transport, transport) as (pub, requester, responder),
    ):
        await sub.call("seqsub", name="s", subject="load")
        await responder.call("serve", subject="svc", mode="block")
        first = (await pub.call("pubseq", subject="load", src="P", count=100, size=SIZE))["acked"]
        # Acknowledged end to end: the subscriber has read them.
        intact(await sub.call("wait_seq", name="s", src="P", n=first))
        await requester.send("req", subject="svc", data="in flight", timeout=60)
        await responder.expect("request", subject="svc")
        await pub.call("stream", subject="load", src="P", size=SIZE, every=10)
        await pub.expect("acked", src="P")
        t0 = time.monotonic()
        await hub.stop(signal.SIGKILL)
        # Every blocked call fails at once, with ConnectionClosed, not a timeout.
        err, t_req = await elapsed_until(t0, requester.answer("req"))
        assert err["ev"] == "error" and err["type"] == "ConnectionClosed", err
        stream_err, t_pub = await elapsed_until(t0, pub.expect("stream_error", src="P"))
        assert stream_err["type"] in ("ConnectionClosed", "BusClosed", "EndOfStream"), stream_err
        for p in (sub, pub, requester, responder):
            closed, _ = await elapsed_until(t0, p.expect("closed"))
            assert closed["reason"], closed
        s = await sub.call("check", name="s")
        intact(s)
        assert s["next"]["P"] >= first
        sent = stream_err["sent"]
        # The dead hub's pid file stays until the next hub (or `ipcbus gc`) proves it dead.
        assert bd.pidfile.exists() and bd.hub_pid() is None

        # A new hub recovers the bus (stale pid file, door, SysV queue); the
        # client that asked for it reconnects and its subscription works again.
        async with hub_proc(bus_name) as hub2:
            assert (await sub.call("wait_connected"))["reconnects"] == 1
            async with agents(bus_name, transport) as (pub2,):
                await pub2.call("pubseq", subject="load", src="P2", count=50, size=SIZE)
                intact(await sub.call("wait_seq", name="s", src="P2", n=50))
            assert await hub2.stop(signal.SIGTERM) == 0
    await assert_clean(bus_name, before)
    record(
        scenario="SIGKILL hub",
        transport=transport,
        sent=sent,
        acked=first,
        received=s["next"]["P"],
        lost=0,
        in_flight_lost=sent - s["next"]["P"],
        blocked="request, publish -> ConnectionClosed",
        time_to_error_s=max(t_req, t_pub),
        clean=True,
    )
