"""A subscriber that stops reading (SIGSTOP) while the others continue.

The hub gives each link a bounded outbound buffer (``outbound_limit``, 1 MiB
here so the test stays small): above it, messages for *that* link are
dropped, counted (``ipcbus ls``: ``dropped``, ``slow_consumer_events``) and
reported to it as ``SlowConsumer`` once it reads again.  The others keep
their rate — counted, not timed: they receive every message of every batch
while the slow one is stopped — and the slow one's losses are exactly the
gaps in what it read.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

import ipcbus

from .harness import (
    TRANSPORTS,
    agents,
    assert_clean,
    intact,
    link_of,
    ls_json,
    sysv_ids,
    wait_stopped,
)

pytestmark = pytest.mark.single_loop

# 256 KiB per batch: a burst the fast subscriber's path buffers without loss.
SIZE, BATCH = 4096, 64
LIMIT = 1 << 20


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stopped_subscriber(transport: str, bus_name: str, record: Any) -> None:
    before = sysv_ids()
    async with (
        ipcbus.Hub(bus_name, outbound_limit=LIMIT) as hub,
        agents(bus_name, transport, transport, transport) as (fast, slow, pub),
    ):
        for p in (fast, slow):
            await p.call("seqsub", name="s", subject="load")
        slow.signal(signal.SIGSTOP)
        await wait_stopped(slow.pid)
        total = 0
        # Batches until the hub has had to drop for the slow one: count, not time.  The
        # cap is what its link can hold at most (ring or pipe or queue, plus the limit).
        cap = LIMIT + int(link_of(hub, slow.pid)["objects"].get("ring_size", 0)) + (4 << 20)
        while link_of(hub, slow.pid)["dropped"] == 0:
            assert total * SIZE < cap, link_of(hub, slow.pid)
            total = (await pub.call("pubseq", subject="load", src="P", count=BATCH, size=SIZE))["acked"]
            # The fast subscriber gets the whole batch while the slow one is stopped.
            intact(await fast.call("wait_seq", name="s", src="P", n=total))
        for _ in range(4):  # and a few more, while it is dropping
            total = (await pub.call("pubseq", subject="load", src="P", count=BATCH, size=SIZE))["acked"]
            intact(await fast.call("wait_seq", name="s", src="P", n=total))
        slow_link, fast_link = link_of(hub, slow.pid), link_of(hub, fast.pid)
        assert slow_link["dropped"] > 0 and slow_link["slow_consumer_events"] >= 1, slow_link
        assert fast_link["dropped"] == 0 and fast_link["slow_consumer_events"] == 0, fast_link

        # `ipcbus ls --json` shows it, asked over the bus.
        info = await ls_json(bus_name)
        (shown,) = [lk for lk in info["links"] if lk.get("peer_pid") == slow.pid]
        assert shown["dropped"] > 0 and shown["slow_consumer_events"] >= 1, shown
        assert info["hub"]["dropped"] >= shown["dropped"]

        # Running again, it catches up and learns exactly what it lost.
        slow.signal(signal.SIGCONT)
        # Its flush's answer queues behind everything the hub holds for it: once back,
        # the hub's buffer toward it is empty, and the next message cannot be dropped.
        await slow.call("flush")
        await pub.call("pubseq", subject="load", src="P", count=1, size=SIZE)
        total += 1
        s = await slow.call("wait_seq", name="s", src="P", n=total)
        assert s["dups"] == 0 and s["corrupt"] == 0, s
        assert s["received"] + s["gaps"] == total, s
        assert s["gaps"] == s["slow"] == link_of(hub, slow.pid)["dropped"], (s, link_of(hub, slow.pid))
        f = await fast.call("wait_seq", name="s", src="P", n=total)
        intact(f)
        record(
            scenario="SIGSTOP subscriber (slow consumer)",
            transport=transport,
            sent=total,
            acked=total,
            received=f["received"],
            lost=total - f["received"],
            slow_dropped=s["gaps"],
            slow_reported=s["slow"],
            notes=f"slow one: {s['received']} read + {s['gaps']} reported as SlowConsumer; "
            f"ls shows dropped={shown['dropped']}",
        )
    await assert_clean(bus_name, before)
    record(clean=True)
