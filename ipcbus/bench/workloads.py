"""Benchmark workloads: the code that runs in fresh processes.

Process model
-------------
The runner (:mod:`ipcbus.bench.runner`) never measures inside its own
process.  For every single measurement it starts a *driver*::

    python -m ipcbus.bench.workloads run <workload> <impl> '<Params as JSON>'

The driver pins itself to one CPU when asked (its children inherit the
affinity mask across fork/exec, so every process of the measurement shares
that CPU), starts the *peers* it needs, measures, and prints one
:class:`Outcome` as msgspec JSON on the last line of its stdout.  Peers are
started the same way::

    python -m ipcbus.bench.workloads peer <module:function> '<JSON>'

(or with a spawn-context :mod:`multiprocessing` for the
``multiprocessing.Pipe`` baseline, whose pickling is the thing measured).
Nothing forks inside a running event loop, and no benchmark data is pickled.

A peer talks to its driver through its stdin/stdout, one line per event:
``tag {json}``.  Timestamps are ``CLOCK_MONOTONIC`` nanoseconds, a clock all
processes on the host share, so a receiving peer stamps the arrival of the
last message itself and the driver subtracts its own start stamp.

The registry
------------
:data:`DRIVERS` maps ``(workload, implementation)`` to a ``"module:function"``
string.  A driver is ``def f(p: Params) -> Metrics`` or ``async def``; it may
raise :class:`Unavailable` (the row is shown as "unavailable: <reason>").
The ipcbus rows live in this module and use only the package's public API;
the raw SysV and shared-memory rows come from :mod:`ipcbus.bench.sysv_raw` and
:mod:`ipcbus.bench.shm_raw` when those modules exist (see :func:`sysv_raw_w1`,
:func:`shm_raw_w1`): their functions are found by name and called with the
parameters they declare.

Workloads
---------
``W1``           one-way stream, parent -> child: ``msgs_s``, ``mb_s`` (``loss``)
``W2``           request/reply, one at a time: ``p50_us``, ``p99_us``, ``req_s``
``W2x``          request/reply with ``p.inflight`` (32) outstanding: ``req_s``
``W3``           fan-out, one publisher to ``p.subscribers`` (3) processes:
                 ``delivered_s``, ``loss``
``W4``           worker pool echo, ``p.count`` (20,000) requests,
                 ``p.inflight`` (64) outstanding: ``req_s``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from types import ModuleType
from typing import Any, NoReturn, TypeAlias, cast

import msgspec

__all__ = [
    "DRIVERS",
    "WORKLOADS",
    "Budget",
    "Metrics",
    "Outcome",
    "Params",
    "Peer",
    "Unavailable",
    "driver_for",
    "echo_setup",
    "fanout_metrics",
    "latency_metrics",
    "main",
    "now_ns",
    "peer_say",
    "peer_wait",
    "rate_metrics",
    "run_async",
    "run_inflight",
    "sink_setup",
    "stream_metrics",
]

Metrics: TypeAlias = dict[str, float]
"""Named figures of one measurement (``msgs_s``, ``mb_s``, ``p50_us``...)."""

WORKLOADS: dict[str, str] = {
    "W1": "one-way stream, parent -> child",
    "W2": "request/reply, sequential",
    "W2x": "request/reply, many in flight",
    "W3": "fan-out, 1 publisher -> N subscriber processes",
    "W4": "worker pool echo",
}
"""Workload keys and what each measures."""

MODULE = "ipcbus.bench.workloads"


# ---------------------------------------------------------------------------
# Parameters and results
# ---------------------------------------------------------------------------


class Params(msgspec.Struct, kw_only=True, frozen=True):
    """What one measurement runs: sent to the driver as JSON on its command line."""

    size: int = 64
    """Payload bytes per message."""
    count: int = 10_000
    """Messages (W1, W3) or requests (W2, W2x, W4) measured."""
    warmup: int = 200
    """Messages or requests sent before the clock starts (not measured)."""
    inflight: int = 1
    """Requests outstanding at once (W2x, W4)."""
    subscribers: int = 3
    """Subscriber processes (W3)."""
    workers: int = 2
    """Worker processes (W4)."""
    pinned: bool = False
    """Run every process of the measurement on one CPU."""
    duration: float = 0.0
    """If > 0: stop starting new messages/requests after this many seconds
    (``count`` is then a cap).  Rates use what was really done."""
    timeout: float = 120.0
    """Seconds any single wait may take before the measurement fails."""

    def budget(self) -> Budget:
        """A fresh :class:`Budget` for the timed loop (start it right before the loop)."""
        return Budget(self.count, self.duration, every=1 if self.size >= 4096 else 16)


class Budget:
    """At most ``count`` operations, and none started after ``duration`` seconds.

    ``for _ in budget:`` or ``while budget.take():``; ``budget.used`` is how
    many were started.  The clock is read every ``every`` operations so the
    check costs nothing measurable on small messages.
    """

    __slots__ = ("deadline", "every", "left", "used")

    def __init__(self, count: int, duration: float = 0.0, every: int = 16) -> None:
        self.left = count
        self.used = 0
        self.every = max(1, every)
        self.deadline = now_ns() + int(duration * 1e9) if duration > 0 else 0

    def take(self) -> bool:
        """Claim one more operation; False once the count or the time is used up."""
        if self.left <= 0:
            return False
        if self.deadline and self.used % self.every == 0 and now_ns() >= self.deadline:
            self.left = 0
            return False
        self.left -= 1
        self.used += 1
        return True

    def __iter__(self) -> Iterator[int]:
        while self.take():
            yield self.used


class Outcome(msgspec.Struct, omit_defaults=True):
    """One measurement's result, printed by the driver as JSON."""

    status: str
    """``"ok"``, ``"unavailable"`` (the implementation is missing) or ``"error"``."""
    metrics: dict[str, float] = {}
    reason: str = ""


class Unavailable(Exception):
    """The implementation cannot run here (module, binary or API missing)."""


# ---------------------------------------------------------------------------
# Helpers shared by drivers and peers
# ---------------------------------------------------------------------------


_TRACE = bool(os.environ.get("IPCBUS_BENCH_TRACE"))
_T0 = time.monotonic()


def trace(what: str) -> None:
    """With ``IPCBUS_BENCH_TRACE=1``: print a timestamped phase to stderr (tuning aid)."""
    if _TRACE:
        print(f"[{os.getpid()} {time.monotonic() - _T0:7.3f}] {what}", file=sys.stderr)


def now_ns() -> int:
    """``CLOCK_MONOTONIC`` in nanoseconds: one clock for every process on the host."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def stream_metrics(count: int, size: int, t0_ns: int, t1_ns: int) -> Metrics:
    """Throughput of ``count`` messages of ``size`` bytes between two stamps."""
    secs = max(t1_ns - t0_ns, 1) / 1e9
    return {"msgs_s": count / secs, "mb_s": count * size / secs / 1e6, "secs": secs}


def rate_metrics(count: int, t0_ns: int, t1_ns: int, key: str = "req_s") -> Metrics:
    """``count`` operations per second between two stamps, under ``key``."""
    secs = max(t1_ns - t0_ns, 1) / 1e9
    return {key: count / secs, "secs": secs}


def _quantile(ordered: Sequence[int], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence."""
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[idx])


def latency_metrics(samples_ns: Sequence[int]) -> Metrics:
    """p50/p99/mean round-trip time in microseconds, and the implied request rate."""
    if not samples_ns:
        raise ValueError("latency_metrics() needs at least one sample")
    ordered = sorted(samples_ns)
    total = sum(ordered)
    return {
        "p50_us": _quantile(ordered, 0.50) / 1e3,
        "p99_us": _quantile(ordered, 0.99) / 1e3,
        "mean_us": total / len(ordered) / 1e3,
        "req_s": len(ordered) / (total / 1e9),
    }


async def run_inflight(
    worker: Callable[[Budget], Coroutine[Any, Any, None]], budget: Budget, inflight: int
) -> None:
    """Run ``inflight`` copies of ``worker`` sharing one budget; fail as soon as one fails."""
    async with asyncio.TaskGroup() as tg:
        for _ in range(max(1, inflight)):
            tg.create_task(worker(budget))


def run_async(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``fn()`` on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(fn())
    return uvloop.run(fn())


def pin(pinned: bool) -> None:
    """Pin this process (and so every child it starts) to its first allowed CPU.

    Unpinned runs keep the affinity mask inherited from the runner.
    """
    if pinned and hasattr(os, "sched_setaffinity"):
        first = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {first})


@contextlib.contextmanager
def scratch_dir(prefix: str = "ipcbus-bench-") -> Iterator[str]:
    """A private (0700) temporary directory, removed on exit."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def encode(value: Any) -> bytes:
    """msgspec JSON encoding (the only serializer the harness uses)."""
    return msgspec.json.encode(value)


def decode(data: bytes | str) -> Any:
    """msgspec JSON decoding into plain Python values."""
    return msgspec.json.decode(data)


# ---------------------------------------------------------------------------
# Peers: child processes driven over their stdin/stdout
# ---------------------------------------------------------------------------


class PeerFailed(RuntimeError):
    """A peer process exited or said something unexpected."""


class Peer:
    """A peer process: ``python -m ipcbus.bench.workloads peer <target> <json>``.

    ``target`` is ``"module:function"`` inside :mod:`ipcbus.bench`; the
    function receives the decoded JSON object.  The peer inherits ``pass_fds``
    and this process's CPU affinity and process group, so the runner can kill
    a stuck measurement as a whole.
    """

    def __init__(
        self,
        target: str,
        args: dict[str, Any],
        *,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.target = target
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "peer", target, encode(args).decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
            env=env,
        )

    def expect(self, tag: str) -> dict[str, Any]:
        """Block until the peer prints ``tag {json}``; return the JSON object."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise PeerFailed(f"peer {self.target} exited (code {code}) before saying {tag!r}")
        word, _, rest = line.decode().partition(" ")
        data = cast(dict[str, Any], decode(rest) if rest.strip() else {})
        if word == "unavailable":
            raise Unavailable(str(data.get("reason", "")))
        if word == "error":
            raise PeerFailed(f"peer {self.target}: {data.get('reason', '')}")
        if word != tag:
            raise PeerFailed(f"peer {self.target} said {line.decode().strip()!r}, wanted {tag!r}")
        return data

    async def aexpect(self, tag: str, timeout: float = 120.0) -> dict[str, Any]:
        """:meth:`expect` without blocking the event loop (the read runs in a thread)."""
        return await asyncio.wait_for(asyncio.to_thread(self.expect, tag), timeout)

    def tell(self, tag: str, **data: Any) -> None:
        """Send ``tag {json}`` to the peer's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(tag.encode() + b" " + encode(data) + b"\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 10.0) -> None:
        """Close its stdin (the peer's cue to exit), wait, and kill it if it lingers."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` from a coroutine."""
        await asyncio.to_thread(self.close, timeout)


def peer_say(tag: str, **data: Any) -> None:
    """In a peer: tell the driver ``tag {json}`` (one line on stdout)."""
    out = sys.stdout.buffer
    out.write(tag.encode() + b" " + encode(data) + b"\n")
    out.flush()


def peer_wait(tag: str) -> dict[str, Any]:
    """In a peer: block until the driver sends ``tag {json}`` on stdin."""
    line = sys.stdin.buffer.readline()
    if not line:
        raise SystemExit(0)  # the driver went away: nothing left to do
    word, _, rest = line.decode().partition(" ")
    if word != tag:
        raise PeerFailed(f"driver said {line.decode().strip()!r}, wanted {tag!r}")
    return cast(dict[str, Any], decode(rest) if rest.strip() else {})


async def apeer_wait(tag: str) -> dict[str, Any]:
    """:func:`peer_wait` without blocking the event loop."""
    return await asyncio.to_thread(peer_wait, tag)


class MarkCounter:
    """Counts a stream of messages split by empty *marker* messages.

    Used by every W1/W3 sink: the sender sends ``warmup`` messages and a
    marker, then ``count`` messages and a marker.  At each marker the sink
    reports how many messages came since the previous marker and when the
    marker arrived.
    """

    __slots__ = ("dropped", "n")

    def __init__(self) -> None:
        self.n = 0
        self.dropped = 0

    def feed(self, data: bytes | memoryview) -> dict[str, int] | None:
        """Count one message; at a marker return ``{"n", "t", "dropped"}`` and reset."""
        if len(data):
            self.n += 1
            return None
        mark = {"n": self.n, "t": now_ns(), "dropped": self.dropped}
        self.n = self.dropped = 0
        return mark


async def _lifted_subscribe(bus: Any, subject: str) -> Any:
    """Subscribe with the pending limits raised (as the NATS baseline does).

    W1/W3 measure the path, not the slow-consumer policy; messages dropped
    anyway are counted and reported as ``loss``.
    """
    try:
        return await bus.subscribe(subject, max_pending=10_000_000, pending_bytes=1 << 30)
    except TypeError:
        return await bus.subscribe(subject)


async def _count_marks(
    sub: Any, marks: int, on_mark: Callable[[dict[str, int]], Awaitable[None]]
) -> None:
    """Read ``sub`` until ``marks`` markers went by; a SlowConsumer report adds to the drops.

    ``async for`` rather than ``next(timeout=)``: a timeout per message would
    be harness overhead charged to ipcbus.  (The driver has its own timeouts.)
    """
    slow: Any = getattr(_ipcbus(), "SlowConsumer", ())
    counter = MarkCounter()
    seen = 0
    while seen < marks:
        try:
            async for msg in sub:
                mark = counter.feed(msg.data)
                if mark is not None:
                    await on_mark(mark)
                    seen += 1
                    if seen == marks:
                        break
            else:
                raise RuntimeError("subscription ended before the last marker")
        except slow as exc:
            counter.dropped += int(getattr(exc, "dropped", 0))


# ---------------------------------------------------------------------------
# ipcbus rows (public API only; "not available" until the package has it)
# ---------------------------------------------------------------------------


def _ipcbus(*names: str) -> ModuleType:
    """Import ipcbus and check it has ``names``; :class:`Unavailable` otherwise."""
    try:
        import ipcbus
    except ImportError as exc:  # pragma: no cover - the package is ours
        raise Unavailable(f"ipcbus not importable: {exc}") from exc
    missing = [n for n in names if not hasattr(ipcbus, n)]
    if missing:
        raise Unavailable("not available yet: ipcbus." + ", ipcbus.".join(missing))
    return ipcbus


_BACKGROUND: set[asyncio.Task[None]] = set()


async def sink_setup(bus: Any) -> None:
    """Worker-pool setup for W1: count ``bench.stream``, report markers on ``bench.done``."""
    sub = await _lifted_subscribe(bus, "bench.stream")

    async def report(mark: dict[str, int]) -> None:
        await bus.publish("bench.done", encode(mark))

    # Two markers: the end of the warm-up, then the end of the measurement.
    task = asyncio.get_running_loop().create_task(_count_marks(sub, 2, report))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _echo_handler(msg: Any) -> Any:
    return msg.data


async def echo_setup(bus: Any) -> None:
    """Worker-pool setup for W2/W4: serve ``bench.echo`` in queue group ``echo``."""
    await bus.serve("bench.echo", _echo_handler, queue="echo")


async def _bus_stream(bus: Any, p: Params) -> Metrics:
    """W1 over a bus whose peer runs :func:`sink_setup`."""
    done = await bus.subscribe("bench.done")
    payload = b"x" * p.size
    for _ in range(p.warmup):
        await bus.publish("bench.stream", payload)
    await bus.publish("bench.stream", b"")
    await done.next(timeout=p.timeout)
    budget = p.budget()
    t0 = now_ns()
    for _ in budget:
        await bus.publish("bench.stream", payload)
    await bus.publish("bench.stream", b"")
    mark = decode((await done.next(timeout=p.timeout)).data)
    if mark["n"] + mark["dropped"] != budget.used:
        raise RuntimeError(
            f"sink counted {mark['n']} messages and {mark['dropped']} drops, "
            f"{budget.used} were sent"
        )
    m = stream_metrics(mark["n"], p.size, t0, mark["t"])
    m["loss"] = mark["dropped"] / max(1, budget.used)
    return m


async def _bus_sequential(bus: Any, p: Params, subject: str = "bench.echo") -> Metrics:
    """W2: one request at a time, each timed."""
    payload = b"x" * p.size
    for _ in range(p.warmup):
        await bus.request(subject, payload, timeout=p.timeout)
    samples: list[int] = []
    for _ in p.budget():
        t = now_ns()
        await bus.request(subject, payload, timeout=p.timeout)
        samples.append(now_ns() - t)
    return latency_metrics(samples)


async def _bus_inflight(bus: Any, p: Params, subject: str = "bench.echo") -> Metrics:
    """W2x/W4: ``p.inflight`` coroutines share the request budget."""
    payload = b"x" * p.size

    async def worker(budget: Budget) -> None:
        while budget.take():
            rep = await bus.request(subject, payload, timeout=p.timeout)
            if len(rep.data) != p.size:
                raise RuntimeError(f"echo returned {len(rep.data)} bytes, sent {p.size}")

    await run_inflight(worker, Budget(min(p.warmup, p.count)), p.inflight)
    budget = p.budget()
    t0 = now_ns()
    await run_inflight(worker, budget, p.inflight)
    return rate_metrics(budget.used, t0, now_ns())


def _pool(ipcbus: ModuleType, setup: str, transport: str = "pipe", workers: int = 1) -> Any:
    try:
        return ipcbus.WorkerPool(f"{MODULE}:{setup}", workers=workers, transport=transport)
    except (TypeError, ValueError) as exc:
        raise Unavailable(f"WorkerPool(transport={transport!r}) not supported yet ({exc})") from exc


async def _pool_stream(p: Params, transport: str) -> Metrics:
    async with _pool(_ipcbus("WorkerPool"), "sink_setup", transport) as pool:
        return await _bus_stream(pool.bus, p)


async def _pool_sequential(p: Params, transport: str) -> Metrics:
    async with _pool(_ipcbus("WorkerPool"), "echo_setup", transport) as pool:
        return await _bus_sequential(pool.bus, p)


async def ipcbus_pipe_w1(p: Params) -> Metrics:
    """W1 through a one-worker :class:`ipcbus.WorkerPool` (anonymous pipes)."""
    return await _pool_stream(p, "pipe")


async def ipcbus_pipe_w2(p: Params) -> Metrics:
    """W2 sequential request/reply to a one-worker pool."""
    return await _pool_sequential(p, "pipe")


async def ipcbus_pipe_w2x(p: Params) -> Metrics:
    """W2 with ``p.inflight`` requests outstanding, one-worker pool."""
    async with _pool(_ipcbus("WorkerPool"), "echo_setup") as pool:
        return await _bus_inflight(pool.bus, p)


async def ipcbus_pool_shm_w1(p: Params) -> Metrics:
    """W1 through a one-worker pool whose link is shared memory (direct, no hub)."""
    return await _pool_stream(p, "shm")


async def ipcbus_pool_shm_w2(p: Params) -> Metrics:
    """W2 sequential request/reply to a one-worker shared-memory pool."""
    return await _pool_sequential(p, "shm")


async def ipcbus_pool_sysv_w1(p: Params) -> Metrics:
    """W1 through a one-worker pool linked by two SysV message queues (direct, no hub)."""
    return await _pool_stream(p, "sysv")


async def ipcbus_pool_sysv_w2(p: Params) -> Metrics:
    """W2 sequential request/reply to a one-worker SysV pool."""
    return await _pool_sequential(p, "sysv")


async def ipcbus_pool_w4(p: Params) -> Metrics:
    """W4: ``p.workers`` echo workers in one queue group, ``p.inflight`` outstanding."""
    async with _pool(_ipcbus("WorkerPool"), "echo_setup", workers=p.workers) as pool:
        return await _bus_inflight(pool.bus, p)


# -- through a hub: every client is its own process, the hub is the driver --


@contextlib.contextmanager
def _bus_env() -> Iterator[dict[str, str]]:
    """A private bus directory in ``IPCBUS_DIR`` for this process and its peers."""
    old = os.environ.get("IPCBUS_DIR")
    with scratch_dir("ipcbus-bench-bus-") as path:
        os.environ["IPCBUS_DIR"] = path
        try:
            yield dict(os.environ)
        finally:
            if old is None:
                os.environ.pop("IPCBUS_DIR", None)
            else:
                os.environ["IPCBUS_DIR"] = old


async def _connect(args: dict[str, Any]) -> Any:
    ipcbus = _ipcbus("connect")
    try:
        return await ipcbus.connect(args["bus"], transport=args["transport"])
    except ImportError as exc:
        raise Unavailable(f"transport {args['transport']!r} not available yet ({exc})") from exc


@contextlib.asynccontextmanager
async def _hub(name: str, transport: str) -> AsyncIterator[Any]:
    """An embedded hub that accepts only ``transport`` (Unavailable if it cannot)."""
    ipcbus = _ipcbus("Hub", "connect")
    try:
        hub = ipcbus.Hub(name, transports=(transport,))
    except TypeError:
        hub = ipcbus.Hub(name)
    try:
        await hub.__aenter__()
    except ImportError as exc:
        raise Unavailable(f"transport {transport!r} not available yet ({exc})") from exc
    try:
        yield hub
    finally:
        await hub.__aexit__(None, None, None)


async def _wait_for_responder(bus: Any, subject: str, timeout: float) -> None:
    """Request ``subject`` until it answers: interest may still be propagating."""
    ipcbus = _ipcbus("NoResponders")
    deadline = time.monotonic() + timeout
    while True:
        try:
            await bus.request(subject, b"", timeout=timeout)
            return
        except ipcbus.NoResponders:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)  # bench-only: wait for the hub to propagate interest


async def hub_sink_peer(args: dict[str, Any]) -> None:
    """Peer: a client that counts ``bench.stream`` and prints a ``mark`` per marker."""
    bus = await _connect(args)
    try:
        sub = await _lifted_subscribe(bus, "bench.stream")
        await bus.serve(f"bench.ping.{args['id']}", _echo_handler)
        peer_say("ready")

        async def report(mark: dict[str, int]) -> None:
            peer_say("mark", **mark)

        await _count_marks(sub, 2, report)
        await apeer_wait("bye")
    finally:
        await bus.aclose()


async def hub_pub_peer(args: dict[str, Any]) -> None:
    """Peer: publish warmup + marker, wait for ``go``, then the budget + marker."""
    bus = await _connect(args)
    p = msgspec.convert(args["params"], Params)
    try:
        for i in range(args["sinks"]):
            await _wait_for_responder(bus, f"bench.ping.{i}", p.timeout)
        payload = b"x" * p.size
        for _ in range(p.warmup):
            await bus.publish("bench.stream", payload)
        await bus.publish("bench.stream", b"")
        await bus.flush()
        await apeer_wait("go")
        budget = p.budget()
        t0 = now_ns()
        for _ in budget:
            await bus.publish("bench.stream", payload)
        await bus.publish("bench.stream", b"")
        await bus.flush()
        peer_say("started", t=t0, sent=budget.used)
        await apeer_wait("bye")
    finally:
        await bus.aclose()


async def hub_echo_peer(args: dict[str, Any]) -> None:
    """Peer: serve ``bench.echo`` until the driver says ``bye``."""
    bus = await _connect(args)
    try:
        await bus.serve("bench.echo", _echo_handler, queue="echo")
        await bus.flush()
        peer_say("ready")
        await apeer_wait("bye")
    finally:
        await bus.aclose()


async def hub_req_peer(args: dict[str, Any]) -> None:
    """Peer: the requester of W2/W2x; prints ``result {metrics}``."""
    bus = await _connect(args)
    try:
        await _wait_for_responder(bus, "bench.echo", args["timeout"])
        p = msgspec.convert(args["params"], Params)
        if p.inflight > 1:
            metrics = await _bus_inflight(bus, p)
        else:
            metrics = await _bus_sequential(bus, p)
        peer_say("result", **metrics)
        await apeer_wait("bye")
    finally:
        await bus.aclose()


async def _hub_fanout(p: Params, transport: str, sinks: int) -> Metrics:
    with _bus_env() as env:
        name = f"bench{os.getpid()}"
        trace("hub starting")
        async with _hub(name, transport):
            trace("hub up")
            base = {"bus": name, "transport": transport, "timeout": p.timeout}
            # All start at once; the publisher pings every sink before it sends.
            subs = [
                Peer(f"{MODULE}:hub_sink_peer", {**base, "id": i}, env=env) for i in range(sinks)
            ]
            pub = Peer(
                f"{MODULE}:hub_pub_peer",
                {**base, "sinks": sinks, "params": msgspec.to_builtins(p)},
                env=env,
            )
            peers = [*subs, pub]
            try:
                for s in subs:
                    await s.aexpect("ready", p.timeout)
                trace("sinks ready")
                for s in subs:
                    await s.aexpect("mark", p.timeout)
                trace("warm")
                pub.tell("go")
                started = await pub.aexpect("started", p.timeout)
                trace("sent")
                marks = [await s.aexpect("mark", p.timeout) for s in subs]
                trace("received")
            finally:
                for peer in peers:
                    with contextlib.suppress(OSError, ValueError):
                        peer.tell("bye")
                await asyncio.gather(*(peer.aclose() for peer in peers))
                trace("peers closed")
        trace("hub closed")
    m = fanout_metrics(started["sent"], started["t"], marks)
    if sinks == 1:
        m.update(stream_metrics(int(marks[0]["n"]), p.size, started["t"], int(marks[0]["t"])))
        del m["delivered_s"]
    return m


def fanout_metrics(sent: int, t0: int, marks: Sequence[dict[str, Any]]) -> Metrics:
    """W3: messages delivered per second over all sinks, and the fraction lost.

    ``marks`` are the sinks' reports (``n`` received, ``t`` last arrival).
    """
    got = sum(int(m["n"]) for m in marks)
    t1 = max(int(m["t"]) for m in marks)
    secs = max(t1 - t0, 1) / 1e9
    return {"delivered_s": got / secs, "loss": 1 - got / max(1, sent * len(marks)), "secs": secs}


async def _hub_request(p: Params, transport: str) -> Metrics:
    with _bus_env() as env:
        name = f"bench{os.getpid()}"
        async with _hub(name, transport):
            base = {"bus": name, "transport": transport, "timeout": p.timeout}
            peers = [Peer(f"{MODULE}:hub_echo_peer", base, env=env)]
            try:
                await peers[0].aexpect("ready", p.timeout)
                peers.append(
                    Peer(f"{MODULE}:hub_req_peer", {**base, "params": msgspec.to_builtins(p)},
                         env=env)
                )
                result = await peers[1].aexpect("result", p.timeout * 4)
            finally:
                for peer in peers:
                    with contextlib.suppress(OSError, ValueError):
                        peer.tell("bye")
                await asyncio.gather(*(peer.aclose() for peer in peers))
    return {k: float(v) for k, v in result.items()}


def _hub_rows(transport: str) -> dict[str, Callable[[Params], Awaitable[Metrics]]]:
    async def w1(p: Params) -> Metrics:
        return await _hub_fanout(p, transport, 1)

    async def w2(p: Params) -> Metrics:
        return await _hub_request(p, transport)

    async def w3(p: Params) -> Metrics:
        return await _hub_fanout(p, transport, p.subscribers)

    w1.__doc__ = f"W1 client -> client through an embedded hub over {transport}."
    w2.__doc__ = (
        f"W2 (and W2x when ``p.inflight`` > 1): requester -> hub -> responder over {transport}."
    )
    w3.__doc__ = f"W3 one publisher -> ``p.subscribers`` clients through a hub over {transport}."
    for fn in (w1, w2, w3):
        fn.__name__ = fn.__qualname__ = f"hub_{transport}_{fn.__name__}"
    return {"W1": w1, "W2": w2, "W2x": w2, "W3": w3}


_HUB_FIFO = _hub_rows("fifo")
_HUB_SYSV = _hub_rows("sysv")
_HUB_SHM = _hub_rows("shm")

hub_fifo_w1 = _HUB_FIFO["W1"]
hub_fifo_w2 = _HUB_FIFO["W2"]
hub_fifo_w3 = _HUB_FIFO["W3"]
hub_sysv_w1 = _HUB_SYSV["W1"]
hub_sysv_w2 = _HUB_SYSV["W2"]
hub_sysv_w3 = _HUB_SYSV["W3"]
hub_shm_w1 = _HUB_SHM["W1"]
hub_shm_w2 = _HUB_SHM["W2"]
hub_shm_w3 = _HUB_SHM["W3"]


# ---------------------------------------------------------------------------
# Rows from the other helpers' modules (sysv_raw.py, shm_raw.py), if present
# ---------------------------------------------------------------------------

_SIZE_NAMES = ("size", "msg_size", "nbytes", "payload_size", "message_size")
_COUNT_NAMES = ("count", "n", "messages", "iterations", "rounds", "repeats", "number")
_METRIC_ALIASES = {
    "msgs_s": ("msgs_s", "msgs_per_s", "msgs_per_sec", "messages_per_s", "rate", "ops_s"),
    "mb_s": ("mb_s", "MB_s", "mbytes_s", "mb_per_s"),
    "gb_s": ("gb_s", "GB_s", "gb_per_s"),
    "p50_us": ("p50_us", "p50", "median_us"),
    "p99_us": ("p99_us", "p99"),
    "req_s": ("req_s", "rps", "reqs_per_s"),
    "secs": ("secs", "seconds", "elapsed", "elapsed_s"),
}


def _plugin(module: str, candidates: Sequence[str]) -> Callable[..., Any]:
    """Find the first of ``candidates`` in ``ipcbus.bench.<module>``."""
    try:
        mod = importlib.import_module(f"ipcbus.bench.{module}")
    except ImportError as exc:
        raise Unavailable(f"ipcbus/bench/{module}.py not present ({exc})") from exc
    for name in candidates:
        fn = getattr(mod, name, None)
        if callable(fn):
            return cast(Callable[..., Any], fn)
    raise Unavailable(f"ipcbus.bench.{module} has none of: {', '.join(candidates)}")


def _plugin_count(p: Params, kind: str, bytes_s: float = 4e9, msgs_s: float = 500e3) -> int:
    """A count for a plug-in that knows no ``duration``: about ``p.duration`` of work.

    Estimated from a typical rate (``bytes_s``/``msgs_s`` for streams, 60 µs
    per round trip for latency), capped by ``p.count``.
    """
    if p.duration <= 0:
        return p.count
    rate = 1 / 60e-6 if kind == "latency" else min(msgs_s, bytes_s / max(p.size, 1))
    return int(max(8, min(p.count, p.duration * rate)))


def _plugin_call(
    fn: Callable[..., Any], p: Params, kind: str, *, bytes_s: float = 4e9, **extra: Any
) -> Any:
    """Call a plug-in function, passing size/count/pinned under the names it declares."""
    sig = inspect.signature(fn)
    kwargs: dict[str, Any] = {}
    for name in sig.parameters:
        if name in extra:
            kwargs[name] = extra[name]
        elif name in _SIZE_NAMES:
            kwargs[name] = p.size
        elif name in _COUNT_NAMES:
            kwargs[name] = _plugin_count(p, kind, bytes_s)
        elif name in ("pinned", "pin"):
            kwargs[name] = p.pinned
        elif name == "warmup":
            kwargs[name] = p.warmup
        elif name in ("params", "p"):
            kwargs[name] = p
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = run_in_new_loop(result)
    return result


def run_in_new_loop(aw: Awaitable[Any]) -> Any:
    """Await ``aw`` on a fresh loop (plug-ins may be written either way)."""

    async def wrap() -> Any:
        return await aw

    return asyncio.run(wrap())


def _plugin_metrics(result: Any, p: Params, kind: str) -> Metrics:
    """Normalise what a plug-in returned into this harness's metric names."""
    if isinstance(result, msgspec.Struct):
        result = msgspec.structs.asdict(result)
    elif hasattr(result, "_asdict"):
        result = result._asdict()
    elif hasattr(result, "__dataclass_fields__"):
        import dataclasses

        result = dataclasses.asdict(result)
    if isinstance(result, int | float):
        # A bare number: seconds for the whole run (stream) or per round trip (latency).
        result = {"secs": float(result)} if kind == "stream" else {"p50_us": float(result)}
    if not isinstance(result, dict):
        raise TypeError(f"plug-in returned {type(result).__name__}, expected a dict of figures")
    out: Metrics = {}
    for key, aliases in _METRIC_ALIASES.items():
        for alias in aliases:
            if alias in result and isinstance(result[alias], int | float):
                out[key] = float(result[alias])
                break
    if "gb_s" in out and "mb_s" not in out:
        out["mb_s"] = out["gb_s"] * 1e3
    if kind == "stream":
        if "msgs_s" not in out and "secs" in out:
            out["msgs_s"] = p.count / out["secs"]
        if "msgs_s" not in out and "mb_s" in out:
            out["msgs_s"] = out["mb_s"] * 1e6 / p.size
        if "mb_s" not in out and "msgs_s" in out:
            out["mb_s"] = out["msgs_s"] * p.size / 1e6
        if "msgs_s" not in out:
            raise TypeError(f"plug-in result has no throughput figure: {sorted(result)}")
        measured = out["mb_s"] * 1e6 / out["msgs_s"] if out["msgs_s"] else p.size
        if abs(measured - p.size) > 0.05 * p.size + 1:
            # e.g. a SysV stream clamps messages to msgmax: not the row asked for.
            raise Unavailable(f"the plug-in measured {measured:.0f}-byte messages, not {p.size}")
    elif "p50_us" not in out:
        raise TypeError(f"plug-in result has no p50 figure: {sorted(result)}")
    return out


def sysv_raw_w1(p: Params) -> Metrics:
    """W1 raw ``sysv_ipc`` one-way stream, from :mod:`ipcbus.bench.sysv_raw`."""
    fn = _plugin("sysv_raw", ("w1", "stream", "one_way", "oneway", "bench_stream", "run_stream"))
    return _plugin_metrics(_plugin_call(fn, p, "stream"), p, "stream")


def sysv_raw_w2(p: Params) -> Metrics:
    """W2 raw ``sysv_ipc`` ping-pong, from :mod:`ipcbus.bench.sysv_raw`."""
    fn = _plugin(
        "sysv_raw", ("w2", "pingpong", "ping_pong", "request_reply", "bench_pingpong", "latency")
    )
    return _plugin_metrics(_plugin_call(fn, p, "latency"), p, "latency")


def shm_raw_w1(p: Params) -> Metrics:
    """W1 through a bare shared-memory Link (no node), from :mod:`ipcbus.bench.shm_raw`."""
    fn = _plugin("shm_raw", ("w1", "stream", "shm_stream", "one_way", "bench_stream"))
    return _plugin_metrics(_plugin_call(fn, p, "stream", transport="shm"), p, "stream")


def pipe_link_w1(p: Params) -> Metrics:
    """W1 through a bare anonymous-pipe Link (no node), with ``shm_raw.w1``'s driver."""
    fn = _plugin("shm_raw", ("w1",))
    if "transport" not in inspect.signature(fn).parameters:
        raise Unavailable("ipcbus.bench.shm_raw.w1 takes no transport= argument")
    metrics = _plugin_call(fn, p, "stream", bytes_s=1e9, transport="pipe")
    return _plugin_metrics(metrics, p, "stream")


def shm_raw_w2(p: Params) -> Metrics:
    """W2 ping-pong through a bare shared-memory Link, from :mod:`ipcbus.bench.shm_raw`."""
    fn = _plugin("shm_raw", ("w2", "pingpong", "ping_pong"))
    return _plugin_metrics(_plugin_call(fn, p, "latency", transport="shm"), p, "latency")


def memcpy_w1(p: Params) -> Metrics:
    """W1 in-process memcpy of the same sizes (the physical limit).

    Taken from :mod:`ipcbus.bench.shm_raw` when it provides one; otherwise
    measured here: ``memoryview`` slice assignment into a preallocated buffer.
    """
    try:
        fn = _plugin("shm_raw", ("memcpy", "inprocess_memcpy", "in_process_memcpy", "copy"))
    except Unavailable:
        return _local_memcpy(p)
    return _plugin_metrics(_plugin_call(fn, p, "stream", bytes_s=16e9), p, "stream")


def _local_memcpy(p: Params) -> Metrics:
    src = memoryview(b"x" * p.size)
    dst = memoryview(bytearray(p.size))
    for _ in range(p.warmup):
        dst[:] = src
    budget = p.budget()
    t0 = now_ns()
    for _ in budget:
        dst[:] = src
    return stream_metrics(budget.used, p.size, t0, now_ns())


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

_B = "ipcbus.bench.baselines"
_W = MODULE

DRIVERS: dict[tuple[str, str], str] = {
    # W1 one-way stream
    ("W1", "os.pipe"): f"{_B}:pipe_w1",
    ("W1", "mp.Pipe"): f"{_B}:mp_w1",
    ("W1", "uvloop unix"): f"{_B}:unix_w1",
    ("W1", "zmq PUSH/PULL"): f"{_B}:zmq_w1",
    ("W1", "sysv_ipc raw"): f"{_W}:sysv_raw_w1",
    ("W1", "shm link (raw)"): f"{_W}:shm_raw_w1",
    ("W1", "pipe link (raw)"): f"{_W}:pipe_link_w1",
    ("W1", "memcpy"): f"{_W}:memcpy_w1",
    ("W1", "ipcbus pipe"): f"{_W}:ipcbus_pipe_w1",
    ("W1", "ipcbus hub+fifo"): f"{_W}:hub_fifo_w1",
    ("W1", "ipcbus hub+sysv"): f"{_W}:hub_sysv_w1",
    ("W1", "ipcbus hub+shm"): f"{_W}:hub_shm_w1",
    ("W1", "ipcbus pool+shm"): f"{_W}:ipcbus_pool_shm_w1",
    ("W1", "ipcbus pool+sysv"): f"{_W}:ipcbus_pool_sysv_w1",
    # W2 sequential request/reply
    ("W2", "os.pipe"): f"{_B}:pipe_w2",
    ("W2", "mp.Pipe"): f"{_B}:mp_w2",
    ("W2", "uvloop unix"): f"{_B}:unix_w2",
    ("W2", "zmq REQ/REP"): f"{_B}:zmq_w2",
    ("W2", "NATS"): f"{_B}:nats_w2",
    ("W2", "sysv_ipc raw"): f"{_W}:sysv_raw_w2",
    ("W2", "shm link (raw)"): f"{_W}:shm_raw_w2",
    ("W2", "ipcbus pipe"): f"{_W}:ipcbus_pipe_w2",
    ("W2", "ipcbus hub+fifo"): f"{_W}:hub_fifo_w2",
    ("W2", "ipcbus hub+sysv"): f"{_W}:hub_sysv_w2",
    ("W2", "ipcbus hub+shm"): f"{_W}:hub_shm_w2",
    ("W2", "ipcbus pool+shm"): f"{_W}:ipcbus_pool_shm_w2",
    ("W2", "ipcbus pool+sysv"): f"{_W}:ipcbus_pool_sysv_w2",
    # W2 with many requests in flight
    ("W2x", "uvloop unix"): f"{_B}:unix_w2x",
    ("W2x", "zmq DEALER/ROUTER"): f"{_B}:zmq_w2x",
    ("W2x", "NATS"): f"{_B}:nats_w2x",
    ("W2x", "ipcbus pipe"): f"{_W}:ipcbus_pipe_w2x",
    ("W2x", "ipcbus hub+fifo"): f"{_W}:hub_fifo_w2",
    # W3 fan-out
    ("W3", "NATS"): f"{_B}:nats_w3",
    ("W3", "zmq PUB/SUB"): f"{_B}:zmq_w3",
    ("W3", "ipcbus hub+fifo"): f"{_W}:hub_fifo_w3",
    ("W3", "ipcbus hub+sysv"): f"{_W}:hub_sysv_w3",
    ("W3", "ipcbus hub+shm"): f"{_W}:hub_shm_w3",
    # W4 worker pool
    ("W4", "ProcessPoolExecutor"): f"{_B}:ppe_w4",
    ("W4", "ipcbus pool"): f"{_W}:ipcbus_pool_w4",
}
"""``(workload, implementation) -> "module:function"`` of the driver.

To add a row: write a driver (sync or async, ``Params -> Metrics``) and
register it here, then list the row in :data:`ipcbus.bench.runner.TABLES`.
"""


def _resolve(target: str) -> Callable[..., Any]:
    module, _, func = target.partition(":")
    if not module.startswith("ipcbus.bench.") or not func:
        raise ValueError(f"{target!r}: expected 'ipcbus.bench.<module>:<function>'")
    return cast(Callable[..., Any], getattr(importlib.import_module(module), func))


def driver_for(workload: str, impl: str) -> Callable[..., Any]:
    """The driver function registered for ``(workload, impl)``."""
    try:
        target = DRIVERS[(workload, impl)]
    except KeyError:
        known = sorted({i for (w, i) in DRIVERS if w == workload})
        raise KeyError(f"no driver for {workload}/{impl}; known: {', '.join(known)}") from None
    return _resolve(target)


def _call(fn: Callable[..., Any], arg: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return run_async(lambda: fn(arg))
    return fn(arg)


def _run(workload: str, impl: str, params_json: str) -> Outcome:
    p = msgspec.json.decode(params_json, type=Params)
    pin(p.pinned)
    try:
        metrics = _call(driver_for(workload, impl), p)
    except Unavailable as exc:
        return Outcome("unavailable", reason=str(exc))
    except Exception as exc:
        traceback.print_exc()
        return Outcome("error", reason=f"{type(exc).__name__}: {exc}")
    return Outcome("ok", metrics={k: float(v) for k, v in metrics.items()})


def _fail(msg: str) -> NoReturn:
    print(msg, file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ipcbus.bench.workloads`` (driver or peer)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description="Run one benchmark measurement or peer."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="measure one (workload, implementation); print JSON")
    run.add_argument("workload", choices=sorted(WORKLOADS))
    run.add_argument("impl")
    run.add_argument("params", nargs="?", default="{}", help="Params as JSON")
    peer = sub.add_parser("peer", help="internal: run a peer function")
    peer.add_argument("target")
    peer.add_argument("args", nargs="?", default="{}")
    ns = parser.parse_args(argv)
    if ns.cmd == "run":
        if (ns.workload, ns.impl) not in DRIVERS:
            known = sorted(i for (w, i) in DRIVERS if w == ns.workload)
            _fail(f"unknown implementation {ns.impl!r} for {ns.workload}; known: {known}")
        out = _run(ns.workload, ns.impl, ns.params)
        sys.stdout.flush()
        sys.stdout.buffer.write(b"\n" + encode(out) + b"\n")
        sys.stdout.flush()
        return 0
    try:
        _call(_resolve(ns.target), decode(ns.args))
    except Unavailable as exc:
        peer_say("unavailable", reason=str(exc))
        return 0
    except Exception as exc:
        # Tell the driver why (it is waiting for a line), and keep the traceback.
        traceback.print_exc()
        with contextlib.suppress(OSError):
            peer_say("error", reason=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    # Run the properly imported module, not this ``__main__`` copy, so that
    # classes such as Unavailable are the same objects the drivers raise.
    from ipcbus.bench.workloads import main as _main

    sys.exit(_main())
