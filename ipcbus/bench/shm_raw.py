"""Raw figures for the shared-memory transport, at the Link level (no node, no hub).

Every measurement runs its two ends in two fresh child processes (uvloop when
installed, like ipcbus itself) and returns a dict of figures:

* :func:`w1` — one-way stream through a direct :class:`~ipcbus.transports.shm.ShmLink`:
  ``msgs_s``, ``mb_s``, ``secs``.  ``transport="pipe"`` runs the same driver
  over the anonymous-pipe transport (:class:`~ipcbus.transports.pipe.PipeLink`),
  the baseline of the issue's targets.
* :func:`memcpy` — the physical limit, in this process: ``memoryview`` slice
  assignment (one ``memcpy``) and ``bytes()`` of a slice (allocation + copy,
  what a receiver pays), at the same sizes.
* :func:`w2` — ping-pong round trips of ``size`` bytes: ``p50_us``, ``p99_us``.
* :func:`wake_compare` — how a sleeping event loop is woken: a thread blocked
  in ``sem_wait`` that calls ``call_soon_threadsafe`` (what the transport
  does) against a FIFO doorbell the loop polls.
* :func:`sem_costs` — cost of one POSIX (futex) and one SysV (syscall)
  semaphore operation.

``python -m ipcbus.bench.shm_raw`` prints them all (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["memcpy", "sem_costs", "w1", "w2", "wake_compare"]

KiB = 1024
MiB = 1024 * KiB
SIZES = (64, 64 * KiB, MiB, 16 * MiB)
_DEFAULT_COUNTS = {64: 200_000, 64 * KiB: 20_000, MiB: 3_000, 16 * MiB: 200}


def _count_for(size: int) -> int:
    if size in _DEFAULT_COUNTS:
        return _DEFAULT_COUNTS[size]
    return max(100, min(200_000, (2 * 1024 * MiB) // max(size, 1)))


# -- the child side -------------------------------------------------------------


def _child_main(spec: dict[str, Any]) -> None:
    cpu = spec.get("cpu")
    if cpu is not None:
        os.sched_setaffinity(0, {int(cpu)})
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result = runner(_child(spec))
    if result is not None:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


async def _open(spec: dict[str, Any]) -> Any:
    """Open this child's end of the link described by ``spec``."""
    if spec["transport"] == "pipe":
        from ipcbus.transports.pipe import PipeLink

        return PipeLink(spec["rfd"], spec["wfd"])
    from ipcbus.transports.shm import ShmLink

    if spec["role"] == "create":
        link, params = ShmLink.create(None, ring_size=spec["ring_size"])
        sys.stdout.write(json.dumps(params) + "\n")
        sys.stdout.flush()
        await link.wait_attached()
        return link
    return await ShmLink.attach(spec["params"], peer_pid=spec["peer_pid"])


async def _child(spec: dict[str, Any]) -> dict[str, Any] | None:
    from ipcbus.errors import ConnectionClosed

    link = await _open(spec)
    job, size, count, warmup = spec["job"], spec["size"], spec["count"], spec["warmup"]
    try:
        if job == "sink":  # W1 receiver: time `count` frames after `warmup`
            for _ in range(warmup):
                await link.recv()
            t0 = time.perf_counter_ns()
            total = 0
            for _ in range(count):
                total += len(await link.recv())
            t1 = time.perf_counter_ns()
            await link.send(b"k")
            await link.drain()
            assert total == size * count, "sink: wrong byte count"
            secs = (t1 - t0) / 1e9
            return {"secs": secs, "msgs_s": count / secs, "mb_s": total / secs / 1e6}
        if job == "source":  # W1 sender
            payload = b"x" * size
            send = link.send
            for _ in range(warmup + count):
                await send(payload)
            await link.recv()  # the sink's ack: everything arrived
            return None
        if job == "echo":  # W2 server
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await link.send(await link.recv())
            return None
        if job == "ping":  # W2 client
            payload = b"p" * size
            samples = []
            for i in range(warmup + count):
                t0 = time.perf_counter_ns()
                await link.send(payload)
                await link.recv()
                if i >= warmup:
                    samples.append(time.perf_counter_ns() - t0)
            return _latency(samples)
        raise ValueError(f"unknown job {job!r}")
    finally:
        await link.aclose()


def _latency(samples: Sequence[int]) -> dict[str, Any]:
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] / 1e3,
        "p99_us": ordered[min(n - 1, (n * 99) // 100)] / 1e3,
        "mean_us": statistics.fmean(ordered) / 1e3,
        "count": n,
    }


# -- the parent side ------------------------------------------------------------


def _spawn(spec: dict[str, Any], pass_fds: Sequence[int] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ipcbus.bench.shm_raw", "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=tuple(pass_fds),
    )


def _cpus(pinned: bool | str) -> tuple[int | None, int | None]:
    """CPU for (server, client): pinned=True/'same' one CPU, 'split' two CPUs.

    The CPUs this process may use (the driver's pinning, a cpuset), lowest first.
    """
    usable = sorted(os.sched_getaffinity(0))
    if pinned == "split":
        return usable[0], usable[1 % len(usable)]
    if pinned:
        return usable[0], usable[0]
    return None, None


def _pair(
    transport: str,
    server: dict[str, Any],
    client: dict[str, Any],
    pinned: bool | str,
    ring_size: int,
    timeout: float,
) -> tuple[str, str]:
    """Run server and client children over one link; return their stdout lines."""
    cs, cc = _cpus(pinned)
    server = {**server, "transport": transport, "cpu": cs}
    client = {**client, "transport": transport, "cpu": cc}
    procs: list[subprocess.Popen[str]] = []
    try:
        if transport == "shm":
            srv = _spawn({**server, "role": "create", "ring_size": ring_size})
            procs.append(srv)
            assert srv.stdout is not None
            line = srv.stdout.readline()
            if not line:
                raise RuntimeError("shm bench: the creating child died before printing its params")
            cli = _spawn({**client, "role": "attach", "params": json.loads(line), "peer_pid": srv.pid})
            procs.append(cli)
        elif transport == "pipe":
            from ipcbus.transports.pipe import ChildPipes

            pp = ChildPipes.create()
            try:
                srv = _spawn({**server, "rfd": pp.child_r, "wfd": pp.child_w}, (pp.child_r, pp.child_w))
                procs.append(srv)
                cli = _spawn({**client, "rfd": pp.parent_r, "wfd": pp.parent_w}, (pp.parent_r, pp.parent_w))
                procs.append(cli)
            finally:
                pp.close()
        else:
            raise ValueError(f"transport must be 'shm' or 'pipe', not {transport!r}")
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
        for p in procs:
            if p.returncode:
                raise RuntimeError(f"bench child exited with status {p.returncode}")
        return outs[0], outs[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def w1(
    size: int = MiB,
    count: int | None = None,
    pinned: bool | str = False,
    warmup: int | None = None,
    transport: str = "shm",
    ring_size: int | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """W1: one-way stream of ``count`` frames of ``size`` bytes; ``msgs_s``, ``mb_s``, ``secs``."""
    from ipcbus.transports.shm import DEFAULT_RING_SIZE

    count = count or _count_for(size)
    warmup = max(1, count // 20) if warmup is None else warmup
    job = {"size": size, "count": count, "warmup": warmup}
    sink, _ = _pair(
        transport,
        {**job, "job": "sink"},
        {**job, "job": "source"},
        pinned,
        ring_size or DEFAULT_RING_SIZE,
        timeout,
    )
    out: dict[str, Any] = json.loads(sink)
    out.update(size=size, count=count, transport=transport)
    return out


def w2(
    size: int = 64,
    count: int = 20_000,
    pinned: bool | str = False,
    warmup: int = 500,
    transport: str = "shm",
    timeout: float = 300.0,
) -> dict[str, Any]:
    """W2: ping-pong round trips of ``size`` bytes; ``p50_us``, ``p99_us``, ``mean_us``.

    ``pinned``: False (the scheduler decides), True/"same" (both on CPU 0) or
    "split" (CPU 0 and CPU 1: every wake-up crosses CPUs).
    """
    from ipcbus.transports.shm import DEFAULT_RING_SIZE

    job = {"size": size, "count": count, "warmup": warmup}
    _, ping = _pair(
        transport, {**job, "job": "echo"}, {**job, "job": "ping"}, pinned, DEFAULT_RING_SIZE, timeout
    )
    out: dict[str, Any] = json.loads(ping)
    out.update(size=size, transport=transport, pinned=pinned)
    return out


def memcpy(size: int = MiB, count: int | None = None) -> dict[str, Any]:
    """In-process copies of ``size`` bytes: the physical limit for W1.

    ``mb_s``/``msgs_s``: ``memoryview`` slice assignment into a preallocated
    buffer (what the writer does into the ring).  ``bytes_mb_s``: ``bytes()``
    of a slice, allocation included (what the reader does out of it).
    """
    count = count or _count_for(size)
    src = memoryview(b"x" * size)
    dst = memoryview(bytearray(size))
    for _ in range(max(1, count // 20)):
        dst[:] = src
    t0 = time.perf_counter_ns()
    for _ in range(count):
        dst[:] = src
    t1 = time.perf_counter_ns()
    n2 = max(1, count // 2)
    t2 = time.perf_counter_ns()
    for _ in range(n2):
        bytes(src)
    t3 = time.perf_counter_ns()
    secs = (t1 - t0) / 1e9
    return {
        "secs": secs,
        "msgs_s": count / secs,
        "mb_s": count * size / secs / 1e6,
        "bytes_mb_s": n2 * size / ((t3 - t2) / 1e9) / 1e6,
        "size": size,
        "count": count,
    }


def sem_costs(count: int = 200_000) -> dict[str, float]:
    """Nanoseconds per operation: POSIX post / trywait / getvalue, SysV V / P (in this process)."""
    import posix_ipc
    import sysv_ipc

    out: dict[str, float] = {}
    name = f"/ipcbus-bench.{os.getpid()}"
    s = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
    try:
        s.unlink()
        t0 = time.perf_counter_ns()
        for _ in range(count):
            s.release()
        t1 = time.perf_counter_ns()
        for _ in range(count):
            s.acquire(0)
        t2 = time.perf_counter_ns()
        for _ in range(count):
            _ = s.value
        t3 = time.perf_counter_ns()
        out.update(
            posix_post_ns=(t1 - t0) / count,
            posix_trywait_ns=(t2 - t1) / count,
            posix_value_ns=(t3 - t2) / count,
        )
    finally:
        s.close()
    n = min(count, 30_000)  # SysV semaphores stop at SEMVMX (32767)
    y = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, 0o600, 0)
    try:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            y.release()
        t1 = time.perf_counter_ns()
        for _ in range(n):
            y.acquire(0)
        t2 = time.perf_counter_ns()
        out.update(sysv_v_ns=(t1 - t0) / n, sysv_p_ns=(t2 - t1) / n)
    finally:
        y.remove()
    return out


# -- wake-up mechanisms: semaphore + thread vs FIFO doorbell -------------------------


async def _wake_child(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One end of :func:`wake_compare`: a ping-pong of bare wake-ups."""
    loop = asyncio.get_running_loop()
    count, warmup = spec["count"], spec["warmup"]
    if spec["mech"] == "sem":
        import posix_ipc

        mine = posix_ipc.Semaphore(spec["mine"])
        other = posix_ipc.Semaphore(spec["other"])
        fut: asyncio.Future[None] | None = None
        go = threading.Semaphore(0)
        stop = False

        def wake() -> None:
            if fut is not None and not fut.done():
                fut.set_result(None)

        def run() -> None:  # the transport's waiter thread, reduced to its essence
            while True:
                go.acquire()
                if stop:
                    return
                mine.acquire()
                loop.call_soon_threadsafe(wake)

        t = threading.Thread(target=run, daemon=True)
        t.start()

        async def recv() -> None:
            nonlocal fut
            if mine.value > 0:
                mine.acquire(0)
                return
            fut = loop.create_future()
            go.release()
            await fut

        def send() -> None:
            other.release()

        def close() -> None:
            nonlocal stop
            stop = True
            go.release()
            t.join()
            mine.close()
            other.close()

    else:
        rfd = os.open(spec["mine"], os.O_RDWR | os.O_NONBLOCK)
        wfd = os.open(spec["other"], os.O_RDWR | os.O_NONBLOCK)
        ev = asyncio.Event()

        def readable() -> None:
            os.read(rfd, 4096)
            ev.set()

        loop.add_reader(rfd, readable)

        async def recv() -> None:
            await ev.wait()
            ev.clear()

        def send() -> None:
            os.write(wfd, b"x")

        def close() -> None:
            loop.remove_reader(rfd)
            os.close(rfd)
            os.close(wfd)

    samples: list[int] = []
    try:
        for i in range(warmup + count):
            if spec["ping"]:
                t0 = time.perf_counter_ns()
                send()
                await recv()
                if i >= warmup:
                    samples.append(time.perf_counter_ns() - t0)
            else:
                await recv()
                send()
    finally:
        close()
    return _latency(samples) if spec["ping"] else None


def wake_compare(count: int = 5_000, pinned: bool | str = False) -> dict[str, dict[str, Any]]:
    """Round trip of a bare wake-up between two event loops, by mechanism.

    ``sem_thread``: a POSIX semaphore posted by the peer, waited for by a
    thread that wakes the loop (``call_soon_threadsafe``) — two wake-ups per
    hop.  ``fifo``: a byte written into a FIFO the loop polls — one wake-up
    per hop, but a ``write``+``read`` system call pair per message and a
    sleeping-flag protocol that needs a store-load fence Python cannot issue
    (see docs/transports/shm.md).
    """
    import posix_ipc

    out: dict[str, dict[str, Any]] = {}
    cs, cc = _cpus(pinned)
    with tempfile.TemporaryDirectory(prefix="ipcbus-wake-") as d:
        for mech in ("sem", "fifo"):
            tag = f"{os.getpid()}.{mech}"
            if mech == "sem":
                names = (f"/ipcbus-wake.{tag}.a", f"/ipcbus-wake.{tag}.b")
                sems = [posix_ipc.Semaphore(n, posix_ipc.O_CREX, 0o600, 0) for n in names]
            else:
                names = (f"{d}/a", f"{d}/b")
                for n in names:
                    os.mkfifo(n, 0o600)
                sems = []
            try:
                base = {"mech": mech, "count": count, "warmup": 200}
                echo = _spawn(
                    {"wake": True, **base, "ping": False, "mine": names[1], "other": names[0], "cpu": cs}
                )
                ping = _spawn(
                    {"wake": True, **base, "ping": True, "mine": names[0], "other": names[1], "cpu": cc}
                )
                res = ping.communicate(timeout=120)[0]
                echo.wait(timeout=120)
                out["sem_thread" if mech == "sem" else "fifo"] = json.loads(res)
            finally:
                for s in sems:
                    with contextlib.suppress(posix_ipc.Error):
                        s.unlink()
                    s.close()
    return out


# -- the report ---------------------------------------------------------------------


def _fmt_size(n: int) -> str:
    if n >= MiB:
        return f"{n // MiB} MiB"
    if n >= KiB:
        return f"{n // KiB} KiB"
    return f"{n} B"


def _zmq_w1(size: int, count: int) -> dict[str, Any] | None:
    try:
        from ipcbus.bench.baselines import zmq_w1
        from ipcbus.bench.workloads import Params

        return dict(zmq_w1(Params(size=size, count=count, warmup=max(1, count // 20))))
    except Exception as exc:  # the baseline is optional here
        print(f"   (pyzmq baseline unavailable: {exc})")
        return None


def main(argv: Sequence[str] | None = None) -> None:
    """Print every figure of this module (``--quick``: fewer messages)."""
    ap = argparse.ArgumentParser(prog="python -m ipcbus.bench.shm_raw", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a tenth of the messages")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        if spec.get("wake"):
            cpu = spec.get("cpu")
            if cpu is not None:
                os.sched_setaffinity(0, {int(cpu)})
            try:
                import uvloop

                res = uvloop.run(_wake_child(spec))
            except ImportError:  # pragma: no cover
                res = asyncio.run(_wake_child(spec))
            if res is not None:
                print(json.dumps(res), flush=True)
            return
        _child_main(spec)
        return
    div = 10 if args.quick else 1
    results: dict[str, Any] = {"w1": [], "w2": [], "ring": []}
    print(
        "W1 one-way stream, MB/s (msgs/s); shm = direct ShmLink, pipe = PipeLink,"
        " children on uvloop, unpinned"
    )
    print(f"{'size':>8} {'shm':>22} {'pipe':>22} {'shm/pipe':>9} {'memcpy':>9} {'bytes()':>9} {'pyzmq':>9}")
    for size in SIZES:
        n = max(50, _count_for(size) // div)
        s = w1(size, n)
        p = w1(size, n, transport="pipe")
        m = memcpy(size, n)
        z = _zmq_w1(size, n) if size >= 64 * KiB else None
        results["w1"].append({"size": size, "shm": s, "pipe": p, "memcpy": m, "zmq": z})
        zs = f"{z['mb_s']:9.0f}" if z else f"{'-':>9}"
        print(
            f"{_fmt_size(size):>8} {s['mb_s']:9.0f} ({s['msgs_s']:9.0f}) "
            f"{p['mb_s']:9.0f} ({p['msgs_s']:9.0f}) {s['msgs_s'] / p['msgs_s']:8.2f}x "
            f"{m['mb_s']:9.0f} {m['bytes_mb_s']:9.0f} {zs}"
        )
    print("\nW1 1 MiB by placement, MB/s (best of 3): unpinned / one CPU / two CPUs")
    for tr in ("shm", "pipe"):
        row = {}
        for pin in (False, True, "split"):
            row[str(pin)] = max(
                (w1(MiB, max(50, 3000 // div), pinned=pin, transport=tr) for _ in range(3)),
                key=lambda r: float(r["mb_s"]),
            )
        results.setdefault("placement", []).append({"transport": tr, **row})
        print(f"   {tr:>4}: " + " / ".join(f"{row[k]['mb_s']:6.0f}" for k in ("False", "True", "split")))
    print("\nW1 1 MiB through shm by ring size, MB/s (best of 3): unpinned / two CPUs")
    for ring in (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB):
        cells = []
        for pin in (False, "split"):
            r = max(
                (w1(MiB, max(50, 3000 // div), ring_size=ring, pinned=pin) for _ in range(3)),
                key=lambda r: float(r["mb_s"]),
            )
            results["ring"].append({"ring_size": ring, "pinned": pin, **r})
            cells.append(f"{r['mb_s']:6.0f}")
        print(f"   ring {_fmt_size(ring):>7}: " + " / ".join(cells))
    print("\nW2 ping-pong 64 B, round trip us (p50 / p99)")
    for pinned in (False, "same", "split"):
        row = {}
        for tr in ("shm", "pipe"):
            row[tr] = w2(64, max(1000, 20_000 // div), pinned=pinned, transport=tr)
        results["w2"].append({"pinned": pinned, **row})
        label = {False: "unpinned", "same": "one CPU", "split": "two CPUs"}[pinned]
        print(
            f"   {label:>9}: shm {row['shm']['p50_us']:6.1f} / {row['shm']['p99_us']:6.1f}"
            f"   pipe {row['pipe']['p50_us']:6.1f} / {row['pipe']['p99_us']:6.1f}"
            f"   shm/pipe p50 {row['shm']['p50_us'] / row['pipe']['p50_us']:.2f}x"
        )
    print("\nWaking a sleeping loop, bare round trip us (p50 / p99)")
    for pinned in (False, "same", "split"):
        wc = wake_compare(max(1000, 5000 // div), pinned=pinned)
        results.setdefault("wake", []).append({"pinned": pinned, **wc})
        label = {False: "unpinned", "same": "one CPU", "split": "two CPUs"}[pinned]
        print(
            f"   {label:>9}: sem+thread {wc['sem_thread']['p50_us']:6.1f} / "
            f"{wc['sem_thread']['p99_us']:6.1f}   fifo doorbell {wc['fifo']['p50_us']:6.1f} / "
            f"{wc['fifo']['p99_us']:6.1f}"
        )
    sc = sem_costs(max(20_000, 200_000 // div))
    results["sem_costs"] = sc
    print(
        "\nSemaphore operation cost, ns: POSIX post {posix_post_ns:.0f}, trywait "
        "{posix_trywait_ns:.0f}, getvalue {posix_value_ns:.0f}; SysV V {sysv_v_ns:.0f}, "
        "P {sysv_p_ns:.0f}".format(**sc)
    )
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
