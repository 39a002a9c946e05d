"""SysV message-queue benchmarks: raw ``sysv_ipc`` baselines and the ipcbus SysV link.

Run ``python -m ipcbus.bench.sysv_raw`` for a small table (``--quick`` for
fewer messages, ``--repeat N`` for the best of N runs per row, default 3).
Every function measures across two processes: this one and a child
started with ``python -m ipcbus.bench.sysv_raw peer ...``, and returns a
dict of metrics so :mod:`ipcbus.bench.workloads` can plug it in (``w1`` and
``w2`` are the raw rows it looks for).

* :func:`w2` — raw ping-pong: ``msgsnd`` type 1, the child answers type 2;
  ``p50_us``, ``p99_us``, ``req_s``.
* :func:`w1` — raw one-way stream of ``size``-byte messages (one message per
  ``msgsnd``); ``msgs_s``, ``mb_s``.  The child stamps the arrival of the
  last message with ``CLOCK_MONOTONIC`` (shared by all processes).
* :func:`link_w2` — the same ping-pong through a :class:`SysvAcceptor` link
  (this process is the hub side, the child a :func:`connect_sysv` client
  that echoes).
* :func:`link_w1` — ``count`` frames one way through the link, hub to
  client (``direction="down"``, the default) or client to hub (``"up"``,
  credit-controlled).

``pinned=True`` pins this process and its children to one CPU (the
children inherit the mask); these VMs have 2 vCPUs and waking a process on
the other one costs ~20 us, so report both.

On a shared host, run it in a private IPC namespace (``unshare --ipc python
-m ipcbus.bench.sysv_raw``, as root): no other process can see or remove its
queues, and ``kernel.msgmnb`` can be raised there without touching the host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import sysv_ipc

__all__ = ["link_w1", "link_w2", "w1", "w2"]

Metrics = dict[str, float]
T = TypeVar("T")


def now_ns() -> int:
    """``CLOCK_MONOTONIC`` in nanoseconds (the same clock in every process)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _quantile(ordered: Sequence[int], q: float) -> float:
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[idx])


def _latency(samples: Sequence[int]) -> Metrics:
    ordered = sorted(samples)
    total = sum(ordered)
    return {
        "p50_us": _quantile(ordered, 0.5) / 1e3,
        "p99_us": _quantile(ordered, 0.99) / 1e3,
        "mean_us": total / len(ordered) / 1e3,
        "req_s": len(ordered) / (total / 1e9),
    }


def _stream(count: int, size: int, t0: int, t1: int) -> Metrics:
    secs = max(t1 - t0, 1) / 1e9
    return {"msgs_s": count / secs, "mb_s": count * size / secs / 1e6, "secs": secs}


@contextlib.contextmanager
def _pinned(pinned: bool) -> Iterator[None]:
    if not pinned:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class _Peer:
    """A child ``python -m ipcbus.bench.sysv_raw peer <mode> <json>``; one line per event."""

    def __init__(self, mode: str, args: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ipcbus.bench.sysv_raw", "peer", mode, json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def expect(self, tag: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"benchmark peer exited before {tag!r} (code {self.proc.wait()})")
            if line.startswith(tag + " "):
                return line[len(tag) + 1 :].strip()

    async def aexpect(self, tag: str) -> str:
        return await asyncio.to_thread(self.expect, tag)

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def _msgmax() -> int:
    try:
        return int(Path("/proc/sys/kernel/msgmax").read_text())
    except (OSError, ValueError):
        return 8192


# -- raw sysv_ipc --------------------------------------------------------------


def w2(size: int = 64, count: int = 10_000, warmup: int = 200, pinned: bool = False) -> Metrics:
    """Raw ``sysv_ipc`` ping-pong between two processes: p50/p99 round trip in microseconds."""
    with _pinned(pinned):
        q = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=_msgmax())
        peer = _Peer("raw-echo", {"key": q.key, "count": count + warmup})
        try:
            payload = b"p" * size
            send, receive = q.send, q.receive
            for _ in range(warmup):
                send(payload, True, 1)
                receive(True, 2)
            samples = []
            for _ in range(count):
                t0 = time.perf_counter_ns()
                send(payload, True, 1)
                receive(True, 2)
                samples.append(time.perf_counter_ns() - t0)
            peer.proc.wait()
        finally:
            peer.close()
            q.remove()
    return _latency(samples)


def w1(size: int = 1024, count: int = 200_000, warmup: int = 1000, pinned: bool = False) -> Metrics:
    """Raw ``sysv_ipc`` one-way stream, one ``size``-byte message per ``msgsnd``: msgs/s."""
    size = min(size, _msgmax())
    with _pinned(pinned):
        q = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=_msgmax())
        peer = _Peer("raw-sink", {"key": q.key, "count": count + warmup, "warmup": warmup})
        try:
            payload = b"s" * size
            send = q.send
            peer.expect("READY")
            for _ in range(warmup):
                send(payload, True, 1)
            peer.expect("WARM")
            t0 = now_ns()
            for _ in range(count):
                send(payload, True, 1)
            t1 = int(peer.expect("DONE"))
            peer.proc.wait()
        finally:
            peer.close()
            q.remove()
    return _stream(count, size, t0, t1)


# -- through the ipcbus link -------------------------------------------------------


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    return uvloop.run(coro_fn())  # type: ignore[arg-type]


async def _hub_and_client(busdir: Path, mode: str, args: dict[str, Any]) -> tuple[Any, Any, _Peer]:
    from ..transports.door import Knock
    from ..transports.sysv import SysvAcceptor

    acc = SysvAcceptor(busdir)
    await acc.__aenter__()
    peer = _Peer(mode, {"busdir": str(busdir), "hub_pid": os.getpid(), **args})
    try:
        knock = msgspec.json.decode(await peer.aexpect("KNOCK"), type=Knock)
        link = await acc.accept(knock)
    except BaseException:
        peer.close()
        await acc.aclose()
        raise
    return acc, link, peer


def link_w2(size: int = 64, count: int = 10_000, warmup: int = 200, pinned: bool = False) -> Metrics:
    """Ping-pong through an ipcbus SysV link (hub side here, echoing client in a child)."""

    async def main() -> Metrics:
        with tempfile.TemporaryDirectory(prefix="ipcbus-bench-") as d:
            acc, link, peer = await _hub_and_client(Path(d) / "bus", "link-echo", {})
            try:
                payload = b"p" * size
                for _ in range(warmup):
                    await link.send(payload)
                    await link.recv()
                samples = []
                for _ in range(count):
                    t0 = time.perf_counter_ns()
                    await link.send(payload)
                    await link.recv()
                    samples.append(time.perf_counter_ns() - t0)
                await link.aclose()
                await asyncio.to_thread(peer.proc.wait)
            finally:
                peer.close()
                await acc.aclose()
            return _latency(samples)

    with _pinned(pinned):
        return _run(main)


def link_w1(
    size: int = 1024,
    count: int = 200_000,
    warmup: int = 1000,
    pinned: bool = False,
    direction: str = "down",
) -> Metrics:
    """``count`` frames one way through an ipcbus SysV link: msgs/s.

    ``direction="down"``: hub (here) to client (child); ``"up"``: client to hub.
    """
    if direction not in ("down", "up"):
        raise ValueError("direction is 'down' (hub to client) or 'up' (client to hub)")

    async def main() -> Metrics:
        with tempfile.TemporaryDirectory(prefix="ipcbus-bench-") as d:
            mode = "link-sink" if direction == "down" else "link-source"
            acc, link, peer = await _hub_and_client(
                Path(d) / "bus", mode, {"count": count, "warmup": warmup, "size": size}
            )
            try:
                if direction == "down":
                    payload = b"s" * size
                    for _ in range(warmup):
                        await link.send(payload)
                    await peer.aexpect("WARM")
                    t0 = now_ns()
                    for _ in range(count):
                        await link.send(payload)
                    t1 = int(await peer.aexpect("DONE"))
                else:
                    for _ in range(warmup):
                        await link.recv()
                    peer.tell("GO")
                    t0 = int(await peer.aexpect("START"))
                    for _ in range(count):
                        await link.recv()
                    t1 = now_ns()
                await link.aclose()
                await asyncio.to_thread(peer.proc.wait)
            finally:
                peer.close()
                await acc.aclose()
            return _stream(count, size, t0, t1)

    with _pinned(pinned):
        return _run(main)


# -- the peers (child processes) ----------------------------------------------------


def _peer_raw_echo(args: dict[str, Any]) -> None:
    q = sysv_ipc.MessageQueue(args["key"], max_message_size=_msgmax())
    receive, send = q.receive, q.send
    for _ in range(args["count"]):
        data, _t = receive(True, 1)
        send(data, True, 2)


def _peer_raw_sink(args: dict[str, Any]) -> None:
    q = sysv_ipc.MessageQueue(args["key"], max_message_size=_msgmax())
    receive = q.receive
    print("READY x", flush=True)
    for _ in range(args["warmup"]):
        receive(True, 1)
    print("WARM x", flush=True)
    for _ in range(args["count"] - args["warmup"]):
        receive(True, 1)
    print("DONE", now_ns(), flush=True)


async def _peer_link(mode: str, args: dict[str, Any]) -> None:
    from ..errors import ConnectionClosed, EndOfStream
    from ..transports.door import Knock
    from ..transports.sysv import connect_sysv

    def knock(k: Knock) -> None:
        print("KNOCK", msgspec.json.encode(k).decode(), flush=True)

    link = await connect_sysv(Path(args["busdir"]), hub_pid=args["hub_pid"], send_knock=knock)
    try:
        if mode == "link-echo":
            with contextlib.suppress(EndOfStream):
                while True:
                    frame = await link.recv()
                    assert isinstance(frame, bytes)  # decode_large is never set here
                    await link.send(frame)
        elif mode == "link-sink":
            for _ in range(args["warmup"]):
                await link.recv()
            print("WARM x", flush=True)
            for _ in range(args["count"]):
                await link.recv()
            print("DONE", now_ns(), flush=True)
        elif mode == "link-source":
            payload = b"s" * args["size"]
            for _ in range(args["warmup"]):
                await link.send(payload)
            await asyncio.to_thread(sys.stdin.readline)  # "GO"
            print("START", now_ns(), flush=True)
            for _ in range(args["count"]):
                await link.send(payload)
            with contextlib.suppress(ConnectionClosed):  # the hub may close first
                await link.drain()
                await link.recv()
    finally:
        await link.aclose()


def _peer(mode: str, args: dict[str, Any]) -> None:
    if mode == "raw-echo":
        _peer_raw_echo(args)
    elif mode == "raw-sink":
        _peer_raw_sink(args)
    else:
        _run(lambda: _peer_link(mode, args))


# -- the table ----------------------------------------------------------------------


def _best(
    fn: Callable[..., Metrics], repeat: int, key: str, lowest: bool, *args: Any, **kw: Any
) -> Metrics:
    """Run ``fn(*args, **kw)`` ``repeat`` times; keep the best run (other load only slows us)."""
    runs = [fn(*args, **kw) for _ in range(repeat)]
    return (min if lowest else max)(runs, key=lambda m: m[key])


def _table(quick: bool, repeat: int) -> None:
    n_lat = 3000 if quick else 10_000
    n_stream = 50_000 if quick else 200_000

    def show(name: str, m: Metrics, kind: str, base: Metrics | None = None) -> None:
        if kind == "lat":
            ratio = f"  ({m['p50_us'] / base['p50_us']:.2f}x raw p50)" if base else ""
            text = f"p50 {m['p50_us']:7.1f} us  p99 {m['p99_us']:7.1f} us"
        else:
            ratio = f"  ({m['msgs_s'] / base['msgs_s']:.2f}x raw 1 KiB)" if base else ""
            text = f"{m['msgs_s']:10,.0f} msgs/s  {m['mb_s']:8.1f} MB/s"
        print(f"{name:<34} {text}{ratio}", flush=True)

    print(f"best of {repeat} runs per row; {os.cpu_count()} CPUs", flush=True)
    for pinned in (False, True):
        tag = " pinned" if pinned else ""
        raw = _best(w2, repeat, "p50_us", True, 64, n_lat, pinned=pinned)
        show(f"W2 raw sysv_ipc 64 B{tag}", raw, "lat")
        link = _best(link_w2, repeat, "p50_us", True, 64, n_lat, pinned=pinned)
        show(f"W2 ipcbus sysv link 64 B{tag}", link, "lat", raw)
    raw_1k: Metrics | None = None
    for size in (64, 1024, 8192):
        m = _best(w1, repeat, "msgs_s", False, size, n_stream)
        if size == 1024:
            raw_1k = m
        show(f"W1 raw sysv_ipc {size} B", m, "stream")
    for direction in ("down", "up"):
        for size in (64, 1024, 65536):
            n = n_stream if size < 65536 else n_stream // 20
            m = _best(link_w1, repeat, "msgs_s", False, size, n, direction=direction)
            show(f"W1 link {direction} {size} B", m, "stream", raw_1k if size == 1024 else None)


def main(argv: list[str] | None = None) -> None:
    """``python -m ipcbus.bench.sysv_raw [--quick]`` prints the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        _peer(argv[1], json.loads(argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer messages")
    p.add_argument("--repeat", type=int, default=3, help="runs per row, best kept (default 3)")
    ns = p.parse_args(argv)
    _table(ns.quick, max(1, ns.repeat))


if __name__ == "__main__":
    main()
