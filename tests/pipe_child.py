"""Child side of the pipe-rule tests: ``python pipe_child.py RFD WFD MODE``.

It wraps its inherited pipe ends in a :class:`~ipcbus.transports.pipe.PipeLink`,
prints ``ready`` on stdout and then, in mode ``commands``, obeys frames sent by
the parent (one command per frame):

* ``send N SIZE``    send N numbered frames of SIZE bytes;
* ``verify N SIZE``  receive N numbered frames, check each, answer ``ok N``;
* ``stall``          print ``stalled`` and block the whole process on stdin
                     (nothing reads the link) until the parent writes a line;
* ``wait-send``      print ``waiting``, block on stdin, then send ``data``;
* ``close``          close the link (flushing) and exit 0;
* ``exit``           exit at once, without closing anything.

In mode ``writer`` it sends frames until the link fails, then prints the
exception's type name and exits 0: a writer whose reader is gone must get
``ConnectionClosed``, not die of SIGPIPE.
"""

from __future__ import annotations

import asyncio
import os
import sys

from ipcbus.errors import ConnectionClosed, EndOfStream
from ipcbus.transports.pipe import PipeLink


def numbered(i: int, size: int) -> bytes:
    """Frame ``i`` of ``size`` bytes (size >= 8): its number, then a fill derived from it."""
    return i.to_bytes(8, "big") + bytes([i % 251]) * (size - 8)


def say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


async def commands(link: PipeLink) -> int:
    while True:
        try:
            cmd = (await link.recv()).decode().split()
        except EndOfStream:
            return 0
        op = cmd[0]
        if op == "send":
            n, size = int(cmd[1]), int(cmd[2])
            for i in range(n):
                await link.send(numbered(i, size))
        elif op == "verify":
            n, size = int(cmd[1]), int(cmd[2])
            for i in range(n):
                got = await link.recv()
                if got != numbered(i, size):
                    await link.send(f"bad {i} {len(got)}".encode())
                    break
            else:
                await link.send(f"ok {n}".encode())
        elif op in ("stall", "wait-send"):
            say("stalled" if op == "stall" else "waiting")
            sys.stdin.readline()  # deliberately blocks this whole process
            if op == "wait-send":
                await link.send(b"data")
        elif op == "close":
            await link.aclose()
            return 0
        elif op == "exit":
            os._exit(0)
        else:
            say(f"unknown {op}")
            return 2


async def writer(link: PipeLink) -> int:
    i = 0
    try:
        while True:
            await link.send(numbered(i, 4096))
            i += 1
    except ConnectionClosed as exc:
        say(type(exc).__name__)
        return 0


async def main(rfd: int, wfd: int, mode: str) -> int:
    link = PipeLink(rfd, wfd)
    say("ready")
    try:
        return await (commands(link) if mode == "commands" else writer(link))
    finally:
        await link.aclose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
