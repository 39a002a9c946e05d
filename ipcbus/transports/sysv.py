"""The System V message-queue transport.

Layout (see ``docs/transports/sysv.md`` for the why and the byte-level format)
------------------------------------------------------------------------------
* **The bus queue** — one per bus, created by the hub (:class:`SysvAcceptor`)
  with ``IPC_CREAT | IPC_EXCL`` and mode 0600 (0660 with a group), keyed by
  ``ftok()`` on ``<busdir>/sysv.key``.  It carries every client's traffic *to
  the hub*: ``mtype`` 1, the sender's address in a 16-byte header, so the
  fragments of different clients can interleave freely and are reassembled
  per sender.  One hub thread drains it, always.
* **A client queue** — one per client, created by the client (random key,
  ``IPC_EXCL``, 0600/0660) and named in its knock.  It carries the hub's
  traffic *to that client*: data has ``mtype`` = the client's address (>= 256),
  control messages use the reserved types 1..255 (1 ACK, 2 ABORT, 3 NUDGE).
  The client's thread receives with ``msgrcv(type=-address)``: the kernel
  hands it control messages first (lowest type), then data — selective receive.

Why a queue per client for the hub->client direction: a queue's capacity
(``msgmnb``, 16 KiB here) is shared by everything in it.  If clients read
their type from one shared queue, a client that stops reading (a stopped
process, a C client that reads when it likes) would pin its messages in the
shared queue until it filled, and every ``msgsnd`` on the bus would block.
With one inbound queue per reader, a reader that stalls fills only its own
queue: the hub's sends to it wait in a per-link sender thread, other links
flow.  The bus queue is drained by the hub alone, which never stops reading;
it bounds what it buffers per client with credit (a window of bytes, returned
with ACK messages on the client's queue; a zero-length ACK fits even in a
full queue).

Threads, and why: a SysV queue has no file descriptor, so it cannot be
polled by the event loop.  Each receiving side runs one thread blocked in
``msgrcv`` (``sysv_ipc`` releases the GIL), which drains whatever else is
queued without blocking and hands the batch to the loop with one
``call_soon_threadsafe``.  Sends are ``IPC_NOWAIT`` from the loop; only when
the destination is full (``EAGAIN``) does a per-link sender thread take over
and block in ``msgsnd`` until the backlog is gone.  Threads are woken
deterministically — by removing their queue (``EIDRM``) or by a zero-length
message of a type they wait for — and joined on close.

Peer death: ``os.pidfd_open(peer)`` watched by the loop.  The hub then sends
itself a zero-length marker through the bus queue so that everything the
dead client sent before dying is processed first (FIFO), drops a partial
frame, and removes the client's queue (purging what it never read).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import itertools
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import anyio
import sysv_ipc

from ..busdir import KEYFILE_NAME
from ..errors import (
    BusBusy,
    BusNotFound,
    ConnectionClosed,
    EndOfStream,
    FrameTooLarge,
    HandshakeTimeout,
    IpcBusError,
    PermissionRefused,
    ProtocolError,
)
from ..frames import DEFAULT_MAX_FRAME, HEADER, PROTOCOL_VERSION
from ..records import PENDING_PREFIX, create_keyed, forget_object, list_records
from ..sysv import (
    MSGTYPE_MAX,
    QueueExists,
    QueueNotFound,
    QueueStat,
    open_handle,
    proc_msg_table,
    queue_stat,
    read_limits,
)
from .base import DEFAULT_HIGH_WATER, Link, LinkInfo, WriteWaiters
from .door import Knock

__all__ = [
    "CONTROL_MAX",
    "DEFAULT_CREDIT_UNIT",
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_WINDOW",
    "FTOK_PROJ",
    "HUB_ADDRESS",
    "KEY_FILE",
    "MIN_CLIENT_ADDRESS",
    "MSG_HEADER",
    "PAIR_DATA_TYPE",
    "SysvAcceptor",
    "SysvLink",
    "SysvPairLink",
    "bus_key",
    "connect_sysv",
]

log = logging.getLogger("ipcbus.transports.sysv")

# -- wire constants (docs/transports/sysv.md, "Byte-level format") -----------

WIRE_VERSION: Final = 1
MSG_HEADER: Final = struct.Struct("!BBBBIII")
"""The 16-byte header of every data message: version, kind, flags, 0, sender, seq, total."""
_HDR: Final = MSG_HEADER.size
_U32: Final = struct.Struct("!I")
_WELCOME: Final = struct.Struct("!IIII")  # msg_size, window, credit_unit, max_frame

KIND_FRAMES: Final = 1  # body: n x (u32 length, bytes) whole frames; total = n
KIND_FRAGMENT: Final = 2  # body: a slice of one frame; total = frame length on the first
KIND_WELCOME: Final = 3  # hub -> client, seq 0: the link's parameters
KIND_REFUSE: Final = 4  # hub -> client, seq 0: why the knock was refused (UTF-8)
KIND_BYE: Final = 5  # either way: the sender closed the link after its last frame
_KIND_NAMES: Final = {1: "FRAMES", 2: "FRAGMENT", 3: "WELCOME", 4: "REFUSE", 5: "BYE"}
FLAG_FIRST: Final = 1
FLAG_LAST: Final = 2

HUB_ADDRESS: Final = 1
"""The hub's address in message headers, and the ``mtype`` of data sent to the hub."""
MIN_CLIENT_ADDRESS: Final = 256
"""Client addresses (their data ``mtype``) start here; 1..255 are reserved for control."""
CONTROL_MAX: Final = 255
"""Highest reserved control type."""

# Bus queue types.
T_TO_HUB: Final = 1
T_MARK: Final = 2  # zero-length, sent by the hub to itself (ordering marker)
# Client queue types (all below any client address, so msgrcv(-address) sees them first).
T_ACK: Final = 1  # u32 n: the hub consumed n more credit units (zero-length: one unit)
T_ABORT: Final = 2  # the hub dropped the link; optional UTF-8 reason
T_NUDGE: Final = 3  # zero-length, sent by the client to itself (wake its thread)

REFUSE_PERMISSION: Final = 1
REFUSE_PROTOCOL: Final = 2
REFUSE_BUSY: Final = 3
REFUSE_RESOURCES: Final = 4
"""REFUSE code: the hub is out of a resource (file descriptors, memory) and cannot take the client now."""

KEY_FILE: Final = KEYFILE_NAME
"""File in the bus directory whose ``ftok()`` gives the bus queue's key (``sysv.key``)."""
FTOK_PROJ: Final = 0x53
"""``ftok`` project id ('S')."""

DEFAULT_WINDOW: Final = 512 * 1024
"""Bytes a client may have sent to the hub and not yet had acknowledged."""
DEFAULT_CREDIT_UNIT: Final = 32 * 1024
"""Unit of credit: an ACK returns ``n`` units (a zero-length ACK, one unit)."""
_RX_PAUSE: Final = 1 << 20  # a client stops draining its queue above this many buffered bytes
_BATCH_MSGS: Final = 256  # at most this many messages per hand-off to the loop
_BATCH_BYTES: Final = 1 << 20
_FLUSH_TIMEOUT: Final = 2.0  # aclose(): how long queued frames may take to leave
_JOIN_TIMEOUT: Final = 5.0
_FREED_GRACE: Final = 1.0  # aclose(): how long a sender thread freed from msgsnd may take to end
_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_QUEUE_BYTES: Final = 1 << 20
"""``msg_qbytes`` asked for every queue; kept at ``kernel.msgmnb`` where raising is not permitted."""

ADDRESS_SLOTS: Final = 256
"""SysV links to hubs one process may hold at once (each needs its own address)."""

_addresses = itertools.count()
_addresses_in_use: set[int] = set()


def _next_address() -> int:
    """A client address unique on this host while the process lives and the link
    is open: ``256 + (pid << 8 | slot)``, the next slot not in use (pid_max is at
    most 2^22, so this stays below 2^31).  Give it back with :func:`_release_address`."""
    base = MIN_CLIENT_ADDRESS + (os.getpid() << 8)
    for _ in range(ADDRESS_SLOTS):
        address = base | (next(_addresses) % ADDRESS_SLOTS)
        if address not in _addresses_in_use:
            _addresses_in_use.add(address)
            return address
    raise ConnectionClosed(
        f"this process already holds {ADDRESS_SLOTS} SysV links to hubs, each with an address "
        "of its own: close one, or share one connection between tasks"
    )


def _release_address(address: int) -> None:
    _addresses_in_use.discard(address)


def bus_key(busdir: Path) -> int:
    """The bus queue's key: ``ftok(<busdir>/sysv.key, 'S')``.

    Raises :class:`~ipcbus.errors.BusNotFound` if the key file is missing.
    """
    path = Path(busdir) / KEY_FILE
    try:
        return int(sysv_ipc.ftok(str(path), FTOK_PROJ, silence_warning=True))
    except (OSError, sysv_ipc.Error):
        raise BusNotFound(Path(busdir).name, str(Path(busdir).parent)) from None


def _proc_uid(pid: int) -> int:
    """The real owner uid of a live process (raises FileNotFoundError if it is gone)."""
    return os.stat(f"/proc/{pid}").st_uid


def _describe(st: QueueStat) -> str:
    return (
        f"id {st.id}, key {st.key:#x}, owner uid {st.uid}, creator uid {st.cuid}, "
        f"mode {st.mode:03o}, {st.messages} message(s)"
    )


def _try_raise_capacity(q: sysv_ipc.MessageQueue, want: int | None) -> int:
    """Ask for a ``msg_qbytes`` of ``want`` bytes; keep the default where not permitted.

    Above ``kernel.msgmnb`` the kernel wants CAP_SYS_RESOURCE (EPERM
    otherwise): that is the normal case for users, not an error.
    """
    if want is not None and want > q.max_size:
        try:
            q.max_size = want
        except sysv_ipc.PermissionsError:
            log.debug(
                "queue %d keeps msg_qbytes=%d: raising it to %d needs CAP_SYS_RESOURCE "
                "(raise kernel.msgmnb with sysctl instead)", q.id, q.max_size, want,
            )
    return int(q.max_size)


def _queued(q: sysv_ipc.MessageQueue) -> int:
    """Messages in ``q`` now (``msg_qnum``); 1 if ``IPC_STAT`` fails, so that a receive reports why."""
    try:
        return int(q.current_messages)
    except (sysv_ipc.Error, OSError):
        return 1


def _receive_failed(q: sysv_ipc.MessageQueue, exc: BaseException) -> None:
    """A receive failed for good (E2BIG: a message larger than this handle's
    buffer, which stays at the queue's head; EACCES: the queue's mode changed):
    say so, since the link then ends as if the queue were removed."""
    log.error(
        "receiving from SysV queue %d failed: %s: %s; ending the link(s) it carries "
        "(a message above kernel.msgmax as it was when the queue was opened?)",
        q.id, type(exc).__name__, exc,
    )


def _receive_batch(
    q: sysv_ipc.MessageQueue, want: int
) -> tuple[list[tuple[bytes, int]], int, bool] | None:
    """Thread side: block in ``msgrcv`` for a first message, then :func:`_drain`.

    Returns the batch, its bytes and whether the queue is gone (removed, or
    unusable: then the batch is empty); ``None`` when interrupted (retry).
    """
    try:
        first = q.receive(True, want)
    except sysv_ipc.ExistentialError:
        return [], 0, True
    except (sysv_ipc.PermissionsError, OSError) as exc:
        _receive_failed(q, exc)  # not a retry: end the link(s), not the thread silently
        return [], 0, True
    except sysv_ipc.Error:
        return None  # EINTR
    batch = [first]
    nbytes, removed = _drain(q, want, batch, len(first[0]))
    return batch, nbytes, removed


def _drain(
    q: sysv_ipc.MessageQueue, want: int, batch: list[tuple[bytes, int]], nbytes: int
) -> tuple[int, bool]:
    """Append to ``batch`` what ``q`` holds for ``want`` now (IPC_NOWAIT), within the
    batch limits; return the batch's bytes and whether the queue was removed.

    Drains what ``IPC_STAT`` says is queued (one ``msgctl`` per batch) rather than
    until a ``msgrcv`` fails with ENOMSG: in a two-process ping-pong prototype
    that failing call delayed every hand-off by ~10 us.
    """
    more = _queued(q)
    while more > 0 and len(batch) < _BATCH_MSGS and nbytes < _BATCH_BYTES:
        more -= 1
        try:
            m = q.receive(False, want)
        except sysv_ipc.ExistentialError:  # EIDRM, or EINVAL: removed
            return nbytes, True
        except (sysv_ipc.PermissionsError, OSError) as exc:  # unusable from here on
            _receive_failed(q, exc)
            return nbytes, True
        except sysv_ipc.Error:
            break  # taken meanwhile (EAGAIN), or EINTR
        batch.append(m)
        nbytes += len(m[0])
    return nbytes, False


class _LoopTurn:
    """Which side receives from a queue: its thread (blocking ``msgrcv``) or the loop.

    A queue has no file descriptor, so a thread blocks in ``msgrcv`` and
    hands batches to the event loop; each hand-off costs a thread switch and,
    when the loop sleeps, a wake-up.  While the loop polls anyway (its node's
    spinner is active, :attr:`Link.keep_polling`), the thread hands the queue
    to the loop together with a batch (:meth:`_Handoff.put`; the loop takes
    it, :meth:`give`, as it delivers that batch) and waits (:meth:`wait`);
    the loop then takes messages with ``IPC_NOWAIT`` on every
    turn (:meth:`_poll`) as long as ``keep_polling()`` says so (a node polls
    for a spin window after each batch from such a link, see
    :meth:`ipcbus.spin.Spinner.linger`), and then gives the queue back
    (:meth:`hand_back`).  One side at a time, so order is kept.  The pattern
    of NAPI in network drivers: interrupts only while idle.
    """

    __slots__ = (
        "_deliver", "_event", "_handle", "_keep_polling", "_loop", "_may_poll", "_q", "_want",
        "given", "loop_has",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        q: sysv_ipc.MessageQueue,
        want: int,
        deliver: Callable[[list[tuple[bytes, int]], int, bool], None],
        may_poll: Callable[[], bool],
        keep_polling: Callable[[], bool],
    ) -> None:
        self._loop = loop
        self._q = q
        self._want = want
        self._deliver = deliver  # (batch, nbytes, removed), on the loop
        self._may_poll = may_poll  # False: give the queue back now
        self._keep_polling = keep_polling
        self._event = threading.Event()
        self._handle: asyncio.Handle | None = None
        self.loop_has = False
        """True while the loop receives (written by the loop only: give, hand_back)."""
        self.given = 0
        """How often the thread gave the queue to the loop."""

    def give(self) -> None:
        """Loop side, as it delivers the batch the thread handed over with the
        queue (:class:`_Handoff`): the loop receives next.  Not earlier: a poll
        must not take newer messages before that batch is delivered."""
        self.given += 1
        self.loop_has = True

    def wait(self) -> None:
        """Thread side, after handing the queue over: block until the loop gives it back."""
        self._event.wait()
        self._event.clear()

    def batch_done(self) -> None:
        """Loop side, after each batch: poll on the next turn if the loop has the queue."""
        if self.loop_has and self._handle is None:
            self._handle = self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        self._handle = None
        if not self.loop_has:
            return
        if not self._may_poll():
            self.hand_back()
            return
        batch: list[tuple[bytes, int]] = []
        nbytes, removed = _drain(self._q, self._want, batch, 0)
        if batch or removed:
            if removed:
                self.hand_back()  # the thread sees EIDRM too, and ends
            try:
                self._deliver(batch, nbytes, removed)  # calls batch_done()
            except BaseException:
                self.hand_back()  # never leave the thread waiting for a poll that died
                raise
        elif self._keep_polling():
            self._handle = self._loop.call_soon(self._poll)
        else:
            self.hand_back()

    def hand_back(self) -> None:
        """Loop side: the thread receives again."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.loop_has:
            self.loop_has = False
            self._event.set()

    def stop(self) -> None:
        """Release a waiting thread for good (it checks its stop flag first)."""
        self.hand_back()
        self._event.set()


class _PidWatch:
    """Calls ``callback`` once when process ``pid`` exits (a pidfd watched by the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int, callback: Callable[[], None]):
        self._loop = loop
        self._callback = callback
        self._fd = os.pidfd_open(pid)  # ProcessLookupError if already gone
        loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        self.close()
        self._callback()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(fd)
            os.close(fd)


class _Handoff:
    """Thread-to-loop hand-off of received messages: at most one loop wake-up pending.

    The receiver thread appends each batch it drained; if the loop has not
    yet run the previous hand-off, the new messages simply join it (no second
    ``call_soon_threadsafe``, no second wake-up of the loop).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[list[tuple[bytes, int]], bool], None],
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._lock = threading.Lock()
        self._items: list[tuple[bytes, int]] = []
        self._removed = False
        self._give: _LoopTurn | None = None
        self._scheduled = False

    def put(
        self, batch: list[tuple[bytes, int]], removed: bool, give: _LoopTurn | None = None
    ) -> bool:
        """Thread side; False if the loop is closed (the thread should stop).

        With ``give``, the thread hands the queue to the loop too: the loop
        takes it (:meth:`_LoopTurn.give`) as it delivers these messages.
        """
        with self._lock:
            self._items.extend(batch)
            self._removed = self._removed or removed
            if give is not None:
                self._give = give
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            removed, self._removed = self._removed, False
            give, self._give = self._give, None
            self._scheduled = False
        if give is not None:
            give.give()  # before the callback, whose batch_done() schedules the first poll
        self._callback(items, removed)


class _TxThread:
    """Blocking ``msgsnd`` to one queue, used only while that queue is full.

    The loop sends with ``IPC_NOWAIT``; on ``EAGAIN`` (and when it does not
    poll, see :meth:`SysvLink._pump`) it hands the messages built so far here
    (``active`` until all are sent), keeps the ones it builds meanwhile
    (order), and sends on itself once this thread reports its batch sent
    (``on_progress``).  The thread never takes more while it is active: a
    thread that keeps receiving the loop's new messages stays busy for good,
    and takes the GIL back after every ``msgsnd`` while the loop runs
    Python, waiting up to the 5 ms switch interval each time (measured: a
    1 KiB stream stuck at 150k msgs/s, every message through this thread,
    long after the queue had room again).
    """

    def __init__(
        self,
        q: sysv_ipc.MessageQueue,
        mtype: int,
        loop: asyncio.AbstractEventLoop,
        on_progress: Callable[[], None],
        on_error: Callable[[BaseException], None],
        name: str,
    ) -> None:
        self._q = q
        self._type = mtype
        self._loop = loop
        self._on_progress = on_progress
        self._on_error = on_error
        self._cond = threading.Condition()
        self._items: collections.deque[bytes] = collections.deque()
        self.pending = 0
        self.active = False
        self.blocked = False
        self._notify_below = -1
        self._stop = False
        self._last: bytes | None = None
        self.ended: asyncio.Future[None] = loop.create_future()
        """Done (on the loop) once the thread's work is over and it is about to end."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, msgs: Iterable[bytes], nbytes: int) -> None:
        with self._cond:
            self._items.extend(msgs)
            self.pending += nbytes
            self.active = True
            self._cond.notify()

    def want_progress(self, below: int) -> bool:
        """Ask for a call to ``on_progress`` once ``pending <= below``; False if already so."""
        with self._cond:
            if self.pending <= below:
                return False
            self._notify_below = below
            return True

    def stop(self, last: bytes | None = None) -> None:
        """Stop after the current ``msgsnd``; anything not yet sent is abandoned.

        ``last``, if given, is sent (waiting for room) before the thread ends: a
        BYE that found the queue full, so that it still goes out after the
        message the thread is stuck on.
        """
        with self._cond:
            self._stop = True
            self._last = last
            self._items.clear()
            self.pending = 0
            self.active = False
            self._cond.notify()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            self._send_all()
        finally:
            last = self._last
            if last is not None and self._stop:
                with contextlib.suppress(sysv_ipc.Error, OSError):
                    self._q.send(last, True, self._type)
            self._call(self._ended)

    def _ended(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def _send_all(self) -> None:
        q, t, cond, items = self._q, self._type, self._cond, self._items
        while True:
            with cond:
                while not items and not self._stop:
                    cond.wait()
                if self._stop:
                    return
                m = items[0]
                self.blocked = True
            try:
                q.send(m, True, t)  # blocks while the queue is full; GIL released
            except (sysv_ipc.ExistentialError, OSError):
                # EIDRM while blocked, EINVAL if the id is already gone: removed.
                self._call(self._on_error, ConnectionClosed(
                    f"SysV queue id {q.id} was removed while sending to it"))
                return
            except sysv_ipc.PermissionsError:
                self._call(self._on_error, PermissionRefused(
                    f"lost write permission on SysV queue id {q.id}"))
                return
            except sysv_ipc.Error:
                continue  # EINTR ("signaled while waiting"): retry the same message
            finally:
                self.blocked = False
            with cond:
                if self._stop:
                    return
                items.popleft()
                self.pending -= len(m)
                if not items:
                    self.active = False
                # Done: the loop sends on (and wakes writers whose level came).
                fire = not items or (self._notify_below >= 0 and self.pending <= self._notify_below)
                if fire:
                    self._notify_below = -1
            if fire:
                self._call(self._on_progress)


class SysvLink(Link):
    """One link over SysV message queues (either side); see the module docstring.

    Created by :func:`connect_sysv` (client side) or
    :meth:`SysvAcceptor.accept` (hub side), never directly.
    """

    poll_after_request = True  # frames reach the loop through the receiver thread

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        out_q: sysv_ipc.MessageQueue,
        out_type: int,
        sender: int,
        peer_address: int,
        msg_size: int,
        max_frame: int,
        high_water: int,
        window: int | None,
        info: LinkInfo,
    ) -> None:
        self._loop = loop
        self._out_q = out_q
        self._out_type = out_type
        self._sender = sender
        self._peer_address = peer_address
        self._msg_size = msg_size
        self.max_frame = max_frame
        self.high_water = high_water
        self.info = info
        # outbound
        self._seq_out = 0
        self._frames: collections.deque[bytes] = collections.deque()
        self._frames_bytes = 0
        self._frag_off = 0
        self._msgs: collections.deque[bytes] = collections.deque()
        self._msgs_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._retry_handle: asyncio.Handle | None = None  # a send that found the queue full
        # The peer's queue is full: from the first EAGAIN to the next msgsnd
        # that succeeds (one spin window asked for per episode).
        self._full = False
        self._window = window  # None: no credit (the receiver throttles through the kernel)
        self._unacked = 0
        self._tx: _TxThread | None = None
        self._writers = WriteWaiters()
        # inbound
        self._seq_in = 0
        self._partial: list[bytes] | None = None
        self._partial_total = 0
        self._partial_got = 0
        self._rx: collections.deque[bytes] = collections.deque()
        self._rx_held = 0
        self._rx_waiter: asyncio.Future[None] | None = None
        self._rx_end: BaseException | None = None
        # lifetime
        self._closed = False
        self._broken: BaseException | None = None
        self._lost_on_break = 0  # bytes still queued when the link broke
        self._peer_gone = False  # BYE received, aborted, or dead: do not send a BYE
        self._bye_sent = False
        # recv() calls _consumed() only while this is true (a per-frame call is
        # measurable at hundreds of thousands of frames per second).
        self._watch_consumption = True

    # -- sending ---------------------------------------------------------

    @property
    def pending_out(self) -> int:
        """Bytes queued by :meth:`send_nowait` that the kernel has not taken yet."""
        tx = self._tx
        return self._frames_bytes + self._msgs_bytes + (tx.pending if tx is not None else 0)

    def send_nowait(self, frame: bytes) -> None:
        """Queue one whole frame; it leaves now if the link is idle, else on the next tick."""
        if self._closed or self._broken is not None:
            if self._closed:
                raise ConnectionClosed("this link is closed")
            raise ConnectionClosed(f"link broken: {self._broken}") from self._broken
        n = len(frame)
        if n > self.max_frame:
            raise FrameTooLarge(n, self.max_frame)
        if n == 0:
            raise ProtocolError("refusing to send an empty frame")
        if not isinstance(frame, bytes):
            frame = bytes(frame)
        self._frames.append(frame)
        self._frames_bytes += n
        if self._flush_handle is None:
            # Idle: send this frame right away (lowest latency), and coalesce the
            # frames queued during the rest of this loop iteration into batches.
            self._flush_handle = self._loop.call_soon(self._flush_tick)
            self._flush()
        elif (
            self._frames_bytes >= self._msg_size
            and self._broken is None
            and (self._window is None or self._window - self._unacked >= self._msg_size)
        ):
            # A producer that does not yield: ship every full message now, so the
            # reader works while we produce (the tail waits for the tick).
            self._build(eager=True)
            if self._msgs:
                self._pump()
            if self._writers:
                self._check_writers()

    def send_now(self, frame: bytes) -> None:
        """One urgent frame (a request, a reply): one ``msgsnd`` when nothing waits before it.

        Otherwise, or when the queue is full, as :meth:`send_nowait`.
        """
        n = len(frame)
        size = _HDR + 4 + n
        tx = self._tx
        window = self._window
        if (
            self._frames
            or self._msgs
            or self._closed
            or self._broken is not None
            or n == 0
            or n > self.max_frame
            or size > self._msg_size
            or (tx is not None and tx.active)
            or (window is not None and window - self._unacked < size)
        ):
            self.send_nowait(frame)
            return
        seq = self._seq_out
        m = b"".join((
            MSG_HEADER.pack(WIRE_VERSION, KIND_FRAMES, 0, 0, self._sender, seq, 1),
            HEADER.pack(n),
            frame,
        ))
        try:
            self._out_q.send(m, False, self._out_type)
        except (sysv_ipc.Error, OSError):
            self.send_nowait(frame)  # full, or gone: the general path sorts it out
            return
        self._seq_out = (seq + 1) & 0xFFFFFFFF
        if window is not None:
            self._unacked += size
        info = self.info
        info.msgs_out += 1
        info.bytes_out += n

    async def send(self, frame: bytes) -> None:
        """Queue one frame, then wait while the link is above its high-water mark."""
        self.send_nowait(frame)
        tx = self._tx
        if self._frames_bytes + self._msgs_bytes + (tx.pending if tx is not None else 0) \
                > self.high_water:
            await self.wait_writable()

    def _flush_tick(self) -> None:
        self._flush_handle = None
        self._flush()

    def _flush(self) -> None:
        if self._broken is not None:
            return
        if self._frames:
            self._build()
        if self._msgs:
            self._pump()
        if self._writers:
            self._check_writers()

    def _next_seq(self) -> int:
        s = self._seq_out
        self._seq_out = (s + 1) & 0xFFFFFFFF
        return s

    def _build(self, eager: bool = False) -> None:
        """Turn queued frames into messages: batches of whole frames, or fragments.

        ``eager``: only full messages; a tail too small to fill one stays queued.
        """
        frames = self._frames
        cap = self._msg_size - _HDR
        window = self._window
        sender = self._sender
        info = self.info
        pack_len = HEADER.pack
        while frames:
            avail = (window - self._unacked) if window is not None else 1 << 62
            f = frames[0]
            off = self._frag_off
            if off == 0 and len(f) + 4 <= cap:
                if eager and self._frames_bytes + 4 * len(frames) < cap:
                    break
                room = min(cap, avail - _HDR)
                if room < len(f) + 4:
                    break  # wait for credit
                parts: list[bytes] = [b""]
                used = 0
                n = 0
                while frames:
                    g = frames[0]
                    need = len(g) + 4
                    if need > room - used:
                        break
                    parts.append(pack_len(len(g)))
                    parts.append(g)
                    used += need
                    n += 1
                    frames.popleft()
                parts[0] = MSG_HEADER.pack(
                    WIRE_VERSION, KIND_FRAMES, 0, 0, sender, self._next_seq(), n
                )
                m = b"".join(parts)
                payload = used - 4 * n
                self._frames_bytes -= payload
                info.msgs_out += n
                info.bytes_out += payload
            else:
                remaining = len(f) - off
                chunk = min(cap, remaining)
                if avail - _HDR < chunk:
                    break  # wait for credit (fragments always go full-size)
                flags = (FLAG_FIRST if off == 0 else 0) | (FLAG_LAST if chunk == remaining else 0)
                hdr = MSG_HEADER.pack(
                    WIRE_VERSION, KIND_FRAGMENT, flags, 0, sender, self._next_seq(),
                    len(f) if off == 0 else 0,
                )
                m = b"".join((hdr, memoryview(f)[off : off + chunk]))
                self._frames_bytes -= chunk
                if flags & FLAG_LAST:
                    frames.popleft()
                    self._frag_off = 0
                    info.msgs_out += 1
                    info.bytes_out += len(f)
                else:
                    self._frag_off = off + chunk
            if window is not None:
                self._unacked += len(m)
            self._msgs.append(m)
            self._msgs_bytes += len(m)

    def _pump(self) -> None:
        """Hand built messages to the kernel: IPC_NOWAIT here, the sender thread once full."""
        msgs = self._msgs
        tx = self._tx
        if tx is not None and tx.active:
            return  # the thread sends its batch first; the rest follows from here
        send = self._out_q.send
        t = self._out_type
        try:
            while msgs:
                m = msgs[0]
                send(m, False, t)
                msgs.popleft()
                self._msgs_bytes -= len(m)
                self._full = False
        except sysv_ipc.BusyError:
            keep = self.keep_polling
            if keep is not None and not self._full:
                # Full since just now: poll for one spin window.  A reader that
                # keeps up frees room within microseconds; trying again on each
                # loop turn costs less than a thread's wake-ups per message.
                self._full = True
                start = self.start_polling
                if start is not None:
                    start()
            if keep is not None and keep():
                if self._retry_handle is None:
                    self._retry_handle = self._loop.call_soon(self._retry)
                return
            # Not polling: a thread blocks in msgsnd with what is built now (the
            # loop never does); what the loop builds meanwhile waits here.
            if tx is None:
                tx = self._tx = _TxThread(
                    self._out_q, t, self._loop, self._on_tx_progress, self._on_tx_error,
                    name=f"ipcbus-sysv-tx-{self._sender}-to-{self._peer_address}",
                )
            tx.put(msgs, self._msgs_bytes)
            msgs.clear()
            self._msgs_bytes = 0
        except (sysv_ipc.ExistentialError, OSError):
            # msgsnd on a removed id fails with EINVAL, which sysv_ipc raises as
            # a plain OSError (EIDRM, as ExistentialError, only wakes a waiter).
            self._on_out_removed()
        except sysv_ipc.PermissionsError:
            self._break(PermissionRefused(f"no write permission on SysV queue id {self._out_q.id}"))

    def _retry(self) -> None:
        self._retry_handle = None
        self._on_tx_progress()

    def _on_out_removed(self) -> None:
        self._peer_gone = True
        exc = self._out_gone()
        self._break(exc)
        self._end(exc)

    def _out_gone(self) -> ConnectionClosed:
        return ConnectionClosed(
            f"the peer's SysV queue (id {self._out_q.id}) is gone: the peer closed, "
            "or someone removed it (ipcrm)"
        )

    def _on_tx_progress(self) -> None:
        if self._frames or self._msgs:
            self._flush()  # the queue had room again: send on from the loop
        self._check_writers()

    def _on_tx_error(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionClosed):
            self._on_out_removed()
        else:
            self._break(exc)

    def _check_writers(self) -> None:
        """Wake the writers whose level was reached; re-arm the sender thread for the rest."""
        writers = self._writers
        if not writers:
            return
        writers.wake(self.pending_out)
        lowest = writers.lowest()
        tx = self._tx
        if lowest is not None and tx is not None and tx.active:
            loop_side = self._frames_bytes + self._msgs_bytes
            if not tx.want_progress(max(0, lowest - loop_side)):
                # Already there (raced with the thread): look again on the next tick.
                self._loop.call_soon(self._check_writers)

    async def _wait_level(self, level: int) -> None:
        while True:
            if self._broken is not None:
                if self._lost_on_break or self.pending_out > level:
                    raise ConnectionClosed(
                        f"link broken with {self._lost_on_break} queued bytes undelivered: "
                        f"{self._broken}"
                    ) from self._broken
                return  # everything had left before the link broke
            if self.pending_out <= level:
                return
            fut = self._loop.create_future()
            self._writers.add(level, fut)
            self._check_writers()
            await fut

    async def wait_writable(self, threshold: int | None = None) -> None:
        """Wait until :attr:`pending_out` is at most ``threshold`` (default: half the high water).

        Raises :class:`~ipcbus.errors.ConnectionClosed` if the link is or
        becomes broken while frames are still queued (they can no longer leave).
        """
        await self._wait_level(self.high_water // 2 if threshold is None else threshold)

    async def drain(self) -> None:
        """Wait until every queued frame has been handed to the kernel queue."""
        await self._wait_level(0)

    def _break(self, exc: BaseException) -> None:
        """The outbound side can no longer deliver: drop what is queued, fail the writers."""
        if self._broken is not None:
            return
        self._broken = exc
        self._lost_on_break = self.pending_out
        self._frames.clear()
        self._frames_bytes = 0
        self._frag_off = 0
        self._msgs.clear()
        self._msgs_bytes = 0
        if self._tx is not None:
            self._tx.stop()
        self._writers.release()  # _wait_level raises ConnectionClosed

    # -- receiving -------------------------------------------------------

    def _rx_data(self, data: bytes) -> int:
        """Process one data message from the peer; return the frame bytes it completed.

        Raises :class:`~ipcbus.errors.ProtocolError` (the link is then dead).
        """
        if len(data) < _HDR:
            raise ProtocolError(
                f"malformed message of {len(data)} bytes: shorter than the {_HDR}-byte header"
            )
        ver, kind, flags, _zero, sender, seq, total = MSG_HEADER.unpack_from(data)
        if ver != WIRE_VERSION:
            raise ProtocolError(f"message header version {ver}, expected {WIRE_VERSION}")
        if sender != self._peer_address:
            raise ProtocolError(
                f"message claims sender address {sender}, this link's peer is {self._peer_address}"
            )
        if seq != self._seq_in and kind != KIND_BYE:
            raise ProtocolError(
                f"message sequence gap from address {sender}: expected #{self._seq_in}, "
                f"got #{seq} (a message was lost, purged or injected)"
            )
        if seq != self._seq_in:
            # A peer that closed gave up on messages its sender thread still
            # held (its flush timed out): its BYE ends the link all the same.
            log.info(
                "%r: the peer closed with %d message(s) it never sent",
                self, (seq - self._seq_in) & 0xFFFFFFFF,
            )
        self._seq_in = (seq + 1) & 0xFFFFFFFF
        if kind == KIND_FRAMES:
            return self._rx_frames(data, total)
        if kind == KIND_FRAGMENT:
            return self._rx_fragment(data, flags, total)
        if kind == KIND_BYE:
            self._on_peer_bye()
            return 0
        return self._rx_other(kind, flags, total, data)

    def _rx_other(self, kind: int, flags: int, total: int, data: bytes) -> int:
        raise ProtocolError(f"unexpected message kind {_KIND_NAMES.get(kind, kind)} on this link")

    def _rx_frames(self, data: bytes, n: int) -> int:
        if self._partial is not None:
            raise ProtocolError(
                f"whole frames arrived while a fragmented frame was incomplete "
                f"({self._partial_got} of {self._partial_total} bytes)"
            )
        pos = _HDR
        end = len(data)
        mf = self.max_frame
        # Parsed whole before any is delivered: a message refused for what
        # follows (truncated, trailing bytes) delivers none of its frames.
        rx: list[bytes] = []
        unpack = HEADER.unpack_from
        got = 0
        for _ in range(n):
            if pos + 4 > end:
                raise ProtocolError("FRAMES message truncated: a frame length is missing")
            (ln,) = unpack(data, pos)
            pos += 4
            if ln == 0:
                raise ProtocolError("FRAMES message holds an empty frame")
            if ln > mf:
                raise FrameTooLarge(ln, mf, "announced frame")
            if pos + ln > end:
                raise ProtocolError(
                    f"FRAMES message truncated: a {ln}-byte frame with {end - pos} bytes left"
                )
            rx.append(data[pos : pos + ln])
            pos += ln
            got += ln
        if pos != end:
            raise ProtocolError(f"FRAMES message has {end - pos} trailing bytes after {n} frames")
        self._rx.extend(rx)
        self._rx_held += got
        info = self.info
        info.msgs_in += n
        info.bytes_in += got
        return got

    def _rx_fragment(self, data: bytes, flags: int, total: int) -> int:
        chunk = data[_HDR:]
        if flags & FLAG_FIRST:
            if self._partial is not None:
                raise ProtocolError(
                    f"a new fragmented frame began while the previous one was incomplete "
                    f"({self._partial_got} of {self._partial_total} bytes)"
                )
            if total == 0:
                raise ProtocolError("first fragment announces an empty frame")
            if total > self.max_frame:
                # Refused at the first fragment, before reassembling anything.
                raise FrameTooLarge(total, self.max_frame, "announced frame")
            self._partial = [chunk]
            self._partial_total = total
            self._partial_got = len(chunk)
        else:
            if self._partial is None:
                raise ProtocolError("continuation fragment without a first fragment")
            self._partial.append(chunk)
            self._partial_got += len(chunk)
        if self._partial_got > self._partial_total:
            raise ProtocolError(
                f"fragments overflow their frame: {self._partial_got} bytes for an announced "
                f"{self._partial_total}"
            )
        if flags & FLAG_LAST:
            if self._partial_got != self._partial_total:
                raise ProtocolError(
                    f"last fragment ends the frame at {self._partial_got} of "
                    f"{self._partial_total} announced bytes"
                )
            frame = b"".join(self._partial)
            self._partial = None
            self._rx.append(frame)
            self._rx_held += len(frame)
            self.info.msgs_in += 1
            self.info.bytes_in += len(frame)
            return len(frame)
        return 0

    def _drop_partial(self, why: str) -> None:
        if self._partial is not None:
            log.info(
                "%r: dropped an incomplete frame (%d of %d bytes): %s",
                self, self._partial_got, self._partial_total, why,
            )
            self._partial = None

    def _on_peer_bye(self) -> None:
        self._peer_gone = True
        self._drop_partial("the peer closed mid-frame")
        self._end(EndOfStream("the peer closed the link"))
        self._break(ConnectionClosed("the peer closed the link"))

    def _end(self, exc: BaseException) -> None:
        """No more frames will arrive: recv raises ``exc`` once the buffered ones are read."""
        if self._rx_end is None:
            self._rx_end = exc
        self._wake_reader()

    def _wake_reader(self) -> None:
        w = self._rx_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _deliver_or_wake(self) -> None:
        """A batch arrived: hand it to :attr:`on_frames` if the reader is idle, else wake it."""
        hook = self.on_frames
        w = self._rx_waiter
        if (
            hook is not None
            and w is not None
            and not w.done()
            and self._rx
            and self._interrupt is None
            and not self._closed
        ):
            hook()  # handled right here (see Link.on_frames)
            if not self._rx and self._rx_end is None:
                return
        self._wake_reader()

    def _consumed(self) -> None:
        """Hook: a frame left the receive buffer (credit and pause accounting)."""

    def take_ready(self, max_bytes: int = 1 << 20) -> list[bytes]:
        """Whole frames already received, up to about ``max_bytes``, without awaiting."""
        rx = self._rx
        if not rx or self._closed:
            return []
        frames: list[bytes] = []
        taken = 0
        pop = rx.popleft
        while rx and taken < max_bytes:
            f = pop()
            frames.append(f)
            taken += len(f)
        self._rx_held -= taken
        if self._watch_consumption:
            self._consumed()  # looks at what is left: once for the batch is enough
        return frames

    async def recv(self) -> bytes:
        """Return the next whole frame (see :meth:`Link.recv` for what it raises)."""
        while True:
            if self._interrupt is not None:
                exc, self._interrupt = self._interrupt, None
                raise exc
            if self._closed:
                raise ConnectionClosed("this link is closed")
            rx = self._rx
            if rx:
                f = rx.popleft()
                self._rx_held -= len(f)
                if self._watch_consumption:
                    self._consumed()
                return f
            if self._rx_end is not None:
                raise self._rx_end
            fut = self._loop.create_future()
            self._rx_waiter = fut
            try:
                await fut
            finally:
                self._rx_waiter = None

    # -- lifetime --------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called or the link broke."""
        return self._closed or self._broken is not None

    def _bye_message(self) -> bytes:
        return MSG_HEADER.pack(WIRE_VERSION, KIND_BYE, 0, 0, self._sender, self._next_seq(), 0)

    async def _flush_and_bye(self) -> None:
        """Best effort, bounded: let queued frames leave, then say BYE after them."""
        if self._broken is not None or self._peer_gone:
            return
        try:
            async with asyncio.timeout(_FLUSH_TIMEOUT):
                await self.drain()
                self._msgs.append(self._bye_message())
                self._msgs_bytes += _HDR
                self._pump()
                await self.drain()
                # Only now has it left: if this drain gives up, teardown sends
                # another (the hub then drops the link for its gap at worst,
                # instead of keeping it until this process exits).
                self._bye_sent = True
        except (TimeoutError, ConnectionClosed):
            pass

    def _fail_waiters(self) -> None:
        self._writers.release()
        self._wake_reader()

    def _stop_tx(
        self, unblock: Callable[[], None], wait: float = _JOIN_TIMEOUT, last: bytes | None = None
    ) -> None:
        """Stop the sender thread (after it sends ``last``, see :meth:`_TxThread.stop`);
        if it is stuck in msgsnd, ``unblock`` frees it, then join it for up to
        ``wait`` seconds (:meth:`_join_tx` waits without blocking)."""
        tx = self._tx
        if tx is None:
            return
        tx.stop(last)
        if tx.blocked:
            unblock()
        if not tx.join(wait) and wait:
            self._tx_left_behind()

    async def _join_tx(self, until: float) -> None:
        """Wait, on the loop and until ``time.monotonic()`` reaches ``until``, for
        a stopped sender thread to end.

        It may be blocked in msgsnd on a queue whose live reader is stopped
        (SIGSTOP): a blocking join would freeze this event loop meanwhile.
        """
        tx = self._tx
        if tx is None or not tx.is_alive():
            return
        # At least _FREED_GRACE: a thread freed by removing its queue (EIDRM)
        # needs a moment to end, even once the flush used up the budget.
        with anyio.move_on_after(max(_FREED_GRACE, until - time.monotonic())):
            await asyncio.shield(tx.ended)
        if not tx.ended.done() or not tx.join(_JOIN_TIMEOUT):  # once ended, it returns at once
            self._tx_left_behind()

    def _tx_left_behind(self) -> None:
        log.warning(
            "%r: the sender thread is still blocked in msgsnd on queue %d (its reader "
            "is stopped); leaving it: it ends once that queue has room or is removed",
            self, self._out_q.id,
        )

    def __repr__(self) -> str:
        i = self.info
        state = "closed" if self.closed else "open"
        return (
            f"<{type(self).__name__} sysv {self._sender}->{self._peer_address} "
            f"peer_pid={i.peer_pid} {state}>"
        )


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


class _ClientLink(SysvLink):
    """The client's end: sends to the bus queue (credit-gated), receives on its own queue."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        busdir: Path,
        bus_q: sysv_ipc.MessageQueue,
        own_q: sysv_ipc.MessageQueue,
        address: int,
        hub_pid: int,
        hub_uid: int,
        msg_size: int,
        max_frame: int,
        high_water: int,
    ) -> None:
        super().__init__(
            loop=loop,
            out_q=bus_q,
            out_type=T_TO_HUB,
            sender=address,
            peer_address=HUB_ADDRESS,
            msg_size=msg_size,
            max_frame=max_frame,
            high_water=high_water,
            window=0,  # nothing leaves before the hub's WELCOME grants a window
            info=LinkInfo(
                transport="sysv",
                peer_pid=hub_pid,
                peer_uid=hub_uid,
                peer_name="hub",
                objects={"bus_queue": bus_q.id, "queue": own_q.id, "key": own_q.key,
                         "address": address},
            ),
        )
        self._init_rx(loop, busdir, own_q, address, hub_pid, "the hub")

    def _init_rx(
        self,
        loop: asyncio.AbstractEventLoop,
        busdir: Path | None,
        own_q: sysv_ipc.MessageQueue,
        address: int,
        peer_pid: int,
        peer_label: str,
    ) -> None:
        """The receiving side's state: ``own_q`` read for type ``address`` and the controls."""
        self._busdir = busdir
        self._own_q = own_q
        self._own_id = own_q.id
        self._address = address
        self._hub_pid = peer_pid
        self._peer_label = peer_label  # "the hub", or who the peer of a pair link is
        self._credit_unit = 0
        self._welcome: asyncio.Future[None] = loop.create_future()
        # receiver-thread state (see _rx_run for who writes what)
        self._paused = False
        self._nudged = False
        self._stopping = False
        self._watch_consumption = False  # follows _paused
        self._rx_delivered = 0  # written by the thread
        self._rx_processed = 0  # written by the loop
        self._hub_watch: _PidWatch | None = None
        self._peer_exited = False  # its pidfd fired
        # Why the stream ends once our own end marker (below) comes back.
        self._marker_end: BaseException | None = None
        self._handoff = _Handoff(loop, self._on_rx_batch)
        self._turn = _LoopTurn(
            loop, own_q, -address, self._on_polled, self._may_poll, self._loop_polls
        )
        self._rx_thread = threading.Thread(
            target=self._rx_run, name=f"ipcbus-sysv-rx-{address}", daemon=True
        )
        self._torn_down = False

    def _start(self) -> None:
        self._rx_thread.start()
        try:
            self._hub_watch = _PidWatch(self._loop, self._hub_pid, self._on_hub_exit)
        except ProcessLookupError:
            self._on_hub_exit()

    # -- the receiver thread ---------------------------------------------

    def _buffered(self) -> int:
        return self._rx_delivered - self._rx_processed + self._rx_held

    def _rx_run(self) -> None:
        """Thread body: drain our queue in batches, pausing (control only) when the app lags.

        Shared state is plain attributes, each written by one side only (the
        GIL makes each read and write atomic): the thread writes
        ``_rx_delivered``, ``_paused``, ``_nudged=False``; the loop writes
        ``_rx_processed``, ``_rx_held``, ``_nudged=True``, ``_stopping``.
        """
        q = self._own_q
        handoff = self._handoff
        handed = False
        while True:
            if handed:
                self._turn.wait()  # the loop receives meanwhile
                handed = False
                if self._stopping:
                    return
            # Pause when the application lags: receive only control messages
            # (ACK, ABORT, NUDGE), so our queue fills and the hub feels it.
            if self._buffered() > _RX_PAUSE:
                # A nudge sent before this pause (the loop may have taken it
                # from the queue as stale) must not stop the next one.
                self._nudged = False
                self._paused = self._watch_consumption = True
                if self._buffered() <= _RX_PAUSE:  # the loop caught up meanwhile
                    self._paused = self._watch_consumption = False
            else:
                self._paused = self._watch_consumption = False
            got = _receive_batch(q, -CONTROL_MAX if self._paused else -self._address)
            if got is None:
                continue
            batch, nbytes, removed = got
            self._rx_delivered += nbytes
            if self._nudged and any(t == T_NUDGE for _, t in batch):
                self._nudged = False
            if (
                self.keep_polling is not None
                and not removed
                and not self._paused
                and self._buffered() <= _RX_PAUSE
            ):
                # The loop polls: let it take what comes next itself, once it
                # has delivered this batch (the hand-off carries the queue).
                handed = True
            give = self._turn if handed else None
            if not handoff.put(batch, removed, give) or removed or self._stopping:
                return

    # -- the loop side of receiving ----------------------------------------

    def _on_rx_batch(self, batch: list[tuple[bytes, int]], removed: bool) -> None:
        credit = 0
        processed = 0
        address = self._address
        for data, t in batch:
            processed += len(data)
            if self._rx_end is not None:
                continue  # the link ended: drain and drop
            if t == address:
                if not data:
                    if self._marker_end is None:
                        # Data always has a header: an empty one is only our own
                        # end marker, and we queued none.
                        self._fatal(ProtocolError(
                            "a zero-length data message this link did not send itself: "
                            "another process writes to its queue"))
                        continue
                    # Our own end marker, queued after everything the hub sent.
                    self._drop_partial(f"{self._peer_label} exited mid-frame")
                    self._end(self._marker_end or EndOfStream(
                        f"{self._peer_label} (pid {self._hub_pid}) exited"))
                    continue
                try:
                    self._rx_data(data)
                except ProtocolError as exc:
                    self._fatal(exc)
            elif t == T_ACK:
                if len(data) == 4:
                    credit += _U32.unpack(data)[0]
                elif not data:
                    credit += 1
                else:
                    log.warning("%r: ignored a malformed ACK of %d bytes", self, len(data))
            elif t == T_ABORT:
                reason = data.decode("utf-8", "replace") if data else "no reason given"
                self._peer_gone = True
                aborted = ConnectionClosed(f"{self._peer_label} aborted this link: {reason}")
                self._drop_partial("aborted")
                self._break(aborted)
                self._end(aborted)
            elif t == T_NUDGE:
                pass  # handled by the thread (one the loop receives (_poll) is stale)
            else:
                log.warning(
                    "%r: discarded a message of unknown type %d (%d bytes) on queue %d; "
                    "only %s may write to this queue",
                    self, t, len(data), self._own_id, self._peer_label,
                )
        self._rx_processed += processed
        if credit and self._broken is None:
            self._unacked = max(0, self._unacked - credit * self._credit_unit)
            if self._frames:
                self._flush()
        if removed and self._rx_end is None and not self._closed:
            gone = ConnectionClosed(
                f"this client's SysV queue (id {self._own_id}) was removed (ipcrm?)"
            )
            self._break(gone)
            self._end(gone)
        if not self._welcome.done() and self._rx_end is not None:
            self._welcome.set_exception(self._rx_end)
            self._welcome.exception()  # retrieved here: connect() may have given up
        # The thread may have paused on bytes that were only in transit to us
        # (fragments now absorbed into a partial frame): let it go on if so.
        self._consumed()
        try:
            self._deliver_or_wake()
        finally:
            # Even when on_frames raised (a handler that ends the program): the
            # queue goes back to the receive thread, or nothing is read again.
            self._turn.batch_done()

    def _on_polled(self, batch: list[tuple[bytes, int]], nbytes: int, removed: bool) -> None:
        self._rx_delivered += nbytes  # the thread waits meanwhile: this side writes it
        self._on_rx_batch(batch, removed)

    def _may_poll(self) -> bool:
        return not (
            self._stopping or self._closed or self._rx_end is not None
            or self._buffered() > _RX_PAUSE  # the app lags: the thread pauses
        )

    def _loop_polls(self) -> bool:
        keep = self.keep_polling
        return keep is not None and keep()

    def _rx_other(self, kind: int, flags: int, total: int, data: bytes) -> int:
        if kind == KIND_WELCOME and not self._welcome.done():
            if len(data) != _HDR + _WELCOME.size:
                raise ProtocolError(f"WELCOME of {len(data)} bytes, expected {_HDR + _WELCOME.size}")
            msg_size, window, unit, hub_max = _WELCOME.unpack_from(data, _HDR)
            if not (msg_size >= _HDR + 64 and unit > 0 and window >= 2 * msg_size + unit):
                raise ProtocolError(
                    f"WELCOME with unusable parameters: msg_size={msg_size} window={window} "
                    f"credit_unit={unit}"
                )
            self._msg_size = min(self._msg_size, msg_size)
            self._window = window
            self._credit_unit = unit
            self.max_frame = min(self.max_frame, hub_max)
            self._welcome.set_result(None)
            if self._frames:
                self._flush()
            return 0
        if kind == KIND_REFUSE and not self._welcome.done():
            reason = data[_HDR:].decode("utf-8", "replace")
            self._peer_gone = True
            exc: IpcBusError
            if total == REFUSE_PERMISSION:
                exc = PermissionRefused(f"the hub refused this client: {reason}")
            elif total == REFUSE_BUSY:
                exc = BusBusy(f"the hub refused this client: {reason}")
            elif total == REFUSE_RESOURCES:
                exc = ConnectionClosed(f"the hub refused this client: {reason}; see the hub's log")
            else:
                exc = ProtocolError(f"the hub refused this client: {reason}")
            self._break(exc)
            self._end(exc)
            return 0
        return super()._rx_other(kind, flags, total, data)

    def _fatal(self, exc: ProtocolError) -> None:
        log.warning("%r: protocol error from %s, closing the link: %s", self, self._peer_label, exc)
        self._drop_partial("protocol error")
        self._break(ConnectionClosed(f"link closed after a protocol error: {exc}"))
        self._end(exc)

    def _consumed(self) -> None:
        if self._paused and not self._nudged and self._buffered() <= _RX_PAUSE // 2:
            self._nudged = True
            self._nudge()

    def _nudge(self) -> None:
        # Zero-length: it fits even in a full queue (the kernel counts bytes and
        # messages; a 0-byte message adds no bytes).
        with contextlib.suppress(sysv_ipc.Error, OSError):
            self._own_q.send(b"", False, T_NUDGE)

    def _on_hub_exit(self) -> None:
        """The peer's pidfd fired: end the stream after whatever it sent before dying."""
        self._hub_watch = None
        self._peer_gone = True
        self._peer_exited = True
        gone = f"{self._peer_label} (pid {self._hub_pid}) exited"
        self._break(ConnectionClosed(gone))
        self._end_after_queued(EndOfStream(gone))
        if not self._welcome.done() and self._busdir is not None:
            self._welcome.set_exception(
                BusNotFound(self._busdir.name, str(self._busdir.parent))
            )
            self._welcome.exception()

    def _on_out_removed(self) -> None:
        """The bus queue is gone: nothing more can leave, but what the hub sent is still read.

        A hub that closes cleanly queues its notices and BYE on our queue and
        then removes the bus queue; a send that fails on the removed queue must
        not cut off that orderly end, which is still on its way to the loop.
        """
        self._peer_gone = True
        exc = self._out_gone()
        self._break(exc)
        self._end_after_queued(exc)

    def _end_after_queued(self, exc: BaseException) -> None:
        """End the stream with ``exc`` once everything already in our queue is delivered."""
        if self._rx_end is not None or self._marker_end is not None:
            return
        self._marker_end = exc
        try:
            # A zero-length message of our own data type goes behind every data
            # message the hub queued (FIFO within a type): the thread reaches it
            # only after delivering them all.
            self._own_q.send(b"", False, self._address)
        except (sysv_ipc.Error, OSError):
            self._drop_partial("the link ended")
            self._end(exc)

    async def _wait_welcome(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._welcome)
        except TimeoutError:
            bus = self._busdir.name if self._busdir is not None else "?"
            raise HandshakeTimeout(
                f"the hub of bus {bus!r} did not answer this client's knock "
                f"within {timeout:g} s; it refused the knock (see its log), is overloaded, "
                "or is stopped (`ipcbus ls` shows its state)"
            ) from None

    # -- closing ---------------------------------------------------------

    async def aclose(self) -> None:
        """Flush (briefly), say BYE, remove this client's queue, join the threads."""
        if self._closed:
            return
        self._closed = True
        # One budget for the flush and the sender thread: a close takes at most
        # _FLUSH_TIMEOUT (then _FREED_GRACE), about what it takes on the other
        # transports (it took 2 s, then 5 s more for a thread stuck on the
        # queue of a stopped hub).
        until = time.monotonic() + _FLUSH_TIMEOUT
        try:
            if self._welcome.done() and not self._welcome.cancelled() and \
                    self._welcome.exception() is None:
                await self._flush_and_bye()
        finally:
            self._teardown()
            await self._join_tx(until)

    def _tx_left_behind(self) -> None:
        super()._tx_left_behind()
        tx, q, hub_pid = self._tx, self._out_q, self._hub_pid
        if tx is None:
            return
        # The thread waits for a stopped hub to read; a hub that dies instead
        # never will.  Its queue then holds only garbage: drained, the blocked
        # msgsnd gets room and the thread ends.  (A new hub makes a new queue:
        # this handle's id then fails, and the thread has ended with EIDRM.)
        try:
            pidfd: int | None = os.pidfd_open(hub_pid)  # not fooled by a reused pid
        except ProcessLookupError:
            _drain_garbage(q)  # dead already
            return
        except OSError:
            pidfd = None  # out of fds: poll the pid instead

        def free_when_the_hub_dies() -> None:
            try:
                while tx.is_alive():
                    if (
                        not _pid_alive(hub_pid) if pidfd is None
                        else select.select([pidfd], [], [], 0)[0]
                    ):
                        _drain_garbage(q)
                    tx.join(0.2)
            finally:
                if pidfd is not None:
                    os.close(pidfd)

        threading.Thread(
            target=free_when_the_hub_dies, name=f"ipcbus-sysv-tx-watch-{hub_pid}", daemon=True
        ).start()

    def _unblock_bus_send(self) -> None:
        """Free our sender thread stuck in msgsnd on a full bus queue whose hub died.

        A dead hub's queue holds only garbage: drain it (IPC_NOWAIT) so the
        blocked msgsnd gets room.  While the hub lives it drains the queue
        itself, so nothing is needed: a hub that only ended *our* link (BYE,
        ABORT, REFUSE) still serves everyone else's messages in that queue.
        """
        if not self._peer_gone or (not self._peer_exited and _pid_alive(self._hub_pid)):
            return
        _drain_garbage(self._out_q)

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        for h in (self._flush_handle, self._retry_handle):
            if h is not None:
                h.cancel()
        self._flush_handle = self._retry_handle = None
        if self._hub_watch is not None:
            self._hub_watch.close()
            self._hub_watch = None
        welcomed = self._welcome.done() and not self._welcome.cancelled() \
            and self._welcome.exception() is None
        late_bye = None
        if welcomed and not self._bye_sent and not self._peer_gone:
            # The link broke (protocol error) or the flush gave up: still tell the
            # hub we are gone, so it does not wait for our death to notice.
            bye = self._bye_message()
            try:
                self._out_q.send(bye, False, self._out_type)
            except sysv_ipc.BusyError:
                # The bus queue is full (its hub stopped?): the sender thread
                # sends it once it has room, after the message it is stuck on.
                late_bye = bye if self._tx is not None and self._tx.is_alive() else None
            except (sysv_ipc.Error, OSError):
                pass
        self._break(ConnectionClosed("this link is closed"))
        self._stopping = True
        self._turn.stop()  # a thread waiting for its turn sees _stopping and ends
        # Removing our queue wakes the receiver thread (EIDRM) and discards
        # whatever the hub sent that we will never read.
        with contextlib.suppress(sysv_ipc.Error, OSError):
            self._own_q.remove()
        _release_address(self._address)  # nothing is sent to it any more
        if self._busdir is not None:
            forget_object(self._busdir, "msq", self._own_id)
        if self._rx_thread.is_alive():
            self._rx_thread.join(_JOIN_TIMEOUT)
        # Not joined here: blocked in msgsnd on the queue of a live hub that is
        # stopped, the thread may take long.  aclose() waits for it (_join_tx).
        self._stop_tx(self._unblock_bus_send, wait=0.0, last=late_bye)
        self._fail_waiters()


async def connect_sysv(
    busdir: Path,
    *,
    hub_pid: int,
    name: str = "",
    max_frame: int = DEFAULT_MAX_FRAME,
    send_knock: Callable[[Knock], None] | None = None,
    mode: int = 0o600,
    gid: int | None = None,
    high_water: int = DEFAULT_HIGH_WATER,
    queue_bytes: int | None = DEFAULT_QUEUE_BYTES,
    timeout: float = _CONNECT_TIMEOUT,
) -> Link:
    """Join the bus in ``busdir`` over SysV message queues; return the link once usable.

    Opens the bus queue (key ``ftok(<busdir>/sysv.key)``), checks it belongs
    to the hub's uid, creates this client's own queue (mode ``mode``, group
    ``gid``), knocks (``send_knock``, by default through the bus's door), and
    waits up to ``timeout`` seconds for the hub's WELCOME.

    Raises :class:`~ipcbus.errors.BusNotFound` (no such bus or hub),
    :class:`~ipcbus.errors.PermissionRefused` (the bus queue is not the
    hub's, or its mode denies us, or the hub refused us),
    :class:`~ipcbus.errors.ProtocolError` (the hub refused the knock) and
    :class:`~ipcbus.errors.HandshakeTimeout` (no answer in time: a refused
    knock, an overloaded or a stopped hub), as the other transports do.
    """
    busdir = Path(busdir)
    loop = asyncio.get_running_loop()
    if mode & 0o007 or mode & ~0o777:
        raise ValueError(f"mode {mode:#o}: a client queue must not be open to other users")
    limits = read_limits()
    key = bus_key(busdir)
    try:
        hub_uid = _proc_uid(hub_pid)
    except FileNotFoundError:
        raise BusNotFound(busdir.name, str(busdir.parent)) from None
    try:
        bus_q, size = open_handle(key, 0, 0o600, limits.msgmax)
    except QueueNotFound:
        raise BusNotFound(busdir.name, str(busdir.parent)) from None
    except PermissionRefused as exc:
        raise PermissionRefused(
            f"bus {busdir.name!r}: you (uid {os.getuid()}) may not use its SysV queue "
            f"(key {key:#x}): {exc}"
        ) from None
    st = queue_stat(bus_q)
    if st.uid != hub_uid or st.cuid != hub_uid:
        raise PermissionRefused(
            f"bus {busdir.name!r}: its SysV queue ({_describe(st)}) does not belong to the "
            f"hub's uid {hub_uid}; refusing to send frames to it"
        )
    address = _next_address()
    try:
        own_q, own_size = _new_queue(
            busdir, limits.msgmax, {"role": "client", "address": address, "hub_pid": hub_pid, "name": name}
        )
    except BaseException:
        _release_address(address)
        raise
    link: _ClientLink | None = None
    try:
        if gid is not None:
            own_q.gid = gid
        if mode != 0o600:
            own_q.mode = mode
        # Each message must fit in the queue it goes into (msg_qbytes), not only
        # under kernel.msgmax: where msgmax is the larger, a bigger one never enters.
        own_size = min(own_size, _try_raise_capacity(own_q, queue_bytes))
        link = _ClientLink(
            loop=loop, busdir=busdir, bus_q=bus_q, own_q=own_q, address=address,
            hub_pid=hub_pid, hub_uid=hub_uid, msg_size=min(size, st.max_bytes),
            max_frame=max_frame, high_water=high_water,
        )
        link._start()
        knock = Knock(
            version=PROTOCOL_VERSION,
            transport="sysv",
            pid=os.getpid(),
            uid=os.getuid(),
            name=name,
            params={
                "key": own_q.key,
                "msqid": own_q.id,
                "address": address,
                "msg_size": own_size,  # what the hub may send us
                "max_frame": max_frame,
            },
        )
        if send_knock is None:
            from .door import send_knock as door_send_knock

            door_send_knock(busdir, knock)
        else:
            send_knock(knock)
        await link._wait_welcome(timeout)
    except BaseException:
        if link is not None:
            await link.aclose()
        else:
            with contextlib.suppress(sysv_ipc.Error, OSError):
                own_q.remove()
            forget_object(busdir, "msq", own_q.id)
            _release_address(address)
        raise
    return link


# ---------------------------------------------------------------------------
# Pair links (a worker pool's parent and one worker, no hub)
# ---------------------------------------------------------------------------

PAIR_DATA_TYPE: Final = MIN_CLIENT_ADDRESS
"""``mtype`` of data on both queues of a pair link (control types stay 1..255)."""
_PAIR_CREATOR: Final = 1  # header sender address of the side that made the queues
_PAIR_ATTACHER: Final = 2


class SysvPairLink(_ClientLink):
    """A point-to-point SysV link between two processes: one queue per direction, no hub.

    :meth:`create` makes both queues (random keys, ``IPC_EXCL``, mode 0600)
    and returns the parameters to hand to the other process, which calls
    :meth:`attach`.  Each side reads only its own queue (the one the other
    side writes), so a reader that stalls fills only that queue and the
    writer waits in its sender thread: the kernel's queue capacity is the
    flow control, no credit is needed.  The message format is the bus
    link's (docs/transports/sysv.md); data has ``mtype``
    :data:`PAIR_DATA_TYPE`.

    Lifetime: each side removes the queue it reads when it closes, and both
    queues when the other process has exited.  With ``records`` (a folder),
    both queues are recorded there until removed, so ``ipcbus gc`` (and the
    next worker pool) can remove them if both processes are killed.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        records: Path | None,
        in_q: sysv_ipc.MessageQueue,
        out_q: sysv_ipc.MessageQueue,
        creator: bool,
        peer_pid: int,
        msg_size: int,
        max_frame: int,
        high_water: int,
    ) -> None:
        sender, peer = (_PAIR_CREATOR, _PAIR_ATTACHER) if creator else (_PAIR_ATTACHER, _PAIR_CREATOR)
        SysvLink.__init__(
            self,
            loop=loop,
            out_q=out_q,
            out_type=PAIR_DATA_TYPE,
            sender=sender,
            peer_address=peer,
            msg_size=msg_size,
            max_frame=max_frame,
            high_water=high_water,
            window=None,  # the kernel throttles: each queue has one reader
            info=LinkInfo(
                transport="sysv",
                peer_pid=peer_pid,
                peer_uid=os.getuid(),
                peer_name="worker" if creator else "parent",
                objects={"queue": in_q.id, "peer_queue": out_q.id},
            ),
        )
        label = "the worker" if creator else "the parent"
        self._init_rx(loop, records, in_q, PAIR_DATA_TYPE, peer_pid, label)
        self._welcome.set_result(None)  # nothing to negotiate: usable at once
        self._started = False

    @classmethod
    def create(
        cls,
        records: Path | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        high_water: int = DEFAULT_HIGH_WATER,
        queue_bytes: int | None = DEFAULT_QUEUE_BYTES,
    ) -> tuple[SysvPairLink, dict[str, int | str]]:
        """Make both queues; return this side's link and the parameters for :meth:`attach`.

        Call :meth:`start` with the other process's pid once it exists.
        Must be called from a running event loop.
        """
        if not 1 <= max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be between 1 and {0xFFFFFFFF} bytes, not {max_frame}")
        loop = asyncio.get_running_loop()
        limits = read_limits()
        made: list[sysv_ipc.MessageQueue] = []
        size = limits.msgmax
        try:
            for role in ("down", "up"):
                q, qsize = _new_queue(records, limits.msgmax, {"role": f"pair-{role}"})
                made.append(q)
                # A message must fit in the queue (msg_qbytes), not only under
                # kernel.msgmax: where msgmax is the larger, a bigger one never enters.
                size = min(size, qsize, _try_raise_capacity(q, queue_bytes))
        except BaseException:
            _remove_queues(made, records)
            raise
        down, up = made
        link = cls(
            loop=loop, records=records, in_q=up, out_q=down, creator=True, peer_pid=0,
            msg_size=size, max_frame=max_frame, high_water=high_water,
        )
        params: dict[str, int | str] = {
            "down": down.id, "down_key": down.key, "up": up.id, "up_key": up.key,
            "msg_size": size, "records": "" if records is None else str(records),
        }
        return link, params

    def start(self, peer_pid: int) -> None:
        """Creator side: the peer is process ``peer_pid``; start receiving and watching it."""
        if self._started:
            raise RuntimeError("this pair link is already started")
        _check_peer_pid(peer_pid)
        self._started = True
        self._hub_pid = self.info.peer_pid = peer_pid
        self._start()

    @classmethod
    async def attach(
        cls,
        params: dict[str, int | str],
        *,
        peer_pid: int,
        max_frame: int = DEFAULT_MAX_FRAME,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> SysvPairLink:
        """Open the queues :meth:`create` made in process ``peer_pid``; return this side's link.

        Refuses (:class:`~ipcbus.errors.PermissionRefused`) queues that are
        not ours (owner and creator uid) or that other users may open, and
        raises :class:`~ipcbus.errors.ConnectionClosed` if they are gone.
        """
        loop = asyncio.get_running_loop()
        _check_peer_pid(peer_pid)
        if not 1 <= max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be between 1 and {0xFFFFFFFF} bytes, not {max_frame}")
        try:
            ids = {r: int(params[r]) for r in ("down", "up")}
            keys = {r: int(params[f"{r}_key"]) for r in ("down", "up")}
            msg_size = int(params["msg_size"])
            records = Path(str(params["records"])) if params.get("records") else None
            for r, k in keys.items():
                if not -(1 << 31) <= k < (1 << 32) or not k & 0xFFFFFFFF:
                    raise ValueError(f"{r}_key {k:#x} is not the key of a queue (a nonzero 32-bit number)")
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed SysV pair-link parameters {params!r}: {exc}") from None
        if msg_size < _HDR + 64:
            raise ProtocolError(
                f"SysV pair-link parameters announce a message size {msg_size} below the "
                f"{_HDR + 64}-byte minimum"
            )
        limits = read_limits()
        opened: dict[str, sysv_ipc.MessageQueue] = {}
        for role in ("down", "up"):
            try:
                q, qsize = open_handle(keys[role], 0, 0o600, limits.msgmax)
            except QueueNotFound:
                raise ConnectionClosed(
                    f"the {role} queue (id {ids[role]}) of this pair link is gone: its creator "
                    f"(pid {peer_pid}) closed it or died"
                ) from None
            st = queue_stat(q)
            if st.id != ids[role]:
                raise ConnectionClosed(
                    f"key {keys[role]:#x} now names queue {st.id}, not the announced {ids[role]}: "
                    "the pair link's creator closed it"
                )
            if st.uid != os.getuid() or st.cuid != os.getuid() or st.mode & 0o077:
                raise PermissionRefused(
                    f"refusing the pair link's {role} queue ({_describe(st)}): it must be "
                    f"owned and created by uid {os.getuid()} with mode 0600"
                )
            msg_size = min(msg_size, qsize)
            opened[role] = q
        link = cls(
            loop=loop, records=records, in_q=opened["down"], out_q=opened["up"], creator=False,
            peer_pid=peer_pid, msg_size=msg_size, max_frame=max_frame, high_water=high_water,
        )
        link._started = True
        link._start()
        return link

    def forget_peer(self) -> None:
        """The peer process has exited: remove the queue it read, if it left it behind."""
        _remove_queues([self._out_q], self._busdir)

    def remove_queues(self) -> None:
        """Remove both queues now, without closing: for a process about to exit
        that cannot close the link (see :func:`ipcbus.worker.watch_parent`)."""
        _remove_queues([self._own_q, self._out_q], self._busdir)

    def _unblock_bus_send(self) -> None:
        """Free our sender thread stuck in msgsnd: the peer, alive, stopped reading
        past the flush timeout.  Remove the queue we send on (ours, as its only
        other user runs as our uid): the thread wakes with EIDRM, and the peer
        sees the link closed.  (A client's bus queue, instead, belongs to a hub
        that keeps draining it.)"""
        _remove_queues([self._out_q], self._busdir)

    def _teardown(self) -> None:
        if self._torn_down:
            return
        super()._teardown()
        if self._peer_exited or not self._started:
            self.forget_peer()  # nobody else will


def _new_queue(
    records: Path | None, msgmax: int, extra: dict[str, Any], key: int | None = None
) -> tuple[sysv_ipc.MessageQueue, int]:
    """Create a queue (mode 0600, ``IPC_EXCL``) recorded in ``records`` before it
    exists (:func:`~ipcbus.records.create_keyed`): whoever is killed in between
    leaves nothing ``ipcbus gc`` cannot find.  A random key unless ``key``
    (then :class:`QueueExists` if taken).  Returns the handle and its message size."""
    return create_keyed(
        records,
        "msq",
        lambda k: open_handle(k, sysv_ipc.IPC_CREX, 0o600, msgmax),
        lambda made: made[0].id,
        QueueExists,
        extra=extra,
        key=key,
        remove=lambda made: made[0].remove(),
    )


def _drain_garbage(q: sysv_ipc.MessageQueue) -> None:
    """Empty the queue of a dead hub (``IPC_NOWAIT``): a sender blocked on it gets room."""
    with contextlib.suppress(sysv_ipc.Error, OSError):
        while True:
            q.receive(False, 0)


def _check_peer_pid(pid: object) -> None:
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
        raise ValueError(f"peer_pid must be the other process's pid (a positive int), not {pid!r}")


def _remove_queues(queues: Iterable[sysv_ipc.MessageQueue], records: Path | None) -> None:
    for q in queues:
        with contextlib.suppress(sysv_ipc.Error, OSError):
            q.remove()
        if records is not None:
            forget_object(records, "msq", q.id)


# ---------------------------------------------------------------------------
# Hub side
# ---------------------------------------------------------------------------


class _HubLink(SysvLink):
    """The hub's end of one client: sends to the client's queue, fed by the bus-queue thread."""

    def __init__(
        self,
        *,
        acceptor: SysvAcceptor,
        client_q: sysv_ipc.MessageQueue,
        address: int,
        pid: int,
        uid: int,
        name: str,
        msg_size: int,
        max_frame: int,
        window: int,
        credit_unit: int,
    ) -> None:
        assert acceptor._loop is not None and acceptor._q is not None
        super().__init__(
            loop=acceptor._loop,
            out_q=client_q,
            out_type=address,
            sender=HUB_ADDRESS,
            peer_address=address,
            msg_size=msg_size,
            max_frame=max_frame,
            high_water=acceptor.high_water,
            window=None,  # the client's queue throttles us (its reader stops draining)
            info=LinkInfo(
                transport="sysv",
                peer_pid=pid,
                peer_uid=uid,
                peer_name=name,
                objects={"bus_queue": acceptor._q.id, "queue": client_q.id,
                         "key": client_q.key, "address": address},
            ),
        )
        self._acceptor = acceptor
        self._client_id = client_q.id
        self._pid = pid
        self._credit_window = window
        self._credit_unit = credit_unit
        self._absorbed = 0  # bytes of client messages processed
        self._acked = 0  # bytes acknowledged with ACKs
        self._ack_threshold = window // 4
        self._watch_consumption = False  # true while credit is due
        self._watch: _PidWatch | None = None
        self._torn_down = False
        self._purged = False

    # -- receiving (fed by SysvAcceptor._on_batch) ------------------------

    def _feed(self, data: bytes) -> None:
        if self._rx_end is not None:
            return
        try:
            data_kind = len(data) >= _HDR and data[1] in (KIND_FRAMES, KIND_FRAGMENT)  # BYE needs no credit
            if data_kind and self._absorbed + len(data) - self._acked > self._credit_window:
                # Checked before the message is used: none of its frames is delivered.
                raise ProtocolError(
                    f"client exceeded its credit window: {self._absorbed + len(data) - self._acked} "
                    f"bytes unacknowledged, window {self._credit_window}"
                )
            self._rx_data(data)
            if data_kind:
                self._absorbed += len(data)
                if self._absorbed - self._acked >= self._ack_threshold:
                    self._watch_consumption = True
        except ProtocolError as exc:
            self._fatal(exc)

    def _after_batch(self) -> None:
        self._send_acks()
        self._deliver_or_wake()

    def _consumed(self) -> None:
        if self._absorbed - self._acked >= self._ack_threshold:
            self._send_acks()
        else:
            self._watch_consumption = False

    def _send_acks(self) -> None:
        """Return credit to the client, unless its frames pile up unread here.

        Credit is withheld while more than half a window of whole frames
        waits for recv(): then the client's sends wait (backpressure) instead
        of this process buffering without bound.
        """
        unit = self._credit_unit
        if self._rx_held > self._credit_window // 2 or self._broken is not None:
            return
        units = (self._absorbed - self._acked) // unit
        # Return credit in quarter windows: each ACK wakes the client's thread,
        # which costs the sender a cross-CPU wake-up (tens of microseconds here).
        # A client blocked on credit has a whole window outstanding, so it is
        # never starved by this threshold.
        if units * unit < self._ack_threshold:
            return
        q = self._out_q
        try:
            try:
                q.send(_U32.pack(units), False, T_ACK)
            except sysv_ipc.BusyError:
                units = 1
                q.send(b"", False, T_ACK)  # zero-length: fits even in a full queue
        except sysv_ipc.BusyError:
            return
        except (sysv_ipc.ExistentialError, OSError):
            self._on_out_removed()
            return
        except sysv_ipc.Error:
            return
        self._acked += units * unit
        self._watch_consumption = self._absorbed - self._acked >= self._ack_threshold

    def _rx_other(self, kind: int, flags: int, total: int, data: bytes) -> int:
        raise ProtocolError(
            f"client sent a {_KIND_NAMES.get(kind, f'kind-{kind}')} message; "
            "clients send FRAMES, FRAGMENT and BYE only"
        )

    def _fatal(self, exc: ProtocolError) -> None:
        log.warning(
            "bus %s: protocol error from client pid %d (address %d), closing its link: %s",
            self._acceptor.busdir.name, self._pid, self._peer_address, exc,
        )
        self._drop_partial("protocol error")
        self._abort(f"protocol error: {exc}")
        self._end(exc)

    def _abort(self, reason: str) -> None:
        """Tell the client its link is gone (ABORT), and stop sending to it."""
        if not self._peer_gone:
            body = reason.encode()[: self._msg_size]
            try:
                self._out_q.send(body, False, T_ABORT)
            except sysv_ipc.BusyError:
                with contextlib.suppress(sysv_ipc.Error, OSError):
                    self._out_q.send(b"", False, T_ABORT)  # zero-length always fits
            except (sysv_ipc.Error, OSError):
                pass
        self._peer_gone = True
        self._break(ConnectionClosed(f"link aborted: {reason}"))

    def _on_peer_exit(self) -> None:
        """The client died (processed after everything it sent, via the bus-queue marker)."""
        self._peer_gone = True
        self._drop_partial(f"client pid {self._pid} died mid-frame")
        self._end(EndOfStream(f"the client (pid {self._pid}) exited"))
        self._break(ConnectionClosed(f"the client (pid {self._pid}) exited"))
        self._purge()

    def _purge(self) -> None:
        """Remove a dead client's queue: what it never read is discarded, its record forgotten."""
        if self._purged:
            return
        self._purged = True
        try:
            self._out_q.remove()
        except sysv_ipc.ExistentialError:
            pass
        except sysv_ipc.PermissionsError:
            log.info(
                "bus %s: may not remove dead client pid %d's queue %d (another uid); "
                "`ipcbus gc` will", self._acceptor.busdir.name, self._pid, self._client_id,
            )
            return
        forget_object(self._acceptor.busdir, "msq", self._client_id)

    # -- closing ---------------------------------------------------------

    async def aclose(self) -> None:
        """Flush (briefly), say BYE to the client, join the sender thread."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._flush_and_bye()
        finally:
            self._teardown()

    def _unblock_client_send(self) -> None:
        """Free our sender thread stuck in msgsnd on a client queue nobody reads.

        The client stopped reading past the flush timeout.  Removing its
        queue (allowed when it runs as our uid) wakes the thread with EIDRM
        and the client's own thread too (it sees ConnectionClosed).  For
        another uid, take our own messages back (msgrcv of its data type)
        until msgsnd has room, then ABORT.
        """
        try:
            self._out_q.remove()
            self._purged = True
            return
        except sysv_ipc.PermissionsError:
            pass
        except sysv_ipc.Error:
            return
        with contextlib.suppress(sysv_ipc.Error, OSError):
            for _ in range(1 << 16):
                self._out_q.receive(False, self._peer_address)
        with contextlib.suppress(sysv_ipc.Error, OSError):
            self._out_q.send(b"", False, T_ABORT)

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        for h in (self._flush_handle, self._retry_handle):
            if h is not None:
                h.cancel()
        self._flush_handle = self._retry_handle = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._acceptor._unregister(self)
        self._break(ConnectionClosed("this link is closed"))
        self._stop_tx(self._unblock_client_send)
        if self._peer_gone and not _pid_alive(self._pid):
            self._purge()
        self._fail_waiters()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as dead.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return False


def _int_param(knock: Knock, name: str, default: int | None = None) -> int:
    v = knock.params.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(
            f"sysv knock from pid {knock.pid}: params[{name!r}] must be an integer, got {v!r}"
        )
    return v


class SysvAcceptor:
    """The hub side of the SysV transport: owns the bus queue and accepts clients.

    An async context manager.  On entry it creates ``<busdir>/sysv.key``
    (if missing) and the bus queue (``IPC_CREAT | IPC_EXCL``, mode ``mode``,
    group ``gid``), after removing a stale queue left by a dead hub of this
    bus (found through the bus directory's records).  A queue with the bus's
    key that this bus did not create, or that belongs to another uid than
    ``expected_uid`` (default: ours), is refused with
    :class:`~ipcbus.errors.PermissionRefused` and left alone.  On exit every
    link is closed and the bus queue removed.

    If someone removes the bus queue under load (``ipcrm -q``), every link
    ends with :class:`~ipcbus.errors.ConnectionClosed` (clients are told with
    ABORT) and the acceptor recreates the queue so new clients can join.
    """

    def __init__(
        self,
        busdir: Path,
        *,
        mode: int = 0o600,
        gid: int | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        expected_uid: int | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        window: int = DEFAULT_WINDOW,
        credit_unit: int = DEFAULT_CREDIT_UNIT,
        queue_bytes: int | None = DEFAULT_QUEUE_BYTES,
    ) -> None:
        if mode & 0o007 or mode & ~0o777:
            raise ValueError(f"bus queue mode {mode:#o} must not grant access to other users")
        if credit_unit <= 0 or window < 4 * credit_unit:
            raise ValueError("window must be at least 4 credit units")
        if window < 2 * (_HDR + 64) + credit_unit:
            raise ValueError(f"window {window} is too small to hold two messages and a credit unit")
        if window > 0xFFFFFFFF:
            raise ValueError(f"window {window} does not fit the WELCOME message's 32 bits")
        self.busdir = Path(busdir)
        self.mode = mode
        self.gid = gid
        self.max_frame = max_frame
        self.expected_uid = os.getuid() if expected_uid is None else expected_uid
        self.high_water = high_water
        self.window = window
        self.credit_unit = credit_unit
        self.queue_bytes = queue_bytes
        self.garbage = 0
        """Messages discarded because they could not be attributed to a link."""
        self.recreated = 0
        """How many times the bus queue was recreated after being removed under us."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._q: sysv_ipc.MessageQueue | None = None
        self._key = 0
        self._msgmax = 0
        self._bus_capacity = 0  # the bus queue's msg_qbytes, once made
        self._threads: list[threading.Thread] = []
        self._links: dict[int, _HubLink] = {}
        self._gone: collections.deque[int] = collections.deque(maxlen=1024)
        self._marks: collections.deque[Callable[[], None]] = collections.deque()
        self._closing = False
        self._turn: _LoopTurn | None = None  # of the current bus queue's thread
        self._poll_ok = False  # the links' node polls: the thread may give the loop its queue
        self._failed: BaseException | None = None

    # -- properties -------------------------------------------------------

    @property
    def queue_id(self) -> int:
        """The bus queue's id (``ipcs -q``)."""
        if self._q is None:
            raise ConnectionClosed("the SysV acceptor is not open")
        return int(self._q.id)

    @property
    def key(self) -> int:
        """The bus queue's key."""
        return self._key

    @property
    def links(self) -> list[Link]:
        """The live links, one per client."""
        return list(self._links.values())

    def stat(self) -> QueueStat:
        """``IPC_STAT`` of the bus queue."""
        if self._q is None:
            raise ConnectionClosed("the SysV acceptor is not open")
        return queue_stat(self._q)

    # -- lifetime ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._msgmax = read_limits().msgmax
        self._ensure_key_file()
        self._key = bus_key(self.busdir)
        self._clean_stale_records()
        self._create_queue()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _ensure_key_file(self) -> None:
        path = self.busdir / KEY_FILE
        self.busdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PermissionRefused(f"{path} is a symbolic link; refusing it") from None
            raise
        os.close(fd)

    def _clean_stale_records(self) -> None:
        """Remove SysV queues recorded in this bus directory whose creator is dead."""
        table = proc_msg_table()
        for _path, rec in list_records(self.busdir):
            if rec is None or rec.kind != "msq":
                continue
            role = rec.extra.get("role")
            if rec.creator_alive:
                if role == "bus":
                    raise BusBusy(
                        f"bus {self.busdir.name!r}: its SysV queue {rec.ident} belongs to a "
                        f"live hub (pid {rec.creator_pid}); stop that hub first"
                    )
                continue
            if rec.ident.startswith(PENDING_PREFIX):  # recorded before it was made: by key
                ident = next((i for i, r in table.items() if r["key"] == rec.key), -1)
            else:
                try:
                    ident = int(rec.ident)
                except ValueError:
                    continue
            row = table.get(ident)
            if row is not None and row["key"] == rec.key and row["cuid"] == rec.creator_uid:
                with contextlib.suppress(sysv_ipc.Error, OSError):
                    sysv_ipc.remove_message_queue(ident)
                log.info(
                    "bus %s: removed stale SysV queue %d (%s of dead pid %d, %d message(s))",
                    self.busdir.name, ident, role, rec.creator_pid, row["qnum"],
                )
            forget_object(self.busdir, "msq", rec.ident)

    def _create_queue(self) -> None:
        key = self._key
        try:
            # 0600 at first whatever the final mode: never wider than intended.
            q, _size = _new_queue(self.busdir, self._msgmax, {"role": "bus", "mode": self.mode}, key)
        except QueueExists:
            self._refuse_existing(key)
            raise  # pragma: no cover - _refuse_existing always raises
        try:
            if self.gid is not None:
                q.gid = self.gid
            if self.mode != 0o600:
                q.mode = self.mode
            self._bus_capacity = _try_raise_capacity(q, self.queue_bytes)
        except BaseException:
            with contextlib.suppress(sysv_ipc.Error, OSError):
                q.remove()
            forget_object(self.busdir, "msq", q.id)
            raise
        self._q = q
        t = threading.Thread(
            target=self._rx_run, args=(q,), name=f"ipcbus-sysv-hub-rx-{q.id}", daemon=True
        )
        self._threads.append(t)
        t.start()

    def _refuse_existing(self, key: int) -> None:
        """A queue with our key exists and no live record explains it: never take it over."""
        try:
            q, _ = open_handle(key, 0, 0o600, self._msgmax)
            st = queue_stat(q)
        except PermissionRefused as exc:
            raise PermissionRefused(
                f"bus {self.busdir.name!r}: a SysV queue with this bus's key {key:#x} already "
                f"exists and we may not even inspect it ({exc}); it belongs to someone else. "
                "Use another bus directory"
            ) from None
        except QueueNotFound:
            raise QueueExists(f"SysV queue key {key:#x} appeared and vanished; retry") from None
        if st.uid != self.expected_uid or st.cuid != self.expected_uid:
            who = f"uid {st.uid} (created by uid {st.cuid})"
            raise PermissionRefused(
                f"bus {self.busdir.name!r}: a SysV queue with this bus's key already exists "
                f"({_describe(st)}) and belongs to {who}, not to uid {self.expected_uid}; "
                "ipcbus will not take over another user's queue. Use another bus directory"
            )
        raise PermissionRefused(
            f"bus {self.busdir.name!r}: a SysV queue with this bus's key already exists "
            f"({_describe(st)}) but this bus directory has no record of creating it; "
            f"ipcbus will not take it over. If it is a leftover of yours, remove it with "
            f"`ipcrm -q {st.id}`"
        )

    async def aclose(self) -> None:
        """Close every link (BYE to each client), remove the bus queue, join the thread."""
        if self._closing:
            return
        self._closing = True
        links = list(self._links.values())
        if links:
            await asyncio.gather(*(lk.aclose() for lk in links), return_exceptions=True)
        q, self._q = self._q, None
        if q is not None:
            with contextlib.suppress(sysv_ipc.Error, OSError):
                q.remove()  # wakes the receiver thread (EIDRM)
            forget_object(self.busdir, "msq", q.id)
        if self._turn is not None:
            self._turn.stop()  # a thread waiting for its turn sees _closing and ends
        for t in self._threads:
            t.join(_JOIN_TIMEOUT)
        self._threads.clear()

    # -- the bus-queue thread and its batches -------------------------------

    def _rx_run(self, q: sysv_ipc.MessageQueue) -> None:
        """Thread body: drain the bus queue (every type, FIFO) and hand batches to the loop."""
        loop = self._loop
        assert loop is not None
        turn = self._turn = _LoopTurn(
            loop, q, 0,
            lambda batch, _n, removed: self._on_batch(q, batch, removed),
            lambda: not self._closing and self._q is q,
            self._loop_polls,
        )
        handoff = _Handoff(loop, functools.partial(self._on_batch, q))
        handed = False
        while True:
            if handed:
                turn.wait()  # the loop receives meanwhile
                handed = False
                if self._closing:
                    return
            got = _receive_batch(q, 0)
            if got is None:
                continue
            batch, _n, removed = got
            if self._poll_ok and not removed:
                handed = True  # the hand-off carries the queue to the loop
            if not handoff.put(batch, removed, turn if handed else None) or removed:
                return

    def _garbage(self, what: str) -> None:
        self.garbage += 1
        log.warning("bus %s: discarded %s; other links keep running", self.busdir.name, what)

    def _on_batch(
        self, q: sysv_ipc.MessageQueue, batch: list[tuple[bytes, int]], removed: bool
    ) -> None:
        links = self._links
        touched: set[_HubLink] = set()
        sender_at = _U32.unpack_from
        for data, t in batch:
            if t == T_TO_HUB:
                if len(data) < _HDR:
                    self._garbage(
                        f"a malformed message of {len(data)} bytes (shorter than the "
                        f"{_HDR}-byte header)"
                    )
                    continue
                (sender,) = sender_at(data, 4)
                link = links.get(sender)
                if link is None:
                    if sender not in self._gone:
                        self._garbage(f"a message from unknown sender address {sender}")
                    continue
                link._feed(data)
                touched.add(link)
            elif t == T_MARK and not data and self._marks:
                self._marks.popleft()()
            else:
                self._garbage(
                    f"a message of unknown type {t} ({len(data)} bytes): the bus queue "
                    f"carries type {T_TO_HUB} (to the hub) only"
                )
        for link in touched:
            link._after_batch()
            if link.keep_polling is not None:
                self._poll_ok = True
        if removed:
            self._on_queue_removed(q)
        turn = self._turn
        if turn is not None and turn._q is q:
            turn.batch_done()

    def _loop_polls(self) -> bool:
        """Whether the hub's loop polls anyway (its links share one node's spinner)."""
        for link in self._links.values():
            keep = link.keep_polling
            if keep is not None:
                return keep()
        self._poll_ok = False
        return False

    def _mark(self, action: Callable[[], None]) -> None:
        """Run ``action`` after every message now in the bus queue has been processed."""
        q = self._q
        self._marks.append(action)
        try:
            if q is None:
                raise sysv_ipc.ExistentialError("closed")
            q.send(b"", False, T_MARK)  # zero-length: fits even in a full queue
        except (sysv_ipc.Error, OSError):
            self._marks.remove(action)
            action()

    def _on_queue_removed(self, q: sysv_ipc.MessageQueue) -> None:
        current = self._q
        if self._closing or current is None or q is not current:
            return
        links = list(self._links.values())
        qid = int(current.id)
        log.error(
            "bus %s: the bus SysV queue %d was removed by someone else (ipcrm?); "
            "ending %d link(s) with ConnectionClosed and recreating the queue",
            self.busdir.name, qid, len(links),
        )
        forget_object(self.busdir, "msq", qid)
        self._q = None
        self._marks.clear()
        for link in links:
            link._abort("the bus queue was removed (ipcrm?)")
            link._end(ConnectionClosed(
                f"bus {self.busdir.name!r}: the bus SysV queue was removed (ipcrm?)"))
        try:
            self._create_queue()
            self.recreated += 1
        except (IpcBusError, OSError, sysv_ipc.Error) as exc:
            self._failed = exc
            log.error("bus %s: could not recreate the bus queue: %s", self.busdir.name, exc)

    # -- accepting --------------------------------------------------------

    def _unregister(self, link: _HubLink) -> None:
        if self._links.get(link._peer_address) is link:
            del self._links[link._peer_address]
            self._gone.append(link._peer_address)

    async def accept(self, knock: Knock) -> Link:
        """Validate a client's knock, answer it with WELCOME, and return the hub-side link.

        Refusals raise :class:`~ipcbus.errors.PermissionRefused` (wrong uid,
        a queue of another user or open to everyone) or
        :class:`~ipcbus.errors.ProtocolError` (malformed parameters, address
        in use), and are also sent to the client (REFUSE) when its queue can
        be reached, so its ``connect`` fails at once with the same reason.
        """
        loop = self._loop
        if loop is None or self._q is None or self._closing:
            raise ConnectionClosed(
                "the SysV acceptor is not open"
                + (f" (its queue could not be recreated: {self._failed})" if self._failed else "")
            )
        if knock.transport != "sysv":
            raise ProtocolError(f"knock for transport {knock.transport!r} given to the sysv acceptor")
        if knock.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"knock from pid {knock.pid}: protocol version {knock.version}, "
                f"this hub speaks {PROTOCOL_VERSION}"
            )
        key = _int_param(knock, "key")
        msqid = _int_param(knock, "msqid")
        address = _int_param(knock, "address")
        msg_size = _int_param(knock, "msg_size", self._msgmax)
        client_max = _int_param(knock, "max_frame", DEFAULT_MAX_FRAME)
        pid = knock.pid
        try:
            real_uid = _proc_uid(pid)
        except FileNotFoundError:
            raise ProtocolError(f"the knocking process {pid} no longer exists") from None
        except OSError as exc:  # EMFILE, ENOMEM: tell the client, whose queue needs no fd
            with contextlib.suppress(IpcBusError):
                self._refuse_unable(open_handle(key, 0, 0o600, self._msgmax)[0], msqid, address, exc)
            raise
        try:
            cq, _ = open_handle(key, 0, 0o600, self._msgmax)
        except QueueNotFound as exc:
            raise ProtocolError(
                f"knock from pid {pid} names SysV queue key {key:#x}, but no such queue exists ({exc})"
            ) from None
        except PermissionRefused as exc:
            raise PermissionRefused(
                f"knock from pid {pid}: may not open its SysV queue (key {key:#x}): {exc}"
            ) from None
        try:
            self._validate(knock, cq, real_uid, msqid, address, msg_size, client_max)
        except IpcBusError as exc:
            if cq.id == msqid:
                self._refuse(cq, exc, address)
            raise
        link = _HubLink(
            acceptor=self,
            client_q=cq,
            address=address,
            pid=pid,
            uid=real_uid,
            name=knock.name,
            # Two whole messages and a unit must fit in the window (a client
            # refuses a WELCOME where they do not): with a large kernel.msgmax,
            # messages are cut smaller instead.
            # And a message must fit in the bus queue (msg_qbytes), where
            # kernel.msgmax is the larger (the knock's size fits the client's).
            msg_size=max(
                _HDR + 64,
                min(self._msgmax, self._bus_capacity, msg_size, (self.window - self.credit_unit) // 2),
            ),
            max_frame=min(self.max_frame, client_max),
            window=self.window,
            credit_unit=self.credit_unit,
        )
        try:
            link._watch = _PidWatch(loop, pid, lambda: self._mark(link._on_peer_exit))
        except ProcessLookupError:
            raise ProtocolError(f"the knocking process {pid} exited") from None
        except OSError as exc:  # a pidfd: EMFILE
            self._refuse_unable(cq, msqid, address, exc)
            raise
        welcome = MSG_HEADER.pack(
            WIRE_VERSION, KIND_WELCOME, 0, 0, HUB_ADDRESS, link._next_seq(), 0
        ) + _WELCOME.pack(link._msg_size, self.window, self.credit_unit,
                          min(self.max_frame, 0xFFFFFFFF))
        try:
            cq.send(welcome, False, address)
        except (sysv_ipc.Error, OSError) as exc:
            link._watch.close()
            raise ConnectionClosed(f"could not answer pid {pid}'s knock: {exc}") from None
        self._links[address] = link
        return link

    def _validate(
        self,
        knock: Knock,
        cq: sysv_ipc.MessageQueue,
        real_uid: int,
        msqid: int,
        address: int,
        msg_size: int,
        client_max: int,
    ) -> None:
        pid = knock.pid
        if real_uid != knock.uid:
            raise PermissionRefused(
                f"knock from pid {pid} claims uid {knock.uid}, but that process runs as uid {real_uid}"
            )
        if real_uid != self.expected_uid and self.gid is None:
            raise PermissionRefused(
                f"uid {real_uid} (pid {pid}) may not join: this bus is private to uid "
                f"{self.expected_uid} (start the hub with a group to share it)"
            )
        if cq.id != msqid:
            raise ProtocolError(
                f"knock from pid {pid}: key {cq.key:#x} is queue id {cq.id}, not {msqid} as claimed"
            )
        st = queue_stat(cq)
        if st.uid != real_uid or st.cuid != real_uid:
            raise PermissionRefused(
                f"knock from pid {pid} (uid {real_uid}) names a SysV queue that is not its own "
                f"({_describe(st)}); refusing to hijack another user's queue"
            )
        if st.mode & 0o007:
            raise PermissionRefused(
                f"knock from pid {pid}: its queue has mode {st.mode:03o}, which lets every user "
                "inject frames; create it 0600 (0660 for a group bus)"
            )
        if st.messages:
            raise ProtocolError(
                f"knock from pid {pid}: its queue {st.id} already holds {st.messages} message(s); "
                "a client must knock with a fresh queue"
            )
        if not MIN_CLIENT_ADDRESS <= address <= MSGTYPE_MAX:
            raise ProtocolError(
                f"knock from pid {pid}: address {address} outside {MIN_CLIENT_ADDRESS}..{MSGTYPE_MAX}"
            )
        if address in self._links:
            other = self._links[address].info.peer_pid
            raise BusBusy(f"knock from pid {pid}: address {address} is in use by pid {other}")
        if msg_size < _HDR + 64:
            raise ProtocolError(f"knock from pid {pid}: msg_size {msg_size} is too small")
        if client_max <= 0:
            raise ProtocolError(f"knock from pid {pid}: max_frame {client_max} is not positive")

    @staticmethod
    def _refuse(cq: sysv_ipc.MessageQueue, exc: IpcBusError | OSError, address: int) -> None:
        """Best effort: tell the client why (REFUSE), so its connect fails at once."""
        if not MIN_CLIENT_ADDRESS <= address <= MSGTYPE_MAX:
            return  # its thread waits for types <= its address: no type reaches it
        code = (
            REFUSE_PERMISSION if isinstance(exc, PermissionRefused)
            else REFUSE_BUSY if isinstance(exc, BusBusy)
            else REFUSE_PROTOCOL if isinstance(exc, IpcBusError)
            else REFUSE_RESOURCES
        )
        body = str(exc).encode()[:2048]
        msg = MSG_HEADER.pack(WIRE_VERSION, KIND_REFUSE, 0, 0, HUB_ADDRESS, 0, code) + body
        with contextlib.suppress(sysv_ipc.Error, OSError):
            cq.send(msg, False, address)

    def _refuse_unable(self, cq: sysv_ipc.MessageQueue, msqid: int, address: int, exc: OSError) -> None:
        """Refuse a client the hub cannot take for want of a resource (REFUSE_RESOURCES)."""
        if cq.id == msqid:
            self._refuse(cq, OSError(exc.errno, f"the hub cannot take a client now: {exc.strerror}"), address)

    def __repr__(self) -> str:
        qid = self._q.id if self._q is not None else None
        return f"<SysvAcceptor {self.busdir} queue={qid} links={len(self._links)}>"

