"""The pipe rules of the Linux IPC guide, each with a real child process.

The parent creates two anonymous pipes (:class:`ChildPipes`), the child
(``tests/pipe_child.py``) inherits its ends and wraps them in a
:class:`PipeLink`.  Events are ordered by the child's stdout lines and by
lines the parent writes to its stdin, never by sleeping.

1. A reader waits for data (without blocking the event loop).
2. A writer awaits when the pipe is full, and resumes when the reader does.
3. After the writer closes, the reader gets every buffered frame, then a
   clean end of stream.
4. When the reader is gone, the writer gets ``ConnectionClosed`` and
   survives: no SIGPIPE death, no hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from ipcbus.errors import ConnectionClosed, EndOfStream
from ipcbus.transports.pipe import ChildPipes, PipeLink

CHILD = str(Path(__file__).resolve().parent / "pipe_child.py")


def numbered(i: int, size: int) -> bytes:
    """Same frames as ``pipe_child.numbered``."""
    return i.to_bytes(8, "big") + bytes([i % 251]) * (size - 8)


class Child:
    """A running pipe_child.py and the parent's link to it."""

    def __init__(self, proc: asyncio.subprocess.Process, link: PipeLink) -> None:
        self.proc = proc
        self.link = link

    async def line(self) -> str:
        assert self.proc.stdout is not None
        with anyio.fail_after(10):
            return (await self.proc.stdout.readline()).decode().strip()

    async def expect(self, word: str) -> None:
        got = await self.line()
        assert got == word, f"child said {got!r}, expected {word!r}"

    async def resume(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    async def command(self, cmd: str) -> None:
        await self.link.send(cmd.encode())


@contextlib.asynccontextmanager
async def child(mode: str = "commands", high_water: int | None = None) -> AsyncIterator[Child]:
    pipes = ChildPipes.create()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            CHILD,
            str(pipes.child_r),
            str(pipes.child_w),
            mode,
            pass_fds=pipes.child_fds,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
    except BaseException:
        pipes.close()
        raise
    kw = {} if high_water is None else {"high_water": high_water}
    link = pipes.parent_link(peer_pid=proc.pid, **kw)
    c = Child(proc, link)
    try:
        await c.expect("ready")
        yield c
    finally:
        link.abort()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        for stream in (proc.stdin,):
            if stream is not None:
                stream.close()
                with contextlib.suppress(Exception):
                    await stream.wait_closed()


async def test_reader_waits_for_data_without_blocking_the_loop() -> None:
    async with child() as c:
        await c.command("wait-send")
        await c.expect("waiting")  # the child now blocks; it has written nothing
        recv = asyncio.ensure_future(c.link.recv())
        ticks = 0
        for _ in range(50):
            await asyncio.sleep(0)
            ticks += 1
        assert not recv.done(), f"recv returned without data: {recv}"
        assert ticks == 50  # the loop kept running while the reader waited
        await c.resume()
        with anyio.fail_after(10):
            assert await recv == b"data"
        await c.command("close")
        with anyio.fail_after(10), pytest.raises(EndOfStream):
            await c.link.recv()
        assert await c.proc.wait() == 0


async def test_writer_awaits_while_the_pipe_is_full_then_everything_arrives() -> None:
    hw = 256 * 1024
    size = 64 * 1024
    n = 64  # 4 MiB: more than the 1 MiB pipe plus the high-water mark
    async with child(high_water=hw) as c:
        await c.command("stall")
        await c.expect("stalled")  # the child reads nothing from now on
        await c.command(f"verify {n} {size}")
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for i in range(n):
                await c.link.send(numbered(i, size))
                sent += 1

        task = asyncio.ensure_future(sender())
        with anyio.fail_after(10):
            while c.link.pending_out <= hw:
                await asyncio.sleep(0)  # let the sender fill the pipe
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done() and sent < n, "send did not wait for a full pipe"
        assert c.link.pending_out > hw // 2, "the kernel took more than a full pipe"
        stuck_at = sent
        for _ in range(20):
            await asyncio.sleep(0)
        assert sent == stuck_at, "the writer made progress while the reader was stalled"

        await c.resume()  # the reader reads again: the writer completes
        with anyio.fail_after(20):
            await task
            assert await c.link.recv() == f"ok {n}".encode()
        assert sent == n
        await c.command("close")
        assert await c.proc.wait() == 0


async def test_after_the_writer_closes_the_reader_gets_everything_then_eof() -> None:
    async with child() as c:
        # small: everything fits in the pipe; the child has exited before we read
        await c.command("send 200 1000")
        await c.command("close")
        assert await c.proc.wait() == 0
        for i in range(200):
            assert await c.link.recv() == numbered(i, 1000), f"frame {i}"
        with anyio.fail_after(10), pytest.raises(EndOfStream):
            await c.link.recv()
        with pytest.raises(EndOfStream):  # and it stays at end of stream
            await c.link.recv()


async def test_writer_closing_after_more_than_a_pipe_full() -> None:
    async with child() as c:
        n, size = 100, 64 * 1024  # 6.4 MiB, so the child's close has to wait for us
        await c.command(f"send {n} {size}")
        await c.command("close")
        with anyio.fail_after(20):
            for i in range(n):
                assert await c.link.recv() == numbered(i, size), f"frame {i}"
            with pytest.raises(EndOfStream):
                await c.link.recv()
        assert await c.proc.wait() == 0


async def test_writer_survives_when_the_reader_is_gone() -> None:
    async with child() as c:
        await c.command("exit")
        assert await c.proc.wait() == 0  # the reader is gone
        with anyio.fail_after(10), pytest.raises(ConnectionClosed) as info:
            for i in range(10_000):
                await c.link.send(numbered(i, 4096))
            await c.link.drain()
        assert "EPIPE" in str(info.value) or "closed" in str(info.value)
        with pytest.raises(ConnectionClosed):
            await c.link.send(b"again")
        with pytest.raises(EndOfStream):
            await c.link.recv()


async def test_blocked_writer_is_released_when_the_reader_dies() -> None:
    hw = 128 * 1024
    async with child(high_water=hw) as c:
        await c.command("stall")
        await c.expect("stalled")

        async def flood() -> None:
            for i in range(1000):
                await c.link.send(numbered(i, 64 * 1024))

        task = asyncio.ensure_future(flood())
        with anyio.fail_after(10):
            while c.link.pending_out <= hw:
                await asyncio.sleep(0)
        assert not task.done()
        c.proc.send_signal(signal.SIGKILL)
        await c.proc.wait()
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await task


@pytest.mark.single_loop
async def test_child_writer_gets_connection_closed_not_sigpipe() -> None:
    """The child writes until the parent closes its read end: it reports, exits 0."""
    async with child(mode="writer") as c:
        got = 0
        with anyio.fail_after(10):
            while got < 50:
                assert await c.link.recv() == numbered(got, 4096)
                got += 1
        await c.link.aclose()  # the reader is gone
        with anyio.fail_after(10):
            assert await c.line() == "ConnectionClosed"
            code = await c.proc.wait()
        assert code == 0, f"child writer died with {code} (-13 would be SIGPIPE)"
