"""The shared-memory transport: two ring buffers in one SysV segment.

A link is one SysV shared-memory segment that both processes map, holding a
4 KiB header and two single-producer/single-consumer rings, one per
direction.  A frame is copied once into the ring (``memoryview`` slice
assignment) and once out of it (``bytes`` of a slice); the kernel copies
nothing.  ``docs/transports/shm.md`` describes the layout and the protocol
byte by byte; the short version:

* The ring holds *records*: an 8-byte header (u32 tag, u32 length) and the
  payload, padded to 8 bytes.  Small frames (under 4 KiB) gathered in one
  loop turn share one ``FRAMES`` record, each behind its u32 length.  A frame
  that fits before the end of the ring and is at most half of it is one
  ``FRAME`` record.  Any other frame is streamed: ``BEGIN`` (its total
  length), then ``PIECE`` records; the reader delivers it whole.  ``EOF``
  ends the stream; ``ATTACHED`` tells the creator its peer is in.
* Records are published in batches.  Four POSIX named semaphores count
  them: for each ring, ``items`` (the writer posts one per batch it
  publishes, the reader takes one before reading the batch) and ``space``
  (the reader posts one per batch it is done with, the writer takes one
  before reusing its room).  A post and the wait that takes it are a
  release/acquire pair: the reader only reads bytes whose publication it
  took a token for, the writer only overwrites room whose release it took a
  token for.  That is the whole memory-ordering argument; the head and tail
  counters in the header serve bounds checks and diagnostics.
* The event loop cannot poll a semaphore, so each side also has a *bell*, a
  FIFO the loop watches.  The writer rings the reader's bell after every
  commit; a writer short of room rings once to ask, and the reader rings
  back when it has released some.  A ring is a ``write(2)`` and waking is a
  ``read(2)``: these system calls, on the same pipe, order the post before
  the ring with the wait after the wake, so no wake-up is ever lost (no
  flag, no fence, no timeout).  Measured against a thread blocked in
  ``sem_wait``: one wake-up per hop instead of two, 3x lower latency.
* Crash safety: the segment is marked ``IPC_RMID`` and the semaphore and
  FIFO names unlinked as soon as the peer has attached, so the kernel frees
  everything when the last process goes, however it dies.  A peer that
  closes or dies closes its end of our bell (end of file) and its pidfd
  turns readable.  Counting semaphores are not locks: a process killed
  between two operations leaves nothing held (no ``SEM_UNDO`` needed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import fcntl
import io
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import posix_ipc
import sysv_ipc

from .. import records
from ..checks import check_count
from ..errors import (
    ConnectionClosed,
    EndOfStream,
    FrameTooLarge,
    IpcBusError,
    PermissionRefused,
    ProtocolError,
)
from ..frames import DEFAULT_MAX_FRAME, LARGE_PAYLOAD, PROTOCOL_VERSION, Msg
from ..heap import keep_heap
from .base import Link, LinkInfo, WriteWaiters, stored

if TYPE_CHECKING:
    from .door import Knock

__all__ = [
    "DEFAULT_RING_SIZE",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "SHM_HIGH_WATER",
    "ShmAcceptor",
    "ShmLink",
    "check_ring_size",
    "connect_shm",
]

log = logging.getLogger("ipcbus.shm")

# -- layout ------------------------------------------------------------------

MAGIC: Final = b"IPCBSHM\0"
"""First 8 bytes of every ipcbus shared-memory segment."""
LAYOUT_VERSION: Final = 1
"""Version of the segment layout and ring protocol described in docs/transports/shm.md."""
HEADER_SIZE: Final = 4096
"""Bytes before the first ring (one page)."""
DEFAULT_RING_SIZE: Final = 8 * 1024 * 1024
"""Bytes per direction.  Seven 1 MiB frames fit at once, so in a stream of them the
writer and the reader never wait on each other's copy: measured 12 GB/s on two CPUs,
against 3-6 GB/s (erratic) with a 4 MiB ring (docs/transports/shm.md)."""
SHM_HIGH_WATER: Final = 256 * 1024
"""Bytes queued beyond the ring before :meth:`ShmLink.send` waits.  The ring is the
buffer; a large queue in front of it would only add copies and latency."""
MIN_RING_SIZE: Final = 4096
MAX_RING_SIZE: Final = 1 << 30

# Header fields, in the host's byte order (both ends share the host; little
# endian on x86-64 and arm64).  Counters sit on their own 64-byte lines so
# that the two processes do not bounce one cache line between them.
_OFF_MAGIC = 0  # 8s
_OFF_VERSION = 8  # u32 layout version
_OFF_HDRSIZE = 12  # u32 header size
_OFF_RING0 = 16  # u64 ring 0 size (creator -> attacher)
_OFF_RING1 = 24  # u64 ring 1 size (attacher -> creator)
_OFF_MAXFRAME = 32  # u64 creator's max frame
_OFF_CPID = 40  # u32 creator pid
_OFF_APID = 44  # u32 attacher pid (0 until attached)
_OFF_CFLAGS = 48  # u32 creator flags
_OFF_AFLAGS = 52  # u32 attacher flags
_OFF_NONCE = 56  # 16 random bytes, also in the params handed to the attacher
_OFF_HEAD0 = 128  # u64 bytes ever published into ring 0 (by the creator)
_OFF_TAIL0 = 192  # u64 bytes ever read from ring 0 (by the attacher)
_OFF_HEAD1 = 256  # u64 ring 1 head (written by the attacher)
_OFF_TAIL1 = 320  # u64 ring 1 tail (written by the creator)
_NONCE_LEN = 16

_FLAG_ATTACHED: Final = 1
_FLAG_CLOSED: Final = 2

# Record tags.
_FRAME: Final = 1  # a whole frame of `length` bytes follows
_BEGIN: Final = 2  # a streamed frame of `length` bytes starts; PIECE records follow
_PIECE: Final = 3  # `length` bytes of the streamed frame
_PAD: Final = 4  # skip to the end of the ring (`length` = bytes skipped after this header)
_EOF: Final = 5  # the writer closed the link
_ATTACHED: Final = 6  # first record from the attacher: its pid is in the header
_FRAMES: Final = 7  # `length` bytes of small frames, each a u32 length then its bytes
_TAG_NAMES: Final = {1: "FRAME", 2: "BEGIN", 3: "PIECE", 4: "PAD", 5: "EOF", 6: "ATTACHED", 7: "FRAMES"}
_KIND: Final = 0xFF  # the record kind is the tag's low byte
_END: Final = 0x100  # flag: last record of a committed batch (the reader returns its token)
_FRAME_END: Final = _FRAME | _END
_FRAMES_END: Final = _FRAMES | _END
_SMALL: Final = 4096  # frames below this many bytes are packed into FRAMES records...
_SMALL_BATCH: Final = 64 * 1024  # ...of up to this many bytes (less in a small ring)
_U32 = struct.Struct("=I")  # the length before each frame in a FRAMES record

_REC = struct.Struct("=II")  # record header: tag, length
_REC_SIZE: Final = 8
# The same header as one u64 (the fast paths read and write it as one item of
# a "Q" view): tag in the first four bytes, length in the next four.
_TAG_SHIFT: Final = 0 if sys.byteorder == "little" else 32
_LEN_SHIFT: Final = 32 - _TAG_SHIFT
_M32: Final = 0xFFFFFFFF
_FRAME_HDR: Final = _FRAME << _TAG_SHIFT
_FRAMES_HDR: Final = _FRAMES << _TAG_SHIFT
_END_BIT: Final = _END << _TAG_SHIFT
_MAX_LEN: Final = 0xFFFFFFFF

# Bell bytes.  Any byte means "look again"; only SPACE? asks for an answer.
_RING_DATA: Final = b"d"  # writer -> reader: a batch was committed (or EOF)
_RING_WANT: Final = b"s"  # writer -> reader: I am short of room, ring me when you free some
_RING_FREED: Final = b"f"  # reader -> writer: I released room

_RX_BATCH: Final = 512  # records moved from the ring to the inbox per pump...
_RX_BYTES: Final = 256 * 1024  # ...or bytes: copy out little ahead of recv(), give room back
# early, and keep few large frames alive at once (glibc then reuses their memory instead of
# trimming it and faulting fresh pages in for the next one: measured 3x slower at 1 MiB)
_SEM_DIR: Final = "/dev/shm"

# The segment is created with shmget(2) directly: sysv_ipc's constructor
# memsets the whole new segment (touching and committing every page, ~6 ms
# and 8 MiB of RSS per default link); the kernel already zero-fills lazily.
_libc = ctypes.CDLL(None, use_errno=True)
_shmget = _libc.shmget
_shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
_shmget.restype = ctypes.c_int
_IPC_PRIVATE: Final = 0


class _Parts:
    """A frame queued as two parts (:meth:`ShmLink.send_parts`): ``head + body``."""

    __slots__ = ("body", "head", "n")

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body
        self.n = len(head) + len(body)

    def __len__(self) -> int:
        return self.n


def _copy_in(mv: memoryview, at: int, frame: bytes | _Parts, off: int, n: int) -> None:
    """Copy bytes ``[off, off + n)`` of ``frame`` to ``mv[at:]``: the one copy into the ring."""
    if type(frame) is bytes:
        if off == 0 and n == len(frame):
            mv[at : at + n] = frame
        else:
            with memoryview(frame) as fv:
                mv[at : at + n] = fv[off : off + n]
        return
    assert isinstance(frame, _Parts)
    for part in (frame.head, frame.body):
        k = len(part)
        if off >= k:
            off -= k
            continue
        k = min(k - off, n)
        if off == 0 and k == len(part):
            mv[at : at + k] = part
        else:
            with memoryview(part) as pv:
                mv[at : at + k] = pv[off : off + k]
        at += k
        n -= k
        off = 0
        if not n:
            return


def _split_frames(data: bytes, max_frame: int, append: Callable[[bytes], None]) -> int:
    """Append the frames of a FRAMES record's payload; return their total size.

    Raises :class:`FrameTooLarge` for a frame above ``max_frame`` and
    :class:`ProtocolError` when a length is cut off, zero or runs past the
    record; the frames before it are delivered.
    """
    n = len(data)
    i = 0
    total = 0
    unpack = _U32.unpack_from
    while i < n:
        if i + 4 > n:
            raise ProtocolError(f"shm link: a FRAMES record ends inside a frame length (offset {i} of {n})")
        ln = unpack(data, i)[0]
        i += 4
        if ln > max_frame:
            raise FrameTooLarge(ln, max_frame, "announced frame")
        if not 0 < ln <= n - i:
            raise ProtocolError(
                f"shm link: a frame of {ln} bytes in a FRAMES record with {n - i} bytes left: "
                "the ring is corrupted"
            )
        append(data[i : i + ln])
        i += ln
        total += ln
    return total


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _sem_path(name: str) -> str:
    """Where glibc keeps the POSIX named semaphore ``name``."""
    return f"{_SEM_DIR}/sem.{name.lstrip('/')}"


def _sem_ident(name: str) -> str:
    """How a semaphore is named in the bus records: its name without the leading slash
    (the file is ``/dev/shm/sem.<ident>``)."""
    return name.lstrip("/")


def _shm_create(size: int, mode: int, key: int = _IPC_PRIVATE) -> int:
    """``shmget(key, size, IPC_CREAT | IPC_EXCL | mode)``; returns the id.

    Raises ``FileExistsError`` when ``key`` is taken.
    """
    shmid = int(_shmget(key, size, sysv_ipc.IPC_CREAT | sysv_ipc.IPC_EXCL | mode))
    if shmid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"shmget of {size} bytes failed: {os.strerror(err)}")
    return shmid


def _shm_stat(shmid: int) -> dict[str, int] | None:
    """The row of ``/proc/sysvipc/shm`` for ``shmid`` (None if no such segment).

    Read before attaching, so that a foreign segment is refused without our
    ``shmat`` touching it (its nattch, lpid, atime).  An ``OSError`` reading
    the table (``EMFILE``: this process is out of file descriptors) is
    raised, not taken for a missing segment.
    """
    with open("/proc/sysvipc/shm") as f:
        names = f.readline().split()
        for line in f:
            parts = line.split()
            if len(parts) == len(names) and parts[1] == str(shmid):
                try:
                    row = {k: int(v) for k, v in zip(names, parts, strict=True) if k != "perms"}
                    row["perms"] = int(parts[names.index("perms")], 8)
                except ValueError:
                    return None
                return row
    return None


def _bus_mode(busdir: Path | None) -> tuple[int, int | None]:
    """(mode, gid) for objects of the bus in ``busdir``: 0660 + its group if shared, else 0600."""
    if busdir is None:
        return 0o600, None
    try:
        st = os.stat(busdir)
    except OSError:
        return 0o600, None
    if st.st_mode & 0o060:
        return 0o660, st.st_gid
    return 0o600, None


def check_ring_size(ring_size: Any) -> int:
    """``ring_size`` if it is a valid ring size (each direction's ring, in
    bytes); else ``TypeError``/``ValueError`` saying what is."""
    size = check_count("ring_size", ring_size, MIN_RING_SIZE, "bytes", MAX_RING_SIZE)
    if size % 4096:
        raise ValueError(f"ring_size {size!r} must be a multiple of 4096 (bytes)")
    return size


def _check_mode(mode: int) -> int:
    if mode & ~0o660 or (mode & 0o600) != 0o600:
        raise ValueError(
            f"mode {mode:#o} is not allowed for shared-memory links: use 0o600 (private) "
            "or 0o660 (a group bus); the owner needs read and write, others nothing"
        )
    return mode


def _ring(fd: int, byte: bytes) -> bool | None:
    """Write one byte into a bell; False if its reader is gone, None if the bell is
    full of unread rings (the reader wakes anyway, but does not see this byte)."""
    try:
        os.write(fd, byte)
    except BlockingIOError:
        return None
    except OSError as exc:  # EPIPE (Python ignores SIGPIPE): nobody reads it any more
        if exc.errno in (errno.EPIPE, errno.EBADF):
            return False
        raise
    return True


# -- the link ----------------------------------------------------------------


class ShmLink(Link):
    """A link over one shared-memory segment: two rings, four semaphores, two bells.

    Build one with :meth:`create` (the side that owns the kernel objects) and
    :meth:`attach` (the peer), or through :func:`connect_shm` /
    :class:`ShmAcceptor` on a bus.  Frames sent before the peer attaches wait
    in the ring.
    """

    def __init__(
        self,
        *,
        shm: Any,
        creator: bool,
        ring0: int,
        ring1: int,
        sems: tuple[Any, Any, Any, Any],
        sem_names: tuple[str, str, str, str],
        bell_r: int,
        bell_w: int,
        bell_paths: tuple[str, str],
        bell_dir: str | None,
        busdir: Path | None,
        recorded: bool,
        max_frame: int,
        peer_pid: int | None,
        peer_uid: int | None,
    ) -> None:
        keep_heap()  # large frames: do not re-fault the heap for every message (see ipcbus.heap)
        self._shm = shm
        self._mv: memoryview | None = memoryview(shm)
        # Fields the peer may read while we write them go through views cast
        # to "Q"/"I": CPython stores such an item with one memcpy of its size,
        # a single aligned store.  struct.pack_into is NOT usable for them: it
        # zero-fills the field before writing it (measured: a reader in the
        # other process sees 0 about one time in ten).
        self._hq: memoryview | None = self._mv.cast("Q")  # header fields and record headers
        self._hi: memoryview | None = self._mv[:HEADER_SIZE].cast("I")
        self._creator = creator
        self._busdir = busdir
        self._recorded = recorded
        self._own_folder = False  # busdir is this process's records folder (a direct link)
        self._sems = sems
        self._sem_names = sem_names
        self._bell_r = bell_r  # our bell: the peer rings it, the loop watches it
        self._bell_w = bell_w  # the peer's bell
        self._want_waits = False  # a request for room waits for room in the peer's bell
        self._bell_paths = bell_paths
        self._bell_dir = bell_dir  # a private directory made for the bells (direct links)
        self.max_frame = max_frame
        self.high_water = SHM_HIGH_WATER
        self.close_timeout = 2.0
        """Seconds :meth:`aclose` waits for queued frames to fit in the ring."""
        self.info = LinkInfo(
            transport="shm",
            peer_pid=peer_pid,
            peer_uid=peer_uid,
            objects={
                "shmid": shm.id,
                "ring_size": ring0 if creator else ring1,
                "role": "creator" if creator else "attacher",
                "sems": list(sem_names),
            },
        )
        items0, space0, items1, space1 = sems
        base0 = HEADER_SIZE
        base1 = HEADER_SIZE + ring0
        if creator:
            # ring offset in the segment, ring size, head and tail (indices into _hq)
            self._tx_base, self._tx_size = base0, ring0
            self._tx_hi, self._tx_ti = _OFF_HEAD0 // 8, _OFF_TAIL0 // 8
            self._rx_base, self._rx_size = base1, ring1
            self._rx_hi, self._rx_ti = _OFF_HEAD1 // 8, _OFF_TAIL1 // 8
            self._tx_items, self._tx_space, self._rx_items, self._rx_space = sems
            self._my_flags, self._peer_flags = _OFF_CFLAGS // 4, _OFF_AFLAGS // 4
        else:
            self._tx_base, self._tx_size = base1, ring1
            self._tx_hi, self._tx_ti = _OFF_HEAD1 // 8, _OFF_TAIL1 // 8
            self._rx_base, self._rx_size = base0, ring0
            self._rx_hi, self._rx_ti = _OFF_HEAD0 // 8, _OFF_TAIL0 // 8
            self._tx_items, self._tx_space = items1, space1
            self._rx_items, self._rx_space = items0, space0
            self._my_flags, self._peer_flags = _OFF_AFLAGS // 4, _OFF_CFLAGS // 4
        tx_size = self._tx_size
        self._contig_max = tx_size // 2  # records up to this size are never split
        self._piece_max = max(_REC_SIZE * 8, tx_size // 4)
        self._piece_min = max(_REC_SIZE, min(64 * 1024, tx_size // 8))
        self._batch_max = max(_REC_SIZE * 8, tx_size // 8)  # commit once a batch is this big

        # sending
        self._txq: collections.deque[bytes | _Parts] = collections.deque()
        self._tx_off = -1  # bytes of txq[0] already in the ring; -1: not started
        self._pending = 0
        self._tx_head = 0
        self._tx_tail = 0  # end of the batches the reader has released
        self._tx_committed = 0  # head at the last commit
        self._last_at = -1  # where the last record written starts (gets _END on commit)
        self._commit_scheduled = False
        # Small frames wait here (each after its u32 length) until the end of
        # the loop turn, then go into the ring as one FRAMES record: one record
        # header, one copy and one bookkeeping step for many frames.
        self._small: list[bytes] = []
        self._small_n = 0
        self._small_max = min(_SMALL_BATCH, self._contig_max // 2)
        self._small_frame = min(_SMALL, self._small_max // 2)
        self._tx_inflight: collections.deque[int] = collections.deque()  # committed batch sizes
        self._tx_error: ConnectionClosed | None = None
        self._tx_broken = False  # the tx ring itself is untrustworthy (no EOF on close)
        self._tx_blocked = False  # waiting for the reader to free room
        self._wwaiters = WriteWaiters()
        # receiving
        self._rx_pos = 0
        self._rx_tokens = 0
        # False once a pump found no token and the bell has not rung since: a
        # post always comes before its ring, so there is nothing to look for.
        self._rx_dirty = True
        self._rx_again = False  # a pass that ran out of budget scheduled another
        self._inbox: collections.deque[bytes | Msg] = collections.deque()
        # Bytes of the frames in the inbox (approximate for decoded Msgs: their
        # frame size when added, their payload when taken); a bound, for take_ready.
        self._inbox_bytes = 0
        # A streamed frame in progress: up to half the ring, we keep views of its
        # pieces in the ring (holding back their batches) and join them with one
        # copy at the end; a larger frame is copied piece by piece into a BytesIO.
        self._streaming = False
        self._asm: io.BytesIO | None = None
        self._asm_views: list[memoryview] | None = None
        self._held = 0  # batches not given back while their pieces are viewed
        self._asm_left = 0
        self._asm_total = 0
        self._rx_end: IpcBusError | None = None
        self._rx_fut: asyncio.Future[None] | None = None
        self._unannounced = 0  # space batches posted since our last FREED ring
        self._peer_wants_room = False
        # lifetime
        self._attached = not creator
        self._expected_peer: int | None = None
        self._peer_gone = False
        self._pidfd = -1
        self._watched_pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- construction ------------------------------------------------------

    @classmethod
    def create(
        cls,
        busdir: Path | None,
        *,
        ring_size: int = DEFAULT_RING_SIZE,
        mode: int = 0o600,
        gid: int | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> tuple[ShmLink, dict[str, int | str]]:
        """Create a segment, its four semaphores and two bells; return the link and the params.

        Hand ``params`` to the peer by any channel (argv, a pipe, a knock);
        it calls :meth:`attach`.  With ``busdir``, the bells are made there
        and every object is recorded there (for ``ipcbus ls`` / ``ipcbus gc``)
        until the peer has attached, at which point none of them can leak any
        more.  Without, they are made and recorded in this process's records
        folder under the bus root (``_pool-<pid>-<start>``, shared with its
        worker pools; ``ipcbus gc --all`` collects it once the process is
        gone), or, when that folder cannot be made, in a private temporary
        directory, unrecorded.
        ``mode`` is 0o600, or 0o660 with ``gid`` for a group bus.  A group
        link needs ``busdir``, a folder the group can reach (its bells are
        made there): ``gid`` without it raises ``ValueError``.
        """
        _check_mode(mode)
        if gid is not None and busdir is None:
            raise ValueError(
                f"a group link (gid={gid}) needs busdir: a folder its group can reach, where its "
                "bells are made and its objects recorded (a private link takes no gid)"
            )
        check_ring_size(ring_size)
        if not 1 <= max_frame <= _MAX_LEN:
            raise ValueError(f"max_frame must be between 1 and {_MAX_LEN} bytes, not {max_frame}")
        own_folder = busdir is None
        busdir = Path(busdir) if busdir is not None else _process_folder()
        own_folder = own_folder and busdir is not None
        size = HEADER_SIZE + 2 * ring_size
        nonce = secrets.token_bytes(_NONCE_LEN)
        token = nonce[:6].hex()  # ties the object names to this segment (see _parse_params)
        pid = os.getpid()
        names = tuple(f"/ipcbus.{pid}.{token}.{i}" for i in range(4))
        made = _Made(busdir)
        try:
            # Every object is recorded before it is made (records.create_keyed
            # for the segment, whose id the kernel picks): killed anywhere in
            # here, this process leaves nothing that `ipcbus gc` cannot find.
            shmid = made.shmid = made.create_segment(size, mode, extra={"size": size, "sems": list(names)})
            shm = made.shm = sysv_ipc.attach(shmid)
            if gid is not None:
                shm.gid = gid  # IPC_SET
            for name in names:
                path = _sem_path(name)
                made.record("posix_sem", _sem_ident(name), extra={"name": name, "path": path})
                made.sems.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode, 0))
                made.sem_names.append(name)
                # sem_open applies the umask; set exactly the mode (and group) asked for.
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)
            # The bells: FIFOs, so that each event loop can poll its own.
            if busdir is None:
                made.bell_dir = tempfile.mkdtemp(prefix="ipcbus-shm-")
            bell_dir = made.bell_dir or str(busdir)
            bells = (f"{bell_dir}/shm-{pid}-{token}.c.bell", f"{bell_dir}/shm-{pid}-{token}.a.bell")
            for path in bells:
                made.record("fifo", path)
                os.mkfifo(path, 0o600)
                made.fifos.append(path)
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)
            # Our bell's read end; the peer's bell O_RDWR: open never blocks and
            # cannot fail for want of a reader (Linux), and rings made before
            # the peer opens its end wait in the pipe.
            made.fds.append(os.open(bells[0], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW))
            made.fds.append(os.open(bells[1], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW))
            with memoryview(shm) as mv:
                struct.pack_into(
                    "=IIQQQII",
                    mv,
                    _OFF_VERSION,
                    LAYOUT_VERSION,
                    HEADER_SIZE,
                    ring_size,
                    ring_size,
                    max_frame,
                    pid,
                    0,
                )
                mv[_OFF_NONCE : _OFF_NONCE + _NONCE_LEN] = nonce
                mv[_OFF_MAGIC : _OFF_MAGIC + 8] = MAGIC  # last: a half-made header has no magic
        except BaseException:
            made.undo()
            if own_folder:
                _drop_process_folder(busdir)
            raise
        sems = made.sems
        link = cls(
            shm=shm,
            creator=True,
            ring0=ring_size,
            ring1=ring_size,
            sems=(sems[0], sems[1], sems[2], sems[3]),
            sem_names=(names[0], names[1], names[2], names[3]),
            bell_r=made.fds[0],
            bell_w=made.fds[1],
            bell_paths=bells,
            bell_dir=made.bell_dir,
            busdir=busdir,
            recorded=busdir is not None,
            max_frame=max_frame,
            peer_pid=None,
            peer_uid=None,
        )
        link._own_folder = own_folder
        params: dict[str, int | str] = {
            "layout": LAYOUT_VERSION,
            "shmid": shmid,
            "size": size,
            "ring0": ring_size,
            "ring1": ring_size,
            "nonce": nonce.hex(),
            "sem0": names[0],
            "sem1": names[1],
            "sem2": names[2],
            "sem3": names[3],
            "bell0": bells[0],
            "bell1": bells[1],
        }
        return link, params

    @classmethod
    async def attach(
        cls,
        params: Mapping[str, int | str],
        *,
        peer_pid: int,
        peer_uid: int | None = None,
        busdir: Path | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> ShmLink:
        """Attach to a segment made by :meth:`create` in process ``peer_pid``.

        Verifies, before trusting a byte of it, that the segment was created by
        ``peer_pid``, that it and the semaphores and bells are owned by
        ``peer_uid`` (default: our uid) and not open to other users
        (:class:`~ipcbus.errors.PermissionRefused`), that it is the segment
        announced (nonce, size) and that its header is an ipcbus header of
        this layout version (:class:`~ipcbus.errors.ProtocolError`).  Then it
        unlinks the semaphores and bells, marks the segment ``IPC_RMID`` (both
        sides are attached: from now on nothing can leak) and tells the
        creator with an ``ATTACHED`` record.
        """
        if not 1 <= max_frame <= _MAX_LEN:
            raise ValueError(f"max_frame must be between 1 and {_MAX_LEN} bytes, not {max_frame}")
        want_uid = os.getuid() if peer_uid is None else peer_uid
        p = _parse_params(params)
        shmid = p.shmid
        row = _shm_stat(shmid)
        if row is None:
            raise ConnectionClosed(
                f"shared-memory segment {shmid} does not exist (its creator, pid {peer_pid}, "
                "gave up or died); connect again"
            )
        _check_segment_row(row, shmid, p.size, peer_pid, want_uid)
        if p.sem_names[0].split(".")[1] != str(peer_pid):
            raise ProtocolError(
                f"shm link params: the semaphore names are not those of pid {peer_pid}, "
                "which created the segment; pass the params the creator gave"
            )
        try:
            shm = sysv_ipc.attach(shmid)
        except sysv_ipc.PermissionsError as exc:
            raise PermissionRefused(f"may not attach shared-memory segment {shmid}: {exc}") from None
        except sysv_ipc.ExistentialError:
            raise ConnectionClosed(f"shared-memory segment {shmid} vanished while attaching") from None
        sems: list[Any] = []
        fds: list[int] = []
        mv: memoryview | None = None
        try:
            # Re-check through the attached id: the row above could describe a
            # segment that was removed and its id reused in between.
            _check_segment_row(
                {
                    "uid": shm.uid,
                    "cuid": shm.cuid,
                    "cpid": shm.creator_pid,
                    "perms": shm.mode & 0o777,
                    "size": shm.size,
                },
                shmid,
                p.size,
                peer_pid,
                want_uid,
            )
            mv = memoryview(shm)
            _check_header(mv, p, peer_pid)
            for name in p.sem_names:
                st = _check_owned_file(_sem_path(name), f"semaphore {name}", want_uid, stat.S_ISREG)
                if st.st_size < _SEM_T_SIZE:  # sem_open would map it, and the first use SIGBUS
                    raise ProtocolError(
                        f"semaphore {name} is a {st.st_size}-byte file, smaller than a "
                        f"semaphore ({_SEM_T_SIZE} bytes): not made by sem_open; refusing it"
                    )
                try:
                    sems.append(posix_ipc.Semaphore(name))
                except posix_ipc.ExistentialError:
                    raise ConnectionClosed(
                        f"semaphore {name} of segment {shmid} does not exist (its creator "
                        "gave up or died); connect again"
                    ) from None
                except posix_ipc.PermissionsError as exc:
                    raise PermissionRefused(f"may not open semaphore {name}: {exc}") from None
            # Our bell (the creator's bell1), then the creator's (bell0), write-only:
            # ENXIO there means nobody reads it any more, the creator is gone.
            fds.append(_open_bell(p.bells[1], os.O_RDONLY, want_uid))
            # The claim: the header's "attached" mark is written only after
            # the checks, so two processes attaching at once would both pass
            # them.  An exclusive lock on our bell (held while its fd is open,
            # which is for the link's life) lets exactly one through.
            try:
                fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PermissionRefused(
                    f"another process is attaching to shared-memory segment {shmid} at the "
                    "same time; a link has exactly two ends"
                ) from None
            fds.append(_open_bell(p.bells[0], os.O_WRONLY, want_uid))
            if shm.number_attached < 2:
                raise ConnectionClosed(
                    f"the creator of shared-memory segment {shmid} (pid {peer_pid}) "
                    "has already detached from it; connect again"
                )
            # Both sides are attached and both bells open at both ends.  Unlink
            # every name and mark the segment for removal now: each object lives
            # on while someone uses it, and the kernel frees it when the last
            # process goes, however it dies.
            # On a group bus the creator may be another user: only it may unlink
            # its names and remove its segment, and it does so too once it
            # sees us attached (_on_attached).
            for name in p.sem_names:
                with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError):
                    posix_ipc.unlink_semaphore(name)
            for path in p.bells:
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    os.unlink(path)
            with contextlib.suppress(sysv_ipc.PermissionsError):
                shm.remove()
            with mv[:HEADER_SIZE] as hdr, hdr.cast("I") as hi:
                hi[_OFF_APID // 4] = os.getpid()
                hi[_OFF_AFLAGS // 4] = _FLAG_ATTACHED
            mv.release()
            mv = None
        except BaseException:
            if mv is not None:
                mv.release()
            for fd in fds:
                os.close(fd)
            for sem in sems:
                with contextlib.suppress(posix_ipc.Error):
                    sem.close()
            with contextlib.suppress(sysv_ipc.Error):
                shm.detach()
            raise
        link = cls(
            shm=shm,
            creator=False,
            ring0=p.ring0,
            ring1=p.ring1,
            sems=(sems[0], sems[1], sems[2], sems[3]),
            sem_names=p.sem_names,
            bell_r=fds[0],
            bell_w=fds[1],
            bell_paths=p.bells,
            bell_dir=None,
            busdir=busdir,
            recorded=False,
            max_frame=max_frame,
            peer_pid=peer_pid,
            peer_uid=want_uid,
        )
        link._get_loop()
        # Tell the creator who we are: the first record of our ring.
        link._put(_ATTACHED, b"", 0, 0)
        link._commit()
        link._watch_peer(peer_pid)
        return link

    async def wait_attached(self, peer_pid: int | None = None) -> None:
        """On the creating side, wait until the peer has attached (no-op on the attacher).

        With ``peer_pid`` (when the creator knows who will attach, e.g. a
        worker it spawned), the wait fails with
        :class:`~ipcbus.errors.ConnectionClosed` as soon as that process
        exits, and an attacher with another pid is refused
        (:class:`~ipcbus.errors.PermissionRefused`).  Bound the wait with a
        timeout (``asyncio.timeout``): a peer that never attaches is not
        otherwise detected.  :meth:`recv` also completes the attachment.
        """
        self._get_loop()
        if peer_pid is not None and not self._attached:
            self._expected_peer = peer_pid
            self._watch_peer(peer_pid)
        while not self._attached:
            if self._closed:
                raise ConnectionClosed("link is closed")
            if self._rx_end is not None:
                if isinstance(self._rx_end, PermissionRefused | ProtocolError):
                    raise stored(self._rx_end)
                raise ConnectionClosed(f"the peer went away before attaching: {self._rx_end}")
            self._pump_rx(1)
            if not self._attached and self._rx_end is None:
                await self._wait_rx()
        if peer_pid is not None and self.info.peer_pid != peer_pid:
            raise PermissionRefused(f"shm link attached by pid {self.info.peer_pid}, expected pid {peer_pid}")

    # -- sending -----------------------------------------------------------
    #
    # Records are written into the ring at once and published in *batches*:
    # a commit marks the batch's last record with _END, stores the head
    # counter, posts the items semaphore once and rings the reader's bell.
    # A batch is committed at the end of the loop iteration that started it
    # (call_soon), as soon as it holds ring/8 bytes, and before the writer
    # waits for room.

    def send_parts(self, head: bytes, body: bytes) -> None:
        """Queue one frame given as ``head + body``; both are copied straight into the ring."""
        if type(head) is not bytes or type(body) is not bytes:
            self.send_nowait(bytes(head) + bytes(body))
        else:
            self.send_nowait(_Parts(head, body))

    def send_nowait(self, frame: bytes | _Parts) -> None:
        """Queue one whole frame; what fits is copied into the ring at once.

        (Internally also a :class:`_Parts`, from :meth:`send_parts`.)
        """
        if type(frame) is not bytes and type(frame) is not _Parts:
            frame = bytes(frame)  # type: ignore[arg-type]  # a snapshot: the caller may reuse its buffer
        if self._tx_error is not None:  # also set by closing
            raise stored(self._tx_error)
        n = len(frame)
        if n > self.max_frame:
            raise FrameTooLarge(n, self.max_frame)
        if not n:
            raise ProtocolError("refusing to send an empty frame")
        info = self.info
        info.msgs_out += 1
        info.bytes_out += n
        if n < self._small_frame and type(frame) is bytes and not self._txq:
            small = self._small
            small.append(_U32.pack(n))
            small.append(frame)
            self._small_n += n + 4
            if self._small_n >= self._small_max:
                self._flush_small()
            elif not self._commit_scheduled:
                self._commit_scheduled = True
                (self._loop or self._get_loop()).call_soon(self._commit_soon)
            return
        if self._small:
            self._flush_small()
        if not self._txq and self._put_whole(_FRAME_HDR, frame, n):
            return
        self._txq.append(frame)
        self._pending += n
        if len(self._txq) == 1:
            self._pump_tx()

    def _flush_small(self, queue: bool = True) -> None:
        """Write the small frames waiting as one FRAMES record (or queue them one by one).

        Runs before anything else is queued, at every commit and on close, so
        frames keep their order.  Without ``queue`` (closing), frames that
        find no room now are dropped, like everything else still queued.
        """
        small = self._small
        n = self._small_n
        self._small = []
        self._small_n = 0
        if not self._txq and self._put_whole(_FRAMES_HDR, b"".join(small), n):
            return
        if not queue:
            return
        # No contiguous room now: the frames take the ordinary way, in order.
        frames = small[1::2]
        was_idle = not self._txq
        self._txq.extend(frames)
        self._pending += n - 4 * len(frames)
        if was_idle:
            self._pump_tx()

    def _put_whole(self, hdr: int, data: bytes | _Parts, n: int) -> bool:
        """Write one record straight into the ring if it fits before the ring's end.

        ``hdr`` is the record's tag already shifted into place (the header is
        one 8-byte store).  False, and nothing written, when it does not fit.
        """
        rec = (n + 15) & -8  # header + payload padded to 8
        size = self._tx_size
        head = self._tx_head
        pos = head % size
        if rec > size - pos or rec > self._contig_max or rec > size - (head - self._tx_tail) - _REC_SIZE:
            return False
        mv, hq = self._mv, self._hq
        assert mv is not None and hq is not None
        at = self._tx_base + pos
        hq[at >> 3] = hdr | n << _LEN_SHIFT
        _copy_in(mv, at + _REC_SIZE, data, 0, n)
        self._tx_head = head = head + rec
        self._last_at = at
        if head - self._tx_committed >= self._batch_max:
            self._commit()
        elif not self._commit_scheduled:
            self._commit_scheduled = True
            (self._loop or self._get_loop()).call_soon(self._commit_soon)
        return True

    @property
    def pending_out(self) -> int:
        """Bytes queued by :meth:`send_nowait` and not yet copied into the ring."""
        return self._pending + self._small_n

    async def wait_writable(self, threshold: int | None = None) -> None:
        """Wait until :attr:`pending_out` is at or below ``threshold`` (default: half high water)."""
        limit = self.high_water // 2 if threshold is None else threshold
        while self._pending > limit:
            if self._tx_error is not None:
                raise stored(self._tx_error)
            if self._closed:
                raise ConnectionClosed("link is closed")
            fut: asyncio.Future[None] = self._get_loop().create_future()
            self._wwaiters.add(limit, fut)
            await fut
            if self._closed:  # closing dropped the queue: it was not sent
                raise ConnectionClosed("link is closed")
        if self._tx_error is not None:
            raise stored(self._tx_error)

    async def drain(self) -> None:
        """Wait until every queued frame has been copied into the ring."""
        if self._small and self._tx_error is None:
            self._flush_small()
        await self.wait_writable(0)

    def _pump_tx(self) -> None:
        """Copy queued frames into the ring while it has room; ask for more if it has not."""
        txq = self._txq
        size = self._tx_size
        self._tx_blocked = False
        try:
            if self._peer_closed():
                raise ConnectionClosed("shm link: the peer closed the link")
            while txq:
                frame = txq[0]
                n = len(frame)
                if self._tx_off < 0:
                    rec = _REC_SIZE + _align8(n)
                    if rec <= self._contig_max and rec <= size - self._tx_head % size:
                        if not self._reserve(rec):
                            break
                        self._put(_FRAME, frame, 0, n)
                        txq.popleft()
                        self._pending -= n
                        continue
                    # Larger than half the ring, or it would wrap: stream it in
                    # pieces (no padding wasted; up to half the ring the reader
                    # still copies it out only once).
                    if not self._reserve(_REC_SIZE):
                        break
                    self._put(_BEGIN, b"", 0, n)
                    self._tx_off = 0
                off = self._tx_off
                while off < n:
                    room = size - self._tx_head % size
                    left = n - off
                    least = min(left, self._piece_min)
                    if room - _REC_SIZE < least:
                        # Too little contiguous room for a useful piece: wrap.
                        if not self._reserve(room):
                            break
                        self._put(_PAD, b"", 0, room - _REC_SIZE)
                        continue
                    if not self._reserve(_REC_SIZE + least):
                        break
                    piece = min(left, self._piece_max, room - _REC_SIZE, self._free() - _REC_SIZE)
                    self._put(_PIECE, frame, off, piece)
                    off += piece
                    self._pending -= piece
                self._tx_off = off
                if off < n:
                    break
                txq.popleft()
                self._tx_off = -1
        except ProtocolError as exc:
            self._fail(exc, tx_broken=True)
        except ConnectionClosed as exc:  # the peer closed while we reclaimed room
            self._set_tx_error(exc)
        if self._tx_head != self._tx_committed and self._tx_error is None:
            if txq:
                self._commit()  # the reader must see what is in before we wait
            elif not self._commit_scheduled:
                self._commit_scheduled = True
                self._get_loop().call_soon(self._commit_soon)
        if txq and self._tx_error is None:
            # Short of room: ask the reader to ring back once it frees some.
            self._tx_blocked = True
            self._ring_peer(_RING_WANT)
        if self._wwaiters:
            self._wake_writers()

    def _peer_closed(self) -> bool:
        hi = self._hi
        return hi is not None and bool(hi[self._peer_flags] & _FLAG_CLOSED)

    def _free(self) -> int:
        # Room left, minus one record header always kept for the EOF record.
        return self._tx_size - (self._tx_head - self._tx_tail) - _REC_SIZE

    def _reserve(self, need: int) -> bool:
        if self._free() >= need:
            return True
        if self._tx_head != self._tx_committed:
            self._commit()
        self._reclaim()
        return self._free() >= need

    def _reclaim(self) -> None:
        """Take the space tokens the reader has posted (never blocks)."""
        sem = self._tx_space
        inflight = self._tx_inflight
        posted = sem.value
        if posted > len(inflight):  # checked first: a forged count must not make us loop on it
            raise ProtocolError(
                f"shm link: the peer released {posted} batches but only {len(inflight)} are in "
                "the ring; it is not following the ring protocol"
            )
        if not posted:
            return
        for _ in range(posted):
            sem.acquire(0)  # acquire: the reader is done with that batch
        hq = self._hq
        assert hq is not None
        tail = self._tx_tail
        for _ in range(posted):
            tail += inflight.popleft()
        seen = hq[self._tx_ti]
        if not tail <= seen <= self._tx_committed:
            raise ProtocolError(
                f"shm link: the ring's tail counter ({seen}) is outside "
                f"[{tail}, {self._tx_committed}]: the peer scribbled on the segment"
            )
        self._tx_tail = tail

    def _put(self, tag: int, frame: bytes | _Parts, off: int, n: int) -> None:
        """Write one record at the head (the caller reserved its room)."""
        mv = self._mv
        assert mv is not None
        size = self._tx_size
        pos = self._tx_head % size
        at = self._tx_base + pos
        _REC.pack_into(mv, at, tag, n)
        if tag in (_FRAME, _PIECE):
            _copy_in(mv, at + _REC_SIZE, frame, off, n)
            rec = _REC_SIZE + _align8(n)
        elif tag == _PAD:
            rec = size - pos
        else:
            rec = _REC_SIZE
        self._tx_head += rec
        self._last_at = at
        if self._tx_head - self._tx_committed >= self._batch_max:
            self._commit()

    def _commit_soon(self) -> None:
        self._commit_scheduled = False
        if self._tx_error is None and not self._closed:
            if self._peer_closed():
                self._set_tx_error(ConnectionClosed("shm link: the peer closed the link"))
                return
            self._commit()

    def _commit(self) -> None:
        """Publish the records written since the last commit as one batch."""
        if self._small:
            self._flush_small()
        head = self._tx_head
        if head == self._tx_committed:
            return
        mv, hq = self._mv, self._hq
        assert mv is not None and hq is not None
        hq[self._last_at >> 3] |= _END_BIT  # the reader gives its token back here
        hq[self._tx_hi] = head
        self._tx_inflight.append(head - self._tx_committed)
        self._tx_committed = head
        # release: every byte written above is visible to whoever takes this token
        self._tx_items.release()
        # ...and the ring comes after the post: whoever is woken by it sees the token.
        self._ring_peer(_RING_DATA)

    def _set_tx_error(self, exc: ConnectionClosed) -> None:
        if self._tx_error is None:
            self._tx_error = exc
        self._txq.clear()
        self._pending = 0
        self._small = []  # gathered small frames are dropped with the rest
        self._small_n = 0
        self._tx_off = -1
        self._tx_blocked = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        if self._tx_error is not None or self._closed:
            self._wwaiters.release()  # each looks at the link and raises
        else:
            self._wwaiters.wake(self._pending)

    # -- the bells -----------------------------------------------------------

    def _ring_peer(self, byte: bytes) -> None:
        fd = self._bell_w
        if fd < 0:
            return
        rang = _ring(fd, byte)
        if rang is False:
            # Nobody reads the peer's bell any more: it closed or died.
            self._get_loop().call_soon(self._on_peer_gone, "closed the link or exited")
        elif rang is None and byte == _RING_WANT and not self._want_waits:
            # The bell is full of unread rings (the peer's loop stalled while we
            # committed batch after batch).  The peer answers only a request for
            # room that it reads: send it again as soon as the bell has room,
            # or this side could wait for room forever.
            self._want_waits = True
            self._get_loop().add_writer(fd, self._want_again)

    def _want_again(self) -> None:
        fd = self._bell_w
        self._want_waits = False
        if fd >= 0:
            self._get_loop().remove_writer(fd)
            if self._tx_blocked and self._tx_error is None:
                self._ring_peer(_RING_WANT)

    def _on_bell(self) -> None:
        """Our bell rang (or its last writer went away): drain it and look again."""
        fd = self._bell_r
        eof = False
        want = False
        while fd >= 0:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not data:
                eof = True
                break
            if _RING_WANT in data:
                want = True
            if len(data) < 4096:
                break  # drained (a ring arriving now leaves the bell readable again)
        if want:
            # Rooms we released before reading this request may be invisible to
            # the writer's last look: if there are any, ring back at once
            # (docs: the FREED handshake); else when we next free some.
            if self._unannounced:
                self._unannounced = 0
                self._ring_peer(_RING_FREED)
            else:
                self._peer_wants_room = True
        if self._tx_blocked and self._tx_error is None and not self._closed:
            self._pump_tx()
        self._rx_dirty = True
        self._deliver_or_wake()
        if eof:
            self._on_peer_gone("closed the link or exited")

    # -- receiving ---------------------------------------------------------

    def _deliver_or_wake(self) -> None:
        """Something may have arrived: hand it to :attr:`on_frames`, or wake ``recv()``."""
        hook = self.on_frames
        fut = self._rx_fut
        if hook is None or fut is None or fut.done() or self._interrupt is not None or self._closed:
            self._wake_reader()
            return
        # The reader is idle: handle what arrived right here (see Link.on_frames).
        if self._rx_dirty:
            self._pump_rx(_RX_BATCH)
        if self._inbox:
            hook()
            if not self._inbox and self._rx_dirty:
                self._pump_rx(_RX_BATCH)  # more came meanwhile: the reader takes it
        if self._inbox or self._rx_end is not None or self._interrupt is not None:
            self._wake_reader()

    def take_ready(self, max_bytes: int = 1 << 20) -> list[bytes | Msg]:
        """Frames already copied out of the ring (or decoded there), up to about ``max_bytes``."""
        inbox = self._inbox
        if not inbox and self._rx_dirty and self._rx_end is None and not self._closed:
            self._pump_rx(_RX_BATCH)
        if self._inbox_bytes <= max_bytes:  # all of it, without a step per frame
            frames: list[bytes | Msg] = list(inbox)
            inbox.clear()
            self._inbox_bytes = 0
        else:
            frames = []
            taken = 0
            while inbox and taken < max_bytes:
                f = inbox.popleft()
                frames.append(f)
                taken += len(f) if type(f) is bytes else len(f.payload)  # type: ignore[union-attr]
            self._inbox_bytes = max(0, self._inbox_bytes - taken) if inbox else 0
        self.info.msgs_in += len(frames)
        return frames

    async def recv(self) -> bytes | Msg:
        """Return the next whole frame (see :meth:`Link.recv` for what it raises)."""
        inbox = self._inbox
        while True:
            if self._interrupt is not None:
                exc, self._interrupt = self._interrupt, None
                raise exc
            if self._closed:  # closed here: what is still buffered is dropped with it
                raise ConnectionClosed("link is closed")
            if inbox:
                frame = inbox.popleft()
                self.info.msgs_in += 1
                if inbox:
                    k = len(frame) if type(frame) is bytes else len(frame.payload)  # type: ignore[union-attr]
                    self._inbox_bytes = max(0, self._inbox_bytes - k)
                else:
                    self._inbox_bytes = 0
                return frame
            if self._closed:
                raise ConnectionClosed("link is closed")
            if self._rx_end is not None:
                raise stored(self._rx_end)
            if self._rx_dirty:
                self._pump_rx(_RX_BATCH)
            if not inbox and self._rx_end is None:
                await self._wait_rx()

    async def _wait_rx(self) -> None:
        """Sleep until our bell rings (or the link ends)."""
        fut: asyncio.Future[None] = self._get_loop().create_future()
        self._rx_fut = fut
        try:
            await fut
        finally:
            self._rx_fut = None

    def _wake_reader(self) -> None:
        fut = self._rx_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _take_rx_token(self) -> bool:
        sem = self._rx_items
        if sem.value:
            sem.acquire(0)  # acquire: the batch's bytes are now visible to us
            self._rx_tokens += 1
            return True
        self._rx_dirty = False
        return False

    def _pump_rx(self, budget: int) -> None:
        """Move up to ``budget`` published records from the ring to the inbox.

        A record may be read only while we hold a token for its batch; the
        batch's last record (flag _END) gives the token back, and we post the
        writer's space semaphore once per batch we are done with.
        """
        if self._rx_end is not None or self._closed or self._peer_gone:
            return
        if not self._rx_tokens and not self._take_rx_token():
            return
        mv, hq = self._mv, self._hq
        assert mv is not None and hq is not None
        base, size, hi = self._rx_base, self._rx_size, self._rx_hi
        inbox = self._inbox
        maxf = self.max_frame
        pos = self._rx_pos
        freed = 0
        append = inbox.append
        decode_large = self.decode_large
        large = LARGE_PAYLOAD if decode_large is not None else _MAX_LEN + 1
        fast = not self._streaming
        taken = 0
        try:
            head = hq[hi]
            self._check_head(head)
            while budget > 0:
                if not self._rx_tokens:
                    if not self._take_rx_token():
                        break
                    head = hq[hi]
                    self._rx_pos = pos
                    self._check_head(head)
                off = pos % size
                at = base + off
                hdr = hq[at >> 3]
                tag = hdr >> _TAG_SHIFT & _M32
                n = hdr >> _LEN_SHIFT & _M32
                rec = (n + 15) & -8
                if (
                    fast
                    and tag in (_FRAMES, _FRAMES_END)
                    and n > 0
                    and rec <= size - off
                    and pos + rec <= head
                ):
                    # Many small frames in one record: one copy out, then split.
                    taken += _split_frames(mv[at + _REC_SIZE : at + _REC_SIZE + n].tobytes(), maxf, append)
                    pos += rec
                    budget -= 1
                    if tag == _FRAMES_END:
                        self._rx_tokens -= 1
                        freed += 1
                    if taken >= _RX_BYTES:
                        break
                    continue
                if (
                    fast
                    and tag in (_FRAME, _FRAME_END)
                    and 0 < n <= maxf
                    and rec <= size - off
                    and pos + rec <= head
                ):
                    # The common case, inline: one whole frame, copied out once.
                    msg = None
                    if n >= large:
                        # ...or decoded where it lies: only its payload is copied out.
                        assert decode_large is not None
                        with mv[at + _REC_SIZE : at + _REC_SIZE + n] as view:
                            msg = decode_large(view)
                    append(mv[at + _REC_SIZE : at + _REC_SIZE + n].tobytes() if msg is None else msg)
                    pos += rec
                    budget -= 1
                    taken += n
                    if tag == _FRAME_END:
                        self._rx_tokens -= 1
                        freed += 1
                    if taken >= _RX_BYTES:
                        break
                    continue
                self._rx_pos = pos
                got = len(inbox)
                rec = self._consume(mv, at, off, tag, n, head)
                for k in range(got, len(inbox)):
                    taken += len(inbox[k])  # type: ignore[arg-type]  # _consume appends bytes
                pos += rec
                self._rx_pos = pos
                budget -= 1
                fast = not self._streaming
                if tag & _END:
                    self._rx_tokens -= 1
                    if self._asm_views is not None:
                        self._held += 1  # its pieces are still in use: keep its room
                    else:
                        freed += 1
                if self._held and self._asm_views is None:
                    freed += self._held
                    self._held = 0
                if self._rx_end is not None or taken >= _RX_BYTES:
                    break
        except (ProtocolError, PermissionRefused) as exc:
            self._fail(exc)
        finally:
            self._rx_pos = pos
            if taken:
                self._inbox_bytes += taken
                self.info.bytes_in += taken
            if freed:
                self._release_room(freed)
            if budget <= 0 and not self._rx_again and self._rx_end is None and not self._closed:
                # The whole budget went on records (maybe all pieces of one
                # frame, nothing delivered): more may be published already,
                # and the writer does not ring again for it (it may even
                # wait for the room those records hold).  Look again soon.
                self._rx_again = True
                self._get_loop().call_soon(self._pump_again)

    def _pump_again(self) -> None:
        self._rx_again = False
        if not self._closed:
            self._rx_dirty = True
            self._deliver_or_wake()

    def _release_room(self, batches: int) -> None:
        """Give ``batches`` batches back to the writer (and ring it if it asked)."""
        hq = self._hq
        if hq is None:
            return
        hq[self._rx_ti] = self._rx_pos
        post = self._rx_space.release
        for _ in range(batches):
            post()  # release: we are done reading those batches
        if self._peer_wants_room:
            self._peer_wants_room = False
            self._unannounced = 0
            self._ring_peer(_RING_FREED)
        else:
            self._unannounced += batches

    def _check_head(self, head: int) -> None:
        pos = self._rx_pos
        if not pos <= head <= pos + self._rx_size:
            raise ProtocolError(
                f"shm link: the ring's head counter ({head}) is outside [{pos}, "
                f"{pos + self._rx_size}]: the peer scribbled on the segment"
            )

    def _consume(self, mv: memoryview, at: int, off: int, tag: int, n: int, head: int) -> int:
        """Read any record at the tail (the slow path); return its size in the ring."""
        size = self._rx_size
        room = size - off
        kind = tag & _KIND
        if tag & ~(_KIND | _END) or kind not in _TAG_NAMES:
            raise ProtocolError(
                f"shm link: unknown record tag {tag:#x} at ring offset {off}: the ring is corrupted"
            )
        if kind in (_FRAME, _PIECE, _FRAMES):
            rec = _REC_SIZE + _align8(n)
        elif kind == _PAD:
            rec = room
            if n != room - _REC_SIZE:
                raise ProtocolError(
                    f"shm link: PAD record of {n} bytes at ring offset {off} does not reach "
                    "the end of the ring"
                )
        else:
            rec = _REC_SIZE
        name = _TAG_NAMES[kind]
        if rec > room:
            raise ProtocolError(
                f"shm link: {name} record of {n} bytes at ring offset {off} runs past the end "
                f"of the {size}-byte ring"
            )
        if self._rx_pos + rec > head:
            raise ProtocolError(
                f"shm link: {name} record at ring offset {off} ends past the ring's head "
                f"counter ({head}): the peer scribbled on the segment"
            )
        if kind == _FRAME:
            if self._streaming:
                raise ProtocolError("shm link: a whole frame in the middle of a streamed frame")
            if n > self.max_frame:
                raise FrameTooLarge(n, self.max_frame, "announced frame")
            if not n:
                raise ProtocolError("shm link: peer sent an empty frame")
            self._inbox.append(mv[at + _REC_SIZE : at + _REC_SIZE + n].tobytes())
        elif kind == _FRAMES:
            if self._streaming:
                raise ProtocolError("shm link: a FRAMES record in the middle of a streamed frame")
            if not n:
                raise ProtocolError("shm link: peer sent an empty FRAMES record")
            _split_frames(
                mv[at + _REC_SIZE : at + _REC_SIZE + n].tobytes(), self.max_frame, self._inbox.append
            )
        elif kind == _PIECE:
            if not self._streaming:
                raise ProtocolError("shm link: a PIECE record outside a streamed frame")
            if not 0 < n <= self._asm_left:
                raise ProtocolError(f"shm link: a PIECE of {n} bytes where {self._asm_left} were expected")
            self._asm_left -= n
            views = self._asm_views
            if views is not None:
                views.append(mv[at + _REC_SIZE : at + _REC_SIZE + n])
                if not self._asm_left:
                    try:
                        self._inbox.append(b"".join(views))  # the one copy out of the ring
                    finally:
                        self._drop_partial()
            else:
                asm = self._asm
                assert asm is not None
                with mv[at + _REC_SIZE : at + _REC_SIZE + n] as view:
                    asm.write(view)
                if not self._asm_left:
                    frame = asm.getvalue()  # no copy: BytesIO hands over its buffer
                    self._drop_partial()
                    self._inbox.append(frame)
        elif kind == _BEGIN:
            if self._streaming:
                raise ProtocolError("shm link: a BEGIN record in the middle of a streamed frame")
            if n > self.max_frame:
                raise FrameTooLarge(n, self.max_frame, "announced frame")
            if not n:
                raise ProtocolError("shm link: peer announced an empty frame")
            self._streaming = True
            self._asm_left = self._asm_total = n
            # Up to half the ring the writer can always complete the frame while
            # we hold its pieces (see docs/transports/shm.md): no assembly copy.
            if n <= size // 2:
                self._asm_views = []
            else:
                self._asm = io.BytesIO()
        elif kind == _EOF:
            if self._streaming:
                self._rx_end = ConnectionClosed(self._partial_msg("closed the link"))
                self._drop_partial()
            else:
                self._rx_end = EndOfStream("shm link: the peer closed the link")
            self._set_tx_error(ConnectionClosed("shm link: the peer closed the link"))
        elif kind == _ATTACHED:
            self._on_attached()
        return rec

    def _drop_partial(self) -> None:
        """Forget the streamed frame in progress, releasing its views of the ring."""
        self._streaming = False
        self._asm_left = 0
        if self._asm is not None:
            self._asm.close()
            self._asm = None
        views = self._asm_views
        if views is not None:
            self._asm_views = None
            for v in views:
                v.release()

    def _partial_msg(self, what: str) -> str:
        got = self._asm_total - self._asm_left
        return (
            f"shm link: the peer {what} in the middle of a {self._asm_total}-byte frame "
            f"({got} bytes of it received); the partial frame was discarded"
        )

    def _on_attached(self) -> None:
        hi = self._hi
        assert hi is not None
        if not self._creator or self._attached:
            raise ProtocolError("shm link: unexpected ATTACHED record")
        apid = hi[_OFF_APID // 4]
        if self._expected_peer is not None and apid != self._expected_peer:
            raise PermissionRefused(f"shm link attached by pid {apid}, expected pid {self._expected_peer}")
        self._attached = True
        self.info.peer_pid = apid
        with contextlib.suppress(OSError):
            self.info.peer_uid = os.stat(f"/proc/{apid}").st_uid
        # The attacher has unlinked the names and marked the segment IPC_RMID.
        # Do it again in case the peer is not this module (IPC_RMID is
        # idempotent while we are attached; a name is unlinked only if it still
        # exists and is ours).
        with contextlib.suppress(sysv_ipc.Error):
            self._shm.remove()
        for path in (*map(_sem_path, self._sem_names), *self._bell_paths):
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == os.getuid():
                    os.unlink(path)
        self._remove_bell_dir()
        self._forget_records()
        if self._watched_pid != apid:
            self._unwatch_peer()
            self._watch_peer(apid)

    # -- peer death, failure -------------------------------------------------

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            if self._bell_r >= 0:
                loop.add_reader(self._bell_r, self._on_bell)
        return loop

    def _watch_peer(self, pid: int) -> None:
        """Watch ``pid`` with a pidfd: it turns readable when the process exits.

        The bell already reports a peer that closes or dies (end of file on
        it); the pidfd also covers a creator waiting for a peer to attach and
        a peer whose bell fd leaked into a child that outlives it.
        """
        if self._pidfd >= 0 or self._closed:
            return
        loop = self._get_loop()
        self._watched_pid = pid
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            loop.call_soon(self._on_peer_gone, f"(pid {pid}) exited")
            return
        except OSError as exc:  # pragma: no cover - kernels before 5.3
            log.warning("shm link: cannot watch peer pid %d: %s", pid, exc)
            return
        self._pidfd = fd
        loop.add_reader(fd, self._on_peer_gone, f"(pid {pid}) exited")
        # A pidfd opened after the pid was reused would watch the wrong process:
        # an attached peer must still be attached.
        if self._attached and self._shm.number_attached < 2:
            loop.call_soon(self._on_peer_gone, f"(pid {pid}) exited")

    def _unwatch_peer(self) -> None:
        fd = self._pidfd
        if fd >= 0:
            self._pidfd = -1
            with contextlib.suppress(Exception):
                self._get_loop().remove_reader(fd)
            os.close(fd)

    def _on_peer_gone(self, why: str) -> None:
        """The peer closed or died: deliver what it finished writing, then end."""
        self._unwatch_peer()
        self._close_bells()
        if self._closed or self._peer_gone:
            return
        self._peer_gone = True
        if self._rx_end is None and self._mv is not None:
            # The peer's head counter is final, and everything it wrote before
            # it is visible now (its exit or close and our wake-up by the
            # kernel are full barriers): read up to it, tokens or not.
            mv, hq = self._mv, self._hq
            assert hq is not None
            try:
                head = hq[self._rx_hi]
                self._check_head(head)
                size = self._rx_size
                while self._rx_pos < head and self._rx_end is None:
                    off = self._rx_pos % size
                    at = self._rx_base + off
                    tag, n = _REC.unpack_from(mv, at)
                    self._rx_pos += self._consume(mv, at, off, tag, n, head)
            except (ProtocolError, PermissionRefused) as exc:
                self._rx_end = exc
        self._rx_tokens = 0
        if self._rx_end is None:
            if self._streaming:
                self._rx_end = ConnectionClosed(self._partial_msg(why))
            else:
                self._rx_end = EndOfStream(f"shm link: the peer {why}")
        self._drop_partial()
        self._set_tx_error(ConnectionClosed(f"shm link: the peer {why}"))
        self._wake_reader()

    def _fail(self, exc: IpcBusError, *, tx_broken: bool = False) -> None:
        """The peer broke the protocol: end the link (recv raises ``exc``)."""
        log.warning("shm link (peer pid %s): %s", self.info.peer_pid, exc)
        if self._rx_end is None or isinstance(self._rx_end, EndOfStream):
            self._rx_end = exc
        self._tx_broken = self._tx_broken or tx_broken
        self._rx_tokens = 0
        self._drop_partial()
        self._set_tx_error(ConnectionClosed(f"shm link failed: {exc}"))
        self._announce_close()
        self._wake_reader()

    def _announce_close(self) -> None:
        """Tell the peer we are gone: CLOSED flag, EOF record, then close our bells."""
        hi = self._hi
        if hi is None or self._peer_gone:
            self._close_bells()
            return
        flags = hi[self._my_flags]
        if not flags & _FLAG_CLOSED:
            hi[self._my_flags] = flags | _FLAG_CLOSED
            if not self._tx_broken:
                # One record header is always kept free for this EOF (see _free).
                self._put(_EOF, b"", 0, 0)
                self._commit()
        # Closing our end of the peer's bell is its end of file: a peer asleep
        # in recv() or waiting for room wakes up and sees the stream end.
        self._close_bells()

    def _close_bells(self) -> None:
        r, w = self._bell_r, self._bell_w
        self._bell_r = self._bell_w = -1
        if r >= 0:
            if self._loop is not None:
                self._loop.remove_reader(r)
            os.close(r)
        if w >= 0:
            if self._want_waits and self._loop is not None:
                self._want_waits = False
                self._loop.remove_writer(w)
            os.close(w)

    # -- lifetime --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called or the link ended (peer gone, protocol error)."""
        return self._closed or self._rx_end is not None

    @property
    def attached(self) -> bool:
        """True once both processes have the segment mapped (always True on the attacher)."""
        return self._attached

    async def aclose(self) -> None:
        """Flush queued frames (at most :attr:`close_timeout` s), end the stream, release all.

        The peer receives every frame already in the ring, then
        :class:`~ipcbus.errors.EndOfStream`.  Idempotent; if cancelled while
        flushing, it still closes.
        """
        if self._closed:
            return
        try:
            if self._small and self._tx_error is None:
                self._flush_small()
            if self._txq and self._tx_error is None:
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    async with asyncio.timeout(self.close_timeout):
                        await self.drain()
        finally:
            self.close_now()

    def close_now(self) -> None:
        """Close at once, dropping anything still queued (what :meth:`aclose` ends with)."""
        if self._closed:
            return
        self._closed = True
        if self._small and self._tx_error is None and not self._txq:
            self._flush_small(queue=False)  # into the ring if there is room, before the EOF
        if self._tx_error is None:
            self._tx_error = ConnectionClosed("link is closed")
        self._txq.clear()
        self._pending = 0
        self._small = []
        self._small_n = 0
        self._tx_off = -1  # a half-streamed frame: the peer sees EOF mid-frame
        self._unwatch_peer()
        self._announce_close()
        self._wake_reader()
        self._wake_writers()
        self._release_objects()

    def _release_objects(self) -> None:
        if self._creator and not self._attached:
            # The peer never attached: the objects are still ours to remove.
            with contextlib.suppress(sysv_ipc.Error):
                self._shm.remove()
            for name in self._sem_names:
                with contextlib.suppress(posix_ipc.Error):
                    posix_ipc.unlink_semaphore(name)
            for path in self._bell_paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._remove_bell_dir()
        for sem in self._sems:
            with contextlib.suppress(posix_ipc.Error):
                sem.close()
        self._drop_partial()  # its views of the ring go before the ring does
        mv = self._mv
        if mv is not None:
            self._mv = None
            for view in (self._hq, self._hi):
                if view is not None:
                    view.release()
            self._hq = self._hi = None
            # Detaching under a live view would leave it pointing at unmapped
            # memory (a segfault on use): release ours, and refuse to detach
            # if anything still holds a view of the segment.
            try:
                mv.release()
            except BufferError:  # pragma: no cover - a bug in this module
                log.error("shm link: a view of the segment is still alive; not detaching")
            else:
                with contextlib.suppress(sysv_ipc.Error):
                    self._shm.detach()
        self._forget_records()

    def _remove_bell_dir(self) -> None:
        d = self._bell_dir
        if d is not None:
            self._bell_dir = None
            shutil.rmtree(d, ignore_errors=True)

    def _forget_records(self) -> None:
        if self._recorded and self._busdir is not None:
            self._recorded = False
            records.forget_object(self._busdir, "shm", self._shm.id)
            for name in self._sem_names:
                records.forget_object(self._busdir, "posix_sem", _sem_ident(name))
            for path in self._bell_paths:
                records.forget_object(self._busdir, "fifo", path)
            if self._own_folder:
                _drop_process_folder(self._busdir)

    def __del__(self) -> None:
        if getattr(self, "_mv", None) is not None and not getattr(self, "_closed", True):
            warnings.warn(
                f"unclosed {self!r}: call aclose() (its segment and semaphores are still mapped)",
                ResourceWarning,
                stacklevel=1,
            )


def _process_folder() -> Path | None:
    """This process's records folder (see :mod:`ipcbus.gc`), made if missing;
    ``None`` if it cannot be (the direct link then records nothing)."""
    from ..gc import process_folder

    try:
        return process_folder().path
    except (IpcBusError, OSError) as exc:
        log.warning("shm link: cannot record its kernel objects (%s); if this process is "
                    "killed before the peer attaches, they stay behind", exc)
        return None


def _drop_process_folder(folder: Path | None) -> None:
    """Remove this process's records folder if no record is left in it."""
    from ..gc import remove_pool_dir

    if folder is not None:
        remove_pool_dir(folder)


class _Made:
    """What :meth:`ShmLink.create` made so far, to undo if it fails half-way."""

    def __init__(self, busdir: Path | None) -> None:
        self.busdir = busdir
        self.shmid = -1
        self.shm: Any = None
        self.sems: list[Any] = []
        self.sem_names: list[str] = []
        self.fifos: list[str] = []
        self.fds: list[int] = []
        self.bell_dir: str | None = None
        self.recorded: list[tuple[Any, str | int]] = []

    def record(self, kind: Any, ident: str | int, extra: dict[str, Any] | None = None) -> None:
        if self.busdir is not None:
            self.recorded.append((kind, ident))  # first: undo() forgets a half-written record too
            records.record_object(self.busdir, kind, ident, extra=extra)

    def create_segment(self, size: int, mode: int, extra: dict[str, Any]) -> int:
        """The segment, under a random key, recorded before it exists (on a bus)."""
        if self.busdir is None:
            return _shm_create(size, mode)
        shmid: int = records.create_keyed(
            self.busdir,
            "shm",
            lambda key: _shm_create(size, mode, key),
            int,
            FileExistsError,
            extra,
            remove=lambda ident: sysv_ipc.remove_shared_memory(ident),
        )
        self.recorded.append(("shm", shmid))
        return shmid

    def undo(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for path in self.fifos:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self.bell_dir is not None:
            shutil.rmtree(self.bell_dir, ignore_errors=True)
        for sem in self.sems:
            with contextlib.suppress(posix_ipc.Error):
                sem.unlink()
            with contextlib.suppress(posix_ipc.Error):
                sem.close()
        if self.shm is not None:
            with contextlib.suppress(sysv_ipc.Error):
                self.shm.detach()
        if self.shmid >= 0:
            with contextlib.suppress(sysv_ipc.Error):
                sysv_ipc.remove_shared_memory(self.shmid)
        if self.busdir is not None:
            for kind, ident in self.recorded:
                records.forget_object(self.busdir, kind, ident)


# -- attach-time validation ----------------------------------------------------


class _Params:
    __slots__ = ("bells", "nonce", "ring0", "ring1", "sem_names", "shmid", "size")

    def __init__(
        self,
        shmid: int,
        size: int,
        ring0: int,
        ring1: int,
        nonce: bytes,
        sem_names: tuple[str, str, str, str],
        bells: tuple[str, str],
    ) -> None:
        self.shmid = shmid
        self.size = size
        self.ring0 = ring0
        self.ring1 = ring1
        self.nonce = nonce
        self.sem_names = sem_names
        self.bells = bells


_NAME: Final = re.compile(r"ipcbus\.([0-9]+)\.[0-9a-f]+\.0")


def _parse_params(params: Mapping[str, int | str]) -> _Params:
    def get_int(key: str) -> int:
        v = params.get(key)
        if type(v) is not int:
            raise ProtocolError(f"shm link params: {key!r} must be an integer, got {v!r}")
        return v

    def get_str(key: str) -> str:
        v = params.get(key)
        if type(v) is not str:
            raise ProtocolError(f"shm link params: {key!r} must be a string, got {v!r}")
        return v

    layout = get_int("layout")
    if layout != LAYOUT_VERSION:
        raise ProtocolError(
            f"shm link params announce layout version {layout}; this ipcbus speaks "
            f"version {LAYOUT_VERSION}: upgrade the older side"
        )
    shmid, size, ring0, ring1 = (get_int(k) for k in ("shmid", "size", "ring0", "ring1"))
    for key, ring in (("ring0", ring0), ("ring1", ring1)):
        if ring % 4096 or not MIN_RING_SIZE <= ring <= MAX_RING_SIZE:
            raise ProtocolError(f"shm link params: {key} = {ring} is not a valid ring size")
    if shmid < 0 or size != HEADER_SIZE + ring0 + ring1:
        raise ProtocolError(
            f"shm link params: size {size} != {HEADER_SIZE} + ring0 + ring1, or bad shmid {shmid}"
        )
    try:
        nonce = bytes.fromhex(get_str("nonce"))
    except ValueError:
        raise ProtocolError("shm link params: 'nonce' is not hexadecimal") from None
    if len(nonce) != _NONCE_LEN:
        raise ProtocolError(f"shm link params: 'nonce' must be {_NONCE_LEN} bytes")
    names = tuple(get_str(f"sem{i}") for i in range(4))
    for name in names:
        if not name.startswith("/ipcbus.") or "/" in name[1:] or len(name) > 200:
            raise ProtocolError(f"shm link params: {name!r} is not an ipcbus semaphore name")
    bells = (get_str("bell0"), get_str("bell1"))
    for path in bells:
        if not os.path.isabs(path) or not path.endswith(".bell"):
            raise ProtocolError(f"shm link params: {path!r} is not an ipcbus bell path")
    # Every name is the creator's pid and a token taken from the segment's nonce
    # (checked against the segment before use), in its place: names swapped or
    # taken from another link are refused before anything is opened or unlinked.
    first = _NAME.fullmatch(names[0][1:])
    pid = first.group(1) if first else ""
    token = nonce[:6].hex()
    want = [f"/ipcbus.{pid}.{token}.{i}" for i in range(4)]
    want_bells = [f"shm-{pid}-{token}.c.bell", f"shm-{pid}-{token}.a.bell"]
    if first is None or list(names) != want or [os.path.basename(b) for b in bells] != want_bells:
        raise ProtocolError(
            "shm link params: the semaphore and bell names do not belong to this segment "
            f"(expected {want} and {want_bells}); pass the params the creator gave"
        )
    return _Params(shmid, size, ring0, ring1, nonce, (names[0], names[1], names[2], names[3]), bells)


def _check_segment_row(row: Mapping[str, int], shmid: int, size: int, peer_pid: int, uid: int) -> None:
    if row["uid"] != uid or row["cuid"] != uid:
        raise PermissionRefused(
            f"shared-memory segment {shmid} belongs to uid {row['uid']} (created by uid "
            f"{row['cuid']}), not to the peer's uid {uid}; refusing it"
        )
    if row["cpid"] != peer_pid:
        raise PermissionRefused(
            f"shared-memory segment {shmid} was created by pid {row['cpid']}, not by the "
            f"peer (pid {peer_pid}); refusing it"
        )
    if row["perms"] & 0o007:
        raise PermissionRefused(
            f"shared-memory segment {shmid} is open to every user (mode {row['perms']:#o}); refusing it"
        )
    if row["size"] != size:
        raise PermissionRefused(
            f"shared-memory segment {shmid} has {row['size']} bytes, not the {size} announced: "
            "it is not the segment the peer made; refusing it"
        )


def _check_header(mv: memoryview, p: _Params, peer_pid: int) -> None:
    magic = bytes(mv[_OFF_MAGIC : _OFF_MAGIC + 8])
    if magic != MAGIC:
        raise ProtocolError(
            f"shared-memory segment {p.shmid} has no ipcbus header (magic {magic!r}, "
            f"expected {MAGIC!r}): corrupted, or not an ipcbus link"
        )
    version, hdr, r0, r1, _maxf, cpid, apid = struct.unpack_from("=IIQQQII", mv, _OFF_VERSION)
    if version != LAYOUT_VERSION:
        raise ProtocolError(
            f"shared-memory segment {p.shmid} has layout version {version}; this ipcbus "
            f"speaks version {LAYOUT_VERSION}: upgrade the older side"
        )
    if hdr != HEADER_SIZE or r0 != p.ring0 or r1 != p.ring1:
        raise ProtocolError(
            f"shared-memory segment {p.shmid}: header says header {hdr} B and rings "
            f"{r0}/{r1} B, the params {HEADER_SIZE}/{p.ring0}/{p.ring1}: corrupted header"
        )
    if bytes(mv[_OFF_NONCE : _OFF_NONCE + _NONCE_LEN]) != p.nonce:
        raise PermissionRefused(
            f"shared-memory segment {p.shmid} does not carry the nonce announced: it is not "
            "the segment the peer made; refusing it"
        )
    if cpid != peer_pid:
        raise ProtocolError(
            f"shared-memory segment {p.shmid}: header names creator pid {cpid}, "
            f"the kernel says {peer_pid}: corrupted header"
        )
    flags = struct.unpack_from("=I", mv, _OFF_AFLAGS)[0]
    if apid or flags & _FLAG_ATTACHED:
        raise PermissionRefused(
            f"shared-memory segment {p.shmid} is already attached by pid {apid}; a link has exactly two ends"
        )


_SEM_T_SIZE: Final = 4 * struct.calcsize("P")  # sizeof(sem_t) in glibc: 32 bytes on 64-bit


def _check_owned_file(
    path: str, what: str, uid: int, is_type: Callable[[int], bool], st: os.stat_result | None = None
) -> os.stat_result:
    if st is None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ConnectionClosed(
                f"{what} does not exist (its creator gave up or died); connect again"
            ) from None
    if not is_type(st.st_mode):
        raise PermissionRefused(f"{what} ({path}) is not the kind of file expected; refusing it")
    if st.st_uid != uid:
        raise PermissionRefused(
            f"{what} belongs to uid {st.st_uid}, not to the peer's uid {uid}; refusing it"
        )
    if st.st_mode & 0o007:
        raise PermissionRefused(f"{what} is open to every user (mode {st.st_mode & 0o777:#o}); refusing it")
    return st


def _open_bell(path: str, flags: int, uid: int) -> int:
    """Open one end of a bell FIFO after checking it is the peer's and nobody else's."""
    before = _check_owned_file(path, f"bell {path}", uid, stat.S_ISFIFO)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConnectionClosed(f"bell {path} vanished while attaching; connect again") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # O_WRONLY on a FIFO nobody reads
            raise ConnectionClosed(
                f"nobody reads bell {path}: the link's creator is gone; connect again"
            ) from None
        raise PermissionRefused(f"may not open bell {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise PermissionRefused(f"bell {path} was replaced while attaching; refusing it")
    return fd


# -- the bus rendezvous ---------------------------------------------------------


class ShmAcceptor:
    """Hub side of the shm transport: attaches to the segments clients announce.

    The hub owns no kernel object for this transport: each client creates its
    link's segment, semaphores and bells and knocks with their names;
    :meth:`accept` verifies them against the kernel (creator pid, owner uid)
    and attaches.
    """

    def __init__(
        self,
        busdir: Path,
        *,
        mode: int = 0o600,
        gid: int | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.busdir = Path(busdir)
        self.mode = _check_mode(mode)
        self.gid = gid
        self.max_frame = max_frame

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def accept(self, knock: Knock) -> ShmLink:
        """Validate a client's knock and attach to its link (refusals raise, never hang)."""
        if knock.transport != "shm":
            raise ProtocolError(f"knock for transport {knock.transport!r} sent to the shm acceptor")
        if knock.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"client pid {knock.pid} speaks protocol version {knock.version}, this hub "
                f"{PROTOCOL_VERSION}; upgrade the older side"
            )
        if self.gid is None and knock.uid != os.getuid():
            raise PermissionRefused(
                f"client pid {knock.pid} claims uid {knock.uid}, but this bus is private to uid {os.getuid()}"
            )
        link = await ShmLink.attach(
            knock.params,
            peer_pid=knock.pid,
            peer_uid=knock.uid,
            busdir=self.busdir,
            max_frame=self.max_frame,
        )
        link.info.peer_name = knock.name
        return link


async def connect_shm(
    busdir: Path,
    *,
    hub_pid: int,
    name: str = "",
    max_frame: int = DEFAULT_MAX_FRAME,
    send_knock: Callable[[Knock], None] | None = None,
    ring_size: int = DEFAULT_RING_SIZE,
    attach_timeout: float = 10.0,
) -> ShmLink:
    """Client side: create a link's segment, semaphores and bells, knock, wait for the hub.

    The objects get mode 0600, or 0660 with the bus's group when its folder
    is group-accessible.  Raises :class:`~ipcbus.transports.door.HandshakeTimeout`
    if the hub has not attached within ``attach_timeout`` seconds (it refused
    the knock: see its log), :class:`~ipcbus.errors.ConnectionClosed` if it
    exits meanwhile.  Everything created is removed on failure.
    """
    from .door import HandshakeTimeout, Knock
    from .door import send_knock as door_send_knock

    busdir = Path(busdir)
    mode, gid = _bus_mode(busdir)
    link, params = ShmLink.create(busdir, ring_size=ring_size, mode=mode, gid=gid, max_frame=max_frame)
    try:
        knock = Knock(
            version=PROTOCOL_VERSION,
            transport="shm",
            pid=os.getpid(),
            uid=os.getuid(),
            name=name,
            params=params,
        )
        if send_knock is None:
            door_send_knock(busdir, knock)
        else:
            send_knock(knock)
        try:
            async with asyncio.timeout(attach_timeout):
                await link.wait_attached(peer_pid=hub_pid)
        except TimeoutError:
            raise HandshakeTimeout(
                f"the hub (pid {hub_pid}) of {busdir} did not attach to the shm link within "
                f"{attach_timeout:g} s; it refused the knock (see its log), is overloaded, "
                "or is stopped (`ipcbus ls` shows its state)"
            ) from None
    except BaseException:
        await link.aclose()
        raise
    return link
