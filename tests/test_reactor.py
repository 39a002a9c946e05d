"""The reactor across nodes: two or three Nodes in this process, linked by memory and pipe links.

The usual shape is a tree ``A - hub - B`` (sometimes with a third leaf
``C`` on the hub).  Interest travels as Sub/Unsub frames, so before
publishing a test *settles* the tree: every node flushes (ping/pong) in
turn, twice, which proves that every frame sent before has been processed
two hops away.  Nothing here sleeps to order events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import pytest

import ipcbus.node as node_module
from ipcbus import frames as fr
from ipcbus.client import Bus, Msg, Subscription
from ipcbus.errors import (
    BusClosed,
    ConnectionClosed,
    EndOfStream,
    FrameTooLarge,
    NoResponders,
    RequestTimeout,
    SlowConsumer,
)
from ipcbus.node import Deadlines, LinkState, Node
from ipcbus.transports.base import Link
from ipcbus.transports.memory import memory_pair
from ipcbus.transports.pipe import pipe_pair
from ipcbus.transports.stream import FdStreamLink

KINDS = ["memory", "pipe"]


def make_pair(kind: str, **kw: int) -> tuple[Link, Link]:
    """Two connected links of ``kind`` in this process."""
    if kind == "memory":
        return memory_pair(**kw)
    return pipe_pair(**kw)


async def connect(x: Node, y: Node, kind: str, **kw: int) -> tuple[LinkState, LinkState]:
    """Link two nodes; returns (x's view of the link, y's view)."""
    a, b = make_pair(kind, **kw)
    return await connect_links(x, y, a, b)


async def connect_links(x: Node, y: Node, a: Link, b: Link) -> tuple[LinkState, LinkState]:
    """Attach ``a`` to ``x`` and ``b`` to ``y`` and wait for both handshakes."""
    lx = await x.add_link(a, name=y.name, wait=False)
    ly = await y.add_link(b, name=x.name)
    with anyio.fail_after(10):
        await lx.ready.wait()
    return lx, ly


async def settle(*nodes: Node) -> None:
    """Every frame sent so far has been processed up to two hops away."""
    for _ in range(2):
        for n in nodes:
            await n.flush()


@dataclass
class Tree:
    """A - hub - B (and C on the hub when asked), with the buses and link views."""

    a: Bus
    hub: Bus
    b: Bus
    c: Bus | None
    a_hub: LinkState  # A's link to the hub
    hub_a: LinkState
    hub_b: LinkState
    b_hub: LinkState
    hub_c: LinkState | None

    @property
    def nodes(self) -> list[Node]:
        out = [self.a.node, self.hub.node, self.b.node]
        if self.c is not None:
            out.append(self.c.node)
        return out

    async def settle(self) -> None:
        await settle(*self.nodes)


@contextlib.asynccontextmanager
async def tree(
    kind: str, *, with_c: bool = False, hub_kw: dict[str, int] | None = None, **link_kw: int
) -> AsyncIterator[Tree]:
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(name="A"))
        hub = await stack.enter_async_context(Node(name="hub", **(hub_kw or {})))
        b = await stack.enter_async_context(Node(name="B"))
        a_hub, hub_a = await connect(a, hub, kind, **link_kw)
        hub_b, b_hub = await connect(hub, b, kind, **link_kw)
        cbus = None
        hub_c = None
        if with_c:
            c = await stack.enter_async_context(Node(name="C"))
            hub_c, _ = await connect(hub, c, kind, **link_kw)
            cbus = Bus(c)
        yield Tree(Bus(a), Bus(hub), Bus(b), cbus, a_hub, hub_a, hub_b, b_hub, hub_c)


async def drain_sub(sub: Subscription, n: int, timeout: float = 10) -> list[bytes]:
    """Read exactly ``n`` messages."""
    with anyio.fail_after(timeout):
        return [(await sub.next()).data for _ in range(n)]


# -- pub/sub and interest --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_wildcards_across_three_nodes(kind: str) -> None:
    async with tree(kind) as t:
        b_star = await t.b.subscribe("orders.*.created")
        b_tail = await t.b.subscribe("orders.>")
        a_eu = await t.a.subscribe("orders.eu.*")
        hub_exact = await t.hub.subscribe("orders.eu.created")
        b_other = await t.b.subscribe("invoices.>")
        await t.settle()
        for subject in ["orders.eu.created", "orders.us.created", "orders.eu.x.y", "orders", "x"]:
            await t.a.publish(subject, subject.encode())
        await t.settle()
        for subject in ["orders.eu.deleted", "orders.us.created"]:
            await t.b.publish(subject, subject.encode())
        await t.settle()
        assert await drain_sub(b_star, 3) == [
            b"orders.eu.created",
            b"orders.us.created",
            b"orders.us.created",
        ]
        assert await drain_sub(b_tail, 5) == [
            b"orders.eu.created",
            b"orders.us.created",
            b"orders.eu.x.y",
            b"orders.eu.deleted",
            b"orders.us.created",
        ]
        assert await drain_sub(a_eu, 2) == [b"orders.eu.created", b"orders.eu.deleted"]
        assert await drain_sub(hub_exact, 1) == [b"orders.eu.created"]
        for sub in (b_star, b_tail, a_eu, hub_exact, b_other):
            assert sub.pending == 0, f"{sub} got more than it matches"


def _out(ls: LinkState) -> int:
    return ls.link.info.msgs_out


@pytest.mark.parametrize("kind", KINDS)
async def test_messages_only_cross_links_where_someone_wants_them(kind: str) -> None:
    async with tree(kind) as t:
        to_b = await t.b.subscribe("to.b")
        at_hub = await t.hub.subscribe("hub.only")
        await t.settle()
        assert t.a.node.has_interest("to.b") and t.a.node.has_interest("hub.only")
        assert not t.a.node.has_interest("to.none")

        a0, ha0, hb0 = _out(t.a_hub), _out(t.hub_a), _out(t.hub_b)
        for i in range(5):
            await t.a.publish("to.b", b"%d" % i)
            await t.a.publish("to.none", b"x")  # nobody: stays in A
        assert _out(t.a_hub) - a0 == 5
        await drain_sub(to_b, 5)
        assert _out(t.hub_b) - hb0 == 5
        assert _out(t.hub_a) - ha0 == 0  # nothing went back towards the publisher

        hb0 = _out(t.hub_b)
        await t.a.publish("hub.only", b"h")
        await drain_sub(at_hub, 1)
        assert _out(t.hub_b) - hb0 == 0, "hub-only message crossed to B"

        # B's messages to nobody stay in B; the hub's never go to A
        b0, ha0 = _out(t.b_hub), _out(t.hub_a)
        await t.b.publish("to.none", b"x")
        await t.hub.publish("to.b", b"from hub")
        assert _out(t.b_hub) - b0 == 0
        assert _out(t.hub_a) - ha0 == 0
        assert (await to_b.next(timeout=5)).data == b"from hub"

        # unsubscribe propagates: A stops sending
        await to_b.unsubscribe()
        await t.settle()
        assert not t.a.node.has_interest("to.b")
        a0 = _out(t.a_hub)
        await t.a.publish("to.b", b"late")
        assert _out(t.a_hub) - a0 == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_interest_is_counted_per_key(kind: str) -> None:
    """Two subscriptions with the same pattern send one Sub; the Unsub waits for the last."""
    async with tree(kind) as t:
        s1 = await t.b.subscribe("k.>")
        s2 = await t.b.subscribe("k.>")
        await t.settle()
        (hub_b,) = [ls for ls in t.hub.stats()["links"] if ls["peer_name"] == "B"]
        interest = [k for k in hub_b["interest"] if not k.startswith("_INBOX.")]
        assert interest == ["k.>"]
        assert f"_INBOX.{t.b.node.node_id}.*" in hub_b["interest"]
        await s1.unsubscribe()
        await t.settle()
        assert t.a.node.has_interest("k.x")
        await t.a.publish("k.x", b"1")
        assert (await s2.next(timeout=5)).data == b"1"
        await s2.unsubscribe()
        await t.settle()
        assert not t.a.node.has_interest("k.x")
        assert not t.hub.node.has_interest("k.x")


@pytest.mark.parametrize("kind", KINDS)
async def test_late_link_learns_existing_interest(kind: str) -> None:
    async with Node(name="x") as x, Node(name="y") as y:
        sub = await Bus(x).subscribe("early.*")
        await connect(x, y, kind)
        await settle(x, y)
        assert y.has_interest("early.bird")
        await Bus(y).publish("early.bird", b"worm")
        assert (await sub.next(timeout=5)).data == b"worm"


# -- queue groups ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_queue_groups_exactly_once_per_group(kind: str) -> None:
    async with tree(kind, with_c=True) as t:
        assert t.c is not None
        workers = [
            await t.a.subscribe("jobs.*", queue="workers"),
            await t.hub.subscribe("jobs.*", queue="workers"),
            await t.b.subscribe("jobs.*", queue="workers"),
            await t.b.subscribe("jobs.*", queue="workers"),
            await t.c.subscribe("jobs.>", queue="workers"),
        ]
        audit = [
            await t.hub.subscribe("jobs.>", queue="audit"),
            await t.b.subscribe("jobs.*", queue="audit"),
        ]
        plain = await t.c.subscribe("jobs.*")
        await t.settle()
        n = 120
        publishers = [t.a, t.hub, t.b, t.c]
        for i in range(n):
            await publishers[i % 4].publish(f"jobs.{i}", b"%d" % i)
        await t.settle()

        async def collect(subs: list[Subscription]) -> list[collections.Counter[int]]:
            per_member: list[collections.Counter[int]] = [collections.Counter() for _ in subs]
            total = 0
            with anyio.fail_after(10):
                while total < n:
                    progressed = False
                    for k, s in enumerate(subs):
                        while s.pending:
                            per_member[k][int((await s.next()).data)] += 1
                            total += 1
                            progressed = True
                    if not progressed:
                        await settle(*t.nodes)
            await settle(*t.nodes)
            assert all(s.pending == 0 for s in subs), "a group got more than n messages"
            return per_member

        for name, group in (("workers", workers), ("audit", audit)):
            members = await collect(group)
            union: collections.Counter[int] = collections.Counter()
            for m in members:
                union.update(m)
            assert union == collections.Counter(range(n)), f"{name}: not exactly once"
            used = sum(1 for m in members if m)
            assert used >= 2, f"{name}: messages were not split ({[sum(m.values()) for m in members]})"
        # a plain subscriber gets everything (order is per publisher, not global)
        assert sorted(int(x) for x in await drain_sub(plain, n)) == list(range(n))


@pytest.mark.parametrize("kind", KINDS)
async def test_queue_group_members_local_and_remote_share_the_load(kind: str) -> None:
    async with tree(kind) as t:
        local = await t.a.subscribe("q", queue="g")
        remote = await t.b.subscribe("q", queue="g")
        await t.settle()
        for i in range(60):
            await t.a.publish("q", b"%d" % i)
        await t.settle()
        got_local = [int(m) for m in await drain_sub(local, local.pending)]
        with anyio.fail_after(10):
            got_remote = [int((await remote.next()).data) for _ in range(60 - len(got_local))]
        assert sorted(got_local + got_remote) == list(range(60))
        assert got_local and got_remote


@pytest.mark.parametrize("kind", KINDS)
async def test_requests_to_a_queue_group_reach_local_and_remote_members(kind: str) -> None:
    # A request's fast path must not count a pick of the local member before
    # handing it to the general path (which would then pick the remote one,
    # every time).
    async with tree(kind) as t:
        await t.a.serve("svc", lambda m: b"local", queue="g")
        await t.b.serve("svc", lambda m: b"remote", queue="g")
        await t.settle()
        seen: collections.Counter[bytes] = collections.Counter()
        for _ in range(40):
            seen[(await t.a.request("svc", timeout=5)).data] += 1
        assert seen[b"local"] >= 10 and seen[b"remote"] >= 10, seen


async def test_a_reply_subject_chosen_by_the_publisher_is_tracked_on_every_link() -> None:
    # publish(..., reply=...) with the same reply subject, to a group whose
    # members are behind two links: both links wait for a reply on it, and
    # the replies leave neither link looking busy.
    async with tree("memory", with_c=True) as t:
        assert t.c is not None and t.hub_c is not None
        await t.b.serve("svc", lambda m: b"b", queue="g")
        await t.c.serve("svc", lambda m: b"c", queue="g")
        results = await t.hub.subscribe("results")
        await t.settle()
        await t.hub.publish("svc", b"1", reply="results")
        await t.hub.publish("svc", b"2", reply="results")
        assert set(t.hub.node._reply_routes["results"]) == {t.hub_b, t.hub_c}
        got = {(await results.next(timeout=5)).data for _ in range(2)}
        assert got == {b"b", b"c"}
        assert not t.hub_b.inflight and not t.hub_c.inflight


# -- request / reply across the tree ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_request_reply_across_the_tree(kind: str) -> None:
    async with tree(kind) as t:
        await t.b.serve("math.double", lambda x: x * 2)  # untyped: gets the Msg

        def double(x: int) -> int:
            return x * 2

        await t.b.serve("math.twice", double)
        await t.settle()
        rep = await t.a.request("math.twice", 21, timeout=5)
        assert rep.decode(int) == 42
        # the requester's reply does not leave traces
        assert not t.a.node.inbox.futures
        for ls in (t.hub_a, t.hub_b, t.a_hub):
            assert not ls.inflight
        # 50 concurrent requests, each gets its own answer
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = (await t.a.request("math.twice", i, timeout=5)).decode(int)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert results == {i: 2 * i for i in range(50)}


@pytest.mark.parametrize("kind", KINDS)
async def test_no_responders_far_away(kind: str) -> None:
    """Interest known at A, gone at B by the time the request arrives: NoResponders, no timeout."""
    async with tree(kind) as t:
        sub = await t.b.subscribe("svc")
        await t.settle()
        await sub.unsubscribe()  # the Unsub is still on its way
        assert t.a.node.has_interest("svc")
        with pytest.raises(NoResponders) as info:
            await t.a.request("svc", b"?", timeout=30)
        assert info.value.subject == "svc"
        assert not t.a.node.inbox.futures
        with pytest.raises(NoResponders):
            await t.a.request("nobody.at.all", timeout=30)


@pytest.mark.parametrize("kind", KINDS)
async def test_no_responders_from_one_link_waits_for_the_others(kind: str) -> None:
    # The hub passes the request to B (a plain subscriber, gone by the time it
    # arrives: B answers no-responders) and to C (a service): C's answer wins.
    async with tree(kind, with_c=True) as t:
        assert t.c is not None and t.hub_c is not None
        sub = await t.b.subscribe("svc")
        await t.c.serve("svc", lambda m: b"served", queue="g")
        await t.settle()
        await sub.unsubscribe()  # the Unsub is still on its way
        rep = await t.a.request("svc", b"?", timeout=10)
        assert rep.data == b"served"
        await t.settle()
        assert not t.hub_b.inflight and not t.hub_c.inflight
        assert not t.hub.node._reply_routes


@pytest.mark.parametrize("kind", KINDS)
async def test_request_timeout_is_a_timeout_error(kind: str) -> None:
    async with tree(kind) as t:
        silent = await t.b.subscribe("silent")  # takes requests, never answers
        await t.settle()
        with pytest.raises(TimeoutError) as info:
            await t.a.request("silent", b"hello?", timeout=0.2)
        assert isinstance(info.value, RequestTimeout)
        assert info.value.subject == "silent" and info.value.timeout == 0.2
        assert (await silent.next(timeout=5)).data == b"hello?"
        assert not t.a.node.inbox.futures
        # the requester gave up: its own link no longer counts the request as in flight
        assert not t.a_hub.inflight


@pytest.mark.parametrize("kind", KINDS)
async def test_requests_in_flight_fail_at_once_when_the_link_closes(kind: str) -> None:
    async with tree(kind) as t:
        started = asyncio.Event()
        never = asyncio.Event()

        async def stuck(m: Msg) -> bytes:
            started.set()
            await never.wait()
            return b""

        await t.b.serve("stuck", stuck)
        await t.settle()

        async def close_b_link() -> None:
            await started.wait()
            await t.b_hub.link.aclose()  # B's side goes away

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_b_link)
            with pytest.raises(ConnectionClosed) as info:
                await t.a.request("stuck", b"", timeout=30)
        assert not isinstance(info.value, RequestTimeout)
        assert "closed" in str(info.value)
        never.set()
        # the tree without B still answers for what it has
        await t.hub.serve("alive", lambda m: b"yes")
        await t.settle()
        assert (await t.a.request("alive", timeout=5)).data == b"yes"


@pytest.mark.parametrize(("pattern", "waits"), [(">", False), ("stuck", True), ("*", True)])
async def test_a_catch_all_listener_does_not_hold_a_request_whose_responder_died(
    pattern: str, waits: bool
) -> None:
    """A monitor subscribed to '>' gets every request too; when the responder's
    link closes, the requester still learns at once (it would have waited for
    its timeout, the monitor's link counting as one that may answer).  Any
    other pattern may be a service's: then the request stays due."""
    async with tree("memory", with_c=True) as t:
        assert t.c is not None
        monitor = await t.c.subscribe(pattern)
        started = asyncio.Event()

        async def stuck(m: Msg) -> bytes:
            started.set()
            await asyncio.Event().wait()
            return b""

        await t.b.serve("stuck", stuck)
        await t.settle()
        request = asyncio.ensure_future(t.a.request("stuck", b"", timeout=1 if waits else 30))
        await started.wait()
        assert (await monitor.next(timeout=5)).subject == "stuck"
        await t.b_hub.link.aclose()  # the responder's side goes away
        if waits:
            with pytest.raises(RequestTimeout):
                await request
        else:
            with pytest.raises(ConnectionClosed, match="closed"):
                await request
            assert not t.hub.node._reply_routes


@pytest.mark.parametrize("kind", KINDS)
async def test_direct_request_fails_when_its_link_closes(kind: str) -> None:
    """The requester's own node tracks its requests too (no hub in between)."""
    async with Node(name="x") as x, Node(name="y") as y:
        _, ly = await connect(x, y, kind)
        got = asyncio.Event()
        sub = await Bus(y).subscribe("slow")
        await settle(x, y)

        async def kill_when_received() -> None:
            await sub.next(timeout=10)
            got.set()
            await ly.link.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_when_received)
            with pytest.raises(ConnectionClosed):
                await Bus(x).request("slow", b"", timeout=30)
        assert got.is_set()


# -- frames over the limit ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_frame_over_max_on_send_sends_nothing(kind: str) -> None:
    async with Node(name="x", max_frame=64 * 1024) as x, Node(name="y", max_frame=64 * 1024) as y:
        lx, _ = await connect(x, y, kind, max_frame=64 * 1024)
        sub = await Bus(y).subscribe("big")
        await settle(x, y)
        out0 = _out(lx)
        with pytest.raises(FrameTooLarge) as info:
            await Bus(x).publish("big", b"\0" * (64 * 1024))
        assert info.value.limit == 64 * 1024 and info.value.size > 64 * 1024
        assert _out(lx) == out0, "something was sent"
        await Bus(x).publish("big", b"small")
        assert (await sub.next(timeout=5)).data == b"small"
        assert sub.pending == 0


async def test_hub_does_not_forward_a_message_too_large_for_the_next_link() -> None:
    """Hub accepts a big frame from A, B's link has a smaller max: dropped for B only."""
    async with Node(name="A") as a, Node(name="hub") as hub, Node(name="B") as b, Node(name="C") as c:
        await connect(a, hub, "memory")
        la, lb = memory_pair(max_frame=1024)
        await connect_links(hub, b, la, lb)
        await connect(hub, c, "memory")
        sb = await Bus(b).subscribe("x")
        sc = await Bus(c).subscribe("x")
        await settle(a, hub, b, c)
        await Bus(a).publish("x", b"\1" * 4096)
        await Bus(a).publish("x", b"small")
        assert [m for m in await drain_sub(sc, 2)] == [b"\1" * 4096, b"small"]
        assert (await sb.next(timeout=5)).data == b"small"


# -- hostile peers --------------------------------------------------------------------


async def _hello(link: Link, name: str = "raw") -> None:
    link.send_nowait(fr.encode_frame(fr.Hello(fr.PROTOCOL_VERSION, name, os.getpid(), os.getuid(), name)))


@pytest.mark.parametrize(
    "junk",
    [
        b"\xc1",  # never-used msgpack byte
        b"garbage!",
        fr.encode_frame(fr.Msg("a.b", payload=b"xyz"))[:-2],  # truncated frame
        b"\x92\x63\x00",  # unknown tag
        fr.encode_frame(fr.Sub("a..b")),  # invalid subject in a Sub
        fr.encode_frame(fr.Msg("a.*", payload=b"x")),  # wildcard in a published subject
        fr.encode_frame(fr.Msg("", payload=b"x")),  # empty subject
        fr.encode_frame(fr.Hello(fr.PROTOCOL_VERSION, "again", 1, 1)),  # second hello
    ],
    ids=["c1", "garbage", "truncated", "tag", "bad-sub", "wild-pub", "empty-pub", "hello2"],
)
async def test_bad_frames_close_only_that_link(junk: bytes) -> None:
    async with tree("memory") as t:
        sub = await t.b.subscribe("ok.>")
        await t.settle()
        x, raw = memory_pair()
        ls = await t.hub.node.add_link(x, name="evil", wait=False)
        await _hello(raw)
        await raw.send(fr.encode_frame(fr.Sub("ok.>")))
        await raw.send(junk)
        with anyio.fail_after(10):
            await ls.closed.wait()
        assert "protocol error" in ls.close_reason, ls.close_reason
        frames: list[fr.Frame] = []
        with anyio.fail_after(10):
            while True:
                try:
                    frames.append(fr.decode_frame(await raw.recv()))
                except EndOfStream:
                    break
        assert any(isinstance(f, fr.Notice) and f.code == "protocol_error" for f in frames)
        await raw.aclose()
        # the rest of the tree works
        assert not t.hub.node.closed
        await t.a.publish("ok.go", b"1")
        assert (await sub.next(timeout=5)).data == b"1"
        await t.b.serve("svc", lambda m: b"fine")
        await t.settle()
        assert (await t.a.request("svc", timeout=5)).data == b"fine"


async def test_truncated_frame_on_a_pipe_then_eof_is_a_protocol_error() -> None:
    async with Node(name="n") as node:
        down_r, down_w = os.pipe2(os.O_CLOEXEC)
        up_r, up_w = os.pipe2(os.O_CLOEXEC)
        from ipcbus.transports.pipe import PipeLink

        ls = await node.add_link(PipeLink(up_r, down_w), name="cut", wait=False)
        os.close(down_r)
        hello = fr.Hello(fr.PROTOCOL_VERSION, "cut", os.getpid(), os.getuid())
        os.write(up_w, fr.pack(fr.encode_frame(hello)) + fr.HEADER.pack(100) + b"only ten b")
        os.close(up_w)
        with anyio.fail_after(10):
            await ls.closed.wait()
        assert "protocol error" in ls.close_reason
        assert "middle of a frame" in ls.close_reason


# -- flow control at a hub --------------------------------------------------------------


class GatedLink(Link):
    """Wraps a link; while the gate is shut, recv() does not read (a peer that stopped reading)."""

    def __init__(self, inner: Link) -> None:
        self.inner = inner
        self.info = inner.info
        self.max_frame = inner.max_frame
        self.high_water = inner.high_water
        self.gate = asyncio.Event()
        self.gate.set()

    def send_nowait(self, frame: bytes) -> None:
        self.inner.send_nowait(frame)

    @property
    def pending_out(self) -> int:
        return self.inner.pending_out

    async def wait_writable(self, threshold: int | None = None) -> None:
        await self.inner.wait_writable(threshold)

    async def recv(self) -> bytes:
        await self.gate.wait()
        return await self.inner.recv()

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_hub_drops_for_a_slow_link_only_and_reports_it(kind: str) -> None:
    limit = 64 * 1024
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(name="A"))
        hub = await stack.enter_async_context(Node(name="hub", outbound_limit=limit))
        b = await stack.enter_async_context(Node(name="B"))
        c = await stack.enter_async_context(Node(name="C"))
        await connect(a, hub, kind)
        x, y = make_pair(kind)
        gated = GatedLink(y)
        hub_b, _ = await connect_links(hub, b, x, gated)
        await connect(hub, c, kind)
        sb = await Bus(b).subscribe("feed.*")
        sc = await Bus(c).subscribe("feed.*")
        await settle(a, hub, b, c)

        gated.gate.clear()  # B stops reading
        payload = b"\7" * 16384
        n = 400  # 6.4 MB: far more than the pipe/memory buffer plus the hub's limit
        for i in range(n):
            await Bus(a).publish(f"feed.{i}", payload)
        # C gets every message
        got_c = 0
        with anyio.fail_after(20):
            while got_c < n:
                m = await sc.next()
                assert m.subject == f"feed.{got_c}"
                got_c += 1
        st = hub.stats()
        (link_b,) = [ls for ls in st["links"] if ls["peer_name"] == "B"]
        (link_c,) = [ls for ls in st["links"] if ls["peer_name"] == "C"]
        assert link_b["dropped"] > 0 and link_b["slow_consumer_events"] >= 1
        assert link_c["dropped"] == 0
        assert st["dropped"] == link_b["dropped"]
        dropped = link_b["dropped"]

        gated.gate.set()  # B reads again; no further traffic is needed for the report
        seen: list[int] = []
        reported = 0
        with anyio.fail_after(20):
            while len(seen) + reported < n:
                try:
                    seen.append(int((await sb.next()).subject.split(".")[1]))
                except SlowConsumer as exc:
                    assert exc.subject == "feed.*"
                    reported += exc.dropped
        assert reported == dropped
        assert seen == sorted(seen) and len(set(seen)) == len(seen)
        assert Bus(b).stats()["dropped"] >= dropped
        (bsub,) = [s for s in Bus(b).stats()["subscriptions"] if s["subject"] == "feed.*"]
        assert bsub["dropped"] == dropped
        # and later messages flow again
        await Bus(a).publish("feed.last", b"end")
        assert (await sb.next(timeout=5)).data == b"end"
        assert (await sc.next(timeout=5)).data == b"end"
        assert hub_b.dropped == dropped


@pytest.mark.parametrize("kind", KINDS)
async def test_local_publish_waits_instead_of_dropping(kind: str) -> None:
    """Backpressure: publishing towards a stalled peer blocks; nothing is dropped."""
    async with Node(name="x") as x, Node(name="y") as y:
        a, b = make_pair(kind, high_water=64 * 1024)
        gated = GatedLink(b)
        lx, _ = await connect_links(x, y, a, gated)
        sub = await Bus(y).subscribe("bp")
        await settle(x, y)
        gated.gate.clear()
        sent = 0
        blocked = False
        payload = b"\0" * 8192
        while sent < 100_000:
            task = asyncio.ensure_future(Bus(x).publish("bp", payload))
            for _ in range(5):
                await asyncio.sleep(0)  # let the publish run; it blocks once above high water
            sent += 1
            if not task.done():
                blocked = True
                gated.gate.set()
                await task
                break
            task.result()
        assert blocked, "publish never waited for a stalled peer"
        with anyio.fail_after(20):
            for _ in range(sent):
                await sub.next()
        assert x.dropped == 0 and lx.dropped == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_local_publish_is_not_dropped_while_a_link_has_drops_to_report(kind: str) -> None:
    # Only forwarded messages are dropped for a slow link; a publisher in the
    # node itself is queued (and waits above high water), even while the link
    # still owes its peer a drop report.
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(name="A"))
        hub = await stack.enter_async_context(Node(name="hub", outbound_limit=64 * 1024))
        b = await stack.enter_async_context(Node(name="B"))
        await connect(a, hub, kind)
        x, y = make_pair(kind)
        gated = GatedLink(y)
        hub_b, _ = await connect_links(hub, b, x, gated)
        sb = await Bus(b).subscribe("feed.*")
        await settle(a, hub, b)
        gated.gate.clear()  # B stops reading
        i = 0
        with anyio.fail_after(20):
            while not hub_b.dropped_unreported:
                await Bus(a).publish(f"feed.{i}", b"\7" * 16384)
                await asyncio.sleep(0)
                i += 1
        dropped = hub_b.dropped
        await Bus(hub).publish("feed.local", b"LOCAL")
        assert hub_b.dropped == dropped
        gated.gate.set()
        with anyio.fail_after(20):
            while True:
                try:
                    m = await sb.next()
                except SlowConsumer:
                    continue
                if m.subject == "feed.local":
                    break
        assert m.data == b"LOCAL"


@pytest.mark.parametrize("reply", ["a..b", "_INBOX.x.*", "has space", ""])
async def test_bad_reply_subject_from_a_peer_closes_only_that_link(reply: str) -> None:
    """A request whose reply subject is invalid must not reach (and break) a service."""
    async with tree("memory") as t:
        await t.hub.serve("svc", lambda m: b"fine")
        await t.settle()
        x, raw = memory_pair()
        ls = await t.hub.node.add_link(x, name="evil", wait=False)
        await _hello(raw)
        await raw.send(fr.encode_frame(fr.Msg("svc", reply=reply, payload=b"x")))
        with anyio.fail_after(10):
            await ls.closed.wait()
        assert "protocol error" in ls.close_reason, ls.close_reason
        await raw.aclose()
        assert not t.hub.node.closed
        assert (await t.a.request("svc", timeout=5)).data == b"fine"


@pytest.mark.parametrize("token", ["", "a b", "*", ">", "a.", "x" * 5000])
async def test_bad_reply_subject_in_the_peers_own_inbox_closes_only_that_link(token: str) -> None:
    """A request for a queue group picked by the sender (the responder's fast
    path) whose reply subject starts like the peer's own inbox but is not a
    valid subject: refused as any other invalid reply subject, before the
    service sees it."""
    served: list[str] = []

    def handler(m: Msg) -> bytes:
        served.append(m.reply or "")
        return b"fine"

    async with tree("memory") as t:
        await t.hub.serve("svc", handler, queue="q")
        await t.settle()
        assert (await t.a.request("svc", timeout=5)).data == b"fine"  # its route is known
        served.clear()
        x, raw = memory_pair()
        ls = await t.hub.node.add_link(x, name="evil", wait=False)
        await _hello(raw)  # node id "raw": its inbox is _INBOX.raw.
        bad = fr.Msg("svc", reply=f"_INBOX.raw.{token}", payload=b"x", groups=("q",))
        await raw.send(fr.encode_frame(bad))
        with anyio.fail_after(10):
            await ls.closed.wait()
        assert "protocol error" in ls.close_reason, ls.close_reason
        assert served == []
        await raw.aclose()
        assert (await t.a.request("svc", timeout=5)).data == b"fine"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stalled_link_does_not_block_publishing_to_others(kind: str) -> None:
    """Backpressure applies to the links a message goes out on, not to every link."""
    async with Node(name="x") as x, Node(name="y") as y, Node(name="z") as z:
        a, b = make_pair(kind, high_water=64 * 1024)
        gated = GatedLink(b)
        lxy, _ = await connect_links(x, y, a, gated)
        await connect(x, z, kind)
        sy = await Bus(y).subscribe("all")
        sz = await Bus(z).subscribe("z.only")
        await settle(x, y, z)
        gated.gate.clear()
        bx = Bus(x)
        blocked: asyncio.Future[None] | None = None
        payload = b"\0" * 8192
        for _ in range(100_000):
            task = asyncio.ensure_future(bx.publish("all", payload))
            for _ in range(5):
                await asyncio.sleep(0)
            if not task.done():
                blocked = task
                break
            task.result()
        assert blocked is not None, "publish towards a stalled peer never waited"
        assert lxy.link.pending_out > lxy.link.high_water
        # y's link is full, z's is not: publishing to z alone goes through at once
        other = asyncio.ensure_future(bx.publish("z.only", b"for z"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert other.done(), "a publish to z waited for y's stalled link"
        assert (await sz.next(timeout=5)).data == b"for z"
        gated.gate.set()
        with anyio.fail_after(20):
            await blocked
        assert (await sy.next(timeout=5)).data == payload


class HoldingLink(GatedLink):
    """Passes the first frame sent (the hello), holds the others until ``release()``.

    Models a transport that delivers a peer's hello and the interest sent
    right after it in separate reads.
    """

    def __init__(self, inner: Link) -> None:
        super().__init__(inner)
        self.held: list[bytes] | None = []

    def send_nowait(self, frame: bytes) -> None:
        if self.held is not None and self.inner.info.msgs_out >= 1:
            self.held.append(frame)
            return
        self.inner.send_nowait(frame)

    def release(self) -> None:
        held, self.held = self.held or [], None
        for f in held:
            self.inner.send_nowait(f)


class SlowClosingLink(GatedLink):
    """Its close waits for ``let_close`` (a peer that stopped reading, whose
    close waits out its flush timeout); each close begun joins ``begun``."""

    def __init__(self, inner: Link, let_close: asyncio.Event, begun: list[SlowClosingLink]) -> None:
        super().__init__(inner)
        self.let_close = let_close
        self.begun = begun

    async def aclose(self) -> None:
        self.begun.append(self)
        await self.let_close.wait()
        await self.inner.aclose()


async def test_a_closing_node_closes_its_links_at_once_not_one_after_another() -> None:
    """A hub with stopped clients took each one's flush timeout in turn (2 s
    each: 20 s for 10), and its healthy clients heard of the close only
    after all of those."""
    let_close = asyncio.Event()
    begun: list[SlowClosingLink] = []
    node = Node(name="hub")
    await node.start()
    peers = []
    try:
        for i in range(3):
            a, b = memory_pair()
            peers.append(b)
            await node.add_link(SlowClosingLink(a, let_close, begun), name=f"stopped-{i}", wait=False)
        closing = asyncio.ensure_future(node.aclose())
        for _ in range(100):  # loop turns: each close starts in a task of its own
            if len(begun) == 3:
                break
            await asyncio.sleep(0)
        assert len(begun) == 3  # one after another, only the first has begun
        assert not closing.done()
        let_close.set()
        with anyio.fail_after(10):
            await closing
    finally:
        let_close.set()
        await node.aclose()
        for b in peers:
            await b.aclose()


async def test_add_link_returns_once_the_peers_interest_is_known() -> None:
    """A publish right after ``add_link()`` reaches the peer's existing subscribers."""
    async with Node(name="hub") as hub, Node(name="client") as client:
        sub = await Bus(hub).subscribe("early.>")
        a, b = memory_pair()
        held = HoldingLink(a)
        await hub.add_link(held, name="client", wait=False)
        attach = asyncio.ensure_future(client.add_link(b, name="hub"))
        for _ in range(20):
            await asyncio.sleep(0)  # the hello has arrived; the interest is held back
        held.release()
        with anyio.fail_after(10):
            await attach
        assert client.has_interest("early.bird")
        await Bus(client).publish("early.bird", b"first message")
        assert (await sub.next(timeout=5)).data == b"first message"


class BrokenSendLink(GatedLink):
    """A link whose peer vanished before the handshake: every send raises
    ConnectionClosed at once (as a SysV link whose peer's queue was removed)."""

    def send_nowait(self, frame: bytes) -> None:
        raise ConnectionClosed("link broken: the peer's queue is gone")


@pytest.mark.parametrize("wait", [False, True])
async def test_a_link_broken_before_the_handshake_is_dropped_not_leaked(wait: bool) -> None:
    async with Node(name="worker") as node:
        await Bus(node).subscribe("jobs")  # so that interest goes out after the hello
        a, b = memory_pair()
        await b.aclose()  # the peer is gone
        link = BrokenSendLink(a)
        with pytest.raises(ConnectionClosed, match="closed before the handshake: link broken"):
            await node.add_link(link, name="parent", wait=wait)
        assert node.links == []
        assert link.closed


async def test_interest_event_is_set_when_a_subscription_comes_or_goes_here_or_across_a_link() -> None:
    async with Node(name="A") as a, Node(name="B") as b:
        await connect(a, b, "pipe")
        ev = a.interest_event()
        assert a.interest_event() is ev and not ev.is_set()
        sub = await Bus(a).subscribe("local")  # in this process
        assert ev.is_set()
        ev = a.interest_event()
        await Bus(b).subscribe("remote", queue="g")  # across the link
        with anyio.fail_after(5):
            await ev.wait()
        assert a.announced(("remote", "g")) == 1
        ev = a.interest_event()
        await sub.unsubscribe()
        assert ev.is_set()


async def test_deadlines_fail_only_unanswered_requests_and_disarm() -> None:
    # Request timeouts share one loop timer per timeout value (node.Deadlines).
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[None]] = {}
    dl = Deadlines(futures)
    short = [loop.create_future() for _ in range(20)]
    long_ = [loop.create_future() for _ in range(20)]
    t0 = loop.time()
    for i, f in enumerate(short):
        futures[f"r.s{i}"] = f
        dl.add(0.05, f"r.s{i}", f"s.{i}")
    for i, f in enumerate(long_):
        futures[f"r.l{i}"] = f
        dl.add(0.15, f"r.l{i}", f"l.{i}")
    for f in short[::2] + long_[::2]:  # answered in time
        f.set_result(None)
    short[1].cancel()  # a cancelled request is left alone
    done, _ = await asyncio.wait(short[3::2], timeout=2)
    assert len(done) == 9 and loop.time() - t0 >= 0.05 - 0.002  # loop clocks tick in ms
    assert not any(f.done() for f in long_[1::2])  # the longer timeout has not passed yet
    for f in done:
        exc = f.exception()
        assert isinstance(exc, RequestTimeout) and exc.timeout == 0.05
    assert {f.exception().subject for f in done} == {f"s.{i}" for i in range(3, 20, 2)}
    await asyncio.wait(long_[1::2], timeout=2)
    assert loop.time() - t0 >= 0.15 - 0.002
    assert all(isinstance(f.exception(), RequestTimeout) for f in long_[1::2])
    assert not dl._armed and not dl._queues  # nothing left armed


@pytest.mark.parametrize("over", ["answered", "gone"])
async def test_deadlines_compact_answered_requests_behind_a_slow_one(over: str) -> None:
    # Over: answered (its requester not back yet) or gone (taken out of futures).
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[None]] = {}
    dl = Deadlines(futures)
    slow = futures["slow"] = loop.create_future()
    dl.add(30.0, "slow", "svc")
    for i in range(20000):
        f = futures[f"r{i}"] = loop.create_future()
        dl.add(30.0, f"r{i}", "svc")
        if over == "answered":
            f.set_result(None)
        else:
            del futures[f"r{i}"]
    assert len(dl._queues[30.0]) < 8200  # answered entries did not pile up
    dl.close()
    assert not dl._armed and not slow.done()


async def test_deadlines_drop_requests_answered_in_order() -> None:
    # The common case: replies come in about the order the requests went out;
    # answered entries leave the head now and then (not on every add), so
    # the FIFO stays short however many requests pass.
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[None]] = {}
    dl = Deadlines(futures)
    for i in range(20000):
        futures[f"r{i}"] = loop.create_future()
        dl.add(30.0, f"r{i}", "fast")
        if i % 2:
            del futures[f"r{i}"]  # over: taken out by its requester
        else:
            futures[f"r{i}"].set_result(None)  # answered, its requester not back yet
    assert len(dl._queues[30.0]) <= 32
    dl.close()
    assert not dl._armed and not dl._queues


async def test_request_over_a_link_that_just_broke_fails_at_once() -> None:
    # The responder's end is gone but its node has not noticed yet: the write
    # of the request itself fails (EPIPE), and the requester hears of it at
    # once instead of waiting for its timeout.
    async with Node(name="A") as a, Node(name="B") as b:
        _la, lb = await connect(a, b, "pipe")
        await Bus(b).serve("svc", lambda m: b"ok", queue="q")
        await settle(a, b)
        assert (await Bus(a).request("svc", timeout=5)).data == b"ok"
        lb.link.abort()  # B's fds close; A reads nothing yet (no await in between)
        with anyio.fail_after(5), pytest.raises(ConnectionClosed, match="broke"):
            await Bus(a).request("svc", timeout=30)
        assert not a.inbox.futures


async def test_request_with_headers_over_a_link_that_just_broke_fails_at_once() -> None:
    # The same through the general routing path (headers, and a plain
    # subscriber beside the queue group), on a link already broken by an
    # earlier write: nothing can be written, so nothing is in flight to fail.
    async with Node(name="A") as a, Node(name="B") as b:
        la, lb = await connect(a, b, "pipe")
        await Bus(b).serve("svc", lambda m: b"ok", queue="q")
        await Bus(b).subscribe("svc")
        await settle(a, b)
        assert (await Bus(a).request("svc", timeout=5, headers={"k": "v"})).data == b"ok"
        lb.link.abort()
        with contextlib.suppress(ConnectionClosed):  # this write meets EPIPE: the link is broken
            la.link.send_now(fr.encode_frame(fr.Ping(1)))
        assert not la.closed.is_set()  # ...but A has not dropped it yet
        with anyio.fail_after(5), pytest.raises(ConnectionClosed, match="broke"):
            await Bus(a).request("svc", timeout=30, headers={"k": "v"})
        assert not a.inbox.futures


@pytest.mark.parametrize("queue", [None, "svc"])
async def test_a_request_sent_up_before_interest_arrived_reaches_a_queue_group(queue: str | None) -> None:
    """A node that knows no responder sends its request to its upstream, leaving
    the choice of queue-group members to it (``groups == ["*"]``)."""
    async with Node(name="hub") as hub, Node(name="A") as a, Node(name="B") as b:
        _, la = await connect(hub, a, "memory")
        a.upstream = la
        _, lb = await connect(hub, b, "memory")
        b.upstream = lb
        await Bus(hub).serve("svc", lambda m: b"hub", queue=queue)
        await Bus(b).serve("svc", lambda m: b"b", queue=queue)
        assert not a.has_interest("svc")  # the hub's Sub is still on its way
        got = (await Bus(a).request("svc", b"x", timeout=5)).data
        assert got in (b"hub", b"b")
        await settle(hub, a, b)
        if queue is not None:  # one member of the group answered, not both
            assert hub.inbox.futures == {} and not hub._reply_routes


async def test_a_request_an_inline_service_answered_is_not_tracked_on_a_listeners_link() -> None:
    """A hub's plain-def service answers while the hub routes the request; the copy
    for a listener on another link must not be tracked as awaiting a reply (it
    would stay for good, count as that link's load, and fail at its close)."""
    async with Node(name="hub") as hub, Node(name="A") as a, Node(name="M") as m:
        await connect(hub, a, "memory")
        hub_m, _ = await connect(hub, m, "memory")
        await Bus(hub).serve("svc", lambda msg: b"ok", queue="g")
        listener = await Bus(m).subscribe(">")
        await settle(hub, a, m)
        for _ in range(20):
            assert (await Bus(a).request("svc", b"x", timeout=5)).data == b"ok"
        await settle(hub, a, m)
        assert hub._reply_routes == {} and hub_m.inflight == {}
        assert listener.pending >= 20  # the listener did get the requests


async def test_a_draining_member_serves_what_was_already_sent_to_it() -> None:
    """Service.drain() first withdraws the member (peers stop choosing it), waits
    until they know, then unsubscribes: requests already on their way to it are
    answered, not turned into NoResponders by a node with no member left."""
    async with Node(name="P") as p, Node(name="W1") as w1, Node(name="W2") as w2:
        await connect(p, w1, "pipe")
        await connect(p, w2, "pipe")

        async def h1(m: Msg) -> bytes:
            await asyncio.sleep(0.01)
            return b"w1"

        async def h2(m: Msg) -> bytes:
            await asyncio.sleep(0.01)
            return b"w2"

        s1 = await Bus(w1).serve("svc", h1, queue="g")
        await Bus(w2).serve("svc", h2, queue="g")
        await settle(p, w1, w2)
        reqs = [asyncio.ensure_future(Bus(p).request("svc", b"%d" % i, timeout=5)) for i in range(6)]
        await asyncio.sleep(0)  # on their way, half of them to W1
        await asyncio.gather(s1.drain(), s1.drain())  # two at once: both wait for the withdrawal
        got = [r.data for r in await asyncio.gather(*reqs)]
        assert sorted(got) == [b"w1"] * 3 + [b"w2"] * 3
        await settle(p, w1, w2)
        assert [(await Bus(p).request("svc", timeout=5)).data for _ in range(4)] == [b"w2"] * 4


async def stalled_link(x: Node, y: Node) -> tuple[GatedLink, LinkState]:
    """Link ``x`` to ``y`` through a gate on ``y``'s side (y stops reading when shut)."""
    a, b = memory_pair()
    gated = GatedLink(b)
    lx, _ = await connect_links(x, y, a, gated)
    return gated, lx


@contextlib.asynccontextmanager
async def behind_a_stalled_link(
    name: str, hub_max_frame: int = fr.DEFAULT_MAX_FRAME
) -> AsyncIterator[tuple[Node, Node, Node, GatedLink, LinkState]]:
    """A - hub - X: publisher ``A``, a hub with a 64 KiB outbound_limit, and
    node ``name`` behind a link the hub writes to but X reads only when its
    gate is open.  Yields (A, hub, X, the gate, the hub's view of that link)."""
    async with (
        Node(name="A") as a,
        Node(name="hub", outbound_limit=64 * 1024, max_frame=hub_max_frame) as hub,
        Node(name=name) as x,
    ):
        await connect(a, hub, "memory")
        gated, to_x = await stalled_link(hub, x)
        yield a, hub, x, gated, to_x


async def flood_while_stalled(publisher: Node, gated: GatedLink, n: int = 200) -> None:
    """Shut ``gated`` and publish ``n`` 16 KiB messages on "feed" from ``publisher``."""
    gated.gate.clear()
    for _ in range(n):
        await Bus(publisher).publish("feed", b"\0" * 16384)
    await publisher.flush()


async def test_a_held_link_hears_of_interest_added_while_it_was_held() -> None:
    """A held link (a pool worker in setup) subscribed to "ev"; the parent
    subscribes to "ev" too meanwhile: the worker is told, so what it publishes
    on "ev" reaches the parent (its own key, not in the totals yet, was
    counted as if the worker already knew)."""
    async with Node(name="P") as p, Node(name="W") as w:
        a, b = memory_pair()
        p_w = await p.add_link(a, name="worker", wait=False, held=True)
        w_p = await w.add_link(b, name="parent")
        with anyio.fail_after(10):
            await p_w.ready.wait()
        await Bus(w).subscribe("ev")  # the worker's setup listens on "ev"
        await settle(p, w)
        got = await Bus(p).subscribe("ev")  # the parent's application too, meanwhile
        await settle(p, w)
        assert ("ev", None) in w_p.remote_keys
        p.release(p_w)
        await Bus(w).publish("ev", b"hello")
        assert (await got.next(timeout=10)).data == b"hello"


async def test_a_request_too_large_for_the_upstream_fails_at_once_with_a_listener_here() -> None:
    """With only a listener here (a '>' monitor), a request too large for the
    upstream link raises FrameTooLarge at once, as without the listener."""
    async with Node(name="A") as a, Node(name="root", max_frame=4096) as root:
        a_up, _ = await connect(a, root, "memory")
        a.upstream = a_up
        await Bus(a).subscribe(">")
        await settle(a, root)
        with pytest.raises(FrameTooLarge):
            await Bus(a).request("svc", b"x" * 10_000, timeout=30)


async def test_a_request_ended_by_its_upstream_closing_leaves_nothing_behind() -> None:
    """A request that went to the root as well (a listener here, a member
    there) and ended with a closed status as the upstream link closed: the
    node keeps no trace of it (Node._heard_here kept its reply subject)."""
    async with Node(name="A") as a, Node(name="root") as root:
        a_up, root_a = await connect(a, root, "memory")
        a.upstream = a_up
        await Bus(a).subscribe(">")  # a listener in the requesting process
        await settle(a, root)
        req = asyncio.ensure_future(Bus(a).request("svc", b"?", timeout=30))  # runs first:
        member = root.subscribe("svc", queue="g")  # A has not heard of it when it sends
        assert (await member.get()) is not None  # at the root; never answered
        assert a._heard_here
        await root_a.link.aclose()
        with pytest.raises(ConnectionClosed):
            await req
        assert a._heard_here == set() and a._reply_routes == {}


async def test_a_late_reply_frees_its_responder_also_with_a_wildcard_listener() -> None:
    """A request given up on counts in its responder's load until its late
    reply comes, also when a '>' subscription in the requesting node routes
    inbox subjects by pattern (the general route did not clear it: the
    responder stayed busy for 60 s)."""
    release = asyncio.Event()

    async def slow(m: Msg) -> bytes:
        await release.wait()
        return b"late"

    async with Node(name="P") as p, Node(name="W") as w:
        p_w, _ = await connect(p, w, "memory")
        await Bus(w).serve("s", slow, queue="q")
        monitor = await Bus(p).subscribe(">")
        await settle(p, w)
        with pytest.raises(RequestTimeout):
            await Bus(p).request("s", timeout=0.1)
        assert len(p_w.abandoned) == 1
        release.set()
        while not (await monitor.next(timeout=10)).subject.startswith("_INBOX."):
            pass  # the request's copy; then the late reply
        assert p_w.abandoned == {}


async def test_a_consumer_hovering_at_the_limit_has_one_drop_reporter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each time a message gets through a slow link (its drop notice goes
    with it) and the next is dropped, a new slow-consumer episode starts.  One
    task at most waits to report a link's drops: there was one per episode,
    each waiting until the link drained to half its limit, so a consumer that
    stayed just slower than its publisher piled up tasks without bound.  And
    one warning at most every few seconds (there was one per episode: 450
    lines in 10 s)."""

    def reporters() -> int:
        return sum("_report_drops" in t.get_name() for t in asyncio.all_tasks())

    async with behind_a_stalled_link("P") as (a, hub, p, gated, to_p):
        sub = await Bus(p).subscribe("feed")
        await settle(a, hub, p)
        await flood_while_stalled(a, gated, 20)
        assert to_p.slow_events == 1 and reporters() == 1
        for episode in range(2, 12):
            hub._send_drop_notice(to_p)  # what a message that gets through does
            await flood_while_stalled(a, gated, 2)  # and the next is dropped
            assert to_p.slow_events == episode
        assert reporters() == 1
        warned = [r.getMessage() for r in caplog.records if "slow consumer: link" in r.getMessage()]
        assert len(warned) == 1, warned
        gated.gate.set()  # P reads again: the link drains, the drops are reported
        reported = 0
        with anyio.fail_after(10):
            while reported < hub.dropped:
                try:
                    await sub.next()
                except SlowConsumer as exc:
                    reported += exc.dropped
        assert reported == hub.dropped and reporters() == 0


@pytest.mark.parametrize("also_queued", [False, True])
async def test_a_drop_notice_reaches_a_subscriber_two_hops_below_the_slow_link(also_queued: bool) -> None:
    """A - hub - P - W: the hub drops messages on its slow link to P; W's
    subscriber (behind P) must hear of the loss too, not only P's own, and once
    (W also in a queue group on the subject: the count is not doubled)."""
    async with behind_a_stalled_link("P") as (a, hub, p, gated, _), Node(name="W") as w:
        await connect(p, w, "memory")
        sub = await Bus(w).subscribe("feed")
        if also_queued:
            await Bus(w).subscribe("feed", queue="g")
        await settle(a, hub, p, w)
        await settle(a, hub, p, w)
        n = 200
        await flood_while_stalled(a, gated, n)  # the hub's link to P fills up
        gated.gate.set()
        got = reported = 0
        with contextlib.suppress(TimeoutError):
            while got + reported < n:
                try:
                    await sub.next(timeout=2)
                    got += 1
                except SlowConsumer as exc:
                    reported += exc.dropped
        assert hub.dropped > 0
        assert (got, reported) == (n - hub.dropped, hub.dropped)


@pytest.mark.parametrize("queue", [None, "g"])
async def test_a_request_to_a_slow_link_waits_in_line_or_is_refused_clearly(queue: str | None) -> None:
    """Plain messages for a link over outbound_limit are dropped.  A request to
    the queue-group member picked to answer it is not: it is answered once the
    responder catches up.  A request for plain subscribers only (a listener
    cannot be told from a plain service) is dropped too, and its requester is
    told so at once: ConnectionClosed, not NoResponders or silence."""
    async with behind_a_stalled_link("B") as (a, hub, b, gated, _):
        await Bus(b).subscribe("feed")
        await Bus(b).serve("svc", lambda m: b"late but there", queue=queue)
        await settle(a, hub, b)
        await flood_while_stalled(a, gated)  # B stops reading
        assert hub.dropped > 0  # the link is over its limit: plain messages are dropped
        req = asyncio.ensure_future(Bus(a).request("svc", b"x", timeout=30))
        for _ in range(20):
            await asyncio.sleep(0)
        if queue is None:
            with anyio.fail_after(5), pytest.raises(ConnectionClosed, match="too slow"):
                await req
            gated.gate.set()
            return
        assert not req.done()
        gated.gate.set()
        with anyio.fail_after(10):
            assert (await req).data == b"late but there"


async def test_copies_for_a_stalled_listener_are_dropped_not_queued_without_bound() -> None:
    """A `>` listener behind a stalled link sees requests and replies pass: its
    copies are dropped over outbound_limit like any message (the requests are
    answered elsewhere, so nothing bounds them)."""
    async with (
        Node(name="A") as a,
        Node(name="hub", outbound_limit=64 * 1024) as hub,
        Node(name="S") as s,
        Node(name="M") as m,
    ):
        for other in (a, s):
            await connect(hub, other, "memory")
        gated, lm = await stalled_link(hub, m)
        await Bus(s).serve("svc", lambda msg: b"r" * 16384, queue="g")
        await Bus(m).subscribe(">")
        await settle(a, hub, s, m)
        gated.gate.clear()
        for _ in range(100):
            assert len((await Bus(a).request("svc", b"q" * 16384, timeout=10)).data) == 16384
        assert lm.link.pending_out < 4 * 64 * 1024 and lm.dropped > 0
        gated.gate.set()


async def test_answered_requests_behind_a_slow_one_keep_no_reply_alive() -> None:
    """The deadline FIFO holds every request made after an unanswered one; the
    answered entries must let go of their futures (and the replies in them)."""
    async with Node(name="n") as node:
        bus = Bus(node)
        release = asyncio.Event()

        async def slow(m: Msg) -> bytes:
            await release.wait()
            return b"slow"

        await bus.serve("slow", slow)
        await bus.serve("echo", lambda m: m.data)
        pending = asyncio.ensure_future(bus.request("slow", timeout=30))
        await asyncio.sleep(0)  # it is sent
        for _ in range(100):
            assert len((await bus.request("echo", b"x" * 65536, timeout=30)).data) == 65536
        entries = list(node.deadlines._queues[30.0])
        assert len(entries) == 101 and [e[2] for e in entries if e[1] in node.inbox.futures] == ["slow"]
        release.set()
        assert (await pending).data == b"slow"


async def test_a_retry_without_yielding_is_not_sent_to_a_broken_link_again() -> None:
    """A request written to a link whose reader is gone fails at once; that link
    must leave the routes then, not on the loop's next turn (a requester that
    retries without yielding would pick it forever: it looks the least busy)."""
    async with Node(name="P") as p, Node(name="W1") as w1, Node(name="W2") as w2:
        _, l1 = await connect(p, w1, "pipe")
        await connect(p, w2, "pipe")
        await Bus(w1).serve("svc", lambda m: b"w1", queue="g")
        await Bus(w2).serve("svc", lambda m: b"w2", queue="g")
        release = asyncio.Event()

        async def hold(m: Msg) -> bytes:
            await release.wait()
            return b"held"

        await Bus(w2).serve("hold", hold)
        await settle(p, w1, w2)
        held = [asyncio.ensure_future(Bus(p).request("hold", timeout=30)) for _ in range(3)]
        await settle(p, w1, w2)  # W2 now has requests in flight: W1 looks the least busy
        l1.link.abort()  # W1's end is gone: P's next write to it fails with EPIPE
        crashed = 0
        for _ in range(20):  # no await but the requests themselves
            try:
                assert (await Bus(p).request("svc", timeout=5)).data == b"w2"
            except ConnectionClosed:
                crashed += 1
        assert crashed <= 1
        release.set()
        assert [(await h).data for h in held] == [b"held"] * 3


def test_a_stored_link_error_raised_again_does_not_grow_its_traceback() -> None:
    from ipcbus.transports.base import stored

    err = ConnectionClosed("gone")
    depths = []
    for _ in range(3):
        try:
            raise stored(err)
        except ConnectionClosed as exc:
            depth, tb = 0, exc.__traceback__
            while tb is not None:
                depth, tb = depth + 1, tb.tb_next
            depths.append(depth)
    assert depths == [1, 1, 1]


# -- closing under cancellation ---------------------------------------------------------


class HeldCloseLink(GatedLink):
    """A link whose aclose() waits for ``release`` (a close that takes a while)."""

    def __init__(self, inner: Link) -> None:
        super().__init__(inner)
        self.release = asyncio.Event()
        self.closing = asyncio.Event()

    async def aclose(self) -> None:
        self.closing.set()
        await self.release.wait()
        await self.inner.aclose()


@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout"])
async def test_a_close_cancelled_half_way_still_ends_everything(how: str) -> None:
    """asyncio's cancellation passes through anyio's shielded scopes: a close
    interrupted by it must still close every link, end every subscription and
    fail every waiting request, and a second aclose() must wait for it."""
    async with Node(name="peer") as peer:
        node = await Node(name="n").start()
        a, b = memory_pair()
        held = HeldCloseLink(a)
        await connect_links(node, peer, held, b)
        release = asyncio.Event()

        async def hang(m: Msg) -> bytes:
            await release.wait()
            return b""

        await Bus(peer).serve("hang", hang)
        bus = Bus(node, owns_node=True)
        sub = await bus.subscribe("x")
        await settle(node, peer)
        reader = asyncio.ensure_future(sub.next())
        request = asyncio.ensure_future(bus.request("hang", timeout=None))
        await asyncio.sleep(0)
        deadline: asyncio.Future[asyncio.Timeout] = asyncio.get_running_loop().create_future()

        async def close_by_deadline() -> None:
            async with asyncio.timeout(None) as cm:
                deadline.set_result(cm)
                await bus.aclose()

        closing = asyncio.ensure_future(bus.aclose() if how == "task.cancel" else close_by_deadline())
        await held.closing.wait()  # the close is half-way: inside a link's aclose()
        if how == "task.cancel":
            closing.cancel()
        else:
            (await deadline).reschedule(asyncio.get_running_loop().time())  # it passes now
            while not closing.cancelling():  # the deadline's cancellation was delivered
                await asyncio.sleep(0)
        second = asyncio.ensure_future(bus.aclose())
        await asyncio.sleep(0)
        assert not second.done()  # it waits for the close under way
        held.release.set()
        with pytest.raises(asyncio.CancelledError if how == "task.cancel" else TimeoutError):
            await closing
        await second
        assert node._runner is not None and node._runner.done()
        assert held.closed
        with pytest.raises(BusClosed):
            await request
        with pytest.raises(BusClosed):
            await reader
        release.set()


async def test_a_node_start_cancelled_leaves_no_task_behind() -> None:
    node = Node(name="cancelled-start")
    task = asyncio.ensure_future(node.start())
    await asyncio.sleep(0)  # inside start(), waiting for the runner
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert node.closed
    assert node._runner is not None
    await asyncio.wait([node._runner], timeout=5)
    assert node._runner.done()


async def test_timeouts_that_differ_every_time_share_one_timer() -> None:
    """A caller passing down what is left of its own deadline makes a new
    timeout value per request: past Deadlines.MAX_FIFOS values they go to one
    heap with one timer (one timer per value kept each until it expired)."""
    async with Node(name="n") as node:
        bus = Bus(node)
        await bus.serve("echo", lambda m: m.data)
        release = asyncio.Event()

        async def hang(m: Msg) -> bytes:
            await release.wait()
            return b"late"

        await bus.serve("hang", hang)
        for i in range(500):
            assert (await bus.request("echo", b"x", timeout=30 + i / 1000)).data == b"x"
        d = node.deadlines
        assert len(d._armed) == Deadlines.MAX_FIFOS and d._heap_timer is not None
        # The heap's timeouts fire on time and in deadline order, each with its own value.
        waits = [0.3, 0.1, 0.2]
        tasks = [asyncio.ensure_future(bus.request("hang", timeout=t)) for t in waits]
        done_order: list[float] = []
        for t, task in zip(waits, tasks, strict=True):
            task.add_done_callback(lambda _f, t=t: done_order.append(t))
        for t, task in zip(waits, tasks, strict=True):
            with pytest.raises(RequestTimeout) as info:
                await task
            assert info.value.timeout == t
        assert done_order == sorted(waits)
        release.set()


async def test_a_publisher_yields_while_a_subscriber_in_its_process_fills_up() -> None:
    """No backpressure from a subscription in the same process, but its reader
    gets to run: a producer in a loop does not make it drop."""
    async with Node(name="n") as node:
        bus = Bus(node)
        sub = await bus.subscribe("t", max_pending=100)
        got = 0

        async def consume() -> None:
            nonlocal got
            async for _ in sub:
                got += 1

        reader = asyncio.ensure_future(consume())
        for i in range(5000):
            await bus.publish("t", i)
        await bus.flush()
        await asyncio.sleep(0)
        assert sub.dropped == 0 and got == 5000
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


class BrokenWritesLink(GatedLink):
    """A link whose writes fail (its reader is gone) while its reads go on:
    the moment between a peer's death and the node noticing it."""

    def __init__(self, inner: Link) -> None:
        super().__init__(inner)
        self.broken = False

    def send_nowait(self, frame: bytes) -> None:
        if self.broken:
            raise ConnectionClosed("pipe link: the reader is gone (EPIPE)")
        self.inner.send_nowait(frame)


@pytest.mark.parametrize("queue", ["g", None])
async def test_a_request_passed_on_to_a_link_that_broke_under_the_write_fails_at_once(
    queue: str | None,
) -> None:
    """The hub picks the service's link, whose peer just died: the write fails.
    The requester, another node, is told (ConnectionClosed) at once; it waited
    for its whole timeout when the request was passed on rather than made here."""
    async with Node(name="A") as a, Node(name="hub") as hub, Node(name="B") as b:
        await connect(a, hub, "memory")
        x, y = memory_pair()
        broken = BrokenWritesLink(x)
        await connect_links(hub, b, broken, y)
        await Bus(b).serve("svc", lambda m: b"ok", queue=queue)
        await settle(a, hub, b)
        assert (await Bus(a).request("svc", timeout=10)).data == b"ok"
        broken.broken = True
        with anyio.fail_after(10), pytest.raises(ConnectionClosed, match="broke"):
            await Bus(a).request("svc", timeout=30)
        assert not hub._reply_routes


async def test_a_peer_that_subscribes_past_max_link_subs_is_cut_off() -> None:
    """One peer's subscriptions cost memory in every node its interest reaches:
    past the node's max_link_subs its link is closed with a protocol error
    naming the limit; other links, and the link to upstream, are not bounded."""
    async with (
        Node(name="hub", max_link_subs=10) as hub,
        Node(name="B", max_link_subs=5) as b,
        Node(name="C") as c,
    ):
        hub_b, b_hub = await connect(hub, b, "memory")
        b.upstream = b_hub  # B's hub: its interest (C's 8 subscriptions) is not bounded by B
        await connect(hub, c, "memory")
        for i in range(8):
            await Bus(c).subscribe(f"c.{i}")
        await Bus(hub).serve("alive", lambda m: b"yes")
        await settle(hub, b, c)
        assert not b_hub.closed.is_set() and len(b_hub.remote_keys) > 5
        for i in range(12):
            await Bus(b).subscribe(f"b.{i}")
        with anyio.fail_after(10):
            await hub_b.closed.wait()
        assert "max_link_subs" in hub_b.close_reason
        assert any("max_link_subs" in n.message for n in b_hub.notices)
        assert (await Bus(c).request("alive", timeout=5)).data == b"yes"


@pytest.mark.parametrize(
    ("bad", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError)]
)
def test_a_bad_max_link_subs_is_refused(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_link_subs"):
        Node(max_link_subs=bad)  # type: ignore[arg-type]


async def test_a_message_over_a_subscribers_max_frame_is_reported_to_it() -> None:
    """A hub does not pass a message over the max_frame a subscriber's node
    announced; that subscriber is told (SlowConsumer on its next read), as for
    any message dropped for it. It lost them without a word."""
    async with (
        Node(name="pub") as pub,
        Node(name="hub") as hub,
        Node(name="small", max_frame=64 * 1024) as small,
        Node(name="big") as big,
    ):
        await connect(pub, hub, "memory")
        await connect(small, hub, "memory")
        await connect(big, hub, "memory")
        to_small = await Bus(small).subscribe("ev.>")
        to_big = await Bus(big).subscribe("ev.>")
        await settle(pub, hub, small, big)
        publisher = Bus(pub)
        await publisher.publish("ev.small", b"before")
        await publisher.publish("ev.large", b"x" * 200_000)
        await publisher.publish("ev.large", b"y" * 200_000)
        await publisher.publish("ev.small", b"after")
        await publisher.flush()
        await settle(pub, hub, small)
        assert to_small.pending == 2  # before and after: the loss is reported between them
        assert (await to_small.next(timeout=10)).data == b"before"
        with pytest.raises(SlowConsumer) as info:
            await to_small.next(timeout=10)
        assert info.value.dropped == 2
        assert (await to_small.next(timeout=10)).data == b"after"
        sizes = [len((await to_big.next(timeout=10)).data) for _ in range(4)]
        assert sizes == [6, 200_000, 200_000, 5]
        assert hub.stats()["dropped"] == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_a_node_passing_requests_on_forgets_those_their_requester_gave_up(kind: str) -> None:
    """A hub kept each request it passed on until its reply came or its
    requester's link closed: requests to a listener that never answers (a
    '>' monitor, a subscriber of a dead service's subject) piled up to 65,536
    per link (a hub grew 35 -> 79 MB) and stayed for as long as the requester
    stayed.  The requester's node now tells the hub (a gave_up notice) when
    it stops waiting: timed out, cancelled."""
    async with Node(name="A") as a, Node(name="H") as h, Node(name="B") as b:
        await connect(a, h, kind)
        h_b, b_h = await connect(h, b, kind)
        listener = await Bus(b).subscribe("silent.>")  # hears every request, answers none
        await settle(a, h, b)
        requester = Bus(a)
        timed_out = await asyncio.gather(
            *(requester.request("silent.x", timeout=0.1) for _ in range(600)), return_exceptions=True
        )
        assert all(isinstance(r, RequestTimeout) for r in timed_out)
        cancelled = [asyncio.ensure_future(requester.request("silent.y", timeout=30)) for _ in range(50)]
        await settle(a, h)
        assert len(h_b.inflight) == 50  # the hub passed those on and waits for their replies
        for c in cancelled:
            c.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        await settle(a, h, b)
        assert h._reply_routes == {} and h_b.inflight == {}
        assert a._reply_routes == {}
        assert h_b.still_given_up() == 650  # still counted in the listener's load, for a while
        assert listener.pending == 650
        # Only the requester's side may give a request up: B cannot make the
        # hub forget a request of A's (A's would then not hear of B's crash).
        waiting = asyncio.ensure_future(requester.request("silent.z", timeout=30))
        await settle(a, h)
        (reply,) = h._reply_routes
        b_h.link.send_nowait(fr.encode_frame(fr.Notice("gave_up", subjects=(reply,))))
        await settle(b, h)
        assert reply in h._reply_routes and reply in h_b.inflight
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


async def test_warnings_about_one_link_are_one_line_per_window(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of messages over a subscriber's max_frame logged a warning each
    (20,000 lines, 3 MB in 1.3 s).  Now one line at most per link and kind
    every ``_SLOW_LOG_EVERY`` seconds, and the ones held back meanwhile are
    told in one line at the end of the window (not left unsaid)."""
    monkeypatch.setattr(node_module, "_SLOW_LOG_EVERY", 0.3)
    caplog.set_level(logging.WARNING, logger="ipcbus.node")
    async with (
        Node(name="pub") as pub,
        Node(name="hub") as hub,
        Node(name="small", max_frame=64 * 1024) as small,
    ):
        await connect(pub, hub, "memory")
        await connect(small, hub, "memory")
        sub = await Bus(small).subscribe("ev.>")
        await settle(pub, hub, small)
        for _ in range(50):
            await Bus(pub).publish("ev.large", b"x" * 100_000)
        await Bus(pub).flush()

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "ipcbus.node"]

        assert len(lines()) == 1 and "is over the 65536-byte max_frame link" in lines()[0]
        with anyio.fail_after(10):
            while len(lines()) < 2:
                await asyncio.sleep(0.05)
        assert "49 more message(s) too large for it, not forwarded in the last 0.3 s" in lines()[1]
        with pytest.raises(SlowConsumer) as info:  # the subscriber was told of all 50
            await sub.next(timeout=10)
        assert info.value.dropped == 50
        await asyncio.sleep(0.4)  # a later window: its first warning is logged at once
        await Bus(pub).publish("ev.large", b"x" * 100_000)
        await Bus(pub).flush()
        assert len(lines()) == 3 and "is over the 65536-byte max_frame" in lines()[2]


@pytest.mark.parametrize("listener", [False, True])
async def test_requests_toward_a_responder_that_does_not_read_are_bounded(listener: bool) -> None:
    """Requests to the member picked, and replies, are kept past a link's
    outbound_limit (bounded by the requests in flight), but not without end:
    past 8 times the limit (here 512 KiB; with room for two frames past the
    limit at least) they are refused, and their requesters told at once.
    A client's gather of large requests grew a hub by their whole size.
    ``listener``: a '>' subscription on the hub hears every request too; the
    requesters of the refused ones are still told (they timed out)."""
    async with behind_a_stalled_link("S", hub_max_frame=64 * 1024) as (a, hub, s, gated, to_s):
        await Bus(s).serve("svc", lambda m: b"ok", queue="g")
        if listener:
            await Bus(hub).subscribe(">", max_pending=1000)
        await settle(a, hub, s)
        gated.gate.clear()  # S stops reading
        cap = 8 * hub.outbound_limit
        reqs = [asyncio.ensure_future(Bus(a).request("svc", b"x" * 16384, timeout=60)) for _ in range(80)]
        await a.flush()  # the hub has routed them all, and its answers are back
        refused = [r for r in reqs if r.done() and r.exception() is not None]
        assert len(refused) >= 20, len(refused)  # 80 x 16 KiB: 1.25 MiB
        for r in refused:
            with pytest.raises(ConnectionClosed, match=f"keeps at most {cap} bytes .* too much in flight"):
                await r
        assert hub.outbound_limit < to_s.link.pending_out <= cap
        gated.gate.set()  # S reads again: the requests the hub kept are answered
        with anyio.fail_after(20):
            answered = [await r for r in reqs if r not in refused]
        assert [m.data for m in answered] == [b"ok"] * (80 - len(refused))
        assert to_s.dropped == len(refused) and hub.stats()["dropped"] == len(refused)


async def test_replies_toward_a_requester_that_does_not_read_are_bounded() -> None:
    """The same bound for replies: past 8 times the limit of a requester's
    link, a reply is refused, and the requester gets a small status saying why."""
    async with behind_a_stalled_link("R", hub_max_frame=64 * 1024) as (a, hub, r, gated, to_r):
        served = 0
        all_served = asyncio.Event()

        def big(m: Msg) -> bytes:
            nonlocal served
            served += 1
            if served == 80:
                all_served.set()
            return b"y" * 16384

        await Bus(a).serve("big", big, queue="g")
        await settle(a, hub, r)
        gated.gate.clear()  # R stops reading its replies
        reqs = [asyncio.ensure_future(Bus(r).request("big", timeout=60)) for _ in range(80)]
        with anyio.fail_after(10):
            await all_served.wait()
        await a.flush()  # the hub has routed every reply
        # (the statuses telling R of the refusals always go through: a few bytes each)
        assert to_r.dropped >= 20 and to_r.link.pending_out <= 8 * hub.outbound_limit + 100 * to_r.dropped
        gated.gate.set()
        with anyio.fail_after(20):
            done = await asyncio.gather(*reqs, return_exceptions=True)
        refused = [d for d in done if isinstance(d, BaseException)]
        assert len(refused) == to_r.dropped
        for exc in refused:
            assert isinstance(exc, ConnectionClosed), exc
            assert "the link toward the requester (R)" in str(exc)
        assert all(d.data == b"y" * 16384 for d in done if isinstance(d, Msg))


@pytest.mark.parametrize("monitor", [None, "_INBOX.>", "_INBOX.*.*"])
async def test_answered_requests_leave_nothing_tracked_on_their_link(monitor: str | None) -> None:
    """A request of Bus.request is tracked on the link it went out on only;
    its reply clears that, also when a subscription here routes inbox
    subjects by pattern (the general path), so nothing counts as given up."""
    async with Node(name="P") as p, Node(name="W") as w:
        p_w, _ = await connect(p, w, "memory")
        await Bus(w).serve("s", lambda m: m.data, queue="q")
        if monitor:
            await Bus(p).subscribe(monitor, max_pending=1000)
        await settle(p, w)
        bus = Bus(p)
        await bus.request("s", timeout=10)  # the route is known from now on: the one-step path
        for _ in range(2):
            replies = await asyncio.gather(*(bus.request("s", b"%d" % i, timeout=10) for i in range(40)))
            assert [r.data for r in replies] == [b"%d" % i for i in range(40)]
            assert p_w.inflight == {} and p_w.abandoned == {}
            assert not p._reply_routes  # (the one-step path tracks nothing there)


async def test_a_request_in_flight_fails_at_once_when_its_link_closes() -> None:
    async with Node(name="P") as p, Node(name="W") as w:
        p_w, w_p = await connect(p, w, "pipe")
        stuck, took = asyncio.Event(), asyncio.Event()

        async def handler(m: Msg) -> bytes:
            if m.data == b"stick":
                took.set()
                await stuck.wait()
            return b"ok"

        await Bus(w).serve("s", handler, queue="q")
        await settle(p, w)
        assert (await Bus(p).request("s", timeout=10)).data == b"ok"  # the route is known now
        task = asyncio.ensure_future(Bus(p).request("s", b"stick", timeout=30))
        with anyio.fail_after(5):
            await took.wait()
        assert p_w.inflight  # (tracked on the link it went out on)
        await w_p.link.aclose()
        with anyio.fail_after(5), pytest.raises(ConnectionClosed, match="closed"):
            await task
        assert p_w.inflight == {} and p_w.abandoned == {}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_request_passed_on_to_a_service_behind_another_link_leaves_no_tracking(kind: str) -> None:
    """H asks a service on A, which passes each request on (publish with
    reply=) to a service on B: the reply comes back over H's link to B, not
    the link the request went out on.  Answered, nothing stays in flight or
    counts as given up on either link; timed out, both links count it as
    given up (their responders may still be working on it) and nothing stays
    in flight (a pool's recycle waits for that), nor in the reply routes."""
    async with Node(name="H") as h, Node(name="A") as a, Node(name="B") as b:
        h_a, _ = await connect(h, a, kind)
        h_b, _ = await connect(h, b, kind)
        abus, bbus = Bus(a), Bus(b)

        front = await abus.subscribe("front", queue="q")

        async def pass_on() -> None:  # a subscriber, not a service: it does not answer itself
            async for m in front:
                await abus.publish("back" if m.data != b"silent" else "nobody", m.data, reply=m.reply)

        await bbus.serve("back", lambda m: b"ok:" + m.data, queue="q2")
        await bbus.subscribe("nobody", queue="q3")  # takes it, never answers
        await settle(h, a, b)
        bus = Bus(h)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pass_on)
            for i in range(3):
                assert (await bus.request("front", b"%d" % i, timeout=10)).data == b"ok:%d" % i
            await settle(h, a, b)
            for ls in (h_a, h_b):
                assert (len(ls.inflight), ls.still_given_up(), ls.busy) == (0, 0, 0), ls.name
            assert not h._reply_routes
            with pytest.raises(RequestTimeout):
                await bus.request("front", b"silent", timeout=0.2)
            await settle(h, a, b)
            for ls in (h_a, h_b):
                assert (len(ls.inflight), ls.still_given_up()) == (0, 1), ls.name
            assert not h._reply_routes
            tg.cancel_scope.cancel()


async def test_a_closing_node_acknowledges_nothing_more() -> None:
    """A pong acknowledges what its peer sent before the ping (a client's
    flush()).  A node that is closing may no longer pass on what it takes in
    (its other links may be closed already), so a ping that reaches it then
    gets no pong: the peer's flush fails as the link closes instead of
    returning for messages that were lost (a hub stopped under load)."""
    async with Node(name="P") as p:
        h = Node(name="H")
        await h.__aenter__()
        a, b = pipe_pair()
        h_p, p_h = await connect_links(h, p, a, b)
        await Bus(p).subscribe("x", max_pending=100_000)
        await settle(h, p)
        assert isinstance(b, FdStreamLink)
        b._pause_reading()  # P stops reading: H's close waits to drain its queue toward P
        hbus = Bus(h)
        for _ in range(48):  # 3 MiB: the pipe (1 MiB) fills, the rest stays queued in H
            await hbus.publish("x", b"y" * 65536)
        closing = asyncio.ensure_future(h.aclose())
        await asyncio.sleep(0)  # its first step: the node is closing from there on
        assert h._closed
        before_in, before_out = h_p.link.info.msgs_in, h_p.control_out
        _, pong = p.send_ping(p_h)
        with anyio.fail_after(5):
            while h_p.link.info.msgs_in == before_in:  # H read the ping
                await asyncio.sleep(0.01)
        assert h_p.control_out == before_out  # and answered nothing
        b._resume_reading()
        with anyio.fail_after(10):
            await closing
            with pytest.raises(ConnectionClosed):
                await pong
