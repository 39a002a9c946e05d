"""The wire envelope and the framing of byte streams.

Every frame is one MessagePack array whose first element is an integer tag
naming its kind (a msgspec tagged union of ``array_like`` Structs); see
``docs/protocol.md`` for the byte-level description.  A user's payload is
encoded once by msgspec at the publisher and carried as an opaque MessagePack
``bin`` so that routing never decodes it.

Stream transports (pipes, FIFOs) prefix each frame with its length as a
4-byte big-endian unsigned integer; :class:`FrameReader` undoes that, however
the bytes were cut by ``read()``, and refuses a length above the maximum
before allocating anything.
"""

from __future__ import annotations

import struct
from typing import Final, TypeAlias

import msgspec

from .errors import FrameTooLarge, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "LARGE_PAYLOAD",
    "MAX_MAX_FRAME",
    "MIN_MAX_FRAME",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameReader",
    "Hello",
    "Msg",
    "Notice",
    "Ping",
    "Pong",
    "Sub",
    "Unsub",
    "bin_header",
    "decode_frame",
    "encode_frame",
    "msg_head",
    "pack",
]

PROTOCOL_VERSION: Final = 1
"""Version carried in :class:`Hello`; a peer announcing another one is refused."""

DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024
"""Default maximum size of one encoded frame, in bytes (64 MiB)."""

MIN_MAX_FRAME: Final = 1024
"""The smallest ``max_frame`` a node may have or announce, in bytes: a peer's
Hello announcing less is a protocol error (every control frame must fit, and a
tiny limit announced by one peer would hold the whole node to it)."""

MAX_MAX_FRAME: Final = 0xFFFFFFFF
"""The largest ``max_frame``: what the 4-byte length prefix can say."""

HEADER: Final = struct.Struct(">I")
"""The length prefix used by stream transports: 4-byte big-endian unsigned."""


class Hello(msgspec.Struct, tag=1, array_like=True, frozen=True):
    """First frame on every link, in both directions."""

    version: int
    node_id: str
    pid: int
    uid: int
    name: str = ""
    max_frame: int = DEFAULT_MAX_FRAME


class Sub(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """The sender's side now wants messages matching ``subject`` (in queue group ``queue``)."""

    subject: str
    queue: str | None = None


class Unsub(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """The sender's side no longer wants ``subject`` (in queue group ``queue``)."""

    subject: str
    queue: str | None = None


class Msg(msgspec.Struct, tag=4, array_like=True, frozen=True, omit_defaults=True):
    """A published message.

    ``groups`` lists the queue groups the receiving node must deliver this
    message to (one member each); the sender already chose this link for them.
    """

    subject: str
    reply: str | None = None
    headers: dict[str, str] | None = None
    payload: bytes = b""
    groups: tuple[str, ...] = ()


class Ping(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """Liveness and flush probe; the peer answers :class:`Pong` with the same token."""

    token: int


class Pong(msgspec.Struct, tag=6, array_like=True, frozen=True):
    """Answer to :class:`Ping`."""

    token: int


class Notice(msgspec.Struct, tag=7, array_like=True, frozen=True, omit_defaults=True):
    """An out-of-band notice between nodes.

    Codes: ``protocol_error`` (sent before closing a link), ``slow_consumer``
    (``count`` messages were dropped for the receiver, ``counts[i]`` of them
    on ``subjects[i]``; at most 64 subjects are listed), ``shutdown`` (the
    sender is going away), ``ready`` / ``setup_failed`` (a worker's setup
    function finished or raised).
    """

    code: str
    message: str = ""
    subjects: tuple[str, ...] = ()
    count: int = 0
    counts: tuple[int, ...] = ()


Frame: TypeAlias = Hello | Sub | Unsub | Msg | Ping | Pong | Notice

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Frame)
frame_decoder: Final = _decoder
"""The raw msgspec decoder of frames (raises msgspec errors; :func:`decode_frame` maps them)."""
frame_encoder: Final = _encoder
"""The raw msgspec encoder of frames (:func:`encode_frame` without a Python call around it)."""


def encode_frame(frame: Frame) -> bytes:
    """Encode one frame (without a length prefix)."""
    return _encoder.encode(frame)


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Decode one frame, raising :class:`ProtocolError` on anything malformed."""
    try:
        return _decoder.decode(data)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed frame ({len(data)} bytes): {exc}") from None


LARGE_PAYLOAD: Final = 64 * 1024
"""Payloads from this size on travel as two parts (see :func:`msg_head`), not copied into one frame."""

_BIN8, _BIN16, _BIN32 = b"\xc4", b"\xc5", b"\xc6"


def msg_head(subject: str, reply: str | None, headers: dict[str, str] | None, size: int) -> bytes:
    """The encoded :class:`Msg` up to its payload: ``msg_head(...) + payload`` is the frame.

    Lets a large payload go to a link as a second part, never copied into a
    frame of its own.  The frame is the MessagePack array of a :class:`Msg`
    without its last element (``groups``, empty: a trailing field left at its
    default may be omitted), so the payload (``bin``) ends it.  Built from
    the encoding of the message with a one-byte payload: one element fewer
    in the array header, and that payload's ``c4 01 00`` (then ``90``, the
    empty ``groups``) replaced by the ``bin`` header of ``size`` bytes.
    """
    probe = _encoder.encode(Msg(subject, reply, headers, b"\x00"))
    if probe[0] != 0x96 or not probe.endswith(b"\xc4\x01\x00\x90"):
        raise AssertionError(f"unexpected encoding of a Msg: {probe[:8].hex()}...")  # pragma: no cover
    return b"\x95" + probe[1:-4] + bin_header(size)


_BIN8_HEADERS: Final = tuple(_BIN8 + bytes((n,)) for n in range(256))


def bin_header(size: int) -> bytes:
    """The MessagePack ``bin`` header of ``size`` bytes (what :func:`msg_head` ends with)."""
    if size < 0x100:
        return _BIN8_HEADERS[size]
    if size < 0x10000:
        return _BIN16 + size.to_bytes(2, "big")
    return _BIN32 + size.to_bytes(4, "big")


def pack(frame: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Length-prefix one encoded frame for a stream, checking the maximum first."""
    n = len(frame)
    if n > max_frame:
        raise FrameTooLarge(n, max_frame)
    if n == 0:
        raise ProtocolError("refusing to send an empty frame")
    return HEADER.pack(n) + frame


class FrameReader:
    """Reassembles length-prefixed frames from arbitrary chunks of a byte stream.

    ``feed()`` accepts whatever one ``read()`` returned and gives back every
    frame now complete, in order.  A length above ``max_frame`` (or zero)
    raises :class:`FrameTooLarge` / :class:`ProtocolError` before any buffer
    for it is allocated.  After an error the reader is poisoned: the stream
    can no longer be trusted and its link must close.  Frames completed before
    a bad header in the same chunk are still returned (the peer sent them
    first); the error is then in :attr:`error` and raised by the next ``feed()``.
    """

    __slots__ = ("_buf", "_poisoned", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._poisoned: ProtocolError | None = None

    @property
    def error(self) -> ProtocolError | None:
        """The error that poisoned this reader, or None while the stream is sound."""
        return self._poisoned

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (a partial frame)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume one chunk; return the frames it completed."""
        if self._poisoned is not None:
            raise self._poisoned
        buf = self._buf
        if buf:
            buf += data  # amortised append: a large frame arriving in pieces is not recopied
            mv = memoryview(buf)
        else:
            mv = memoryview(data)
        out: list[bytes] = []
        append = out.append
        pos = 0
        end = len(mv)
        unpack = HEADER.unpack_from
        limit = self.max_frame
        try:
            while end - pos >= 4:
                (n,) = unpack(mv, pos)
                if n > limit or n == 0:
                    err: ProtocolError = (
                        FrameTooLarge(n, limit, "announced frame")
                        if n
                        else ProtocolError("peer announced an empty frame")
                    )
                    self._poisoned = err
                    if out:
                        # Hand over the good frames that came before the bad header
                        # (the peer sent them first); the error is raised by the next
                        # feed() and is visible at once as `error`.
                        return out
                    raise err
                stop = pos + 4 + n
                if stop > end:
                    break
                append(mv[pos + 4 : stop].tobytes())
                pos = stop
            if pos == end:
                rest = None
            elif pos == 0 and buf:
                rest = buf  # nothing complete yet: keep accumulating in place
            else:
                rest = bytearray(mv[pos:])
        finally:
            mv.release()
        if rest is None:
            if buf:
                buf.clear()
        elif rest is not buf:
            self._buf = rest
        return out

    def at_boundary(self) -> bool:
        """True when no partial frame is pending (end of stream here is clean)."""
        return not self._buf
