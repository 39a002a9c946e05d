"""ipcbus.sysv.MessageQueue: typed messages on a raw SysV queue, with Python and C peers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sysv_ipc

from ipcbus.errors import ConnectionClosed, FrameTooLarge, PermissionRefused
from ipcbus.sysv import (
    MSGTYPE_MAX,
    Message,
    MessageQueue,
    QueueExists,
    QueueNotFound,
    proc_msg_table,
    read_limits,
)

REPO = Path(__file__).resolve().parent.parent
C_SOURCE = Path(__file__).resolve().parent / "c" / "msgq_peer.c"


@pytest.fixture
async def queue() -> AsyncIterator[MessageQueue]:
    """A fresh private-key queue, removed whatever the test does."""
    q = MessageQueue.create(mode=0o600)
    try:
        yield q
    finally:
        await q.aclose()
        try:
            sysv_ipc.remove_message_queue(q.id)
        except sysv_ipc.ExistentialError:
            pass


def _c_compiler() -> str | None:
    for cc in ("cc", "gcc", "clang"):
        path = shutil.which(cc)
        if path:
            return path
    return None


@pytest.fixture
def c_peer(tmp_path: Path) -> Path:
    """tests/c/msgq_peer.c compiled with the machine's C compiler (skip if there is none)."""
    cc = _c_compiler()
    if cc is None:
        if os.environ.get("IPCBUS_REQUIRE_CC"):  # CI (.ci/run) installs one: never skip there
            pytest.fail("no C compiler (cc/gcc/clang), though IPCBUS_REQUIRE_CC is set")
        pytest.skip("no C compiler (cc/gcc/clang) on this machine")
    exe = tmp_path / "msgq_peer"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(C_SOURCE)], check=True)
    return exe


def _c_text(s: str) -> bytes:
    """A message body the way the C peer's struct holds it: 256 bytes, NUL-padded."""
    raw = s.encode()
    assert len(raw) < 256
    return raw + b"\0" * (256 - len(raw))


def _from_c(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode()


def _caps_have(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_RESOURCE = 24


# -- typed send / receive ------------------------------------------------------


async def test_receive_by_type_follows_msgrcv(queue: MessageQueue) -> None:
    for t, data in [(5, b"five"), (2, b"two-a"), (9, b"nine"), (2, b"two-b")]:
        await queue.send(data, type=t)
    assert queue.stat().messages == 4
    # type > 0: the first message of exactly that type
    assert await queue.receive(type=2) == Message(b"two-a", 2)
    # type < 0: the first message of the lowest type <= |type|
    assert await queue.receive(type=-6) == Message(b"two-b", 2)
    assert await queue.receive(type=-6) == Message(b"five", 5)
    # type 0: the first message, whatever its type
    assert await queue.receive() == Message(b"nine", 9)
    assert queue.try_receive() is None


async def test_receive_waits_for_a_message(queue: MessageQueue) -> None:
    waiting = asyncio.create_task(queue.receive(type=4))
    other = asyncio.create_task(queue.receive(type=6))
    await queue.send(b"for six", type=6)
    await queue.send(b"for four", type=4)
    assert await waiting == Message(b"for four", 4)
    assert await other == Message(b"for six", 6)


async def test_cancelled_receive_loses_nothing(queue: MessageQueue) -> None:
    waiting = asyncio.create_task(queue.receive(type=7))
    await asyncio.sleep(0)  # let it start (and find the queue empty)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The abandoned helper thread takes this message; it must come back to us.
    await queue.send(b"late", type=7)
    assert await queue.receive(type=7) == Message(b"late", 7)


async def test_send_waits_while_the_queue_is_full(queue: MessageQueue) -> None:
    big = b"x" * queue.max_message_size
    capacity = queue.stat().max_bytes
    sent = 0
    while queue.try_send(big, type=1):
        sent += 1
    assert sent == capacity // len(big)
    blocked = asyncio.create_task(queue.send(b"waits for room", type=2))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert await queue.receive(type=1) == Message(big, 1)  # makes room
    await blocked
    assert await queue.receive(type=2) == Message(b"waits for room", 2)


async def test_zero_length_messages_fit_in_a_full_queue(queue: MessageQueue) -> None:
    """The kernel fact the transport's control messages rely on."""
    big = b"x" * queue.max_message_size
    while queue.try_send(big, type=5):
        pass
    assert not queue.try_send(b"y", type=1)  # one byte more does not fit...
    assert queue.try_send(b"", type=1)  # ...but a zero-length message does
    assert await queue.receive(type=-2) == Message(b"", 1)


async def test_remove_wakes_waiting_receivers(queue: MessageQueue) -> None:
    waiting = asyncio.create_task(queue.receive(type=3))
    await asyncio.sleep(0)
    await queue.remove()
    with pytest.raises(ConnectionClosed):
        await waiting


async def test_aclose_releases_an_abandoned_receiver(queue: MessageQueue) -> None:
    waiting = asyncio.create_task(queue.receive(type=8))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await queue.aclose()  # wakes and joins the thread (the leak check verifies)
    assert queue.stat().messages == 0  # its zero-length wake-up was taken back
    with pytest.raises(ConnectionClosed):
        await queue.send(b"x")


def _in_msgrcv() -> list[threading.Thread]:
    """The queue receive threads that sleep in ``msgrcv`` now."""
    blocked = []
    for t in threading.enumerate():
        if t.name.startswith("ipcbus-msgq-recv"):
            with contextlib.suppress(OSError):
                if Path(f"/proc/self/task/{t.native_id}/wchan").read_text() == "do_msgrcv":
                    blocked.append(t)
    return blocked


async def receivers_blocked(n: int) -> list[threading.Thread]:
    """Wait until ``n`` of the queue's receive threads sleep in ``msgrcv``."""
    with anyio.fail_after(20):
        while True:
            blocked = _in_msgrcv()
            if len(blocked) >= n:
                return blocked
            await asyncio.sleep(0.005)


async def abandon_receive(q: MessageQueue, type: int) -> None:
    """A receive of ``type`` cancelled once its thread waits in ``msgrcv``: the
    thread stays, and ``q`` keeps what it takes."""
    task = asyncio.create_task(q.receive(type=type))
    await receivers_blocked(len(_in_msgrcv()) + 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def until_taken(op: Any) -> None:
    """Until ``op``'s thread has handed its message over (its future is done).

    Loop turns, not time: the receive that awaits it is then cancelled
    between the hand-over and its own resumption.
    """
    with anyio.fail_after(10):
        while not op.future.done():
            await asyncio.sleep(0)


async def cancelled_as_handed_over(
    q: MessageQueue, type: int, sender: MessageQueue, data: bytes, send_type: int
) -> asyncio.Task[Message]:
    """A receive of ``type`` on ``q`` (its thread the only one in ``msgrcv``),
    cancelled just as its thread hands over ``data``, sent by ``sender``."""
    waiting = asyncio.create_task(q.receive(type))
    await receivers_blocked(1)
    op = next(iter(q._ops))
    assert sender.try_send(data, type=send_type)
    await until_taken(op)
    waiting.cancel()
    return waiting


async def result_or_nothing(task: asyncio.Task[Message]) -> list[Message]:
    """What a receive cancelled at the last moment returned: its message, or nothing."""
    try:
        return [await task]
    except asyncio.CancelledError:
        return []


async def test_aclose_fails_a_receive_still_awaited(queue: MessageQueue) -> None:
    """It returned aclose's own zero-length wake-up message as if received."""
    waiting = asyncio.create_task(queue.receive(type=0))
    await receivers_blocked(1)
    await queue.aclose()
    with pytest.raises(ConnectionClosed, match="was closed"):
        await waiting
    assert queue.stat().messages == 0


async def test_aclose_gives_a_message_that_won_the_race_once(queue: MessageQueue) -> None:
    """A real message taken by the thread of an awaited receive as aclose wakes
    it goes to that receive, and is not also put back in the queue."""
    other = MessageQueue.open(queue.key)
    try:
        waiting = asyncio.create_task(queue.receive(type=0))
        await receivers_blocked(1)
        assert other.try_send(b"REAL", type=5)  # straight to the sleeping receiver
        await queue.aclose()
        assert await waiting == Message(b"REAL", 5)
        assert other.try_receive(0) == Message(b"", 1)  # only aclose's wake-up is left
        assert other.try_receive(0) is None
    finally:
        await other.aclose()


async def test_a_message_taken_by_a_cancelled_receive_reaches_a_later_one(queue: MessageQueue) -> None:
    """A cancelled receive(-5)'s thread takes a type-3 message that a later
    receive(0) waits for: it was stashed while receive(0) waited on forever."""
    await abandon_receive(queue, -5)
    later = asyncio.create_task(queue.receive(type=0))
    await receivers_blocked(2)  # the cancelled one's thread is first in the kernel's line
    other = MessageQueue.open(queue.key)
    try:
        assert other.try_send(b"three", type=3)
        with anyio.fail_after(10):
            assert await later == Message(b"three", 3)
        assert other.try_send(b"four", type=4)  # taken by later's thread, kept for the next
        with anyio.fail_after(10):
            assert await queue.receive(type=0) == Message(b"four", 4)
    finally:
        await other.aclose()


async def test_aclose_wakes_receives_of_any_type_and_of_one_type(queue: MessageQueue) -> None:
    """A receive(0) waiting before a receive(3) took the type-3 wake-up meant
    for the other, which then waited for ever (and aclose with it)."""
    for broad in (0, -5):
        q = MessageQueue.open(queue.key)
        first = asyncio.create_task(q.receive(type=broad))
        await receivers_blocked(1)
        second = asyncio.create_task(q.receive(type=3))
        await receivers_blocked(2)
        with anyio.fail_after(10):
            await q.aclose()
        for t in (first, second):
            with pytest.raises(ConnectionClosed, match="was closed"):
                await t
        while queue.try_receive(0) is not None:  # wake-ups left over, if any
            pass


@pytest.mark.parametrize("handed_over", [False, True])
async def test_a_receive_cancelled_as_its_message_came_loses_nothing(
    queue: MessageQueue, handed_over: bool
) -> None:
    """Its message was in the receive's future when the task was cancelled
    (an asyncio.wait_for timeout): neither returned nor kept, it was lost."""
    if handed_over:  # the message reaches it through a cancelled receive(-5)'s thread
        await abandon_receive(queue, -5)
    waiting = asyncio.create_task(queue.receive(type=0))
    await receivers_blocked(2 if handed_over else 1)
    op = next(o for o in queue._ops if o.type == 0)
    other = MessageQueue.open(queue.key)
    try:
        assert other.try_send(b"precious", type=3)
        await until_taken(op)
        waiting.cancel()  # before the task resumes with it
        got = await result_or_nothing(waiting)
        got += [m for m in iter(lambda: queue.try_receive(0), None)]
        assert got == [Message(b"precious", 3)]
    finally:
        await other.aclose()


async def test_a_receive_cancelled_after_the_close_puts_its_message_back(queue: MessageQueue) -> None:
    """Its message came, the object closed, then the task was cancelled: the
    message went to the closed object's stash and was lost."""
    q = MessageQueue.open(queue.key)
    waiting = await cancelled_as_handed_over(q, 0, queue, b"precious", 7)
    await q.aclose()  # nothing left to wait for: done before the task resumes
    got = await result_or_nothing(waiting)
    got += [m for m in iter(lambda: queue.try_receive(0), None)]
    assert got == [Message(b"precious", 7)]


async def test_a_close_cut_short_is_finished_by_the_next(queue: MessageQueue) -> None:
    """aclose() cancelled while it waited for a send in flight: a second call
    returned at once, and what the object kept was never put back."""
    q = MessageQueue.open(queue.key)
    await abandon_receive(q, 5)
    assert queue.try_send(b"precious", type=5)  # taken by that thread, kept
    with anyio.fail_after(10):
        await q._wait_ops()  # its thread took it
    assert queue.set_max_bytes(64) == 64
    while queue.try_send(b"x" * 16, type=1):
        pass
    sending = asyncio.create_task(q.send(b"y" * 16, type=2))
    await asyncio.sleep(0)  # its first step: no room, so it waits in a thread
    assert q._ops
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(q.aclose(), 0.2)
    while queue.try_receive(1) is not None:  # room
        pass
    with anyio.fail_after(10):
        await q.aclose()
    await sending
    left = [m for m in iter(lambda: queue.try_receive(0), None)]
    assert left == [Message(b"y" * 16, 2), Message(b"precious", 5)]


async def test_aclose_returns_when_another_reader_took_its_wake_up(queue: MessageQueue) -> None:
    """A reader of the same queue (another object, another process) took the
    zero-length wake-up meant for this object's receive: aclose waited for ever."""
    a, b = MessageQueue.open(queue.key), MessageQueue.open(queue.key)
    try:
        first = asyncio.create_task(a.receive(0))  # first in the kernel's line
        await receivers_blocked(1)
        second = asyncio.create_task(b.receive(0))
        await receivers_blocked(2)
        with anyio.fail_after(10):
            await b.aclose()  # its wake-up goes to a's receive; sent again
        assert await first == Message(b"", 1)  # a spurious wake-up, as documented
        with pytest.raises(ConnectionClosed, match="was closed"):
            await second
    finally:
        await a.aclose()
    while queue.try_receive(0) is not None:
        pass


async def test_a_message_kept_from_a_cancelled_receive_keeps_its_place(queue: MessageQueue) -> None:
    """A message that came as its receive was cancelled went ahead of one kept before it."""
    await abandon_receive(queue, 3)
    other = MessageQueue.open(queue.key)
    try:
        assert other.try_send(b"m1-first", type=3)  # taken by that thread, kept
        with anyio.fail_after(10):
            await queue._wait_ops()  # its thread took it
        waiting = await cancelled_as_handed_over(queue, 5, other, b"m2-second", 5)
        if await result_or_nothing(waiting):
            return  # it resumed with its message before the cancellation: nothing to order
        assert await queue.receive(0) == Message(b"m1-first", 3)
        assert await queue.receive(0) == Message(b"m2-second", 5)
    finally:
        await other.aclose()


async def test_a_message_larger_than_the_queue_is_refused_at_once(queue: MessageQueue) -> None:
    """Under msgmax but over the queue's capacity: it could never be sent
    (send waited forever, try_send said "full" of an empty queue)."""
    assert queue.set_max_bytes(1024) == 1024
    with pytest.raises(FrameTooLarge, match=r"queue's capacity \(msg_qbytes\)") as info:
        queue.try_send(b"x" * 2000, type=1)
    assert (info.value.size, info.value.limit) == (2000, 1024)
    with pytest.raises(FrameTooLarge, match=r"queue's capacity \(msg_qbytes\)"), anyio.fail_after(10):
        await queue.send(b"x" * 2000, type=1)
    assert queue.try_send(b"x" * 1000, type=1)  # what fits still goes


async def test_a_signal_on_a_receive_thread_does_not_end_the_receive(queue: MessageQueue) -> None:
    """EINTR in msgrcv (a signal with a Python handler hit the helper thread)
    surfaced as a raw sysv_ipc.Error; the receive waits on instead."""
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        waiting = asyncio.create_task(queue.receive(type=1))
        (thread,) = await receivers_blocked(1)
        assert thread.ident is not None
        signal.pthread_kill(thread.ident, signal.SIGUSR1)
        await receivers_blocked(1)  # back in msgrcv
        assert not waiting.done()
        await queue.send(b"after the signal", type=1)
        with anyio.fail_after(10):
            assert await waiting == Message(b"after the signal", 1)
    finally:
        signal.signal(signal.SIGUSR1, old)


async def test_aclose_waits_for_a_cancelled_send_until_it_is_sent(queue: MessageQueue) -> None:
    """A send cancelled while waiting for room still goes out (module docstring);
    aclose() waits for its thread (it returned at once, leaving the thread)."""
    big = b"x" * 1000
    while queue.try_send(big, type=5):
        pass
    sending = asyncio.create_task(queue.send(b"last" * 300, type=6))  # more than is left
    while not queue._ops:  # its thread waits for room
        await asyncio.sleep(0)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    closing = asyncio.create_task(queue.aclose())
    for _ in range(10):
        await asyncio.sleep(0)  # loop turns: aclose reaches its wait
    assert not closing.done()  # the send still waits for room in its thread
    other = MessageQueue.open(queue.key)  # a reader elsewhere makes room
    try:
        await other.receive(type=5)
        with anyio.fail_after(10):
            await closing
        assert (await other.receive(type=6)).data == b"last" * 300  # sent once, not lost
    finally:
        await other.aclose()


# -- stat, limits, errors ---------------------------------------------------------


async def test_stat_reports_msqid_ds(queue: MessageQueue) -> None:
    st = queue.stat()
    assert (st.id, st.key) == (queue.id, queue.key)
    assert (st.messages, st.bytes) == (0, 0)
    assert st.max_bytes == read_limits().msgmnb
    assert st.mode == 0o600
    assert st.uid == st.cuid == os.getuid()
    assert st.last_send_pid == 0 and st.last_send_time is None
    await queue.send(b"12345", type=3)
    st = queue.stat()
    assert (st.messages, st.bytes) == (1, 5)
    assert st.last_send_pid == os.getpid() and st.last_send_time is not None
    row = proc_msg_table()[queue.id]
    assert row["cbytes"] == 5 and row["qnum"] == 1


def test_limits_are_read_from_proc() -> None:
    lim = read_limits()
    assert lim.msgmax == int(Path("/proc/sys/kernel/msgmax").read_text())
    assert lim.msgmnb == int(Path("/proc/sys/kernel/msgmnb").read_text())


async def test_capacity_can_be_lowered_and_raising_is_refused_cleanly(
    queue: MessageQueue,
) -> None:
    assert queue.set_max_bytes(8192) == 8192
    want = read_limits().msgmnb * 4
    if _caps_have(CAP_SYS_RESOURCE):
        assert queue.set_max_bytes(want) == want
    else:
        with pytest.raises(PermissionRefused, match="CAP_SYS_RESOURCE"):
            queue.set_max_bytes(want)
        assert queue.stat().max_bytes == 8192  # unchanged


async def test_bad_arguments_are_refused_clearly(queue: MessageQueue) -> None:
    with pytest.raises(FrameTooLarge) as info:
        await queue.send(b"x" * (queue.max_message_size + 1))
    assert info.value.limit == queue.max_message_size
    with pytest.raises(ValueError, match="1 <= type"):
        await queue.send(b"x", type=0)
    with pytest.raises(ValueError, match="out of range"):
        await queue.send(b"x", type=MSGTYPE_MAX + 1)
    with pytest.raises(TypeError):
        await queue.receive(type="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random new key"):
        MessageQueue(None)
    assert queue.stat().messages == 0  # nothing half-sent


async def test_open_missing_and_create_existing(queue: MessageQueue) -> None:
    with pytest.raises(QueueExists, match=hex(queue.key)):
        MessageQueue.create(queue.key)
    other = MessageQueue.open(queue.key)
    assert other.id == queue.id
    await other.aclose()
    await queue.remove()
    with pytest.raises(QueueNotFound, match="no SysV message queue"):
        MessageQueue.open(queue.key)
    with pytest.raises(ConnectionClosed, match="removed"):
        await queue.send(b"x")


@pytest.mark.skipif(shutil.which("setpriv") is None or os.getuid() != 0,
                    reason="needs root and setpriv to drop CAP_IPC_OWNER")
async def test_permission_denied_on_open(python: str) -> None:
    # Root with CAP_IPC_OWNER bypasses queue permissions, so the opener runs
    # with every capability dropped: then a mode-000 queue denies even its owner.
    q = MessageQueue.create(mode=0o000)
    try:
        code = (
            "import ipcbus.sysv as s\n"
            "try:\n"
            f"    s.MessageQueue.open({q.key})\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n"
        )
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--bounding-set=-all", "--inh-caps=-all", python, "-c", code,
            cwd=REPO, stdout=asyncio.subprocess.PIPE,
        )
        out = (await proc.communicate())[0].decode()
        assert proc.returncode == 0
        assert out.startswith("PermissionRefused"), out
        assert "permission denied" in out and hex(q.key) in out
    finally:
        await q.remove()
        await q.aclose()


# -- a C program from the Linux IPC guide ---------------------------------------


async def test_exchange_with_the_c_peer(queue: MessageQueue, c_peer: Path) -> None:
    texts = ["hello from python", "typed messages", "x" * 200]
    for t in texts:
        await queue.send(_c_text(t), type=1)
    await queue.send(b"never read by C", type=5)
    proc = await asyncio.create_subprocess_exec(str(c_peer), str(queue.key), str(len(texts)))
    try:
        for t in texts:
            reply = await queue.receive(type=2)
            assert len(reply.data) == 256  # sizeof(msg_data): the whole C struct body
            assert _from_c(reply.data) == f"C got: {t}"
        bye = await queue.receive(type=3)
        assert _from_c(bye.data) == "bye"
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    st = queue.stat()
    assert st.last_send_pid == proc.pid  # the C program sent last
    assert st.messages == 1  # the type-5 message was never selected by C
    assert await queue.receive(type=-9) == Message(b"never read by C", 5)


async def test_c_peer_blocks_until_python_sends(queue: MessageQueue, c_peer: Path) -> None:
    proc = await asyncio.create_subprocess_exec(str(c_peer), str(queue.key), "1")
    try:
        # The C program is (or will be) blocked in msgrcv(type=1): a message of
        # another type must not wake it; ours of type 1 must.
        await queue.send(b"ignored", type=4)
        await queue.send(_c_text("wake up"), type=1)
        assert _from_c((await queue.receive(type=2)).data) == "C got: wake up"
        assert _from_c((await queue.receive(type=3)).data) == "bye"
        assert await proc.wait() == 0
        assert await queue.receive(type=4) == Message(b"ignored", 4)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_example_runs(python: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        python, str(REPO / "examples" / "sysv_typed_messages.py"),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"C got: " in out or b"python peer got: " in out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
