"""Many tasks waiting for room on one link (``wait_writable``): a storm of requests.

Each waiter must be woken once its level is reached, not at every write:
with thousands waiting, waking them all on each flush (each then looking
again and waiting again), or looking for each one in a list as it leaves,
made a storm of 10,000 8 KiB requests through a pipe take 22 s and one of
20,000 never finish.  The counts below are the profiler's, never times.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest

from ipcbus.errors import ConnectionClosed
from ipcbus.testing import _fill
from ipcbus.transports.base import WriteWaiters

try:
    from test_pipe_transport import _memory as memory
    from test_pipe_transport import _pipes as pipes
    from test_pool_sysv import pair as sysv_pair
    from test_shm import pair as shm_pair
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.test_pipe_transport import _memory as memory
    from tests.test_pipe_transport import _pipes as pipes
    from tests.test_pool_sysv import pair as sysv_pair
    from tests.test_shm import pair as shm_pair


PAIRS: dict[str, Callable[[], AbstractAsyncContextManager[tuple[Any, Any]]]] = {
    "pipe": pipes,
    "memory": memory,
    "shm": shm_pair,
    "sysv": sysv_pair,
}
WAITERS = 300


@pytest.mark.single_loop
@pytest.mark.parametrize("kind", list(PAIRS))
async def test_a_waiter_is_woken_once_its_level_is_reached_not_at_every_write(kind: str) -> None:
    async with PAIRS[kind]() as (a, b):
        sent = await _fill(a, 64 * 1024)
        returned = 0

        async def waiter(threshold: int | None) -> None:
            nonlocal returned
            await a.wait_writable(threshold)
            returned += 1

        profile = cProfile.Profile()
        async with anyio.create_task_group() as tg:
            for i in range(WAITERS):
                tg.start_soon(waiter, None if i % 2 else 0)
            await anyio.wait_all_tasks_blocked()
            profile.enable()
            for _ in range(sent):
                await b.recv()
        profile.disable()
        assert returned == WAITERS
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    # A coroutine's every resumption counts as a call: each waiter resumes once.
    resumed = sum(s[1] for (_file, _line, name), s in stats.items() if name == "wait_writable")
    assert resumed == WAITERS, f"{WAITERS} waiters resumed {resumed} times while the reader caught up"


async def test_write_waiters_wake_by_level() -> None:
    loop = asyncio.get_running_loop()
    waiters = WriteWaiters()
    assert not waiters and waiters.lowest() is None
    futs = {level: [loop.create_future() for _ in range(3)] for level in (0, 100, 1000)}
    for level, fs in futs.items():
        for f in fs:
            waiters.add(level, f)
    assert waiters and len(waiters) == 9 and waiters.lowest() == 0
    waiters.wake(500)  # only the level 1000 is reached
    assert all(f.done() for f in futs[1000])
    assert not any(f.done() for f in futs[0] + futs[100])
    assert waiters.lowest() == 0 and len(waiters) == 6
    waiters.wake(100)
    assert all(f.done() for f in futs[100]) and not any(f.done() for f in futs[0])
    futs[0][0].cancel()  # a waiter that gave up is skipped, not woken
    waiters.release(ConnectionClosed("link is closed"))
    assert not waiters and waiters.lowest() is None
    assert futs[0][0].cancelled()
    for f in futs[0][1:]:
        with pytest.raises(ConnectionClosed):
            f.result()
    late = loop.create_future()
    waiters.add(5, late)
    waiters.release()  # no error: each looks at the link again
    assert late.result() is None


async def test_write_waiters_that_gave_up_do_not_pile_up() -> None:
    # A level never reached (a stuck reader) while callers keep giving up
    # (publish under a timeout): what the waiters hold stays bounded.
    loop = asyncio.get_running_loop()
    waiters = WriteWaiters()
    live = [loop.create_future() for _ in range(10)]
    for f in live:
        waiters.add(0, f)
    most = 0
    for _ in range(100_000):
        f = loop.create_future()
        waiters.add(0, f)
        f.cancel()
        most = max(most, len(waiters))
    assert most <= 128, f"{most} waiters held for 10 live ones"
    waiters.wake(0)
    assert all(f.done() for f in live)
