"""One of two unrelated processes talking through a hub: this one serves `greet`.

    python examples/hub_responder.py --bus examples --transport fifo --count 3

It connects to the hub of the bus (start one with `ipcbus hub examples`, or run
examples/hub_pair.py, which does everything), answers `greet` requests and
counts `events.>` messages, then exits after --count requests.

This script is run by examples/hub_pair.py (it needs a hub on the bus).
"""

from __future__ import annotations

import argparse
import asyncio

import ipcbus


async def main(bus_name: str, transport: ipcbus.HubTransport, count: int) -> None:
    async with ipcbus.connect(bus_name, transport=transport, name="responder") as bus:
        done = asyncio.Event()
        served = 0
        events = await bus.subscribe("events.>")

        def greet(msg: ipcbus.Msg) -> str:
            nonlocal served
            served += 1
            if served >= count:
                done.set()
            return f"hello, {msg.decode(str)} (from the {transport} responder)"

        await bus.serve("greet", greet)
        await bus.flush()
        await bus.publish("examples.ready", "responder")
        await done.wait()
        await bus.drain()
        print(f"responder: served {served} requests, saw {events.pending} events")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bus", default="examples")
    p.add_argument("--transport", default="fifo", choices=["fifo", "sysv", "shm"])
    p.add_argument("--count", type=int, default=3)
    a = p.parse_args()
    asyncio.run(main(a.bus, a.transport, a.count))
