"""Frames and framing: the envelope round trip, stream reassembly, hostile input.

Property tests (hypothesis) check that every frame kind survives
encode/decode, that a stream of frames cut anywhere reassembles into the same
frames, and that random bytes never make the decoder raise anything but
:class:`~ipcbus.errors.ProtocolError`.  The last tests put a node behind a
link that speaks a wrong protocol version or announces a huge frame, and
check that only that link closes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tracemalloc
from collections.abc import AsyncIterator

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcbus import frames as fr
from ipcbus.client import Bus
from ipcbus.errors import EndOfStream, FrameTooLarge, ProtocolError
from ipcbus.node import Node
from ipcbus.transports.base import Link
from ipcbus.transports.memory import memory_pair
from ipcbus.transports.pipe import PipeLink

# -- strategies ----------------------------------------------------------------

# MessagePack integers: int64 .. uint64.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.text(max_size=40)
small_tuple = st.lists(texts, max_size=4).map(tuple)

hellos = st.builds(
    fr.Hello,
    version=ints,
    node_id=texts,
    pid=ints,
    uid=ints,
    name=texts,
    max_frame=ints,
)
subs = st.builds(fr.Sub, subject=texts, queue=st.none() | texts)
unsubs = st.builds(fr.Unsub, subject=texts, queue=st.none() | texts)
msgs = st.builds(
    fr.Msg,
    subject=texts,
    reply=st.none() | texts,
    headers=st.none() | st.dictionaries(texts, texts, max_size=4),
    payload=st.binary(max_size=300),
    groups=small_tuple,
)
pings = st.builds(fr.Ping, token=ints)
pongs = st.builds(fr.Pong, token=ints)
notices = st.builds(
    fr.Notice,
    code=texts,
    message=texts,
    subjects=small_tuple,
    count=ints,
)
any_frame = st.one_of(hellos, subs, unsubs, msgs, pings, pongs, notices)


def _stream(frames: list[fr.Frame]) -> tuple[bytes, list[bytes]]:
    bodies = [fr.encode_frame(f) for f in frames]
    return b"".join(fr.pack(b) for b in bodies), bodies


# -- round trip ----------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy", [hellos, subs, unsubs, msgs, pings, pongs, notices], ids=lambda s: repr(s)[:20]
)
def test_round_trip_every_kind(strategy: st.SearchStrategy[fr.Frame]) -> None:
    @given(strategy)
    @settings(max_examples=150, deadline=None)
    def check(frame: fr.Frame) -> None:
        data = fr.encode_frame(frame)
        back = fr.decode_frame(data)
        assert type(back) is type(frame)
        assert back == frame
        # and through the stream framing
        reader = fr.FrameReader()
        assert reader.feed(fr.pack(data)) == [data]
        assert reader.at_boundary()

    check()


@given(
    subject=texts,
    reply=st.none() | texts,
    headers=st.none() | st.dictionaries(texts, texts, max_size=4),
    size=st.sampled_from([0, 1, 255, 256, 65535, 65536, 70000]) | st.integers(0, 300),
)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_msg_head_plus_payload_is_the_message(
    subject: str, reply: str | None, headers: dict[str, str] | None, size: int
) -> None:
    # A large payload is sent as msg_head(...) then the payload, never joined.
    payload = bytes(i % 251 for i in range(size))
    frame = fr.msg_head(subject, reply, headers, size) + payload
    assert fr.decode_frame(frame) == fr.Msg(subject, reply, headers, payload)


def test_every_kind_has_a_distinct_tag() -> None:
    kinds = [fr.Hello, fr.Sub, fr.Unsub, fr.Msg, fr.Ping, fr.Pong, fr.Notice]
    tags = {k.__struct_config__.tag for k in kinds}
    assert len(tags) == len(kinds)


# -- stream reassembly ---------------------------------------------------------


def test_stream_cut_at_every_byte_boundary() -> None:
    frames: list[fr.Frame] = [
        fr.Hello(fr.PROTOCOL_VERSION, "abc", 1, 2, "n"),
        fr.Sub("a.b.>", "q"),
        fr.Msg("a.b.c", "_INBOX.x.1", {"k": "v"}, b"\x00" * 300),
        fr.Msg("x", payload=b"y"),
        fr.Ping(7),
        fr.Pong(7),
        fr.Unsub("a.b.>", "q"),
        fr.Notice("slow_consumer", "m", ("a",), 3),
    ]
    stream, bodies = _stream(frames)
    for cut in range(len(stream) + 1):
        reader = fr.FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == bodies, f"cut at byte {cut}"
        assert reader.at_boundary()
    # one byte at a time, and every two-way cut with a third piece
    reader = fr.FrameReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
        if i < len(stream) - 1:
            assert len(got) <= len(bodies)
    assert got == bodies
    assert [fr.decode_frame(b) for b in got] == frames


@given(
    st.lists(any_frame, min_size=1, max_size=12),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stream_random_chunkings(frames: list[fr.Frame], cuts: list[int]) -> None:
    stream, bodies = _stream(frames)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = fr.FrameReader()
    got: list[bytes] = []
    for lo, hi in itertools.pairwise(points):
        got += reader.feed(memoryview(stream)[lo:hi])
    assert got == bodies
    assert reader.at_boundary()
    assert [fr.decode_frame(b) for b in got] == frames


def test_partial_frame_is_not_at_boundary() -> None:
    data = fr.pack(fr.encode_frame(fr.Ping(1)))
    reader = fr.FrameReader()
    assert reader.feed(data[:-1]) == []
    assert not reader.at_boundary()
    assert reader.buffered == len(data) - 1
    assert reader.feed(data[-1:]) == [data[4:]]


# -- hostile input ---------------------------------------------------------------


@given(st.binary(max_size=400))
@settings(max_examples=500, deadline=None)
def test_garbage_never_crashes_decode_frame(data: bytes) -> None:
    try:
        frame = fr.decode_frame(data)
    except ProtocolError:
        return
    # Rarely, random bytes are a valid frame: then it must be a real frame kind.
    assert isinstance(frame, fr.Hello | fr.Sub | fr.Unsub | fr.Msg | fr.Ping | fr.Pong | fr.Notice)


@given(st.lists(st.binary(max_size=64), max_size=10), st.integers(1, 1 << 16))
@settings(max_examples=400, deadline=None)
def test_garbage_never_crashes_frame_reader(chunks: list[bytes], max_frame: int) -> None:
    reader = fr.FrameReader(max_frame)
    try:
        for chunk in chunks:
            for body in reader.feed(chunk):
                assert 0 < len(body) <= max_frame
                with contextlib.suppress(ProtocolError):
                    fr.decode_frame(body)
    except ProtocolError:
        # poisoned: every later feed raises the same error, never returns frames
        with pytest.raises(ProtocolError):
            reader.feed(b"\x00\x00\x00\x01x")


def test_announced_length_over_max_refused_before_allocation() -> None:
    reader = fr.FrameReader()  # default 64 MiB
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge) as info:
            reader.feed(fr.HEADER.pack(2**31) + b"abc")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.size == 2**31
    assert info.value.limit == fr.DEFAULT_MAX_FRAME
    assert "2147483648" in str(info.value)
    assert peak < 1 << 20, f"{peak} bytes allocated while refusing the frame"
    # poisoned from now on
    with pytest.raises(FrameTooLarge):
        reader.feed(fr.pack(b"ok"))


def test_zero_length_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="empty"):
        fr.FrameReader().feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="empty"):
        fr.pack(b"")


def test_pack_checks_the_maximum_before_writing() -> None:
    with pytest.raises(FrameTooLarge) as info:
        fr.pack(b"x" * 101, max_frame=100)
    assert (info.value.size, info.value.limit) == (101, 100)
    assert fr.pack(b"x" * 100, max_frame=100)[:4] == fr.HEADER.pack(100)


def test_frames_before_a_bad_header_in_the_same_chunk_are_kept() -> None:
    """Good frames, then a bad header, in one read: the frames first, then the error."""
    good = [fr.pack(fr.encode_frame(fr.Ping(i))) for i in range(3)]
    reader = fr.FrameReader(max_frame=1000)
    got = reader.feed(b"".join(good) + fr.HEADER.pack(5000) + b"junk")
    assert got == [g[4:] for g in good]
    assert isinstance(reader.error, FrameTooLarge) and reader.error.size == 5000
    with pytest.raises(FrameTooLarge):
        reader.feed(b"")
    # no good frame before it: raised at once
    reader = fr.FrameReader(max_frame=1000)
    with pytest.raises(FrameTooLarge):
        reader.feed(fr.HEADER.pack(5000))
    assert reader.error is not None


def test_wrong_kind_and_truncated_frames_are_protocol_errors() -> None:
    body = fr.encode_frame(fr.Msg("a.b", payload=b"hello"))
    for cut in range(len(body)):
        with pytest.raises(ProtocolError):
            fr.decode_frame(body[:cut])
    with pytest.raises(ProtocolError):
        fr.decode_frame(b"\x92\x63\x01")  # unknown tag 99
    with pytest.raises(ProtocolError):
        fr.decode_frame(b"\x92\x05\xa3abc")  # ping with a str token


# -- a node behind a hostile link -------------------------------------------------


@contextlib.asynccontextmanager
async def _node_with_good_peer() -> AsyncIterator[tuple[Node, Bus, Bus]]:
    """A node linked (memory) to a second, well-behaved node serving "echo"."""
    async with Node(name="n") as node, Node(name="good") as good:
        x, y = memory_pair()
        ls = await node.add_link(x, name="good", wait=False)
        await good.add_link(y, name="n")
        await ls.ready.wait()
        bus, gbus = Bus(node), Bus(good)
        await gbus.serve("echo", lambda m: m.data)
        await good.flush()
        yield node, bus, gbus


async def _read_until_eof(link: Link) -> list[fr.Frame]:
    got: list[fr.Frame] = []
    with anyio.fail_after(10):
        while True:
            try:
                got.append(fr.decode_frame(await link.recv()))
            except EndOfStream:
                return got


async def test_wrong_protocol_version_closes_only_that_link() -> None:
    async with _node_with_good_peer() as (node, bus, _gbus):
        x, raw = memory_pair()
        ls = await node.add_link(x, name="old", wait=False)
        raw.send_nowait(fr.encode_frame(fr.Hello(99, "zz", os.getpid(), os.getuid(), "old")))
        got = await _read_until_eof(raw)
        assert isinstance(got[0], fr.Hello) and got[0].version == fr.PROTOCOL_VERSION
        notices = [f for f in got if isinstance(f, fr.Notice)]
        assert notices and notices[-1].code == "protocol_error"
        assert "version 99" in notices[-1].message
        await ls.closed.wait()
        assert "protocol error" in ls.close_reason and "version 99" in ls.close_reason
        assert ls not in node.links
        rep = await bus.request("echo", b"still here", timeout=5)
        assert rep.data == b"still here"
        await raw.aclose()


async def test_huge_announced_length_on_a_pipe_closes_only_that_link() -> None:
    """A peer writes a raw header claiming 2**31 bytes: ProtocolError, that link only."""
    async with _node_with_good_peer() as (node, bus, _gbus):
        down_r, down_w = os.pipe2(os.O_CLOEXEC)
        up_r, up_w = os.pipe2(os.O_CLOEXEC)
        link = PipeLink(up_r, down_w)
        ls = await node.add_link(link, name="liar", wait=False)
        sub = await bus.subscribe("before")
        try:
            hello = fr.Hello(fr.PROTOCOL_VERSION, "liar", os.getpid(), os.getuid(), "liar")
            good = fr.encode_frame(hello), fr.encode_frame(fr.Msg("before", payload=b"sent first"))
            # one write: two good frames, then the lie
            os.write(up_w, b"".join(map(fr.pack, good)) + fr.HEADER.pack(2**31) + b"xx")
            with anyio.fail_after(10):
                await ls.closed.wait()
            # the frames sent before the bad header were not lost
            assert (await sub.next(timeout=5)).data == b"sent first"
            assert "protocol error" in ls.close_reason
            assert "2147483648" in ls.close_reason
            # what the node said before closing: its hello, then the protocol-error notice
            reader = PipeLink(down_r, up_w)
            down_r = up_w = -1
            got = await _read_until_eof(reader)
            await reader.aclose()
            last = got[-1]
            assert isinstance(last, fr.Notice) and last.code == "protocol_error"
            assert "exceeds the maximum frame size" in last.message
            rep = await bus.request("echo", b"ok", timeout=5)
            assert rep.data == b"ok"
        finally:
            for fd in (down_r, up_w):
                if fd >= 0:
                    os.close(fd)


async def test_handshake_with_a_wrong_version_raises_protocol_error() -> None:
    """``add_link`` waiting for the peer's hello reports the version mismatch as ProtocolError."""
    async with Node(name="n") as node:
        x, raw = memory_pair()
        raw.send_nowait(fr.encode_frame(fr.Hello(fr.PROTOCOL_VERSION + 1, "new", 1, 1, "new")))
        with anyio.fail_after(10), pytest.raises(ProtocolError) as info:
            await node.add_link(x, name="new")
        assert f"version {fr.PROTOCOL_VERSION + 1}" in str(info.value)
        assert "upgrade" in str(info.value)
        assert node.links == []
        await raw.aclose()


async def test_a_peer_announcing_a_tiny_max_frame_is_refused() -> None:
    """A Hello announcing max_frame under 1024 would hold the whole node to it:
    the link is refused with a protocol error; other links are untouched."""
    async with Node(name="n") as node:
        bus = Bus(node)
        await bus.serve("echo", lambda m: m.data)
        x, raw = memory_pair()
        raw.send_nowait(fr.encode_frame(fr.Hello(fr.PROTOCOL_VERSION, "tiny", 1, 1, "tiny", 10)))
        with anyio.fail_after(10), pytest.raises(ProtocolError, match="max_frame 10, below the 1024"):
            await node.add_link(x, name="tiny")
        assert node.links == [] and node._send_bound == node.max_frame
        assert (await bus.request("echo", b"still here", timeout=5)).data == b"still here"
        await raw.aclose()


@pytest.mark.parametrize("node_id", ["", "a.b", ">", "*", "two words", "tab\tbed", "x" * 65])
async def test_a_peer_announcing_a_node_id_that_is_no_subject_token_is_refused(node_id: str) -> None:
    """The node id forms the peer's inbox subject (``_INBOX.<node_id>.*``)."""
    async with Node(name="n") as node:
        bus = Bus(node)
        await bus.serve("echo", lambda m: m.data)
        x, raw = memory_pair()
        raw.send_nowait(fr.encode_frame(fr.Hello(fr.PROTOCOL_VERSION, node_id, 1, 1, "odd")))
        with anyio.fail_after(10), pytest.raises(ProtocolError, match="node id"):
            await node.add_link(x, name="odd")
        assert node.links == []
        assert (await bus.request("echo", b"still here", timeout=5)).data == b"still here"
        await raw.aclose()


@pytest.mark.parametrize(
    ("bad", "error"),
    [(100, ValueError), (0, ValueError), (1 << 32, ValueError), (True, TypeError), (2048.5, TypeError)],
)
def test_a_node_max_frame_out_of_range_is_refused(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_frame must be"):
        Node(max_frame=bad)  # type: ignore[arg-type]


async def test_first_frame_must_be_a_hello() -> None:
    async with Node(name="n") as node:
        x, raw = memory_pair()
        raw.send_nowait(fr.encode_frame(fr.Ping(1)))
        with anyio.fail_after(10), pytest.raises(ProtocolError, match="expected hello"):
            await node.add_link(x, name="rude")
        await raw.aclose()
