"""``ipcrm`` under load: the bus's SysV queue, a client's queue, an shm segment and its semaphores.

The objects are removed the way ``ipcrm -q/-m ID`` does, by id
(``sysv_ipc.remove_*``), while numbered traffic flows.  What each transport
does about it (docs/reliability.md, "ipcrm"):

* the **bus queue** (sysv): every SysV link ends with ``ConnectionClosed``
  (the hub's receiver thread sees ``EIDRM``; clients are told with ABORT),
  the hub recreates the queue at once, new and reconnecting SysV clients
  join it, and the FIFO and shm links never notice;
* a **client's own queue** (sysv): that client's link ends, nobody else's;
* an **shm segment**: a link's segment is already marked ``IPC_RMID`` once
  both sides attached (that is how a crash leaks nothing), so ``ipcrm -m``
  changes nothing — the link keeps running and the kernel frees the segment
  when both detach; the link's **semaphores** are POSIX named semaphores,
  unlinked at the same moment, so there is nothing left to remove (no SysV
  semaphore set belongs to a bus at all).
"""

from __future__ import annotations

import time
from typing import Any

import posix_ipc
import pytest
import sysv_ipc

import ipcbus

from .harness import (
    LinkWatch,
    acked_beyond,
    acked_in,
    agents,
    assert_clean,
    elapsed_until,
    intact,
    link_of,
    sysv_ids,
)

pytestmark = pytest.mark.single_loop

SIZE = 20_000


async def test_ipcrm_sysv_bus_queue_under_load(bus_name: str, record: Any) -> None:
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, "sysv", "sysv", "fifo", "shm") as (spub, ssub, fsub, hpub),
        agents(bus_name, "sysv", args=("--reconnect",)) as (srec,),
    ):
        acc: Any = hub._acceptors["sysv"]
        old_id = acc.queue_id
        for p in (ssub, fsub, srec):
            await p.call("seqsub", name="s", subject="load")
        await fsub.call("seqsub", name="o", subject="other")
        await spub.call("stream", subject="load", src="P", size=SIZE, every=10)
        await hpub.call("stream", subject="other", src="H", size=SIZE, every=10)
        p_floor = await acked_beyond(spub, "P", 10)
        await hpub.expect("acked", src="H")

        t0 = time.monotonic()
        sysv_ipc.remove_message_queue(old_id)  # ipcrm -q
        err, t_pub = await elapsed_until(t0, spub.expect("stream_error", src="P"))
        assert err["type"] in ("ConnectionClosed", "BusClosed", "EndOfStream"), err
        for p in (spub, ssub, srec):
            closed, _ = await elapsed_until(t0, p.expect("closed"))
            assert closed["reason"], closed
        t_all = time.monotonic() - t0
        acked = acked_in(spub.backlog, "P", p_floor)
        # The hub recreated the queue; the reconnecting client is back on it.
        assert acc.recreated == 1 and acc.queue_id != old_id
        assert (await srec.call("wait_connected"))["reconnects"] == 1
        # The other transports never noticed: everything acknowledged arrived.
        h_acked = (await hpub.call("stop_stream", src="H"))["acked"]
        s = await fsub.call("wait_seq", name="o", src="H", n=h_acked)
        intact(s)
        assert s["next"]["H"] == h_acked
        s_load = await fsub.call("check", name="s")
        intact(s_load)
        assert s_load["next"]["P"] >= acked, (s_load, acked)  # acknowledged before ipcrm: kept
        # New SysV clients join the new queue and reach everyone.
        async with agents(bus_name, "sysv") as (newpub,):
            await newpub.call("pubseq", subject="load", src="N", count=30, size=SIZE)
            for p in (fsub, srec):
                intact(await p.call("wait_seq", name="s", src="N", n=30))
        record(
            scenario="ipcrm -q bus queue under load",
            transport="sysv",
            acked=acked + h_acked,
            received=s_load["next"]["P"] + s["next"]["H"],
            lost=0,
            blocked="publish -> ConnectionClosed",
            time_to_error_s=max(t_pub, t_all),
            notes="hub recreated the queue; fifo/shm links unaffected; reconnect works",
        )
    await assert_clean(bus_name, before)
    record(clean=True)


async def test_ipcrm_sysv_client_queue_under_load(bus_name: str, record: Any) -> None:
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name) as hub,
        agents(bus_name, "sysv", "sysv", "sysv", "fifo") as (
            victim,
            pub,
            sub,
            fsub,
        ),
    ):
        watch = LinkWatch(hub)
        for p in (victim, sub, fsub):
            await p.call("seqsub", name="s", subject="load")
        await pub.call("stream", subject="load", src="P", size=SIZE, every=10)
        await victim.call("wait_seq", name="s", src="P", n=20)
        qid = int(link_of(hub, victim.pid)["objects"]["queue"])
        t0 = time.monotonic()
        sysv_ipc.remove_message_queue(qid)  # ipcrm -q of one client's queue
        closed, t_client = await elapsed_until(t0, victim.expect("closed"))
        reason, t_hub = await watch.wait(victim.pid)
        assert closed["reason"] and reason, (closed, reason)
        await acked_beyond(pub, "P", 30)
        acked = (await pub.call("stop_stream", src="P"))["acked"]
        for p in (sub, fsub):
            s = await p.call("wait_seq", name="s", src="P", n=acked)
            intact(s)
            assert s["next"]["P"] == acked
        record(
            scenario="ipcrm -q a client's queue under load",
            transport="sysv",
            acked=acked,
            received=acked,
            lost=0,
            time_to_error_s=max(t_client, t_hub - t0),
            blocked="client and hub: link closed, ConnectionClosed",
            notes="only that client's link ends",
        )
    await assert_clean(bus_name, before)
    record(clean=True)


async def test_ipcrm_shm_segment_and_semaphores_under_load(bus_name: str, record: Any) -> None:
    before = sysv_ids()
    async with ipcbus.Hub(bus_name) as hub, agents(bus_name, "shm", "shm", "fifo") as (pub, sub, fsub):
        for p in (sub, fsub):
            await p.call("seqsub", name="s", subject="load")
        await pub.call("stream", subject="load", src="P", size=SIZE, every=10)
        await sub.call("wait_seq", name="s", src="P", n=20)
        removed: list[str] = []
        for p in (pub, sub):
            objs = link_of(hub, p.pid)["objects"]
            sysv_ipc.remove_shared_memory(int(objs["shmid"]))  # ipcrm -m: already IPC_RMID, no-op
            removed.append(f"shm {objs['shmid']}")
            for name in objs.get("sems", []):
                with pytest.raises(posix_ipc.ExistentialError):  # unlinked once both attached
                    posix_ipc.unlink_semaphore(name)
        # No SysV semaphore set belongs to the bus: there is nothing for `ipcrm -s`.
        assert not {i for k, i in sysv_ids() - before if k == "sem"}
        # The links keep running: the publisher is still acknowledged, nothing is lost.
        await acked_beyond(pub, "P", 30)
        acked = (await pub.call("stop_stream", src="P"))["acked"]
        for p in (sub, fsub):
            s = await p.call("wait_seq", name="s", src="P", n=acked)
            intact(s)
            assert s["next"]["P"] == acked
        record(
            scenario="ipcrm -m segment, semaphores under load",
            transport="shm",
            acked=acked,
            received=acked,
            lost=0,
            notes="no effect: segments are IPC_RMID and semaphores unlinked once attached",
        )
    await assert_clean(bus_name, before)
    record(clean=True)
