"""A worker pool linked by System V message queues: requests, a stream, and the queues it uses.

Each worker reaches the parent through two SysV queues (one per direction),
so ``ipcs -q`` shows them while the pool runs. The parent

1. sends typed ``resize`` requests, fragmented ones (larger than one SysV
   message) included;
2. streams 20,000 small publishes to a worker that counts them, then asks
   for the count on the same subscription (it arrives after them);
3. prints the queues of each worker's link, read back from the kernel;
4. closes the pool and checks that no queue is left.

Run it from the repository root::

    python examples/sysv_pool.py
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that `examples.workers` imports from any directory

import ipcbus  # noqa: E402
from examples import workers  # noqa: E402
from examples.workers import Image, Resized, worker_env  # noqa: E402
from ipcbus.sysv import proc_table  # noqa: E402

STREAM = 20_000


async def setup(bus: ipcbus.Bus) -> None:
    """Runs in each worker: the services of examples/workers.py, plus a counting sink.

    Ticks and the question "how many?" arrive on one subscription, in the
    order the parent sent them, so the answer counts every tick sent before.
    """
    await workers.setup(bus)
    sub = await bus.subscribe(f"w.{os.getpid()}.>", max_pending=STREAM + 10)

    async def count() -> None:
        seen = 0
        async for msg in sub:
            if msg.reply is None:
                seen += 1
            else:
                await msg.respond(seen)

    asyncio.get_running_loop().create_task(count())


async def main() -> int:
    """Run the four steps; check each."""
    ok = True
    async with ipcbus.WorkerPool(
        "examples.sysv_pool:setup", workers=2, transport="sysv", env=worker_env()
    ) as pool:
        bus = pool.bus
        # 1. Typed requests; 100 KiB of pixels do not fit one SysV message (8 KiB).
        for pixels in (64, 100_000):
            reply = await bus.request("resize", Image(640, 480, bytes(pixels)), timeout=5)
            r = reply.decode(Resized)
            print(f"resize with {pixels} B of pixels -> {r.width}x{r.height} by worker {r.worker_pid}")
            ok &= (r.width, r.height) == (320, 240)

        # 2. A stream of small publishes to one worker, many frames per SysV message.
        worker = pool.pids[0]
        for i in range(STREAM):
            await bus.publish(f"w.{worker}.tick", i)
        got = (await bus.request(f"w.{worker}.count", timeout=10)).decode(int)
        print(f"worker {worker} counted {got} of {STREAM} publishes")
        ok &= got == STREAM

        # 3. The kernel's view of each link's queues.
        table = proc_table("msg")
        mine: set[int] = set()
        for link in bus.stats()["links"]:
            for role in ("queue", "peer_queue"):
                qid = link["objects"][role]
                mine.add(qid)
                row = table.get(qid, {})
                print(
                    f"{link['name']}: {role} id {qid}, key {row.get('key', 0):#x}, "
                    f"mode {row.get('perms', 0):o}, {row.get('qnum')} message(s) queued"
                )
        ok &= len(mine) == 4 and mine <= set(table)

    left = mine & set(proc_table("msg"))
    print("queues left after the pool closed:", sorted(left) or "none")
    ok &= not left
    print("all steps as expected:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
