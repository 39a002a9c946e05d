"""The hub and connect(): unrelated client processes on one bus, and what goes wrong.

Clients are ``tests.hub_client`` children (started with
``asyncio.create_subprocess_exec``), driven by JSON lines; a hub is embedded
in the test process (``Hub(...)``) or runs as a child (``python -m ipcbus hub
NAME``) when the test kills it.  Events are ordered by the children's output
lines, ``flush()`` round trips, the hub's link-closed callbacks and pidfds,
never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import ipcbus
from ipcbus.busdir import BadBusName, BusDir
from ipcbus.errors import (
    BusBusy,
    BusClosed,
    BusNotFound,
    ConnectionClosed,
    NoResponders,
    RemoteError,
)
from ipcbus.frames import PROTOCOL_VERSION, Sub
from ipcbus.node import LinkState
from ipcbus.records import process_alive
from ipcbus.transports.door import Knock, send_knock

try:
    from hub_client import REPO, Peer, hub_proc, peers, spawn, start_hub, wait_gone
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.hub_client import (
        REPO,
        Peer,
        hub_proc,
        peers,
        spawn,
        start_hub,
        wait_gone,
    )

FIFO_ONLY = ("fifo",)


_names = itertools.count()


@pytest.fixture
def bus_name() -> str:
    """A bus name no other test uses."""
    return f"t{os.getpid()}-{next(_names)}"


# -- helpers ----------------------------------------------------------------------


class LinkWatch:
    """Records the links a hub's node drops: peer pid -> close reason, awaitable."""

    def __init__(self, hub: ipcbus.Hub) -> None:
        self.closed: dict[int | None, str] = {}
        self._changed = asyncio.Event()
        hub.node.on_link_closed.append(self._on_closed)

    def _on_closed(self, ls: LinkState) -> None:
        self.closed[ls.link.info.peer_pid] = ls.close_reason
        self._changed.set()

    async def wait(self, pid: int, timeout: float = 15.0) -> str:
        async with asyncio.timeout(timeout):
            while pid not in self.closed:
                self._changed.clear()
                await self._changed.wait()
        return self.closed[pid]


def sub_pids(hub: ipcbus.Hub) -> dict[int, set[tuple[str, str | None]]]:
    """The hub's subscriptions, by client pid."""
    out: dict[int, set[tuple[str, str | None]]] = {}
    for s in hub.stats()["subscriptions"]:
        out.setdefault(s["pid"], set()).add((s["subject"], s["queue"]))
    return out


def link_of(stats: dict[str, Any], pid: int) -> dict[str, Any]:
    """The link entry of ``pid`` in hub stats."""
    for lk in stats["links"]:
        if lk.get("peer_pid") == pid:
            return dict(lk)
    raise AssertionError(f"no link for pid {pid} in {stats['links']}")


def client_fifos(path: Path, pid: int | None = None) -> list[str]:
    """Client FIFO names in a bus folder (of ``pid``, or of anyone)."""
    pat = re.compile(rf"fifo-{pid if pid is not None else '[0-9]+'}-")
    return [n for n in os.listdir(path) if pat.match(n)]


async def wait_stopped(pid: int) -> None:
    """Wait until our child ``pid`` is stopped (SIGSTOP delivered), without reaping it."""
    await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)


# -- embedded hub, client processes over FIFOs ---------------------------------------


@pytest.mark.single_loop
async def test_fanout_queue_groups_and_requests_across_processes(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub, peers(bus_name, 2) as (a, b):
        for p, svc in ((a, "svc.a"), (b, "svc.b")):
            await p.call("sub", name="fan", subject="fan.>")
            await p.call("sub", name="work", subject="work", queue="g")
            await p.call("serve", subject=svc, mode="pid" if p is a else "echo")
            await p.call("serve", subject="grp", queue="q", mode="pid")
        local = await hub.bus.subscribe("fan.>")
        await hub.bus.flush()

        subs = sub_pids(hub)
        assert subs[a.pid] == {("fan.>", None), ("work", "g"), ("svc.a", None), ("grp", "q")}
        assert subs[b.pid] == {("fan.>", None), ("work", "g"), ("svc.b", None), ("grp", "q")}

        # Fan-out: B publishes, every subscriber (B itself, A, the hub) gets every message.
        await b.call("pub", subject="fan.news", data={"n": 1}, count=50)
        for p in (a, b):
            got = await p.call("count", name="fan")
            assert got["delivered"] == 50, got
        assert [(await local.next(timeout=5)).decode() for _ in range(50)] == [{"n": 1}] * 50

        # Queue group across processes: each message reaches exactly one member.
        await a.call("pub", subject="work", data="job", count=100)
        na = (await a.call("count", name="work"))["delivered"]
        nb = (await b.call("count", name="work"))["delivered"]
        assert na + nb == 100 and na > 0 and nb > 0, (na, nb)

        # Request/reply across processes, both ways.
        assert (await a.call("req", subject="svc.b", data={"x": [1, 2]}))["data"] == {"x": [1, 2]}
        assert (await b.call("req", subject="svc.a"))["data"] == a.pid
        # A queue group of responders in two processes shares the requests.
        pids = {(await hub.bus.request("grp", timeout=5)).decode() for _ in range(20)}
        assert pids == {a.pid, b.pid}
        # Errors cross processes too.
        with pytest.raises(NoResponders):
            await hub.bus.request("nobody.here", timeout=5)
        await a.call("serve", subject="bad", mode="raise")
        with pytest.raises(RemoteError, match="ValueError"):
            await hub.bus.request("bad", "x", timeout=5)
        await b.send("req", subject="bad", data="y")
        err = await b.answer("req")
        assert err["ev"] == "error" and err["type"] == "RemoteError" and "refusing" in err["msg"]


async def test_connect_in_process_pub_sub_request(bus_name: str) -> None:
    """connect() as an awaitable and as a context manager, both in this process."""
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub:
        bus = await ipcbus.connect(bus_name, name="plain")
        try:
            assert isinstance(bus, ipcbus.ClientBus) and bus.transport == "fifo"
            async with ipcbus.connect(bus_name) as other:
                await other.serve("add", lambda m: sum(m.decode(list[int])))
                sub = await other.subscribe("t.*")
                await other.flush()
                await bus.publish("t.one", b"raw bytes")
                assert (await sub.next(timeout=5)).data == b"raw bytes"
                assert (await bus.request("add", [1, 2, 3], timeout=5)).decode() == 6
                names = {lk["peer_name"] for lk in hub.stats()["links"]}
                assert "plain" in names
            assert bus.stats()["links"][0]["peer_pid"] == os.getpid()
        finally:
            await bus.aclose()
        await bus.aclose()  # twice is fine


async def test_request_right_after_a_service_subscribed_elsewhere_is_answered(bus_name: str) -> None:
    """Interest reaches a client a moment after it reached the hub.

    A request made in between goes to the hub, which knows the service (its
    ``flush`` returned), instead of failing with ``NoResponders`` at the
    client; a subject nobody serves gets ``NoResponders`` from the hub.
    """
    async with (
        ipcbus.Hub(bus_name, transports=FIFO_ONLY),
        ipcbus.connect(bus_name, name="late") as b,
        ipcbus.connect(bus_name, name="svc") as a,
    ):
        held: list[tuple[Any, LinkState]] = []
        hear = b.node._on_control

        def late(frame: Any, ls: LinkState) -> None:  # b hears of "add" only when told
            if isinstance(frame, Sub) and frame.subject == "add":
                held.append((frame, ls))
            else:
                hear(frame, ls)

        b.node._on_control = late  # type: ignore[method-assign]
        await a.serve("add", lambda m: sum(m.decode(list[int])))
        await a.flush()  # the hub knows the service now
        assert not b.node.has_interest("add")
        sent = b.stats()["msgs_out"]
        assert (await b.request("add", [1, 2, 3], timeout=5)).decode() == 6
        with pytest.raises(NoResponders):
            await b.request("nobody.here", timeout=5)
        assert b.stats()["msgs_out"] == sent + 2  # both went to the hub
        assert held
        for frame, ls in held:
            hear(frame, ls)
        assert b.node.has_interest("add")
        assert (await b.request("add", [4], timeout=5)).decode() == 4


# -- connect() without a hub, autostart --------------------------------------------


@pytest.mark.parametrize("local", ["b.>", ">"])
async def test_request_from_a_process_with_a_listener_reaches_a_service_it_does_not_know_yet(
    bus_name: str, local: str
) -> None:
    """The requester's node has a subscription of its own that matches (a
    logger, a `>` monitor) and has not yet heard of the service (its reading is
    held, as a loop busy elsewhere holds it): the request goes to the hub too,
    which knows the service.  It used to go to the local listener only, and
    time out.  The hub's "no responders" is not the answer either while the
    local listener may answer: with no service, it times out."""
    async with (
        ipcbus.Hub(bus_name, transports=FIFO_ONLY),
        ipcbus.connect(bus_name, name="requester") as r,
        ipcbus.connect(bus_name, name="service") as s,
    ):
        heard = await r.subscribe(local)
        await r.flush()
        (up,) = r.node.links
        up.link._pause_reading()  # type: ignore[attr-defined]
        try:
            await s.serve("b.1", lambda m: b"pong", queue="grp")
            await s.flush()  # the hub has the service
            assert ("b.1", "grp") not in up.remote_keys  # the requester has not heard of it
            req = asyncio.ensure_future(r.request("b.1", b"ping", timeout=10))
            lost = asyncio.ensure_future(r.request("b.nobody", b"?", timeout=0.5))
            await asyncio.sleep(0)  # both sent, routed with what the node knows
        finally:
            up.link._resume_reading()  # type: ignore[attr-defined]
        assert (await req).data == b"pong"
        with pytest.raises(ipcbus.RequestTimeout):
            await lost
        assert (await heard.next(timeout=5)).subject in ("b.1", "b.nobody")
        assert r.node._heard_here == set()  # nothing kept


async def test_a_request_to_a_service_in_the_same_process_stays_here(bus_name: str) -> None:
    """Only listeners send a request to the root as well (above): a request
    that a service of this process answers does not cost the hub two frames."""
    async with (
        ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub,
        ipcbus.connect(bus_name) as c,
    ):
        await c.serve("x", lambda m: b"ok")  # a plain service (no queue group)
        await c.flush()
        before = hub.stats()["node"]["msgs_in"]
        for _ in range(20):
            assert (await c.request("x", timeout=5)).data == b"ok"
        await c.flush()
        assert hub.stats()["node"]["msgs_in"] == before


async def test_a_client_subscribed_to_the_hubs_inbox_does_not_take_its_replies(bus_name: str) -> None:
    """A reply to a request made in the hub's process, by a service in that
    process, goes to the hub's own inbox: not to a client that subscribed to
    the hub's inbox pattern (it went there, and the request timed out)."""
    async with (
        ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub,
        ipcbus.connect(bus_name) as snoop,
    ):
        await hub.bus.serve("local.svc", lambda m: b"here")
        await snoop.subscribe(f"_INBOX.{hub.node.node_id}.*")
        await snoop.flush()
        assert (await hub.bus.request("local.svc", timeout=5)).data == b"here"


async def test_requests_of_a_client_that_left_do_not_keep_a_responder_busy(bus_name: str) -> None:
    """A requester that gave up and left: its request, still being handled,
    is no longer counted in flight on the responder's link at the hub, nor
    as given up on (the requester said so before it left: a gave_up notice).
    The late reply is dropped before it comes back, so nothing else would
    clear it, and the least-busy pick would avoid that responder."""
    release = asyncio.Event()

    async def late(m: ipcbus.Msg) -> bytes:
        await release.wait()
        return b"late"

    async with (
        ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub,
        ipcbus.connect(bus_name, name="svc") as svc,
    ):
        await svc.serve("late", late, queue="q")
        await svc.flush()
        watch = LinkWatch(hub)
        async with ipcbus.connect(bus_name, name="requester") as req:
            with pytest.raises(ipcbus.RequestTimeout):
                await req.request("late", timeout=0.2)
        await watch.wait(os.getpid())  # the hub dropped the requester's link
        (svc_link,) = [ls for ls in hub.links if ls.stats()["peer_name"] == "svc"]
        assert svc_link.inflight == {}
        assert svc_link.stats()["abandoned_requests"] == 0  # not counted as given up on either
        release.set()
        await svc.flush()


async def test_a_group_message_reaching_a_member_that_left_is_counted(bus_name: str) -> None:
    """At most once: a queue group's message on its way to a member that
    unsubscribed meanwhile is lost, and counted in that node's `dropped`."""
    async with (
        ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub,
        ipcbus.connect(bus_name) as member,
    ):
        sub = await member.subscribe("jobs", queue="g")
        await member.flush()
        (up,) = member.node.links
        up.link._pause_reading()  # type: ignore[attr-defined]
        try:
            await hub.bus.publish("jobs", b"1")  # to the member's link, where it waits
            await sub.unsubscribe()
        finally:
            up.link._resume_reading()  # type: ignore[attr-defined]
        await member.flush()
        assert member.stats()["dropped"] == 1


async def test_connect_without_hub_names_the_command(bus_name: str) -> None:
    with pytest.raises(BusNotFound) as ei:
        await ipcbus.connect(bus_name)
    assert f"ipcbus hub {bus_name}" in str(ei.value)
    assert ei.value.bus == bus_name
    with pytest.raises(BusNotFound):
        async with ipcbus.connect(bus_name, transport="fifo"):
            pass


async def test_connect_bad_arguments(bus_name: str) -> None:
    """Refused by connect() itself, before it looks for a hub (no hub runs
    here: each used to be a BusNotFound, or a TypeError naming an internal
    function once a hub was found)."""
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"transport": "tcp"}, ValueError, "unknown transport 'tcp'"),
        (
            {"bogus_option": 1},
            TypeError,
            r"connect\(\) got an unexpected option 'bogus_option' for transport 'fifo'; "
            "it takes timeout, high_water, mode",
        ),
        ({"transport": "shm", "timeout": 1}, TypeError, "it takes ring_size, attach_timeout"),
        ({"max_frame": 10}, ValueError, "max_frame must be between 1024"),
        ({"max_frame": "64k"}, TypeError, "max_frame must be an int"),
        ({"transport": "sysv", "ring_size": 1}, TypeError, "it takes mode, gid, high_water, queue_bytes"),
        ({"root": 5}, TypeError, "root must be a path"),
        # A name that is not a str used to be sent anyway: the hub skipped the
        # malformed knock and the client waited 5 s for a HandshakeTimeout.
        ({"name": 5}, TypeError, "name must be a str, not 5"),
        ({"name": "n" * 257}, ValueError, "name must be at most 256 characters, not 257"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            ipcbus.connect(bus_name, **kw)
    with pytest.raises(BadBusName, match="use the name 'orders' and transport='shm'"):
        ipcbus.connect("shm://orders")
    with pytest.raises(BusNotFound):  # the options each transport does take pass
        await ipcbus.connect(bus_name, transport="sysv", queue_bytes=1 << 16, timeout=1)


def test_hub_bad_arguments() -> None:
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"transports": ("fifo", "tcp")}, ValueError, "unknown transport 'tcp'"),
        (
            {"transports": "fifo"}, TypeError,
            r"transports must be a tuple of transport names, e\.g\. \('fifo',\)",
        ),
        ({"transports": ()}, ValueError, "transports is empty: a hub needs at least one of fifo, sysv, shm"),
        ({"transports": 5}, TypeError, "transports must be a tuple of transport names"),
        ({"transports": b"fifo"}, TypeError, "transports must be a tuple of transport names"),
        ({"outbound_limit": "x"}, TypeError, "outbound_limit must be an int"),
        ({"outbound_limit": -1}, ValueError, "outbound_limit must be at least 1"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            ipcbus.Hub("bad-arguments", **kw)
    hub = ipcbus.Hub("fine-arguments", transports={"fifo", "shm"}, outbound_limit=1e6, max_frame=1e6)  # type: ignore[arg-type]
    assert sorted(hub.transports) == ["fifo", "shm"] and hub.node.outbound_limit == 1_000_000
    assert type(hub.max_frame) is int  # the sysv acceptor packs it (a float refused every client)


@pytest.mark.single_loop
async def test_wait_connected_on_a_bus_that_lost_its_hub_raises_at_once(bus_name: str) -> None:
    hub = ipcbus.Hub(bus_name, transports=FIFO_ONLY)
    await hub.__aenter__()
    try:
        bus = await ipcbus.connect(bus_name)  # no reconnect: losing the hub closes it
        await bus.wait_connected(timeout=1)
    finally:
        await hub.aclose()
    with anyio.fail_after(5):
        await bus.node.closing.wait()
        with pytest.raises(BusClosed, match="is closed: the hub shut down: hub link closed"):
            await bus.wait_connected(timeout=30)
        with pytest.raises(BusClosed, match=r"is closed: the hub shut down.*reconnect=True"):
            await bus.publish("x", b"")
    await bus.aclose()
    with pytest.raises(BusClosed, match=r"^bus is closed$"):  # closed by its owner: nothing more to say
        await bus.publish("x", b"")


@pytest.mark.parametrize("transport", ["sysv", "shm"])
async def test_a_publisher_busy_as_its_hub_stops_is_told_the_hub_shut_down(
    bus_name: str, transport: str
) -> None:
    """A client publishing flat out when its hub gets SIGTERM: its error says
    the hub shut down once the hub's goodbye has arrived (over shm, always).
    The transport ended before the node dropped the link, and the error said
    only "not connected to the hub of bus ..."; over sysv the goodbye may
    still be on its way then, and the error must not say the hub was killed."""
    async with (
        hub_proc(bus_name, transport) as hp,
        ipcbus.connect(bus_name, transport=transport, name="pub") as pub,
        ipcbus.connect(bus_name, transport=transport, name="sink") as sink,
    ):
        await sink.subscribe("x", max_pending=1 << 20)
        await sink.flush()
        await pub.flush()

        async def flood() -> None:
            while True:
                for _ in range(100):
                    await pub.publish("x", b"y" * 200)
                await asyncio.sleep(0)  # (publish awaits only when the link is full)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hp.stop, signal.SIGTERM)
            with anyio.fail_after(20), pytest.raises((ConnectionClosed, BusClosed)) as info:
                await flood()
            tg.cancel_scope.cancel()
        said = str(info.value)
        assert "without a goodbye" not in said, said
        if transport == "shm":
            assert "the hub shut down" in said, said
        else:
            assert "the hub shut down" in said or said.endswith("the hub link closed"), said


@pytest.mark.single_loop
async def test_a_closed_client_bus_refuses_waits_and_bad_timeouts(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY):
        bus = await ipcbus.connect(bus_name)
        with pytest.raises(TypeError, match="not '1'"):
            await bus.flush(timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="NaN"):
            await bus.flush(timeout=float("nan"))
        await bus.aclose()
        with anyio.fail_after(5), pytest.raises(BusClosed):
            await bus.wait_connected(timeout=30)


@pytest.mark.single_loop
async def test_connect_with_a_transport_the_hub_does_not_accept(bus_name: str) -> None:
    """Refused at once, naming what the hub accepts (its door would refuse the
    knock, and a refused client hears nothing until its handshake times out)."""
    async with ipcbus.Hub(bus_name, transports=("sysv", "shm")) as hub:
        with anyio.fail_after(20):  # the message proves the refusal: a silent one times out otherwise
            with pytest.raises(ConnectionClosed, match=r"accepts sysv, shm, not 'fifo'"):
                await ipcbus.connect(bus_name, transport="fifo")
        assert hub.stats()["refused"] == 0  # it never knocked
        async with ipcbus.connect(bus_name, transport="shm") as bus:
            assert (await bus.request("$SYS.stats", timeout=5)).decode(dict[str, Any])["transports"] == [
                "sysv",
                "shm",
            ]


@pytest.mark.parametrize("bad", ["a/b", "..", "x..y", "../etc", "", "-x", "a" * 65, "sp ace"])
async def test_bad_bus_names(bad: str) -> None:
    with pytest.raises(BadBusName) as ei:
        ipcbus.Hub(bad)
    assert "invalid bus name" in str(ei.value)
    with pytest.raises(BadBusName):
        await ipcbus.connect(bad)


async def _stop_daemon(name: str) -> None:
    pid = BusDir(name).hub_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    await wait_gone(pid)


@pytest.mark.single_loop
async def test_autostart_starts_one_daemon_and_sigterm_stops_it(bus_name: str) -> None:
    bd = BusDir(bus_name)
    try:
        async with ipcbus.connect(bus_name, autostart=True) as bus:
            pid = bd.hub_pid()
            assert pid is not None and pid != os.getpid()
            stats = (await bus.request("$SYS.stats", timeout=5)).decode()
            assert stats["hub_pid"] == pid
            # A second autostart finds the running hub and starts nothing.
            async with ipcbus.connect(bus_name, autostart=True) as again:
                assert bd.hub_pid() == pid
                await again.flush()
            # SIGTERM: the client sees a clean close, the daemon removes its files.
            watch = asyncio.Event()
            bus.node.on_link_closed.append(lambda ls: watch.set())
            os.kill(pid, signal.SIGTERM)
            await wait_gone(pid)
            async with asyncio.timeout(10):
                await watch.wait()
            assert bus.hub_link is not None
            assert bus.hub_link.close_reason == "peer closed"
            assert any(n.code == "shutdown" for n in bus.hub_link.notices)
            assert not bd.pidfile.exists() and not bd.door.exists()
            with pytest.raises(ConnectionClosed):
                await bus.publish("x", 1)
    finally:
        await _stop_daemon(bus_name)


async def test_a_bus_under_a_long_root_takes_fifo_clients(bus_name: str, tmp_path: Path) -> None:
    # The knock names the client's FIFOs, which must fit in one atomic write to
    # the door (PIPE_BUF, 4096 bytes): as names in the bus folder, not paths.
    root = tmp_path
    while len(str(root)) < 2100:
        root = root / ("d" * 200)
    root.mkdir(parents=True, mode=0o700)
    async with (
        ipcbus.Hub(bus_name, root=root, transports=("fifo",)),
        ipcbus.connect(bus_name, root=root, transport="fifo") as bus,
    ):
        sub = await bus.subscribe("x")
        await bus.publish("x", b"through a long root")
        assert (await sub.next(timeout=5)).data == b"through a long root"


@pytest.mark.single_loop
async def test_autostart_serves_the_root_the_client_was_given(bus_name: str, tmp_path: Path) -> None:
    # connect(root=...) looks for the bus there: the daemon it starts must
    # serve it there too, not under $IPCBUS_DIR.
    root = tmp_path / "other-root"
    root.mkdir(mode=0o700)
    bd = BusDir(bus_name, root=root)
    pid = None
    try:
        async with ipcbus.connect(bus_name, root=root, autostart=True) as bus:
            pid = bd.hub_pid()
            assert pid is not None and pid != os.getpid()
            assert BusDir(bus_name).hub_pid() is None  # nothing under $IPCBUS_DIR
            assert (await bus.request("$SYS.stats", timeout=5)).decode()["hub_pid"] == pid
    finally:
        pid = bd.hub_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            await wait_gone(pid)


@pytest.mark.single_loop
async def test_ten_clients_racing_autostart_get_one_hub(bus_name: str) -> None:
    started: list[Peer] = []
    try:
        for _ in range(10):
            started.append(await spawn(bus_name, "--autostart", "--wait-go", connected=False))
        for p in started:  # all at once
            assert p.proc.stdin is not None
            p.proc.stdin.write(b"go\n")
        for p in started:
            await p.proc.stdin.drain()  # type: ignore[union-attr]
        infos = [await p.expect("connected", timeout=30) for p in started]
        hubs = {i["hub_pid"] for i in infos}
        assert len(hubs) == 1, infos
        for p in started:
            got = await p.call("hub_stats")
            assert got["hub_pid"] in hubs
        # Exactly one hub process serves the bus.
        clients = {p.pid for p in started}
        serving = [pid for pid in _pids_with_cmdline("ipcbus", "hub", bus_name) if pid not in clients]
        assert serving == list(hubs), serving
    finally:
        for p in started:
            await p.quit()
        await _stop_daemon(bus_name)
    assert not BusDir(bus_name).pidfile.exists()


def _pids_with_cmdline(*parts: str) -> list[int]:
    out: list[int] = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            args = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if all(p in words for p in parts):
            out.append(int(d))
    return out


# -- a client dies --------------------------------------------------------------------


@pytest.mark.single_loop
async def test_sigkilled_client_is_forgotten(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub, peers(bus_name, 3) as (k, q, b):
        watch = LinkWatch(hub)
        await k.call("sub", name="fan", subject="fan.>")
        await k.call("sub", name="work", subject="work", queue="g")
        await k.call("serve", subject="slow", mode="block")
        await b.call("sub", name="work", subject="work", queue="g")
        assert sub_pids(hub)[k.pid] == {("fan.>", None), ("work", "g"), ("slow", None)}

        # A request in flight to K when K dies fails at once with ConnectionClosed.
        await q.send("req", subject="slow", data="please", timeout=60)
        await k.expect("request", subject="slow")
        k.signal(signal.SIGKILL)
        assert await k.proc.wait() == -signal.SIGKILL
        err = await q.answer("req", timeout=30)
        assert err["ev"] == "error" and err["type"] == "ConnectionClosed", err
        assert "the responder's link" in err["msg"] and "closed" in err["msg"]
        assert err["msg"].count(f"pid {k.pid}") == 1, err  # the link's name may carry it already

        reason = await watch.wait(k.pid)
        assert reason == "peer closed"
        assert k.pid not in sub_pids(hub)
        assert all(lk["peer_pid"] != k.pid for lk in hub.stats()["links"])
        assert client_fifos(hub.path, k.pid) == []
        # Its queue-group membership went with it: B now gets every job.
        await q.call("pub", subject="work", data=1, count=20)
        assert (await b.call("count", name="work"))["delivered"] == 20
        # And nobody serves "slow" any more.
        await q.send("req", subject="slow")
        assert (await q.answer("req"))["type"] == "NoResponders"


# -- the hub dies -----------------------------------------------------------------------


@pytest.mark.single_loop
async def test_hub_sigkill_clients_see_closed_and_reconnect(bus_name: str) -> None:
    bd = BusDir(bus_name)
    h1 = await start_hub(bus_name)
    try:
        async with peers(bus_name, 1, "--reconnect") as (r,), peers(bus_name, 1) as (plain,):
            await r.call("sub", name="r", subject="r.x")
            await r.call("serve", subject="blocked", mode="block")
            client = await ipcbus.connect(bus_name)
            try:
                sub = await client.subscribe("r.z")
                req = asyncio.create_task(client.request("blocked", timeout=60))
                await r.expect("request", subject="blocked")
                await h1.stop(signal.SIGKILL)
                # In flight: ConnectionClosed at once, not a timeout.
                with pytest.raises(ConnectionClosed):
                    await req
                with pytest.raises(ConnectionClosed):
                    await client.publish("r.x", 1)
                with pytest.raises(ConnectionClosed):
                    await client.request("blocked", timeout=5)  # at once, not RequestTimeout
                with anyio.fail_after(5):
                    await client.node.closing.wait()
                # Closed with the hub, which it says, and how the hub went.
                why = "is closed: the hub went away without a goodbye"
                for call in (client.publish("r.x", 1), client.request("r.x"), client.subscribe("r.y")):
                    with pytest.raises(BusClosed, match=f"bus '{bus_name}' {why}"):
                        await call
                with pytest.raises(BusClosed, match=f"subscription to 'r.z' {why}"):
                    await sub.next(timeout=5)
            finally:
                await client.aclose()
            for p in (r, plain):
                closed = await p.expect("closed")
                assert closed["reason"] != ""
            await plain.send("pub", subject="r.x")
            assert (await plain.answer("pub"))["type"] in ("ConnectionClosed", "BusClosed")
            await r.send("pub", subject="r.x")
            err = await r.answer("pub")
            assert err["type"] == "ConnectionClosed" and "reconnecting" in err["msg"]

            # The dead hub left its pid file and door; the next hub recovers them.
            assert bd.pidfile.exists() and bd.door.exists() and bd.hub_pid() is None
            h2 = await start_hub(bus_name)
            try:
                assert (await r.call("wait_connected"))["reconnects"] == 1
                async with peers(bus_name, 1) as (pub,):
                    await pub.call("pub", subject="r.x", data="again", count=3)
                    assert (await r.call("count", name="r"))["delivered"] == 3
                    await pub.send("req", subject="blocked", timeout=0.2)
                    # The service came back with the reconnect (it blocks: a timeout).
                    assert (await pub.answer("req"))["type"] == "RequestTimeout"
            finally:
                assert await h2.stop() == 0
                h2.err.close()
            assert not bd.pidfile.exists() and not bd.door.exists()
    finally:
        await h1.stop(signal.SIGKILL)
        h1.err.close()


@pytest.mark.single_loop
async def test_stale_pidfile_and_door_of_killed_hub_are_recovered(bus_name: str) -> None:
    bd = BusDir(bus_name)
    h1 = await start_hub(bus_name)
    await h1.stop(signal.SIGKILL)
    h1.err.close()
    assert bd.pidfile.exists() and bd.door.exists()
    assert bd.hub_pid() is None
    with pytest.raises(BusNotFound):
        await ipcbus.connect(bus_name)
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub:
        assert bd.hub_pid() == os.getpid()
        async with ipcbus.connect(bus_name) as bus:
            await hub.bus.serve("ping", lambda m: "pong")
            await hub.bus.flush()
            assert (await bus.request("ping", timeout=5)).decode() == "pong"
    assert not bd.pidfile.exists() and not bd.door.exists()


@pytest.mark.single_loop
async def test_sigterm_hub_closes_clients_cleanly_and_cleans_up(bus_name: str) -> None:
    bd = BusDir(bus_name)
    hp = await start_hub(bus_name)
    try:
        async with peers(bus_name, 2) as (a, b):
            await a.call("sub", name="s", subject="s")
            await b.call("pub", subject="s", count=5)
            assert (await a.call("count", name="s"))["delivered"] == 5
            assert await hp.stop(signal.SIGTERM) == 0
            for p in (a, b):
                closed = await p.expect("closed")
                assert closed["reason"] == "peer closed", closed
                assert "shutdown" in closed["notices"], closed
            assert not bd.pidfile.exists()
            assert not bd.door.exists()
            assert client_fifos(bd.path) == []
            with pytest.raises(BusNotFound):
                await ipcbus.connect(bus_name)
    finally:
        await hp.stop(signal.SIGKILL)
        hp.err.close()


# -- a slow subscriber -----------------------------------------------------------------


@pytest.mark.single_loop
async def test_stopped_subscriber_does_not_stall_others(bus_name: str) -> None:
    size, batch, batches = 1024, 256, 16  # 4 MiB in all: > the FIFO (1 MiB) + outbound_limit
    async with (
        ipcbus.Hub(bus_name, transports=FIFO_ONLY, outbound_limit=64 * 1024) as hub,
        peers(bus_name, 3) as (fast, slow, pub),
    ):
        for p in (fast, slow):
            await p.call("sub", name="load", subject="load")
        slow.signal(signal.SIGSTOP)
        await wait_stopped(slow.pid)
        total = 0
        for _ in range(batches):
            await pub.call("pub", subject="load", size=size, count=batch)
            total += batch
            # The fast one keeps up with every batch while the slow one is stopped.
            assert (await fast.call("wait_count", name="load", n=total))["received"] == total
        stats = hub.stats()
        slow_link, fast_link = link_of(stats, slow.pid), link_of(stats, fast.pid)
        assert slow_link["dropped"] > 0 and slow_link["slow_consumer_events"] >= 1, slow_link
        assert fast_link["dropped"] == 0 and fast_link["slow_consumer_events"] == 0
        assert stats["node"]["dropped"] >= slow_link["dropped"]

        # `ipcbus ls --json` shows the same, asked over the bus.
        ls = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ipcbus", "ls", "--bus", bus_name, "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        out, err = await ls.communicate()
        assert ls.returncode == 0, err
        import json

        info = json.loads(out)
        shown = link_of(info, slow.pid)
        assert shown["dropped"] > 0 and shown["slow_consumer_events"] >= 1
        assert info["hub"]["dropped"] > 0

        # Once it runs again it catches up, and learns what it lost.
        slow.signal(signal.SIGCONT)
        await slow.call("flush")
        await pub.call("pub", subject="load", size=size, count=1)
        ev = await slow.expect("slow", sub="load")
        assert ev["dropped"] > 0
        got = await slow.call("count", name="load")
        assert got["received"] + got["slow"] >= total  # each message read or counted lost
        assert got["received"] < total + 1


@pytest.mark.single_loop
async def test_stopped_client_does_not_stall_hub_services(bus_name: str) -> None:
    """Above its high-water mark (default 4 MiB), a stopped client's link must not
    hold up the hub's own ``$SYS`` replies, nor requests between other clients."""
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub, peers(bus_name, 3) as (fast, slow, pub):
        await fast.call("serve", subject="echo")
        await slow.call("sub", name="load", subject="load")
        slow.signal(signal.SIGSTOP)
        await wait_stopped(slow.pid)
        await pub.call("pub", subject="load", size=1 << 20, count=8)
        slow_link = link_of(hub.stats(), slow.pid)
        assert slow_link["pending_out"] > 4 * 1024 * 1024, slow_link
        for _ in range(3):
            assert (await pub.call("hub_stats", timeout=10))["hub_pid"] == os.getpid()
            assert (await pub.call("req", subject="echo", data="ok", timeout=10))["data"] == "ok"
        slow.signal(signal.SIGCONT)
        assert (await slow.call("wait_count", name="load", n=8, timeout=30))["received"] == 8


FORKING_HUB = """
import asyncio, os, sys, time
import ipcbus

async def main():
    async with ipcbus.Hub(sys.argv[1], transports=("fifo",)):
        child = os.fork()
        if child == 0:  # a child that goes on (a multiprocessing worker started with fork)
            # The test reads our parent's stdout to its end: let go of every copy of it.
            out = os.fstat(1)
            for fd in map(int, os.listdir("/proc/self/fd")):
                try:
                    st = os.fstat(fd)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_hub_s_forked_child_does_not_keep_the_bus(bus_name: str) -> None:
    """The hub's lock and door are not inherited by a child it forks: after the
    hub is SIGKILLed, the next hub starts although the child still runs (the
    child's copy of the lock kept the bus "served" by a dead hub)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FORKING_HUB, bus_name, stdout=asyncio.subprocess.PIPE, cwd=REPO
    )
    child = 0
    try:
        assert proc.stdout is not None
        with anyio.fail_after(20):
            child = int(await proc.stdout.readline())
        proc.kill()
        await proc.wait()
        with anyio.fail_after(10):
            assert await proc.stdout.read() == b""  # nobody holds the pipe any more
        assert process_alive(child)  # the child lives on
        async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub:
            async with ipcbus.connect(bus_name) as bus:
                stats = (await bus.request("$SYS.stats", timeout=5)).decode(dict[str, Any])
                assert stats["hub_pid"] == os.getpid()
            assert hub.stats()["accepted"] == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if child:  # not our child (its parent is gone): init reaps it
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("then", ["SIGCONT", "SIGKILL"])
async def test_closing_a_sysv_client_of_a_stopped_hub_keeps_its_loop_running(
    bus_name: str, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """Clients flood the bus queue of a hub process that is stopped (SIGSTOP),
    until their sender threads block in msgsnd.  Closing one gives up the
    flush, and waits for its thread without freezing the event loop (a
    blocking join held the loop for 5 s) and within the flush's budget (it
    waited 5 s more); the thread ends once the hub runs, or once it is
    killed instead (it stayed blocked for good)."""
    import ipcbus.transports.sysv as sysv_mod

    monkeypatch.setattr(sysv_mod, "_FLUSH_TIMEOUT", 1.0)  # 2 s by default
    async with hub_proc(bus_name, "sysv") as hp, contextlib.AsyncExitStack() as stack:
        sink = await stack.enter_async_context(ipcbus.connect(bus_name, transport="sysv"))
        await sink.subscribe("fill", max_pending=10)
        await sink.flush()
        pubs = [await ipcbus.connect(bus_name, transport="sysv", name=f"pub{i}") for i in range(4)]
        for c in pubs[1:]:
            stack.push_async_callback(c.aclose)
        for c in pubs:
            await c.flush()  # each has heard of the sink's interest
        os.kill(hp.pid, signal.SIGSTOP)
        await wait_stopped(hp.pid)

        async def flood(c: ipcbus.Bus) -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await c.publish("fill", b"x" * 4000)

        closing = pubs[0]
        async with anyio.create_task_group() as tg:
            for c in pubs:
                tg.start_soon(flood, c)
            with anyio.fail_after(20):
                while not all(
                    (t := c.hub_link.link._tx) is not None and t.blocked  # type: ignore[attr-defined]
                    for c in pubs
                ):
                    await asyncio.sleep(0.01)
            tx_threads = [c.hub_link.link._tx for c in pubs]  # type: ignore[attr-defined]
            tg.cancel_scope.cancel()

        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            with anyio.fail_after(30):
                t0 = time.monotonic()
                await closing.aclose()
                took = time.monotonic() - t0
            tg.cancel_scope.cancel()
        # aclose waited (1 s for the flush, 1 s more for the thread) with the loop turning.
        assert max(gaps) < 0.5, f"the event loop stood still for {max(gaps):.1f} s"
        assert took < 4.0, f"aclose took {took:.1f} s, beyond its 1 s flush budget and 1 s grace"
        assert tx_threads[0].is_alive()  # still blocked: the hub has not run since
        if then == "SIGKILL":
            # Every client closed, so that no open link sees the hub die (and
            # drains its queue); each one leaves its blocked sender thread.
            async with anyio.create_task_group() as tg:
                for c in [sink, *pubs[1:]]:
                    tg.start_soon(c.aclose)
            assert all(t.is_alive() for t in tx_threads)
            os.kill(hp.pid, signal.SIGKILL)
            with anyio.fail_after(20):
                while any(t.is_alive() for t in tx_threads):
                    await asyncio.sleep(0.01)
            gc = await asyncio.create_subprocess_exec(  # what the dead hub left: its queue, its door
                sys.executable, "-m", "ipcbus", "gc", "--bus", bus_name, stdout=asyncio.subprocess.PIPE
            )
            out = (await gc.communicate())[0].decode()
            assert gc.returncode == 0 and "removed" in out, out
            return
        os.kill(hp.pid, signal.SIGCONT)
        with anyio.fail_after(20):
            while tx_threads[0].is_alive():
                await asyncio.sleep(0.01)
            # Its BYE (which found the bus queue full) followed the stuck message:
            # the hub ends that link as closed by its peer, with no sequence error.
            while True:
                stats = (await sink.request("$SYS.stats", timeout=10)).decode(dict[str, Any])
                if "pub0" not in {lk.get("peer_name") for lk in stats["links"]}:
                    break
                await asyncio.sleep(0.05)
        assert "sequence gap" not in hp.stderr() and "protocol error" not in hp.stderr()


# -- bad input ----------------------------------------------------------------------


async def test_second_hub_for_a_bus_is_refused(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub:
        with pytest.raises(BusBusy) as ei:
            async with ipcbus.Hub(bus_name, transports=FIFO_ONLY):
                pass
        assert str(os.getpid()) in str(ei.value) and bus_name in str(ei.value)
        # The first hub keeps serving, its files intact.
        assert BusDir(bus_name).hub_pid() == os.getpid()
        async with ipcbus.connect(bus_name) as bus:
            await hub.bus.serve("alive", lambda m: True)
            await hub.bus.flush()
            assert (await bus.request("alive", timeout=5)).decode() is True


@pytest.mark.single_loop
async def test_garbage_frames_close_only_that_link(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=FIFO_ONLY) as hub, peers(bus_name, 3) as (bad, a, b):
        watch = LinkWatch(hub)
        await a.call("serve", subject="echo")
        await bad.call("sub", name="x", subject="x")
        # 0xc1 is never valid MessagePack: a well-framed frame of garbage.
        await bad.call("garbage", hex=b"\xc1 this is not a frame".hex())
        reason = await watch.wait(bad.pid)
        assert reason.startswith("protocol error"), reason
        closed = await bad.expect("closed")
        assert "protocol_error" in closed["notices"], closed
        assert bad.pid not in sub_pids(hub)
        # Everyone else is unaffected, and the hub keeps accepting.
        assert (await b.call("req", subject="echo", data="still here"))["data"] == "still here"
        async with peers(bus_name, 1) as (c,):
            assert (await c.call("req", subject="echo", data=1))["data"] == 1
        # A frame whose length prefix is absurd is a protocol error too.
        async with peers(bus_name, 1) as (d,):
            await d.call("raw", hex="7fffffff00")  # 2 GiB announced, 64 MiB allowed
            assert (await watch.wait(d.pid)).startswith("protocol error")
        assert (await b.call("req", subject="echo", data=2))["data"] == 2


# -- the default hub: every transport ------------------------------------------------


@pytest.mark.single_loop
async def test_default_hub_serves_sysv_and_shm(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name) as hub:
        assert hub.transports == ("fifo", "sysv", "shm")
        async with (
            ipcbus.connect(bus_name, transport="sysv") as sv,
            ipcbus.connect(bus_name, transport="shm") as sh,
            ipcbus.connect(bus_name, transport="fifo") as ff,
        ):
            await sv.serve("sysv.echo", lambda m: m.data)
            await sh.serve("shm.echo", lambda m: m.data)
            subs = [await b.subscribe("all.>") for b in (sv, sh, ff)]
            for b in (sv, sh, ff):
                await b.flush()
            await ff.publish("all.hello", {"from": "fifo"})
            for s in subs:
                assert (await s.next(timeout=5)).decode() == {"from": "fifo"}
            assert (await ff.request("sysv.echo", b"via sysv", timeout=5)).data == b"via sysv"
            assert (await sv.request("shm.echo", b"x" * 100_000, timeout=5)).data == b"x" * 100_000
            transports = sorted(lk["transport"] for lk in hub.stats()["links"])
            assert transports == ["fifo", "shm", "sysv"]
        async with peers(bus_name, 1, "--transport", "sysv") as (p1,), peers(
            bus_name, 1, "--transport", "shm"
        ) as (p2,):
            await p1.call("serve", subject="p1", mode="pid")
            assert (await p2.call("req", subject="p1"))["data"] == p1.pid


async def test_refused_knocks_are_counted_and_the_hub_keeps_serving(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=("fifo",)) as hub:
        bd = BusDir(bus_name)
        # A knock of another protocol version, and one for a transport this hub refuses.
        send_knock(bd.path, Knock(PROTOCOL_VERSION + 1, "fifo", os.getpid(), os.getuid()))
        send_knock(bd.path, Knock(PROTOCOL_VERSION, "carrier-pigeon", os.getpid(), os.getuid()))
        with anyio.fail_after(10):
            while hub.stats()["refused"] < 2:
                await asyncio.sleep(0.01)  # polling a counter: refusals raise no event
        async with ipcbus.connect(bus_name, transport="fifo") as bus:
            await bus.flush()
            assert hub.stats()["accepted"] == 1


@pytest.mark.single_loop
async def test_a_sysv_client_the_hub_has_no_fd_for_is_refused_at_once(bus_name: str) -> None:
    """A hub out of file descriptors refuses a SysV client with a REFUSE saying
    so (its queue needs no fd), not silence until the client's 10 s timeout;
    the clients already in keep working."""
    async with hub_proc(bus_name, "sysv", nofile=40), contextlib.AsyncExitStack() as stack:
        clients: list[ipcbus.Bus] = []
        refused: ConnectionClosed | None = None
        with anyio.fail_after(60):
            while refused is None:
                assert len(clients) < 100, "the hub never ran out of file descriptors"
                try:
                    bus = await ipcbus.connect(bus_name, transport="sysv")
                except ConnectionClosed as exc:
                    refused = exc
                else:
                    clients.append(bus)
                    stack.push_async_callback(bus.aclose)
        assert "cannot take a client now" in str(refused) and "did not answer" not in str(refused)
        assert len(clients) >= 2
        await clients[0].serve("still.here", lambda m: b"yes")
        await clients[0].flush()
        assert (await clients[-1].request("still.here", timeout=10)).data == b"yes"


async def test_hub_aclose_from_a_handler_on_its_bus_closes_in_the_background(bus_name: str) -> None:
    """A 'shutdown' service on hub.bus: closing the hub waits for the handler,
    which would wait for the close; it runs in the background instead."""
    hub = ipcbus.Hub(bus_name, transports=("fifo",))
    async with hub:

        async def shutdown(m: ipcbus.Msg) -> bytes:
            await hub.aclose()
            await asyncio.sleep(0.01)  # still running when the background close starts
            return b"bye"

        await hub.bus.serve("admin.shutdown", shutdown)
        async with ipcbus.connect(bus_name) as client:
            await client.flush()
            assert (await client.request("admin.shutdown", timeout=10)).data == b"bye"
            with anyio.fail_after(10):
                await hub.wait_closed()
    assert not BusDir(bus_name).pidfile.exists()


async def test_connect_runs_as_a_task(bus_name: str) -> None:
    """connect() returns a coroutine (also an async context manager): tasks take it."""
    async with ipcbus.Hub(bus_name):
        c = ipcbus.connect(bus_name)
        assert isinstance(c, ipcbus.Connecting) and asyncio.iscoroutine(c)
        bus = await asyncio.create_task(c)
        async with asyncio.TaskGroup() as tg:
            t = tg.create_task(ipcbus.connect(bus_name, name="second"))
        other = t.result()
        try:
            await other.serve("hi", lambda m: b"there")
            await other.flush()
            assert (await bus.request("hi", timeout=5)).data == b"there"
        finally:
            await bus.aclose()
            await other.aclose()
        cancelled = asyncio.create_task(ipcbus.connect(bus_name))
        cancelled.cancel()  # before its first step: nothing made, nothing left
        with pytest.raises(asyncio.CancelledError):
            await cancelled


async def test_connecting_behaves_as_a_coroutine(bus_name: str) -> None:
    """A second awaiter of a connect under way is refused (it took the connect
    over and broke both); a connect closed before it ran never runs."""
    async with ipcbus.Hub(bus_name) as hub:
        c = ipcbus.connect(bus_name)
        assert inspect.getcoroutinestate(c) == "CORO_CREATED"
        task = asyncio.create_task(c)
        await asyncio.sleep(0)
        assert inspect.getcoroutinestate(c) == "CORO_SUSPENDED"
        assert "coro=<connect()" in repr(task)
        with pytest.raises(RuntimeError, match="being awaited already"):
            async with c:
                pytest.fail("entered")
        bus = await task  # the first awaiter is unharmed
        try:
            assert inspect.getcoroutinestate(c) == "CORO_CLOSED"
            await bus.flush()
            assert len(hub.links) == 1
        finally:
            await bus.aclose()
        closed = ipcbus.connect(bus_name)
        closed.close()
        with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
            await closed


def test_a_connect_never_awaited_is_reported_as_a_coroutine_is() -> None:
    """A forgotten ``await`` gets Python's warning (the bus it would have
    given has no ``publish``); one closed, or looked at and closed, does not."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        forgotten = ipcbus.connect("never-used")
        del forgotten
        gc.collect()
        looked_at = ipcbus.connect("never-used")
        assert inspect.getcoroutinestate(looked_at) == "CORO_CREATED"
        looked_at.close()
        del looked_at
        gc.collect()
    assert [str(w.message) for w in seen] == ["coroutine '_connect' was never awaited"]


@pytest.mark.single_loop
async def test_a_request_while_reconnecting_says_so_at_once(bus_name: str) -> None:
    """A reconnecting client whose hub is gone: a request raises
    ConnectionClosed saying it reconnects, at once (not NoResponders, not a
    timeout), also for a subject it asked before (a known route)."""
    async with hub_proc(bus_name) as hp:
        client = await ipcbus.connect(bus_name, reconnect=True)
        try:
            await client.serve("here", lambda m: b"ok")
            await client.flush()
            assert (await client.request("here", timeout=10)).data == b"ok"
            await hp.stop(signal.SIGKILL)
            assert client.hub_link is not None
            with anyio.fail_after(10):
                await client.hub_link.closed.wait()
            for subject in ("here", "elsewhere"):
                t0 = time.monotonic()
                with pytest.raises(ConnectionClosed, match=r"not connected to the hub.*; reconnecting"):
                    await client.request(subject, timeout=30)
                assert time.monotonic() - t0 < 5
            # A new hub (which recovers the dead one's door): asked again, answered again.
            async with ipcbus.Hub(bus_name, transports=FIFO_ONLY):
                await client.wait_connected(timeout=20)
                assert (await client.request("here", timeout=10)).data == b"ok"
                await client.aclose()
        finally:
            await client.aclose()
