"""A worker pool: typed requests, load balancing, and a worker crash with recovery.

The workers run ``examples.workers:setup`` (services ``resize``, ``echo`` and
``pid``, each in a queue group) plus one more service defined here, ``hold``,
which stands for a long job: it tells the parent which worker holds it, then
never returns. The parent

1. sends a typed ``resize`` request;
2. sends 300 concurrent ``pid`` requests and counts which worker answered
   each: the queue group spreads them over the least busy workers;
3. sends a ``hold`` request, SIGKILLs the worker that holds it, and gets
   ``WorkerCrashed`` at once (not a timeout);
4. waits for the pool to restart that worker, and shows the new worker
   taking requests;
5. sends a ``stall`` request, whose handler blocks its worker's event loop
   (``time.sleep``): the pool (``hang_timeout=1``) finds that worker hung,
   kills it, and the request fails with ``WorkerCrashed`` saying so;
6. replaces every worker by a fresh process (``pool.recycle()``, a rolling
   reload) while requests keep coming, none failing; then grows the pool to
   four workers and shrinks it back to three (``pool.resize()``).

Run it from the repository root::

    python examples/worker_pool.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that `examples.workers` imports from any directory

import ipcbus  # noqa: E402
from examples import workers  # noqa: E402
from examples.workers import Image, Resized, requests_during, worker_env  # noqa: E402

WORKERS = 3


async def setup(bus: ipcbus.Bus) -> None:
    """Runs in each worker: the services of examples/workers.py, plus `hold`."""
    await workers.setup(bus)

    async def hold(msg: ipcbus.Msg) -> None:
        await bus.publish("holding", os.getpid())  # tell the parent who holds the job
        await asyncio.Event().wait()  # a job that never ends: the parent kills us

    await bus.serve("hold", hold, queue="hold")

    async def stall(msg: ipcbus.Msg) -> None:
        await bus.publish("holding", os.getpid())
        await bus.flush()  # it leaves before the loop stops
        time.sleep(600)  # noqa: ASYNC251  (a plugin bug: a blocking call holds the event loop)

    await bus.serve("stall", stall, queue="stall")


async def spread(pool: ipcbus.WorkerPool, n: int) -> Counter[int]:
    """Send ``n`` concurrent `pid` requests; count the answers per worker pid."""
    replies = await asyncio.gather(*(pool.bus.request("pid", timeout=5) for _ in range(n)))
    return Counter(r.decode(int) for r in replies)


async def fails_with_crash(job: asyncio.Task[ipcbus.Msg], what: str) -> ipcbus.WorkerCrashed | None:
    """Await ``job``, a request whose worker dies under it: its WorkerCrashed (None if it returned)."""
    try:
        await job
    except ipcbus.WorkerCrashed as exc:
        return exc
    print(f"the {what} request returned?!")
    return None


async def wait_until_ready(pool: ipcbus.WorkerPool, timeout: float = 8.0) -> None:
    """Wait until every worker of the pool is up again."""
    deadline = time.monotonic() + timeout
    while len(pool.pids) < pool.size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool did not recover within {timeout} s: {pool.stats()['workers']}")
        await asyncio.sleep(0.05)  # the pool has no "worker restarted" event: poll its state


async def main() -> int:
    """Run the six steps; check each."""
    ok = True
    async with ipcbus.WorkerPool(
        "examples.worker_pool:setup", workers=WORKERS, env=worker_env(), hang_timeout=1.0
    ) as pool:
        bus = pool.bus
        before = set(pool.pids)
        print(f"pool up: workers {sorted(before)}")

        # 1. A typed request.
        reply = await bus.request("resize", Image(640, 480, bytes(64)), timeout=5)
        resized = reply.decode(Resized)
        print(f"resize 640x480 -> {resized.width}x{resized.height} by worker {resized.worker_pid}")
        ok &= (resized.width, resized.height) == (320, 240)

        # 2. Load balancing over the queue group "pid".
        counts = await spread(pool, 300)
        print(f"300 requests spread over the workers: {dict(sorted(counts.items()))}")
        ok &= set(counts) == before

        # 3. A worker dies in the middle of a request.
        holding = await bus.subscribe("holding")
        job = asyncio.create_task(bus.request("hold", timeout=30))
        victim = (await holding.next(timeout=5)).decode(int)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        crash = await fails_with_crash(job, "held")
        ms = (time.monotonic() - killed_at) * 1000
        print(f"killed worker {victim}: WorkerCrashed after {ms:.1f} ms: {crash}")
        ok &= crash is not None

        # 4. The pool restarts it; the new worker takes requests.
        await wait_until_ready(pool)
        after = set(pool.pids)
        (restarted,) = after - before
        print(f"worker {victim} was replaced by worker {restarted}")
        counts = await spread(pool, 300)
        print(f"300 more requests: {dict(sorted(counts.items()))}")
        ok &= victim not in counts and restarted in counts

        # 5. A handler blocks its worker's loop: hung, killed, restarted.
        job = asyncio.create_task(bus.request("stall", timeout=30))
        stuck = (await holding.next(timeout=5)).decode(int)
        asked_at = time.monotonic()
        crash = await fails_with_crash(job, "stalled")
        print(f"worker {stuck} hung: WorkerCrashed after {time.monotonic() - asked_at:.1f} s: {crash}")
        ok &= "hung" in str(crash)
        await wait_until_ready(pool)
        ok &= stuck not in pool.pids

        crashes = sum(w["crashes"] for w in pool.stats()["workers"])
        print(f"crashes seen by the pool: {crashes}")
        ok &= crashes == 2

        # 6. A rolling reload, then a resize, with requests coming throughout.
        before = set(pool.pids)
        answered, failed = await requests_during(pool.bus, "pid", b"", pool.recycle(), askers=8)
        print(f"recycled every worker: {sorted(before)} -> {sorted(pool.pids)}; "
              f"{answered} requests meanwhile, {failed} failed")
        ok &= not before & set(pool.pids) and failed == 0 and answered > 0
        await pool.resize(4)
        grown = len(pool.pids)
        answered, failed = await requests_during(pool.bus, "pid", b"", pool.resize(3), askers=8)
        total = answered + failed
        print(f"resized to {grown} workers, then back to {len(pool.pids)}: {failed} of {total} failed")
        ok &= grown == 4 and len(pool.pids) == 3 and failed == 0

    print("all steps as expected:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
