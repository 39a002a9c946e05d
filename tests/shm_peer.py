"""Child process for tests/test_shm.py: the far end of a shared-memory link.

Usage: ``python tests/shm_peer.py MODE JSON`` where JSON carries the link
params and the parent's pid.  Every mode prints one line when it reaches the
point the parent waits for (the parent orders events by reading it; nobody
sleeps).

Modes:
  echo      attach, print "attached", send back every frame until end of stream
  stall     attach, print "attached", then never read (until killed)
  sink      attach, print "attached", read until end of stream, print "received N"
  midframe  attach, send two small frames, start a frame far larger than the
            ring, print "blocked" once it is stuck in the middle of it (until killed)
  client    connect_shm() to the "hub" (the parent) through the bus door, then echo
  create    create the link itself, print its params as JSON, echo once attached
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

from ipcbus.errors import ConnectionClosed
from ipcbus.transports.shm import ShmLink, connect_shm


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def echo(link: ShmLink) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await link.send(await link.recv())


async def main(mode: str, spec: dict[str, object]) -> None:
    if mode == "create":
        link, made = ShmLink.create(None, ring_size=1 << 20)
        say(json.dumps(made))
        await link.wait_attached(peer_pid=int(str(spec["peer_pid"])))
    elif mode == "client":
        link = await connect_shm(
            Path(str(spec["busdir"])),
            hub_pid=int(str(spec["hub_pid"])),
            name="peer",
            ring_size=int(str(spec.get("ring_size", 1 << 20))),
        )
    else:
        params = spec["params"]
        assert isinstance(params, dict)
        link = await ShmLink.attach(params, peer_pid=int(str(spec["peer_pid"])))
    try:
        if mode in ("echo", "client", "create"):
            say("attached")
            await echo(link)
        elif mode == "stall":
            say("attached")
            await asyncio.Event().wait()
        elif mode == "sink":  # a one-way stream: nothing goes back that could wake the writer
            say("attached")
            n = 0
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await link.recv()
                    n += 1
            say(f"received {n}")
        elif mode == "midframe":
            await link.send(b"first")
            await link.send(b"second")
            link.send_nowait(b"\xab" * int(str(spec["big"])))
            if link.pending_out:
                say("blocked")
            else:  # pragma: no cover - the ring was larger than the frame
                say("not blocked")
            await asyncio.Event().wait()
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        await link.aclose()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
