"""Baselines: what ipcbus is measured against, each in fresh child processes.

Every driver here is registered in :data:`ipcbus.bench.workloads.DRIVERS`
and runs inside a driver process started by the runner; its peers are
further processes (``Peer`` = ``python -m ipcbus.bench.workloads peer``, or a
spawn-context :mod:`multiprocessing` child for the ``multiprocessing.Pipe``
rows).  Optional libraries (pyzmq, nats-py, uvloop) are imported inside the
functions, so a missing one makes only its rows "not available".

- ``os.pipe``: blocking ``os.write``/``os.read`` with a 4-byte big-endian
  length header, default pipe size: the plain-Python limit.
- ``mp.Pipe``: ``multiprocessing.Pipe()`` (duplex, so a socketpair underneath)
  with ``send_bytes``/``recv_bytes``.
- ``uvloop unix``: asyncio StreamReader/StreamWriter over a Unix socket, on
  uvloop when it is installed; length-prefixed frames.
- ``zmq``: pyzmq over ``ipc://``: PUSH/PULL, REQ/REP, DEALER/ROUTER, XPUB/SUB.
- ``NATS``: a ``nats-server`` started on 127.0.0.1 for the measurement, with
  nats-py clients.
- ``ProcessPoolExecutor``: 2 spawn workers, echo tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from ipcbus.bench.workloads import (
    Budget,
    Metrics,
    Params,
    Peer,
    Unavailable,
    decode,
    encode,
    fanout_metrics,
    latency_metrics,
    now_ns,
    peer_say,
    peer_wait,
    rate_metrics,
    run_inflight,
    scratch_dir,
    stream_metrics,
)

__all__ = [
    "mp_w1",
    "mp_w2",
    "nats_server",
    "nats_w2",
    "nats_w2x",
    "nats_w3",
    "pipe_w1",
    "pipe_w2",
    "ppe_w4",
    "unix_w1",
    "unix_w2",
    "unix_w2x",
    "zmq_w1",
    "zmq_w2",
    "zmq_w2x",
    "zmq_w3",
]

_B = "ipcbus.bench.baselines"
_HDR = struct.Struct(">I")
_ID = struct.Struct(">I")


# ---------------------------------------------------------------------------
# raw os.pipe, blocking, length-prefixed
# ---------------------------------------------------------------------------


def _readn(fd: int, n: int) -> bytes:
    """Read exactly ``n`` bytes from a blocking fd (a pipe read may return less)."""
    buf = os.read(fd, n)
    if len(buf) == n:
        return buf
    parts = [buf]
    got = len(buf)
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError(f"pipe closed after {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _writeall(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking fd (a signal may cut a large write short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pipe_recv(fd: int) -> bytes:
    (n,) = _HDR.unpack(_readn(fd, 4))
    return _readn(fd, n) if n else b""


def _pipe_send(fd: int, payload: bytes) -> None:
    _writeall(fd, _HDR.pack(len(payload)) + payload)


def pipe_sink_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`pipe_w1`: count frames; report at each empty marker frame."""
    fd = args["fd"]
    for _ in range(2):
        n = 0
        while _pipe_recv(fd):
            n += 1
        peer_say("mark", n=n, t=now_ns())


def pipe_w1(p: Params) -> Metrics:
    """W1 over a raw pipe: one ``os.write`` per frame (header + payload)."""
    r, w = os.pipe()
    peer = Peer(f"{_B}:pipe_sink_peer", {"fd": r}, pass_fds=(r,))
    os.close(r)
    try:
        payload = b"x" * p.size
        for _ in range(p.warmup):
            _pipe_send(w, payload)
        _pipe_send(w, b"")
        peer.expect("mark")
        budget = p.budget()
        t0 = now_ns()
        for _ in budget:
            _pipe_send(w, payload)
        _pipe_send(w, b"")
        mark = peer.expect("mark")
    finally:
        os.close(w)
        peer.close()
    return stream_metrics(int(mark["n"]), p.size, t0, int(mark["t"]))


def pipe_echo_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`pipe_w2`: echo every frame until the pipe closes."""
    rfd, wfd = args["rfd"], args["wfd"]
    with contextlib.suppress(EOFError):
        while True:
            _pipe_send(wfd, _pipe_recv(rfd))


def pipe_w2(p: Params) -> Metrics:
    """W2 ping-pong over two raw pipes."""
    r1, w1 = os.pipe()  # driver -> peer
    r2, w2 = os.pipe()  # peer -> driver
    peer = Peer(f"{_B}:pipe_echo_peer", {"rfd": r1, "wfd": w2}, pass_fds=(r1, w2))
    os.close(r1)
    os.close(w2)
    try:
        payload = b"x" * p.size
        for _ in range(p.warmup):
            _pipe_send(w1, payload)
            _pipe_recv(r2)
        samples: list[int] = []
        for _ in p.budget():
            t = now_ns()
            _pipe_send(w1, payload)
            _pipe_recv(r2)
            samples.append(now_ns() - t)
    finally:
        os.close(w1)
        os.close(r2)
        peer.close()
    return latency_metrics(samples)


# ---------------------------------------------------------------------------
# multiprocessing.Pipe (spawn context)
# ---------------------------------------------------------------------------


def _mp_sink(conn: Connection) -> None:
    conn.send_bytes(b"ready")
    for _ in range(2):
        n = 0
        while conn.recv_bytes():
            n += 1
        conn.send_bytes(encode({"n": n, "t": now_ns()}))
    conn.close()


def _mp_echo(conn: Connection) -> None:
    conn.send_bytes(b"ready")
    with contextlib.suppress(EOFError):
        while True:
            conn.send_bytes(conn.recv_bytes())


def _mp_child(target: Any) -> tuple[Connection, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork: a fresh interpreter, like every peer
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(theirs,), daemon=True)
    proc.start()
    theirs.close()
    if mine.recv_bytes() != b"ready":
        raise RuntimeError("multiprocessing child did not start")
    return mine, proc


def mp_w1(p: Params) -> Metrics:
    """W1 over ``multiprocessing.Pipe()`` with ``send_bytes``."""
    conn, proc = _mp_child(_mp_sink)
    try:
        payload = b"x" * p.size
        for _ in range(p.warmup):
            conn.send_bytes(payload)
        conn.send_bytes(b"")
        conn.recv_bytes()
        budget = p.budget()
        t0 = now_ns()
        for _ in budget:
            conn.send_bytes(payload)
        conn.send_bytes(b"")
        mark = decode(conn.recv_bytes())
    finally:
        conn.close()
        proc.join(10)
    return stream_metrics(int(mark["n"]), p.size, t0, int(mark["t"]))


def mp_w2(p: Params) -> Metrics:
    """W2 ping-pong over ``multiprocessing.Pipe()``."""
    conn, proc = _mp_child(_mp_echo)
    try:
        payload = b"x" * p.size
        for _ in range(p.warmup):
            conn.send_bytes(payload)
            conn.recv_bytes()
        samples: list[int] = []
        for _ in p.budget():
            t = now_ns()
            conn.send_bytes(payload)
            conn.recv_bytes()
            samples.append(now_ns() - t)
    finally:
        conn.close()
        proc.join(10)
    return latency_metrics(samples)


# ---------------------------------------------------------------------------
# asyncio (+uvloop) Unix sockets, StreamReader/StreamWriter
# ---------------------------------------------------------------------------


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _HDR.unpack(await reader.readexactly(4))
    return await reader.readexactly(n) if n else b""


async def unix_sink_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`unix_w1`: connect, count frames, report at each marker."""
    reader, writer = await asyncio.open_unix_connection(args["path"])
    for _ in range(2):
        n = 0
        while await _read_frame(reader):
            n += 1
        peer_say("mark", n=n, t=now_ns())
    writer.close()


async def unix_echo_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`unix_w2`/:func:`unix_w2x`: echo bytes back as they come."""
    # A byte-stream echo, the classic uvloop echo server: whatever arrives is
    # written back at once.  Frames stay whole because order is preserved;
    # only the client parses them.
    reader, writer = await asyncio.open_unix_connection(args["path"])
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def _unix_pair(
    peer_target: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, Peer]]:
    """Listen on a Unix socket, start the peer, yield the accepted connection."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    accepted = loop.create_future()

    def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not accepted.done():
            accepted.set_result((r, w))

    with scratch_dir() as d:
        path = os.path.join(d, "s")
        server = await asyncio.start_unix_server(on_conn, path)
        peer = Peer(f"{_B}:{peer_target}", {"path": path})
        try:
            reader, writer = await asyncio.wait_for(accepted, 60)
            try:
                yield reader, writer, peer
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        finally:
            server.close()
            await peer.aclose()


async def unix_w1(p: Params) -> Metrics:
    """W1 over a Unix socket: ``write`` + ``drain`` per frame, as an asyncio user would."""
    async with _unix_pair("unix_sink_peer") as (_reader, writer, peer):
        payload = _HDR.pack(p.size) + b"x" * p.size
        for _ in range(p.warmup):
            writer.write(payload)
            await writer.drain()
        writer.write(_HDR.pack(0))
        await peer.aexpect("mark")
        budget = p.budget()
        t0 = now_ns()
        for _ in budget:
            writer.write(payload)
            await writer.drain()
        writer.write(_HDR.pack(0))
        await writer.drain()
        mark = await peer.aexpect("mark")
    return stream_metrics(int(mark["n"]), p.size, t0, int(mark["t"]))


async def unix_w2(p: Params) -> Metrics:
    """W2 ping-pong over a Unix socket (echo peer)."""
    async with _unix_pair("unix_echo_peer") as (reader, writer, _peer):
        frame = _HDR.pack(p.size) + b"x" * p.size
        for _ in range(p.warmup):
            writer.write(frame)
            await writer.drain()
            await _read_frame(reader)
        samples: list[int] = []
        for _ in p.budget():
            t = now_ns()
            writer.write(frame)
            await writer.drain()
            await _read_frame(reader)
            samples.append(now_ns() - t)
    return latency_metrics(samples)


async def unix_w2x(p: Params) -> Metrics:
    """W2 with ``p.inflight`` requests outstanding: id-tagged frames, futures by id."""
    loop = asyncio.get_running_loop()
    async with _unix_pair("unix_echo_peer") as (reader, writer, _peer):
        pending: dict[int, asyncio.Future[bytes]] = {}
        body = b"x" * max(p.size - 4, 0)
        next_id = 0

        async def read_replies() -> None:
            while True:
                data = await _read_frame(reader)
                (rid,) = _ID.unpack_from(data)
                fut = pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(data)

        async def client(budget: Budget) -> None:
            nonlocal next_id
            while budget.take():
                rid = next_id = (next_id + 1) & 0xFFFFFFFF
                fut = loop.create_future()
                pending[rid] = fut
                msg = _ID.pack(rid) + body
                writer.write(_HDR.pack(len(msg)) + msg)
                await writer.drain()
                await fut

        rtask = asyncio.create_task(read_replies())
        try:
            await run_inflight(client, Budget(min(p.warmup, p.count)), p.inflight)
            budget = p.budget()
            t0 = now_ns()
            await run_inflight(client, budget, p.inflight)
            t1 = now_ns()
        finally:
            rtask.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.IncompleteReadError):
                await rtask
    return rate_metrics(budget.used, t0, t1)


# ---------------------------------------------------------------------------
# pyzmq over ipc://
# ---------------------------------------------------------------------------


def _zmq() -> Any:
    try:
        import zmq
    except ImportError as exc:
        raise Unavailable("pyzmq not installed (pip install pyzmq)") from exc
    return zmq


def zmq_pull_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`zmq_w1`: PULL, count, report at each empty marker."""
    zmq = _zmq()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.connect(args["url"])
    for _ in range(2):
        n = 0
        while s.recv():
            n += 1
        peer_say("mark", n=n, t=now_ns())
    s.close(linger=0)
    ctx.term()


def zmq_w1(p: Params) -> Metrics:
    """W1 PUSH/PULL over ``ipc://`` (default high-water marks)."""
    zmq = _zmq()
    with scratch_dir() as d:
        url = f"ipc://{d}/s"
        ctx = zmq.Context()
        s = ctx.socket(zmq.PUSH)
        s.bind(url)
        peer = Peer(f"{_B}:zmq_pull_peer", {"url": url})
        try:
            payload = b"x" * p.size
            for _ in range(p.warmup):
                s.send(payload)
            s.send(b"")
            peer.expect("mark")
            budget = p.budget()
            t0 = now_ns()
            for _ in budget:
                s.send(payload)
            s.send(b"")
            mark = peer.expect("mark")
        finally:
            peer.close()
            s.close(linger=0)
            ctx.term()
    return stream_metrics(int(mark["n"]), p.size, t0, int(mark["t"]))


def zmq_rep_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`zmq_w2` (REP) and :func:`zmq_w2x` (ROUTER): echo until ``bye``."""
    zmq = _zmq()
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER if args["router"] else zmq.REP)
    s.connect(args["url"])
    peer_say("ready")
    stop = threading.Event()

    def watch_stdin() -> None:
        with contextlib.suppress(Exception):
            peer_wait("bye")
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(100):
            continue
        if args["router"]:
            while True:
                try:
                    s.send_multipart(s.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        else:
            s.send(s.recv())
    s.close(linger=0)
    ctx.term()


@contextlib.contextmanager
def _zmq_server(sock_type: str, router: bool) -> Iterator[tuple[Any, Peer]]:
    zmq = _zmq()
    with scratch_dir() as d:
        url = f"ipc://{d}/s"
        ctx = zmq.Context()
        s = ctx.socket(getattr(zmq, sock_type))
        s.bind(url)
        peer = Peer(f"{_B}:zmq_rep_peer", {"url": url, "router": router})
        try:
            peer.expect("ready")
            yield s, peer
        finally:
            with contextlib.suppress(OSError, ValueError):
                peer.tell("bye")
            peer.close()
            s.close(linger=0)
            ctx.term()


def zmq_w2(p: Params) -> Metrics:
    """W2 REQ/REP ping-pong."""
    with _zmq_server("REQ", router=False) as (s, _peer):
        payload = b"x" * p.size
        for _ in range(p.warmup):
            s.send(payload)
            s.recv()
        samples: list[int] = []
        for _ in p.budget():
            t = now_ns()
            s.send(payload)
            s.recv()
            samples.append(now_ns() - t)
    return latency_metrics(samples)


def zmq_w2x(p: Params) -> Metrics:
    """W2 DEALER/ROUTER with a window of ``p.inflight`` requests outstanding."""
    with _zmq_server("DEALER", router=True) as (s, _peer):
        payload = b"x" * p.size

        def window(budget: Budget) -> None:
            outstanding = 0
            while outstanding < p.inflight and budget.take():
                s.send(payload)
                outstanding += 1
            while outstanding:
                s.recv()
                outstanding -= 1
                if budget.take():
                    s.send(payload)
                    outstanding += 1

        window(Budget(min(p.warmup, p.count)))
        budget = p.budget()
        t0 = now_ns()
        window(budget)
        t1 = now_ns()
    return rate_metrics(budget.used, t0, t1)


def zmq_sub_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`zmq_w3`: SUB to everything, report at each empty marker."""
    zmq = _zmq()
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 0)  # unbounded, so nothing is dropped and counts compare
    s.connect(args["url"])
    s.setsockopt(zmq.SUBSCRIBE, b"")
    for _ in range(2):
        n = 0
        while s.recv():
            n += 1
        peer_say("mark", n=n, t=now_ns())
    s.close(linger=0)
    ctx.term()


def zmq_w3(p: Params) -> Metrics:
    """W3 XPUB -> ``p.subscribers`` SUB processes over ``ipc://``, high-water marks off.

    XPUB (verbose) hands the publisher every subscription, so it starts only
    once all subscribers are really subscribed (no "slow joiner" loss).
    """
    zmq = _zmq()
    with scratch_dir() as d:
        url = f"ipc://{d}/s"
        ctx = zmq.Context()
        s = ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.XPUB_VERBOSE, 1)
        s.bind(url)
        peers = [Peer(f"{_B}:zmq_sub_peer", {"url": url}) for _ in range(p.subscribers)]
        try:
            joined = 0
            while joined < p.subscribers:
                if s.poll(int(p.timeout * 1000)) == 0:
                    raise TimeoutError("subscribers did not subscribe in time")
                if s.recv()[:1] == b"\x01":
                    joined += 1
            payload = b"x" * p.size
            for _ in range(p.warmup):
                s.send(payload)
            s.send(b"")
            for peer in peers:
                peer.expect("mark")
            budget = p.budget()
            t0 = now_ns()
            for _ in budget:
                s.send(payload)
            s.send(b"")
            marks = [peer.expect("mark") for peer in peers]
        finally:
            for peer in peers:
                peer.close()
            s.close(linger=0)
            ctx.term()
    return fanout_metrics(budget.used, t0, marks)


# ---------------------------------------------------------------------------
# NATS: nats-server on loopback, nats-py clients
# ---------------------------------------------------------------------------

NATS_MISSING = "nats-server not installed (apt-get install nats-server)"


def _nats() -> Any:
    try:
        import nats
    except ImportError as exc:
        raise Unavailable("nats-py not installed (pip install nats-py)") from exc
    return nats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """Start ``nats-server`` on a free loopback port; yield its URL; stop it after.

    The server inherits this process's CPU affinity, so pinned runs pin it too.
    """
    binary = shutil.which("nats-server") or next(
        (b for b in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.path.exists(b)),
        None,
    )
    if binary is None:
        raise Unavailable(NATS_MISSING)
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        # The server logs "Server is ready" once it accepts clients.
        for raw in proc.stderr:
            if b"Server is ready" in raw:
                break
        else:
            raise RuntimeError(f"nats-server exited with code {proc.wait()} before it was ready")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def nats_echo_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`nats_w2`: respond to ``bench.echo`` until ``bye``."""
    nats = _nats()
    nc = await nats.connect(args["url"])

    async def cb(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=cb)
    await nc.flush()
    peer_say("ready")
    await asyncio.to_thread(peer_wait, "bye")
    await nc.close()


async def nats_sub_peer(args: dict[str, Any]) -> None:
    """Peer of :func:`nats_w3`: count ``bench.fan``; report at each empty marker."""
    nats = _nats()
    nc = await nats.connect(args["url"])
    finished = asyncio.Event()
    state = {"n": 0, "marks": 0}

    async def cb(msg: Any) -> None:
        if msg.data:
            state["n"] += 1
            return
        peer_say("mark", n=state["n"], t=now_ns())
        state["n"] = 0
        state["marks"] += 1
        if state["marks"] == 2:
            finished.set()

    # Raise nats-py's per-subscription pending limits: the run is about the
    # path, not about its slow-consumer policy (drops still show as loss).
    await nc.subscribe("bench.fan", cb=cb, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    peer_say("ready")
    await finished.wait()
    await nc.close()


@contextlib.asynccontextmanager
async def _nats_session(peer: str, n: int) -> AsyncIterator[tuple[Any, list[Peer]]]:
    nats = _nats()
    with nats_server() as url:
        peers = [Peer(f"{_B}:{peer}", {"url": url}) for _ in range(n)]
        try:
            for pr in peers:
                await pr.aexpect("ready")
            nc = await nats.connect(url)
            try:
                yield nc, peers
            finally:
                await nc.close()
        finally:
            for pr in peers:
                with contextlib.suppress(OSError, ValueError):
                    pr.tell("bye")
            await asyncio.gather(*(pr.aclose() for pr in peers))


async def nats_w2(p: Params) -> Metrics:
    """W2 sequential ``nc.request`` through nats-server to one responder process."""
    async with _nats_session("nats_echo_peer", 1) as (nc, _peers):
        payload = b"x" * p.size
        for _ in range(p.warmup):
            await nc.request("bench.echo", payload, timeout=p.timeout)
        samples: list[int] = []
        for _ in p.budget():
            t = now_ns()
            await nc.request("bench.echo", payload, timeout=p.timeout)
            samples.append(now_ns() - t)
    return latency_metrics(samples)


async def nats_w2x(p: Params) -> Metrics:
    """W2 with ``p.inflight`` concurrent ``nc.request`` calls."""
    async with _nats_session("nats_echo_peer", 1) as (nc, _peers):
        payload = b"x" * p.size

        async def client(budget: Budget) -> None:
            while budget.take():
                await nc.request("bench.echo", payload, timeout=p.timeout)

        await run_inflight(client, Budget(min(p.warmup, p.count)), p.inflight)
        budget = p.budget()
        t0 = now_ns()
        await run_inflight(client, budget, p.inflight)
        t1 = now_ns()
    return rate_metrics(budget.used, t0, t1)


async def nats_w3(p: Params) -> Metrics:
    """W3: this process publishes ``bench.fan``; ``p.subscribers`` processes count."""
    async with _nats_session("nats_sub_peer", p.subscribers) as (nc, peers):
        payload = b"x" * p.size
        for _ in range(p.warmup):
            await nc.publish("bench.fan", payload)
        await nc.publish("bench.fan", b"")
        await nc.flush()
        for pr in peers:
            await pr.aexpect("mark")
        budget = p.budget()
        t0 = now_ns()
        for _ in budget:
            await nc.publish("bench.fan", payload)
        await nc.publish("bench.fan", b"")
        await nc.flush()
        marks = [await pr.aexpect("mark", p.timeout) for pr in peers]
    return fanout_metrics(budget.used, t0, marks)


# ---------------------------------------------------------------------------
# concurrent.futures.ProcessPoolExecutor
# ---------------------------------------------------------------------------


def echo_task(data: bytes) -> bytes:
    """The task the pool runs: return its argument."""
    return data


def ppe_w4(p: Params) -> Metrics:
    """W4: ``p.count`` echo tasks on a spawn ProcessPoolExecutor, ``p.inflight`` outstanding."""
    import multiprocessing as mp

    payload = b"x" * p.size
    with ProcessPoolExecutor(max_workers=p.workers, mp_context=mp.get_context("spawn")) as ex:
        # Start every worker before the clock runs.
        list(ex.map(echo_task, [payload] * (p.workers * 4)))

        def batch(budget: Budget) -> None:
            slots = threading.Semaphore(p.inflight)
            finished = threading.Event()
            left = [1]  # one hold for the submitting loop itself
            lock = threading.Lock()
            errors: list[BaseException] = []

            def done(fut: Future[bytes]) -> None:
                exc = fut.exception()
                if exc is not None:
                    errors.append(exc)
                slots.release()
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        finished.set()

            for _ in budget:
                slots.acquire()
                with lock:
                    left[0] += 1
                ex.submit(echo_task, payload).add_done_callback(done)
            with lock:
                left[0] -= 1  # release the loop's own hold
                if left[0] == 0:
                    finished.set()
            finished.wait(p.timeout * 4)
            if errors:
                raise errors[0]

        batch(Budget(min(p.warmup, p.count)))
        budget = p.budget()
        t0 = now_ns()
        batch(budget)
        t1 = now_ns()
    return rate_metrics(budget.used, t0, t1)

