"""Typed messages on a raw System V message queue, from asyncio.

:class:`MessageQueue` wraps one kernel message queue (``msgget``) so that a
coroutine can ``await q.send(data, type=n)`` and ``await q.receive(type=t)``
without ever blocking the event loop, and exchange messages with any other
program that uses ``msgsnd``/``msgrcv`` — a C program, a shell tool, another
Python process.  It is independent of the bus: use it when you want the
queue itself (its ``mtype`` selective receive, its persistence), not
ipcbus's subjects.

``receive(type=t)`` follows ``msgrcv``:

* ``t == 0`` — the first message in the queue, whatever its type;
* ``t > 0``  — the first message of exactly type ``t``;
* ``t < 0``  — the first message of the *lowest* type ``<= |t|`` (a priority queue).

How it avoids blocking the loop: every call first tries the kernel
operation with ``IPC_NOWAIT``; only when that would block (queue full on
send, no matching message on receive) is the blocking ``msgsnd``/``msgrcv``
run in a helper thread.  ``sysv_ipc`` releases the GIL while it waits, and
the thread hands its result back with one ``loop.call_soon_threadsafe``.
There is no timeout on ``msgrcv``: a waiting thread wakes only when a
matching message arrives or the queue is removed.  Two consequences, kept
explicit rather than hidden:

* A *cancelled* :meth:`MessageQueue.receive` leaves its thread waiting in the
  kernel; the message it later takes is kept and returned by the next
  ``receive()`` of the same object whose type matches, or given at once to
  one already waiting (nothing is lost).  So is a message that arrived just
  as its receive was cancelled.  What is still kept when the object closes
  goes back in the queue; should the queue be full then, a warning says
  which message was lost.
* A *cancelled* :meth:`MessageQueue.send` that was already waiting for room
  still delivers its message once there is room (a SysV message is sent
  whole or not at all; it can no longer be taken back).

:meth:`MessageQueue.aclose` releases waiting receive threads with one
zero-length message of the awaited type each (see its docstring), waits for
in-flight sends, and joins every thread.  :meth:`MessageQueue.remove` wakes
everything at once (``EIDRM``).

Every handle is opened with ``max_message_size`` equal to the kernel's
``msgmax``: ``msgrcv`` into a smaller buffer fails with ``E2BIG`` and leaves
the message at the head of the queue, where it would block every reader.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

import msgspec
import sysv_ipc

from .errors import ConnectionClosed, FrameTooLarge, IpcBusError, PermissionRefused

log = logging.getLogger("ipcbus.sysv")

_REWAKE: Final = 1.0
"""Seconds MessageQueue.aclose() waits before waking its receive threads again."""

__all__ = [
    "MSGTYPE_MAX",
    "Message",
    "MessageQueue",
    "QueueExists",
    "QueueNotFound",
    "QueueStat",
    "SysvLimits",
    "open_handle",
    "proc_msg_table",
    "proc_table",
    "queue_stat",
    "read_limits",
]

MSGTYPE_MAX: Final = 2**31 - 1
"""Largest ``mtype`` usable here (``sysv_ipc`` passes types as a C ``int``)."""

_DEFAULT_MSGMAX: Final = 8192
_DEFAULT_MSGMNB: Final = 16384


class QueueNotFound(IpcBusError, FileNotFoundError):
    """No SysV message queue exists with the given key (or it was removed)."""


class QueueExists(IpcBusError, FileExistsError):
    """A SysV message queue with that key already exists (exclusive create)."""


@dataclass(frozen=True)
class SysvLimits:
    """The kernel's message-queue limits, read from ``/proc/sys/kernel``.

    ``msgmax`` bounds one message, ``msgmnb`` the default capacity of one
    queue in bytes (``msg_qbytes``), ``msgmni`` the number of queues.  Raise
    them with ``sysctl -w kernel.msgmax=65536 kernel.msgmnb=1048576``;
    raising one queue's ``msg_qbytes`` above ``msgmnb`` needs ``CAP_SYS_RESOURCE``.
    """

    msgmax: int
    msgmnb: int
    msgmni: int


def _read_int(path: str, default: int) -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def read_limits() -> SysvLimits:
    """Read ``msgmax``, ``msgmnb`` and ``msgmni`` now (they can change with sysctl)."""
    return SysvLimits(
        msgmax=_read_int("/proc/sys/kernel/msgmax", _DEFAULT_MSGMAX),
        msgmnb=_read_int("/proc/sys/kernel/msgmnb", _DEFAULT_MSGMNB),
        msgmni=_read_int("/proc/sys/kernel/msgmni", 32000),
    )


class QueueStat(msgspec.Struct, frozen=True):
    """One snapshot of a queue's ``msqid_ds`` (what ``msgctl(IPC_STAT)`` and ``ipcs -q`` show)."""

    id: int
    """The queue id (``msqid``)."""
    key: int
    """The key it was created with (0 for ``IPC_PRIVATE``)."""
    messages: int
    """Messages currently queued (``msg_qnum``)."""
    bytes: int
    """Bytes currently queued (``msg_cbytes``, message text only); -1 if unknown."""
    max_bytes: int
    """Capacity in bytes (``msg_qbytes``); a send blocks when it would exceed it."""
    last_send_pid: int
    """Pid of the last ``msgsnd`` (``msg_lspid``), 0 if none."""
    last_receive_pid: int
    """Pid of the last ``msgrcv`` (``msg_lrpid``), 0 if none."""
    uid: int
    """Owner uid (``msg_perm.uid``)."""
    gid: int
    """Owner gid."""
    cuid: int
    """Creator uid (``msg_perm.cuid``): unlike the owner it can never be changed."""
    cgid: int
    """Creator gid."""
    mode: int
    """Permission bits (``msg_perm.mode & 0o777``)."""
    last_send_time: float | None = None
    """Time of the last ``msgsnd`` (seconds since the epoch), None if never."""
    last_receive_time: float | None = None
    """Time of the last ``msgrcv``, None if never."""
    last_change_time: float | None = None
    """Time of creation or the last ``IPC_SET``."""


def proc_table(kind: str) -> dict[int, dict[str, int]]:
    """``/proc/sysvipc/<kind>`` (``msg``, ``shm`` or ``sem``) of this IPC namespace, by id.

    Each row maps the file's own column names (its header line, so kernels
    that add columns are fine) to integers; ``perms`` is octal.  This is
    ``IPC_STAT`` without attaching, and the only place ``msg_cbytes`` can be
    read without ``ctypes`` (``sysv_ipc`` does not expose it).  Empty if the
    file cannot be read.
    """
    try:
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
    except OSError:
        return {}
    if not lines:
        return {}
    cols = lines[0].split()
    out: dict[int, dict[str, int]] = {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != len(cols):
            continue
        try:
            row = {c: int(v, 8) if c == "perms" else int(v) for c, v in zip(cols, parts, strict=True)}
        except ValueError:
            continue
        out[row[cols[1]]] = row
    return out


def proc_msg_table() -> dict[int, dict[str, int]]:
    """Every message queue, by id: :func:`proc_table` of ``msg``."""
    return proc_table("msg")


def _time_or_none(t: float | int) -> float | None:
    return float(t) if t else None


def queue_stat(q: sysv_ipc.MessageQueue) -> QueueStat:
    """``IPC_STAT`` of an open ``sysv_ipc`` handle, as a :class:`QueueStat`.

    Raises :class:`QueueNotFound` if the queue was removed and
    :class:`~ipcbus.errors.PermissionRefused` without read permission.
    """
    try:
        row = proc_msg_table().get(q.id)
        max_bytes = q.max_size  # IPC_STAT; also the existence/permission check
        if row is not None and row.get("key") == q.key:
            return QueueStat(
                id=q.id,
                key=q.key,
                messages=row["qnum"],
                bytes=row["cbytes"],
                max_bytes=max_bytes,
                last_send_pid=row["lspid"],
                last_receive_pid=row["lrpid"],
                uid=row["uid"],
                gid=row["gid"],
                cuid=row["cuid"],
                cgid=row["cgid"],
                mode=row["perms"] & 0o777,
                last_send_time=_time_or_none(row["stime"]),
                last_receive_time=_time_or_none(row["rtime"]),
                last_change_time=_time_or_none(row["ctime"]),
            )
        return QueueStat(
            id=q.id,
            key=q.key,
            messages=q.current_messages,
            bytes=-1,
            max_bytes=max_bytes,
            last_send_pid=q.last_send_pid,
            last_receive_pid=q.last_receive_pid,
            uid=q.uid,
            gid=q.gid,
            cuid=q.cuid,
            cgid=q.cgid,
            mode=q.mode & 0o777,
            last_send_time=_time_or_none(q.last_send_time),
            last_receive_time=_time_or_none(q.last_receive_time),
            last_change_time=_time_or_none(q.last_change_time),
        )
    except sysv_ipc.ExistentialError:
        raise QueueNotFound(f"SysV queue id {q.id} (key {q.key:#x}) no longer exists") from None
    except sysv_ipc.PermissionsError:
        raise PermissionRefused(
            f"no read permission on SysV queue id {q.id} (key {q.key:#x}): "
            "IPC_STAT needs read access; ask its owner to widen its mode"
        ) from None


def open_handle(
    key: int | None, flags: int = 0, mode: int = 0o600, msgmax: int | None = None
) -> tuple[sysv_ipc.MessageQueue, int]:
    """Open (or create) a ``sysv_ipc`` queue handle sized for the largest possible message.

    Returns the handle and its message size.  The handle's receive buffer is
    ``msgmax`` bytes (read from /proc when not given); see the module
    docstring for why nothing smaller is safe.  Maps ``sysv_ipc`` errors to
    :class:`QueueNotFound`, :class:`QueueExists` and
    :class:`~ipcbus.errors.PermissionRefused` with messages naming the key.
    """
    size = msgmax if msgmax is not None else read_limits().msgmax
    what = "a new private key" if key is None else f"key {key:#x}"
    if key is not None:
        # key_t is 32 bits: sysv_ipc would cut a larger int silently (and open
        # another queue); 0 is IPC_PRIVATE, which *creates* a queue, whatever the flags.
        if not -(1 << 31) <= key < (1 << 32):
            raise QueueNotFound(f"no SysV message queue with {what}: a key is a 32-bit number")
        if not key & 0xFFFFFFFF and not flags & sysv_ipc.IPC_CREAT:
            raise QueueNotFound(
                "no SysV message queue with key 0: that is IPC_PRIVATE, which names no "
                "existing queue (a private queue can only be used through its id)"
            )
    try:
        try:
            return sysv_ipc.MessageQueue(key, flags, mode=mode, max_message_size=size), size
        except ValueError:
            # This sysv_ipc build caps max_message_size below the kernel's msgmax
            # (msgmax raised by sysctl): use its cap; larger messages cannot be
            # sent through this handle, and the caller learns the size it got.
            q = sysv_ipc.MessageQueue(key, flags, mode=mode, max_message_size=_DEFAULT_MSGMAX)
            return q, _DEFAULT_MSGMAX
    except sysv_ipc.ExistentialError:
        if flags & sysv_ipc.IPC_EXCL:
            raise QueueExists(
                f"a SysV message queue with {what} already exists; "
                "open it instead of creating it, or pick another key"
            ) from None
        raise QueueNotFound(
            f"no SysV message queue with {what}: create it first (create=True)"
        ) from None
    except sysv_ipc.PermissionsError:
        raise PermissionRefused(
            f"permission denied opening the SysV message queue with {what} as uid "
            f"{os.getuid()}: its mode does not grant you access (see `ipcs -q -c`); "
            "ask its owner to add you to its group and set mode 0660"
        ) from None


class Message(NamedTuple):
    """One received message: its bytes and its ``mtype``."""

    data: bytes
    type: int


def _check_send_type(t: int) -> int:
    if not isinstance(t, int) or isinstance(t, bool):
        raise TypeError(f"message type must be an int, not {type(t).__name__}")
    if not 1 <= t <= MSGTYPE_MAX:
        raise ValueError(f"message type {t} out of range: msgsnd needs 1 <= type <= {MSGTYPE_MAX}")
    return t


def _check_recv_type(t: int) -> int:
    if not isinstance(t, int) or isinstance(t, bool):
        raise TypeError(f"message type must be an int, not {type(t).__name__}")
    if not -MSGTYPE_MAX <= t <= MSGTYPE_MAX:
        raise ValueError(f"receive type {t} out of range (|type| <= {MSGTYPE_MAX})")
    return t


def _matches(want: int, got: int) -> bool:
    """Whether a message of type ``got`` satisfies ``msgrcv(..., want)`` (ignoring 'lowest')."""
    if want == 0:
        return True
    if want > 0:
        return got == want
    return got <= -want


class _Op:
    """One blocking kernel call running in a helper thread."""

    __slots__ = ("abandoned", "future", "is_send", "thread", "type", "woken")

    def __init__(self, is_send: bool, type_: int, future: asyncio.Future[Any]) -> None:
        self.is_send = is_send
        self.type = type_
        self.future = future
        self.abandoned = False  # the awaiting task was cancelled
        self.woken = False  # aclose() sent a zero-length wake message for it
        self.thread: threading.Thread | None = None


class MessageQueue:
    """An asyncio wrapper around one System V message queue.

    Create or open one with :meth:`create` / :meth:`open` (or the
    constructor), use it as an async context manager, and call
    :meth:`remove` to destroy the kernel object (it outlives every process
    otherwise — that is SysV semantics)::

        async with MessageQueue.create(mode=0o600) as q:
            await q.send(b"hello", type=2)
            msg = await q.receive(type=2)   # Message(data=b'hello', type=2)
            await q.remove()

    ``key=None`` with ``create=True`` picks an unused random key
    (``IPC_CREAT | IPC_EXCL``); read it back from :attr:`key` to tell another
    program which queue to open.
    """

    def __init__(
        self,
        key: int | None,
        *,
        create: bool = False,
        exclusive: bool = False,
        mode: int = 0o600,
        gid: int | None = None,
    ) -> None:
        if key is None and not (create and exclusive):
            raise ValueError("key=None (a random new key) needs create=True and exclusive=True")
        if mode & ~0o777:
            raise ValueError(f"mode {mode:#o} has bits outside 0o777")
        flags = 0
        if create:
            flags |= sysv_ipc.IPC_CREAT
            if exclusive:
                flags |= sysv_ipc.IPC_EXCL
        self._q, size = open_handle(key, flags, mode)
        self.max_message_size: int = size
        """Largest message, in bytes, this handle can send and receive (the kernel's ``msgmax``)."""
        if gid is not None:
            try:
                self._q.gid = gid
            except sysv_ipc.PermissionsError:
                raise PermissionRefused(
                    f"may not give SysV queue id {self._q.id} to group {gid}: "
                    "only its owner (or root) may change its group"
                ) from None
        self._stash: collections.deque[Message] = collections.deque()
        self._wake_types: set[int] = set()  # types of the wake-ups aclose() sent
        self._ops: set[_Op] = set()
        self._no_ops: asyncio.Future[None] | None = None  # set by _finish when _ops empties
        self._closed = False

    @classmethod
    def create(
        cls, key: int | None = None, *, mode: int = 0o600, gid: int | None = None
    ) -> MessageQueue:
        """Create a new queue (``IPC_CREAT | IPC_EXCL``); ``key=None`` picks a free random key.

        Raises :class:`QueueExists` if ``key`` is taken.
        """
        return cls(key, create=True, exclusive=True, mode=mode, gid=gid)

    @classmethod
    def open(cls, key: int) -> MessageQueue:
        """Open an existing queue by key.

        Raises :class:`QueueNotFound` if there is none and
        :class:`~ipcbus.errors.PermissionRefused` if its mode denies you.
        """
        return cls(key)

    # -- identity ---------------------------------------------------------

    @property
    def key(self) -> int:
        """The queue's key (``ftok`` value, random key, or 0 for ``IPC_PRIVATE``)."""
        return int(self._q.key)

    @property
    def id(self) -> int:
        """The kernel's queue id (``msqid``), as ``ipcs -q`` shows it."""
        return int(self._q.id)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    def stat(self) -> QueueStat:
        """The queue's ``msqid_ds``: depth, bytes, capacity, last sender/receiver, owner, mode."""
        return queue_stat(self._q)

    def set_max_bytes(self, nbytes: int) -> int:
        """Set the queue's capacity (``msg_qbytes``, via ``IPC_SET``); return the new value.

        Lowering it is always allowed to the owner; raising it above the
        system's ``msgmnb`` needs ``CAP_SYS_RESOURCE`` and otherwise raises
        :class:`~ipcbus.errors.PermissionRefused` (the capacity is unchanged).
        """
        if nbytes <= 0:
            raise ValueError(f"queue capacity must be positive, not {nbytes}")
        try:
            self._q.max_size = nbytes
            return int(self._q.max_size)
        except sysv_ipc.PermissionsError:
            raise PermissionRefused(
                f"may not set the capacity of SysV queue id {self.id} to {nbytes} bytes: "
                f"above kernel.msgmnb ({read_limits().msgmnb}) it needs CAP_SYS_RESOURCE; "
                "raise the default with `sysctl -w kernel.msgmnb=<bytes>` instead"
            ) from None
        except sysv_ipc.ExistentialError:
            raise QueueNotFound(f"SysV queue id {self.id} no longer exists") from None

    # -- sending ----------------------------------------------------------

    def _check_data(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self.max_message_size:
            raise FrameTooLarge(len(data), self.max_message_size, "SysV message")

    def _check_fits(self, data: bytes | bytearray | memoryview) -> None:
        """Refuse a message larger than the queue's capacity (``msg_qbytes``):
        no amount of reading would ever make room for it."""
        try:
            capacity = int(self._q.max_size)
        except sysv_ipc.Error:
            return  # gone or not ours to stat: the send itself reports it
        if len(data) > capacity:
            raise FrameTooLarge(
                len(data),
                capacity,
                f"message for SysV queue id {self.id}",
                f"that is the queue's capacity (msg_qbytes): send smaller messages or raise "
                f"it (MessageQueue.set_max_bytes, up to kernel.msgmnb = {read_limits().msgmnb})",
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed("this MessageQueue object is closed")

    def try_send(self, data: bytes | bytearray | memoryview, type: int = 1) -> bool:
        """Send without waiting (``IPC_NOWAIT``); return False if the queue is full."""
        self._check_open()
        _check_send_type(type)
        self._check_data(data)
        try:
            self._q.send(data, False, type)
        except sysv_ipc.BusyError:
            self._check_fits(data)  # else it would wait for room forever
            return False
        except (sysv_ipc.ExistentialError, OSError):
            # msgsnd on a removed id: EINVAL, raised by sysv_ipc as a plain OSError.
            raise ConnectionClosed(f"SysV queue id {self.id} was removed") from None
        except sysv_ipc.PermissionsError:
            raise PermissionRefused(f"no write permission on SysV queue id {self.id}") from None
        return True

    async def send(self, data: bytes | bytearray | memoryview, type: int = 1) -> None:
        """Send one message of type ``type`` (>= 1), waiting while the queue is full.

        Raises :class:`~ipcbus.errors.FrameTooLarge` above ``msgmax`` or the
        queue's capacity and :class:`~ipcbus.errors.ConnectionClosed` if the
        queue is removed.
        If cancelled while waiting for room, the message is still sent once
        there is room (see the module docstring).
        """
        if self.try_send(data, type):
            return
        op = _Op(True, type, asyncio.get_running_loop().create_future())
        await self._start(op, bytes(data))

    # -- receiving --------------------------------------------------------

    def _take_stash(self, type_: int) -> Message | None:
        if not self._stash:
            return None
        best: Message | None = None
        for m in self._stash:
            if not _matches(type_, m.type):
                continue
            if type_ >= 0:
                best = m
                break
            if best is None or m.type < best.type:
                best = m
        if best is not None:
            self._stash.remove(best)
        return best

    def try_receive(self, type: int = 0) -> Message | None:
        """Receive without waiting (``IPC_NOWAIT``); None if no message matches ``type``."""
        self._check_open()
        _check_recv_type(type)
        m = self._take_stash(type)
        if m is not None:
            return m
        try:
            data, t = self._q.receive(False, type)
        except sysv_ipc.BusyError:
            return None
        except sysv_ipc.ExistentialError:
            raise ConnectionClosed(f"SysV queue id {self.id} was removed") from None
        except sysv_ipc.PermissionsError:
            raise PermissionRefused(f"no read permission on SysV queue id {self.id}") from None
        return Message(data, t)

    async def receive(self, type: int = 0) -> Message:
        """Receive the next message matching ``type`` (``msgrcv`` semantics), waiting for one.

        Raises :class:`~ipcbus.errors.ConnectionClosed` if the queue is
        removed while waiting.  Cancel-safe: see the module docstring.
        """
        m = self._take_stash(type)
        if m is not None:
            return m
        # A receive of the same type that was cancelled may still be waiting in
        # the kernel (or may just have taken a message): adopt it rather than
        # race it with a second thread.
        op = next(
            (o for o in self._ops
             if not o.is_send and o.abandoned and o.type == type and not o.woken
             and not o.future.done()),  # done: it was handed a stashed message (_hand_over)
            None,
        )
        if op is not None:
            op.abandoned = False
        else:
            m = self.try_receive(type)
            if m is not None:
                return m
            op = _Op(False, type, asyncio.get_running_loop().create_future())
            self._start(op, None)
        try:
            msg: Message = await asyncio.shield(op.future)
            return msg
        except asyncio.CancelledError:
            op.abandoned = True
            fut = op.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Its message came as this task was cancelled (a wait_for timeout).
                self._keep(fut.result())
            raise

    # -- helper threads ---------------------------------------------------

    def _start(self, op: _Op, data: bytes | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        t = threading.Thread(
            target=self._blocking,
            args=(op, data, loop),
            name=f"ipcbus-msgq-{'send' if op.is_send else 'recv'}-{self.id}",
            daemon=True,
        )
        op.thread = t
        self._ops.add(op)
        t.start()
        return op.future

    def _blocking(self, op: _Op, data: bytes | None, loop: asyncio.AbstractEventLoop) -> None:
        """Thread body: one blocking msgsnd/msgrcv (GIL released inside sysv_ipc)."""
        result: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    if op.is_send:
                        assert data is not None
                        self._q.send(data, True, op.type)
                    else:
                        result = Message(*self._q.receive(True, op.type))
                    break
                except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError, sysv_ipc.BusyError):
                    raise
                except sysv_ipc.Error:
                    continue  # EINTR ("signaled while waiting"): wait again
        except (sysv_ipc.ExistentialError, OSError):
            error = ConnectionClosed(f"SysV queue id {self.id} was removed while waiting")
        except sysv_ipc.PermissionsError:
            error = PermissionRefused(f"permission denied on SysV queue id {self.id}")
        except BaseException as exc:  # handed to the awaiting task, never lost
            error = exc
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(self._finish, op, result, error)

    def _finish(self, op: _Op, result: Any, error: BaseException | None) -> None:
        self._ops.discard(op)
        if not self._ops and self._no_ops is not None and not self._no_ops.done():
            self._no_ops.set_result(None)
        if op.thread is not None:
            op.thread.join()
        if error is None and result is not None:
            msg: Message = result
            if op.woken and not msg.data and msg.type in self._wake_types:
                # Our own wake-up message from aclose(): dropped; a receive
                # still awaited learns that this object closed.
                if msg.type != self._wake_type(op.type):
                    # It took another receive's wake-up (a receive of any type
                    # takes any): that one still needs it.
                    with contextlib.suppress(sysv_ipc.Error, OSError):
                        self._q.send(b"", False, msg.type)
                result = None
                error = ConnectionClosed(f"this MessageQueue (SysV queue id {self.id}) was closed")
            elif op.abandoned:  # else its receive is awaited: it gets the message, once
                self._keep(msg)
        if not op.future.done():
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)
        # An exception nobody awaits (abandoned op) must not be reported as lost.
        if op.abandoned and op.future.done() and not op.future.cancelled():
            op.future.exception()

    def _keep(self, msg: Message) -> None:
        """A message taken for a receive whose task was cancelled: kept (after
        those kept before it) for the next receive that matches, or given to
        one waiting now; put back in the queue if this object is closed."""
        if self._closed:
            self._put_back(msg)  # at the tail of its type, rather than lost
        else:
            self._stash.append(msg)
            self._hand_over(msg)

    def _hand_over(self, msg: Message) -> None:
        """Give a stashed message to a receive awaited now that it matches.

        That receive's own thread may wait in ``msgrcv`` for a message that
        this one, taken by a cancelled receive of another type, already was:
        it gets this one, and whatever its thread takes later is stashed.
        """
        for other in self._ops:
            if (
                not other.is_send
                and not other.abandoned
                and not other.future.done()
                and _matches(other.type, msg.type)
            ):
                self._stash.remove(msg)
                other.abandoned = True  # its thread's message, if any, goes to the stash
                other.future.set_result(msg)
                return

    @staticmethod
    def _wake_type(want: int) -> int:
        return want if want > 0 else 1

    # -- lifetime ---------------------------------------------------------

    async def remove(self) -> None:
        """Destroy the kernel queue (``IPC_RMID``); queued messages are discarded.

        Every thread waiting on it wakes (``EIDRM``) and is joined.  Raises
        :class:`~ipcbus.errors.PermissionRefused` unless you own or created it.
        """
        try:
            self._q.remove()
        except sysv_ipc.ExistentialError:
            pass
        except sysv_ipc.PermissionsError:
            raise PermissionRefused(
                f"may not remove SysV queue id {self.id}: only its owner or creator may"
            ) from None
        await self._wait_ops()

    async def _wait_ops(self) -> None:
        # Until each op's thread is done and joined (_finish drops it from _ops):
        # the future of a send whose caller was cancelled is done already.
        while self._ops:
            if self._no_ops is None or self._no_ops.done():
                self._no_ops = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._no_ops)

    async def aclose(self) -> None:
        """Release this object: wake and join every helper thread.  Does not remove the queue.

        A receive still waiting in the kernel is woken with one zero-length
        message of the type it waits for (type 1 for ``type <= 0``), which it
        recognises and drops; if a task still awaits that receive, it gets
        :class:`~ipcbus.errors.ConnectionClosed`.  Should a real message win
        that race, the awaiting task gets it, or, if its task was cancelled,
        it is put back at the tail of its type; the zero-length wake-up then
        stays in the queue.  Another reader of the same queue (another
        object, another process) may take a wake-up meant for this one: one
        is sent again each second while a receive thread still waits.
        In-flight sends are waited for: they complete when a reader makes
        room (or the queue is removed).  Idempotent; a call after one that
        was cancelled half-way finishes it.
        """
        if not self._closed:
            self._closed = True
            self._wake_receives()
        while self._ops:
            try:
                async with asyncio.timeout(_REWAKE):
                    await self._wait_ops()
            except TimeoutError:
                self._wake_receives()  # a reader of another object took a wake-up?
        for m in self._stash:
            self._put_back(m)
        self._stash.clear()

    def _wake_receives(self) -> None:
        """Send a zero-length wake-up for every receive thread still in msgrcv."""
        # Every receive thread still in msgrcv (_finish drops finished ones), a
        # future already done included (handed a stashed message).  The
        # receives of any type (0, -n) are woken first, with type 1: the kernel
        # hands a message to the first waiter it matches, and a receive(0)
        # woken after a receive(3) could take that one's wake-up instead.
        receives = sorted((op for op in self._ops if not op.is_send), key=lambda op: op.type > 0)
        for op in receives:
            op.woken = True
            self._wake_types.add(self._wake_type(op.type))
            with contextlib.suppress(sysv_ipc.Error, OSError):
                self._q.send(b"", False, self._wake_type(op.type))

    def _put_back(self, m: Message) -> None:
        """Return a message this closed object took but nobody received to the
        queue; if it cannot be (the queue is full or gone), say it is lost."""
        try:
            self._q.send(m.data, False, m.type)
        except (sysv_ipc.Error, OSError) as exc:
            reason = "the queue is full" if isinstance(exc, sysv_ipc.BusyError) else str(exc)
            log.warning(
                "SysV queue id %d: a message of type %d (%d bytes) that a cancelled receive "
                "took could not be put back as this MessageQueue closed (%s): it is lost",
                self.id, m.type, len(m.data), reason,
            )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MessageQueue id={self.id} key={self.key:#x} {state}>"
