"""A fault-injection client: ``tests.hub_client`` plus numbered, checked traffic.

Child side, run from the repository root::

    python -m tests.faults.agent BUS [--transport T] [--reconnect] [--name NAME]
    python -m tests.faults.agent churn BUS --cycles N [--transports fifo,sysv,shm]

The first form is a :mod:`tests.hub_client` child (same JSON-lines protocol,
same commands, same events) with these extra commands:

``seqsub`` ``name subject [max_pending]``
    subscribe and *check* every message: payloads carry a source name, a
    sequence number and a body derived from both (see :func:`payload`), so
    the reader counts gaps (lost messages), duplicates or reordering, and
    corrupted payloads, per source;
``check`` ``name``
    flush (if the link is still up), then the checker's counters;
``wait_seq`` ``name src n``
    wait until messages ``0 .. n-1`` of ``src`` have been read (or skipped
    as lost) by ``name``;
``pubseq`` ``subject src count [size]``
    publish the next ``count`` numbered messages of ``src``, then flush;
    answers ``acked``: how many messages of ``src`` the hub has confirmed;
``stream`` ``subject src [size] [every]``
    publish numbered messages in the background, flushing every ``every``
    messages and printing ``{"ev": "acked", "src", "n"}`` after each flush;
    on failure prints ``{"ev": "stream_error", "src", "type", "msg", "sent"}``;
``stop_stream``
    stop it, flush, and answer ``acked`` (everything sent so far);
``reqseq`` ``subject src count``
    ``count`` sequential requests with numbered payloads; every reply must
    echo its request (``acked`` is the number answered correctly);
``link_objects``
    the hub link's transport and kernel objects (``LinkInfo.objects``);
``link_state``
    how the hub link looks from here (for failure messages).

The ``churn`` form connects, publishes one numbered message on ``churn``
(source ``C``), flushes and closes, ``N`` times in sequence, cycling through
the transports; it prints one JSON summary line and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import sys
import time
from typing import Any

# Run as `python -m tests.faults.agent` from the repository root (never imported by pytest).
from tests.hub_client import _child, _Client, _say

# -- numbered payloads ---------------------------------------------------------

SEQ_HEADER = struct.Struct("!8sQI")
"""Payload header: source (8 bytes, NUL padded), sequence number, body length."""


def payload(src: str, seq: int, size: int = 0) -> bytes:
    """Message ``seq`` of ``src``: a header and ``size`` body bytes derived from both."""
    body = bytes([(seq + len(src)) & 0xFF]) * size
    return SEQ_HEADER.pack(src.encode()[:8], seq, size) + body


def parse(data: bytes) -> tuple[str, int]:
    """(source, seq) of a numbered payload; ValueError if it is not an intact one."""
    if len(data) < SEQ_HEADER.size:
        raise ValueError(f"{len(data)} bytes: shorter than the header")
    raw_src, seq, size = SEQ_HEADER.unpack_from(data)
    src = raw_src.rstrip(b"\0").decode()
    if data != payload(src, seq, size):
        raise ValueError(f"message {seq} of {src!r}: body does not match its header")
    return src, seq


class Checker:
    """Per-source ordering and integrity check of the numbered messages one subscription read."""

    def __init__(self) -> None:
        self.next: dict[str, int] = {}
        self.received = 0
        self.gaps = 0
        self.dups = 0
        self.corrupt = 0
        self.slow = 0
        self.changed = asyncio.Event()

    def feed(self, data: bytes) -> None:
        """Account for one message."""
        try:
            src, seq = parse(data)
        except (ValueError, UnicodeDecodeError):
            self.corrupt += 1
            return
        expected = self.next.get(src, 0)
        if seq < expected:
            self.dups += 1  # a duplicate or an older message after a newer one
            return
        self.gaps += seq - expected
        self.next[src] = seq + 1
        self.received += 1
        self.changed.set()

    def summary(self) -> dict[str, Any]:
        """The counters, JSON-ready."""
        return {
            "received": self.received,
            "next": dict(self.next),
            "gaps": self.gaps,
            "dups": self.dups,
            "corrupt": self.corrupt,
            "slow": self.slow,
        }


# -- child side ----------------------------------------------------------------------


class Agent(_Client):
    """``tests.hub_client``'s command runner with the fault-injection commands."""

    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        self.seq: dict[str, int] = {}
        self.checkers: dict[str, Checker] = {}
        self.stream_task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Also stop a running stream."""
        await super().stop()
        if self.stream_task is not None:
            self.stream_task.cancel()
            with contextlib.suppress(BaseException):
                await self.stream_task

    async def _read_seq(self, name: str, sub: Any) -> None:
        from ipcbus.errors import SlowConsumer

        chk = self.checkers[name]
        while True:
            try:
                m = await sub.next()
            except SlowConsumer as exc:
                chk.slow += exc.dropped
                _say(ev="slow", sub=name, dropped=exc.dropped)
                continue
            except Exception:
                return
            chk.feed(m.data)

    async def _publish_next(self, subject: str, src: str, size: int) -> None:
        n = self.seq.get(src, 0)
        await self.bus.publish(subject, payload(src, n, size))
        self.seq[src] = n + 1

    async def _stream(self, subject: str, src: str, size: int, every: int) -> None:
        try:
            while True:
                for _ in range(every):
                    await self._publish_next(subject, src, size)
                await self.bus.flush()
                _say(ev="acked", src=src, n=self.seq[src])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _say(ev="stream_error", src=src, type=type(exc).__name__, msg=str(exc), sent=self.seq.get(src, 0))

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one command (the extra ones here, the rest in ``tests.hub_client``)."""
        op = cmd["op"]
        bus = self.bus
        if op == "seqsub":
            name = cmd["name"]
            sub = await bus.subscribe(cmd["subject"], max_pending=cmd.get("max_pending", 65536))
            self.subs[name] = sub
            self.checkers[name] = Checker()
            bus.node.task_group.start_soon(self._read_seq, name, sub)
            await bus.flush()
            return {}
        if op == "check":
            if not bus.closed:
                with contextlib.suppress(Exception):
                    await bus.flush(timeout=5.0)
            return self.checkers[cmd["name"]].summary()
        if op == "wait_seq":
            chk = self.checkers[cmd["name"]]
            while chk.next.get(cmd["src"], 0) < cmd["n"]:
                chk.changed.clear()
                await chk.changed.wait()
            return chk.summary()
        if op == "pubseq":
            src = cmd["src"]
            for _ in range(cmd["count"]):
                await self._publish_next(cmd["subject"], src, cmd.get("size", 0))
            await bus.flush()
            return {"acked": self.seq[src]}
        if op == "stream":
            if self.stream_task is not None:
                raise RuntimeError("a stream is already running")
            self.stream_task = asyncio.get_running_loop().create_task(
                self._stream(cmd["subject"], cmd["src"], cmd.get("size", 0), cmd.get("every", 20))
            )
            return {}
        if op == "stop_stream":
            task, self.stream_task = self.stream_task, None
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await bus.flush()
            return {"acked": self.seq.get(cmd["src"], 0)}
        if op == "reqseq":
            src = cmd["src"]
            for _ in range(cmd["count"]):
                n = self.seq.get(src, 0)
                data = payload(src, n, cmd.get("size", 0))
                rep = await bus.request(cmd["subject"], data, timeout=cmd.get("timeout", 10.0))
                if rep.data != data:
                    raise AssertionError(f"request {n} of {src!r}: the reply does not echo it")
                self.seq[src] = n + 1
            return {"acked": self.seq.get(src, 0)}
        if op == "link_objects":
            info = bus.hub_link.link.info
            return {"transport": info.transport, "objects": info.objects}
        if op == "link_state":
            ls = bus.hub_link
            return {
                "link": repr(ls.link),
                "link_closed": ls.link.closed,
                "node_dropped": ls.closed.is_set(),
                "reason": ls.close_reason,
                "interest": sorted(k[0] for k in ls.remote_keys),
                "debug": {
                    k: repr(v)
                    for k, v in vars(ls.link).items()
                    if k in ("_broken", "_rx_end", "_peer_gone", "_paused", "_tx")
                },
            }
        return await super().run(cmd)


async def _agent(args: argparse.Namespace) -> int:
    return await _child(args, Agent, "fault-agent")


async def _churn(args: argparse.Namespace) -> int:
    """Connect, publish one numbered message, flush, close: ``cycles`` times."""
    import ipcbus

    transports = [t for t in args.transports.split(",") if t]
    start = time.monotonic()
    per: dict[str, int] = {}
    for i in range(args.cycles):
        t = transports[i % len(transports)]
        try:
            async with ipcbus.connect(args.bus, transport=t, name=f"churn-{i}") as bus:
                await bus.publish(args.subject, payload(args.src, args.first + i))
                await bus.flush()
        except Exception as exc:
            _say(ev="error", op="churn", cycle=i, transport=t, type=type(exc).__name__, msg=str(exc))
            return 4
        per[t] = per.get(t, 0) + 1
    _say(ev="churned", cycles=args.cycles, per_transport=per, seconds=time.monotonic() - start)
    return 0


def main() -> None:
    """Entry point of the child process."""
    if len(sys.argv) > 1 and sys.argv[1] == "churn":
        p = argparse.ArgumentParser(prog="python -m tests.faults.agent churn")
        p.add_argument("bus")
        p.add_argument("--cycles", type=int, default=200)
        p.add_argument("--transports", default="fifo,sysv,shm")
        p.add_argument("--subject", default="churn")
        p.add_argument("--src", default="C")
        p.add_argument("--first", type=int, default=0, help="sequence number of the first message")
        args = p.parse_args(sys.argv[2:])
        sys.exit(asyncio.run(_churn(args)))
    p = argparse.ArgumentParser(prog="python -m tests.faults.agent")
    p.add_argument("bus")
    p.add_argument("--transport", default="fifo")
    p.add_argument("--name", default="")
    p.add_argument("--reconnect", action="store_true")
    args = p.parse_args()
    sys.exit(asyncio.run(_agent(args)))


if __name__ == "__main__":
    main()
