"""WorkerPool(bus=...): the workers join the node of a bus this process already has.

A plugin host that is also a client of a hub, or runs two kinds of plugins,
has one node: its workers are reached from, and reach, everything on it.
Real worker processes and a real hub (in this process, over FIFOs).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import anyio
import pytest
from test_hub import bus_name  # noqa: F401  (a fixture: a bus name no other test uses)
from test_pool import TRANSPORTS, wait_exited, wait_until, worker_env
from test_pool_recycle import Load

import ipcbus
import ipcbus.pool as pool_module
from ipcbus import BusClosed, ConnectionClosed, NoResponders, WorkerPool


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_workers_on_a_hub_clients_bus_serve_and_ask_the_whole_bus(
    bus_name: str, transport: str  # noqa: F811
) -> None:
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
    ):
        await other.serve("other.time", lambda m: "tick")
        await other.flush()
        async with WorkerPool(
            "pool_workers:setup", workers=2, transport=transport, env=worker_env(), bus=host
        ) as pool:
            assert pool.bus is host
            await host.flush()  # the hub has heard of the workers' services
            # Another client reaches the workers, through the hub and the host's node...
            pids = {(await other.request("pid", timeout=10)).decode() for _ in range(8)}
            assert pids == set(pool.pids)
            # ... and a worker reaches a service of another client, up the tree.
            assert (await other.request("relay", "other.time", timeout=10)).decode() == "tick"
            assert (await host.request("relay", "other.time", timeout=10)).decode() == "tick"
            old = pool.pids
        # The pool's close leaves the bus open, without the workers' services.
        for pid in old:
            await wait_exited(pid)
        assert not host.closed
        with pytest.raises(NoResponders):
            await other.request("pid", timeout=5)
        assert (await host.request("other.time", timeout=5)).decode() == "tick"


async def test_two_kinds_of_plugins_on_one_node_ask_each_other() -> None:
    """A second pool on the first pool's bus: a worker of one asks a worker of the other."""
    async with (
        WorkerPool("pool_workers:setup", workers=1, env=worker_env()) as a,
        WorkerPool("pool_workers:setup_b", workers=1, env=worker_env(), name="b", bus=a.bus) as b,
    ):
        name, pid = (await a.bus.request("relay", "b.name", timeout=10)).decode()
        assert (name, [pid]) == ("b", b.pids)
        assert (await a.bus.request("echo", b"x", timeout=10)).data == b"x"


async def test_a_pool_on_a_hubs_own_bus(bus_name: str) -> None:  # noqa: F811
    """The hub's node hosts the workers: its clients reach them, they reach its clients."""
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)) as hub,
        ipcbus.connect(bus_name, transport="fifo", name="app") as app,
        WorkerPool("pool_workers:setup", workers=1, env=worker_env(), bus=hub.bus) as pool,
    ):
        await app.serve("app.name", lambda m: "app")
        await app.flush()
        assert (await app.request("pid", timeout=10)).decode() == pool.pids[0]
        assert (await app.request("relay", "app.name", timeout=10)).decode() == "app"
        assert (await hub.bus.request("relay", "app.name", timeout=10)).decode() == "app"


async def test_a_new_pool_on_the_bus_takes_over_from_the_old_without_a_failed_request(
    bus_name: str,  # noqa: F811
) -> None:
    """Reloading plugins: start the new pool on the bus, close the old one.
    Requests made meanwhile, from this process and from another client,
    all succeed; the old pool stops taking new ones as its close begins
    (they went to its workers, then failed as it closed)."""
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
    ):
        old = WorkerPool("pool_workers:setup", workers=1, env=worker_env(), name="v1", bus=host)
        await old.__aenter__()
        try:
            await host.flush()
            answered = 0
            more = anyio.Event()  # set once `wanted` requests were answered
            wanted = 0

            async def ask(bus: ipcbus.Bus) -> None:
                nonlocal answered
                while True:
                    await bus.request("slow.sleep", 0.05, timeout=10)
                    answered += 1
                    if answered >= wanted > 0:
                        more.set()

            async with anyio.create_task_group() as tg:
                for bus in (host, host, other, other):
                    tg.start_soon(ask, bus)
                async with WorkerPool(
                    "pool_workers:setup", workers=1, env=worker_env(), name="v2", bus=host
                ) as new:
                    (old_pid,) = old.pids
                    await old.__aexit__(None, None, None)
                    await wait_exited(old_pid)
                    wanted = answered + 20
                    with anyio.fail_after(10):
                        await more.wait()  # the new pool answers on
                    assert (await other.request("pid", timeout=10)).decode() == new.pids[0]
                    tg.cancel_scope.cancel()
        finally:
            await old.__aexit__(None, None, None)


async def test_closing_the_pool_fails_what_other_nodes_asked_its_workers(
    bus_name: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A request another client sent a worker, still unanswered after the
    close's drain, fails with ConnectionClosed naming the pool's close (not
    WorkerCrashed: no worker crashed)."""
    monkeypatch.setattr(pool_module, "_STOP_TIMEOUT", 1.5)
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
    ):
        pool = WorkerPool("pool_workers:setup", workers=1, env=worker_env(), bus=host)
        async with pool:
            await host.flush()
            started = await other.subscribe("started")
            await other.flush()
            req = asyncio.ensure_future(other.request("slow.hang", timeout=60))
            mine = asyncio.ensure_future(host.request("slow.hang", timeout=60))
            await started.next(timeout=10)
            await started.next(timeout=10)
            t0 = anyio.current_time()
        # One drain of _STOP_TIMEOUT for both (it waited once for the other
        # client's request, then once more for this process's).
        assert anyio.current_time() - t0 < 2.5
        with anyio.fail_after(10), pytest.raises(ConnectionClosed, match="the worker pool closed") as info:
            await req
        assert not isinstance(info.value, ipcbus.WorkerCrashed)
        with pytest.raises(BusClosed, match=r"the worker pool closed after waiting 1\.5 s"):
            await mine
        assert not host.closed


async def test_a_bus_closed_under_its_pool_stops_the_workers_for_good(bus_name: str) -> None:  # noqa: F811
    """The owner of the bus closes it (and its node) while the pool runs: the
    workers see their links end and exit, none is restarted, and the pool's
    close does not wait for anything."""
    async with ipcbus.Hub(bus_name, transports=("fifo",)):
        host = await ipcbus.connect(bus_name, transport="fifo", name="host")
        try:
            async with WorkerPool("pool_workers:setup_b", workers=2, env=worker_env(), bus=host) as pool:
                pids = pool.pids
                await host.aclose()
                for pid in pids:
                    await wait_exited(pid)
                with anyio.fail_after(5), pytest.raises(BusClosed, match="its workers are stopped"):
                    await pool.wait_ready(timeout=30)  # (it waited for restarts that never come)
                await asyncio.sleep(0.5)  # a restart would have started by now (backoff 0.1 s)
                t0 = anyio.current_time()
            # Its workers were reaped (their reapers ran in the closed node's
            # task group, and the close waited 5 s for them).
            assert anyio.current_time() - t0 < 2.5
            assert [w["state"] for w in pool.stats()["workers"]] == ["stopped", "stopped"]
            assert [(w["starts"], w["crashes"]) for w in pool.stats()["workers"]] == [(1, 0), (1, 0)]
        finally:
            await host.aclose()


async def test_bad_buses_are_refused() -> None:
    with pytest.raises(TypeError, match=r"bus must be an ipcbus\.Bus"):
        WorkerPool("pool_workers:setup", bus="default")  # type: ignore[arg-type]
    node = ipcbus.Node()
    with pytest.raises(BusClosed, match="not started"):
        async with WorkerPool("pool_workers:setup", workers=1, bus=ipcbus.Bus(node)):
            pass
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env()) as a:
        with pytest.raises(ValueError, match="max_frame=2048 differs from the max_frame of the bus"):
            WorkerPool("pool_workers:setup", bus=a.bus, max_frame=2048)
        with pytest.raises(ValueError, match="a worker pool named 'pool' already runs on the node of this"):
            async with WorkerPool("pool_workers:setup", workers=1, bus=a.bus):  # both named "pool"
                pass
        async with WorkerPool("pool_workers:setup_b", workers=1, env=worker_env(), name="b", bus=a.bus):
            pass
        async with WorkerPool("pool_workers:setup_b", workers=1, env=worker_env(), name="b", bus=a.bus):
            pass  # the name is free again once its pool closed, and a's bus is still open
        assert WorkerPool("pool_workers:setup", bus=a.bus).max_frame == a.max_frame
    with pytest.raises(BusClosed, match="closed"):  # a's bus closed with it
        async with WorkerPool("pool_workers:setup", workers=1, bus=a.bus):
            pass


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_other_processes_requests_wait_for_a_restarted_plugin(
    bus_name: str, how: str  # noqa: F811
) -> None:
    """A one-worker plugin pool on a hub client's bus: while its worker is
    restarted, another client's requests wait for it instead of getting
    NoResponders.  Killed, only the requests it had fail (WorkerCrashed,
    passed on by the hub); given SIGTERM, none does (it answers them)."""
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
        WorkerPool("pool_workers:setup", 1, env=worker_env(), bus=host, restart_backoff=0.05) as pool,
    ):
        await host.flush()
        (old,) = pool.pids

        async def stop_it() -> None:
            os.kill(old, getattr(signal, how))
            await wait_until(lambda: pool.pids not in ([], [old]))

        load = Load(other)
        await load.around(stop_it, after=20)  # the last 20 answered by the new worker
        assert not [e for e in load.failures if isinstance(e, NoResponders)], load.failures
        if how == "SIGTERM":
            assert load.failures == []
        else:
            assert all("closed" in str(e) for e in load.failures), load.failures
        assert set(pool.pids) <= load.pids


@pytest.mark.parametrize(
    ("setup", "then"), [("setup_crash_on_restart", "given up"), ("setup_hang_on_restart", "close")]
)
async def test_requests_held_for_a_plugin_fail_when_it_is_given_up_on_or_the_pool_closes(
    bus_name: str, tmp_path: Path, setup: str, then: str  # noqa: F811
) -> None:
    """Held for a worker whose restarts crash: failed (ConnectionClosed) as it
    is given up on, then NoResponders; held for one whose restart hangs in
    its setup: failed as the pool closes."""
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
    ):
        pool = WorkerPool(
            f"pool_workers:{setup}", 1, env=worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "started-once")),
            bus=host, restart_backoff=0.5, max_start_failures=1,
        )
        async with pool:
            await host.flush()
            (pid,) = pool.pids
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: pool.stats()["workers"][0]["state"] != "ready")
            held = asyncio.ensure_future(other.request("echo", b"x", timeout=20))
            if then == "close":
                await wait_until(lambda: pool.stats()["workers"][0]["state"] == "starting")
                await pool.__aexit__(None, None, None)
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as caught:
                await held
            if then == "close":
                assert "the worker pool closed" in str(caught.value)
            else:
                assert "giving up" in str(caught.value)
                await wait_until(lambda: pool.stats()["workers"][0]["state"] == "failed")
                with pytest.raises(NoResponders):
                    await other.request("echo", b"x", timeout=5)


async def test_a_new_pool_takes_over_what_is_held_for_a_restarting_one(bus_name: str, tmp_path: Path) -> None:  # noqa: F811
    """A reload while the old pool's worker is down (its restart hangs in
    setup): requests held for it go to the new pool's worker once it serves
    the same queue group, and so do later ones; none fails."""
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "started-once"))
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
    ):
        old = WorkerPool("pool_workers:setup_hang_on_restart", 1, env=env, bus=host, name="v1")
        async with old:
            await host.flush()
            (pid,) = old.pids
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: old.stats()["workers"][0]["state"] == "starting")
            held = [asyncio.ensure_future(other.request("pid", timeout=20)) for _ in range(5)]
            async with WorkerPool("pool_workers:setup", 1, env=worker_env(), bus=host, name="v2") as new:
                with anyio.fail_after(10):
                    answers = {(await r).decode() for r in held}
                assert answers == set(new.pids)
                for _ in range(10):
                    assert (await other.request("pid", timeout=10)).decode() == new.pids[0]
                await old.__aexit__(None, None, None)
                assert (await other.request("pid", timeout=10)).decode() == new.pids[0]


@pytest.mark.parametrize("kind", ["ev", "obs"])
async def test_a_plugin_given_sigterm_gets_each_event_once(
    bus_name: str, tmp_path: Path, kind: str  # noqa: F811
) -> None:
    """Events published while a worker given SIGTERM drains and is restarted:
    each is handled once, by the old worker or the new one.  A service
    (``ev``) withdraws as the drain begins: what comes after is held for the
    new worker.  A subscription the plugin reads (``obs``) stays until the
    worker exits: it gets what comes until then, the new one the rest."""
    marker = tmp_path / "events"
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
        WorkerPool(
            "pool_workers:setup_notes", 1, env=worker_env(IPCBUS_TEST_MARKER=str(marker)), bus=host,
            restart_backoff=0.05,
        ) as pool,
    ):
        started = await host.subscribe("started")  # (the pool's bus: its workers hear of it)
        await host.flush()
        (old,) = pool.pids
        slow = asyncio.ensure_future(other.request("slow.sleep", 1.0, timeout=10))  # holds its drain
        assert (await started.next(timeout=10)).decode() == old
        os.kill(old, signal.SIGTERM)
        for i in range(30):
            await other.publish(f"{kind}.{i}", b"")
            await asyncio.sleep(0.05)  # spread over the drain and the restart
        await wait_until(lambda: pool.pids not in ([], [old]))
        await other.publish(f"{kind}.last", b"")
        await other.flush()
        await host.flush()
        await wait_until(lambda: marker.exists() and f"{kind}.last" in marker.read_text())
        assert (await slow).decode() == "slept"
        lines = marker.read_text().split("\n")
        seen = [line.split()[1] for line in lines if line]
        assert sorted(seen) == sorted([f"{kind}.{i}" for i in range(30)] + [f"{kind}.last"]), seen
        assert {int(line.split()[0]) for line in lines if line} <= {old, *pool.pids}


async def test_a_request_past_what_is_held_is_refused_at_once(
    bus_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setattr(pool_module, "_HOLD_MAX", 3)
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "started-once"))
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
        WorkerPool("pool_workers:setup_hang_on_restart", 1, env=env, bus=host, name="spell") as pool,
    ):
        await host.flush()
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: pool.stats()["workers"][0]["state"] == "starting")
        held = [asyncio.ensure_future(other.request("echo", b"x", timeout=20)) for _ in range(3)]
        await other.flush()
        with anyio.fail_after(5), pytest.raises(ipcbus.RemoteError) as refused:
            await other.request("echo", b"x", timeout=20)
        assert refused.value.type_name == "SlowConsumer"
        assert "3 messages are held already for worker 0 of pool 'spell'" in str(refused.value)
        assert "retry once it is back" in str(refused.value)
        assert not any(r.done() for r in held)
    for r in held:
        with pytest.raises(ConnectionClosed, match="the worker pool closed"):
            await r

