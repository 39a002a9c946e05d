"""Busy-polling while replies are due (ipcbus.spin): the window, its bad values, and that it runs.

Whether spinning lowers latency is a benchmark question (``make bench``,
docs/benchmarks.md); these tests check what it does: which window each
entry point resolves, that every bad value is refused with a message naming
it, that a kicked loop really polls (it burns CPU instead of sleeping) and
stops when the window passes, and that pool workers get the parent's window.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Awaitable
from typing import TypeVar

import anyio
import pytest
from test_cli import run
from test_pool import REPO, worker_env

import ipcbus
from ipcbus import DEFAULT_SPIN_US, SPIN_ENV, Spinner, WorkerPool, spin_window

T = TypeVar("T")

two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="spinning is off on a single usable CPU"
)


_names = itertools.count()


@pytest.fixture
def bus_name() -> str:
    """A bus name no other test uses."""
    return f"spin{os.getpid()}-{next(_names)}"


@pytest.fixture(autouse=True)
def _no_spin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPIN_ENV, raising=False)


@two_cpus
def test_window_from_argument_environment_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert spin_window() == DEFAULT_SPIN_US
    monkeypatch.setenv(SPIN_ENV, "50")
    assert spin_window() == 50.0
    assert spin_window(10) == 10.0  # an argument beats the environment
    assert spin_window(0) == 0.0
    monkeypatch.setenv(SPIN_ENV, "0")
    assert spin_window() == 0.0
    monkeypatch.setenv(SPIN_ENV, "  ")
    assert spin_window() == DEFAULT_SPIN_US


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), 2e6])
def test_out_of_range_window_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"spin_us must be between 0 \(off\) and 1000000"):
        spin_window(bad)


@pytest.mark.parametrize("bad", ["200", True, None.__class__])
def test_window_of_the_wrong_type_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="spin_us must be a number of microseconds"):
        spin_window(bad)  # type: ignore[arg-type]


def test_bad_environment_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SPIN_ENV, "fast")
    with pytest.raises(ValueError, match=r"IPCBUS_SPIN_US='fast' is not a number of microseconds"):
        spin_window()
    monkeypatch.setenv(SPIN_ENV, "-5")
    with pytest.raises(ValueError, match=r"\$IPCBUS_SPIN_US must be between 0"):
        spin_window()


def test_spinning_is_off_on_one_cpu() -> None:
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from ipcbus import spin_window; print(spin_window(500))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert out.strip() == "0.0"


async def cpu_during(aw: Awaitable[T]) -> tuple[T, float]:
    """Await ``aw``; return its result and the CPU seconds this process used meanwhile."""
    c0 = time.process_time()
    result = await aw
    return result, time.process_time() - c0


async def assert_stopped(spinner: Spinner, busy: float, why: str) -> None:
    """The spinner stops within a few loop turns, then the loop costs (nearly) no CPU."""
    for _ in range(100):
        if not spinner.active:
            break
        await asyncio.sleep(0)
    assert not spinner.active, why
    _, idle = await cpu_during(asyncio.sleep(0.05))
    # Polling would cost most of the 50 ms; sleeping costs a fraction of a ms.
    # (``busy`` is small itself when the spinner gave way to another process.)
    assert idle < max(busy / 2, 0.003), f"{why}, yet {idle * 1e3:.2f} ms of CPU in 50 ms idle"


async def test_a_kicked_loop_polls_until_closed() -> None:
    spinner = Spinner(asyncio.get_running_loop(), 200_000)  # 200 ms
    spinner.kick()
    assert spinner.active
    _, spun = await cpu_during(asyncio.sleep(0.05))
    # Sleeping 50 ms costs next to no CPU; polling costs most of it, unless
    # another process needed this CPU (then the spinner rightly gave way).
    assert spun > 0.005 or spinner.gave_way, f"the loop used {spun * 1e3:.2f} ms of CPU in 50 ms: it slept"
    spinner.close()
    await assert_stopped(spinner, spun, "closed")


async def test_kicks_after_close_do_not_poll_on() -> None:
    """A kick only counts while polling (the next turn extends the window);
    a closed spinner's window is gone, so kicks that come after (a request
    in flight as the node closes) do not keep the loop polling."""
    spinner = Spinner(asyncio.get_running_loop(), 200_000)  # 200 ms
    spinner.kick()
    await asyncio.sleep(0)
    spinner.close()
    spinner.kick()  # seen on the next turn
    await assert_stopped(spinner, 0.05, "closed, then kicked")
    spinner.kick()  # after it stopped
    await assert_stopped(spinner, 0.05, "kicked once closed")


async def test_the_window_closes_by_itself() -> None:
    spinner = Spinner(asyncio.get_running_loop(), 2_000)  # 2 ms
    spinner.kick()
    spinner.kick()  # a second kick extends the window, it adds no second poller
    await asyncio.sleep(0.05)
    assert not spinner.active


async def test_linger_polls_for_the_window_although_nothing_is_due() -> None:
    spinner = Spinner(asyncio.get_running_loop(), 200_000, waiting=lambda: False)
    spinner.kick()  # nothing is due: a kick alone stops at the next turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not spinner.active
    spinner.linger()  # a request was answered: poll for the next one anyway
    _, spun = await cpu_during(asyncio.sleep(0.05))
    assert spinner.active or spinner.gave_way
    assert spun > 0.005 or spinner.gave_way, f"the loop used {spun * 1e3:.2f} ms of CPU in 50 ms: it slept"
    spinner.close()
    await assert_stopped(spinner, spun, "closed")


async def test_answered_polls_for_a_quarter_of_the_window_although_nothing_is_due() -> None:
    spinner = Spinner(asyncio.get_running_loop(), 400_000, waiting=lambda: False)
    assert spinner.answer_window_us == 100_000
    spinner.answered()  # a request was served: poll for the next one of its run
    _, spun = await cpu_during(asyncio.sleep(0.05))
    assert spinner.active or spinner.gave_way
    assert spun > 0.005 or spinner.gave_way, f"the loop used {spun * 1e3:.2f} ms of CPU in 50 ms: it slept"
    # 100 ms after the request it stops by itself (the 400 ms window does not apply).
    with anyio.fail_after(5):
        while spinner.active:
            await asyncio.sleep(0.01)
    await assert_stopped(spinner, spun, "the answer window passed")


_HOGGED = """
import asyncio, os, subprocess, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # same CPU, always runnable
try:
    async def main():
        from ipcbus import Spinner
        spinner = Spinner(asyncio.get_running_loop(), 100_000)
        for _ in range(40):
            spinner.kick()
            await asyncio.sleep(0.005)
        print(spinner.backoffs, flush=True)
    asyncio.run(main())
finally:
    hog.kill()
    hog.wait()
"""


def test_polling_gives_way_to_a_busy_process_on_its_cpu() -> None:
    # Every yield hands the CPU to the hog for a whole time slice: the spinner
    # must notice, stop polling and ignore kicks for a while (backoffs > 0).
    out = subprocess.run(
        [sys.executable, "-c", _HOGGED], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    backoffs = out.stdout.strip()
    assert int(backoffs) > 0, "kept polling while another process needed the CPU"


@two_cpus
async def test_pool_workers_get_the_parents_window() -> None:
    async with WorkerPool("pool_workers:setup", workers=1, spin_us=75, env=worker_env()) as pool:
        assert pool.bus.stats()["spin_us"] == 75.0
        assert (await pool.bus.request("spin", timeout=10)).decode(float) == 75.0
    async with WorkerPool("pool_workers:setup", workers=1, spin_us=0, env=worker_env()) as pool:
        assert pool.bus.stats()["spin_us"] == 0.0
        assert (await pool.bus.request("spin", timeout=10)).decode(float) == 0.0


@two_cpus
async def test_hub_and_client_windows_and_traffic_with_spinning(bus_name: str) -> None:
    async with ipcbus.Hub(bus_name, transports=("fifo",), spin_us=0) as hub:
        assert hub.bus.stats()["spin_us"] == 0.0
        async with ipcbus.connect(bus_name, spin_us=300) as a, ipcbus.connect(bus_name) as b:
            assert a.stats()["spin_us"] == 300.0
            assert b.stats()["spin_us"] == DEFAULT_SPIN_US

            def double(x: int) -> int:
                return x * 2

            await b.serve("double", double)
            await a.flush()
            for i in range(200):  # sequential requests: both clients spin between them
                assert (await a.request("double", i, timeout=10)).decode(int) == 2 * i


def test_bad_window_is_refused_before_anything_starts(bus_name: str) -> None:
    # No hub serves bus_name: the bad value is reported, not BusNotFound.
    with pytest.raises(ValueError, match="spin_us must be between"):
        ipcbus.connect(bus_name, spin_us=-1)
    with pytest.raises(ValueError, match="spin_us must be between"):
        WorkerPool("pool_workers:setup", spin_us=float("nan"))
    with pytest.raises(TypeError, match="spin_us must be a number"):
        ipcbus.Hub(bus_name, spin_us="fast")  # type: ignore[arg-type]


async def test_cli_hub_refuses_a_bad_window(bus_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _out, err = await run("hub", bus_name, "--spin-us", "-3")
    assert code == 2 and "--spin-us" in err
    monkeypatch.setenv(SPIN_ENV, "abc")  # inherited by the command
    code, _out, err = await run("hub", bus_name)
    assert code == 1 and "IPCBUS_SPIN_US='abc'" in err


@two_cpus
async def test_a_node_polls_only_while_a_reply_is_due() -> None:
    async with WorkerPool("pool_workers:setup", workers=1, spin_us=1_000_000, env=worker_env()) as pool:
        spinner = pool.bus.node.spinner
        assert spinner is not None
        # The worker takes 200 ms to answer: the requester polls all that time.
        rep, waited = await cpu_during(pool.bus.request("slow.sleep", 0.2, timeout=10))
        assert rep.decode(str) == "slept"
        assert waited > 0.02 or spinner.gave_way, (
            f"{waited * 1e3:.1f} ms of CPU while a reply was due: it slept"
        )
        # The 1 s window is still open, but nothing is due any more.
        await assert_stopped(spinner, waited, "nothing is due")


@two_cpus
async def test_a_hub_stops_counting_a_hung_request_as_due(bus_name: str) -> None:
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",)) as hub,
        ipcbus.connect(bus_name) as requester,
        ipcbus.connect(bus_name) as responder,
    ):
        release = asyncio.Event()

        async def hang(m: ipcbus.Msg) -> bytes:
            await release.wait()  # never answers in time
            return b""

        await responder.serve("hang", hang)
        await requester.flush()
        waiting = asyncio.ensure_future(requester.request("hang", timeout=60))
        await requester.flush()
        node = hub.bus.node
        # The hub tracks the request while its requester waits, but after a
        # while (10 ms) it no longer polls for its reply.
        assert node.stats()["links"] and node._reply_routes
        await asyncio.sleep(0.05)
        assert node._reply_routes and not node._awaiting_replies()
        waiting.cancel()  # the requester gives up: the hub is told, and forgets it
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await requester.flush()
        assert not node._reply_routes
        release.set()


@two_cpus
async def test_a_subscriber_over_sysv_polls_after_a_message_and_its_link_takes_the_queue(
    bus_name: str,
) -> None:
    """Frames over a SysV link make the node linger, and while it polls, the link
    receives without its thread; with spinning off, the thread keeps the queue."""
    async with (
        ipcbus.Hub(bus_name, transports=("sysv",)) as hub,
        ipcbus.connect(bus_name, transport="sysv", spin_us=100_000) as sub_bus,
        ipcbus.connect(bus_name, transport="sysv", spin_us=0) as plain,
    ):
        subs = [await b.subscribe("news") for b in (sub_bus, plain)]
        await sub_bus.flush()
        await plain.flush()
        for i in range(3):
            await hub.bus.publish("news", b"%d" % i)
            for s in subs:
                assert (await s.next(timeout=10)).data == b"%d" % i
        spinner = sub_bus.node.spinner
        assert spinner is not None and plain.node.spinner is None
        assert spinner.active or spinner.gave_way  # it lingers after a plain message
        link = sub_bus.node.links[0].link
        assert link.keep_polling is not None
        assert link._turn.given >= 1  # type: ignore[attr-defined]
        assert plain.node.links[0].link.keep_polling is None
        assert plain.node.links[0].link._turn.given == 0  # type: ignore[attr-defined]
        # Nothing more comes: the 100 ms window passes, the thread gets the queue back.
        with anyio.fail_after(5):
            while spinner.active:
                await asyncio.sleep(0.005)
            while link._turn.loop_has:  # type: ignore[attr-defined]
                await asyncio.sleep(0)  # the link's next poll gives it back
        await hub.bus.publish("news", b"again")  # and the thread receives it
        assert (await subs[0].next(timeout=10)).data == b"again"


@two_cpus
async def test_a_responder_polls_after_a_request_but_not_after_a_plain_message(bus_name: str) -> None:
    """Over pipe-like links (FIFOs) only serving a request makes a node poll;
    a subscriber that got a message sleeps at once."""
    async with (
        ipcbus.Hub(bus_name, transports=("fifo",), spin_us=0) as hub,
        ipcbus.connect(bus_name, spin_us=0) as requester,
        ipcbus.connect(bus_name, spin_us=400_000) as responder,
        ipcbus.connect(bus_name, spin_us=400_000) as listener,
    ):
        await responder.serve("echo", lambda m: m.data)
        sub = await listener.subscribe("news")
        await responder.flush()
        await listener.flush()
        await hub.bus.flush()
        rspin, lspin = responder.node.spinner, listener.node.spinner
        assert rspin is not None and lspin is not None
        with anyio.fail_after(5):  # what connecting and subscribing set going has ended
            while rspin.active or lspin.active:
                await asyncio.sleep(0.01)
        assert (await requester.request("echo", b"x", timeout=10)).data == b"x"
        assert rspin.active or rspin.gave_way  # the next request of a run costs no wake-up
        await hub.bus.publish("news", b"hello")
        assert (await sub.next(timeout=10)).data == b"hello"
        assert not lspin.active
