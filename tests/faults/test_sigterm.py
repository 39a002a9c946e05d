"""SIGTERM of the hub under load: a clean close for every client, nothing left behind.

The hub stops accepting, tells every client (a ``shutdown`` notice), flushes
what it queued and closes each link, removes its door, pid file, FIFOs,
records and SysV queue, and exits 0.  Clients see end of stream (or
``ConnectionClosed`` on a call that was waiting), never a hang; everything
the hub acknowledged (``flush``) before it closed reaches the subscriber.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from ipcbus.busdir import BusDir

from .harness import (
    TRANSPORTS,
    acked_beyond,
    acked_in,
    agents,
    assert_clean,
    elapsed_until,
    hub_proc,
    intact,
    sysv_ids,
)

pytestmark = pytest.mark.single_loop

SIZE = 20_000


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sigterm_hub_under_load(transport: str, bus_name: str, record: Any) -> None:
    before = sysv_ids()
    bd = BusDir(bus_name)
    async with (
        hub_proc(bus_name) as hub,
        agents(bus_name, transport, transport, transport, transport) as (pub, sub, requester, responder),
    ):
        peers = (pub, sub, requester, responder)
        await sub.call("seqsub", name="s", subject="load")
        await responder.call("serve", subject="svc", mode="block")
        await requester.send("req", subject="svc", data="in flight", timeout=60)
        await responder.expect("request", subject="svc")
        await pub.call("stream", subject="load", src="P", size=SIZE, every=10)
        floor = await acked_beyond(pub, "P", 50)  # under load
        t0 = time.monotonic()
        code, t_exit = await elapsed_until(t0, hub.stop(signal.SIGTERM))
        assert code == 0, hub.stderr()
        err, t_req = await elapsed_until(t0, requester.answer("req"))
        assert err["ev"] == "error" and err["type"] in ("ConnectionClosed", "BusClosed"), err
        stream_err, t_pub = await elapsed_until(t0, pub.expect("stream_error", src="P"))
        assert stream_err["type"] in ("ConnectionClosed", "BusClosed", "EndOfStream"), stream_err
        for p in peers:
            closed, _ = await elapsed_until(t0, p.expect("closed"))
            assert closed["reason"] == "peer closed", closed  # a clean end of stream
            assert "shutdown" in closed["notices"], closed
        # Everything the hub acknowledged before closing reached the subscriber.
        acked = acked_in(pub.backlog, "P", floor)
        s = await sub.call("check", name="s")
        intact(s)
        assert s["next"]["P"] >= acked, (s, acked)
        # The hub removed its files at once; the clients are still running and answer.
        assert not bd.pidfile.exists() and not bd.door.exists()
        for p in peers:
            await p.send("flush")
            assert (await p.answer("flush")).get("type") in ("ConnectionClosed", "BusClosed")
    for p in peers:
        assert p.proc.returncode == 0, p.errors()  # quit cleanly
    await assert_clean(bus_name, before)
    record(
        scenario="SIGTERM hub under load",
        transport=transport,
        sent=stream_err["sent"],
        acked=acked,
        received=s["next"]["P"],
        lost=max(0, acked - s["next"]["P"]),
        blocked="request, publish -> ConnectionClosed",
        time_to_error_s=max(t_req, t_pub),
        notes=f"hub exited 0 after {t_exit:.2f} s; all clients saw 'peer closed' + shutdown notice",
        clean=True,
    )
