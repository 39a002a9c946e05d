"""WorkerPool: real worker processes over anonymous pipes.

Workers import their setup functions from ``tests/pool_workers.py`` (this
directory goes on their ``PYTHONPATH``) or from ``examples/workers.py``.
Heavy tests are ``single_loop``.  Waiting for a restart polls the pool's
state with a deadline; every other event is ordered by messages (a handler
publishes ``started`` before it blocks) or by pidfds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import math
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import ipcbus
import ipcbus.pool as pool_module
from ipcbus import BusClosed, RemoteError, WorkerCrashed, WorkerPool, WorkerStartError
from ipcbus.gc import sysv_table
from ipcbus.records import list_records
from ipcbus.worker import ORPHAN_GRACE

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


async def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll the pool's state until ``cond`` holds (for a give-up after restarts fail,
    which wait_ready() cannot tell from "not noticed yet")."""
    with anyio.fail_after(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def wait_exited(pid: int, timeout: float = 10.0) -> None:
    """Wait for any process (not only a child) to exit, through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.fail_after(timeout):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)


def queue_ids() -> set[int]:
    """The ids of every SysV message queue in this IPC namespace."""
    return set(sysv_table("msg"))


def pool_dirs() -> list[Path]:
    """The worker pools' records folders under the bus root."""
    root = Path(os.environ["IPCBUS_DIR"])
    return sorted(p for p in root.iterdir() if p.name.startswith("_pool-"))


TRANSPORTS = ["pipe", "shm", "sysv"]


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


# -- start, balance, stop -------------------------------------------------------------


@pytest.mark.single_loop
async def test_requests_are_balanced_over_the_workers() -> None:
    async with WorkerPool("examples.workers:setup", workers=2, env=worker_env()) as pool:
        pids = pool.pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
        seen: collections.Counter[int] = collections.Counter()

        async def one() -> None:
            seen[(await pool.bus.request("pid", timeout=10)).decode(int)] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(one)
        assert set(seen) == set(pids), f"requests went only to {dict(seen)}"
        # sequential requests alternate too (least busy, then longest idle)
        seq = [(await pool.bus.request("pid", timeout=10)).decode(int) for _ in range(10)]
        assert set(seq) == set(pids)
        img = {"width": 640, "height": 480, "pixels": b"\0" * 100}
        r = (await pool.bus.request("resize", img, timeout=10)).decode(dict[str, int])
        assert (r["width"], r["height"]) == (320, 240) and r["worker_pid"] in pids
        assert (await pool.bus.request("echo", b"hi", timeout=10)).data == b"hi"
        st = pool.stats()
        assert [w["state"] for w in st["workers"]] == ["ready", "ready"]
        assert len(st["node"]["links"]) == 2
    assert all(gone(p) for p in pids)


@pytest.mark.single_loop
async def test_pub_sub_reaches_every_worker_and_back() -> None:
    async with WorkerPool("pool_workers:setup", workers=2, env=worker_env()) as pool:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        # two concurrent slow requests: least-busy picks a different worker for each
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lambda: pool.bus.request("slow.sleep", 0.01, timeout=10))
        pids = {(await started.next(timeout=10)).decode(int) for _ in range(2)}
        assert pids == set(pool.pids)


async def test_a_worker_that_keeps_dying_after_start_is_restarted_ever_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dying soon after each (good) start is a crash loop too: the backoff
    doubles up to max_backoff (it stayed at restart_backoff: 36 restarts in 10 s)."""
    async with WorkerPool(
        "pool_workers:setup", workers=1, env=worker_env(), restart_backoff=0.05, max_backoff=0.4
    ) as pool:
        for _ in range(5):
            with pytest.raises(WorkerCrashed):
                await pool.bus.request("exit", timeout=10)  # the worker dies, at once
            await wait_until(lambda: pool.stats()["workers"][0]["state"] != "ready")
            await pool.wait_ready(timeout=15)
        delays = re.findall(r"restarting in ([0-9.]+) s", caplog.text)
        assert delays == ["0.05", "0.1", "0.2", "0.4", "0.4"], delays
        assert pool.errors == []  # it starts every time: not given up on


async def test_the_exit_code_of_a_worker_that_died_as_the_pool_closed_is_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that exits (code 3) just before the pool closes: its code is 3.
    Signalling it through Popen reaped it behind asyncio's child watcher,
    which then reported 255 ('Unknown child process pid')."""
    for _ in range(5):
        async with WorkerPool("pool_workers:setup", workers=1, env=worker_env()) as pool:
            with pytest.raises(WorkerCrashed):
                await pool.bus.request("exit", timeout=10)
            (w,) = pool._workers
        assert w.proc is not None and w.proc.returncode == 3
    assert "Unknown child process" not in caplog.text and "code 255" not in caplog.text


async def test_a_worker_that_stopped_reading_its_link_is_restarted() -> None:
    """A worker still running but no longer reading (its plugin closed the
    link's reading end): the write fails (WorkerCrashed), and the link is over,
    so the pool restarts the worker.  It stayed 'ready', half its link dead,
    and the pool routed around it for ever."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), restart_backoff=0.01) as pool:
        (old,) = pool.pids
        assert (await pool.bus.request("close.reader", timeout=10)).decode() == "closed"
        with pytest.raises(WorkerCrashed):
            await pool.bus.request("echo", b"x", timeout=10)
        await wait_until(lambda: pool.stats()["workers"][0]["crashes"] == 1)
        await pool.wait_ready(timeout=15)
        assert pool.pids != [old]
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
    await wait_exited(old)


async def test_a_worker_busy_with_a_request_that_timed_out_is_left_alone() -> None:
    """A request that timed out (its handler is slow) still keeps its worker
    busy: new requests go to the idle worker until the late reply comes.  The
    timeout made the busy worker look idle, and round robin sent every other
    request to it, behind the slow one."""
    async with WorkerPool("pool_workers:setup", workers=2, env=worker_env()) as pool:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        with pytest.raises(ipcbus.RequestTimeout):
            await pool.bus.request("slow.gated", timeout=0.3)  # waits for "release"
        busy = (await started.next(timeout=10)).decode(int)
        (idle,) = set(pool.pids) - {busy}
        pids = [(await pool.bus.request("pid", timeout=10)).decode(int) for _ in range(6)]
        assert pids == [idle] * 6

        def given_up() -> int:
            node = pool.stats()["node"]
            assert node is not None
            (link,) = [lk for lk in node["links"] if lk["peer_pid"] == busy]
            assert link["inflight_requests"] == 0
            return link["abandoned_requests"]

        assert given_up() == 1
        await pool.bus.publish("release")
        await wait_until(lambda: given_up() == 0)  # the late reply came: the worker is free


@pytest.mark.parametrize("monitor", [False, True])
async def test_a_worker_takes_requests_only_once_its_setup_returned(tmp_path: Path, monitor: bool) -> None:
    """A restarted worker whose setup serves first and sets up after: no
    request reaches it before its setup returned (half of them did, to be
    answered by a worker not set up yet).  Meanwhile its interest is not
    passed on either (the other worker, asking its own group through the
    parent, was sent there for the held one and got NoResponders), and the
    replies to its own requests reach it (also when a '>' subscription in the
    parent routes inbox subjects by pattern)."""
    env = worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "started"), IPCBUS_TEST_FAST_STARTS="2")
    async with WorkerPool("pool_workers:setup_slow_after_serving", workers=2, env=env) as pool:
        await pool.bus.serve("parent.ping", lambda m: b"pong")
        if monitor:
            await pool.bus.subscribe(">")
        setting_up = await pool.bus.subscribe("setting.up")
        asked = await pool.bus.subscribe("setup.asked")
        await pool.bus.flush()
        victim, survivor = pool.pids
        os.kill(victim, signal.SIGKILL)
        new = (await setting_up.next(timeout=15)).decode(int)  # serves, and is still in setup
        assert (await asked.next(timeout=15)).data == b"pong"  # its own request was answered
        assert new not in pool.pids
        for _ in range(6):
            assert (await pool.bus.request("pid", timeout=10)).decode(int) == survivor
            assert (await pool.bus.request("pid.via", timeout=10)).decode(int) == survivor


async def test_a_request_while_the_only_worker_restarts_waits_for_it() -> None:
    """NoResponders came at once while the only worker serving the subject was
    being restarted; the request now waits for it, within its timeout (then
    RequestTimeout).  A subject it never served gets NoResponders at once,
    and a request still waiting as the pool closes gets BusClosed."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), restart_backoff=1.5) as pool:
        (old,) = pool.pids
        os.kill(old, signal.SIGKILL)
        await wait_exited(old)
        await wait_until(lambda: pool.stats()["workers"][0]["state"] != "ready")
        with anyio.fail_after(1), pytest.raises(ipcbus.NoResponders):
            await pool.bus.request("nobody.serves.this", timeout=10)
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
        (new,) = pool.pids
        assert new != old
        os.kill(new, signal.SIGKILL)  # dead again soon after its restart: the next waits 3 s
        await wait_exited(new)
        await wait_until(lambda: pool.stats()["workers"][0]["state"] != "ready")
        with pytest.raises(ipcbus.RequestTimeout, match=r"no reply on 'echo' within 0\.3 s"):
            await pool.bus.request("echo", b"x", timeout=0.3)
        waiting = asyncio.ensure_future(pool.bus.request("echo", b"x", timeout=30))
        await asyncio.sleep(0.1)  # it waits for the restart (3 s away)
    with anyio.fail_after(1), pytest.raises(BusClosed, match="waited for its worker's restart"):
        await waiting


async def test_retrying_on_no_responders_lets_the_pool_restart_its_worker() -> None:
    """A caller that retries at once on NoResponders while the only worker
    restarts: each failed request is a checkpoint, so the restart happens and
    a request is answered (NoResponders was raised before any await: the loop
    never ran again, nor did the caller's own timeout)."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), restart_backoff=0.05) as pool:
        (old,) = pool.pids
        os.kill(old, signal.SIGKILL)
        await wait_exited(old)
        await wait_until(lambda: pool.stats()["workers"][0]["state"] != "ready")
        answered = False
        for _ in range(1_000_000):  # without a checkpoint: ~3 s of CPU, and still no restart
            try:
                answered = (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
                break
            except ipcbus.NoResponders:
                continue
        assert answered


async def test_a_request_timing_out_while_its_caller_is_cancelled_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request waiting for a full link (backpressure) times out, and its
    caller is cancelled before it resumes: asyncio logged 'Future exception
    was never retrieved' (the RequestTimeout set by the deadline)."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env()) as pool:
        node = pool.bus.node
        big = b"x" * (8 << 20)  # over the link's high-water mark: request() waits for it
        for _ in range(5):
            before = set(node.inbox.futures)
            caller = asyncio.ensure_future(pool.bus.request("echo", big, timeout=0.001))
            await asyncio.sleep(0)  # sent; waits for the link
            (fut,) = [node.inbox.futures[t] for t in set(node.inbox.futures) - before]
            with anyio.fail_after(10):
                while not fut.done():  # its deadline fails it (turn by turn: this task
                    await asyncio.sleep(0)  # then runs before the caller resumes)...
            caller.cancel()  # ...and its caller is cancelled before it resumes
            with contextlib.suppress(asyncio.CancelledError, ipcbus.RequestTimeout):
                await caller
            del fut, caller
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_two_services_on_the_same_workers_each_spread_over_both() -> None:
    """Round robin is per queue group: requests alternating between two
    services that both workers serve reach both workers for each service (a
    pick count shared by the groups sent one service always to one worker)."""
    async with WorkerPool("pool_workers:setup", workers=2, env=worker_env()) as pool:
        seen: dict[str, collections.Counter[int]] = {s: collections.Counter() for s in ("pid", "pid.b")}
        for _ in range(20):
            for subject, counts in seen.items():
                counts[(await pool.bus.request(subject, timeout=10)).decode(int)] += 1
        assert all(set(counts) == set(pool.pids) for counts in seen.values()), seen
        assert all(counts.most_common(1)[0][1] == 10 for counts in seen.values()), seen  # 10 each


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_handler_raising_a_base_exception_answers_and_loses_nothing(transport: str) -> None:
    """A handler raising a BaseException of its own (a CancelledError, a plugin's
    class) is answered with RemoteError, like any exception; the requests read
    in the same batch are answered; the worker keeps serving.  (They were lost,
    and on sysv the worker's link never read again.)"""
    async with WorkerPool("pool_workers:setup", workers=1, transport=transport, env=worker_env()) as pool:
        bad = ["bad.base", "bad.cancelled", "bad.awaits_cancelled"]
        for _ in range(2):  # the second round: the link still reads
            # One burst: the bad requests among good ones, read in one batch.
            subjects = [s for b in bad for s in (b, "echo", "echo")]
            results = await asyncio.gather(
                *(pool.bus.request(s, b"x", timeout=10) for s in subjects), return_exceptions=True
            )
            for subject, res in zip(subjects, results, strict=True):
                if subject == "echo":
                    assert isinstance(res, ipcbus.Msg) and res.data == b"x", res
                else:
                    assert isinstance(res, RemoteError), (subject, res)
            errors = [r for r in results if isinstance(r, RemoteError)]
            assert [e.type_name for e in errors] == ["PluginAbort", "CancelledError", "CancelledError"]
        assert [w["state"] for w in pool.stats()["workers"]] == ["ready"]


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sigkill_in_flight_gives_worker_crashed_then_restart(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with WorkerPool(
        "pool_workers:setup", workers=2, transport=transport, env=worker_env(), restart_backoff=0.01
    ) as pool:
        before = set(pool.pids)
        queues = {  # SysV: the queues of every link; the victim's must go while the pool runs
            lk["objects"][role]
            for lk in pool.bus.stats()["links"] if transport == "sysv"
            for role in ("queue", "peer_queue")
        }
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        req = asyncio.ensure_future(pool.bus.request("slow.hang", b"", timeout=60))
        victim = (await started.next(timeout=10)).decode(int)
        assert victim in before
        os.kill(victim, signal.SIGKILL)
        with anyio.fail_after(10):  # far below the request's 60 s timeout
            with pytest.raises(WorkerCrashed) as info:
                await req
        assert not isinstance(info.value, TimeoutError)
        assert "slow.hang" in str(info.value)
        assert f"(pid {victim})" in str(info.value) and "'pool-" in str(info.value)  # which one
        # the pool restarts the worker
        await pool.wait_ready(timeout=15)  # the crash was recorded before req failed
        assert f"(pid {victim}) was killed by SIGKILL; restarting" in caplog.text
        after = set(pool.pids)
        assert len(after) == 2 and victim not in after
        assert len(after & before) == 1
        if transport == "sysv":
            await wait_until(lambda: len(queues & queue_ids()) == 2)  # the survivor's two
        (w,) = [w for w in pool.stats()["workers"] if w["crashes"]]
        assert w["crashes"] == 1 and w["starts"] == 2
        assert w["last_error"] == "it was killed by SIGKILL"  # (it stayed "")
        # later requests succeed, on both workers
        seen: set[int] = set()
        async with anyio.create_task_group() as tg:
            for _ in range(32):

                async def one() -> None:
                    seen.add((await pool.bus.request("pid", timeout=10)).decode(int))

                tg.start_soon(one)
        assert seen == after
        assert pool.errors == []
    await wait_exited(victim)


def failing_restarts(setup: str, tmp_path: Path, max_start_failures: int) -> WorkerPool:
    """One worker whose first start works and whose restarts run ``setup`` into trouble."""
    return WorkerPool(
        f"pool_workers:{setup}",
        workers=1,
        env=worker_env(IPCBUS_TEST_MARKER=str(tmp_path / "started-once")),
        restart_backoff=0.01,
        max_start_failures=max_start_failures,
    )


@pytest.mark.single_loop
async def test_worker_crashing_on_restart_is_reported_not_restarted_forever(
    tmp_path: Path,
) -> None:
    async with failing_restarts("setup_crash_on_restart", tmp_path, 3) as pool:
        (pid,) = pool.pids
        assert (await pool.bus.request("echo", b"1", timeout=10)).data == b"1"
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: bool(pool.errors))
        (err,) = pool.errors
        assert "failed to restart 3 times" in err and "giving up" in err
        assert "code 4" in err
        (w,) = pool.stats()["workers"]
        assert w["state"] == "failed" and w["starts"] == 4
        assert pool.pids == []
        with pytest.raises(ipcbus.NoResponders):
            await pool.bus.request("echo", b"2", timeout=10)


@pytest.mark.single_loop
async def test_worker_hanging_on_restart_is_killed_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restart gets the same start limit as the pool's start (here 0.5 s):
    # a worker whose setup hangs is killed, retried, then given up on.
    async with failing_restarts("setup_hang_on_restart", tmp_path, 2) as pool:
        # Only now: a first start under load can take more than 0.5 s.
        monkeypatch.setattr(pool_module, "_START_TIMEOUT", 0.5)
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: bool(pool.errors), timeout=30)
        (err,) = pool.errors
        assert "failed to restart 2 times" in err and "did not finish within 0.5 s" in err
        (w,) = pool.stats()["workers"]
        assert w["state"] == "failed"
        assert pool.pids == []


@pytest.mark.single_loop
async def test_a_restart_the_close_cuts_short_ends_stopped_not_failed(tmp_path: Path) -> None:
    """Closing the pool while a restarted worker still sets up: the worker ends
    "stopped", and the pool reports no error (it is the close, not the plugin)."""
    async with failing_restarts("setup_hang_on_restart", tmp_path, 2) as pool:
        (old,) = pool.pids
        os.kill(old, signal.SIGKILL)
        w0 = pool._workers[0]
        await wait_until(lambda: w0.proc is not None and w0.proc.pid != old)  # restarted
        (w,) = pool.stats()["workers"]
        assert w["state"] == "starting" and w["starts"] == 2  # (its setup hangs)
    (w,) = pool.stats()["workers"]
    assert w["state"] == "stopped", w
    assert pool.errors == [] and pool.pids == []


@pytest.mark.single_loop
async def test_wait_ready_waits_through_a_failed_restart(tmp_path: Path) -> None:
    """Between restart attempts a worker is "restarting", not "failed": wait_ready()
    waits for the attempt that works (it returned at once, and requests got NoResponders)."""
    pool = failing_restarts("setup_fails_second_start", tmp_path, 5)
    pool.restart_backoff = 0.3
    async with pool:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: pool.stats()["workers"][0]["state"] == "restarting")
        assert pool.errors == []
        await pool.wait_ready(30)
        (w,) = pool.stats()["workers"]
        assert w["state"] == "ready" and w["starts"] == 3
        assert (await pool.bus.request("echo", b"back", timeout=10)).data == b"back"
    assert [w["state"] for w in pool.stats()["workers"]] == ["stopped"]
    assert pool.pids == []
    with pytest.raises(BusClosed):
        await pool.wait_ready(1)


async def test_a_pool_runs_once() -> None:
    pool = WorkerPool("pool_workers:setup", workers=1, env=worker_env())
    async with pool:
        pass
    with pytest.raises(RuntimeError, match="runs once"):
        async with pool:
            pass


@pytest.mark.single_loop
async def test_a_request_made_while_the_pool_drains_fails_with_bus_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "_STOP_TIMEOUT", 0.5)
    pool = WorkerPool("pool_workers:setup", workers=1, env=worker_env())
    await pool.__aenter__()
    try:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        first = asyncio.ensure_future(pool.bus.request("slow.sleep", 30.0, timeout=None))
        await started.next(timeout=10)
        closing = asyncio.ensure_future(pool.__aexit__(None, None, None))
        await wait_until(lambda: pool._closing)  # inside the drain's wait
        late = asyncio.ensure_future(pool.bus.request("slow.sleep", 30.0, timeout=None))
        with anyio.fail_after(20):
            await closing
    finally:
        if not pool._closing:
            await pool.__aexit__(None, None, None)
    with pytest.raises(BusClosed, match=r"pool closed after waiting 0\.5 s"):
        await first
    with pytest.raises(BusClosed, match="pool was closing when this request was made"):
        await late
    (w,) = pool.stats()["workers"]
    assert w["crashes"] == 0 and w["state"] == "stopped"
    with pytest.raises(BusClosed):
        await pool.bus.request("echo", b"x", timeout=1)


@pytest.mark.single_loop
async def test_a_request_just_under_max_frame_is_too_large_not_a_crash() -> None:
    """A request to a queue group carries the group's name: near max_frame that
    makes it too large, which must be FrameTooLarge (it was WorkerCrashed)."""
    mf = 1 << 20
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), max_frame=mf) as pool:
        (pid,) = pool.pids
        fits = sizes = 0
        for n in range(mf - 48, mf - 24):
            try:
                rep = await pool.bus.request("echo", b"y" * n, timeout=10)
            except ipcbus.FrameTooLarge:
                sizes += 1
            else:
                assert len(rep.data) == n
                fits += 1
        assert fits and sizes  # the limit lies inside the range tried
        assert pool.pids == [pid] and pool.stats()["workers"][0]["crashes"] == 0


@pytest.mark.single_loop
async def test_abandoned_requests_do_not_stay_in_flight() -> None:
    """A timed-out or cancelled request no longer counts: balancing and shutdown ignore it."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env()) as pool:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        with pytest.raises(ipcbus.RequestTimeout):
            await pool.bus.request("slow.hang", b"", timeout=0.05)
        await started.next(timeout=10)
        task = asyncio.ensure_future(pool.bus.request("slow.hang", b"", timeout=60))
        await started.next(timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (link,) = pool.stats()["node"]["links"]
        assert link["inflight_requests"] == 0
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_pool_left_by_a_cancellation_does_not_wait_for_requests(transport: str) -> None:
    """Leaving the block because of a cancellation (a deadline) closes at once:
    requests still in flight fail with BusClosed instead of being waited for
    (up to 5 s, the drain of a normal exit), and the close still ends with
    the pool's records folder removed."""
    outer: asyncio.Future[ipcbus.Msg] | None = None
    with anyio.move_on_after(30) as scope:
        async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), transport=transport) as pool:
            started = await pool.bus.subscribe("started")
            await pool.bus.flush()
            outer = asyncio.ensure_future(pool.bus.request("slow.hang", b"", timeout=60))
            await started.next(timeout=10)
            scope.cancel()
            await asyncio.sleep(60)  # cancelled at once
    assert scope.cancelled_caught and outer is not None
    with pytest.raises(BusClosed, match="cancelled"):
        await outer
    assert pool_dirs() == []


async def test_a_cancelled_pool_close_still_stops_its_workers() -> None:
    """A second cancellation while the pool closes (asyncio's, which anyio's
    shields do not hold off) must not leave workers or links behind."""
    pool = WorkerPool("pool_workers:setup", workers=2, env=worker_env())
    await pool.__aenter__()
    pids = pool.pids
    closing = asyncio.ensure_future(pool.__aexit__(None, None, None))
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert all(gone(pid) for pid in pids)
    assert pool._node is not None and pool._node.closed and not pool._node.links


# -- start failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("pool_workers:setup_raises", "RuntimeError: setup exploded on purpose"),
        ("no_such_module_for_ipcbus:setup", "ModuleNotFoundError"),
        ("pool_workers:no_such_function", "no function 'no_such_function'"),
        ("pool_workers:not_callable", "not callable"),
        ("pool_workers:setup_crash", "exited with code 3"),
        ("pool_workers:setup_raises_base", "PluginAbort: setup gave up on purpose"),
    ],
    ids=["raises", "no-module", "no-function", "not-callable", "crash", "base-exception"],
)
@pytest.mark.single_loop
async def test_start_failure_is_a_worker_start_error(target: str, needle: str) -> None:
    with anyio.fail_after(20):
        with pytest.raises(WorkerStartError) as info:
            async with WorkerPool(target, workers=2, env=worker_env()):
                raise AssertionError("the pool started")
    assert needle in str(info.value)
    assert target in str(info.value)


@pytest.mark.single_loop
async def test_a_setup_that_never_returns_is_named_in_the_start_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "_START_TIMEOUT", 0.5)
    with pytest.raises(WorkerStartError) as info:
        async with WorkerPool("pool_workers:setup_says_pid_then_hangs", workers=2, env=worker_env()):
            raise AssertionError("the pool started")
    assert "worker(s) 0, 1 of pool 'pool'" in str(info.value)
    assert "'pool_workers:setup_says_pid_then_hangs' within 0.5 s" in str(info.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_worker_whose_plugin_closed_its_bus_is_restarted(transport: str) -> None:
    """Closing its own bus ends the worker (the bus owns its node), which the
    pool restarts: it ran on as 'ready', serving nothing, for ever."""
    async with WorkerPool(
        "pool_workers:setup", workers=1, transport=transport, env=worker_env(), restart_backoff=0.01
    ) as pool:
        (old,) = pool.pids
        assert (await pool.bus.request("close.bus", timeout=10)).decode() == "closing"
        await wait_exited(old)
        await wait_until(lambda: pool.stats()["workers"][0]["crashes"] == 1)
        await pool.wait_ready(timeout=15)
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_worker_whose_loop_hangs_is_killed_and_restarted(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """hang_timeout: a handler that blocks its worker's event loop (time.sleep)
    leaves the pool's pings unanswered; after hang_timeout the worker is
    killed, its request fails with WorkerCrashed saying why (it waited for its
    whole timeout before), and the restarted worker serves."""
    async with WorkerPool(
        "pool_workers:setup", workers=1, transport=transport, env=worker_env(),
        restart_backoff=0.01, hang_timeout=1.0,
    ) as pool:
        (old,) = pool.pids
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        req = asyncio.ensure_future(pool.bus.request("slow.block", 120.0, timeout=150))
        assert (await started.next(timeout=10)).decode() == old
        hung = r"did not answer a ping for 1 s \(hung\)"
        with anyio.fail_after(30), pytest.raises(WorkerCrashed, match=hung):
            await req
        await wait_exited(old)
        await pool.wait_ready(timeout=15)
        assert (await pool.bus.request("pid", timeout=10)).decode() != old
        (w,) = pool.stats()["workers"]
        assert w["crashes"] == 1 and "hung" in w["last_error"], w
    assert f"worker 0 (pid {old}): its event loop did not answer a ping for 1 s (hung)" in caplog.text


async def test_a_ping_that_cannot_be_sent_ends_the_watch_not_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The link breaking under the watchdog's ping write (ConnectionClosed from
    the transport, before the node has dropped the link) must not escape into
    the node's task group: that closed the whole pool."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), hang_timeout=0.2) as pool:
        node = pool._node
        assert node is not None
        failed: list[object] = []

        def broken(ls: Any) -> Any:
            failed.append(ls)
            raise ipcbus.ConnectionClosed("link is closed")

        monkeypatch.setattr(node, "send_ping", broken)
        await wait_until(lambda: bool(failed))
        await asyncio.sleep(0.3)  # the watch would have pinged again by now
        assert len(failed) == 1 and not node.closed
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_workers_streaming_to_a_slow_reader_are_not_hung(transport: str) -> None:
    """Workers publish flat out to a parent that takes 200 us per message: their
    pongs wait behind the data, longer than hang_timeout.  Frames still coming
    from a worker show it runs (both were killed as hung)."""
    async with WorkerPool(
        "pool_workers:setup_streams", workers=2, transport=transport, env=worker_env(), hang_timeout=1.0
    ) as pool:
        got = 0

        def slow(m: ipcbus.Msg) -> None:
            nonlocal got
            got += 1
            end = time.perf_counter() + 200e-6
            while time.perf_counter() < end:  # a handler that takes its time (holds the loop)
                pass

        await pool.bus.serve("data.>", slow)
        done = await pool.bus.subscribe("streamed")
        await pool.bus.flush()
        await pool.bus.publish("stream", 2.0)  # (no queue group: both workers stream)
        pids = {(await done.next(timeout=60)).decode() for _ in range(2)}
        assert pids == set(pool.pids) and got > 0
        assert [w["crashes"] for w in pool.stats()["workers"]] == [0, 0]


async def test_a_worker_that_hangs_as_its_pool_closes_is_killed_for_it() -> None:
    """The watch runs on through the close's drain: a hung worker is killed
    after hang_timeout and its request fails saying so (the close waited 5 s
    for the request, then 5 s for the worker to exit, and killed it)."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), hang_timeout=0.5) as pool:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        req = asyncio.ensure_future(pool.bus.request("slow.block", 60.0, timeout=90))
        await started.next(timeout=10)
        t0 = anyio.current_time()
    assert anyio.current_time() - t0 < 4.0
    with pytest.raises(WorkerCrashed, match="hung"):
        await req
    assert "hung" in pool.stats()["workers"][0]["last_error"]


async def test_a_long_request_on_a_running_loop_is_not_a_hang() -> None:
    """A handler that takes longer than hang_timeout but awaits (its loop
    answers pings meanwhile) is left to finish; so is every idle worker."""
    async with WorkerPool(
        "pool_workers:setup", workers=2, env=worker_env(), hang_timeout=0.3
    ) as pool:
        pids = sorted(pool.pids)
        req = await a_request_under_way(pool, 2.0)
        with anyio.fail_after(20):
            assert (await req).decode() == "slept"
        assert sorted(pool.pids) == pids
        assert [w["crashes"] for w in pool.stats()["workers"]] == [0, 0]


async def test_a_parent_that_stood_still_does_not_take_its_workers_for_hung(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent's own loop blocked for longer than hang_timeout while a
    ping was due: that time does not count against the worker."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(), hang_timeout=0.3) as pool:
        (pid,) = pool.pids
        node = pool._node
        assert node is not None
        send_ping, stalls = node.send_ping, []

        def stand_still_then_send_ping(ls: Any) -> Any:
            if len(stalls) < 3:
                stalls.append(ls)
                # Before the ping's write (its flush is scheduled after this):
                # once the loop runs again, the pong is not there yet.
                asyncio.get_running_loop().call_soon(time.sleep, 1.0)
            return send_ping(ls)

        monkeypatch.setattr(node, "send_ping", stand_still_then_send_ping)
        await wait_until(lambda: len(stalls) == 3)
        await asyncio.sleep(1.0)  # the watchdog pings on
        assert (await pool.bus.request("pid", timeout=10)).decode() == pid
        assert pool.stats()["workers"][0]["crashes"] == 0


async def a_request_under_way(pool: WorkerPool, seconds: float) -> asyncio.Future[ipcbus.Msg]:
    """A "slow.sleep" request of ``seconds``, returned once a worker has started on it."""
    started = await pool.bus.subscribe("started")
    await pool.bus.flush()
    req = asyncio.ensure_future(pool.bus.request("slow.sleep", seconds, timeout=90))
    await started.next(timeout=10)
    await started.unsubscribe()
    return req


@pytest.mark.parametrize("setup", ["setup_with_helper", "setup_with_helper_keeping_fds"])
async def test_a_helper_process_of_the_plugin_does_not_hide_its_workers_death(
    setup: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin that starts a process of its own: the worker's link pipes were
    inherited by it, so the parent never saw the worker die (its requests timed
    out, it stayed 'ready' and was never restarted).  The worker's pipe fds are
    not inheritable now; a helper given them anyway (every fd made
    inheritable) is outlived: the pool closes a link that outlives its
    worker's process."""
    marker = tmp_path / "helpers"
    pool = WorkerPool(
        f"pool_workers:{setup}",
        workers=1,
        env=worker_env(IPCBUS_TEST_MARKER=str(marker)),
        restart_backoff=0.01,
    )
    try:
        async with pool:
            (pid,) = pool.pids
            req = await a_request_under_way(pool, 60.0)
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(20), pytest.raises(WorkerCrashed):
                await req
            await wait_until(lambda: pool.stats()["workers"][0]["crashes"] == 1)
            await pool.wait_ready(timeout=15)
            assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
        # Seen by its end of stream, or (the helper has the fds) by its exit.
        assert ("its link stayed open" in caplog.text) is (setup == "setup_with_helper_keeping_fds")
    finally:
        for helper in marker.read_text().split() if marker.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(helper), signal.SIGKILL)


class _BytesPath:
    """A path object whose path is bytes (``os.fspath`` gives bytes)."""

    def __fspath__(self) -> bytes:
        return os.fsencode(sys.executable)


def test_bad_pool_arguments() -> None:
    """Each refused by the constructor, naming the argument (a bad backoff
    used to close the pool's node at the first crash; a bad env, target or
    ring size failed only as workers started)."""
    bad: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
        ("no_colon", {}, ValueError, "target must be 'module:function'"),
        ("mod:", {}, ValueError, "target must be 'module:function'"),
        (":f", {}, ValueError, "target must be 'module:function'"),
        (5, {}, TypeError, "target must be a str 'module:function', not 5"),
        ("a:b", {"workers": 0}, ValueError, "workers must be at least 1"),
        ("a:b", {"workers": "4"}, TypeError, "workers must be an int, not '4'"),
        ("a:b", {"workers": 2.5}, TypeError, "workers must be an int"),
        ("a:b", {"transport": "carrier-pigeon"}, ValueError, "transport"),
        (
            "a:b", {"restart_backoff": -1}, ValueError,
            "restart_backoff must be a number of seconds, finite, 0 or more, not -1",
        ),
        ("a:b", {"restart_backoff": "x"}, TypeError, "restart_backoff must be a number of seconds"),
        ("a:b", {"restart_backoff": math.inf}, ValueError, "restart_backoff must be .* finite"),
        ("a:b", {"max_backoff": math.nan}, ValueError, "max_backoff must be a number of seconds, 0 or more"),
        ("a:b", {"max_start_failures": -1}, ValueError, "max_start_failures must be at least 0"),
        ("a:b", {"max_frame": 1}, ValueError, "max_frame must be between 1024"),
        ("a:b", {"transport": "shm", "ring_size": 10_000}, ValueError, "ring_size 10000 must be a multiple"),
        ("a:b", {"transport": "shm", "ring_size": 1000}, ValueError, "ring_size must be between 4096 and"),
        ("a:b", {"transport": "shm", "ring_size": "8M"}, TypeError, "ring_size must be an int"),
        ("a:b", {"transport": "shm", "ring_size": True}, TypeError, "ring_size must be an int"),
        ("a:b", {"transport": "shm", "ring_size": 1 << 40}, ValueError, "ring_size must be between 4096 and"),
        ("a:b", {"env": {"A": 1}}, TypeError, "env must map str to str; its entry 'A': 1 is not"),
        ("a:b", {"env": {1: "A"}}, TypeError, "env must map str to str; its entry 1: 'A' is not"),
        ("a:b", {"env": [("A", "1")]}, TypeError, "env must be a mapping of str to str"),
        ("a:b", {"python": 3}, TypeError, r"python must be a path \(a str or Path\), not 3"),
        ("a:b", {"python": _BytesPath()}, TypeError, r"python must be a path \(a str or Path\)"),
        ("a:b", {"name": 5}, TypeError, "name must be a str, not 5"),
        ("a:b", {"name": "p" * 255}, ValueError, "name must be at most 254 characters"),  # "-0"..."-3"
        ("a:b", {"hang_timeout": 0}, ValueError, r"hang_timeout must be more than 0 seconds \(None: no"),
        ("a:b", {"hang_timeout": -1}, ValueError, "hang_timeout must be a number of seconds, finite"),
        ("a:b", {"hang_timeout": math.inf}, ValueError, "hang_timeout must be .* finite"),
        ("a:b", {"hang_timeout": math.nan}, ValueError, "hang_timeout must be a number of seconds"),
        ("a:b", {"hang_timeout": "30"}, TypeError, "hang_timeout must be a number of seconds, not '30'"),
        ("a:b", {"hang_timeout": True}, TypeError, "hang_timeout must be a number of seconds"),
    ]
    for target, kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            WorkerPool(target, **kw)
    # ... while what worked before the checks still does.
    fine: list[tuple[dict[str, Any], str, object]] = [  # (arguments, attribute, value taken)
        ({"env": os.environ}, "env", dict(os.environ)),  # any mapping of str to str
        ({"python": Path(sys.executable)}, "python", sys.executable),
        ({"max_backoff": math.inf}, "max_backoff", math.inf),  # no cap on the backoff
        ({"max_start_failures": 0}, "max_start_failures", 0),
        ({"workers": 2.0}, "size", 2),
        ({"transport": "shm", "ring_size": 8.0 * 1024 * 1024}, "ring_size", 8 << 20),
        ({"hang_timeout": 2}, "hang_timeout", 2.0),
        ({}, "hang_timeout", None),  # off unless asked for
    ]
    for kw, attr, value in fine:
        taken = getattr(WorkerPool("a:b", **kw), attr)
        assert taken == value and type(taken) is type(value), (kw, taken)


async def test_workers_start_with_warnings_as_errors() -> None:
    """Importing ipcbus must not import ipcbus.worker: running it with
    ``python -m`` then warned (RuntimeWarning, found in sys.modules) at every
    worker start, and under PYTHONWARNINGS=error no worker started."""
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env(PYTHONWARNINGS="error")) as pool:
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
    with pytest.raises(ipcbus.BusClosed, match="not started"):
        _ = WorkerPool("a:b").bus


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_interpreter_that_cannot_run_is_a_worker_start_error(transport: str, tmp_path: Path) -> None:
    queues = queue_ids()
    with pytest.raises(WorkerStartError, match=r"cannot run.*nonexistent"):
        python = str(tmp_path / "nonexistent")
        async with WorkerPool("pool_workers:setup", python=python, transport=transport):
            pass
    assert queue_ids() <= queues and pool_dirs() == []


@pytest.mark.single_loop
async def test_a_restart_whose_interpreter_is_gone_leaves_no_process_to_wait_for(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o700)
    pool = WorkerPool(
        "pool_workers:setup", workers=1, python=str(python), env=worker_env(), restart_backoff=0.01
    )
    async with pool:
        (pid,) = pool.pids
        python.unlink()  # the interpreter goes away
        os.kill(pid, signal.SIGKILL)
        w0 = pool._workers[0]
        await wait_until(lambda: w0.crashes == 1 and "cannot run" in (w0.last_error or ""))
        (w,) = pool.stats()["workers"]
        assert w["pid"] is None  # nothing runs: closing has nothing to wait for
    assert [w["state"] for w in pool.stats()["workers"]] == ["stopped"]


@pytest.mark.single_loop
async def test_sync_setup_function_works() -> None:
    async with WorkerPool("pool_workers:setup_sync", workers=1, env=worker_env()) as pool:
        assert len(pool.pids) == 1


# -- shutdown and parent death ---------------------------------------------------------------


@pytest.mark.single_loop
async def test_shutdown_drains_in_flight_requests() -> None:
    req: asyncio.Future[ipcbus.Msg]
    async with WorkerPool("pool_workers:setup", workers=2, env=worker_env()) as pool:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        req = asyncio.ensure_future(pool.bus.request("slow.sleep", 0.3, timeout=30))
        await started.next(timeout=10)  # the request is inside the handler
        assert not req.done()
        pids = pool.pids
    # leaving the pool waited for the handler instead of killing it mid-request
    assert req.done()
    assert (await req).decode(str) == "slept"
    assert all(gone(p) for p in pids)


@pytest.mark.single_loop
async def test_closing_while_a_request_runs_too_long_fails_it_with_bus_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pool waits (here 0.3 s) for requests in flight, then closes: a
    # request still running fails with BusClosed, not WorkerCrashed.
    monkeypatch.setattr(pool_module, "_STOP_TIMEOUT", 0.3)
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env()) as pool:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        req = asyncio.ensure_future(pool.bus.request("slow.sleep", 30.0, timeout=None))
        await started.next(timeout=10)
    with pytest.raises(BusClosed, match="pool closed"):
        await req


@pytest.mark.single_loop
async def test_a_worker_that_does_not_exit_at_close_is_killed_and_said_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped (SIGSTOP) worker cannot exit: after the stop timeout (here
    0.3 s) the close kills it, and the log says so (it was silent)."""
    monkeypatch.setattr(pool_module, "_STOP_TIMEOUT", 0.3)
    async with WorkerPool("pool_workers:setup", workers=1, env=worker_env()) as pool:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)
    assert f"worker 0 (pid {pid}) did not exit within 0.3 s of the close" in caplog.text
    assert [w["state"] for w in pool.stats()["workers"]] == ["stopped"]
    assert gone(pid)


@pytest.mark.single_loop
async def test_the_links_of_stopped_workers_close_all_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each link's close flushes what is queued for up to 2 s: with the links
    of three stopped workers full, the pool's close took 2 s per worker, one
    after another, beyond the 5 s its docs promise."""
    monkeypatch.setattr(pool_module, "_STOP_TIMEOUT", 0.3)
    closing: set[int] = set()  # the workers whose link is closing now
    most = 0
    async with WorkerPool("pool_workers:setup", workers=3, env=worker_env()) as pool:
        for pid in pool.pids:
            os.kill(pid, signal.SIGSTOP)
        await pool.bus.publish("release", b"x" * (3 << 20))  # every worker's: queued on each link
        for w in pool._workers:
            assert w.link is not None and w.link.link.pending_out > 0
            real = w.link.link.aclose

            async def counted(real: Callable[[], Awaitable[None]] = real, i: int = w.index) -> None:
                nonlocal most
                closing.add(i)
                most = max(most, len(closing))
                try:
                    await real()
                finally:
                    closing.discard(i)

            w.link.link.aclose = counted  # type: ignore[method-assign]
    assert most == 3, f"at most {most} of the 3 links closing at once"
    assert [w["state"] for w in pool.stats()["workers"]] == ["stopped"] * 3


PARENT = textwrap.dedent(
    """
    import asyncio, json, sys
    import ipcbus

    async def main():
        async with ipcbus.WorkerPool("pool_workers:setup", workers=2, transport=sys.argv[1]) as pool:
            print(json.dumps(pool.pids), flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def start_parent(script: str, transport: str, **pipes: Any) -> asyncio.subprocess.Process:
    """Run ``script`` (a pool's parent; ``transport`` is its argv[1]) in the tests' environment."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, transport, stdin=asyncio.subprocess.DEVNULL, env=worker_env(), **pipes
    )


async def killing_the_parent(
    script: str,
    transport: str,
    read_pids: Callable[[asyncio.StreamReader], Awaitable[list[int]]],
    group_sigterm: bool = False,
) -> None:
    """Run ``script`` (a pool's parent) with ``transport``, read its workers' pids
    with ``read_pids``, SIGKILL it and check that its workers exit by themselves
    (end of stream on their link) leaving no queue, records folder or process.

    With ``group_sigterm``, SIGTERM goes to the parent's whole process group
    instead (as a service manager or ``timeout`` sends it): parent and
    workers get it at once, and the parent dies of it."""
    queues = queue_ids()
    proc = await start_parent(script, transport, stdout=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        with anyio.fail_after(20):
            pids = await read_pids(proc.stdout)
        assert len(pids) == 2
        if group_sigterm:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.kill()  # SIGKILL: the parent gets no chance to stop its workers
        await proc.wait()
        for pid in pids:
            await wait_exited(pid)
        assert all(gone(p) for p in pids)
        # SysV queues outlive processes: each worker removed both of its own.
        assert queue_ids() <= queues
        # ... and their records: the last worker out removed the pool's folder.
        assert pool_dirs() == []
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_workers_exit_when_their_parent_dies(transport: str) -> None:
    async def pids_line(out: asyncio.StreamReader) -> list[int]:
        return list(json.loads(await out.readline()))

    await killing_the_parent(PARENT, transport, pids_line)


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_sigterm_to_the_parents_process_group_leaves_nothing_behind(transport: str) -> None:
    """Workers handle SIGTERM: they close their link, and remove the SysV queue
    their dead parent read (both processes dying at once left both queues)."""

    async def pids_line(out: asyncio.StreamReader) -> list[int]:
        return list(json.loads(await out.readline()))

    await killing_the_parent(PARENT, transport, pids_line, group_sigterm=True)


DRAINING_PARENT = textwrap.dedent(
    """
    import asyncio, json, signal, sys
    import ipcbus

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with ipcbus.WorkerPool("pool_workers:setup", workers=2, transport=sys.argv[1]) as pool:
            started = await pool.bus.subscribe("started")
            await pool.bus.flush()
            reqs = [
                asyncio.ensure_future(pool.bus.request("slow.sleep", 2.0, timeout=30))
                for _ in range(4)
            ]
            for _ in reqs:
                await started.next(timeout=20)
            print(json.dumps(pool.pids), flush=True)
            await stop.wait()  # SIGTERM: leave the block, and the pool drains
        done = await asyncio.gather(*reqs, return_exceptions=True)
        print(json.dumps([repr(r) if isinstance(r, BaseException) else "answered" for r in done]))

    asyncio.run(main())
    """
)


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_sigterm_to_the_whole_group_lets_the_pool_drain(transport: str) -> None:
    """A service manager stops a program by sending SIGTERM to all of its
    processes.  A parent that drains its pool on SIGTERM gets its requests
    answered: the workers finish the requests they took (they closed their
    link after 1 s, and half the requests failed with WorkerCrashed)."""
    queues = queue_ids()
    proc = await start_parent(
        DRAINING_PARENT, transport, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        with anyio.fail_after(30):
            pids = json.loads(await proc.stdout.readline())
            os.killpg(proc.pid, signal.SIGTERM)
            results = json.loads(await proc.stdout.readline())
            assert await proc.wait() == 0
        assert results == ["answered"] * 4
        for pid in pids:
            await wait_exited(pid)
        assert queue_ids() <= queues and pool_dirs() == []
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_worker_given_sigterm_answers_what_it_took_and_is_restarted(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM to one worker (an operator recycling it): it stops taking
    requests, answers the one it has, exits with 143 and is restarted.  Over
    shm and SysV it waited a second more for its parent's death and was
    killed (the log said SIGKILL)."""
    async with WorkerPool(
        "pool_workers:setup", workers=1, transport=transport, env=worker_env(), restart_backoff=0.01
    ) as pool:
        (pid,) = pool.pids
        req = await a_request_under_way(pool, 1.5)
        os.kill(pid, signal.SIGTERM)
        with anyio.fail_after(20):
            assert (await req).decode() == "slept"  # answered, not WorkerCrashed
        await wait_until(lambda: pool.stats()["workers"][0]["crashes"] == 1)
        await pool.wait_ready(timeout=15)
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
    assert f"worker 0 (pid {pid}) exited with code 143" in caplog.text, caplog.text
    assert "SIGKILL" not in caplog.text


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_requests_wait_for_a_lone_worker_given_sigterm(transport: str) -> None:
    """While a lone worker given SIGTERM drains (its services withdrawn) and
    is restarted, a request for its services waits for the new worker
    instead of failing with NoResponders."""
    async with WorkerPool(
        "pool_workers:setup", workers=1, transport=transport, env=worker_env(), restart_backoff=0.01
    ) as pool:
        (pid,) = pool.pids
        req = await a_request_under_way(pool, 1.0)  # holds the drain for a second
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: pool.stats()["workers"][0]["state"] != "ready")
        await pool.bus.flush()  # its services' withdrawal, sent before the pong, has arrived
        assert not pool.bus.node.has_interest("pid")
        new = (await pool.bus.request("pid", timeout=20)).decode()
        assert new != pid and pool.pids == [new]
        assert (await req).decode() == "slept"


HANGING_PARENT = textwrap.dedent(
    """
    import asyncio, sys
    import ipcbus

    async def main():
        async with ipcbus.WorkerPool(
            "pool_workers:setup_says_pid_then_hangs", workers=2, transport=sys.argv[1]
        ):
            pass

    asyncio.run(main())
    """
)


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_workers_still_in_setup_exit_when_their_parent_dies(transport: str) -> None:
    """A worker whose setup never returns is not orphaned by its parent's death."""

    async def pids_of_workers_in_setup(out: asyncio.StreamReader) -> list[int]:
        return [int(await out.readline()) for _ in range(2)]  # each says it, then hangs

    await killing_the_parent(HANGING_PARENT, transport, pids_of_workers_in_setup)


BLOCKED_PARENT = textwrap.dedent(
    """
    import asyncio
    import ipcbus

    async def pool(transport):
        async with ipcbus.WorkerPool(
            "pool_workers:setup_says_pid_then_blocks", workers=1, transport=transport
        ):
            pass

    async def main():
        await asyncio.gather(*(pool(t) for t in ("pipe", "shm", "sysv")))

    asyncio.run(main())
    """
)


@pytest.mark.single_loop
async def test_workers_whose_loop_is_blocked_exit_after_their_parent_dies() -> None:
    """A worker that cannot see its link end (plugin code blocks its event
    loop) is ended by its watchdog ORPHAN_GRACE s after the parent's death,
    and removes the kernel objects made for it: no orphan, no leak."""
    queues = queue_ids()
    pipe = asyncio.subprocess.PIPE
    proc = await start_parent(BLOCKED_PARENT, "", stdout=pipe, stderr=pipe)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with anyio.fail_after(20):
            pids = [int(await proc.stdout.readline()) for _ in range(3)]  # each says it, then blocks
        assert pool_dirs() != []  # the shm and sysv objects are recorded
        proc.kill()
        await proc.wait()
        with anyio.fail_after(ORPHAN_GRACE + 10):
            for pid in pids:
                await wait_exited(pid)
            err = (await proc.stderr.read()).decode()
        assert err.count("died (its setup or a handler blocks the event loop or ignores cancellation)") == 3
        assert queue_ids() <= queues
        assert pool_dirs() == [], ([(p, sorted(p.rglob("*"))) for p in pool_dirs()], err)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", ["shm", "sysv"])
async def test_setup_failure_is_reported_over_the_kernel_object_transports(transport: str) -> None:
    with pytest.raises(WorkerStartError, match="setup exploded on purpose"):
        async with WorkerPool(
            "pool_workers:setup_raises", workers=1, transport=transport, env=worker_env()
        ):
            pass
    assert pool_dirs() == []  # the failed start left no records folder behind


_FAILING_POOL = """
import asyncio, sys
import ipcbus
async def main():
    try:
        async with ipcbus.WorkerPool("pool_workers:setup_raises", workers=4, transport=sys.argv[1]):
            pass
    except ipcbus.WorkerStartError as exc:
        print("start failed:", exc, file=sys.stderr)
asyncio.run(main())
"""


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failed_start_prints_one_error_not_the_siblings_tracebacks(transport: str) -> None:
    """Workers still attaching when a sibling's failure closes the pool exit
    quietly: the kernel objects they were to attach are gone on purpose."""
    proc = await start_parent(
        _FAILING_POOL, transport, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    with anyio.fail_after(30):  # stderr ends once every worker has exited too
        _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 0, text
    assert "start failed:" in text and "setup exploded on purpose" in text, text
    assert "Traceback" not in text, text
    assert pool_dirs() == []


# -- a pool killed while a worker starts: its objects are recorded and reclaimed --

_KILLED_PARENT = """
import asyncio, sys
import ipcbus

async def main():
    # sys.argv[2] stands in for the interpreter: it never opens the link.
    async with ipcbus.WorkerPool("pool_workers:setup", workers=1, transport=sys.argv[1],
                                 python=sys.argv[2]):
        pass

asyncio.run(main())
"""

# What a pool records for a worker that has not opened its link yet.
_RECORDED = {
    "shm": ["fifo", "fifo", "posix_sem", "posix_sem", "posix_sem", "posix_sem", "shm"],
    "sysv": ["msq", "msq"],
}


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", sorted(_RECORDED))
@pytest.mark.parametrize("reclaimer", ["next pool", "gc --all"])
async def test_objects_of_a_pool_killed_before_its_worker_attached_are_reclaimed(
    tmp_path: Path, transport: str, reclaimer: str
) -> None:
    pidfile = tmp_path / "worker.pid"
    fake = tmp_path / "never-attaches"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    fake.chmod(0o700)
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_PARENT, transport, str(fake), env=worker_env()
    )
    worker_pid = 0
    try:
        await wait_until(lambda: pidfile.exists() and bool(pidfile.read_text().strip()), 20)
        worker_pid = int(pidfile.read_text())
        parent.kill()  # SIGKILL: the objects made for the worker stay behind
        await parent.wait()
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if worker_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGKILL)
    (folder,) = [d for d in pool_dirs() if d.name.startswith(f"_pool-{parent.pid}-")]
    recs = [rec for _, rec in list_records(folder) if rec is not None]
    assert sorted(rec.kind for rec in recs) == _RECORDED[transport]
    sysv = {(rec.kind, int(rec.ident)) for rec in recs if rec.kind in ("shm", "msq")}
    tables = {"shm": "shm", "msq": "msg"}
    assert all(ident in sysv_table(tables[kind]) for kind, ident in sysv)
    if reclaimer == "next pool":
        async with WorkerPool(
            "pool_workers:setup", workers=1, transport=transport, env=worker_env()
        ) as pool:
            assert (await pool.bus.request("echo", b"y", timeout=10)).data == b"y"
    else:
        gc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ipcbus", "gc", "--all", stdout=asyncio.subprocess.PIPE
        )
        out = (await gc.communicate())[0].decode()
        assert gc.returncode == 0 and f"removed {len(recs)} object(s)" in out, out
    assert pool_dirs() == []
    assert not any(ident in sysv_table(tables[kind]) for kind, ident in sysv)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("sem.ipcbus.")]


@pytest.mark.single_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_closing_while_a_restarted_worker_starts_does_not_wait_for_it(
    transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker being restarted has no link yet to be told the pool closes on:
    it is sent SIGTERM instead of being waited for (the stop timeout, then SIGKILL)."""
    monkeypatch.setattr(pool_module, "_STOP_TIMEOUT", 60.0)  # waiting it out would fail the bound below
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(60)  # an interpreter slow to start\n")
    pool = WorkerPool(
        "pool_workers:setup", workers=1, transport=transport, env=worker_env(), restart_backoff=0.01
    )
    await pool.__aenter__()
    try:
        (pid,) = pool.pids
        env = worker_env()
        pool.env = {**env, "PYTHONPATH": os.pathsep.join([str(slow), env["PYTHONPATH"]])}
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: pool.stats()["workers"][0]["pid"] not in (pid, None))
        restarted = pool.stats()["workers"][0]["pid"]
        assert pool.stats()["workers"][0]["state"] != "ready"  # still starting
    finally:
        with anyio.fail_after(30):  # far under the 60 s start and the 60 s wait for a worker with no link
            await pool.__aexit__(None, None, None)
    assert gone(restarted)


async def test_wait_ready_on_a_pool_not_started_raises_at_once() -> None:
    pool = WorkerPool("pool_workers:setup", workers=1, env=worker_env())
    with pytest.raises(BusClosed, match=r"not started; use `async with WorkerPool"):
        await pool.wait_ready(timeout=None)  # it waited out its 30 s timeout
