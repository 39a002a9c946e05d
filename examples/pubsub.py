"""Publish/subscribe across a worker pool: wildcards, fan-out and a queue group.

Each of two worker processes subscribes

* to ``sensors.*.temperature`` with no queue group: every worker gets every
  temperature reading (fan-out), and no worker gets ``sensors.*.humidity``;
* to ``jobs.>`` in the queue group ``jobs``: each job goes to exactly one
  worker, the least busy one.

The workers report what they received on the subject ``report``; the parent
publishes, collects the reports and prints who got what.

Run it from the repository root::

    python examples/pubsub.py
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import defaultdict
from pathlib import Path

import msgspec

import ipcbus

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2


class Report(msgspec.Struct):
    """What a worker tells the parent about one message it received."""

    worker: int
    kind: str  # "reading" or "job"
    subject: str


async def setup(bus: ipcbus.Bus) -> None:
    """Runs in each worker: subscribe, and report every message received."""
    pid = os.getpid()

    # `serve` doubles as a callback subscription: a message without a reply
    # subject just runs the handler.
    async def on_reading(msg: ipcbus.Msg) -> None:
        await bus.publish("report", Report(pid, "reading", msg.subject))

    async def on_job(msg: ipcbus.Msg) -> None:
        await bus.publish("report", Report(pid, "job", msg.subject))

    await bus.serve("sensors.*.temperature", on_reading)
    await bus.serve("jobs.>", on_job, queue="jobs")


def worker_env() -> dict[str, str]:
    """Our environment with the repository root on PYTHONPATH.

    Workers are fresh interpreters started in our current directory; this lets
    them import ``examples.pubsub`` whatever directory we were started from.
    """
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def main() -> int:
    """Start the pool, publish, collect the reports, check them."""
    async with ipcbus.WorkerPool("examples.pubsub:setup", workers=WORKERS, env=worker_env()) as pool:
        bus = pool.bus
        print(f"pool up: workers {pool.pids}")
        # Subscribe before publishing: the interest reaches each worker ahead
        # of the messages (a link is ordered), so no report can be missed.
        reports = await bus.subscribe("report")

        readings = {
            "sensors.kitchen.temperature": 21.5,
            "sensors.garage.temperature": 12.0,
            "sensors.kitchen.humidity": 40.0,  # matches no subscription
        }
        for subject, value in readings.items():
            await bus.publish(subject, value)
        jobs = [f"jobs.resize.{i}" for i in range(6)]
        for i, subject in enumerate(jobs):
            await bus.publish(subject, {"job": i})

        expected = WORKERS * 2 + len(jobs)  # two temperatures per worker, each job once
        got = [(await reports.next(timeout=5)).decode(Report) for _ in range(expected)]
        try:
            extra = await reports.next(timeout=0.2)
            print(f"unexpected extra report: {extra.decode(Report)}")
            return 1
        except TimeoutError:
            pass

    by_worker: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in got:
        by_worker[r.worker][r.kind].append(r.subject)
    for pid, kinds in sorted(by_worker.items()):
        print(f"worker {pid}:")
        print(f"  readings (fan-out):  {sorted(kinds['reading'])}")
        print(f"  jobs (queue 'jobs'): {sorted(kinds['job'], key=lambda s: int(s.rsplit('.', 1)[1]))}")

    temperatures = sorted(s for s in readings if s.endswith(".temperature"))
    ok = len(by_worker) == WORKERS and all(sorted(k["reading"]) == temperatures for k in by_worker.values())
    all_jobs = sorted(r.subject for r in got if r.kind == "job")
    ok = ok and all_jobs == sorted(jobs)  # every job exactly once
    print(
        "every worker got every temperature, nobody got humidity, each job went to one worker:",
        "yes" if ok else "NO",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
