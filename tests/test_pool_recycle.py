"""Replacing a pool's workers while it runs: recycle(), max_messages, max_rss, resize().

A fresh process takes a worker's slot before the old one stops taking work,
so no request fails for it; the old one answers what it took, then exits.
Real worker processes over every pool transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_hub import bus_name  # noqa: F401  (a fixture: a bus name no other test uses)
from test_pool import TRANSPORTS, wait_exited, wait_until, worker_env

import ipcbus
import ipcbus.pool as pool_module
from ipcbus import BusClosed, WorkerCrashed, WorkerPool, WorkerStartError


def running_children() -> set[int]:
    """This process's children that have not exited (read only: nothing reaped here)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            running.add(pid)
    return running


class Load:
    """Requesters asking the pool throughout a test; every failure is kept."""

    def __init__(self, bus: ipcbus.Bus) -> None:
        self.bus = bus
        self.answered = 0
        self.failures: list[BaseException] = []
        self.pids: set[int] = set()

    async def ask(self) -> None:
        while True:
            try:
                self.pids.add((await self.bus.request("pid", timeout=10)).decode(int))
                await self.bus.request("slow.sleep", 0.01, timeout=10)
            except Exception as exc:
                self.failures.append(exc)
            self.answered += 1

    async def more(self, n: int) -> None:
        """Wait for ``n`` more rounds to be answered."""
        target = self.answered + n
        await wait_until(lambda: self.answered >= target)

    async def around(self, change: Callable[[], Awaitable[object]], after: int = 10) -> None:
        """Ask with 4 requesters: 10 rounds, then ``change()``, then ``after`` more rounds."""
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(self.ask)
            await self.more(10)
            await change()
            await self.more(after)
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("workers", [1, 2])
async def test_recycle_replaces_every_worker_without_a_failed_request(transport: str, workers: int) -> None:
    async with WorkerPool("pool_workers:setup", workers, transport=transport, env=worker_env()) as pool:
        old = pool.pids
        load = Load(pool.bus)
        await load.around(pool.recycle)
        new = pool.pids
        assert load.failures == []
        assert len(new) == workers and not set(new) & set(old)
        for pid in old:
            await wait_exited(pid)
        assert load.pids >= set(new)  # the new ones answered
        stats = pool.stats()["workers"]
        assert [w["recycles"] for w in stats] == [1] * workers
        assert [w["state"] for w in stats] == ["ready"] * workers
        assert [w["crashes"] for w in stats] == [0] * workers


async def test_recycle_on_a_hubs_bus_fails_no_request_of_another_client(bus_name: str) -> None:  # noqa: F811
    """The hub always knows a worker serving: the new one is announced before
    the old one is withdrawn."""
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
        ipcbus.connect(bus_name, transport="fifo", name="other") as other,
        WorkerPool("pool_workers:setup", 1, env=worker_env(), bus=host) as pool,
    ):
        await host.flush()
        (old,) = pool.pids
        load = Load(other)
        await load.around(pool.recycle)
        assert load.failures == []
        assert load.pids == {old, *pool.pids} and old not in pool.pids


@pytest.mark.parametrize("cancelled", [False, True])
async def test_a_request_the_old_worker_took_is_answered_by_it(cancelled: bool) -> None:
    """Also when the recycle() is cancelled while the old worker drains: the
    new one serves, and the old one answers and exits all the same."""
    async with WorkerPool("pool_workers:setup", 1, env=worker_env()) as pool:
        (old,) = pool.pids
        started = await pool.bus.subscribe("started")
        replies: list[str] = []
        async with anyio.create_task_group() as tg:

            async def slow() -> None:
                replies.append((await pool.bus.request("slow.sleep", 1.5, timeout=10)).decode())

            tg.start_soon(slow)
            assert (await started.next(timeout=10)).decode() == old
            if cancelled:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(pool.recycle)
                    await wait_until(lambda: pool.pids not in ([], [old]))  # the new one took the slot
                    inner.cancel_scope.cancel()  # as the old one drains
            else:
                await pool.recycle()  # returns once the old one answered and exited
                assert replies == ["slept"]
        assert replies == ["slept"]
        assert pool.pids != [old]
        await wait_exited(old)
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


@pytest.mark.parametrize("how", ["recycle", "close"])
async def test_a_published_message_the_old_worker_is_handling_is_finished(tmp_path: Path, how: str) -> None:
    """A handler of a published message (no reply to wait for) still running
    as the worker is retired, or as the pool closes, finishes before the exit."""
    marker = tmp_path / "notes"
    env = worker_env(IPCBUS_TEST_MARKER=str(marker))
    async with WorkerPool("pool_workers:setup_notes", 1, env=env) as pool:
        (old,) = pool.pids
        started = await pool.bus.subscribe("started")
        await pool.bus.publish("note", 0.5)
        assert (await started.next(timeout=10)).decode() == old
        if how == "recycle":
            await pool.recycle()
    await wait_exited(old)
    assert marker.read_text() == f"{old} noted\n"


async def test_at_close_a_request_given_up_on_is_cancelled_and_a_message_handler_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool waited (here 1 s) for the request, then failed it: its handler
    is cancelled at the goodbye, and does not hold the worker's exit."""
    monkeypatch.setattr(pool_module, "_STOP_TIMEOUT", 1.0)
    marker = tmp_path / "notes"
    env = worker_env(IPCBUS_TEST_MARKER=str(marker))
    async with WorkerPool("pool_workers:setup_notes", 1, env=env) as pool:
        (pid,) = pool.pids
        started = await pool.bus.subscribe("started")
        hang = asyncio.ensure_future(pool.bus.request("slow.hang", timeout=30))
        await started.next(timeout=10)
        await pool.bus.publish("note", 0.5)
        await started.next(timeout=10)
    with pytest.raises(BusClosed):
        await hang
    await wait_exited(pid)
    assert "killing it" not in caplog.text
    assert marker.read_text() == f"{pid} noted\n"


async def test_recycle_one_worker_by_index() -> None:
    async with WorkerPool("pool_workers:setup", 3, env=worker_env()) as pool:
        before = pool.pids
        await pool.recycle(1)
        after = pool.pids
        assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
        await pool.recycle((2, 0.0))  # any iterable; a whole float as resize() takes one
        assert [w["recycles"] for w in pool.stats()["workers"]] == [1, 1, 1]
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


@pytest.mark.parametrize("call", ["recycle", "resize"])
async def test_a_new_process_that_fails_to_start_changes_nothing(tmp_path: Path, call: str) -> None:
    """A replacement (recycle) or a new worker (resize) whose setup fails: the
    worker serves on and the pool keeps its size; the next try works."""
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "starts"))
    async with WorkerPool("pool_workers:setup_fails_second_start", 1, env=env) as pool:
        (old,) = pool.pids

        async def change() -> None:
            await (pool.recycle() if call == "recycle" else pool.resize(2))

        with pytest.raises(WorkerStartError, match="second start fails on purpose"):
            await change()
        assert pool.pids == [old] and pool.size == 1 and len(pool.stats()["workers"]) == 1
        assert pool.stats()["workers"][0]["recycles"] == 0
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
        await change()  # the third start works
        if call == "recycle":
            assert pool.pids != [old]
            await wait_exited(old)
        else:
            assert len(pool.pids) == 2 and old in pool.pids


async def test_recycle_starts_a_worker_given_up_on_again(tmp_path: Path) -> None:
    """Its restarts crashed until the pool gave up; once the plugin is fixed,
    recycle() brings it back (and says so while it is still broken)."""
    marker = tmp_path / "started-once"  # pool_workers._first_start: a restart crashes while it exists
    env = worker_env(IPCBUS_TEST_MARKER=str(marker))
    async with WorkerPool(
        "pool_workers:setup_crash_on_restart", 1, env=env, restart_backoff=0.01, max_start_failures=2
    ) as pool:
        (pid,) = pool.pids
        os.kill(pid, 9)
        await wait_until(lambda: pool.stats()["workers"][0]["state"] == "failed")
        with pytest.raises(WorkerStartError, match="exited with code 4"):
            await pool.recycle()
        assert pool.stats()["workers"][0]["state"] == "failed" and pool.pids == []
        marker.unlink()  # the fix
        await pool.recycle()
        assert pool.stats()["workers"][0]["state"] == "ready" and len(pool.pids) == 1
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


async def test_a_worker_that_dies_while_its_replacement_starts_is_not_restarted_too(
    tmp_path: Path,
) -> None:
    """The replacement takes the slot; the crash's requests fail with
    WorkerCrashed, and no second process is started for the slot."""
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "starts"))
    async with WorkerPool("pool_workers:setup_slow_later_starts", 1, env=env) as pool:
        (old,) = pool.pids
        setting_up = await pool.bus.subscribe("setting.up")
        started = await pool.bus.subscribe("started")
        failed: list[BaseException] = []

        async def hang() -> None:
            try:
                await pool.bus.request("slow.hang", timeout=10)
            except WorkerCrashed as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.recycle)
            new = (await setting_up.next(timeout=10)).decode(int)
            tg.start_soon(hang)
            assert (await started.next(timeout=10)).decode() == old
            os.kill(old, 9)
        assert len(failed) == 1, failed
        assert pool.pids == [new]
        assert running_children() == {new}
        w = pool.stats()["workers"][0]
        assert (w["starts"], w["crashes"], w["recycles"]) == (2, 1, 1)
        assert (await pool.bus.request("pid", timeout=10)).decode() == new


async def test_max_messages_recycles_a_worker_that_was_sent_that_many() -> None:
    async with WorkerPool("pool_workers:setup", 1, env=worker_env(), max_messages=50) as pool:
        (first,) = pool.pids
        pids = {first}
        with anyio.fail_after(30):
            while len(pids) < 3:
                pids.add((await pool.bus.request("pid", timeout=10)).decode(int))
                await anyio.sleep(0.001)
        await wait_exited(first)
        assert pool.stats()["workers"][0]["recycles"] >= 2


async def test_max_messages_counts_messages_not_the_pools_pings() -> None:
    """With hang_timeout, the parent pings each worker: frames, not messages."""
    async with WorkerPool(
        "pool_workers:setup", 1, env=worker_env(), max_messages=5, hang_timeout=0.1
    ) as pool:
        (pid,) = pool.pids

        def frames_out() -> int:
            node = pool.stats()["node"]
            assert node is not None
            return sum(link["msgs_out"] for link in node["links"])

        for _ in range(4):
            await pool.bus.request("echo", b"x", timeout=10)
        assert pool.stats()["workers"][0]["messages"] == 4
        sent = frames_out()
        await wait_until(lambda: frames_out() >= sent + 20)  # 20 pings (and pongs came back)
        assert running_children() == {pid}  # no replacement starting either
        assert pool.stats()["workers"][0]["recycles"] == 0
        await pool.bus.request("echo", b"x", timeout=10)  # the fifth message
        await wait_until(lambda: pool.stats()["workers"][0]["recycles"] == 1)
        await wait_exited(pid)


async def test_closing_a_pool_on_a_given_bus_as_a_limit_recycles_leaves_the_bus_open(
    bus_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "starts"), IPCBUS_TEST_SETUP_SECONDS="30")
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)),
        ipcbus.connect(bus_name, transport="fifo", name="host") as host,
    ):
        pool = WorkerPool("pool_workers:setup_slow_later_starts", 1, env=env, bus=host, max_messages=5)
        async with pool:
            setting_up = await host.subscribe("setting.up")
            for _ in range(6):
                await host.request("echo", b"x", timeout=10)
            new = (await setting_up.next(timeout=10)).decode(int)  # its replacement is starting
        await wait_exited(new)
        assert not host.closed
        await host.serve("host.ok", lambda m: "ok")
        assert (await host.request("host.ok", timeout=5)).decode() == "ok"
    assert "background task failed" not in caplog.text


async def test_max_rss_recycles_a_worker_whose_memory_grew(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ipcbus.pool")
    async with WorkerPool("pool_workers:setup_leaky", 1, env=worker_env(), max_rss=200 << 20) as pool:
        (old,) = pool.pids
        assert (await pool.bus.request("leak", 100, timeout=10)).decode() == old  # under: stays
        rss = pool.stats()["workers"][0]["rss"]
        assert rss is not None and 100 << 20 < rss < 200 << 20
        assert (await pool.bus.request("leak", 150, timeout=10)).decode() == old  # over
        await wait_until(lambda: pool.pids not in ([], [old]))
        await wait_exited(old)
        assert pool.stats()["workers"][0]["recycles"] == 1
        assert "MiB resident (max_rss=209715200)" in caplog.text
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


async def test_max_rss_below_a_fresh_workers_memory_is_said_and_does_not_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with WorkerPool("pool_workers:setup", 1, env=worker_env(), max_rss=1 << 20) as pool:
        (pid,) = pool.pids
        assert "over max_rss=1048576 bytes: it is not recycled for its memory" in caplog.text
        # The recycler checked it (every second) and let it be.
        await pool.bus.request("slow.sleep", 1.5, timeout=10)
        assert pool.pids == [pid]
        assert pool.stats()["workers"][0]["recycles"] == 0


async def test_resize_grows_and_shrinks_without_a_failed_request() -> None:
    async with WorkerPool("pool_workers:setup", 1, env=worker_env()) as pool:
        load = Load(pool.bus)
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(load.ask)
            await pool.resize(3)
            assert len(pool.pids) == 3
            load.pids.clear()
            await wait_until(lambda: load.pids >= set(pool.pids))  # every new one takes work
            kept, removed = pool.pids[:1], pool.pids[1:]
            await pool.resize(1)
            assert pool.pids == kept
            for pid in removed:
                await wait_exited(pid)
            await load.more(10)
            tg.cancel_scope.cancel()
        assert load.failures == []
        assert [w["index"] for w in pool.stats()["workers"]] == [0]
        await pool.resize(2)  # index 1 again, a new process
        assert len(pool.pids) == 2 and pool.stats()["workers"][1]["state"] == "ready"


async def test_shrinking_while_a_removed_worker_restarts_stops_its_new_process(tmp_path: Path) -> None:
    """Worker 1 crashed and its restart is in its setup as resize(1) removes
    it: that process stops too (no worker left serving outside the pool)."""
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "starts"))
    async with WorkerPool("pool_workers:setup_slow_later_starts", 2, env=env) as pool:
        first, second = pool.pids
        setting_up = await pool.bus.subscribe("setting.up")
        os.kill(second, 9)
        restarting = (await setting_up.next(timeout=10)).decode(int)
        await pool.resize(1)
        await wait_exited(restarting)
        assert pool.pids == [first] and running_children() == {first}
        assert len(pool.stats()["workers"]) == 1
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


async def test_shrinking_as_a_removed_workers_restart_forks_stops_its_new_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same, with resize(1) done while the restart creates its process
    (held there by the test, a window of a few ms otherwise)."""
    real = asyncio.create_subprocess_exec
    gate, forking = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        forking.set()
        await gate.wait()
        return await real(*args, **kwargs)

    async with WorkerPool("pool_workers:setup", 2, env=worker_env()) as pool:
        first, second = pool.pids
        monkeypatch.setattr(asyncio, "create_subprocess_exec", held)
        os.kill(second, 9)
        await forking.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.resize, 1)
            await wait_until(lambda: len(pool.stats()["workers"]) == 1)
            gate.set()
        assert pool.pids == [first] and running_children() == {first}
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_messages": 0}, ValueError, "max_messages must be at least 1"),
        ({"max_messages": -5}, ValueError, "max_messages must be at least 1"),
        ({"max_messages": "100"}, TypeError, "max_messages must be an int"),
        ({"max_messages": True}, TypeError, "max_messages must be an int"),
        ({"max_messages": 2.5}, TypeError, "max_messages must be an int"),
        ({"max_rss": 0}, ValueError, r"max_rss must be at least 1048576 \(bytes\)"),
        ({"max_rss": 4096}, ValueError, r"max_rss must be at least 1048576 \(bytes\)"),
        ({"max_rss": "1G"}, TypeError, r"max_rss must be an int \(bytes\)"),
    ],
)
def test_bad_recycle_limits(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        WorkerPool("pool_workers:setup", 1, **kwargs)  # type: ignore[arg-type]


async def test_bad_recycle_and_resize_calls() -> None:
    pool = WorkerPool("pool_workers:setup", 2, env=worker_env())
    with pytest.raises(BusClosed, match="not started"):
        await pool.recycle()
    with pytest.raises(BusClosed, match="not started"):
        await pool.resize(3)
    async with pool:
        for bad, error, match in [
            (2, ValueError, "no worker 2 in pool 'pool': its workers are 0 to 1"),
            ([0, 7], ValueError, "no worker 7"),
            ((7,), ValueError, "no worker 7"),
            (-1, ValueError, "worker index must be at least 0"),
            ("0", TypeError, "worker index must be an int, not '0'"),
            ([0.5], TypeError, "worker index must be an int, not 0.5"),
            (True, TypeError, "worker index must be an int, not True"),
            (object(), TypeError, "worker index must be an int, not <object"),
        ]:
            with pytest.raises(error, match=match):
                await pool.recycle(bad)  # type: ignore[arg-type]
        for size, error, match in [
            (0, ValueError, "workers must be at least 1"),
            (-2, ValueError, "workers must be at least 1"),
            ("3", TypeError, "workers must be an int"),
            (True, TypeError, "workers must be an int"),
        ]:
            with pytest.raises(error, match=match):
                await pool.resize(size)  # type: ignore[arg-type]
        assert len(pool.pids) == 2  # nothing changed
        assert [w["recycles"] for w in pool.stats()["workers"]] == [0, 0]
    with pytest.raises(BusClosed, match="is closed"):
        await pool.recycle()
    with pytest.raises(BusClosed, match="is closed"):
        await pool.resize(1)


@pytest.mark.parametrize("call", ["recycle", "resize"])
async def test_closing_the_pool_while_a_replacement_starts(tmp_path: Path, call: str) -> None:
    """The close stops the old worker and the one starting for its slot (or
    the new one resize() starts); the recycle() or resize() waiting on it
    raises BusClosed."""
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "starts"), IPCBUS_TEST_SETUP_SECONDS="30")
    pool = WorkerPool("pool_workers:setup_slow_later_starts", 1, env=env)
    async with pool:
        (old,) = pool.pids
        setting_up = await pool.bus.subscribe("setting.up")
        recycling: list[BaseException] = []

        async def recycle() -> None:
            try:
                await (pool.recycle() if call == "recycle" else pool.resize(2))
            except BaseException as exc:
                recycling.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(recycle)
            new = (await setting_up.next(timeout=10)).decode(int)
            with anyio.fail_after(10):
                await pool.__aexit__(None, None, None)
        assert len(recycling) == 1 and isinstance(recycling[0], BusClosed), recycling
    await wait_exited(old)
    await wait_exited(new)


async def test_a_resize_that_would_make_worker_names_too_long_is_refused() -> None:
    """Names are ``<pool>-<index>``, at most 256 characters: a pool named with
    254 fits workers 0 to 9, not 10."""
    async with WorkerPool("pool_workers:setup", 1, env=worker_env(), name="p" * 254) as pool:
        with pytest.raises(ValueError, match="name must be at most 253 characters, not 254"):
            await pool.resize(11)
        assert pool.size == 1
