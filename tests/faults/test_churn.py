"""200 clients connecting and disconnecting in a loop while traffic flows.

A hub child (so its /proc entry can be read), a publisher streaming to a
subscriber the whole time, and one churn child doing 200 sequential
connect / publish / flush / close cycles over fifo, sysv and shm in turn.
Measured before and after (after a warm-up round, so lazily created threads
and buffers are already there): the hub's open fds and threads, FIFOs in the
bus folder, SysV objects and POSIX semaphores on the host.  None may grow.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import pytest

from .harness import (
    BOUND,
    REPO,
    agents,
    assert_clean,
    bus_leftovers,
    hub_proc,
    intact,
    posix_sems,
    proc_counts,
    settle,
    sysv_ids,
    sysv_of,
)

pytestmark = pytest.mark.single_loop

CYCLES = 200
WARMUP = 12


async def churn(bus: str, cycles: int, first: int, pids: set[int]) -> dict[str, Any]:
    """Run the churn child for ``cycles`` cycles (its pid joins ``pids``); return its summary."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.faults.agent", "churn", bus,
        "--cycles", str(cycles), "--first", str(first),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    pids.add(proc.pid)
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, (out.decode(errors="replace"), err.decode(errors="replace")[-3000:])
    return dict(json.loads(out.splitlines()[-1]))


def snapshot(bus: str, hub_pid: int, pids: set[int]) -> dict[str, int]:
    """What must not grow: the hub's fds and threads, FIFOs, SysV objects, POSIX semaphores."""
    return {
        **proc_counts(hub_pid),
        "fifos": len([f for f in bus_leftovers(bus) if not f.startswith("objects/") and f != "hub.pid"]),
        "sysv": len(sysv_of(pids)),
        "posix_sems": len(posix_sems(pids)),
    }


async def test_200_clients_churn_while_traffic_flows(bus_name: str, record: Any) -> None:
    before_sysv = sysv_ids()
    async with hub_proc(bus_name) as hub:
        async with agents(bus_name, "fifo", "sysv", "shm") as (mon, pub, sub):
            pids = {hub.pid, mon.pid, pub.pid, sub.pid}
            await sub.call("seqsub", name="s", subject="load")
            await sub.call("seqsub", name="c", subject="churn")
            links = (await mon.call("hub_stats"))["links"]
            await pub.call("stream", subject="load", src="P", size=2000, every=20)
            await pub.expect("acked", src="P")
            await churn(bus_name, WARMUP, 0, pids)

            async def settled() -> dict[str, int]:
                # The hub drops a closed client's link as soon as it sees end of stream,
                # but nothing signals "done" to us: wait (bounded) for its link count.
                async with asyncio.timeout(BOUND):
                    while (await mon.call("hub_stats"))["links"] != links:
                        await asyncio.sleep(0.02)
                return snapshot(bus_name, hub.pid, pids)

            first = await settled()
            summary = await churn(bus_name, CYCLES, WARMUP, pids)
            after = await settled()
            # fds and threads settle a moment after the links are gone (a thread is joined, a
            # pidfd closed): give them the same bounded wait before comparing.
            await settle(lambda: snapshot(bus_name, hub.pid, pids) == first)
            after = snapshot(bus_name, hub.pid, pids)
            assert after == first, (first, after)

            acked = (await pub.call("stop_stream", src="P"))["acked"]
            s = await sub.call("wait_seq", name="s", src="P", n=acked)
            intact(s)
            c = await sub.call("wait_seq", name="c", src="C", n=WARMUP + CYCLES)
            intact(c)
            assert c["next"]["C"] == WARMUP + CYCLES
            record(
                scenario=f"{CYCLES} clients connect/publish/close while traffic flows",
                transport="fifo+sysv+shm",
                sent=acked + CYCLES,
                acked=acked + CYCLES,
                received=s["next"]["P"] + CYCLES,
                lost=0,
                notes=f"{CYCLES} cycles in {summary['seconds']:.1f} s ("
                + ", ".join(f"{n} {t}" for t, n in summary["per_transport"].items())
                + "); "
                + ", ".join(f"{k} {first[k]}->{after[k]}" for k in first),
                before=first,
                after=after,
            )
        assert await hub.stop(signal.SIGTERM) == 0, hub.stderr()
    await assert_clean(bus_name, before_sysv)
    record(clean=True)
