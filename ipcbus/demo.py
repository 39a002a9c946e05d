"""``ipcbus demo`` / ``make demo``: the bus doing its main jobs, with figures.

1. A :class:`~ipcbus.WorkerPool` over anonymous pipes: fan-out pub/sub to
   every worker, then a few thousand load-balanced requests (throughput, and
   sequential latency p50/p99).
2. A hub embedded in this process, and unrelated client processes joining it
   over FIFOs (one serves, one requests and publishes), a SysV message queue
   and a shared-memory ring (moving 8 MiB frames).

Client roles run as ``python -m ipcbus.demo ROLE BUS``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import zlib
from typing import TYPE_CHECKING, Any

import msgspec

import ipcbus

if TYPE_CHECKING:
    from .hub import HubTransport

__all__ = ["run_demo"]


class Report(msgspec.Struct):
    """What the requesting client reports back to the demo."""

    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    published: int


async def pool_setup(bus: ipcbus.Bus) -> None:
    """Worker setup for the demo pool: echo service plus a news counter."""
    count = 0
    sub = await bus.subscribe("news.>")

    async def count_news() -> None:
        nonlocal count
        async for _m in sub:
            count += 1

    bus.node.task_group.start_soon(count_news)
    await bus.serve("echo", lambda m: m.data, queue="echo")
    await bus.serve("stats.news", lambda m: {"pid": os.getpid(), "news": count})


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e6


async def _pool_part(workers: int, requests: int) -> None:
    print(f"== worker pool: {workers} workers over anonymous pipes")
    t0 = time.perf_counter()
    async with ipcbus.WorkerPool("ipcbus.demo:pool_setup", workers=workers, name="demo") as pool:
        print(f"   started in {time.perf_counter() - t0:.2f} s, pids {pool.pids}")
        bus = pool.bus
        for i in range(1000):
            await bus.publish(f"news.item.{i % 10}", {"i": i})
        await bus.flush()
        # Ask every worker (a plain subscription, not a queue group) and collect
        # all the answers on our own reply subject.
        answers = await bus.subscribe("demo.counts")
        await bus.publish("stats.news", reply="demo.counts")
        counts = [(await answers.next(timeout=5)).decode() for _ in range(workers)]
        await answers.unsubscribe()
        print(f"   fan-out: 1000 messages published; each worker saw: {counts}")
        lat: list[float] = []
        for _ in range(500):
            t = time.perf_counter()
            await bus.request("echo", b"x" * 64, timeout=5)
            lat.append(time.perf_counter() - t)
        print(
            f"   sequential request/reply 64 B: p50 {_pct(lat, 0.5):.0f} µs, "
            f"p99 {_pct(lat, 0.99):.0f} µs"
        )
        sem = asyncio.Semaphore(64)

        async def one() -> None:
            async with sem:
                await bus.request("echo", b"x" * 64, timeout=10)

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        dt = time.perf_counter() - t
        print(f"   {requests} requests, 64 in flight: {requests / dt:,.0f} req/s ({dt:.2f} s)")


async def _spawn(role: str, bus: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ipcbus.demo", role, bus, stdin=asyncio.subprocess.DEVNULL
    )


async def _hub_part() -> None:
    name = "demo"
    print(f"== hub {name!r} in this process; client processes join over fifo, sysv and shm")
    async with ipcbus.Hub(name) as hub:
        reports = await hub.bus.subscribe("demo.report")
        ready = await hub.bus.subscribe("demo.ready")
        procs = [await _spawn(r, name) for r in ("responder", "sysv", "shm")]
        for _ in procs:
            await ready.next(timeout=20)
        procs.append(await _spawn("requester", name))
        rep = (await reports.next(timeout=30)).decode(Report)
        print(
            f"   fifo client -> hub -> fifo client: {rep.requests} requests, "
            f"p50 {rep.p50_us:.0f} µs, p99 {rep.p99_us:.0f} µs; "
            f"{rep.published} messages published to the responder"
        )
        got = (await hub.bus.request("demo.count", timeout=5)).decode()
        print(f"   the fifo responder received {got} of them")
        echo = await hub.bus.request("demo.sysv.echo", {"hello": "sysv"}, timeout=5)
        print(f"   sysv client answered: {echo.decode()}")
        big = os.urandom(1024) * 8192  # 8 MiB
        t = time.perf_counter()
        res = (await hub.bus.request("demo.shm.crc", big, timeout=20)).decode()
        dt = time.perf_counter() - t
        ok = res["crc"] == zlib.crc32(big)
        print(
            f"   shm client checked an 8 MiB frame: crc {'ok' if ok else 'MISMATCH'}, "
            f"round trip {dt * 1000:.1f} ms ({2 * len(big) / dt / 1e9:.2f} GB/s both ways)"
        )
        await hub.bus.publish("demo.stop")
        await hub.bus.flush()
        for p in procs:
            await asyncio.wait_for(p.wait(), 20)
        stats = hub.stats()
        print(f"   hub: {stats['accepted']} links accepted, {stats['node']['dropped']} dropped")


async def run_demo(workers: int = 2, requests: int = 5000) -> None:
    """Run the whole demo and print what ran."""
    t0 = time.perf_counter()
    await _pool_part(workers, requests)
    await _hub_part()
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")


# -- client processes ----------------------------------------------------------


async def _client(role: str, bus_name: str) -> None:
    transport: HubTransport = "sysv" if role == "sysv" else "shm" if role == "shm" else "fifo"
    async with ipcbus.connect(bus_name, transport=transport, name=f"demo-{role}") as bus:
        stop = await bus.subscribe("demo.stop")
        if role == "responder":
            seen = 0
            news = await bus.subscribe("demo.news")

            async def count() -> None:
                nonlocal seen
                async for _m in news:
                    seen += 1

            bus.node.task_group.start_soon(count)
            await bus.serve("demo.upper", lambda m: m.decode(str).upper())
            await bus.serve("demo.count", lambda m: seen)
        elif role == "sysv":
            await bus.serve("demo.sysv.echo", lambda m: {"echo": m.decode(), "pid": os.getpid()})
        elif role == "shm":
            await bus.serve("demo.shm.crc", lambda m: {"crc": zlib.crc32(m.data)})
        elif role == "requester":
            lat: list[float] = []
            t0 = time.perf_counter()
            for i in range(1000):
                t = time.perf_counter()
                await bus.request("demo.upper", f"word {i}", timeout=5)
                lat.append(time.perf_counter() - t)
            dt = time.perf_counter() - t0
            for i in range(1000):
                await bus.publish("demo.news", i)
            await bus.flush()
            await bus.publish(
                "demo.report",
                Report(1000, dt, statistics.median(lat) * 1e6, _pct(lat, 0.99), 1000),
            )
        await bus.flush()
        await bus.publish("demo.ready", role)
        await stop.next(timeout=120)


def main(argv: list[str]) -> None:
    """Entry point of a demo client process."""
    role, bus_name = argv[0], argv[1]
    run: Any
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    run(_client(role, bus_name))


if __name__ == "__main__":
    main(sys.argv[1:])
