"""Child-process helper for the FIFO transport and bus-directory tests.

Run as ``python -m tests.fifo_peer COMMAND ...`` from the repository root.
Every command reports progress as lines on stdout so the parent can order
events without sleeping.

Commands:

``echo BUSDIR HUB_PID [--go FD] [--as UID:GID]``
    Connect over FIFOs (with ``--go``: print ``ready``, then wait for EOF on
    that fd, so many children can knock at the same instant), send ``b"pid <pid>"``, then echo every frame
    back until end of stream.  Prints ``linked`` once connected.  With
    ``--as``, drops to that uid/gid after importing everything (the test
    suite runs as root); a refused connection prints ``refused <error>``
    and exits 3.
``swarm N BUSDIR HUB_PID``
    Import once, fork ``N`` processes (before any event loop exists: forking
    is safe here), hold them at a barrier until all exist, then release them
    together; each runs ``echo``.  Prints ``done <failures>`` after reaping
    them and exits non-zero if any failed.  Run it in its own session so a
    test can kill the whole group.
``connect-exit BUSDIR HUB_PID``
    Connect, print ``linked``, exit at once (closing both FIFOs).
``knock-only BUSDIR``
    Make a valid FIFO pair and knock, but never open them; print ``knocked``
    and wait for stdin to close.
``hold-lock NAME ROOT``
    Become the bus's hub (``lock_hub``), create its door FIFO, print
    ``locked``, then wait for stdin to close.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

from ipcbus.busdir import BusDir, client_fifo_names
from ipcbus.errors import EndOfStream, IpcBusError
from ipcbus.frames import PROTOCOL_VERSION
from ipcbus.transports.door import Knock, send_knock
from ipcbus.transports.fifo import connect_fifo


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def drop_to(spec: str) -> None:
    uid, gid = (int(x) for x in spec.split(":"))
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


async def echo(busdir: Path, hub_pid: int, go: int | None, exit_at_once: bool) -> int:
    if go is not None:
        say("ready")
        os.read(go, 1)  # blocks until the parent closes the write end: all start together
        os.close(go)
    try:
        link = await connect_fifo(busdir, hub_pid=hub_pid, name=f"peer-{os.getpid()}")
    except IpcBusError as exc:
        say(f"refused {type(exc).__name__}: {exc}")
        return 3
    say("linked")
    try:
        await link.send(f"pid {os.getpid()}".encode())
        await link.drain()
        if exit_at_once:
            return 0
        while True:
            try:
                frame = await link.recv()
            except EndOfStream:
                return 0
            await link.send(frame)
    finally:
        await link.aclose()


def swarm(n: int, busdir: Path, hub_pid: int) -> int:
    go_r, go_w = os.pipe()
    kids: list[int] = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked child
            os.close(go_w)
            os.read(go_r, 1)  # EOF once the swarm has forked everyone
            os.close(go_r)
            code = asyncio.run(echo(busdir, hub_pid, None, False))
            sys.stdout.flush()
            os._exit(code)
        kids.append(pid)
    os.close(go_r)
    say("ready")
    os.close(go_w)  # release all N at once
    failures = 0
    for pid in kids:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failures += 1
    say(f"done {failures}")
    return 1 if failures else 0


def knock_only(busdir: Path) -> int:
    pid = os.getpid()
    c2h, h2c = client_fifo_names(pid, secrets.token_hex(8))
    for n in (c2h, h2c):
        os.mkfifo(busdir / n, 0o600)
    send_knock(
        busdir,
        Knock(
            version=PROTOCOL_VERSION,
            transport="fifo",
            pid=pid,
            uid=os.geteuid(),
            params={"c2h": str(busdir / c2h), "h2c": str(busdir / h2c)},
        ),
    )
    say("knocked")
    sys.stdin.read()
    return 0


def hold_lock(name: str, root: Path) -> int:
    bd = BusDir(name, root=root).ensure()
    bd.lock_hub()
    os.mkfifo(bd.door, 0o600)
    fd = os.open(bd.door, os.O_RDWR | os.O_NONBLOCK)  # read the door like a hub would
    say("locked")
    sys.stdin.read()
    os.close(fd)
    return 0


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd in ("echo", "connect-exit"):
        busdir, hub_pid = Path(args[0]), int(args[1])
        go: int | None = None
        rest = args[2:]
        while rest:
            opt, val, *rest = rest
            if opt == "--go":
                go = int(val)
            elif opt == "--as":
                drop_to(val)
        return asyncio.run(echo(busdir, hub_pid, go, cmd == "connect-exit"))
    if cmd == "swarm":
        return swarm(int(args[0]), Path(args[1]), int(args[2]))
    if cmd == "knock-only":
        return knock_only(Path(args[0]))
    if cmd == "hold-lock":
        return hold_lock(args[0], Path(args[1]))
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
