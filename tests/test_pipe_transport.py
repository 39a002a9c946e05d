"""The anonymous-pipe transport: conformance and the pipe rules of the Linux IPC guide."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from ipcbus.errors import ConnectionClosed, EndOfStream, FrameTooLarge, ProtocolError
from ipcbus.frames import HEADER
from ipcbus.testing import check_link
from ipcbus.transports.base import Link
from ipcbus.transports.memory import memory_pair
from ipcbus.transports.pipe import PipeLink, enlarge_pipe, pipe_pair


@contextlib.asynccontextmanager
async def _pipes() -> AsyncIterator[tuple[Link, Link]]:
    a, b = pipe_pair()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@contextlib.asynccontextmanager
async def _memory() -> AsyncIterator[tuple[Link, Link]]:
    a, b = memory_pair()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_pipe_link_conformance() -> None:
    await check_link(_pipes)


async def test_memory_link_conformance() -> None:
    await check_link(_memory)


async def test_a_burst_reaches_the_kernel_before_the_sender_yields() -> None:
    # Frames queued without yielding to the loop are written once 64 KiB are
    # queued, so the reader can start on them while the sender goes on.
    async with _pipes() as (a, b):
        if fcntl.fcntl(a._wfd, fcntl.F_GETPIPE_SZ) < 512 * 1024:  # type: ignore[attr-defined]
            pytest.skip("the pipe could not be enlarged; the burst would not fit in it")
        frame = b"x" * 100
        for _ in range(2000):  # 208 KB of frames with their length prefixes
            a.send_nowait(frame)
        assert a.pending_out < 64 * 1024 + 104, f"{a.pending_out} bytes still queued"
        a.send_parts(b"head", b"y" * (100 * 1024))  # a large frame leaves at once too
        assert a.pending_out < 64 * 1024 + 104
        got = [await b.recv() for _ in range(2001)]
        assert got[:2000] == [frame] * 2000
        assert got[2000] == b"head" + b"y" * (100 * 1024)


async def test_urgent_frames_of_one_turn_reach_the_kernel_by_the_kilobyte() -> None:
    # Requests or replies made in one loop turn (a requester pipelining, a
    # service answering a batch): the first is written at once, the rest
    # whenever 1 KiB of them is queued, so the peer starts on them while the
    # sender makes the rest.  Published frames (send_nowait) wait for 64 KiB.
    async with _pipes() as (a, b):
        frame = b"r" * 100
        for i in range(40):  # 4,160 bytes with their length prefixes, no await
            a.send_now(frame)
            assert a.pending_out < 1024 + 104, f"{a.pending_out} bytes queued after {i + 1} frames"
        for _ in range(40):
            a.send_nowait(frame)
        assert a.pending_out >= 40 * 104  # not urgent: they wait for the turn's flush
        got = [await b.recv() for _ in range(80)]
        assert got == [frame] * 80


async def test_a_small_maximum_is_enforced_for_small_frames_too() -> None:
    # Frames up to 64 KiB take a shorter path; a link whose maximum is below
    # that must still refuse a frame over it, on either send call.
    a, b = pipe_pair(max_frame=1000)
    try:
        with pytest.raises(FrameTooLarge) as info:
            a.send_nowait(b"x" * 1001)
        assert (info.value.size, info.value.limit) == (1001, 1000)
        with pytest.raises(FrameTooLarge):
            a.send_parts(b"h", b"x" * 1000)
        with pytest.raises(ProtocolError, match="empty"):
            a.send_nowait(b"")
        a.send_nowait(b"x" * 1000)  # the maximum itself is fine; nothing else was queued
        assert await b.recv() == b"x" * 1000
        assert a.info.msgs_out == 1
    finally:
        await a.aclose()
        await b.aclose()


def _fork_a_sleeper() -> int:
    """Fork a child that sleeps for 30 s (it outlives the link by far unless killed)."""
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    return pid


def _kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # at once: it was SIGKILLed


async def test_a_forked_child_keeps_no_copy_of_a_links_fds() -> None:
    """A child forked by a linked process (os.fork, multiprocessing's "fork")
    closes its copies of the link's fds: when this side closes (or dies), the
    peer sees end of stream at once, not when the child exits."""
    a, b = pipe_pair()
    pid = _fork_a_sleeper()
    try:
        await a.aclose()
        with anyio.fail_after(5), pytest.raises(EndOfStream):
            await b.recv()
    finally:
        _kill_and_reap(pid)
        await b.aclose()


async def test_the_read_buffer_starts_small_and_grows_while_reads_fill_it() -> None:
    """A hub holds one link per client, most of them quiet: each starts with a
    64 KiB read buffer (not 1 MiB), which grows while reads come back full."""
    a, b = pipe_pair()
    try:
        assert len(b._rbuf) == 64 * 1024
        frames = [os.urandom(300_000) for _ in range(8)]
        for f in frames:
            a.send_nowait(f)
        got = [await b.recv() for _ in frames]
        assert got == frames
        assert len(b._rbuf) > 64 * 1024
        assert len(b._rbuf) <= 1 << 20
    finally:
        await a.aclose()
        await b.aclose()


def link_to_a_peer_that_wrote(frame: bytes, n: int, **kw: int) -> tuple[PipeLink, int]:
    """A link to a peer that wrote ``frame`` ``n`` times, then closed its reading
    end: returns the link and the peer's writing end (still open: close it for a
    peer that died)."""
    to_us_r, to_us_w = os.pipe()
    to_peer_r, to_peer_w = os.pipe()
    enlarge_pipe(to_us_w, 1 << 20)
    os.write(to_us_w, (HEADER.pack(len(frame)) + frame) * n)
    os.close(to_peer_r)
    return PipeLink(to_us_r, to_peer_w, **kw), to_us_w


async def frames_until(link: PipeLink, frame: bytes, end: type[Exception], match: str | None = None) -> int:
    """Receive copies of ``frame`` until ``end`` is raised; return how many came."""
    got = 0
    with pytest.raises(end, match=match):
        while True:
            assert await link.recv() == frame
            got += 1
    return got


async def test_a_write_to_a_dead_peer_while_reading_is_paused_loses_nothing_it_wrote() -> None:
    """The peer wrote 1000 frames and died; our reading is paused (the
    application lags: over high_water) when a write fails with EPIPE.  Every
    frame is still received, then the end of stream: the link did not take
    the failed write for a peer that stopped reading but still runs."""
    frame = b"x" * 500
    link, peer_w = link_to_a_peer_that_wrote(frame, 1000, high_water=2048)
    os.close(peer_w)  # the peer died: both its ends closed
    try:
        with anyio.fail_after(10):
            while link._reading:  # type: ignore[attr-defined]
                await anyio.lowlevel.checkpoint()  # it reads until over high_water, and pauses
        with contextlib.suppress(ConnectionClosed):
            link.send_nowait(b"hello")  # EPIPE (now or at the flush)
        await anyio.lowlevel.checkpoint()
        assert await frames_until(link, frame, EndOfStream) == 1000
    finally:
        await link.aclose()


async def test_a_peer_that_stopped_reading_but_runs_still_delivers_what_it_wrote() -> None:
    """The peer wrote 10 frames, then closed only its reading end (it still
    runs): our next write fails with EPIPE, and the 10 frames are received
    before ConnectionClosed (they were dropped, the error set at once)."""
    frame = b"y" * 100
    link, peer_w = link_to_a_peer_that_wrote(frame, 10)
    try:
        with contextlib.suppress(ConnectionClosed):
            link.send_now(b"request")  # an urgent write: EPIPE before the loop read anything
        assert await frames_until(link, frame, ConnectionClosed, "stopped reading") == 10
    finally:
        await link.aclose()
        os.close(peer_w)
