"""Typed request/reply over a worker pool, and how requests fail.

Two workers serve ``math.divide`` in one queue group. The handler's parameter
is annotated with a ``msgspec.Struct``, so each request arrives decoded and
validated; the returned ``Struct`` is the reply. The parent then shows each
way a request can fail:

* ``NoResponders``: nobody serves the subject (raised at once, not after the timeout);
* ``RemoteError``: the handler raised (here ``ZeroDivisionError``), or the
  request did not validate into the handler's type (``ValidationError``);
* ``RequestTimeout``: no reply in time (it is also a ``TimeoutError``).

Run it from the repository root::

    python examples/request_reply.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import msgspec

import ipcbus

ROOT = Path(__file__).resolve().parent.parent


class Divide(msgspec.Struct):
    """A request: numerator / denominator."""

    numerator: float
    denominator: float


class Quotient(msgspec.Struct):
    """The reply, with the pid of the worker that computed it."""

    value: float
    worker: int


async def setup(bus: ipcbus.Bus) -> None:
    """Runs in each worker: serve `math.divide` and a deliberately slow `slow`."""

    def divide(req: Divide) -> Quotient:
        # Dividing by zero raises ZeroDivisionError here; the requester gets RemoteError.
        return Quotient(req.numerator / req.denominator, os.getpid())

    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)  # stands for real work that takes a while
        return "done"

    await bus.serve("math.divide", divide, queue="math")
    await bus.serve("slow", slow, queue="slow")


def worker_env() -> dict[str, str]:
    """Our environment with the repository root on PYTHONPATH (workers import `examples.*`)."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def main() -> int:
    """Make one successful request and four failing ones; check each outcome."""
    outcomes: list[bool] = []
    async with ipcbus.WorkerPool("examples.request_reply:setup", workers=2, env=worker_env()) as pool:
        bus = pool.bus

        # 1. A typed request and a typed reply.
        reply = await bus.request("math.divide", Divide(7, 2), timeout=5)
        q = reply.decode(Quotient)
        print(f"7 / 2 = {q.value} (computed by worker {q.worker})")
        outcomes.append(q.value == 3.5)

        # 2. The handler raises: RemoteError carries the type name and message.
        try:
            await bus.request("math.divide", Divide(1, 0), timeout=5)
            outcomes.append(False)
        except ipcbus.RemoteError as exc:
            print(f"1 / 0 -> RemoteError: type_name={exc.type_name!r} message={exc.message!r}")
            outcomes.append(exc.type_name == "ZeroDivisionError")

        # 3. The request does not validate into Divide: also RemoteError.
        try:
            await bus.request("math.divide", {"numerator": "seven"}, timeout=5)
            outcomes.append(False)
        except ipcbus.RemoteError as exc:
            print(f"bad request -> RemoteError: {exc.type_name}: {exc.message}")
            outcomes.append(exc.type_name == "ValidationError")

        # 4. Nobody serves the subject: NoResponders, at once.
        start = time.monotonic()
        try:
            await bus.request("math.sqrt", 2.0, timeout=5)
            outcomes.append(False)
        except ipcbus.NoResponders as exc:
            elapsed_ms = (time.monotonic() - start) * 1000
            print(f"math.sqrt -> NoResponders after {elapsed_ms:.1f} ms (timeout was 5 s): {exc}")
            outcomes.append(True)

        # 5. A reply that takes longer than the timeout: RequestTimeout, a TimeoutError.
        try:
            await bus.request("slow", 0.5, timeout=0.1)
            outcomes.append(False)
        except TimeoutError as exc:
            print(f"slow -> {type(exc).__name__}: {exc}")
            outcomes.append(isinstance(exc, ipcbus.RequestTimeout))
        # Leaving the block drains the pool: requests still in flight finish first.
        # The slow one is not among them (its requester gave up at the timeout),
        # so its worker is stopped mid-handler.

    ok = all(outcomes)
    print("all outcomes as expected:", "yes" if ok else f"NO {outcomes}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
