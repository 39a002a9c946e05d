"""The client API: Bus, Subscription, Msg, Service — errors, cancellation, flow control, lifetime.

Most tests use two nodes in this process, ``client`` and ``server``, joined
by an anonymous-pipe link (``pipe_pair``), so that every payload really goes
through encoding, framing and a kernel pipe; a few run on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

import ipcbus
from ipcbus import frames as fr
from ipcbus.client import Bus, Msg, Subscription
from ipcbus.errors import (
    BadSubject,
    BusClosed,
    ConnectionClosed,
    DecodeError,
    EncodeError,
    EndOfStream,
    FrameTooLarge,
    NoResponders,
    RemoteError,
    RequestTimeout,
    SlowConsumer,
)
from ipcbus.node import LinkState, Node
from ipcbus.transports.memory import MemoryLink, memory_pair
from ipcbus.transports.pipe import pipe_pair


class Point(msgspec.Struct):
    """A typed request."""

    x: int
    y: int


class Sum(msgspec.Struct):
    """A typed reply."""

    total: int
    by: str


@contextlib.asynccontextmanager
async def pair(**node_kw: Any) -> AsyncIterator[tuple[Bus, Bus]]:
    """(client bus, server bus): two nodes joined by a pipe link, owning their nodes."""
    async with Node(name="client", **node_kw) as cn, Node(name="server", **node_kw) as sn:
        a, b = pipe_pair(max_frame=cn.max_frame)
        ls = await cn.add_link(a, name="server", wait=False)
        await sn.add_link(b, name="client")
        await ls.ready.wait()
        client, server = Bus(cn, owns_node=True), Bus(sn, owns_node=True)
        yield client, server
        await client.aclose()
        await server.aclose()


async def settle(*buses: Bus) -> None:
    """Interest and messages sent so far have been processed by the direct peers."""
    for _ in range(2):
        for b in buses:
            if not b.closed:
                await b.flush()


@contextlib.asynccontextmanager
async def refusing_pair(
    subject: str, **node_kw: Any
) -> AsyncIterator[tuple[Bus, Subscription, Callable[[], int]]]:
    """For bad-input tests: a pair whose server subscribes to ``subject`` and serves
    ``svc``; ``sent()`` counts the frames the client wrote to its link since."""
    async with pair(**node_kw) as (client, server):
        sub = await server.subscribe(subject)
        await server.serve("svc", lambda m: b"")
        await settle(client, server)
        (link,) = client.node.links
        before = link.link.info.msgs_out
        yield client, sub, lambda: link.link.info.msgs_out - before


# -- services ----------------------------------------------------------------------


async def test_a_stopped_service_is_let_go_of() -> None:
    """A bus that serves a subject per session and stops it later keeps no
    stopped service (every one stayed in the bus, with its subscription and
    handler: 4.5 KB each for the life of the bus)."""
    async with pair() as (client, server):

        async def from_inside(m: Msg) -> bytes:
            await svc2.stop()  # a handler that stops its own service
            return b"bye"

        for i in range(50):
            svc = await server.serve(f"session.{i}", lambda m: m.data)
            await svc.stop()
        svc2 = await server.serve("last", from_inside)
        await settle(client, server)
        assert (await client.request("last", timeout=5)).data == b"bye"
        await svc2._done.wait()  # its subscription has ended (the handler returned first)
        assert server._services == []


async def test_a_service_stopped_from_its_handler_still_ends_with_its_bus() -> None:
    """Stopped from one of its own handlers, a service is let go of by its bus
    only once its handlers are done: closing the bus meanwhile still cancels
    the ones running, whose requesters learn at once (they ran on, and
    answered after the bus had closed)."""
    async with Node(name="n") as node:
        bus, other = Bus(node), Bus(node)
        started = asyncio.Event()

        async def handler(m: Msg) -> bytes:
            if m.data == b"stop":
                await svc.stop()  # from its own handler: stops taking requests
                return b"stopping"
            started.set()
            await asyncio.Event().wait()  # never done by itself
            return b"slow done"

        svc = await bus.serve("s", handler, concurrency=4)
        slow = asyncio.ensure_future(other.request("s", b"slow", timeout=30))
        await started.wait()
        assert (await other.request("s", b"stop", timeout=5)).data == b"stopping"
        assert bus._services == [svc]  # a handler still runs
        await bus.aclose()
        with pytest.raises(ConnectionClosed):
            await slow
        await svc._done.wait()  # its cancelled handler has ended
        assert bus._services == []


async def test_a_service_stopped_from_its_handler_answers_no_queued_request_after_its_bus_closed() -> None:
    """One handler at a time: a request queued behind the one that stops the
    service is still cancelled when the bus closes (the service was let go of
    when the stopping handler returned, and the queued one ran on)."""
    async with Node(name="n") as node:
        bus, other = Bus(node), Bus(node)
        started = asyncio.Event()

        async def handler(m: Msg) -> bytes:
            if m.data == b"stop":
                await svc.stop()
                return b"stopping"
            started.set()
            await asyncio.Event().wait()
            return b"slow done"

        svc = await bus.serve("s", handler, concurrency=1)
        stopping = asyncio.ensure_future(other.request("s", b"stop", timeout=30))
        slow = asyncio.ensure_future(other.request("s", b"slow", timeout=30))  # queued behind it
        assert (await stopping).data == b"stopping"
        await started.wait()
        assert bus._services == [svc]
        await bus.aclose()
        with pytest.raises(ConnectionClosed):
            await slow


async def test_a_service_stopped_from_a_task_its_handler_started_is_let_go_of() -> None:
    """Tasks a handler starts inherit its context: stop() from one of them,
    after the handler returned, still lets the bus forget the service."""
    async with Node(name="n") as node:
        bus, other = Bus(node), Bus(node)
        tasks: list[asyncio.Task[None]] = []

        async def handler(m: Msg) -> bytes:
            tasks.append(asyncio.get_running_loop().create_task(svc.stop()))
            return b"ok"

        svc = await bus.serve("s", handler)
        assert (await other.request("s", timeout=5)).data == b"ok"
        await tasks[0]  # returned at once: it runs in the handler's context
        await svc._done.wait()  # the service has ended
        assert bus._services == []


async def test_handler_that_raises_gives_remote_error_and_keeps_serving() -> None:
    async with pair() as (client, server):

        def sync_handler(m: Msg) -> bytes:
            if m.data == b"boom":
                raise KeyError("no such thing")
            return m.data.upper()

        async def async_handler(m: Msg) -> bytes:
            await asyncio.sleep(0)
            if m.data == b"boom":
                raise RuntimeError("async boom")
            return m.data[::-1]

        svc1 = await server.serve("sync", sync_handler)
        svc2 = await server.serve("async", async_handler)
        await settle(client, server)
        for _ in range(3):
            with pytest.raises(RemoteError) as info:
                await client.request("sync", b"boom", timeout=5)
            assert info.value.type_name == "KeyError"
            assert "no such thing" in info.value.message
            assert info.value.subject == "sync"
            assert "KeyError" in str(info.value)
            assert (await client.request("sync", b"ok", timeout=5)).data == b"OK"
            with pytest.raises(RemoteError) as info:
                await client.request("async", b"boom", timeout=5)
            assert (info.value.type_name, info.value.message) == ("RuntimeError", "async boom")
            assert (await client.request("async", b"abc", timeout=5)).data == b"cba"
        assert svc1.errors == 3 and svc2.errors == 3
        assert svc1.handled == 3 and svc2.handled == 3


async def test_a_request_a_full_service_queue_drops_is_answered_at_once() -> None:
    """Requests past a busy service's max_pending were dropped without a word
    (a warning in the service's log): their requesters waited for their whole
    timeout.  Now each gets RemoteError('SlowConsumer') at once, across a link
    and on the service's own node, and the service serves on."""
    gate = asyncio.Event()

    async def busy(m: Msg) -> bytes:
        await gate.wait()
        return m.data

    async with pair() as (client, server):
        await server.serve("busy", busy, concurrency=1, max_pending=2)
        await settle(client, server)
        for requester in (client, server):
            calls = [
                asyncio.ensure_future(requester.request("busy", bytes([i]), timeout=60)) for i in range(8)
            ]
            with anyio.fail_after(10):  # well before the requests' timeout
                while sum(c.done() for c in calls) < 5:  # the handler holds one, two are queued
                    await asyncio.sleep(0.01)
            refused = [c for c in calls if c.done()]
            for c in refused:
                exc = c.exception()
                assert isinstance(exc, RemoteError) and exc.type_name == "SlowConsumer", exc
                assert "service 'busy' dropped the request: 2 queued already (max_pending=2)" in exc.message
            gate.set()
            answered = await asyncio.gather(*(c for c in calls if c not in refused))
            assert [r.data for r in answered] == [bytes([i]) for i in range(len(answered))]
            gate.clear()
        gate.set()
        assert (await client.request("busy", b"after", timeout=5)).data == b"after"


async def test_typed_handler_validates_and_keeps_serving() -> None:
    async with pair() as (client, server):

        def add(p: Point) -> Sum:
            return Sum(p.x + p.y, "add")

        await server.serve("add", add)
        await settle(client, server)
        rep = await client.request("add", Point(2, 3), timeout=5)
        assert rep.decode(Sum) == Sum(5, "add")
        # a dict with the same fields validates too
        assert (await client.request("add", {"x": 1, "y": 1}, timeout=5)).decode(Sum).total == 2
        for bad in [{"x": "two", "y": 3}, {"x": 1}, [1, 2, 3], b"\xc1not msgpack"]:
            with pytest.raises(RemoteError) as info:
                await client.request("add", bad, timeout=5)
            assert info.value.type_name == "ValidationError"
            assert info.value.message
        assert (await client.request("add", Point(10, 20), timeout=5)).decode(Sum).total == 30


async def test_typed_handler_with_string_annotations_and_builtin_types() -> None:
    async with pair() as (client, server):

        async def total(xs: list[int]) -> int:
            return sum(xs)

        await server.serve("total", total)
        await settle(client, server)
        assert (await client.request("total", [1, 2, 3], timeout=5)).decode(int) == 6
        with pytest.raises(RemoteError, match="ValidationError"):
            await client.request("total", ["a"], timeout=5)


async def test_handler_returning_unencodable_gives_remote_error() -> None:
    async with pair() as (client, server):
        bad = await server.serve("bad", lambda m: object())
        good = await server.serve("good", lambda m: {"ok": True})
        await settle(client, server)
        with pytest.raises(RemoteError) as info:
            await client.request("bad", timeout=5)
        assert info.value.type_name == "EncodeError"
        assert "object" in info.value.message
        assert (await client.request("good", timeout=5)).decode() == {"ok": True}
        with pytest.raises(RemoteError):
            await client.request("bad", timeout=5)
        assert (bad.handled, bad.errors, good.handled, good.errors) == (0, 2, 1, 0)  # one count each


async def test_handler_returning_a_reply_over_max_frame_gives_remote_error() -> None:
    async with pair(max_frame=64 * 1024) as (client, server):
        await server.serve("huge", lambda m: b"\0" * (128 * 1024))
        await server.serve("echo", lambda m: m.data)
        await settle(client, server)
        with pytest.raises(RemoteError) as info:
            await client.request("huge", timeout=5)
        assert info.value.type_name == "FrameTooLarge"
        assert (await client.request("echo", b"x", timeout=5)).data == b"x"
        assert not server.closed


async def test_sync_and_async_handlers_may_return_bytes_or_values() -> None:
    async with pair() as (client, server):
        await server.serve("b", lambda m: b"raw")
        await server.serve("v", lambda m: [1, "two", None])
        await server.serve("none", lambda m: None)
        await settle(client, server)
        assert (await client.request("b", timeout=5)).data == b"raw"
        assert (await client.request("v", timeout=5)).decode() == [1, "two", None]
        assert (await client.request("none", timeout=5)).decode() is None


async def test_sync_handler_returning_an_awaitable_is_awaited_and_drained() -> None:
    # A synchronous handler runs inline as its request is routed; when it hands
    # back an awaitable, that is finished in a task, and drain() waits for it.
    async with pair() as (client, server):
        release = asyncio.Event()

        async def later(v: int) -> int:
            await release.wait()
            return v * 2

        svc = await server.serve("lazy", lambda m: later(m.decode()))
        await settle(client, server)
        reqs = [asyncio.ensure_future(client.request("lazy", i, timeout=30)) for i in range(5)]
        await client.flush()  # the server has taken all five
        drain = asyncio.ensure_future(svc.drain())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not drain.done(), "drain returned while handlers were still running"
        assert not any(r.done() for r in reqs)
        release.set()
        assert [(await r).decode() for r in reqs] == [0, 2, 4, 6, 8]
        with anyio.fail_after(10):
            await drain


async def test_inline_service_keeps_serving_after_a_slow_consumer_report() -> None:
    # A hub's slow_consumer notice marks every matching subscription, an
    # inline service's too: the service logs it and keeps answering.
    async with pair() as (client, server):
        svc = await server.serve("svc", lambda m: b"ok")
        await settle(client, server)
        svc.subscription._core.note_remote_drop(3)
        await settle(client, server)  # round trips: the service task has taken the report
        assert (await client.request("svc", timeout=5)).data == b"ok"
        assert not svc._done.is_set()


async def test_request_without_a_timeout_waits_for_the_reply() -> None:
    async with pair() as (client, server):
        await server.serve("svc", lambda m: b"ok")
        await settle(client, server)
        assert (await client.request("svc", timeout=None)).data == b"ok"
        assert not client.node.deadlines._queues  # nothing armed for it


async def test_inline_service_on_the_requesters_own_node() -> None:
    # Request, service and reply all in one node: the handler runs inside the
    # request's own routing, and the reply still reaches the requester.
    async with pair() as (client, _server):
        svc = await client.serve("self.echo", lambda m: m.data + b"!")
        assert (await client.request("self.echo", b"hi", timeout=5)).data == b"hi!"
        replies = await asyncio.gather(
            *(client.request("self.echo", str(i).encode(), timeout=5) for i in range(100))
        )
        assert [r.data for r in replies] == [f"{i}!".encode() for i in range(100)]
        assert svc.handled == 101
        await svc.drain()
        with pytest.raises(NoResponders):
            await client.request("self.echo", b"hi", timeout=5)


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[Callable[[], int]]:
    """A task that counts the loop turns it gets; yields the count so far."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    try:
        yield lambda: ticks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_requests_answered_in_process_still_let_other_tasks_run() -> None:
    """A plain-def service in the requester's own process answers within the
    request's own call; a loop of such requests must still yield to the loop."""
    async with Node() as node, loop_turns() as turns:
        bus = Bus(node)
        await bus.serve("echo", lambda m: m.data)
        before = turns()
        for _ in range(50):
            assert (await bus.request("echo", b"x", timeout=5)).data == b"x"
        assert turns() - before >= 49  # one turn of the ticker per request


# -- bad input ------------------------------------------------------------------------


async def test_unencodable_payload_raises_encode_error_and_sends_nothing() -> None:
    async with refusing_pair("x") as (client, sub, sent):
        for bad in [object(), {"k": object()}, lambda: 0, 2**70, 1j]:
            with pytest.raises(EncodeError) as info:
                await client.publish("x", bad)
            assert type(bad).__name__ in str(info.value)
            with pytest.raises(EncodeError):
                await client.request("svc", bad, timeout=5)
            assert isinstance(info.value, TypeError)
        assert sent() == 0
        await client.publish("x", {"fine": [1, 2]})
        received = await sub.next(timeout=5)
        assert received.decode() == {"fine": [1, 2]}
        # A message itself (forwarding it whole by mistake), received or made by hand.
        for msg in [received, Msg("x", b"payload", None, None, bus=None)]:
            with pytest.raises(EncodeError, match=r"type Msg: pass msg\.data"):
                await client.publish("x", msg)
            with pytest.raises(EncodeError, match=r"type Msg: pass msg\.data"):
                await client.request("svc", msg, timeout=5)
        assert sent() == 1  # the fine one only


async def test_bad_headers_raise_encode_error_and_send_nothing() -> None:
    async with refusing_pair("x") as (client, sub, sent):
        for bad in [{"k": 1}, {1: "v"}, ["k", "v"], {"k": b"v"}]:
            with pytest.raises(EncodeError, match="headers must be a dict of str to str"):
                await client.publish("x", b"", headers=bad)  # type: ignore[arg-type]
            with pytest.raises(EncodeError, match="headers must be"):
                await client.request("svc", b"", headers=bad, timeout=5)  # type: ignore[arg-type]
        assert sent() == 0  # nothing reached the link
        await client.publish("x", b"ok", headers={"k": "v"})
        got = await sub.next(timeout=5)
        assert got.headers == {"k": "v"} and got.data == b"ok"  # the link still works


BAD_SUBJECTS = ["", "a..b", ".a", "a.", "a.>.b", ">.a", "a b", "a\tb", " a", "a\n", "a.\u00a0.b"]
WILDCARD_SUBJECTS = ["a.*", "*", ">", "a.>", "*.b"]


@pytest.mark.parametrize("subject", BAD_SUBJECTS + WILDCARD_SUBJECTS)
async def test_bad_subject_on_publish_and_request(subject: str) -> None:
    async with Node() as node:
        bus = Bus(node)
        with pytest.raises(BadSubject) as info:
            await bus.publish(subject, b"x")
        assert info.value.subject == subject and info.value.reason
        assert isinstance(info.value, ValueError)
        with pytest.raises(BadSubject):
            await bus.request(subject, b"x", timeout=5)
        with pytest.raises(BadSubject):
            await bus.publish("ok", b"x", reply=subject)
        assert node.msgs_out == 0


@pytest.mark.parametrize("subject", BAD_SUBJECTS)
async def test_bad_subject_on_subscribe_and_serve(subject: str) -> None:
    async with Node() as node:
        bus = Bus(node)
        with pytest.raises(BadSubject):
            await bus.subscribe(subject)
        with pytest.raises(BadSubject):
            await bus.serve(subject, lambda m: b"")
        with pytest.raises(BadSubject):
            await bus.subscribe("ok", queue=subject or "a..b")
        assert node.stats()["subscriptions"] == []


@pytest.mark.parametrize(
    ("pattern", "subject"), [("a.*", "a.b"), ("*", "a"), (">", "a.b.c"), ("a.>", "a.b"), ("*.b.>", "x.b.c")]
)
async def test_wildcards_are_fine_in_subscriptions(pattern: str, subject: str) -> None:
    async with Node() as node:
        bus = Bus(node)
        async with await bus.subscribe(pattern) as sub:
            await bus.publish(subject, b"1")
            assert (await sub.next(timeout=5)).subject == subject


async def test_bad_subject_type_is_refused() -> None:
    async with Node() as node:
        with pytest.raises(BadSubject, match="must be a str"):
            await Bus(node).publish(b"bytes-subject", b"x")  # type: ignore[arg-type]


async def test_frame_over_max_on_publish_raises_before_sending() -> None:
    async with refusing_pair("big", max_frame=32 * 1024) as (client, sub, sent):
        with pytest.raises(FrameTooLarge) as info:
            await client.publish("big", b"\0" * (40 * 1024))
        assert info.value.limit == 32 * 1024
        with pytest.raises(FrameTooLarge):
            await client.request("big", b"\0" * (40 * 1024), timeout=5)
        assert sent() == 0
        assert not client.node.inbox.futures
        await client.publish("big", b"fits")
        assert (await sub.next(timeout=5)).data == b"fits"


# -- request/reply outcomes ---------------------------------------------------------------


async def test_no_responders_is_immediate_not_a_timeout() -> None:
    async with pair() as (client, server):
        with pytest.raises(NoResponders) as info:
            await client.request("nobody", b"?", timeout=30)
        assert not isinstance(info.value, TimeoutError)
        assert info.value.subject == "nobody"
        with pytest.raises(NoResponders):
            await server.request("nobody.either", timeout=30)


async def test_request_timeout_is_a_timeout_error() -> None:
    async with Node() as node:
        bus = Bus(node)
        sub = await bus.subscribe("deaf")
        with pytest.raises(TimeoutError) as info:
            await bus.request("deaf", b"hi", timeout=0.05)
        assert isinstance(info.value, RequestTimeout)
        assert isinstance(info.value, ipcbus.IpcBusError)
        assert (await sub.next(timeout=5)).data == b"hi"
        assert not node.inbox.futures


async def test_first_reply_wins() -> None:
    async with pair() as (client, server):
        await server.serve("race", lambda m: b"server")
        await client.serve("race", lambda m: b"local")
        await settle(client, server)
        rep = await client.request("race", timeout=5)
        assert rep.data in (b"server", b"local")
        await settle(client, server)
        assert not client.node.inbox.futures


# -- Msg ---------------------------------------------------------------------------------


async def test_msg_decode_and_respond() -> None:
    async with pair() as (client, server):
        sub = await server.subscribe("pt")
        await settle(client, server)

        async def responder() -> None:
            m = await sub.next(timeout=5)
            p = m.decode(Point)
            assert p == Point(1, 2)
            assert m.subject == "pt" and m.reply is not None and m.headers == {"h": "v"}
            await m.respond(Sum(p.x + p.y, "respond"), headers={"r": "1"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(responder)
            rep = await client.request("pt", Point(1, 2), timeout=5, headers={"h": "v"})
        assert rep.decode(Sum) == Sum(3, "respond")
        assert rep.headers == {"r": "1"}
        assert rep.decode() == {"total": 3, "by": "respond"}
        with pytest.raises(DecodeError) as info:
            rep.decode(Point)
        assert "Point" in str(info.value)
        assert isinstance(info.value, ValueError) and not isinstance(info.value, EncodeError)
        with pytest.raises(DecodeError, match="does not decode"):
            Msg("s", b"\xc1", None, None, None).decode()
        # Made by keyword, as a handler's unit test does: no bus to respond on.
        made = Msg(subject="s", data=msgspec.msgpack.encode(Point(1, 2)), reply="r", headers=None, bus=None)
        assert made.decode(Point) == Point(1, 2) and made.bus is None
        with pytest.raises(BusClosed, match="not attached to a bus"):
            await made.respond(b"x")
        assert rep.bus is client and made != Msg("s", made.data, "r", None, None)  # identity

        await client.publish("pt", Point(0, 0))
        m = await sub.next(timeout=5)
        with pytest.raises(ValueError, match="no reply subject"):
            await m.respond(b"to nobody")
        assert "pt" in repr(m)


# -- subscriptions ---------------------------------------------------------------------------


async def test_subscription_iterator_and_context_manager() -> None:
    async with pair() as (client, server):
        async with await server.subscribe("it.>") as sub:
            assert sub.subject == "it.>" and sub.queue is None
            await settle(client, server)
            for i in range(5):
                await client.publish(f"it.{i}", i)
            got = []
            async for m in sub:
                got.append(m.decode(int))
                if len(got) == 5:
                    break
            assert got == [0, 1, 2, 3, 4]
            await client.publish("it.last", b"still pending at exit")
            await settle(client, server)
            assert sub.pending == 1
        # unsubscribed on exit: pending messages can still be read, then the iterator ends
        assert [m.data async for m in sub] == [b"still pending at exit"]
        with pytest.raises(BusClosed):
            await sub.next(timeout=5)
        await settle(client, server)
        assert not client.node.has_interest("it.x")


async def test_next_timeout_takes_nothing() -> None:
    async with Node() as node:
        bus = Bus(node)
        sub = await bus.subscribe("t")
        with pytest.raises(TimeoutError):
            await sub.next(timeout=0.01)
        await bus.publish("t", b"1")
        assert (await sub.next(timeout=5)).data == b"1"


async def test_slow_subscriber_drop_new() -> None:
    async with pair() as (client, server):
        sub = await server.subscribe("fast", max_pending=5)
        other = await server.subscribe("fast")
        await settle(client, server)
        for i in range(20):
            await client.publish("fast", i)
        await settle(client, server)
        assert sub.pending == 5
        assert sub.dropped == 15
        st = server.stats()
        assert st["dropped"] == 15
        (row,) = [s for s in st["subscriptions"] if s["sid"] == sub._core.sid]
        assert row["dropped"] == 15 and row["pending"] == 5
        # The kept (oldest) messages, then the loss where it was (they came
        # after those), then later ones; no second error.
        assert [(await sub.next(timeout=5)).decode(int) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(SlowConsumer) as info:
            await sub.next(timeout=5)
        assert info.value.dropped == 15 and info.value.subject == "fast"
        await client.publish("fast", 99)
        assert (await sub.next(timeout=5)).decode(int) == 99
        # another subscription on the same subject lost nothing
        assert [(await other.next(timeout=5)).decode(int) for _ in range(21)] == [*range(20), 99]


async def test_slow_subscriber_drop_old() -> None:
    async with Node() as node:
        bus = Bus(node)
        sub = await bus.subscribe("s", max_pending=3, overflow="drop_old")
        for i in range(10):
            await bus.publish("s", i)
        with pytest.raises(SlowConsumer) as info:
            await sub.next()
        assert info.value.dropped == 7
        assert [(await sub.next()).decode(int) for _ in range(3)] == [7, 8, 9]
        assert bus.stats()["dropped"] == 7


async def test_pending_bytes_limit() -> None:
    async with Node() as node:
        bus = Bus(node)
        sub = await bus.subscribe("s", pending_bytes=10_000)
        for _ in range(5):
            await bus.publish("s", b"\0" * 4000)
        assert sub.pending == 2
        for _ in range(2):  # the two kept, then the three lost after them
            assert len((await sub.next()).data) == 4000
        with pytest.raises(SlowConsumer) as info:
            await sub.next()
        assert info.value.dropped == 3


async def test_bad_subscription_options() -> None:
    """Refused by subscribe(), naming the argument: a wrong type used to be
    accepted and then closed the node on the first message from a link."""
    async with Node() as node:
        bus = Bus(node)
        bad: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({"max_pending": 0}, ValueError, r"max_pending must be at least 1 \(messages\), not 0"),
            ({"max_pending": "5"}, TypeError, "max_pending must be an int"),
            ({"max_pending": 1.5}, TypeError, "max_pending must be an int"),
            ({"max_pending": True}, TypeError, "max_pending must be an int"),
            ({"pending_bytes": -1}, ValueError, r"pending_bytes must be at least 0 \(bytes\)"),
            ({"pending_bytes": "5"}, TypeError, "pending_bytes must be an int"),
            ({"pending_bytes": None}, TypeError, "pending_bytes must be an int"),
            ({"overflow": "block"}, ValueError, "overflow"),
            (
                {"queue": "q.*"},
                BadSubject,
                r"invalid queue group name 'q\.\*': wildcard '\*' not allowed in a queue group name",
            ),
            ({"queue": ""}, BadSubject, "empty queue group name"),
            ({"queue": "a b"}, BadSubject, r"whitespace in queue group name"),
            ({"queue": 5}, BadSubject, "queue group name must be a str"),
        ]
        for kw, exc, match in bad:
            with pytest.raises(exc, match=match):
                await bus.subscribe("s", **kw)
        assert bus.stats()["subscriptions"] == [] and not node.has_interest("s")
        one_at_a_time = await bus.subscribe("s", pending_bytes=0)  # a message into an empty queue
        also_fine = await bus.subscribe("s", max_pending=1e6)  # type: ignore[arg-type]
        assert [s["subject"] for s in bus.stats()["subscriptions"]] == ["s", "s"]
        assert also_fine._core.max_pending == 1_000_000 and one_at_a_time._core.pending_bytes_limit == 0
        wildcard_reply = r"invalid reply subject 'r\.>': wildcard '>' not allowed in a reply subject"
        with pytest.raises(BadSubject, match=wildcard_reply):
            await bus.publish("s", b"x", reply="r.>")


async def test_bad_node_arguments_are_refused_where_given() -> None:
    """A bad outbound_limit used to be taken, and broke the node (or dropped
    every forwarded message) only once a peer linked."""
    for kw, exc, match in [
        ({"outbound_limit": "x"}, TypeError, r"outbound_limit must be an int \(bytes\), not 'x'"),
        ({"outbound_limit": -1}, ValueError, "outbound_limit must be at least 1"),
        ({"outbound_limit": 0}, ValueError, "outbound_limit must be at least 1"),
        ({"max_link_subs": 0}, ValueError, "max_link_subs must be at least 1"),
        ({"max_link_subs": 2.5}, TypeError, "max_link_subs must be an int"),
        ({"max_frame": "64"}, TypeError, "max_frame must be an int"),
        ({"max_frame": 10}, ValueError, "max_frame must be between 1024 and 4294967295"),
        ({"name": b"n"}, TypeError, "name must be a str, not b'n'"),  # it travels in each hello
        ({"name": "n" * 300}, ValueError, "name must be at most 256 characters, not 300"),
    ]:
        with pytest.raises(exc, match=match):
            Node(**kw)
    assert Node(name="n" * 256).name == "n" * 256


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelled_next_after_wakeup_loses_nothing() -> None:
    """The message arrives and the waiting next() is cancelled before it resumes."""
    async with Node() as node:
        bus = Bus(node)
        sub = await bus.subscribe("c")
        for i in range(20):
            task = asyncio.ensure_future(sub.next())
            await asyncio.sleep(0)  # the task is now waiting inside next()
            assert not task.done()
            await bus.publish("c", i)  # wakes it ...
            task.cancel()  # ... and cancels it before it runs
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await sub.next(timeout=5)).decode(int) == i
        assert sub.pending == 0


async def test_next_cancelled_at_random_loses_and_duplicates_nothing() -> None:
    async with pair() as (client, server):
        sub = await server.subscribe("stream")
        await settle(client, server)
        n = 2000
        rng = random.Random(1234)

        async def produce() -> None:
            for i in range(n):
                await client.publish("stream", i)
                if i % 7 == 0:
                    await asyncio.sleep(0)

        got: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            with anyio.fail_after(30):
                while len(got) < n:
                    with anyio.move_on_after(rng.choice([0, 0, 1e-5, 1e-4, 1e-3])):
                        got.append((await sub.next()).decode(int))
                    with contextlib.suppress(TimeoutError):
                        got.append((await sub.next(timeout=rng.choice([0, 1e-5]))).decode(int))
        assert got == list(range(n))


async def test_cancelled_request_does_not_disturb_later_ones() -> None:
    async with pair() as (client, server):
        gate = asyncio.Event()
        entered = asyncio.Event()
        handled: list[int] = []

        async def handler(n: int) -> int:
            handled.append(n)
            if n == 0:
                entered.set()
                await gate.wait()
            return n * 10

        await server.serve("slow", handler)
        await settle(client, server)
        task = asyncio.ensure_future(client.request("slow", 0, timeout=30))
        await entered.wait()  # the request is in the handler
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client.node.inbox.futures, "the cancelled request left its future behind"
        gate.set()  # the late reply comes back and must be ignored
        for i in range(1, 20):
            assert (await client.request("slow", i, timeout=5)).decode(int) == i * 10
        # cancel during the publish itself (before the request left) too
        for i in range(20, 30):
            t = asyncio.ensure_future(client.request("slow", i, timeout=5))
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        assert (await client.request("slow", 99, timeout=5)).decode(int) == 990
        assert not client.node.inbox.futures
        assert handled[:20] == list(range(20))


async def stalled_peer(node: Node, sub: fr.Sub) -> tuple[MemoryLink, MemoryLink, LinkState]:
    """A raw peer on a small memory link that subscribes with ``sub`` and never reads
    (until the test does): (the node's end, the peer's end, the node's LinkState)."""
    a, raw = memory_pair(capacity=16 * 1024, high_water=32 * 1024)
    ls = await node.add_link(a, name="raw", wait=False)
    raw.send_nowait(fr.encode_frame(fr.Hello(fr.PROTOCOL_VERSION, "raw", os.getpid(), os.getuid())))
    raw.send_nowait(fr.encode_frame(sub))
    with anyio.fail_after(5):
        await ls.ready.wait()
        while not node.has_interest(sub.subject):
            await asyncio.sleep(0)  # the Sub follows the hello in the same batch
    return a, raw, ls


async def test_request_times_out_while_its_link_is_above_high_water() -> None:
    """The timeout covers the whole request, the wait for a full link included."""
    async with Node(name="req") as node:
        bus = Bus(node)
        a, raw, ls = await stalled_peer(node, fr.Sub("svc", "g"))
        await bus.publish("svc", b"\0" * 100_000)  # fills what the peer would read
        with anyio.fail_after(10), pytest.raises(RequestTimeout):
            await bus.request("svc", b"\0" * 100_000, timeout=0.2)  # above high water
        assert a.pending_out > a.high_water
        assert not node.inbox.futures
        assert not ls.inflight  # the gave-up request is not counted as in flight
        await raw.aclose()


async def test_a_request_cancelled_while_its_link_is_full_leaves_no_deadline_behind() -> None:
    """Its future is cancelled with it: the deadline does not fail it later (an
    exception nobody would retrieve)."""
    async with Node(name="req") as node:
        bus = Bus(node)
        a, raw, _ls = await stalled_peer(node, fr.Sub("svc", "g"))
        await bus.publish("svc", b"\0" * 100_000)
        req = asyncio.ensure_future(bus.request("svc", b"\0" * 100_000, timeout=30))
        while not node.deadlines._queues:  # armed just before it waits for room
            await asyncio.sleep(0)
        assert a.pending_out > a.high_water and not req.done()
        req.cancel()
        with pytest.raises(asyncio.CancelledError):
            await req
        queued = [e for q in node.deadlines._queues.values() for e in q]
        assert queued and not any(e[1] in node.inbox.futures for e in queued)
        await raw.aclose()


async def test_cancelled_publish_under_backpressure_loses_and_duplicates_nothing() -> None:
    """A peer that does not read: publish blocks; cancelling it keeps the message exactly once."""
    async with Node(name="pub") as node:
        bus = Bus(node)
        # the raw peer never reads until the end (the node's hello waits unread)
        _a, raw, _ls = await stalled_peer(node, fr.Sub("bp"))
        payload = b"\0" * 4096
        seq = 0
        cancelled = 0
        while cancelled < 3 and seq < 10_000:
            t = asyncio.ensure_future(bus.publish("bp", seq.to_bytes(4, "big") + payload))
            for _ in range(3):
                await asyncio.sleep(0)  # let it run until it blocks (or completes)
            seq += 1
            if not t.done():
                t.cancel()
                cancelled += 1
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            else:
                t.result()
        assert cancelled == 3, "publish never blocked on a stalled peer"
        later = asyncio.ensure_future(bus.publish("bp", b"\xff\xff\xff\xffend"))
        got: list[int] = []
        with anyio.fail_after(20):
            while True:
                f = fr.decode_frame(await raw.recv())
                if isinstance(f, fr.Msg):
                    if f.payload.endswith(b"end"):
                        break
                    got.append(int.from_bytes(f.payload[:4], "big"))
        await later
        assert got == list(range(seq)), "messages lost or duplicated around cancelled publishes"
        await raw.aclose()


# -- flush, drain, close ------------------------------------------------------------------------


async def test_flush_means_the_peer_processed_everything() -> None:
    async with pair() as (client, server):
        sub = await server.subscribe("f")
        await client.flush()  # no-op is fine too
        await settle(client, server)
        for i in range(500):
            await client.publish("f", i)
        await client.flush()
        assert sub.pending == 500
    async with Node() as lonely:
        await Bus(lonely).flush()  # no links: returns at once


async def test_drain_finishes_requests_in_progress_then_closes() -> None:
    async with pair() as (client, server):
        entered = asyncio.Event()
        release = asyncio.Event()

        async def slow(m: Msg) -> bytes:
            entered.set()
            await release.wait()
            return b"done"

        await server.serve("work", slow)
        await settle(client, server)
        req = asyncio.ensure_future(client.request("work", timeout=30))
        await entered.wait()
        drain = asyncio.ensure_future(server.drain())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not drain.done(), "drain returned while a request was being handled"
        assert not req.done()
        release.set()
        assert (await req).data == b"done"
        with anyio.fail_after(10):
            await drain
        assert server.closed
        await server.drain()  # again: nothing to do
        # the server went away: nobody serves "work" any more
        with anyio.fail_after(10):
            while client.node.links:
                await client.flush()
        with pytest.raises(NoResponders):
            await client.request("work", timeout=30)


async def test_a_failed_background_task_ends_subscriptions_and_requests() -> None:
    # A task of the node's task group that raises leaves the node unusable:
    # readers and requesters hear of it at once, and closing still works.
    async with pair() as (client, server):
        sub = await client.subscribe("s")
        never = await server.subscribe("never")
        await settle(client, server)
        req = asyncio.ensure_future(client.request("never", timeout=None))
        await never.next(timeout=5)
        reader = asyncio.ensure_future(sub.next())

        async def broken() -> None:
            raise RuntimeError("a bug in a background task")

        client.node.task_group.start_soon(broken)
        with anyio.fail_after(5):
            with pytest.raises(BusClosed):
                await reader
            with pytest.raises(ConnectionClosed):  # its link was dropped (or BusClosed)
                await req
        assert client.node.closed
        with anyio.fail_after(5):
            await client.aclose()  # still closes (it used to return at once)


async def test_aclose_is_idempotent_and_ends_everything() -> None:
    async with pair() as (client, server):
        sub = await client.subscribe("s")
        await server.serve("svc", lambda m: b"")
        await settle(client, server)
        never = await server.subscribe("never")
        await settle(client, server)
        req = asyncio.ensure_future(client.request("never", timeout=30))
        await never.next(timeout=5)
        await client.aclose()
        await client.aclose()
        assert client.closed
        with pytest.raises(BusClosed):
            await req
        with pytest.raises(BusClosed):
            await client.publish("s", b"x")
        with pytest.raises(BusClosed):
            await client.subscribe("s")
        with pytest.raises(BusClosed):
            await client.request("svc", timeout=5)
        with pytest.raises(BusClosed):
            await client.serve("x", lambda m: b"")
        with pytest.raises(BusClosed):
            await client.flush()
        with pytest.raises(BusClosed):
            await sub.next(timeout=5)
        assert [m async for m in sub] == []
        await client.drain()  # closed already: nothing to do
        assert not client.node.links
        assert isinstance(BusClosed("x"), ipcbus.ConnectionClosed)


async def test_peer_sees_end_of_stream_after_close() -> None:
    async with Node() as node:
        a, raw = memory_pair()
        await node.add_link(a, wait=False)
        bus = Bus(node, owns_node=True)
        await bus.aclose()
        frames = []
        with anyio.fail_after(5):
            while True:
                try:
                    frames.append(fr.decode_frame(await raw.recv()))
                except EndOfStream:
                    break
        assert isinstance(frames[0], fr.Hello)
        assert fr.Notice("shutdown", "node closing") in frames
        await raw.aclose()


# -- stats -----------------------------------------------------------------------------------------


async def test_stats_fields() -> None:
    async with pair() as (client, server):
        sub = await server.subscribe("st.*", queue="g")
        await settle(client, server)
        for _ in range(3):
            await client.publish("st.x", b"12345")
        await settle(client, server)
        cs, ss = client.stats(), server.stats()
        for st in (cs, ss):
            for key in (
                "node_id",
                "name",
                "pid",
                "uptime",
                "msgs_in",
                "msgs_out",
                "bytes_in",
                "bytes_out",
                "pending",
                "dropped",
                "subscriptions",
                "links",
            ):
                assert key in st, key
            assert st["pid"] == os.getpid()
            (link,) = st["links"]
            for key in (
                "transport",
                "peer_pid",
                "peer_uid",
                "msgs_in",
                "msgs_out",
                "bytes_in",
                "bytes_out",
                "pending_out",
                "dropped",
                "slow_consumer_events",
                "inflight_requests",
                "interest",
                "peer_node",
                "peer_name",
            ):
                assert key in link, key
            assert link["transport"] == "pipe"
        assert cs["msgs_out"] == 3 and cs["bytes_out"] == 15
        assert ss["msgs_in"] == 3 and ss["bytes_in"] == 15
        assert ss["pending"] == 3
        (row,) = [s for s in ss["subscriptions"] if s["sid"] == sub._core.sid]
        assert row == {
            "sid": sub._core.sid,
            "subject": "st.*",
            "queue": "g",
            "pending": 3,
            "delivered": 3,
            "dropped": 0,
        }
        assert cs["links"][0]["peer_node"] == ss["node_id"]
        assert cs["links"][0]["peer_name"] == "server"
        assert "st.* [g]" in cs["links"][0]["interest"]
        msgspec.json.encode(cs)  # plain data, encodable


async def test_headers_count_toward_the_frame_limit() -> None:
    async with refusing_pair("h", max_frame=8 * 1024) as (client, sub, sent):
        with pytest.raises(FrameTooLarge):
            await client.publish("h", b"", headers={"big": "v" * 10_000})
        with pytest.raises(FrameTooLarge):
            await client.publish("h", b"", headers={"big": "\u20ac" * 3000})  # 9000 bytes in UTF-8
        assert sent() == 0
        await client.publish("h", b"", headers={"small": "ok"})
        assert (await sub.next(timeout=5)).headers == {"small": "ok"}


async def test_error_reply_over_max_frame_is_cut_down() -> None:
    """A handler raising with a message longer than max_frame: still a RemoteError."""
    async with pair(max_frame=2048) as (client, server):

        def boom(m: Msg) -> bytes:
            raise ValueError("x" * 3000)

        await server.serve("boom", boom)
        await server.serve("echo", lambda m: m.data)
        await settle(client, server)
        with pytest.raises(RemoteError) as info:
            await client.request("boom", timeout=5)
        assert info.value.type_name == "ValueError"
        assert info.value.message.startswith("xxx")
        assert (await client.request("echo", b"alive", timeout=5)).data == b"alive"


# -- review: bad arguments to serve(), several readers, limits, timeouts -------------


async def test_serve_refuses_bad_handlers_and_leaves_nothing_subscribed() -> None:
    """A serve() that raises subscribes nothing: later requests get NoResponders."""

    async def ok(m: Msg) -> bytes:
        return b"ok"

    def two(a: Msg, b: int) -> bytes:
        return b""

    def kw_only(*, m: Msg) -> bytes:
        return b""

    def local_type() -> Callable[..., Any]:
        class Local(msgspec.Struct):
            x: int

        def handler(p: Local) -> int:  # a string annotation naming a local class
            return p.x

        return handler

    async with Node() as node:
        bus = Bus(node)
        bad: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
            (lambda: 1, {}, TypeError, "exactly one positional argument"),
            (two, {}, TypeError, "it also needs b"),
            (kw_only, {}, TypeError, "exactly one positional argument"),
            (42, {}, TypeError, "must be a function"),
            (local_type(), {}, TypeError, "cannot resolve the annotation 'Local'"),
            (ok, {"concurrency": 0}, ValueError, "at least 1"),
            (ok, {"concurrency": -1}, ValueError, "at least 1"),
            (ok, {"concurrency": 1.5}, TypeError, "concurrency must be an int"),
            (ok, {"concurrency": True}, TypeError, "concurrency must be an int"),
            (ok, {"concurrency": "2"}, TypeError, "concurrency must be an int"),
        ]
        for handler, kw, exc, match in bad:
            with pytest.raises(exc, match=match):
                await bus.serve("svc", handler, **kw)
            assert not node.has_interest("svc"), (handler, kw)
            assert bus.stats()["subscriptions"] == []
            with pytest.raises(NoResponders):
                await bus.request("svc", b"x", timeout=1)
        svc = await bus.serve("svc4", lambda m: b"four", concurrency=4.0)  # type: ignore[call-overload]
        assert (await bus.request("svc4", timeout=5)).data == b"four"
        await svc.stop()
        await bus.serve("svc", lambda m, extra=1: b"fine")  # extra parameters with defaults are fine
        assert (await bus.request("svc", timeout=5)).data == b"fine"


async def test_two_readers_of_one_subscription_both_end_at_unsubscribe() -> None:
    async with Node() as node:
        bus = Bus(node)
        sub = await bus.subscribe("a")
        got: list[bytes] = []

        async def reader() -> str:
            async for m in sub:
                got.append(m.data)
            return "ended"

        async def timed_reader() -> str:
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append((await sub.next(timeout=30)).data)
            return "timed out"

        readers = [asyncio.create_task(reader()), asyncio.create_task(reader())]
        await asyncio.sleep(0)
        for i in range(20):
            await bus.publish("a", b"%d" % i)
            if i % 3 == 0:
                await asyncio.sleep(0)
        late = asyncio.create_task(timed_reader())
        await asyncio.sleep(0)
        await sub.unsubscribe()
        with anyio.fail_after(5):
            assert await asyncio.gather(*readers) == ["ended", "ended"]
            with pytest.raises(BusClosed):
                await late
        assert sorted(got, key=int) == [b"%d" % i for i in range(20)]  # each once


async def test_drop_old_keeps_within_the_byte_limit() -> None:
    async with Node() as node:
        bus = Bus(node)
        sub = await bus.subscribe("s", pending_bytes=1000, overflow="drop_old")
        for _ in range(100):
            await bus.publish("s", b"\0" * 10)
        for i in range(5):
            await bus.publish("s", bytes([i]) * 400)
        assert sub.pending == 2  # the newest two of 400 B: 800 B of 1000
        with pytest.raises(SlowConsumer) as info:
            await sub.next()
        assert info.value.dropped == 103 and sub.dropped == 103
        assert [(await sub.next()).data for _ in range(2)] == [b"\3" * 400, b"\4" * 400]


@pytest.mark.parametrize(
    ("timeout", "exc", "match"),
    [(float("nan"), ValueError, "not NaN"), ("1", TypeError, "not '1'"), (True, TypeError, "not True")],
)
async def test_bad_timeouts_are_refused_before_anything_is_sent(
    timeout: Any, exc: type[Exception], match: str
) -> None:
    async with pair() as (client, server):
        sub = await server.subscribe("q")
        await settle(client, server)
        with pytest.raises(exc, match=match):
            await client.request("q", b"x", timeout=timeout)
        with pytest.raises(exc, match=match):
            await sub.next(timeout=timeout)
        with pytest.raises(exc, match=match):
            await client.flush(timeout=timeout)
        await settle(client, server)
        assert sub.pending == 0  # the request never left
        assert client.node.deadlines._queues == {}  # and no deadline was queued for it


async def test_infinite_and_negative_timeouts() -> None:
    async with pair() as (client, server):
        await server.serve("echo", lambda m: m.data)
        await settle(client, server)
        assert (await client.request("echo", b"x", timeout=float("inf"))).data == b"x"
        quiet = await server.subscribe("quiet")
        await settle(client, server)
        with pytest.raises(RequestTimeout):
            await client.request("quiet", b"x", timeout=-1)
        assert (await quiet.next(timeout=-1.0)).data == b"x"  # pending: taken at once
        with pytest.raises(TimeoutError):
            await quiet.next(timeout=-1.0)


async def test_text_that_cannot_be_utf8_is_refused_before_anything_is_sent() -> None:
    async with pair() as (client, server):
        local = await client.subscribe(">")
        remote = await server.subscribe(">")
        await settle(client, server)
        with pytest.raises(BadSubject, match="cannot be encoded as UTF-8"):
            await client.publish("a\ud800", b"x")
        with pytest.raises(BadSubject, match="cannot be encoded as UTF-8"):
            await client.publish("a", b"x", reply="r\udfff")
        with pytest.raises(BadSubject, match="cannot be encoded as UTF-8"):
            await client.subscribe("b.\ud800")
        for headers in ({"k": "\ud800"}, {"\udc80": "v"}):
            with pytest.raises(EncodeError, match="cannot be encoded as UTF-8"):
                await client.publish("a", b"x", headers=headers)
            with pytest.raises(EncodeError, match="cannot be encoded as UTF-8"):
                await client.request("a", b"x", headers=headers, timeout=1)
        await client.publish("a.é", b"fine", headers={"ключ": "значение"})
        await settle(client, server)
        assert local.pending == 1 and remote.pending == 1  # only the good one, on both sides


async def test_a_bus_on_a_shared_node_ends_its_subscriptions_on_close() -> None:
    async with Node() as node:
        bus, other = Bus(node), Bus(node)
        sub = await bus.subscribe("a")
        kept = await other.subscribe("a")
        await other.publish("a", b"before")
        await bus.aclose()
        assert node.has_interest("a")  # the other bus's subscription
        await other.publish("a", b"after")
        assert (await sub.next(timeout=1)).data == b"before"  # what was pending is read
        with pytest.raises(BusClosed):
            await sub.next(timeout=1)
        assert [(await kept.next(timeout=1)).data for _ in range(2)] == [b"before", b"after"]
        await kept.unsubscribe()
        assert not node.has_interest("a")


async def test_a_bus_on_a_shared_node_fails_its_waiting_requests_on_close() -> None:
    async with Node() as node:
        bus, other = Bus(node), Bus(node)
        hold = asyncio.Event()

        async def never(m: ipcbus.Msg) -> bytes:
            await hold.wait()
            return b"late"

        await other.serve("never", never)
        mine = asyncio.ensure_future(bus.request("never", timeout=30))
        theirs = asyncio.ensure_future(other.request("never", timeout=30))
        for _ in range(5):
            await asyncio.sleep(0)
        await bus.aclose()
        with anyio.fail_after(5), pytest.raises(BusClosed, match="while waiting for a reply"):
            await mine
        assert not theirs.done()  # the other bus's request still waits
        hold.set()
        assert (await theirs).data == b"late"


async def test_concurrent_drains_of_a_service_all_return() -> None:
    release = asyncio.Event()

    async def work() -> bytes:
        await release.wait()
        return b"ok"

    async with Node() as node:
        bus = Bus(node)
        svc = await bus.serve("slow", lambda m: work())  # a plain def returning an awaitable
        req = asyncio.create_task(bus.request("slow", b"", timeout=10))
        while not svc._active:
            await asyncio.sleep(0)
        drains = [asyncio.create_task(svc.drain()) for _ in range(3)]
        for _ in range(10):
            await asyncio.sleep(0)  # loop turns: each drain reaches its wait
        assert not any(d.done() for d in drains)
        release.set()
        with anyio.fail_after(5):
            assert (await req).data == b"ok"
            await asyncio.gather(*drains)


@contextlib.asynccontextmanager
async def hub_small_big(small_max: int) -> AsyncIterator[tuple[Node, Node, Node]]:
    """Three nodes: "small" (max_frame ``small_max``) and "big" (the default),
    each linked to "hub" (the default) by pipes that carry up to 1 MiB."""
    async with (
        Node(name="hub") as hub,
        Node(name="small", max_frame=small_max) as small,
        Node(name="big") as big,
    ):
        for other in (small, big):
            a, b = pipe_pair(max_frame=1 << 20)
            ls = await hub.add_link(a, name=other.name, wait=False)
            await other.add_link(b, name="hub")
            await ls.ready.wait()
        yield hub, small, big


async def test_a_reply_too_large_for_its_requester_is_answered_once() -> None:
    """A reply passed on from another node that is over the requester's
    max_frame: the requester gets one FrameTooLarge error (it also got a
    second, closed status saying "too much in flight")."""
    async with hub_small_big(64 * 1024) as (hub, small, big):
        await Bus(big).serve("blob", lambda m: b"z" * 100_000)
        await settle(Bus(hub), Bus(small), Bus(big))
        before = small.msgs_in
        with pytest.raises(RemoteError, match=r"FrameTooLarge.*the reply \(\d+ bytes\)"):
            await Bus(small).request("blob", timeout=5)
        await settle(Bus(big), Bus(hub), Bus(small))
        assert small.msgs_in - before == 1
        assert hub.stats()["dropped"] == 1


async def test_a_peer_with_a_smaller_max_frame_is_sent_nothing_larger() -> None:
    """The peer's Hello says what it takes: a message published here that is too
    large for it raises FrameTooLarge before sending; one passed on from another
    link is skipped for it (counted, logged, and reported to its subscribers:
    SlowConsumer); the peer's link stays up."""
    async with hub_small_big(64 * 1024) as (hub, small, big):
        hub_bus, small_bus, big_bus = Bus(hub), Bus(small), Bus(big)
        sub = await small_bus.subscribe("data")
        await hub_bus.serve("blob", lambda m: b"z" * 100_000)
        await settle(hub_bus, small_bus, big_bus)
        with pytest.raises(RemoteError, match=r"FrameTooLarge.*a limit its peer announced"):
            await small_bus.request("blob", timeout=5)  # the reply would not fit
        with pytest.raises(FrameTooLarge, match="a limit its peer announced"):
            await hub_bus.publish("data", b"y" * 100_000)  # published on the hub itself
        await big_bus.publish("data", b"y" * 100_000)  # passed on by the hub: skipped
        await big_bus.publish("data", b"fits")
        await settle(hub_bus, small_bus, big_bus)
        with pytest.raises(SlowConsumer) as lost:
            await sub.next(timeout=5)
        assert lost.value.dropped == 1
        assert (await sub.next(timeout=5)).data == b"fits"
        assert sub.pending == 0
        assert [lk["dropped"] for lk in hub.stats()["links"] if lk["name"] == "small"] == [1]
        assert not small_bus.closed and len(small.links) == 1
        assert (await big_bus.request("blob", timeout=5)).data == b"z" * 100_000  # big takes it
        # A long error text is cut to what the requester's link takes.
        await hub_bus.serve("fail", lambda m: (_ for _ in ()).throw(ValueError("e" * 4000)))
        await settle(hub_bus, small_bus)
        with pytest.raises(RemoteError, match="ValueError"):
            await small_bus.request("fail", timeout=5)
        # Requests the hub sends to the small node: a long queue-group name counts too.
        q = "q" * 1000
        await small_bus.serve("svc", lambda m: b"ok", queue=q)
        await settle(hub_bus, small_bus)
        with pytest.raises(FrameTooLarge, match="a limit its peer announced"):
            await hub_bus.request("svc", b"x" * (65536 - 200), timeout=5)
        assert (await hub_bus.request("svc", b"x" * 1000, timeout=5)).data == b"ok"
        # ...and so do requests passed upstream for lack of a known responder.
        small_link = next(ls for ls in hub.links if ls.name == "small")
        hub.upstream = small_link
        with pytest.raises(FrameTooLarge, match="a limit its peer announced"):
            await hub_bus.request("nobody.here", b"x" * 100_000, timeout=5)
        hub.upstream = None
        assert not small_bus.closed and len(small.links) == 1
        assert not [k for k in hub._routes if k.startswith("_INBOX.")]  # one-off subjects not cached


async def test_drop_notices_count_each_subject_apart() -> None:
    """A hub that drops messages for a slow link says how many on each subject."""
    async with Node(name="hub", outbound_limit=64 * 1024) as hub, Node(name="pub") as pub:
        a, b = pipe_pair()
        ls = await hub.add_link(a, name="pub", wait=False)
        await pub.add_link(b, name="hub")
        await ls.ready.wait()
        _a, raw, _ls = await stalled_peer(hub, fr.Sub("t.a"))
        raw.send_nowait(fr.encode_frame(fr.Sub("t.b")))
        with anyio.fail_after(5):
            while not hub.has_interest("t.b"):
                await asyncio.sleep(0)
        await settle(Bus(pub))
        sent = {"t.a": 900, "t.b": 100}
        for i in range(1000):
            await Bus(pub).publish("t.a" if i % 10 else "t.b", b"\0" * 1024)
        await settle(Bus(pub))  # the hub has routed (or dropped) all of it
        got = dict.fromkeys(sent, 0)
        noticed = dict.fromkeys(sent, 0)
        with anyio.fail_after(20):
            while sum(got.values()) + sum(noticed.values()) < sum(sent.values()):
                f = fr.decode_frame(await raw.recv())
                if isinstance(f, fr.Msg):
                    got[f.subject] += 1
                elif isinstance(f, fr.Notice) and f.code == "slow_consumer":
                    assert sum(f.counts) == f.count and len(f.counts) == len(f.subjects)
                    for s, n in zip(f.subjects, f.counts, strict=True):
                        noticed[s] += n
        assert all(noticed.values()), (noticed, got)  # both subjects lost some
        assert {s: got[s] + noticed[s] for s in sent} == sent
        await raw.aclose()


@pytest.mark.parametrize("with_counts", [True, False], ids=["counts", "total only"])
async def test_a_subscription_is_told_the_drops_on_its_own_subjects(with_counts: bool) -> None:
    async with Node(name="client") as node:
        bus = Bus(node)
        subs = {p: await bus.subscribe(p) for p in ("t.a", "t.b", "t.>", "other")}
        a, raw = memory_pair()
        ls = await node.add_link(a, name="raw", wait=False)
        raw.send_nowait(fr.encode_frame(fr.Hello(fr.PROTOCOL_VERSION, "raw", os.getpid(), os.getuid())))
        counts = (7, 3) if with_counts else ()
        raw.send_nowait(fr.encode_frame(fr.Notice("slow_consumer", "10 dropped", ("t.a", "t.b"), 10, counts)))
        await ls.ready.wait()
        want = {"t.a": 7, "t.b": 3, "t.>": 10} if with_counts else {"t.a": 10, "t.b": 10, "t.>": 10}
        for p, n in want.items():
            with pytest.raises(SlowConsumer) as info:
                await subs[p].next(timeout=5)  # once the notice is read
            assert info.value.dropped == n and subs[p].dropped == n
        with pytest.raises(TimeoutError):
            await subs["other"].next(timeout=0.01)
        await raw.aclose()


@pytest.mark.parametrize("how", ["aclose", "drain", "drain in a task of its own"])
async def test_a_handler_may_close_its_own_bus(how: str) -> None:
    """The "shutdown request" pattern: a handler closing (or draining) its own bus
    cannot wait for itself; the close runs after it and its reply still goes out."""
    async with pair() as (client, server):
        done = asyncio.Event()

        async def shutdown(m: Msg) -> bytes:
            if how == "aclose":
                await server.aclose()
                assert server.closed  # at once, though the rest runs after this handler
            elif how == "drain":
                await server.drain(timeout=5)
            else:  # a task the handler started (asyncio.wait_for does so on 3.11)
                await asyncio.wait_for(asyncio.ensure_future(server.drain(timeout=5)), 5)
            await asyncio.sleep(0.01)  # still running when the background close starts
            done.set()
            return b"bye"

        await server.serve("shutdown", shutdown)
        await settle(client, server)
        with anyio.fail_after(10):
            assert (await client.request("shutdown", timeout=5)).data == b"bye"
            await done.wait()
            await server.node.closing.wait()
        assert server.closed
        with pytest.raises(BusClosed):
            await server.publish("x", b"")


async def test_a_service_drained_from_its_own_handler_stops_taking_requests() -> None:
    async with Node() as node:
        bus = Bus(node)
        svc: ipcbus.Service | None = None

        async def stop(m: Msg) -> bytes:
            assert svc is not None
            await svc.drain()  # would wait for this very handler
            return b"stopping"

        svc = await bus.serve("stop", stop)
        with anyio.fail_after(5):
            assert (await bus.request("stop", timeout=5)).data == b"stopping"
        with pytest.raises(NoResponders):
            await bus.request("stop", timeout=1)


async def test_behind_a_hub_a_small_peer_gets_errors_and_its_group_share_fits() -> None:
    """A reply too large for the requester's link comes back as RemoteError
    (FrameTooLarge) instead of silence; a queue-group request too large for one
    member goes to a member that takes it."""
    async with hub_small_big(4096) as (hub, small, big):
        small_bus, big_bus = Bus(small), Bus(big)
        await big_bus.serve("blob", lambda m: b"z" * 6000)
        await small_bus.serve("work", lambda m: b"small", queue="w")
        await big_bus.serve("work", lambda m: b"big", queue="w")
        await settle(Bus(hub), small_bus, big_bus)
        with anyio.fail_after(5), pytest.raises(RemoteError, match=r"FrameTooLarge.*4096-byte"):
            await small_bus.request("blob", timeout=30)
        got = [(await Bus(hub).request("work", b"x" * 5000, timeout=5)).data for _ in range(6)]
        assert got == [b"big"] * 6  # never the member whose link would refuse it
        small_ones = {(await Bus(hub).request("work", b"x", timeout=5)).data for _ in range(10)}
        assert small_ones == {b"small", b"big"}  # small requests still go to both
        # A request passed on to a service only the small node serves: told at once.
        await small_bus.serve("only.small", lambda m: b"never", queue="svc")
        await settle(Bus(hub), small_bus, big_bus)
        with anyio.fail_after(5), pytest.raises(RemoteError, match=r"FrameTooLarge.*4096-byte"):
            await big_bus.request("only.small", b"x" * 5000, timeout=30)
        # The same for a plain subscriber (no queue group): not "no responders".
        await small_bus.serve("only.plain", lambda m: b"never")
        await settle(Bus(hub), small_bus, big_bus)
        with anyio.fail_after(5), pytest.raises(RemoteError, match=r"FrameTooLarge.*4096-byte"):
            await big_bus.request("only.plain", b"x" * 5000, timeout=30)
        assert (await big_bus.request("only.plain", b"x", timeout=5)).data == b"never"


async def test_closing_a_bus_on_a_shared_node_cancels_its_handlers_and_tells_their_requesters() -> None:
    """Bus(node).aclose() ends the services made through it: a handler still
    running is cancelled, and its requester gets ConnectionClosed at once
    (it waited for its timeout, or forever, the node staying up)."""
    async with pair() as (client, server_bus):
        node = server_bus._node
        svc_bus = Bus(node)
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def hang(m: Msg) -> bytes:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()
            return b""

        await svc_bus.serve("hang", hang, concurrency=1)
        await settle(client, server_bus)
        request = asyncio.ensure_future(client.request("hang", timeout=None))
        await started.wait()
        queued = [asyncio.ensure_future(client.request("hang", timeout=None)) for _ in range(2)]
        await client.flush()  # both wait behind the first (concurrency=1)
        await svc_bus.aclose()
        for req in (request, *queued):  # the running one, and the ones queued behind it
            with anyio.fail_after(10), pytest.raises(ConnectionClosed, match="closed before answering"):
                await req
        assert cancelled.is_set()
        # The node and its other buses go on.
        await server_bus.serve("echo", lambda m: m.data)
        await settle(client, server_bus)
        assert (await client.request("echo", b"x", timeout=5)).data == b"x"


async def test_a_loop_of_publishes_below_every_limit_still_lets_other_tasks_run() -> None:
    """Nobody subscribed, or links far below their high-water mark: no publish
    has to wait, yet every 1024th yields, so the loop can be cancelled and
    other tasks run."""
    async with Node(name="n") as node, loop_turns() as turns:
        bus = Bus(node)
        before = turns()
        for i in range(10 * 1024):
            await bus.publish("nobody.listens", i)
        assert turns() - before >= 9
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                while True:
                    await bus.publish("nobody.listens", b"")


async def test_aclose_from_its_own_handler_lets_that_handler_answer() -> None:
    """A 'shutdown' request to a bus on a shared node: the close runs in the
    background and cancels the bus's other handlers, not the one that asked
    (even another handler of the same service: cancelling one task of the
    service's task group outright cancelled them all)."""
    async with pair() as (client, server_bus):
        svc_bus = Bus(server_bus._node)

        async def ctl(m: Msg) -> bytes:
            if m.data == b"slow":
                await asyncio.sleep(30)
            await svc_bus.aclose()
            await asyncio.sleep(0.01)  # still running when the background close starts
            return b"bye"

        await svc_bus.serve("admin.ctl", ctl, concurrency=2)
        await settle(client, server_bus)
        slow = asyncio.ensure_future(client.request("admin.ctl", b"slow", timeout=10))
        await client.flush()
        assert (await client.request("admin.ctl", b"stop", timeout=10)).data == b"bye"
        with pytest.raises(ConnectionClosed, match="closed before answering"):
            await slow
        assert svc_bus.closed


async def test_a_close_held_against_an_anyio_cancellation_does_not_spin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """anyio re-delivers its cancellation on every loop turn: shielded() must
    keep it off while it waits, not catch and re-await (a busy loop)."""
    from ipcbus.node import shielded

    finished = asyncio.Event()
    waits = 0
    real_shield = asyncio.shield

    def counting_shield(aw: Any) -> Any:
        nonlocal waits
        waits += 1
        return real_shield(aw)

    monkeypatch.setattr(asyncio, "shield", counting_shield)

    async def slow_cleanup() -> str:
        for _ in range(100):  # a clean-up that takes many loop turns
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        finished.set()
        return "done"

    with anyio.CancelScope() as scope:
        scope.cancel()
        await shielded(slow_cleanup())  # to its end, then the scope's cancellation lands
        pytest.fail("the cancelled scope went on")
    assert scope.cancelled_caught and finished.is_set()
    assert waits == 1, f"woken {waits} times: waiting, not re-awaiting each cancellation"


class CmdA(msgspec.Struct, tag="a"):
    """One member of a tagged union."""

    n: int


class CmdB(msgspec.Struct, tag="b"):
    """The other member."""

    s: str


async def test_decode_into_unions_literals_and_raw_bytes() -> None:
    async with pair() as (client, server):
        sub = await server.subscribe("t.>")
        await settle(client, server)
        await client.publish("t.opt", None)
        await client.publish("t.cmd", CmdB("x"))
        await client.publish("t.lit", "b")
        await client.publish("t.raw", b"\x00\xffraw")
        got = [await sub.next(timeout=5) for _ in range(4)]
        assert got[0].decode(int | None) is None
        assert got[1].decode(CmdA | CmdB) == CmdB("x")
        assert got[2].decode(typing.Literal["a", "b"]) == "b"
        with pytest.raises(DecodeError, match=r"does not decode as Literal\['a'\]"):
            got[2].decode(typing.Literal["a"])
        with pytest.raises(DecodeError, match="does not decode as CmdA: "):
            got[1].decode(CmdA)
        # bytes are sent as they are: decode(bytes) gives them back, not a MessagePack bin
        assert got[3].decode(bytes) == b"\x00\xffraw"
        assert got[3].decode(bytearray) == bytearray(b"\x00\xffraw")
        assert bytes(got[3].decode(memoryview)) == b"\x00\xffraw"


async def test_handler_annotated_bytes_gets_the_payload() -> None:
    async with pair() as (client, server):

        def upper(data: bytes) -> bytes:
            assert type(data) is bytes
            return data.upper()

        async def length(data: bytearray) -> int:
            assert type(data) is bytearray
            return len(data)

        await server.serve("upper", upper)
        await server.serve("len", length)
        await settle(client, server)
        assert (await client.request("upper", b"abc", timeout=5)).decode(bytes) == b"ABC"
        assert (await client.request("len", b"abcd", timeout=5)).decode(int) == 4


async def test_serve_on_a_node_not_started_raises_before_subscribing() -> None:
    node = Node(name="idle")
    bus = Bus(node)
    with pytest.raises(BusClosed, match=r"not started: use `async with node` or `await node.start\(\)`"):
        await bus.serve("svc", lambda m: b"")
    assert not bus._subs and not bus._services  # nothing subscribed, nothing would answer
    async with node:
        await bus.serve("svc", lambda m: b"ok")
        assert (await bus.request("svc", timeout=5)).data == b"ok"
        await bus.aclose()


async def test_a_bus_on_a_node_not_started_refuses_every_call() -> None:
    """publish and flush did nothing, subscribe subscribed and request waited
    for its timeout: on a node nobody started, nothing could come of them."""
    node = Node(name="idle")
    bus = Bus(node)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: bus.publish("a", b"x"),
        lambda: bus.subscribe("a"),
        lambda: bus.request("a", b"x", timeout=30),
        lambda: bus.flush(),
    ]
    for call in calls:
        with pytest.raises(BusClosed, match=r"node 'idle' is not started: use `async with node`"):
            await call()
    assert not bus._subs
    async with node:  # the same bus works once its node runs
        sub = await bus.subscribe("a")
        await bus.publish("a", b"x")
        assert (await sub.next(timeout=5)).data == b"x"
        await bus.aclose()
    with pytest.raises(BusClosed, match="bus is closed"):
        await bus.publish("a", b"x")


async def test_next_timeout_names_the_subscription() -> None:
    async with pair() as (client, _server):
        sub = await client.subscribe("quiet.*")
        with pytest.raises(TimeoutError, match=r"no message on 'quiet\.\*' within 0\.05 s"):
            await sub.next(timeout=0.05)
        await client.publish("quiet.now", b"late")
        assert (await sub.next(timeout=5)).data == b"late"  # the timed-out read took nothing


async def test_timeouts_may_be_none_and_async_with_keeps_the_type() -> None:
    async with pair() as (client, server):
        await client.flush(timeout=None)
        async with client as same:
            assert same is client
            await same.flush(timeout=None)
        await server.drain(timeout=None)
        assert client.closed and server.closed
