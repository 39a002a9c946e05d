"""Conformance checks every transport must pass.

:func:`check_link` runs the Link contract against a transport, the way
``trio.testing.check_one_way_stream`` does for trio streams::

    @contextlib.asynccontextmanager
    async def make_pair():
        a, b = ...            # two connected links of your transport
        try:
            yield a, b
        finally:
            await a.aclose(); await b.aclose()

    await ipcbus.testing.check_link(make_pair)

Each check opens a fresh pair.  A failing check raises ``AssertionError``
naming the check.

:func:`host_lock` serialises the processes that make host-wide kernel
objects to check or measure them: the test suite's leak check and the
benchmarks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Final

import anyio

from .errors import ConnectionClosed, EndOfStream, FrameTooLarge
from .transports.base import Link

__all__ = [
    "KernelObject",
    "LinkPairFactory",
    "check_link",
    "host_lock",
    "own_kernel_objects",
    "remove_kernel_objects",
]

LinkPairFactory = Callable[[], AbstractAsyncContextManager[tuple[Link, Link]]]
"""A zero-argument callable returning an async context manager of two connected links."""


KernelObject = tuple[str, "str | int"]
"""A kernel object: ``("file", name)`` in /dev/shm, or ``("msg" | "shm" | "sem", id)``."""


def own_kernel_objects() -> set[KernelObject]:
    """This user's /dev/shm files and SysV objects (queues, segments, semaphore sets).

    Only this user's: what another user's programs make (a database's shared
    memory) is none of ours to report or remove.
    """
    from .sysv import proc_table

    uid = os.getuid()
    found: set[KernelObject] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    found.add(("file", entry.name))
    for kind in ("msg", "shm", "sem"):
        for ident, row in proc_table(kind).items():
            if row.get("uid") == uid:
                found.add((kind, ident))
    return found


def remove_kernel_objects(objects: Iterable[KernelObject]) -> None:
    """Remove these objects (from :func:`own_kernel_objects`); ones already gone are skipped."""
    import sysv_ipc

    removers = {
        "msg": sysv_ipc.remove_message_queue,
        "shm": sysv_ipc.remove_shared_memory,
        "sem": sysv_ipc.remove_semaphore,
    }
    for kind, name in objects:
        with contextlib.suppress(OSError, sysv_ipc.Error):
            if kind == "file":
                os.unlink(os.path.join("/dev/shm", str(name)))
            else:
                removers[kind](int(name))


_HOST_LOCK: Final = "/tmp/ipcbus-tests.lock"


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Hold this host's ipcbus test lock (an ``flock`` on ``/tmp/ipcbus-tests.lock``).

    SysV objects and ``/dev/shm`` are host-wide: a test's leak check would
    take the queues of a benchmark (or of another test session) running at
    the same time for its own leaks, and remove them.  The test suite holds
    the lock around each test, the benchmarks around each measurement, so
    they take turns instead.  Blocks until the lock is free.  The path is
    fixed (not ``$TMPDIR``'s), so that sessions with different temp
    directories still share it.
    """
    try:
        fd = os.open(_HOST_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:  # another user's lock: theirs and ours cannot clash on one file
        fd = os.open(os.path.join(tempfile.gettempdir(), "ipcbus-tests.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _frame(i: int, size: int) -> bytes:
    """A frame of ``size`` bytes that encodes its sequence number ``i`` (size >= 1)."""
    head = i.to_bytes(8, "big")
    if size <= 8:
        return head[8 - size :]
    fill = bytes([i % 251]) * (size - 8)
    return head + fill


async def _recv_bytes(link: Link) -> bytes:
    """recv(), insisting on bytes: check_link never sets ``decode_large``."""
    got = await link.recv()
    assert isinstance(got, bytes), f"recv() returned {type(got).__name__}, not the frame's bytes"
    return got


async def _check_ordering(make_pair: LinkPairFactory) -> None:
    async with make_pair() as (a, b):
        n = 2000
        async with anyio.create_task_group() as tg:

            async def producer() -> None:
                for i in range(n):
                    await a.send(_frame(i, 16 + i % 200))

            tg.start_soon(producer)
            for i in range(n):
                got = await b.recv()
                assert got == _frame(i, 16 + i % 200), f"ordering: frame {i} differs"
        # and the other direction
        await b.send(b"pong")
        assert await a.recv() == b"pong", "ordering: reverse direction"


async def _check_sizes(make_pair: LinkPairFactory) -> None:
    async with make_pair() as (a, b):
        limit = min(a.max_frame, 64 * 1024 * 1024)
        sizes = [1, 2, 100, 4095, 4096, 4097, 65536, 1 << 20, limit]
        sizes = sorted({s for s in sizes if s <= limit})
        async with anyio.create_task_group() as tg:

            async def producer() -> None:
                for i, s in enumerate(sizes):
                    await a.send(_frame(i, s))

            tg.start_soon(producer)
            for i, s in enumerate(sizes):
                got = await _recv_bytes(b)
                assert len(got) == s, f"sizes: expected a {s}-byte frame, got {len(got)}"
                assert got == _frame(i, s), f"sizes: the {s}-byte frame arrived corrupted"


async def _check_too_large(make_pair: LinkPairFactory) -> None:
    async with make_pair() as (a, b):
        big = b"\0" * (a.max_frame + 1)
        try:
            a.send_nowait(big)
        except FrameTooLarge as exc:
            assert exc.limit == a.max_frame and exc.size == a.max_frame + 1
        else:
            raise AssertionError("too large: send_nowait accepted a frame over max_frame")
        del big
        # The same in two parts: refused before any part is queued.
        body = b"\0" * a.max_frame
        try:
            a.send_parts(b"head", body)
        except FrameTooLarge as exc:
            assert exc.size == a.max_frame + 4, "too large: wrong size reported for parts"
        else:
            raise AssertionError("too large: send_parts accepted a frame over max_frame")
        del body
        await a.send(b"after")  # the link still works
        assert await b.recv() == b"after", "too large: link unusable after refusing a frame"


async def _check_backpressure(make_pair: LinkPairFactory) -> None:
    async with make_pair() as (a, b):
        chunk = 64 * 1024
        sent = await _fill(a, chunk)
        async with anyio.create_task_group() as tg:

            async def more() -> None:
                await a.send(_frame(sent, 100))

            tg.start_soon(more)
            for i in range(sent):
                got = await b.recv()
                assert got == _frame(i, chunk), f"backpressure: frame {i} corrupted or lost"
            assert await b.recv() == _frame(sent, 100), "backpressure: later frame lost"


async def _fill(link: Link, chunk: int) -> int:
    """Send ``chunk``-byte frames to a stalled reader until ``send`` blocks; return how many."""
    sent = 0
    while sent * chunk < 512 * 1024 * 1024:
        with anyio.move_on_after(0.5) as scope:
            await link.send(_frame(sent, chunk))
        sent += 1  # a cancelled send queued its frame whole (cancel-safe)
        if scope.cancelled_caught:
            return sent
    raise AssertionError(f"backpressure: {sent * chunk} bytes sent to a stalled reader never blocked")


async def _check_many_writers(make_pair: LinkPairFactory) -> None:
    # A storm of tasks waits for room on one full link (thousands of requests
    # to a busy worker): none returns while the reader is stalled, those that
    # gave up (cancelled) are simply gone, and the others all return, each once
    # the queue is down to its own threshold, when the reader catches up.
    async with make_pair() as (a, b):
        chunk = 64 * 1024
        sent = await _fill(a, chunk)
        done: list[tuple[int, int]] = []  # (waiter, pending_out when it returned)

        async def waiter(i: int, threshold: int | None) -> None:
            await a.wait_writable(threshold)
            done.append((i, a.pending_out))

        async with anyio.create_task_group() as tg:
            for i in range(2000):
                tg.start_soon(waiter, i, (0, None, chunk)[i % 3])
                if i % 4 == 0:
                    with anyio.move_on_after(0):  # gives up at once, while waiting
                        await a.wait_writable(0)
            await anyio.wait_all_tasks_blocked()
            assert not done, f"many writers: {len(done)} waiters returned while the reader was stalled"
            for i in range(sent):
                got = await b.recv()
                assert got == _frame(i, chunk), f"many writers: frame {i} corrupted or lost"
        assert sorted(i for i, _ in done) == list(range(2000)), "many writers: a waiter never returned"
        late = [(i, pending) for i, pending in done if i % 3 == 0 and pending]
        assert not late, f"many writers: threshold 0 waiters returned with bytes queued: {late[:3]}"
        await a.send(b"after")  # the link still works
        assert await b.recv() == b"after", "many writers: link unusable after the storm"


async def _check_peer_close(make_pair: LinkPairFactory) -> None:
    async with make_pair() as (a, b):
        for i in range(10):
            await a.send(_frame(i, 32))
        await a.aclose()
        for i in range(10):
            assert await b.recv() == _frame(i, 32), "peer close: buffered frame lost"
        with anyio.fail_after(5):
            try:
                await b.recv()
            except EndOfStream:
                pass
            else:
                raise AssertionError("peer close: recv after the peer closed returned a frame")
    async with make_pair() as (a, b):
        await b.aclose()
        with anyio.fail_after(10):
            try:
                for i in range(100000):
                    await a.send(_frame(i, 4096))
                await a.drain()
            except ConnectionClosed:
                pass
            else:
                raise AssertionError("peer close: sending to a closed peer never failed")


async def _check_close_twice(make_pair: LinkPairFactory) -> None:
    async with make_pair() as (a, _b):
        await a.aclose()
        await a.aclose()
        assert a.closed, "close twice: closed is False after aclose"
        try:
            await a.send(b"x")
        except ConnectionClosed:
            pass
        else:
            raise AssertionError("close twice: send after aclose did not raise ConnectionClosed")
        late_sends: list[Callable[[], None]] = [
            lambda: a.send_parts(b"h", b"body"),
            lambda: a.send_now(b"x"),
        ]
        for late in late_sends:
            try:
                late()
            except ConnectionClosed:
                pass
            else:
                raise AssertionError("close twice: send_parts/send_now after aclose did not raise")
        try:
            await a.recv()
        except ConnectionClosed:
            pass
        else:
            raise AssertionError("close twice: recv after aclose did not raise ConnectionClosed")
    async with make_pair() as (a, b):
        # Frames read into b's buffer but not taken yet go with b's close.
        for i in range(3):
            await a.send(_frame(i, 32))
        assert await _recv_bytes(b) == _frame(0, 32)
        await b.aclose()
        try:
            await b.recv()
        except ConnectionClosed:
            pass
        else:
            raise AssertionError("close twice: recv after aclose returned a frame still buffered")


async def _check_cancel_mid_send(make_pair: LinkPairFactory) -> None:
    async with make_pair() as (a, b):
        chunk = 256 * 1024
        attempted = 0
        cancelled = 0
        while cancelled < 3 and attempted < 4096:
            with anyio.move_on_after(0.2) as scope:
                await a.send(_frame(attempted, chunk))
            attempted += 1
            if scope.cancelled_caught:
                cancelled += 1
        assert cancelled, "cancel: a stalled reader never made send block"
        async with anyio.create_task_group() as tg:

            async def sentinel() -> None:
                await a.send(_frame(attempted, 10))

            tg.start_soon(sentinel)
            seen: list[int] = []
            while True:
                f = await _recv_bytes(b)
                if len(f) == 10:
                    assert int.from_bytes(f[:8], "big") == attempted, "cancel: sentinel corrupted"
                    break
                assert len(f) == chunk, f"cancel: partial frame of {len(f)} bytes delivered"
                assert f == _frame(int.from_bytes(f[:8], "big"), chunk), "cancel: corrupted frame"
                seen.append(int.from_bytes(f[:8], "big"))
        # A cancelled send queued its frame whole, so nothing may be missing.
        assert seen == list(range(attempted)), (
            "cancel: frames lost, duplicated or reordered around cancelled sends"
        )


async def _check_parts(make_pair: LinkPairFactory) -> None:
    # send_parts(head, body): the frame head + body arrives whole and in order,
    # among whole frames, whether it goes straight out or waits in a queue.
    async with make_pair() as (a, b):
        limit = min(a.max_frame, 64 * 1024 * 1024)
        shapes = [(5, 0), (10, 1000), (100, 70000), (3, (1 << 20) + 13), (7, 3 << 20), (1, 64 << 20)]
        shapes = [(h, n) for h, n in shapes if h + n <= limit]
        expected: list[bytes] = []
        for i, (h, n) in enumerate(shapes):
            head = _frame(i, max(h, 8))
            body = bytes([i % 251 + 1]) * n
            expected += [head + body, _frame(1000 + i, 33)]
        async with anyio.create_task_group() as tg:

            async def producer() -> None:
                for i, (h, n) in enumerate(shapes):
                    head = _frame(i, max(h, 8))
                    a.send_parts(head, bytes([i % 251 + 1]) * n)
                    a.send_nowait(_frame(1000 + i, 33))
                    if a.pending_out > a.high_water:
                        await a.wait_writable()
                await a.drain()

            tg.start_soon(producer)
            for i, want in enumerate(expected):
                got = await _recv_bytes(b)
                assert len(got) == len(want), (
                    f"parts: frame {i} is {len(got)} bytes, {len(want)} were sent"
                )
                assert got == want, f"parts: frame {i} arrived corrupted"


CHECKS = {
    "ordering": _check_ordering,
    "sizes": _check_sizes,
    "too_large": _check_too_large,
    "backpressure": _check_backpressure,
    "many_writers": _check_many_writers,
    "peer_close": _check_peer_close,
    "close_twice": _check_close_twice,
    "cancel_mid_send": _check_cancel_mid_send,
    "parts": _check_parts,
}


async def check_link(make_pair: LinkPairFactory, *, skip: tuple[str, ...] = ()) -> None:
    """Run every Link conformance check against ``make_pair``.

    ``skip`` names checks to leave out (only for a documented transport
    limitation).  Raises ``AssertionError`` on the first failure, its
    message naming the check.
    """
    for name, check in CHECKS.items():
        if name in skip:
            continue
        with anyio.fail_after(120):
            try:
                await check(make_pair)
            except AssertionError as exc:
                raise AssertionError(f"check_link[{name}]: {exc}") from exc

