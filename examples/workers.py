"""Worker-side setup for the worker-pool example: each worker serves `resize`, `echo` and `pid`.

Run by `examples/worker_pool.py` and `examples/sysv_pool.py`; a WorkerPool imports
it as "examples.workers:setup" (or "workers:setup" when started from this directory).
Also the examples' shared helpers: `worker_env()`, and `requests_during()`, the
load kept up while a pool recycles or resizes its workers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path

import msgspec

import ipcbus


class Image(msgspec.Struct):
    """A toy image: width, height and pixels."""

    width: int
    height: int
    pixels: bytes


class Resized(msgspec.Struct):
    """What `resize` answers."""

    width: int
    height: int
    worker_pid: int


async def setup(bus: ipcbus.Bus) -> None:
    """Register this worker's services on its bus."""

    def resize(img: Image) -> Resized:
        return Resized(img.width // 2, img.height // 2, os.getpid())

    await bus.serve("resize", resize, queue="resize")
    await bus.serve("echo", lambda msg: msg.data, queue="echo")
    await bus.serve("pid", lambda msg: os.getpid(), queue="pid")


def worker_env() -> dict[str, str]:
    """Our environment with the repository root on PYTHONPATH (workers import `examples.*`)."""
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def requests_during(
    bus: ipcbus.Bus, subject: str, data: object, change: Awaitable[None], askers: int = 4
) -> tuple[int, int]:
    """Keep ``askers`` requesters asking ``subject`` while ``change`` runs
    (a recycle, a resize): return how many requests were answered and failed."""
    answered = failed = 0
    done = asyncio.Event()

    async def ask() -> None:
        nonlocal answered, failed
        while not done.is_set():
            try:
                await bus.request(subject, data, timeout=10)
                answered += 1
            except ipcbus.IpcBusError:
                failed += 1

    tasks = [asyncio.create_task(ask()) for _ in range(askers)]
    try:
        await change
    finally:
        done.set()
        await asyncio.gather(*tasks)
    return answered, failed
