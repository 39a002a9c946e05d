"""The other of two unrelated processes talking through a hub: this one asks.

    python examples/hub_requester.py --bus examples --transport sysv --count 3

It publishes a few events and sends --count `greet` requests to whoever serves
them on the bus, printing each reply.

This script is run by examples/hub_pair.py (it needs a hub on the bus).
"""

from __future__ import annotations

import argparse
import asyncio

import ipcbus


async def main(bus_name: str, transport: ipcbus.HubTransport, count: int) -> None:
    async with ipcbus.connect(bus_name, transport=transport, name="requester") as bus:
        for i in range(5):
            await bus.publish(f"events.tick.{i}", {"tick": i})
        for i in range(count):
            reply = await bus.request("greet", f"request {i}", timeout=5)
            print(f"requester: {reply.decode(str)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bus", default="examples")
    p.add_argument("--transport", default="fifo", choices=["fifo", "sysv", "shm"])
    p.add_argument("--count", type=int, default=3)
    a = p.parse_args()
    asyncio.run(main(a.bus, a.transport, a.count))
