"""A scriptable bus client in a child process, and the parent-side handle to drive it.

Child side: ``python -m tests.hub_client BUS [--transport T] [--reconnect]
[--autostart] [--wait-go] [--name NAME]`` (run from the repository root).  It
connects with :func:`ipcbus.connect`, prints one JSON object per line on
stdout, and takes one JSON command per line on stdin (processed in order;
end of stdin means ``quit``).  Every command answers
``{"ev": "ok", "op": OP, ...}`` or ``{"ev": "error", "op": OP, "type":
exception class name, "msg": text}``.  Events that happen on their own are
printed as they happen:

``{"ev": "connected", "pid", "hub_pid"}``
    after connecting (``{"ev": "error", "op": "connect", ...}`` and exit 3 if not);
``{"ev": "msg", "sub", "subject", "data"}``
    a message for a subscription made with ``"print": true``;
``{"ev": "slow", "sub", "dropped"}``
    a subscription raised :class:`~ipcbus.errors.SlowConsumer`;
``{"ev": "request", "subject", "data"}``
    a ``block`` service took a request (and will never answer it);
``{"ev": "closed", "reason", "notices"}``
    the link to the hub closed (its close reason and the notice codes received).

Commands (``op`` plus arguments):

``sub`` ``name subject [queue] [print] [max_pending]``
    subscribe; a reader task counts messages per ``name``;
``serve`` ``subject [queue] [mode]``
    serve requests: ``echo`` (default), ``pid`` (answers this pid), ``raise``
    (raises ``ValueError``), ``block`` (never answers);
``pub`` ``subject [data] [count] [size]``
    publish ``count`` times (``size`` bytes of ``x`` instead of ``data``), then flush;
``req`` ``subject [data] [timeout]``
    request; answers ``ok`` with the decoded ``data``, or ``error``;
``count`` ``name``
    flush, then the number of messages delivered to and read from ``name``;
``wait_count`` ``name n``
    wait until ``name`` has read at least ``n`` messages;
``flush``, ``wait_connected``, ``hub_stats`` (the hub's ``$SYS.stats``),
``garbage`` ``hex``
    send these bytes as one frame on the link to the hub (a protocol violation);
``raw`` ``hex``
    write these bytes straight into the FIFO to the hub, bypassing the framing;
``quit``
    close the bus and exit 0.

The parent side is :class:`Peer` (spawn with :func:`spawn`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# -- child side ---------------------------------------------------------------------


def _say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, default=repr) + "\n")
    sys.stdout.flush()


def _decode(data: bytes) -> Any:
    import msgspec

    try:
        return msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")


class _Client:
    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.received: dict[str, int] = {}
        self.slow: dict[str, int] = {}
        self.subs: dict[str, Any] = {}
        self.changed = asyncio.Event()
        self.forever = asyncio.Event()

    async def stop(self) -> None:
        """End what the commands started (subclasses add their own tasks)."""
        self.forever.set()

    async def _read(self, name: str, sub: Any, show: bool) -> None:
        from ipcbus.errors import SlowConsumer

        while True:
            try:
                m = await sub.next()
            except SlowConsumer as exc:
                self.slow[name] = self.slow.get(name, 0) + exc.dropped
                _say(ev="slow", sub=name, dropped=exc.dropped)
                continue
            except Exception:
                return
            self.received[name] += 1
            self.changed.set()
            if show:
                _say(ev="msg", sub=name, subject=m.subject, data=_decode(m.data))

    def _handler(self, mode: str) -> Callable[[Any], Any]:
        if mode == "pid":
            return lambda m: os.getpid()
        if mode == "raise":

            def boom(m: Any) -> Any:
                raise ValueError(f"refusing {_decode(m.data)!r}")

            return boom
        if mode == "block":

            async def block(m: Any) -> Any:
                _say(ev="request", subject=m.subject, data=_decode(m.data))
                await self.forever.wait()

            return block
        return lambda m: m.data

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        bus = self.bus
        if op == "sub":
            name = cmd["name"]
            sub = await bus.subscribe(
                cmd["subject"],
                queue=cmd.get("queue"),
                max_pending=cmd.get("max_pending", 65536),
            )
            self.subs[name] = sub
            self.received[name] = 0
            bus.node.task_group.start_soon(self._read, name, sub, bool(cmd.get("print")))
            await bus.flush()
            return {}
        if op == "serve":
            await bus.serve(cmd["subject"], self._handler(cmd.get("mode", "echo")), queue=cmd.get("queue"))
            await bus.flush()
            return {}
        if op == "pub":
            payload: Any = b"x" * cmd["size"] if "size" in cmd else cmd.get("data")
            for _ in range(cmd.get("count", 1)):
                await bus.publish(cmd["subject"], payload)
            await bus.flush()
            return {}
        if op == "req":
            rep = await bus.request(cmd["subject"], cmd.get("data"), timeout=cmd.get("timeout", 5.0))
            return {"data": _decode(rep.data)}
        if op == "count":
            await bus.flush()
            name = cmd["name"]
            sid = self.subs[name]._core.sid
            delivered = next(s["delivered"] for s in bus.stats()["subscriptions"] if s["sid"] == sid)
            return {"delivered": delivered, "received": self.received[name], "slow": self.slow.get(name, 0)}
        if op == "wait_count":
            while self.received[cmd["name"]] < cmd["n"]:
                self.changed.clear()
                await self.changed.wait()
            return {"received": self.received[cmd["name"]], "slow": self.slow.get(cmd["name"], 0)}
        if op == "flush":
            await bus.flush()
            return {}
        if op == "wait_connected":
            await bus.wait_connected(timeout=cmd.get("timeout", 10.0))
            return {"reconnects": bus.reconnects}
        if op == "hub_stats":
            rep = await bus.request("$SYS.stats", timeout=5.0)
            stats = rep.decode()
            return {"hub_pid": stats["hub_pid"], "links": len(stats["links"])}
        if op == "garbage":
            bus.hub_link.link.send_nowait(bytes.fromhex(cmd["hex"]))
            await bus.hub_link.link.drain()
            return {}
        if op == "raw":
            # Straight into the FIFO, bypassing framing (a lying length prefix...).
            os.write(bus.hub_link.link._wfd, bytes.fromhex(cmd["hex"]))
            return {}
        raise ValueError(f"unknown op {op!r}")


async def _child(
    args: argparse.Namespace, client_cls: type[_Client] = _Client, default_name: str = "hub-client"
) -> int:
    """Connect, then run JSON-line commands from stdin through ``client_cls`` until EOF or quit."""
    import ipcbus

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    if getattr(args, "wait_go", False):
        await reader.readline()  # so many children can connect at the same instant
    try:
        bus = await ipcbus.connect(
            args.bus,
            transport=args.transport,
            name=args.name or f"{default_name}-{os.getpid()}",
            autostart=getattr(args, "autostart", False),
            reconnect=args.reconnect,
        )
    except Exception as exc:
        _say(ev="error", op="connect", type=type(exc).__name__, msg=str(exc))
        return 3

    def closed(ls: Any) -> None:
        if ls is bus.hub_link:
            _say(ev="closed", reason=ls.close_reason, notices=[n.code for n in ls.notices])

    bus.node.on_link_closed.append(closed)
    client = client_cls(bus)
    try:
        _say(ev="connected", pid=os.getpid(), hub_pid=bus.busdir.hub_pid())
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                result = await client.run(cmd)
            except Exception as exc:
                _say(ev="error", op=cmd["op"], type=type(exc).__name__, msg=str(exc))
            else:
                _say(ev="ok", op=cmd["op"], **result)
    finally:
        await client.stop()
        await bus.aclose()
    return 0


def main() -> None:
    """Entry point of the child process."""
    p = argparse.ArgumentParser(prog="python -m tests.hub_client")
    p.add_argument("bus")
    p.add_argument("--transport", default="fifo")
    p.add_argument("--name", default="")
    p.add_argument("--reconnect", action="store_true")
    p.add_argument("--autostart", action="store_true")
    p.add_argument("--wait-go", action="store_true")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        sys.exit(uvloop.run(_child(args)))
    sys.exit(asyncio.run(_child(args)))


# -- parent side --------------------------------------------------------------------


class Peer:
    """A running ``tests.hub_client`` child: send commands, wait for events."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Any) -> None:
        self.proc = proc
        self.stderr = stderr
        self.pid = proc.pid
        self.backlog: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise EOFError(f"hub_client pid {self.pid} exited; stderr: {self.errors()[-2000:]}")
        return dict(json.loads(line))

    def errors(self) -> str:
        """What the child wrote on stderr so far."""
        self.stderr.seek(0)
        return str(self.stderr.read().decode(errors="replace"))

    async def expect(self, ev: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        """The next event named ``ev`` whose fields equal ``match`` (others are kept)."""

        def ok(e: dict[str, Any]) -> bool:
            return e.get("ev") == ev and all(e.get(k) == v for k, v in match.items())

        for i, e in enumerate(self.backlog):
            if ok(e):
                del self.backlog[i]
                return e
        async with asyncio.timeout(timeout):
            while True:
                e = await self._line()
                if ok(e):
                    return e
                self.backlog.append(e)

    async def send(self, op: str, **args: Any) -> None:
        """Send a command without waiting for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()

    async def answer(self, op: str, timeout: float = 15.0) -> dict[str, Any]:
        """The answer (``ok`` or ``error``) to the last ``op`` command."""

        def mine(e: dict[str, Any]) -> bool:
            return e.get("ev") in ("ok", "error") and e.get("op") == op

        for i, e in enumerate(self.backlog):
            if mine(e):
                del self.backlog[i]
                return e
        async with asyncio.timeout(timeout):
            while True:
                e = await self._line()
                if mine(e):
                    return e
                self.backlog.append(e)

    async def call(self, op: str, timeout: float = 15.0, **args: Any) -> dict[str, Any]:
        """Run a command that must succeed; return its ``ok`` answer."""
        await self.send(op, **args)
        e = await self.answer(op, timeout)
        if e["ev"] != "ok":
            raise AssertionError(f"hub_client pid {self.pid}: {op} failed: {e}")
        return e

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def quit(self, timeout: float = 10.0) -> int:
        """Ask the child to quit (end of stdin) and reap it; return its exit code."""
        self.signal(signal.SIGCONT)  # in case a test left it stopped
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.proc.wait()
        finally:
            self.stderr.close()

    async def kill(self) -> int:
        """SIGKILL (after SIGCONT, in case it is stopped) and reap."""
        self.signal(signal.SIGKILL)
        self.signal(signal.SIGCONT)
        code = await self.proc.wait()
        self.stderr.close()
        return code


async def spawn(bus: str, *args: str, connected: bool = True) -> Peer:
    """Start a ``tests.hub_client`` for ``bus``; with ``connected``, wait until it is linked."""
    # stderr goes to a file, never a pipe: a child that logs a lot must not block on it.
    err = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the Peer, closed when it is reaped
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.hub_client",
        bus,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=err,
        cwd=REPO,
    )
    peer = Peer(proc, err)
    if connected:
        try:
            peer.info = await peer.expect("connected")
        except BaseException:
            await peer.kill()
            raise
    return peer


@contextlib.asynccontextmanager
async def peers(bus: str, n: int, *args: str) -> AsyncIterator[list[Peer]]:
    """``n`` connected clients of ``bus``; every one is reaped (killed if need be) on exit."""
    started: list[Peer] = []
    try:
        for _ in range(n):
            started.append(await spawn(bus, *args))
        yield started
    finally:
        for p in started:
            await p.quit()


async def wait_gone(pid: int, timeout: float = 15.0) -> None:
    """Wait until process ``pid`` (our child or not) has exited: a pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await fut
    finally:
        loop.remove_reader(fd)
        os.close(fd)


if __name__ == "__main__":
    main()


# -- a hub child (shared by tests/test_hub.py and tests/faults) ----------------------


class HubProc:
    """``python -m ipcbus hub NAME`` as a child process (foreground)."""

    def __init__(self, proc: asyncio.subprocess.Process, err: Any) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.err = err

    def stderr(self) -> str:
        """What the hub logged so far."""
        self.err.seek(0)
        return str(self.err.read().decode(errors="replace"))

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` (if it still runs) and reap it; return its exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"hub pid {self.pid} ignored signal {sig}: {self.stderr()}") from None


async def start_hub(name: str, transports: str = "fifo", nofile: int | None = None) -> HubProc:
    """Start a hub child and wait for its "serving" line (``nofile``: its fd limit)."""
    err = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the HubProc, closed by hub_proc()
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", (limit if nofile else "") + "from ipcbus.cli import main; main()",
        "hub", name, "--transports", transports,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=REPO,
    )  # fmt: skip
    hp = HubProc(proc, err)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            line = await proc.stdout.readline()
    except BaseException:
        await hp.stop(signal.SIGKILL)
        raise
    if b"serving" not in line:
        await hp.stop(signal.SIGKILL)
        raise AssertionError(f"hub did not start: {line!r} {hp.stderr()}")
    return hp


@contextlib.asynccontextmanager
async def hub_proc(
    name: str, transports: str = "fifo", stop_signal: int = signal.SIGTERM, nofile: int | None = None
) -> AsyncIterator[HubProc]:
    """A hub child for the block; stopped with ``stop_signal`` on exit if still running."""
    hp = await start_hub(name, transports, nofile)
    try:
        yield hp
    finally:
        await hp.stop(stop_signal)
        hp.err.close()
