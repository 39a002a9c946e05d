"""Memory under a stalled subscriber: ``python -m ipcbus.bench.memory [N] [MAX_PENDING]``.

A pool worker subscribes with ``max_pending`` and never reads; the parent
publishes N 64-byte messages (1,000,000 by default) as fast as it can.  The
worker's RSS before and after shows that memory is bounded by the pending
limit (the overflow is dropped and counted), not by what was published.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import ipcbus


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def setup(bus: ipcbus.Bus) -> None:
    """Worker side: a subscription that is never read, and two probes."""
    max_pending = int(os.environ.get("IPCBUS_BENCH_MAX_PENDING", "1000"))
    stalled = await bus.subscribe("flood", max_pending=max_pending)
    await bus.serve("probe.rss", lambda _m: _rss_kib())
    await bus.serve("probe.dropped", lambda _m: stalled.dropped)


async def measure(n: int = 1_000_000, max_pending: int = 1000) -> dict[str, Any]:
    """Publish ``n`` messages at a stalled subscriber; return RSS before/after and drops."""
    env = {**os.environ, "IPCBUS_BENCH_MAX_PENDING": str(max_pending)}
    async with ipcbus.WorkerPool("ipcbus.bench.memory:setup", workers=1, env=env) as pool:
        bus = pool.bus
        before = (await bus.request("probe.rss", timeout=10)).decode(int)
        payload = b"x" * 64
        t0 = time.perf_counter()
        for _ in range(n):
            await bus.publish("flood", payload)
        await bus.flush()
        seconds = time.perf_counter() - t0
        after = (await bus.request("probe.rss", timeout=60)).decode(int)
        dropped = (await bus.request("probe.dropped", timeout=10)).decode(int)
    return {
        "published": n,
        "max_pending": max_pending,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "dropped": dropped,
        "seconds": seconds,
    }


def main() -> None:
    """Run the measurement and print one line."""
    import uvloop

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    mp = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    r = uvloop.run(measure(n, mp))
    print(
        f"{r['published']:,} x 64 B to a subscriber that never reads (max_pending={mp}): "
        f"worker RSS {r['rss_before_kib']} KiB -> {r['rss_after_kib']} KiB, "
        f"{r['dropped']:,} dropped and counted, {r['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
