"""SysV pair links and WorkerPool(transport="sysv"): conformance, real processes, ipcrm, bad input.

Worker crashes, a dead parent and the records of killed pools are tested for
every pool transport in test_pool.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import zlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest
import sysv_ipc

import ipcbus
from ipcbus import WorkerCrashed, WorkerPool
from ipcbus.errors import ConnectionClosed, PermissionRefused, ProtocolError
from ipcbus.gc import sysv_table
from ipcbus.testing import check_link
from ipcbus.transports.base import Link
from ipcbus.transports.sysv import MSG_HEADER, PAIR_DATA_TYPE, SysvPairLink, _Handoff, _LoopTurn

try:
    from pairs import created_pair
    from test_pool import pool_dirs, queue_ids, worker_env
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.pairs import created_pair
    from tests.test_pool import pool_dirs, queue_ids, worker_env

pytestmark = pytest.mark.single_loop


def pair(**create: Any) -> AbstractAsyncContextManager[tuple[SysvPairLink, SysvPairLink]]:
    """A creator and an attacher in this process."""
    return created_pair(
        lambda: SysvPairLink.create(None, **create),
        lambda params: SysvPairLink.attach(params, peer_pid=os.getpid()),
        lambda a: a.start(os.getpid()),
    )


# -- the link ---------------------------------------------------------------------


async def test_check_link() -> None:
    """The Link contract, fragments (frames above msgmax) and backpressure included."""
    await check_link(pair)


async def test_both_queues_are_removed_when_both_sides_close() -> None:
    async with pair() as (a, b):
        ids = {a.info.objects["queue"], a.info.objects["peer_queue"]}
        assert ids <= queue_ids()
        await a.send(b"hello")
        assert await b.recv() == b"hello"
    assert not ids & queue_ids()


async def test_a_creator_closed_before_start_removes_both_queues() -> None:
    a, params = SysvPairLink.create(None)
    ids = {int(params["down"]), int(params["up"])}
    assert ids <= queue_ids()
    await a.aclose()
    assert not ids & queue_ids()
    with pytest.raises(ConnectionClosed, match="gone"):
        await SysvPairLink.attach(params, peer_pid=os.getpid())


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda p: p.pop("up_key"), ProtocolError, "malformed SysV pair-link parameters"),
        (lambda p: p.update(msg_size="lots"), ProtocolError, "malformed"),
        (lambda p: p.update(msg_size=20), ProtocolError, "message size 20"),
        (lambda p: p.update(down=int(p["down"]) + 1), ConnectionClosed, "not the announced"),
        # key 0 is IPC_PRIVATE (opening it would create a queue); 2**40 would be cut
        (lambda p: p.update(down_key=0), ProtocolError, "down_key 0x0 is not the key of a queue"),
        (lambda p: p.update(up_key=1 << 40), ProtocolError, "up_key 0x10000000000 is not"),
    ],
)
async def test_bad_parameters_are_refused(change, error, match) -> None:  # type: ignore[no-untyped-def]
    a, params = SysvPairLink.create(None)
    try:
        bad = dict(params)
        change(bad)
        with pytest.raises(error, match=match):
            await SysvPairLink.attach(bad, peer_pid=os.getpid())
    finally:
        await a.aclose()


@pytest.mark.parametrize("peer_pid", [0, -1, 1 << 40, True])
async def test_a_bad_peer_pid_is_refused_before_anything_starts(peer_pid: int) -> None:
    a, params = SysvPairLink.create(None)
    try:
        with pytest.raises(ValueError, match="peer_pid must be"):
            await SysvPairLink.attach(params, peer_pid=peer_pid)
        with pytest.raises(ValueError, match="peer_pid must be"):
            a.start(peer_pid)
    finally:
        await a.aclose()


async def test_a_bad_max_frame_is_refused_before_any_queue_is_made() -> None:
    before = queue_ids()
    with pytest.raises(ValueError, match="max_frame must be between 1"):
        SysvPairLink.create(None, max_frame=0)
    assert queue_ids() == before
    a, params = SysvPairLink.create(None)
    try:
        with pytest.raises(ValueError, match="max_frame must be between 1"):
            await SysvPairLink.attach(params, peer_pid=os.getpid(), max_frame=0)
    finally:
        await a.aclose()


async def test_closing_frees_a_sender_thread_stuck_on_a_peer_that_stopped_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The peer's buffer fills (it never calls recv), it stops receiving, its
    # queue fills, and our sender thread blocks in msgsnd.  Closing must free
    # that thread (by removing the queue we send on), not wait for it on the
    # event loop and leave it behind.
    async with pair(queue_bytes=None) as (a, b):
        frame = b"x" * 4000
        for _ in range(2000):  # 8 MB, more than b buffers before it pauses
            a.send_nowait(frame)
        with anyio.fail_after(20):
            while a._tx is None or not a._tx.blocked:
                await asyncio.sleep(0.01)
        tx = a._tx
        await a.aclose()
        assert not tx.is_alive()
        assert "still blocked" not in caplog.text
        with pytest.raises(ConnectionClosed):  # the peer hears of it
            with anyio.fail_after(20):
                while True:
                    await b.recv()


async def test_urgent_frames_to_a_full_queue_wait_in_order() -> None:
    """send_now writes at once while there is room, then queues behind the backlog."""
    async with pair(queue_bytes=None) as (a, b):  # the kernel's msgmnb: 16 KiB by default
        # 2 MB: more than the queue and the receiver's 1 MiB buffer hold, so the queue fills.
        frames = [i.to_bytes(4, "big") * 250 for i in range(2000)]  # 1000 B each
        for f in frames:
            a.send_now(f)
        assert a.pending_out > 0  # the queue filled: the rest waits in the sender thread
        got = [await b.recv() for _ in frames]
        assert got == frames
        await a.drain()
        assert a.pending_out == 0


async def test_queues_other_users_may_open_are_refused() -> None:
    a, params = SysvPairLink.create(None)
    try:
        q = sysv_ipc.MessageQueue(int(params["up_key"]))
        q.mode = 0o666  # as if someone widened it
        with pytest.raises(PermissionRefused, match="mode 0600"):
            await SysvPairLink.attach(params, peer_pid=os.getpid())
    finally:
        await a.aclose()


async def test_unknown_type_is_discarded_and_the_link_goes_on() -> None:
    async with pair() as (a, b):
        q = sysv_ipc.MessageQueue(_key_of(b))
        q.send(b"stray", False, 7)  # a reserved control type nobody uses
        q.send(b"stray", False, PAIR_DATA_TYPE + 5)  # above the data type: never received
        await a.send(b"after")
        assert await b.recv() == b"after"
        assert q.current_messages == 1  # the type above ours stays queued (harmless)
        q.receive(False, PAIR_DATA_TYPE + 5)


def _key_of(link: SysvPairLink) -> int:
    """The key of the queue ``link`` reads."""
    return int(sysv_table("msg")[link.info.objects["queue"]]["key"])


@pytest.mark.parametrize(
    "garbage, match",
    [
        (b"short", "shorter than the 16-byte header"),
        (MSG_HEADER.pack(1, 1, 0, 0, 1, 5, 1) + b"\0\0\0\1x", "sequence gap"),
        (MSG_HEADER.pack(1, 1, 0, 0, 9, 1, 1) + b"\0\0\0\1x", "claims sender address 9"),
        (MSG_HEADER.pack(1, 2, 0, 0, 1, 1, 0) + b"x", "continuation fragment without a first"),
    ],
)
async def test_malformed_messages_end_the_link_with_protocol_error(garbage: bytes, match: str) -> None:
    async with pair() as (a, b):
        await a.send(b"before")
        q = sysv_ipc.MessageQueue(_key_of(b))
        q.send(garbage, False, PAIR_DATA_TYPE)
        assert await b.recv() == b"before"  # what came first is delivered
        with pytest.raises(ProtocolError, match=match):
            await b.recv()


async def test_an_oversized_frame_is_refused_at_its_first_fragment() -> None:
    async with pair() as (a, b):
        b.max_frame = 100_000
        await a.send(os.urandom(300_000))
        with pytest.raises(ipcbus.FrameTooLarge):
            await b.recv()


# -- the pool ---------------------------------------------------------------------


async def test_sysv_pool_requests_every_size_to_every_worker() -> None:
    before = queue_ids()
    async with WorkerPool("pool_workers:setup", workers=2, transport="sysv", env=worker_env()) as pool:
        for size in (1, 64, 8000, 8192, 100_000, 3 << 20):  # whole messages and fragments
            data = os.urandom(size)
            rep = await pool.bus.request("echo", data, timeout=30)
            assert zlib.crc32(rep.data) == zlib.crc32(data) and len(rep.data) == size
        pids = {(await pool.bus.request("pid", timeout=5)).decode(int) for _ in range(8)}
        assert pids == set(pool.pids)
        links = pool.bus.stats()["links"]
        assert [lk["transport"] for lk in links] == ["sysv", "sysv"]
        assert len(queue_ids() - before) == 4  # two queues per worker
    assert queue_ids() <= before
    assert pool_dirs() == []


async def test_ipcrm_of_a_pool_queue_under_load_restarts_the_worker() -> None:
    async with WorkerPool(
        "pool_workers:setup", workers=1, transport="sysv", env=worker_env(), restart_backoff=0.01
    ) as pool:
        (link,) = pool.bus.stats()["links"]
        victim_pid = pool.pids[0]
        errors: list[BaseException] = []
        done = 0

        async def load() -> None:
            nonlocal done
            try:
                while True:
                    await pool.bus.request("echo", b"L" * 5000, timeout=10)
                    done += 1
            except (WorkerCrashed, ipcbus.NoResponders, ConnectionClosed) as exc:
                errors.append(exc)

        task = asyncio.create_task(load())
        with anyio.fail_after(10):
            while done < 50:
                await asyncio.sleep(0.01)
        proc = await asyncio.create_subprocess_exec("ipcrm", "-q", str(link["objects"]["queue"]))
        assert await proc.wait() == 0
        with anyio.fail_after(10):
            await task
        assert errors, "the request in flight must fail, not hang"
        await pool.wait_ready(timeout=20)
        assert pool.pids[0] != victim_pid
        assert (await pool.bus.request("echo", b"again", timeout=10)).data == b"again"


# -- the loop's turn at the queue (Link.keep_polling) -------------------------------


@contextlib.asynccontextmanager
async def polled_pair(
    polling: list[bool], **create: object
) -> AsyncIterator[tuple[SysvPairLink, SysvPairLink]]:
    """A pair whose loop "polls" while ``polling[0]`` (as a node's spinner says)."""
    async with pair(**create) as (a, b):
        a.keep_polling = b.keep_polling = lambda: polling[0]
        yield a, b


async def test_check_link_while_the_loop_takes_the_queue() -> None:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[tuple[Link, Link]]:
        async with polled_pair([True]) as (a, b):
            yield a, b

    await check_link(make)


async def test_the_loop_takes_the_queue_while_it_polls_and_gives_it_back() -> None:
    polling = [True]
    async with polled_pair(polling) as (a, b):
        turn = b._turn
        await a.send(b"first")
        assert await b.recv() == b"first"
        assert turn.loop_has and turn.given == 1  # the thread gave it with that batch
        # The thread now waits for its turn: these can only reach b through the loop.
        for i in range(50):
            a.send_now(b"%d" % i)
            assert await b.recv() == b"%d" % i
        assert turn.loop_has and turn.given == 1
        polling[0] = False  # the spinner stopped: after the grace, the thread again
        with anyio.fail_after(5):
            while turn.loop_has:
                await asyncio.sleep(0.001)
        await a.send(b"by the thread")
        assert await b.recv() == b"by the thread"
        assert turn.given == 2  # and it gave the queue to the loop again with that batch


async def test_frames_stay_in_order_while_the_queue_changes_hands() -> None:
    polling = [True]
    rnd = random.Random(4)
    async with polled_pair(polling) as (a, b):
        frames = [i.to_bytes(4, "big") * rnd.randint(1, 600) for i in range(4000)]
        got: list[bytes] = []

        async def read() -> None:
            while len(got) < len(frames):
                got.append(await b.recv())

        reader = asyncio.create_task(read())
        for i, f in enumerate(frames):
            (a.send_now if i % 3 else a.send_nowait)(f)
            if i % 50 == 0:
                polling[0] = not polling[0]
                # Gaps past the grace while not polling: the loop gives the queue back.
                await asyncio.sleep(rnd.choice((0, 0.0002)) if polling[0] else 0.001)
        with anyio.fail_after(20):
            await reader
        assert got == frames
        assert b._turn.given > 10  # the queue changed hands many times


async def test_the_loop_takes_the_queue_only_as_it_delivers_the_batch_handed_with_it() -> None:
    # The receiver thread hands a batch over together with the queue.  The
    # loop may poll the queue only once that batch is delivered: a newer
    # message already queued must come after it (it came first when the
    # thread flagged the queue as the loop's before the hand-off ran).
    loop = asyncio.get_running_loop()
    q = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        delivered: list[bytes] = []

        def deliver(batch: list[tuple[bytes, int]]) -> None:
            delivered.extend(m for m, _ in batch)
            turn.batch_done()

        turn = _LoopTurn(loop, q, 0, lambda b, _n, _r: deliver(b), lambda: True, lambda: True)
        handoff = _Handoff(loop, lambda b, _r: deliver(b))
        q.send(b"newer", True, 1)
        assert handoff.put([(b"handed", 1)], False, turn)
        assert not turn.loop_has  # not before the loop has delivered "handed"
        with anyio.fail_after(5):
            while len(delivered) < 2:
                await asyncio.sleep(0)
        assert delivered == [b"handed", b"newer"]
        assert turn.given == 1
        turn.stop()
    finally:
        q.remove()


async def test_closing_while_the_loop_has_the_queue_ends_the_thread() -> None:
    async with polled_pair([True]) as (a, b):
        await a.send(b"x")
        assert await b.recv() == b"x"
        assert b._turn.loop_has
        threads = (a._rx_thread, b._rx_thread)
    assert not any(t.is_alive() for t in threads)


async def test_ipcrm_while_the_loop_has_the_queue() -> None:
    async with polled_pair([True]) as (a, b):
        await a.send(b"x")
        assert await b.recv() == b"x"
        assert b._turn.loop_has
        sysv_ipc.MessageQueue(_key_of(b)).remove()
        with anyio.fail_after(5), pytest.raises(ConnectionClosed, match="removed"):
            await b.recv()
        b._rx_thread.join(5)
        assert not b._rx_thread.is_alive()


async def test_a_full_queue_is_retried_by_a_polling_loop_and_waited_on_by_a_thread_after() -> None:
    polling = [True]
    async with polled_pair(polling, queue_bytes=None) as (a, b):  # msgmnb: 16 KiB by default
        asked: list[int] = []
        a.start_polling = lambda: asked.append(1)  # a node would poll one spin window
        frames = [i.to_bytes(4, "big") * 250 for i in range(2000)]  # 2 MB: the queue fills
        got: list[bytes] = []

        async def read(n: int) -> None:
            for _ in range(n):
                got.append(await b.recv())

        reader = asyncio.create_task(read(len(frames)))
        for f in frames:
            await a.send(f)
        with anyio.fail_after(20):
            await a.drain()
            await reader
        assert got == frames
        assert a._tx is None  # while the loop polls, it tried again itself: no thread
        assert asked  # and a full queue asked the node to poll (once per episode)
        assert len(asked) < len(frames) // 2
        # Not polling, and nobody reads (b buffers 1 MiB, then pauses): past the
        # grace, a thread waits in msgsnd.
        polling[0] = False
        more = [i.to_bytes(4, "big") * 250 for i in range(2000, 3500)]
        for f in more:
            a.send_nowait(f)
        with anyio.fail_after(5):
            while a._tx is None or not a._tx.blocked:
                await asyncio.sleep(0.001)
        assert a.pending_out > 0
        got.clear()
        with anyio.fail_after(20):
            await read(len(more))
            await a.drain()
        assert got == more and a.pending_out == 0
