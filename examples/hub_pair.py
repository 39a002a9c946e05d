"""A hub in this process and two unrelated client processes talking through it.

    python examples/hub_pair.py [fifo|sysv|shm]

Starts `ipcbus.Hub("examples")` embedded here, then runs
examples/hub_responder.py and examples/hub_requester.py as separate
processes (not children of each other: they meet only on the bus).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import ipcbus

HERE = Path(__file__).resolve().parent


async def main(transport: str) -> None:
    async with ipcbus.Hub("examples") as hub:
        ready = await hub.bus.subscribe("examples.ready")
        args = ["--bus", "examples", "--transport", transport, "--count", "3"]
        responder = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "hub_responder.py"), *args
        )
        await ready.next(timeout=20)  # the responder's service is known to the hub
        requester = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "hub_requester.py"), *args
        )
        codes = [await requester.wait(), await responder.wait()]
        print(f"hub: {hub.stats()['accepted']} clients connected over {transport}; exit codes {codes}")
        if any(codes):
            raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "fifo"))
