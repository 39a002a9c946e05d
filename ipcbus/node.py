"""The reactor: links, interest, routing, inboxes, flow control.

Every process runs one :class:`Node`.  A hub is a node that accepts links; a
worker pool's parent is a node whose links go to its children.  Nodes form a
tree, and routing is the same everywhere:

* **Interest.**  A node tells each link which ``(pattern, queue)`` keys its
  side wants: its own subscriptions plus everything learned from its *other*
  links.  Counts are kept per key, so a ``Sub``/``Unsub`` frame crosses a
  link only when the answer for that link changes.  A message crosses a link
  only where someone wants it.
* **Queue groups.**  The node where a message enters (its publisher's node)
  picks exactly one member of each matching group among its local
  subscriptions and its links, preferring the least busy.  When it picks a
  link, the ``groups`` field of the frame tells the next node that it is now
  responsible for that group; a node never delivers to a group it was not
  handed, so each message reaches exactly one member of each group.
* **Request/reply.**  A request is a message with a reply subject in the
  requester's inbox (``_INBOX.<node id>.<token>``).  A node that forwards a
  request over a link remembers it until a reply passes back; if that link
  dies first, the requester gets a ``closed`` status reply at once
  (``ConnectionClosed``, or ``WorkerCrashed`` for a pool worker) instead of
  waiting for the timeout.  A request that reaches a node with nowhere to go
  is answered with a ``no-responders`` status.
* **Flow control.**  Local publishing awaits when a link is above its
  high-water mark.  Forwarding never waits (one slow link must not stall the
  others): above ``outbound_limit`` the message is dropped *for that link
  only*, counted, and reported to its peer with a ``slow_consumer`` notice,
  which surfaces as :class:`~ipcbus.errors.SlowConsumer` in the affected
  subscriptions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, cast

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from . import frames as fr
from .checks import check_count, check_name
from .errors import (
    BadSubject,
    BusClosed,
    ConnectionClosed,
    EndOfStream,
    FrameTooLarge,
    NoResponders,
    ProtocolError,
    RequestTimeout,
    SlowConsumer,
)
from .spin import Spinner, spin_window
from .stats import LinkStats, NodeStats
from .subjects import (
    MAX_SUBJECT_LENGTH,
    SubjectIndex,
    matches,
    validate_name,
    validate_pattern,
    validate_subject,
)
from .transports.base import Link

__all__ = [
    "DEFAULT_MAX_LINK_SUBS",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_OUTBOUND_LIMIT",
    "INBOX_PREFIX",
    "STATUS_HEADER",
    "Deadlines",
    "LinkState",
    "Node",
    "Overflow",
    "SubscriptionCore",
    "wait_writable",
]

log = logging.getLogger("ipcbus.node")

_SLOW_LOG_EVERY = 5.0  # seconds between two warnings of one kind about one link (Node._warn)
_HELD: Final = {  # what Node._warn_held says it held back, by kind
    "slow": "slow-consumer episode(s)",
    "too_large": "message(s) too large for it, not forwarded",
}
_KEEP_LIMIT = 8  # requests and replies are refused past this many times outbound_limit (see _keep_cap)

INBOX_PREFIX: Final = "_INBOX."
STATUS_HEADER: Final = "ipcbus-status"
ERROR_TYPE_HEADER: Final = "ipcbus-error"
ERROR_MSG_HEADER: Final = "ipcbus-error-message"
Overflow = Literal["drop_new", "drop_old"]
"""A subscription's policy when its pending buffer is full: drop the new
message (keep the oldest) or the oldest (keep the newest)."""

DEFAULT_MAX_PENDING: Final = 65536
DEFAULT_PENDING_BYTES: Final = 64 * 1024 * 1024
DEFAULT_OUTBOUND_LIMIT: Final = 64 * 1024 * 1024
DEFAULT_MAX_LINK_SUBS: Final = 100_000
"""Default bound on the distinct subscriptions one peer below a node may announce (``max_link_subs``)."""
_INFLIGHT_CAP: Final = 65536
_MAX_PICK_GROUPS: Final = 4096  # queue groups whose last pick a link remembers
_ABANDONED_TTL: Final = 60.0  # seconds a given-up request still counts in its responder's load
_ABANDONED_CAP: Final = 1024  # given-up requests remembered per link
_DUE_NS: Final = 10_000_000  # a request passed on makes a reply "due" for this long (spinning)
_FAST_CACHE: Final = 4096
_GIVEN_UP_BATCH: Final = 256  # reply subjects per gave_up notice
_HELLO_TIMEOUT: Final = 10.0
_READ_SHARE: Final = 256 * 1024  # bytes read from one link before yielding

_ANY_GROUP: Final = ("*",)
"""The ``groups`` of a request sent up the tree by a node that knows no responder:
the receiver delivers it to one member of each queue group it knows (``*`` is
never a queue name)."""

_encode = fr.frame_encoder.encode  # encode_frame without the call around it: once per frame sent
_MsgFrame = fr.Msg
_bin_header = fr.bin_header
_LARGE_PAYLOAD: Final = fr.LARGE_PAYLOAD
# What a message frame holds beside its payload, at most: three subjects
# (subject, reply, queue group) of up to 4 bytes a character, and the rest.
_ROOM: Final = 4 * 3 * MAX_SUBJECT_LENGTH + 64
_NO_LINKS: Final[list[Link]] = []  # returned, never changed: no link to wait on
_NO_ROUTE: Final[tuple[tuple[()], tuple[()], tuple[()]]] = ((), (), ())

Key = tuple[str, str | None]
# Who gets a subject: plain local subscriptions, plain links, and for each
# queue group its candidates (local subscriptions and links).
_Route = tuple[
    tuple["SubscriptionCore", ...],
    tuple["LinkState", ...],
    tuple[tuple[str, tuple["SubscriptionCore | LinkState", ...]], ...],
]


def _frames_size(raws: Sequence[bytes | fr.Msg]) -> int:
    """The size of a batch of frames read (a Msg decoded in place: its payload's)."""
    return sum(len(r.payload) if isinstance(r, _MsgFrame) else len(r) for r in raws)


class SubscriptionCore:
    """The node-side state of one local subscription (the client wraps it)."""

    __slots__ = (
        "_closed",
        "_others",
        "_pending_bytes",
        "_waiter",
        "delivered",
        "dropped",
        "dropped_total",
        "gap_at",
        "inline",
        "last_pick",
        "max_pending",
        "node",
        "overflow",
        "pending",
        "pending_bytes_limit",
        "queue",
        "refusal",
        "serving",
        "sid",
        "subject",
        "withdrawn",
    )

    def __init__(
        self,
        node: Node,
        sid: int,
        subject: str,
        queue: str | None,
        max_pending: int,
        pending_bytes_limit: int,
        overflow: str,
    ) -> None:
        self.node = node
        self.sid = sid
        self.subject = subject
        self.queue = queue
        self.max_pending = max_pending
        self.pending_bytes_limit = pending_bytes_limit
        self.overflow = overflow
        self.pending: collections.deque[fr.Msg] = collections.deque()
        self._pending_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        # Readers waiting besides the one in _waiter (several tasks reading one
        # subscription): each message wakes them all, each looks again.
        self._others: list[asyncio.Future[None]] | None = None
        self.dropped = 0  # not yet reported to the reader
        # Messages queued before the first of those drops: read first, then
        # the SlowConsumer, so that the reader sees where the gap is.
        self.gap_at = 0
        self.dropped_total = 0
        self.delivered = 0
        self.last_pick = 0
        self._closed = False
        # Set by a service with a synchronous handler: messages are handed to
        # it as they are routed instead of being queued for a reader task.
        self.inline: Callable[[fr.Msg], None] | None = None
        self.serving = False  # a service's subscription (Bus.serve), not a listener
        # What a request dropped by a full queue is told, if not a service's
        # own words (a pool holding for a worker being restarted).
        self.refusal: str | None = None
        # Set by Node.withdraw: no longer announced to links, still delivered to.
        self.withdrawn = False

    def deliver(self, m: fr.Msg) -> None:
        """Queue one message for the reader, applying the overflow policy."""
        if self._closed:
            return
        if self.inline is not None and not self.pending:
            self.delivered += 1
            self.inline(m)
            return
        n = len(m.payload)
        pending = self.pending
        if len(pending) >= self.max_pending or (
            self._pending_bytes + n > self.pending_bytes_limit and pending
        ):
            if self.overflow == "drop_old":
                self.gap_at = 0  # the oldest go: the gap is ahead of all that is queued
            elif not self.dropped:
                self.gap_at = len(pending)  # the newest go: after all that is queued
            self.dropped += 1
            self.dropped_total += 1
            self.node.dropped += 1
            if self.overflow == "drop_old":
                old = pending.popleft()
                self._pending_bytes -= len(old.payload)
                # Room for this one by count and by bytes: older ones go as needed.
                while pending and self._pending_bytes + n > self.pending_bytes_limit:
                    old = pending.popleft()
                    self._pending_bytes -= len(old.payload)
                    self.dropped += 1
                    self.dropped_total += 1
                    self.node.dropped += 1
            else:
                self.node.local_pressure = True
                self._wake()
                if self.serving:  # (a service's queue drops the new: drop_new)
                    self._refuse(m)
                return
        pending.append(m)
        self._pending_bytes += n
        self.delivered += 1
        if len(pending) * 2 > self.max_pending or self._pending_bytes * 2 > self.pending_bytes_limit:
            self.node.local_pressure = True  # a publisher in this process yields (Bus.publish)
        w = self._waiter  # inline of _wake(): this runs once per message
        if w is not None and not w.done():
            w.set_result(None)
        if self._others is not None:
            self._wake_others()

    def _refuse(self, m: fr.Msg) -> None:
        """Answer a request this service's full queue dropped at once (a
        ``RemoteError`` of type ``SlowConsumer``), instead of leaving its
        requester to its timeout."""
        if m.reply is None or (m.headers and STATUS_HEADER in m.headers):
            return
        why = self.refusal or (
            f"service {self.subject!r} dropped the request: {len(self.pending)} queued already "
            f"(max_pending={self.max_pending}); retry later, or serve with more concurrency "
            "or max_pending"
        )
        headers = {ERROR_TYPE_HEADER: "SlowConsumer", ERROR_MSG_HEADER: why}
        with contextlib.suppress(ConnectionClosed, FrameTooLarge):
            self.node._route(fr.Msg(m.reply, headers=headers), None, None)

    def note_remote_drop(self, count: int) -> None:
        """A hub dropped ``count`` messages for this node that may have been ours."""
        if not self.dropped:
            self.gap_at = len(self.pending)  # they were sent after what is queued here
        self.dropped += count
        self.dropped_total += count
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._others is not None:
            self._wake_others()

    def _wake_others(self) -> None:
        others, self._others = self._others, None
        for f in others or ():
            if not f.done():
                f.set_result(None)

    async def get(self) -> fr.Msg | None:
        """Next message; ``None`` once closed and drained.  Raises SlowConsumer once
        per loss, where the loss is: after the messages queued before it."""
        while True:
            if self.dropped and (self.gap_at <= 0 or not self.pending):
                n, self.dropped = self.dropped, 0
                raise SlowConsumer(self.subject, n)
            if self.pending:
                m = self.pending.popleft()
                self._pending_bytes -= len(m.payload)
                if self.dropped:
                    self.gap_at -= 1
                return m
            if self._closed:
                return None
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            w = self._waiter
            if w is None or w.done():
                self._waiter = fut
            elif self._others is None:
                self._others = [fut]
            else:
                self._others.append(fut)
            try:
                await fut
            finally:
                if self._waiter is fut:
                    self._waiter = None
                elif self._others is not None and fut in self._others:
                    self._others.remove(fut)

    def close(self) -> None:
        """Stop accepting messages; the reader drains what is pending, then ends."""
        self._closed = True
        self._wake()

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._closed


class _Inbox(SubscriptionCore):
    """The node's single inbox subscription: replies resolve request futures."""

    __slots__ = ("futures",)

    def __init__(self, node: Node, subject: str) -> None:
        super().__init__(node, 0, subject, None, 1, 1, "drop_new")
        # By reply subject (``_INBOX.<node>.<token>``): unknown ones, dotted too, miss.
        self.futures: dict[str, asyncio.Future[fr.Msg]] = {}

    def deliver(self, m: fr.Msg) -> None:
        fut = self.futures.get(m.subject)
        if fut is not None and not fut.done():  # first reply wins
            fut.set_result(m)


class Deadlines:
    """Request timeouts, with one event-loop timer per distinct timeout value.

    A loop timer per request costs microseconds to arm and cancel (more than
    the rest of a request's routing).  Requests with the same timeout expire
    in the order they were made, so each timeout value keeps a FIFO of
    ``(deadline, reply subject, subject)`` entries and one timer for its
    head.  A request is due while its reply subject is in ``futures`` (the
    inbox's) with a future not yet done; the requester takes it out when it
    is over, and has nothing else to undo.  Entries of requests that are over
    leave the head lazily, and the FIFO is compacted if they pile up behind a
    slow one.  An entry holds no future: a request answered behind a slow one
    keeps no reply alive.

    Only the first :attr:`MAX_FIFOS` timeout values in use get a FIFO; the
    others (a caller that passes down what is left of its own deadline
    makes a new value every time) share one heap ordered by deadline, with
    one timer for its earliest entry.
    """

    MAX_FIFOS: Final = 8
    _SLACK: Final = 0.001  # loop timers may fire this much early

    def __init__(self, futures: dict[str, asyncio.Future[Any]]) -> None:
        self._futures = futures
        self._queues: dict[float, collections.deque[tuple[float, str, str]]] = {}
        self._armed: dict[float, asyncio.TimerHandle] = {}
        self._time: Callable[[], float] = time.monotonic  # the loop's clock, once known
        self._heap: list[tuple[float, int, str, str, float]] = []
        self._heap_timer: asyncio.TimerHandle | None = None
        self._heap_at = 0.0
        self._seq = 0

    def add(self, timeout: float, reply: str, subject: str) -> None:
        """Fail the future of ``reply`` with :class:`RequestTimeout` unless it is done
        (or gone from ``futures``) within ``timeout`` seconds."""
        q = self._queues.get(timeout)
        if q is None:  # a FIFO exists exactly while its timer is armed
            loop = asyncio.get_running_loop()
            self._time = loop.time
            at = loop.time() + timeout
            if len(self._queues) >= self.MAX_FIFOS:
                self._push(at, reply, subject, timeout)
                return
            self._queues[timeout] = collections.deque([(at, reply, subject)])
            self._armed[timeout] = loop.call_at(at, self._fire, timeout)
            return
        if not len(q) & 31:  # now and then, not on every request
            self._trim(q)
        q.append((self._time() + timeout, reply, subject))

    def _trim(self, q: collections.deque[tuple[float, str, str]]) -> None:
        """Drop the entries of requests that are over from the head of ``q`` (and
        from behind a slow one)."""
        futures = self._futures
        n = len(q)
        # Over (gone from futures), or answered and its requester not back yet:
        # every request passes here once.
        while q and ((fut := futures.get(q[0][1])) is None or fut.done()):
            q.popleft()
        if n >= 4096 and not n & 4095:  # over ones behind a slow one
            live = [e for e in q if self._due(e[1])]
            if len(live) * 2 < n:
                q.clear()
                q.extend(live)

    def _due(self, reply: str) -> bool:
        fut = self._futures.get(reply)
        return fut is not None and not fut.done()

    def _push(self, at: float, reply: str, subject: str, timeout: float) -> None:
        heap = self._heap
        self._seq += 1
        n = len(heap)
        if n >= 4096 and not self._seq & 4095:  # over ones waiting for their deadline
            live = [item for item in heap if self._due(item[2])]
            if len(live) * 2 < n:
                heap[:] = live
                heapq.heapify(heap)
        heapq.heappush(heap, (at, self._seq, reply, subject, timeout))
        if self._heap_timer is None or at < self._heap_at:
            if self._heap_timer is not None:
                self._heap_timer.cancel()
            self._heap_at = at
            self._heap_timer = asyncio.get_running_loop().call_at(at, self._fire_heap)

    def _fire(self, timeout: float) -> None:
        q = self._queues[timeout]
        loop = asyncio.get_running_loop()
        now = loop.time() + self._SLACK
        futures = self._futures
        while q:
            at, reply, subject = q[0]
            fut = futures.get(reply)
            if fut is None or fut.done():
                q.popleft()
            elif at <= now:
                q.popleft()
                fut.set_exception(RequestTimeout(subject, timeout))
            else:
                self._armed[timeout] = loop.call_at(at, self._fire, timeout)
                return
        del self._armed[timeout]
        del self._queues[timeout]

    def _fire_heap(self) -> None:
        heap = self._heap
        loop = asyncio.get_running_loop()
        now = loop.time() + self._SLACK
        futures = self._futures
        self._heap_timer = None
        while heap:
            at, _, reply, subject, timeout = heap[0]
            fut = futures.get(reply)
            if fut is None or fut.done():
                heapq.heappop(heap)
            elif at <= now:
                heapq.heappop(heap)
                fut.set_exception(RequestTimeout(subject, timeout))
            else:
                self._heap_at = at
                self._heap_timer = loop.call_at(at, self._fire_heap)
                return

    def close(self) -> None:
        """Disarm every timer (the node is closing)."""
        for h in self._armed.values():
            h.cancel()
        self._armed.clear()
        self._queues.clear()
        if self._heap_timer is not None:
            self._heap_timer.cancel()
            self._heap_timer = None
        self._heap.clear()


class LinkState:
    """A link as the node sees it: peer identity, interest, in-flight requests, counters."""

    def __init__(self, node: Node, link: Link, name: str, crash_error: str) -> None:
        self.node = node
        self.link = link
        self.name = name
        self.crash_error = crash_error
        self.peer: fr.Hello | None = None
        # The peer node's inbox (``_INBOX.<its node id>.``) once its Hello came:
        # reply subjects of requests it makes check cheaply against it.
        self.peer_inbox = "\0"  # (matches no subject)
        # The largest frame sent on this link: ours, or less if the peer said so
        # in its Hello (protocol.md: never send more than the peer announced).
        self.send_max = node.max_frame
        self.ready = asyncio.Event()
        self.closed = asyncio.Event()
        self.remote_keys: set[Key] = set()
        self.inflight: dict[str, str] = {}  # reply subject -> the request's subject
        self.dropped = 0
        self.dropped_unreported = 0
        self.dropped_subjects: dict[str, int] = {}  # dropped, not yet reported, by subject
        self.slow_events = 0
        # Warnings about this link by kind: [when last logged (monotonic s),
        # how many held back since] (Node._warn).
        self.warned: dict[str, list[float]] = {}
        self.reporting = False  # a task waits to report its drops (_report_drops): one at most
        # Nothing is routed to it yet (a pool worker in setup, Node.release):
        # the interest it announces waits here, neither routed nor passed on.
        self.held = False
        self.held_keys: set[Key] = set()
        # Requests sent on this link whose requester here gave up (timeout,
        # cancellation), by reply subject: when given up on.  Their responder
        # may still be busy with them: they count in its load until their late
        # reply comes, or for _ABANDONED_TTL at most.
        self.abandoned: dict[str, float] = {}
        # Per queue group (a link may carry members of several): a pick count
        # shared by the groups would make two services on the same members go
        # in lockstep, one always to this member, the other to the next.
        self.last_pick: dict[str, int] = {}
        self.close_reason = ""
        # Set by an owner that ends the link itself (a pool killing a hung
        # worker): the reason its requests in flight fail with.
        self.ending = ""
        self.notices: collections.deque[fr.Notice] = collections.deque(maxlen=100)
        self.pongs: dict[int, asyncio.Future[None]] = {}
        self.on_notice: Callable[[fr.Notice], None] | None = None
        self.control_out = 0  # frames that carry no message (send_control)
        # Called with each key its side stops announcing (an unsubscription,
        # the link's end), before the node forgets it (a pool holding for it).
        self.on_unsub: Callable[[Key], None] | None = None

    def send_control(self, frame: bytes) -> None:
        """Send a frame that carries no message (interest, ping, pong, notice):
        counted apart, see :attr:`messages_out`."""
        self.link.send_nowait(frame)
        self.control_out += 1  # (once sent: the link counted it among its frames)

    @property
    def messages_out(self) -> int:
        """Messages written to this link (requests, replies, published
        messages): its frames, less those :meth:`send_control` sent."""
        return self.link.info.msgs_out - self.control_out

    @property
    def busy(self) -> int:
        """How loaded this link is, for least-busy queue-group selection: its
        requests in flight and given up on (:meth:`still_given_up`), plus one
        per 64 KiB queued toward it."""
        busy = len(self.inflight) + self.link.pending_out // 65536
        return busy + self.still_given_up() if self.abandoned else busy

    @property
    def said_goodbye(self) -> bool:
        """Whether the peer said it was closing (a ``shutdown`` notice) before its link ended."""
        return any(n.code == "shutdown" for n in self.notices)

    def still_given_up(self) -> int:
        """How many of :attr:`abandoned` still count: those given up on less than
        :data:`_ABANDONED_TTL` ago (older ones are forgotten here)."""
        given_up = self.abandoned
        old = time.monotonic() - _ABANDONED_TTL
        while given_up and next(iter(given_up.values())) < old:
            del given_up[next(iter(given_up))]
        return len(given_up)

    def stats(self) -> LinkStats:
        """Counters and identity of this link."""
        d = self.link.info.as_dict()
        d.update(
            name=self.name,
            peer_node=self.peer.node_id if self.peer else None,
            peer_name=self.peer.name if self.peer else d.get("peer_name", ""),
            pending_out=self.link.pending_out,
            dropped=self.dropped,
            slow_consumer_events=self.slow_events,
            inflight_requests=len(self.inflight),
            abandoned_requests=self.still_given_up(),
            interest=sorted(f"{s}" + (f" [{q}]" if q else "") for s, q in self.remote_keys),
        )
        if self.peer is not None:
            d["peer_pid"] = d.get("peer_pid") or self.peer.pid
            d["peer_uid"] = d.get("peer_uid") if d.get("peer_uid") is not None else self.peer.uid
        return cast(LinkStats, d)


class Node:
    """One process's reactor.  Use as an async context manager.

    ``outbound_limit`` bounds the bytes queued toward one link by forwarding
    before messages for that link are dropped (and reported); local
    publishers are never dropped, they wait instead.  ``spin_us`` is the
    busy-poll window while replies are due (see :mod:`ipcbus.spin`; ``None``: from
    ``$IPCBUS_SPIN_US`` or the default, ``0``: off).  ``max_link_subs``
    bounds the distinct subscriptions (subject and queue group) one peer
    below this node may announce: past it the link is closed with a protocol
    error (every subscription costs memory here and in every node interest
    is passed on to).  The link to :attr:`upstream` is not bounded: it
    carries the interest of the whole bus.
    """

    def __init__(
        self,
        *,
        name: str = "",
        max_frame: int = fr.DEFAULT_MAX_FRAME,
        outbound_limit: int = DEFAULT_OUTBOUND_LIMIT,
        spin_us: float | None = None,
        max_link_subs: int = DEFAULT_MAX_LINK_SUBS,
    ) -> None:
        self.spin_us = spin_window(spin_us)
        self.max_link_subs = check_count("max_link_subs", max_link_subs)
        max_frame = check_count("max_frame", max_frame, fr.MIN_MAX_FRAME, "bytes", fr.MAX_MAX_FRAME)
        self.node_id = secrets.token_hex(6)
        self.name = check_name("name", name)
        self.max_frame = max_frame
        # The smallest frame limit of any link (see LinkState.send_max): a
        # message above it takes the general path, which checks each link.
        self._send_bound = max_frame
        self.outbound_limit = check_count("outbound_limit", outbound_limit, unit="bytes")
        # How much a link may queue of the requests and replies kept past
        # outbound_limit (Node._forward): room for two of the largest frames
        # beyond the limit at least, however small the limit is.
        self._keep_cap = max(_KEEP_LIMIT * self.outbound_limit, self.outbound_limit + 2 * max_frame)
        self.links: list[LinkState] = []
        self.upstream: LinkState | None = None
        """The link toward the root of the tree (a client's hub, a worker's parent), if any.

        Set by whoever attached it.  A request this node knows no responder
        for still goes there (:meth:`request_upstream`): interest reaches a
        leaf a moment after it reached the root, and the root answers
        ``no-responders`` itself when nobody serves the subject.
        """
        self._local: SubjectIndex[SubscriptionCore] = SubjectIndex()
        self._remote: SubjectIndex[tuple[LinkState, str | None]] = SubjectIndex()
        self._local_counts: dict[Key, int] = {}
        self._subs: dict[int, SubscriptionCore] = {}
        self._totals: dict[Key, int] = {}
        self._reply_routes: dict[str, set[LinkState]] = {}
        # Requests that subscriptions of this process took and that also went
        # upstream (send_request): a "no responders" from there is not the answer.
        self._heard_here: set[str] = set()
        # Requests given up on this loop turn, by the link each went out on (_send_given_up).
        self._given_up: dict[LinkState, list[str]] = {}
        self._inbox_links: dict[str, LinkState] = {}
        self._dirty: dict[LinkState, None] = {}  # links that got forwarded frames this batch
        # Who gets each subject, cached until interest changes (see _compute_route).
        self._routes: dict[str, _Route] = {}
        self._heads: dict[str, bytes] = {}  # subject -> start of its plain frames
        self._wild_inbox = 0
        self._sids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._bus_ids = itertools.count(1)  # marks of buses on this node that do not own it
        self._interest_ev: asyncio.Event | None = None  # made only when someone waits (interest_event)
        self._rr = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False
        self._closer: asyncio.Future[None] | None = None  # the close aclose() started
        self.started = time.time()
        self.msgs_in = self.msgs_out = self.bytes_in = self.bytes_out = 0
        self.dropped = 0
        self.publishes = 0
        """Publishes made through buses on this node (``Bus.publish`` yields every 1024th)."""
        self.local_pressure = False
        """Set when a subscription in this process got more than half full (or
        dropped): the next local publish yields to the loop once, so that its
        reader can catch up (see docs/concepts.md, flow control)."""
        self.on_link_closed: list[Callable[[LinkState], None]] = []
        # While publish() routes a local message: the links it was queued on
        # (backpressure waits for those, not for every link of the node).
        self._sent_to: list[LinkState] | None = None
        self.inbox = _Inbox(self, f"{INBOX_PREFIX}{self.node_id}.*")
        self._reply_prefix = self.inbox.subject[:-1]  # reply subjects: this + token
        self.deadlines = Deadlines(self.inbox.futures)
        # The loop the node runs on, known once started (saves a lookup per request).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._spinner: Spinner | None = None
        self._tracked_at = 0  # when a request was last sent or passed on (monotonic ns)

    # -- lifetime ----------------------------------------------------------

    async def start(self) -> Node:
        """Start the node's runner task, which owns its task group.

        The task group lives in a runner task of its own, so a node started
        by ``bus = await ipcbus.connect()`` can be closed later from any task.
        """
        if self._runner is not None:
            return self
        started = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        if self.spin_us:
            self._spinner = Spinner(self.loop, self.spin_us, self._awaiting_replies)
        self._runner = self.loop.create_task(
            self._run(started), name=f"ipcbus-node-{self.name or self.node_id}"
        )
        try:
            await started.wait()
        except BaseException:  # cancelled while starting: the runner must not outlive it
            self._closed = True
            self._stop.set()
            raise
        self._add_local(self.inbox)
        return self

    async def _run(self, started: asyncio.Event) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                started.set()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        except Exception:  # a background task failed unexpectedly: the node is unusable
            log.exception("node %s: background task failed; closing the node", self.name)
            self._closed = True  # the links' tasks were cancelled and dropped their links
            self._stop.set()  # see closing
            self._end_local()  # nobody waits forever on a subscription or a reply
        finally:
            started.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` started."""
        return self._closed

    @property
    def closing(self) -> asyncio.Event:
        """Set once the node is closing (:meth:`aclose`, or a failed background task)."""
        return self._stop

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The task group owning the node's background tasks."""
        if self._tg is None and not self._stop.is_set():
            raise BusClosed(
                f"node {self.name!r} is not started: use `async with node` or `await node.start()` first"
            )
        if self._tg is None or self._stop.is_set():
            raise BusClosed(f"node {self.name!r} is closed")
        return self._tg

    async def aclose(self) -> None:
        """Close every link and end every subscription.  Idempotent.

        The close runs to its end even when the caller is cancelled meanwhile
        (see :func:`shielded`); a call made while another is closing waits
        for that close.
        """
        if self._closer is None:
            self._closed = True
            self._closer = asyncio.ensure_future(self._close_links())
        await shielded(self._closer)
        # The runner ends on its own once _stop is set: waiting for it may be
        # cancelled (a task of the node's own task group closing it must be).
        if self._runner is not None:
            await asyncio.wait([self._runner])

    async def _close_links(self) -> None:
        if self._spinner is not None:
            self._spinner.close()
        try:
            # Requests still waiting fail as the bus closes, before a link's
            # end fails them as "responder gone".
            self._fail_requests()
            await say_goodbye([ls.link for ls in self.links], "node closing")
        finally:
            self._end_local()
            self._stop.set()

    def _end_local(self) -> None:
        """End every subscription and fail every request waiting here (idempotent)."""
        for sub in list(self._subs.values()):
            sub.close()
        self._fail_requests()
        self.deadlines.close()

    def _fail_requests(self) -> None:
        """Fail every request made here that is still waiting: the bus closes."""
        for fut in list(self.inbox.futures.values()):
            if not fut.done():
                fut.set_exception(BusClosed("bus closed while waiting for a reply"))

    # -- links ---------------------------------------------------------------

    def hello(self) -> fr.Hello:
        """The Hello frame this node sends on every new link."""
        return fr.Hello(
            version=fr.PROTOCOL_VERSION,
            node_id=self.node_id,
            pid=os.getpid(),
            uid=os.getuid(),
            name=self.name,
            max_frame=self.max_frame,
        )

    async def add_link(
        self,
        link: Link,
        *,
        name: str = "",
        crash_error: str = "ConnectionClosed",
        wait: bool = True,
        held: bool = False,
    ) -> LinkState:
        """Attach a link: exchange Hello, share interest, start routing its frames.

        With ``wait`` (the default) returns once the peer's Hello arrived;
        raises :class:`ProtocolError` or :class:`ConnectionClosed` if it does
        not (the link is then closed).  With ``held``, messages are routed to
        the link only once :meth:`release` is called: the interest its peer
        announces meanwhile is kept aside, neither routed nor passed on to
        other links (replies to its own requests reach it): a pool worker
        whose setup subscribes before it is done setting up.
        """
        if self._closed:
            await link.aclose()
            raise BusClosed("node is closed")
        ls = LinkState(self, link, name, crash_error)
        ls.held = held
        try:
            ls.send_control(_encode(self.hello()))
            for key, total in self._totals.items():
                if total > 0:
                    ls.send_control(_encode(fr.Sub(key[0], key[1])))
        except ConnectionClosed as exc:  # it broke already: the peer is gone
            await link.aclose()
            raise ConnectionClosed(
                f"link {name or link.info.transport!r} closed before the handshake: {exc}"
            ) from None
        self.links.append(ls)
        self.task_group.start_soon(self._run_link, ls, name=f"ipcbus-link-{name}")
        if wait:
            with anyio.move_on_after(_HELLO_TIMEOUT):
                await first_of(ls.ready, ls.closed)
            if not ls.ready.is_set():
                if not ls.closed.is_set():
                    await self._drop_link(ls, "no hello from peer")
                what = (
                    f"link {name or link.info.transport!r} closed before the handshake: "
                    f"{ls.close_reason or 'no hello'}"
                )
                if ls.close_reason.startswith("protocol error"):  # e.g. a wrong version
                    raise ProtocolError(what)
                raise ConnectionClosed(what)
            # The peer sent its interest (Sub frames) right after its hello, but a
            # transport may deliver them in a later read.  Its answer to a ping comes
            # after them on this ordered link, so once the pong is here the peer's
            # interest is known and a publish right after add_link() reaches it.
            await self._roundtrip(ls, _HELLO_TIMEOUT)
        return ls

    async def _roundtrip(self, ls: LinkState, timeout: float) -> None:
        """:meth:`ping`, tolerating a peer that never answers or goes away."""
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await self.ping(ls, timeout)

    async def _run_link(self, ls: LinkState) -> None:
        link = ls.link
        reason = "closed"
        try:
            raw = await link.recv()
            if not isinstance(raw, bytes):  # decode_large is set only after the hello
                raise ProtocolError("expected hello as the first frame, got a message")
            hello = fr.decode_frame(raw)
            if not isinstance(hello, fr.Hello):
                raise ProtocolError(f"expected hello as the first frame, got {type(hello).__name__}")
            if hello.version != fr.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"peer speaks protocol version {hello.version}, this node speaks "
                    f"{fr.PROTOCOL_VERSION}; upgrade the older side"
                )
            if hello.max_frame < fr.MIN_MAX_FRAME:
                raise ProtocolError(
                    f"peer announced max_frame {hello.max_frame}, below the {fr.MIN_MAX_FRAME} "
                    "bytes every node must take"
                )
            if not _NODE_ID.match(hello.node_id):
                raise ProtocolError(
                    f"peer announced node id {hello.node_id[:80]!r}: a node id is 1 to 64 characters, "
                    "none of them whitespace, '.', '*' or '>' (it is a token of the node's inbox subject)"
                )
            ls.peer = hello
            if "." not in hello.node_id:
                with contextlib.suppress(BadSubject):
                    ls.peer_inbox = validate_subject(f"{INBOX_PREFIX}{hello.node_id}.0")[:-1]
            if hello.max_frame < ls.send_max:
                ls.send_max = hello.max_frame
                self._send_bound = min(self._send_bound, ls.send_max)
            if link.info.peer_pid is None:
                link.info.peer_pid = hello.pid
            if link.info.peer_uid is None:
                link.info.peer_uid = hello.uid
            if not link.info.peer_name:
                link.info.peer_name = hello.name
            ls.ready.set()
            recv = link.recv
            # Fairness: recv() does not suspend while frames are buffered, so a busy
            # link could be drained for megabytes in one loop iteration, queueing all
            # of it toward the other links before their writes get a chance to run
            # (and tripping outbound_limit for peers that are not slow at all).
            # Yield to the loop after every `share` bytes read.
            share = max(4096, min(self.outbound_limit // 4, _READ_SHARE))
            budget = share
            take = link.take_ready
            handle = self._handle_frames

            def on_frames() -> None:
                # Frames that arrive while this task waits in recv() are handled
                # in the transport's read callback (see Link.on_frames); a
                # failure is raised by recv() here, as if it had happened here.
                try:
                    handle(ls, take(share))
                except Exception as exc:
                    link.interrupt(exc)

            link.on_frames = on_frames
            link.decode_large = _decode_large
            spinner = self._spinner
            if spinner is not None and link.poll_after_request:
                # Frames that come through a thread: the link takes them itself
                # while this loop polls anyway (Link.keep_polling).
                link.keep_polling = lambda: spinner.active
                link.start_polling = spinner.linger
            while True:
                raws = [await recv()]
                # Handle every frame already read in this wake-up, bounded by the share.
                raws += take(share)
                handle(ls, raws)
                budget -= _frames_size(raws)
                if budget <= 0:
                    budget = share
                    await asyncio.sleep(0)
        except EndOfStream:
            reason = "peer closed"
        except (ProtocolError, BadSubject) as exc:
            # BadSubject: the peer sent an invalid subject in a Sub or Msg frame;
            # that is a protocol error on this link, not a failure of the node.
            reason = f"protocol error: {exc}"
            log.warning("link %s (pid %s): %s; closing it", ls.name, link.info.peer_pid, exc)
            with contextlib.suppress(Exception):
                link.send_nowait(_encode(fr.Notice("protocol_error", str(exc)[:1000])))
        except ConnectionClosed as exc:
            reason = f"connection closed: {exc}"
        finally:
            link.on_frames = None
            link.decode_large = None
            link.keep_polling = link.start_polling = None
            with anyio.CancelScope(shield=True):
                await self._drop_link(ls, ls.ending or reason)

    def _handle_frames(self, ls: LinkState, raws: Sequence[bytes | fr.Msg]) -> None:
        """Decode and route a batch of frames read from ``ls``."""
        decode = fr.frame_decoder.decode  # errors mapped below, without a wrapper call
        routes = self._routes
        reply_routes = self._reply_routes
        inbox_prefix = self._reply_prefix
        futures = self.inbox.futures
        peer_inbox = ls.peer_inbox
        peer_inbox_len = len(peer_inbox)
        nbytes = controls = 0
        asked = False  # a request came: a responder polls for the next (Spinner.answered)
        raw: bytes | fr.Msg | None
        frame: fr.Frame
        try:
            for raw in raws:
                if type(raw) is bytes:
                    try:
                        frame = decode(raw)
                    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                        raise ProtocolError(f"malformed frame ({len(raw)} bytes): {exc}") from None
                else:  # a Msg decoded in place by the transport (Link.decode_large)
                    assert isinstance(raw, _MsgFrame)
                    frame = raw
                    raw = None
                try:
                    if type(frame) is _MsgFrame:
                        nbytes += len(frame.payload)
                        subject = frame.subject
                        reply = frame.reply
                        if reply is not None:
                            asked = True
                            fast = routes.get(subject)
                            if (
                                fast is not None
                                and len(fast[2]) == 1
                                and not fast[0]
                                and not fast[1]
                                and (not reply_routes or subject not in reply_routes)
                            ):
                                q, cands = fast[2][0]
                                sub = cands[0]
                                if len(cands) == 1 and frame.groups == (q,) and type(sub) is SubscriptionCore:
                                    # Inline of _on_msg and _route for a request to a
                                    # service here, picked for it by the sender (a
                                    # pool's worker, a hub's client).
                                    if not (
                                        reply.startswith(peer_inbox)
                                        and reply[peer_inbox_len:].isalnum()
                                        and len(reply) <= MAX_SUBJECT_LENGTH
                                    ):  # not the usual reply subject of the peer's own requests
                                        validate_subject(reply)
                                    sub.deliver(frame)
                                    continue
                        elif (  # (before the route: inbox subjects have none cached)
                            subject.startswith(inbox_prefix)
                            and not self._wild_inbox
                            and not frame.groups
                        ):
                            # A reply to one of our requests: straight to the inbox
                            # (it ignores tokens it does not know, dotted ones too).
                            if reply_routes and subject in reply_routes:
                                if frame.headers and self._others_may_answer(subject, frame, ls):
                                    continue
                                for r in reply_routes.pop(subject):
                                    r.inflight.pop(subject, None)
                                if self._heard_here:
                                    self._heard_here.discard(subject)
                            elif ls.inflight.pop(subject, None) is None and ls.abandoned:
                                # (Else the reply to a request of ours, tracked on this link only.)
                                ls.abandoned.pop(subject, None)  # a late reply: its responder is done
                            fut = futures.get(subject)  # (self.inbox.deliver, inlined)
                            if fut is not None and not fut.done():  # first reply wins
                                fut.set_result(frame)
                            continue
                        elif (
                            (fast := routes.get(subject)) is not None
                            and not fast[2]
                            and not frame.groups
                            and (not reply_routes or subject not in reply_routes)
                        ):
                            # Inline of _route's plain-message path (the common case).
                            for sub in fast[0]:
                                sub.deliver(frame)
                            for other in fast[1]:
                                if other is not ls:
                                    if raw is None:
                                        raw = _encode(frame)
                                    self._forward(other, raw, subject, True)
                            continue
                        self._on_msg(frame, raw, ls)
                    else:
                        controls += 1
                        self._on_control(frame, ls)
                except BadSubject as exc:
                    raise ProtocolError(f"peer sent an invalid subject: {exc}") from None
        finally:  # counted once per batch, not per message
            self.msgs_in += len(raws) - controls  # (all of them, also when one failed)
            self.bytes_in += nbytes
        if self._spinner is not None:
            if self._awaiting_replies():
                self._spinner.kick()  # replies are still due: poll for them
            elif ls.link.poll_after_request:
                # More is likely near, and while the loop polls the link takes it
                # without its thread: see Spinner.linger and Link.keep_polling.
                self._spinner.linger()
            elif asked:
                # A responder polls briefly for the next request of a run (a
                # pipelining requester, a pool's parent): it then costs no wake-up.
                self._spinner.answered()
        if self._dirty:
            # Forward what this batch produced now, rather than one loop
            # iteration later: batching per read, lower latency per hop.
            dirty, self._dirty = self._dirty, {}
            for other in dirty:
                other.link.flush_now()

    async def _drop_link(self, ls: LinkState, reason: str) -> None:
        if ls.closed.is_set():
            return
        ls.close_reason = reason
        ls.closed.set()
        if ls in self.links:
            self.links.remove(ls)
        if ls.send_max < self.max_frame:
            self._send_bound = min([self.max_frame, *(o.send_max for o in self.links)])
        # Owners (a pool, a client) learn first, so that by the time a
        # requester sees its request fail, their state already reflects it.
        for cb in list(self.on_link_closed):
            cb(ls)
        below = [nid for nid, other in self._inbox_links.items() if other is ls]  # its nodes
        for key in list(ls.remote_keys):
            self._remote_unsub(ls, key)
        if below and self._reply_routes:
            # Requests made below this link and still due: nobody waits for
            # them any more.  Their responders' links must not stay counted
            # busy (queue-group picks avoid them) when the late reply is
            # dropped before it comes back this way.
            gone = set(below)
            for reply in [r for r in self._reply_routes if self._inbox_node(r, wild_too=True) in gone]:
                self.forget_reply(reply, requester_gone=True)
        if below:
            # Nor do those they gave up on before (gave_up notices): counted
            # in their responders' load until the late reply, which now never
            # comes back this way.
            gone = set(below)
            for other in self.links:
                if other.abandoned:
                    for reply in [r for r in other.abandoned if self._inbox_node(r, wild_too=True) in gone]:
                        del other.abandoned[reply]
        for fut in ls.pongs.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed(f"link closed: {reason}"))
        # Requests in flight over this link will never be answered through it.
        pid = ls.link.info.peer_pid
        who = ls.name if f"pid {pid})" in ls.name else f"{ls.name} (pid {pid})"
        what = (
            f"the link toward the responder, {who!r}, closed"  # our upstream, not the responder
            if ls is self.upstream
            else f"the responder's link {who!r} closed"
        )
        for reply, subject in list(ls.inflight.items()):
            routes = self._reply_routes.get(reply)
            if routes is None:  # a request of ours, tracked on this link only (_send_fast)
                self.closed_status(reply, ls.crash_error, f"{what} ({reason})")
                continue
            routes.discard(ls)
            if routes and all(_only_listens(other, subject) for other in routes):
                # Still due only from catch-all '>' listeners (`ipcbus sub '>'`,
                # a monitor): they will not answer, the requester learns now.
                for other in routes:
                    other.inflight.pop(reply, None)
                routes.clear()
            if not routes:
                del self._reply_routes[reply]
                self._heard_here.discard(reply)  # the status below ends the request
                self.closed_status(reply, ls.crash_error, f"{what} ({reason})")
        ls.inflight.clear()
        log.info(
            "link %s closed (transport %s, peer pid %s): %s",
            ls.name,
            ls.link.info.transport,
            ls.link.info.peer_pid,
            reason,
        )
        await ls.link.aclose()

    # -- interest ------------------------------------------------------------

    def _announce(self, key: Key, old_total: int, new_total: int, origin: LinkState | None) -> None:
        """Send Sub/Unsub to each link whose view of ``key`` changed."""
        sub = unsub = None
        for ls in self.links:
            if ls is origin:
                continue
            # (A key a held link announced is not in the totals yet.)
            has = 1 if key in ls.remote_keys and key not in ls.held_keys else 0
            before, after = old_total - has, new_total - has
            try:
                if before == 0 and after > 0:
                    sub = sub or _encode(fr.Sub(key[0], key[1]))
                    ls.send_control(sub)
                elif before > 0 and after == 0:
                    unsub = unsub or _encode(fr.Unsub(key[0], key[1]))
                    ls.send_control(unsub)
            except ConnectionClosed:
                pass

    def _bump(self, key: Key, delta: int, origin: LinkState | None) -> None:
        old = self._totals.get(key, 0)
        new = old + delta
        if new:
            self._totals[key] = new
        else:
            self._totals.pop(key, None)
        self._announce(key, old, new, origin)

    # Replies travel on unique inbox subjects, which would miss every match
    # cache.  While no wildcard pattern could match an inbox subject, they are
    # routed by the node id in the subject alone (one dict lookup).
    def _inbox_interest(self, pattern: str, queue: str | None, delta: int, ls: LinkState | None) -> None:
        if pattern == self.inbox.subject and ls is None:
            return
        parts = pattern.split(".")
        if (
            ls is not None
            and queue is None
            and len(parts) == 3
            and parts[0] == "_INBOX"
            and parts[2] == "*"
            and parts[1] not in ("*", ">")
        ):
            nid = parts[1]
            if delta > 0 and nid not in self._inbox_links:
                self._inbox_links[nid] = ls
                return
            if delta < 0 and self._inbox_links.get(nid) is ls:
                del self._inbox_links[nid]
                return
        if parts[0] in ("*", ">", "_INBOX"):
            self._wild_inbox += delta

    def _interest_changed(self) -> None:
        self._routes.clear()
        if self._interest_ev is not None:
            self._interest_ev.set()
            self._interest_ev = None

    def interest_event(self) -> asyncio.Event:
        """An event set at the next change of interest here: a subscription,
        in this process or across a link, comes or goes."""
        if self._interest_ev is None:
            self._interest_ev = asyncio.Event()
        return self._interest_ev

    def _add_local(self, sub: SubscriptionCore) -> None:
        self._interest_changed()
        self._inbox_interest(sub.subject, sub.queue, 1, None)
        self._local.add(sub.subject, sub)
        key = (sub.subject, sub.queue)
        self._local_counts[key] = self._local_counts.get(key, 0) + 1
        self._bump(key, 1, None)

    def _remove_local(self, sub: SubscriptionCore) -> None:
        self._interest_changed()
        if not self._local.remove(sub.subject, sub):
            return
        if not sub.withdrawn:
            self._unannounce(sub)

    def withdraw(self, sub: SubscriptionCore) -> None:
        """Stop announcing ``sub`` to the links, but go on delivering to it.

        The first step of draining a queue-group member: once the peers have
        processed the Unsub (:meth:`flush`), nothing more is on its way to it,
        and it can be unsubscribed without a request that was already sent
        to it finding no member (and coming back "no responders").
        """
        if sub.withdrawn or sub.closed or self._subs.get(sub.sid) is not sub:
            return
        sub.withdrawn = True
        self._interest_changed()
        self._unannounce(sub)

    def _unannounce(self, sub: SubscriptionCore) -> None:
        self._inbox_interest(sub.subject, sub.queue, -1, None)
        key = (sub.subject, sub.queue)
        c = self._local_counts.get(key, 0) - 1
        if c > 0:
            self._local_counts[key] = c
        else:
            self._local_counts.pop(key, None)
        self._bump(key, -1, None)

    def _remote_sub(self, ls: LinkState, key: Key) -> None:
        self._interest_changed()
        if key in ls.remote_keys:
            return
        validate_pattern(key[0])
        if len(ls.remote_keys) >= self.max_link_subs and ls is not self.upstream:
            raise ProtocolError(
                f"peer subscribed to more than {self.max_link_subs} distinct subjects on this link "
                "(a subscription per request, never unsubscribed?); the limit is the node's "
                "max_link_subs (Hub(max_link_subs=...))"
            )
        ls.remote_keys.add(key)
        self._inbox_interest(key[0], key[1], 1, ls)
        if ls.held and not key[0].startswith(INBOX_PREFIX):  # its own inbox: replies reach it
            ls.held_keys.add(key)
            return
        self._remote.add(key[0], (ls, key[1]))
        self._bump(key, 1, ls)

    def withdraw_link(self, ls: LinkState) -> None:
        """Route no new messages or requests to ``ls`` (a link about to close).

        Forgets the interest its side announced, except in inboxes: replies
        to what was asked there still reach it.  Other nodes hear of the
        change as of any unsubscription.
        """
        for key in list(ls.remote_keys):
            if not key[0].startswith("_INBOX."):
                self._remote_unsub(ls, key)

    def _remote_unsub(self, ls: LinkState, key: Key) -> None:
        self._interest_changed()
        if key not in ls.remote_keys:
            return
        if ls.on_unsub is not None:
            ls.on_unsub(key)
        ls.remote_keys.discard(key)
        self._inbox_interest(key[0], key[1], -1, ls)
        if key in ls.held_keys:
            ls.held_keys.discard(key)
            return
        self._remote.remove(key[0], (ls, key[1]))
        self._bump(key, -1, ls)

    # -- subscriptions -------------------------------------------------------

    def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        pending_bytes: int = DEFAULT_PENDING_BYTES,
        overflow: Overflow = "drop_new",
    ) -> SubscriptionCore:
        """Register a local subscription and announce the interest on every link."""
        if self._closed:
            raise BusClosed("bus is closed")
        validate_pattern(subject)
        if queue is not None:
            validate_name(queue, "queue group name")
        if overflow not in ("drop_new", "drop_old"):
            raise ValueError(f"overflow must be 'drop_new' or 'drop_old', not {overflow!r}")
        max_pending = check_count("max_pending", max_pending, unit="messages")
        pending_bytes = check_count("pending_bytes", pending_bytes, 0, "bytes")
        sub = SubscriptionCore(self, next(self._sids), subject, queue, max_pending, pending_bytes, overflow)
        self._add_local(sub)
        self._subs[sub.sid] = sub
        return sub

    def unsubscribe(self, sub: SubscriptionCore) -> None:
        """Remove a local subscription; its reader drains what is pending."""
        self._remove_local(sub)
        self._subs.pop(sub.sid, None)
        sub.close()

    def announced(self, key: Key) -> int:
        """How many announce interest in ``key`` (a pattern and queue group):
        local subscriptions, and links whose side subscribed."""
        return self._totals.get(key, 0)

    def has_interest(self, subject: str) -> bool:
        """Whether anyone (here or across a link) wants ``subject``."""
        route = self._routes.get(subject)
        if route is None:
            route = self._compute_route(subject)
        return bool(route[0] or route[1] or route[2])

    # -- routing -------------------------------------------------------------

    def _on_msg(self, m: fr.Msg, raw: bytes | None, origin: LinkState) -> None:
        if m.reply is not None:
            # A bad reply subject would only blow up later, in whoever answers
            # (a service's publish): refuse it here, as a protocol error on this link.
            validate_subject(m.reply)
        if m.groups == _ANY_GROUP:
            if self._pass_up(m, origin):
                return
            m, raw = self._for_every_group(m), None
        self._route(m, raw, origin)

    def _for_every_group(self, m: fr.Msg) -> fr.Msg:
        """A message whose sender left the queue groups to us (``groups ==
        _ANY_GROUP``): ``m`` for one member of each group this node knows, as if
        published here."""
        route = self._routes.get(m.subject)
        if route is None:
            route = self._compute_route(m.subject, cache=not m.subject.startswith("_INBOX."))
        return _MsgFrame(m.subject, m.reply, m.headers, m.payload, tuple(q for q, _ in route[2]))

    def _pass_up(self, m: fr.Msg, origin: LinkState) -> bool:
        """Send an any-group request on toward the root when nobody here or below
        wants its subject (a tree of hubs); True if it went."""
        up = self.upstream
        if up is None or up is origin or up.closed.is_set() or self.has_interest(m.subject):
            return False
        if not self._forward(up, _encode(m), m.subject, True, m.reply is not None):
            return False
        if m.reply is not None:
            self._track(up, m.reply, m.subject)
        return True

    def _route(self, m: fr.Msg, raw: bytes | None, origin: LinkState | None) -> int:
        """Deliver ``m`` locally and forward it; return how many destinations took it."""
        subject = m.subject
        routes = self._reply_routes
        if routes and subject in routes:
            if origin is not None and m.headers and self._others_may_answer(subject, m, origin):
                return 0
            for ls in routes.pop(subject):
                ls.inflight.pop(subject, None)
            if self._heard_here:
                self._heard_here.discard(subject)
        elif (
            origin is not None
            and (origin.inflight or origin.abandoned)
            # (Else a reply to a request of ours, tracked on its link only: _send_fast.)
            and origin.inflight.pop(subject, None) is None
            and origin.abandoned
        ):
            origin.abandoned.pop(subject, None)  # a late reply: its responder is done
        nid = None if m.groups else self._inbox_node(subject)
        if nid is not None:
            if nid == self.node_id:
                self.inbox.deliver(m)
                return 1
            target = self._inbox_links.get(nid)
            if target is not None and target is not origin:
                frame = raw if raw is not None else _encode(m)
                if self._forward(target, frame, subject, origin is not None, True):
                    if m.reply is not None:
                        self._track(target, m.reply, subject)
                    return 1
                return 0
        route = self._routes.get(subject)
        if route is None:  # one-off reply subjects stay out of the cache
            route = self._compute_route(subject, cache=not subject.startswith("_INBOX."))
        subs, plain, groups = route
        if m.reply is None and not m.groups and not groups:
            # Plain messages: subscriptions and links, no queue groups involved.
            links = plain
            n = 0
            for sub in subs:
                sub.deliver(m)
                n += 1
            if links:
                frame = raw if raw is not None else _encode(m)
                forwarded = origin is not None
                for ls in links:
                    if ls is not origin and self._forward(ls, frame, subject, forwarded):
                        n += 1
            return n
        if not subs and not plain and not groups:
            if origin is not None and m.reply is not None:
                self._no_responders(m)
            elif origin is not None and m.groups:
                # Handed to a queue-group member here that has just left: lost
                # (at most once, as in NATS), and counted.
                self.dropped += 1
            return 0
        if not subs and not plain and len(groups) == 1:
            # A request to a service (one queue group, nothing else): the
            # common case of request/reply and of a worker pool.
            q, cands = groups[0]
            if origin is None or (m.groups == (q,) and origin not in cands):
                if len(cands) > 1 and self._send_bound < self.max_frame:
                    cands = self._members_that_take(cands, m, raw if origin is not None else None, q)
                pick = cands[0] if len(cands) == 1 else self._pick(cands, q)
                if not isinstance(pick, LinkState):
                    pick.deliver(m)
                    return 1
                if raw is None or origin is None:
                    raw = _encode(_MsgFrame(subject, m.reply, m.headers, m.payload, (q,)))
                if not self._forward(pick, raw, subject, origin is not None, m.reply is not None):
                    if origin is not None and m.reply is not None and len(raw) > pick.send_max:
                        # Passed on, but too large for every member's link: the
                        # requester is told now rather than at its timeout.
                        self._too_large_reply(m.reply, "request", len(raw), pick.send_max)
                    elif not pick.link.closed and pick.link.pending_out > self.outbound_limit:
                        self._closed_reply(m, "ConnectionClosed", self._full_why(pick, "responder"))
                    else:  # the member's link broke under the write (passed on or not)
                        self._unsendable(m, (pick,))
                    return 0
                if m.reply is not None:
                    self._track(pick, m.reply, subject)
                return 1
        groups_in = m.groups
        # Local members are handed the message after it went out on the links:
        # a service answering inline would otherwise reply before the request
        # is tracked on them (a reply that never comes back to clear it).
        local: list[SubscriptionCore] = list(subs)
        link_groups: dict[LinkState, list[str]] | None = None
        for q, cands in groups:
            if origin is not None:
                if q not in groups_in:
                    continue  # another node is responsible for this group
                if origin in cands:
                    cands = tuple(c for c in cands if c is not origin)
                    if not cands:
                        continue
            pick = self._pick(cands, q)
            if isinstance(pick, LinkState):
                if link_groups is None:
                    link_groups = {}
                link_groups.setdefault(pick, []).append(q)
            else:
                local.append(pick)
        targets: list[LinkState] = [ls for ls in plain if ls is not origin]
        if link_groups:
            targets.extend(ls for ls in link_groups if ls not in plain)
        if not targets:
            for sub in local:
                sub.deliver(m)
            if not local and origin is not None and m.reply is not None:
                self._no_responders(m)
            return len(local)
        count = 0
        plain_frame: bytes | None = raw if (raw is not None and not groups_in) else None
        reply = m.reply
        too_large: tuple[int, int] | None = None  # (size, limit) of a link that refused it
        slow = False  # a link dropped it (over outbound_limit)
        full: LinkState | None = None  # a member's link refused it: too much in flight there
        members_took = False  # a member across a link took it
        broke: list[LinkState] = []  # links whose writes failed
        # A reply's own requester (its inbox's node), when wildcards route inboxes here.
        requester = None
        if self._wild_inbox and (nid := self._inbox_node(subject, wild_too=True)) is not None:
            requester = self._inbox_links.get(nid)
        for ls in targets:
            gs = link_groups.get(ls) if link_groups else None
            if gs:
                handed = tuple(sorted(gs))
                if raw is not None and handed == groups_in:
                    frame = raw  # passed on with the groups it came with (a hub's requests)
                else:
                    frame = _encode(fr.Msg(m.subject, m.reply, m.headers, m.payload, handed))
            else:
                if plain_frame is None:
                    plain_frame = _encode(
                        fr.Msg(m.subject, m.reply, m.headers, m.payload) if groups_in else m
                    )
                frame = plain_frame
            keep = (reply is not None and bool(gs)) or ls is requester
            if self._forward(ls, frame, subject, origin is not None, keep):
                count += 1
                members_took = members_took or bool(gs)
                if reply is not None:
                    self._track(ls, reply, subject)
            elif len(frame) > ls.send_max:
                too_large = (len(frame), ls.send_max)
            elif keep and gs and not ls.link.closed and ls.link.pending_out > self.outbound_limit:
                full = ls
            elif ls.link.pending_out > self.outbound_limit:
                slow = True
            else:
                broke.append(ls)  # its peer is gone: the write failed
        for sub in local:
            sub.deliver(m)
        count += len(local)
        if (
            full is not None
            and not members_took
            and origin is not None
            and not any(sub.queue is not None for sub in local)  # nor one here
        ):
            # The member picked refused it, and no other member took it: the
            # requester is told now, whoever else (a listener) heard it.
            self._closed_reply(m, "ConnectionClosed", self._full_why(full, "responder"))
            return count
        if count == 0 and reply is not None:
            if origin is None or broke:
                self._unsendable(m, broke or targets)
            elif too_large is not None:
                # Passed on, but too large for every link that wants it: the
                # requester is told now rather than "no responders".
                self._too_large_reply(reply, "request", *too_large)
            elif slow:
                # Its plain subscribers' links are all over their limit: it was
                # dropped there (someone does serve it, so not "no responders").
                self._closed_reply(
                    m, "ConnectionClosed", "dropped: the links to its subscribers are too slow"
                )
            else:
                self._no_responders(m)
        return count

    def _inbox_node(self, subject: str, *, wild_too: bool = False) -> str | None:
        """The node id of an inbox subject (``_INBOX.<node>.<token>``) when inboxes
        are routed by it alone, i.e. while no wildcard pattern could match one
        (``wild_too``: also while one could)."""
        if (self._wild_inbox and not wild_too) or not subject.startswith("_INBOX."):
            return None
        dot = subject.find(".", 7)
        if dot < 0 or subject.find(".", dot + 1) >= 0:
            return None
        return subject[7:dot]

    def _compute_route(self, subject: str, cache: bool = True) -> _Route:
        """Match ``subject`` once; cache who gets it until interest changes."""
        subs: list[SubscriptionCore] = []
        plain: dict[LinkState, None] = {}
        groups: dict[str, list[SubscriptionCore | LinkState]] = {}
        for sub in self._local.match(subject):
            if sub.queue is None:
                subs.append(sub)
            else:
                groups.setdefault(sub.queue, []).append(sub)
        for ls, q in self._remote.match(subject):
            if q is None:
                plain[ls] = None
            else:
                groups.setdefault(q, []).append(ls)
        route = (tuple(subs), tuple(plain), tuple((q, tuple(c)) for q, c in groups.items()))
        if cache:
            if len(self._routes) >= _FAST_CACHE:
                self._routes.clear()
            self._routes[subject] = route
        return route

    def _members_that_take(
        self,
        cands: tuple[SubscriptionCore | LinkState, ...],
        m: fr.Msg,
        raw: bytes | None,
        q: str,
    ) -> tuple[SubscriptionCore | LinkState, ...]:
        """The members of a queue group whose link takes ``m`` (all of them if none
        does: the pick then fails as it would have).  Only when a peer announced a
        smaller max_frame than ours."""
        if raw is not None:
            size = len(raw)
        else:
            bound = len(m.payload) + 4 * (len(m.subject) + len(m.reply or "") + len(q)) + 64
            if not m.headers and bound <= self._send_bound:
                return cands  # fits every link: no need to measure
            size = len(_encode(_MsgFrame(m.subject, m.reply, m.headers, m.payload, (q,))))
        if size <= self._send_bound:
            return cands
        fits = tuple(c for c in cands if _takes(c, size))
        return fits or cands

    def _pick(self, cands: Sequence[SubscriptionCore | LinkState], q: str) -> SubscriptionCore | LinkState:
        """Least busy member of group ``q``; among equals, the one picked for
        ``q`` longest ago (round robin)."""
        self._rr += 1
        best = cands[0]
        if len(cands) > 1:
            least: tuple[int, int] | None = None
            for c in cands:
                if isinstance(c, LinkState):
                    busy = len(c.inflight) + c.link.pending_out // 65536  # LinkState.busy, inlined
                    if c.abandoned:
                        busy += c.still_given_up()
                    load = (busy, c.last_pick.get(q, 0))
                else:
                    load = (len(c.pending) // 16, c.last_pick)
                if least is None or load < least:
                    best, least = c, load
        if isinstance(best, LinkState):
            picks = best.last_pick
            if len(picks) >= _MAX_PICK_GROUPS and q not in picks:
                picks.clear()  # groups come and go on a long-lived link: forget the old ones
            picks[q] = self._rr
        else:
            best.last_pick = self._rr
        return best

    def _forward(
        self, ls: LinkState, frame: bytes, subject: str, forwarded: bool, keep: bool = False
    ) -> bool:
        link = ls.link
        # ``keep``: a request to the member picked to answer it, or a reply on
        # the way to its requester, is not dropped for a slow link: those are
        # bounded by the requests in flight, and a requester's timeout covers a
        # slow responder.  Copies for plain listeners are dropped as any message.
        # Requests in flight are not bounded in number, though (a client's
        # gather of large requests): past _keep_cap, kept frames are refused
        # too, and the requester is told at once (of a request, by the caller).
        if keep:
            pending = link.pending_out
            if forwarded and pending > self.outbound_limit and pending + len(frame) > self._keep_cap:
                ls.dropped += 1
                self.dropped += 1
                self._log_full(ls, "refusing requests and replies for it")
                if subject.startswith(INBOX_PREFIX):
                    # A reply, toward a requester that does not read them: a
                    # small status, which always goes through, says so.
                    self.closed_status(subject, "ConnectionClosed", self._full_why(ls, "requester"))
                return False
        elif forwarded and link.pending_out > self.outbound_limit:
            # Slow link: drop for this link only, count, report when it catches up.
            ls.dropped += 1
            self.dropped += 1
            if not ls.dropped_unreported:
                ls.slow_events += 1
                self._log_full(ls, "dropping its messages")
                # Report the loss once the link has room again, even if no further
                # message for it ever comes (otherwise the subscriber would never know).
                # One waiting task per link: a consumer that hovers at the limit
                # starts an episode per message that gets through.
                if not ls.reporting:
                    with contextlib.suppress(BusClosed):
                        self.task_group.start_soon(self._report_drops, ls)
                        ls.reporting = True
            self._count_drop(ls, subject)
            return False
        if len(frame) > ls.send_max:
            # Passed on from another link (a message published here was checked
            # in publish_nowait): the peer said it takes no frame this large.
            ls.dropped += 1
            self.dropped += 1
            if subject.startswith("_INBOX."):
                # A reply: its requester waits for it; tell it instead, in a
                # frame that fits, rather than leave it to its timeout.
                self._too_large_reply(subject, "reply", len(frame), ls.send_max)
            elif not keep:  # (a request to the member picked: its requester is told)
                # Its subscribers are told, as for any message dropped for them.
                self._count_drop(ls, subject)
                with contextlib.suppress(ConnectionClosed):
                    self._send_drop_notice(ls)
            self._warn(
                ls,
                "too_large",
                "message on %r (%d bytes) is over the %d-byte max_frame link %s announced; "
                "not forwarded to it",
                subject,
                len(frame),
                ls.send_max,
                ls.name,
            )
            return False
        try:
            if ls.dropped_unreported:
                self._send_drop_notice(ls)
            link.send_nowait(frame)
        except ConnectionClosed:
            self._unroute(ls)
            return False
        except FrameTooLarge:
            self._warn(
                ls, "too_large", "message on %r too large for link %s; not forwarded", subject, ls.name
            )
            return False
        self.msgs_out += 1
        if forwarded:
            self._dirty[ls] = None
        elif self._sent_to is not None:
            self._sent_to.append(ls)
        return True

    def _log_full(self, ls: LinkState, doing: str) -> None:
        """Warn that ``ls`` is over its limit (a consumer hovering at the limit
        starts an episode per message that gets through: see :meth:`_warn`)."""
        self._warn(
            ls,
            "slow",
            "slow consumer: link %s (pid %s) has %d bytes queued; %s "
            "(%d slow episode(s), %d message(s) dropped for it so far)",
            ls.name,
            ls.link.info.peer_pid,
            ls.link.pending_out,
            doing,
            ls.slow_events,
            ls.dropped,
        )

    def _warn(self, ls: LinkState, kind: str, msg: str, *args: object) -> None:
        """Log a warning of ``kind`` about ``ls``: one line at most per link and
        kind every :data:`_SLOW_LOG_EVERY` seconds.  Those held back meanwhile
        are counted and told in one line at the end of that window, so that
        nothing goes unsaid and a flood of them does not flood the log."""
        now = time.monotonic()
        w = ls.warned.get(kind)
        if w is None or now - w[0] >= _SLOW_LOG_EVERY:
            ls.warned[kind] = [now, 0]
            log.warning(msg, *args)
            return
        w[1] += 1
        if w[1] == 1 and self.loop is not None:  # the first held back: say them all later
            self.loop.call_later(w[0] + _SLOW_LOG_EVERY - now, self._warn_held, ls, kind)

    @staticmethod
    def _warn_held(ls: LinkState, kind: str) -> None:
        w = ls.warned[kind]
        log.warning(
            "link %s: %d more %s in the last %g s (%d bytes queued toward it, %d message(s) "
            "dropped for it so far)",
            ls.name,
            w[1],
            _HELD[kind],
            _SLOW_LOG_EVERY,
            ls.link.pending_out,
            ls.dropped,
        )
        w[0], w[1] = time.monotonic(), 0

    @staticmethod
    def _count_drop(ls: LinkState, subject: str) -> None:
        """Count a message on ``subject`` dropped for ``ls``, to report in its next drop notice."""
        ls.dropped_unreported += 1
        counts = ls.dropped_subjects
        if subject in counts:
            counts[subject] += 1
        elif len(counts) < 64:
            counts[subject] = 1

    def _send_drop_notice(self, ls: LinkState) -> None:
        """Tell the peer how many messages were dropped for it (``slow_consumer`` notice)."""
        ls.send_control(
            _encode(
                fr.Notice(
                    "slow_consumer",
                    f"{ls.dropped_unreported} message(s) dropped: link too slow, or over its max_frame",
                    tuple(ls.dropped_subjects),
                    ls.dropped_unreported,
                    tuple(ls.dropped_subjects.values()),
                )
            )
        )
        ls.dropped_unreported = 0
        ls.dropped_subjects.clear()

    def _pass_drops_on(self, ls: LinkState, counts: dict[str, int], rest: int) -> None:
        """Tell ``ls`` of drops further up the tree on subjects it wants: its
        subscribers may have lost those messages too (a notice is per hop)."""
        total = sum(counts.values()) + rest
        if total <= 0 or ls.closed.is_set():
            return
        ls.dropped_unreported += total
        mine = ls.dropped_subjects
        for s, n in counts.items():
            if s in mine or len(mine) < 64:
                mine[s] = mine.get(s, 0) + n
        with contextlib.suppress(ConnectionClosed):
            self._send_drop_notice(ls)

    async def _report_drops(self, ls: LinkState) -> None:
        """Wait until a slow link is back under half its limit, then report its drops."""
        try:
            with contextlib.suppress(ConnectionClosed):
                await ls.link.wait_writable(self.outbound_limit // 2)
                if ls.dropped_unreported and not ls.closed.is_set():
                    self._send_drop_notice(ls)
        finally:
            ls.reporting = False

    def _track(self, ls: LinkState, reply: str, subject: str) -> None:
        self._tracked_at = time.monotonic_ns()
        ls.inflight[reply] = subject
        routes = self._reply_routes.get(reply)
        if routes is None:  # the common case: a fresh reply subject, one link
            self._reply_routes[reply] = {ls}
        else:
            routes.add(ls)
        if len(ls.inflight) > _INFLIGHT_CAP:
            self._forget_oldest(ls)

    def _forget_oldest(self, ls: LinkState) -> None:
        """``ls`` has too many requests in flight: its oldest one's requester gave up long ago."""
        old = next(iter(ls.inflight))
        del ls.inflight[old]
        r = self._reply_routes.get(old)
        if r is not None:
            r.discard(ls)
            if not r:
                del self._reply_routes[old]
                self._heard_here.discard(old)

    def _unroute(self, ls: LinkState) -> None:
        """A write to ``ls`` failed: its peer is gone.  Route nothing more to it now.

        Its task drops it on its next turn; until then a requester that retries
        at once (on WorkerCrashed, say) without yielding to the loop would be
        sent to it again and again -- it looks the least busy of all.
        """
        for key in list(ls.remote_keys):
            self._remote_unsub(ls, key)

    def _unsendable(self, m: fr.Msg, links: Sequence[LinkState]) -> None:
        """A request made or passed on here could not be written to any link it was routed to.

        Those links broke under the write (their peers are gone, and the node
        has not dropped them yet): answer with a ``closed`` status at once, as
        for a request in flight over a link that closes, not after the timeout.
        """
        crashed = any(ls.crash_error == "WorkerCrashed" for ls in links)
        self._closed_reply(
            m,
            "WorkerCrashed" if crashed else "ConnectionClosed",
            "the responder's link broke while the request was written",
        )

    def _full_why(self, ls: LinkState, whose: str) -> str:
        """Why a request or reply was refused for ``ls``: its queue is near ``_keep_cap``."""
        return (
            f"dropped: the link toward the {whose} ({ls.name}) has {ls.link.pending_out} bytes "
            f"queued, and the node that passes it on keeps at most {self._keep_cap} bytes of "
            "requests and replies for one link; too much in flight to it (fewer or smaller "
            "requests at once), or it stopped reading"
        )

    def _closed_reply(self, m: fr.Msg, kind: str, why: str) -> None:
        """Answer the request ``m`` with a ``closed`` status, unless it is a status itself."""
        if m.reply is None or (m.headers and STATUS_HEADER in m.headers):
            return
        self.closed_status(m.reply, kind, why)

    def hand_to(self, ls: LinkState, m: fr.Msg, queue: str | None) -> None:
        """Send ``m``, a message held for ``ls`` (a pool's worker being restarted),
        straight to it: as the member picked in ``queue``, its reply tracked as
        for a request routed there.  A request that cannot be sent (the link
        broke, the frame is too large for it) is answered with a ``closed`` status."""
        frame = _MsgFrame(m.subject, m.reply, m.headers, m.payload, (queue,) if queue else ())
        try:
            ls.link.send_nowait(_encode(frame))
        except (ConnectionClosed, FrameTooLarge) as exc:
            if m.reply is not None:
                why = f"held for link {ls.name}, which refused it: {exc}"
                self.closed_status(m.reply, ls.crash_error, why)
            return
        self.msgs_out += 1
        self.bytes_out += len(m.payload)
        if m.reply is not None and ls is not self.upstream:
            # (Passed up, it may come from there: its reply then never passes
            # here, and the tracking would stay.)
            self._track(ls, m.reply, m.subject)

    def route_to_group(self, m: fr.Msg, queue: str) -> bool:
        """Send ``m`` to a member of queue group ``queue`` among those that want
        its subject now, picked as for any message (:meth:`hand_to` across a
        link); False if there is none."""
        route = self._routes.get(m.subject)
        if route is None:
            route = self._compute_route(m.subject)
        for q, cands in route[2]:
            if q == queue:
                pick = cands[0] if len(cands) == 1 else self._pick(cands, q)
                if isinstance(pick, LinkState):
                    self.hand_to(pick, m, q)
                else:
                    pick.deliver(m)
                return True
        return False

    def closed_status(self, reply: str, kind: str, why: str) -> None:
        """Tell the requester waiting on ``reply`` that nobody will answer: a
        ``closed`` status, which its ``request()`` raises as ``kind``
        (``ConnectionClosed`` or ``WorkerCrashed``) saying ``why``."""
        headers = {STATUS_HEADER: "closed", ERROR_TYPE_HEADER: kind, ERROR_MSG_HEADER: why}
        self._route(fr.Msg(reply, headers=headers), None, None)

    def _others_may_answer(self, reply: str, m: fr.Msg, origin: LinkState) -> bool:
        """Whether to hold back ``m``, a no-responders status for ``reply`` from ``origin``.

        A request that went out on several links (plain subscribers on one,
        a queue group on another...) gets "no responders" from a link whose
        subscriber left while the request travelled; another link may still
        answer.  Only the last such status goes on (as with links that close).
        """
        assert m.headers is not None
        if m.headers.get(STATUS_HEADER) != "no-responders":
            return False
        waiting = self._reply_routes.get(reply)
        if waiting is None or origin not in waiting:
            return False
        if len(waiting) == 1 and reply not in self._heard_here:
            return False
        # (Subscriptions here took the request too: they may answer; if none
        # does, the requester times out, as with any subscriber that does not.)
        waiting.discard(origin)  # an empty set stays until forget_reply()
        origin.inflight.pop(reply, None)
        return True

    def _too_large_reply(self, reply: str, what: str, size: int, limit: int) -> None:
        """Answer ``reply`` with a FrameTooLarge error: a request or reply of ``size``
        bytes could not go on, over a link whose peer takes at most ``limit``."""
        error = f"the {what} ({size} bytes) is over the {limit}-byte max_frame a link's peer announced"
        headers = {ERROR_TYPE_HEADER: "FrameTooLarge", ERROR_MSG_HEADER: error}
        with contextlib.suppress(ConnectionClosed, FrameTooLarge):
            self._route(fr.Msg(reply, headers=headers), None, None)

    def _no_responders(self, m: fr.Msg) -> None:
        assert m.reply is not None
        if m.headers and STATUS_HEADER in m.headers:
            return  # never answer a status with a status
        self._route(fr.Msg(m.reply, headers={STATUS_HEADER: "no-responders"}), None, None)

    def _on_control(self, frame: fr.Frame, ls: LinkState) -> None:
        t = type(frame)
        if t is fr.Sub:
            assert isinstance(frame, fr.Sub)
            self._remote_sub(ls, (frame.subject, frame.queue))
        elif t is fr.Unsub:
            assert isinstance(frame, fr.Unsub)
            self._remote_unsub(ls, (frame.subject, frame.queue))
        elif t is fr.Ping:
            assert isinstance(frame, fr.Ping)
            # A pong acknowledges everything the peer sent before its ping (a
            # client's flush()).  A closing node may no longer pass on what it
            # takes in (its other links may be closed already): it answers
            # none, and the peer's flush fails as the link closes.
            if not self._closed:
                ls.send_control(_encode(fr.Pong(frame.token)))
        elif t is fr.Pong:
            assert isinstance(frame, fr.Pong)
            fut = ls.pongs.pop(frame.token, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif t is fr.Notice:
            assert isinstance(frame, fr.Notice)
            if frame.code == "gave_up":
                # Requests made below ls that their requesters gave up on: a
                # node that passed them on forgets them (and tells the links
                # it passed them to).  Only the link toward a reply subject's
                # node may give up on it.
                for reply in frame.subjects:
                    nid = self._inbox_node(reply)
                    if nid is not None and self._inbox_links.get(nid) is ls and reply in self._reply_routes:
                        self.forget_reply(reply)
                return
            ls.notices.append(frame)
            if frame.code == "slow_consumer":
                # Each subscription is told of the messages on its subjects; a
                # peer that sent no per-subject counts leaves only the total.
                # Messages on subjects past the 64 listed (or all of them, from
                # a peer that sends no counts) count for every subscription
                # the notice concerns: it may have lost them.
                per = len(frame.counts) == len(frame.subjects)
                rest = max(frame.count - sum(frame.counts) if per else frame.count, 0)
                lost: dict[SubscriptionCore, int] = {}
                onward: dict[LinkState, dict[str, int]] = {}  # links below that wanted them
                for i, s in enumerate(frame.subjects):
                    n = frame.counts[i] if per else 0
                    for sub in self._local.match(s):
                        lost[sub] = lost.get(sub, 0) + n
                    for other in {o for o, _ in self._remote.match(s)}:  # a link once, whatever its keys
                        if other is not ls:
                            counts = onward.setdefault(other, {})
                            counts[s] = counts.get(s, 0) + n
                for sub, n in lost.items():
                    if sub is not self.inbox and n + rest > 0:
                        sub.note_remote_drop(n + rest)
                for other, counts in onward.items():
                    self._pass_drops_on(other, counts, rest)
                self.dropped += frame.count
            elif frame.code == "protocol_error":
                log.warning("peer %s reports a protocol error: %s", ls.name, frame.message)
            if ls.on_notice is not None:
                ls.on_notice(frame)
        elif t is fr.Hello:
            raise ProtocolError("unexpected second hello on an established link")

    # -- publishing ----------------------------------------------------------

    def publish_plain(self, subject: str, payload: bytes) -> list[Link] | None:
        """The hot path of publishing: a plain message to a subject whose route is cached.

        Routes without awaiting and returns the links now above their
        high-water mark (the caller waits on them: backpressure), or ``None``
        when the message needs the general path (queue groups, an inbox
        subject, a frame that may be too large, a closed node).  Replies to
        inboxes never enter the route cache; they have their own fast path.
        """
        if self._closed:
            return None
        route = self._routes.get(subject)
        if route is None:
            if subject.startswith("_INBOX."):
                return None
            route = self._compute_route(subject)
        subs, links, groups = route
        n = len(payload)
        if groups or n + 4 * len(subject) + 64 > self._send_bound:
            return None
        self.bytes_out += n
        if subs:
            m = _MsgFrame(subject, None, None, payload)
            for sub in subs:
                sub.deliver(m)
        if not links:
            return _NO_LINKS
        # The frame without encoding a Msg: the subject's cached head, then the
        # payload.  A large payload goes to each link as a second part, never
        # copied into a frame of its own (frames.msg_head).
        head = self._heads.get(subject)
        if head is None:
            head = self._plain_head(subject)
        large = n >= _LARGE_PAYLOAD
        head += _bin_header(n)
        frame = b"" if large else head + payload
        full: list[Link] | None = None
        for ls in links:
            link = ls.link
            if ls.dropped_unreported:
                # The drop notice goes first; a local publisher is never
                # dropped (forwarded=False): it waits, below.
                if not self._forward(ls, frame or head + payload, subject, False):
                    continue
            else:
                try:
                    if large:
                        link.send_parts(head, payload)
                    else:
                        link.send_nowait(frame)
                except ConnectionClosed:
                    self._unroute(ls)
                    continue
                self.msgs_out += 1
            if link.pending_out > link.high_water:
                if full is None:
                    full = []
                full.append(link)
        return _NO_LINKS if full is None else full

    def _plain_head(self, subject: str) -> bytes:
        """The start of a plain message's frame on ``subject``, up to the payload's size."""
        head = fr.msg_head(subject, None, None, 0)[:-2]  # less the 2-byte bin 8 header
        if len(self._heads) >= _FAST_CACHE:
            self._heads.clear()
        self._heads[subject] = head
        return head

    def _check_peers_take(self, size: int, route: _Route, subject: str) -> None:
        """Raise FrameTooLarge if a link this message would go out on takes no
        frame of ``size`` bytes (its peer announced a smaller max_frame)."""
        if self._send_bound >= size:
            return
        links: list[LinkState] = list(route[1])
        for _, cands in route[2]:
            # A queue group needs one member that takes it (_route picks among those).
            if not any(_takes(c, size) for c in cands):
                links.extend(c for c in cands if isinstance(c, LinkState))
        nid = self._inbox_node(subject)
        if nid is not None and (target := self._inbox_links.get(nid)) is not None:
            links.append(target)
        for ls in links:
            if size > ls.send_max:
                raise FrameTooLarge(
                    size,
                    ls.send_max,
                    f"message for link {ls.name} (a limit its peer announced)",
                )

    def publish_nowait(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Route a message published here without waiting; returns destinations reached."""
        if self._closed:
            raise BusClosed("bus is closed")
        m = fr.Msg(subject, reply, headers, payload)
        # Cheap upper bound first (a character is at most 4 bytes in UTF-8; 64 for
        # the envelope); encode to measure exactly only when it might not fit.
        bound = len(payload) + 4 * len(subject) + 64
        if reply is not None:
            bound += 4 * len(reply)
        if headers:
            bound += sum(4 * (len(k) + len(v)) + 10 for k, v in headers.items())
        route = self._routes.get(subject)
        if route is None:
            if self._inbox_node(subject) is not None:
                route = _NO_ROUTE  # a reply: routed by its node id alone (see _route)
            else:
                # One-off reply subjects stay out of the route cache (as publish_plain).
                route = self._compute_route(subject, cache=not subject.startswith("_INBOX."))
        if route[2]:  # a queue group's member across a link gets the group's name too
            bound += 4 * max(len(q) for q, _ in route[2]) + 8
        if bound > self._send_bound:
            if route[2]:
                # A queue group's member across a link gets the frame with the
                # group's name in it: measure the largest of those (rare: near the limit).
                longest = max((q for q, _ in route[2]), key=lambda q: len(q.encode()))
                size = len(_encode(fr.Msg(subject, reply, headers, payload, (longest,))))
            else:
                size = len(_encode(m))
            if size > self.max_frame:
                raise FrameTooLarge(size, self.max_frame, "message")
            self._check_peers_take(size, route, subject)
        self.bytes_out += len(payload)
        return self._route(m, None, None)

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Route a message published here; wait while a link it went out on is above high water."""
        full = self.publish_plain(subject, payload) if reply is None and headers is None else None
        if full is None:
            full = self.publish_now(subject, payload, reply=reply, headers=headers)
        if full:
            await wait_writable(full)

    def publish_now(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> list[Link]:
        """Route a message now; return the links it left on that are above high water.

        The caller waits on those (:func:`wait_writable`) for backpressure.
        A request or a reply is urgent: someone waits on it, so it is handed
        to the kernel at once (at most one eager write per link and loop
        iteration, see ``Link.flush_now``) rather than with the next batch.
        """
        if headers is not None and reply is not None and self._spinner is not None:
            self._spinner.kick()  # a request: its answer comes soon (_request_fast kicks too)
        if headers is None:
            # Most requests go to one service across one link, most replies
            # straight to the link of the requester's node: one step each.
            if reply is not None:
                fast = self._request_fast(subject, payload, reply)  # (tracked: _track stamps it due)
            else:
                fast = self._reply_fast(subject, payload)
            if fast is not None:
                return fast
        sent: list[LinkState] = []
        outer, self._sent_to = self._sent_to, sent  # a service answering inline nests
        try:
            self.publish_nowait(subject, payload, reply=reply, headers=headers)
        finally:
            self._sent_to = outer
        if not sent:
            return []
        urgent = reply is not None or subject.startswith("_INBOX.")
        full: list[Link] = []
        for ls in sent:
            link = ls.link
            if urgent:
                link.flush_now()
            if link.pending_out > link.high_water:
                full.append(link)
        return full

    def send_request(
        self,
        subject: str,
        payload: bytes,
        reply: str,
        headers: dict[str, str] | None,
        *,
        fast: bool = True,
    ) -> list[Link]:
        """Send a request made here, its replies to come on ``reply``.

        Returns the links above high water (as :meth:`publish_now`).  With
        nobody known here to answer, it goes to :attr:`upstream` (the root of
        the tree knows for sure: a service that subscribed a moment ago
        reached it first); with no upstream either, raises
        :class:`~ipcbus.errors.NoResponders` before sending anything.
        ``fast=False``: the caller tried the one-step path (:meth:`_send_fast`,
        which kicked the spinner) and it declined.
        """
        if headers is not None:
            if self._spinner is not None:
                self._spinner.kick()  # its answer comes soon
        elif fast:
            sent = self._request_fast(subject, payload, reply)  # (kicks the spinner)
            if sent is not None:
                return sent
        route = self._routes.get(subject)
        if route is None:
            route = self._compute_route(subject)
        subs, plain, groups = route
        if not (subs or plain or groups):
            up = self.request_upstream(subject, payload, reply, headers)
            if up is None:
                raise NoResponders(subject)
            return up
        full = self.publish_now(subject, payload, reply=reply, headers=headers)
        if (
            subs
            and not plain
            and not groups
            and self.upstream is not None
            and not any(s.serving for s in subs)
        ):
            # Only listeners of this process wanted it (a logger, a `>`
            # monitor), no service: a service elsewhere that subscribed a
            # moment ago is not known here yet, and the root knows for sure.
            # It picks the queue groups; none is here, so none gets it twice.
            up = self.request_upstream(subject, payload, reply, headers)  # FrameTooLarge: raised
            if up is not None:
                self._heard_here.add(reply)
                full = [*full, *up]
        return full

    def reply_now(self, reply: str, payload: bytes) -> list[Link]:
        """Send a reply (no headers) to ``reply``; return the links above high water.

        :meth:`publish_now`, straight to the link of the requester's node when it can.
        """
        full = self._reply_fast(reply, payload)
        return self.publish_now(reply, payload) if full is None else full

    def _request_fast(self, subject: str, payload: bytes, reply: str) -> list[Link] | None:
        """:meth:`publish_now` for a request to one service (queue group) across one link.

        ``None`` when the request needs the general path (see
        :meth:`_send_fast`); else the links above high water.
        """
        ls = self._send_fast(subject, payload, reply, False)
        if ls is None:
            return None
        if ls is True:
            return _NO_LINKS
        link = ls.link
        return [link] if link.pending_out > link.high_water else _NO_LINKS

    def _send_fast(
        self, subject: str, payload: bytes, reply: str, own: bool
    ) -> LinkState | Literal[True] | None:
        """Send a request to one service (queue group) across one link, in one step.

        Returns the link it went out on, ``True`` when it needs no more (a
        member in this process took it, or the link broke under the write and
        the request was answered with a ``closed`` status), or ``None`` when
        the request needs the general path (other routes, a frame that may be
        too large).  Decided before picking a member: a pick counts for the
        round robin, so the general path must not pick again.  Kicks the
        spinner in any case: an answer comes soon.

        ``own``: a request of :meth:`Bus.request <ipcbus.client.Bus.request>`,
        whose reply subject is fresh and whose caller ends it
        (:meth:`forget_own`).  It is tracked on its link only
        (``LinkState.inflight``, which its reply clears), not in the reply
        routes a reply subject used again or a request passed on needs.
        """
        spinner = self._spinner
        if spinner is not None:
            if spinner._active:  # (Spinner.kick, inlined: while polling it only counts)
                spinner._kicks += 1
            else:
                spinner.kick()
        route = self._routes.get(subject)
        if route is None or route[0] or route[1] or len(route[2]) != 1 or self._closed:
            return None
        n = len(payload)
        q, cands = route[2][0]
        bound = self._send_bound
        if n > bound - _ROOM and n + 4 * (len(subject) + len(reply) + len(q)) + 64 > bound:
            return None
        pick = cands[0] if len(cands) == 1 else self._pick(cands, q)
        if not isinstance(pick, LinkState):  # a member in this process (as _route)
            self.bytes_out += n
            pick.deliver(_MsgFrame(subject, reply, None, payload))
            return True
        try:
            if pick.dropped_unreported:
                self._send_drop_notice(pick)
            pick.link.send_now(_encode(_MsgFrame(subject, reply, None, payload, (q,))))
        except FrameTooLarge:
            return None  # the general path reports it
        except ConnectionClosed:
            # The responder's link broke under this very write (its reader is gone).
            self._unroute(pick)
            self._unsendable(_MsgFrame(subject, reply, None, payload), (pick,))
            return True
        self.msgs_out += 1
        self.bytes_out += n
        if own:
            inflight = pick.inflight
            inflight[reply] = subject
            if len(inflight) > _INFLIGHT_CAP:
                self._forget_oldest(pick)
        else:
            self._track(pick, reply, subject)
        return pick

    def _request_sent(self, ls: LinkState, n: int, reply: str, subject: str) -> list[Link]:
        """Count a request of ``n`` payload bytes written to ``ls``, track its reply;
        return ``[ls.link]`` if that link is now above high water."""
        self.msgs_out += 1
        self.bytes_out += n
        self._track(ls, reply, subject)
        link = ls.link
        return [link] if link.pending_out > link.high_water else []

    def request_upstream(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, str] | None
    ) -> list[Link] | None:
        """Send a request with no known responder to :attr:`upstream`, which may know one.

        Returns the links above high water (as :meth:`publish_now`), or
        ``None`` when there is no open upstream link: then nobody can answer.
        """
        ls = self.upstream
        if ls is None or ls.closed.is_set() or self._closed:
            return None
        # _ANY_GROUP: we know no member of any queue group; the root picks them.
        frame = _encode(_MsgFrame(subject, reply, headers, payload, _ANY_GROUP))
        if len(frame) > ls.send_max:
            what = f"request for link {ls.name} (a limit its peer announced)"
            raise FrameTooLarge(len(frame), ls.send_max, what)
        if self._spinner is not None:
            self._spinner.kick()
        ls.link.send_now(frame)
        return self._request_sent(ls, len(payload), reply, subject)

    def _reply_fast(self, reply: str, payload: bytes) -> list[Link] | None:
        """:meth:`publish_now` for a reply, straight to the link of the requester's node.

        ``None`` when it needs the general path (not a remote inbox, a reply
        this node forwarded a request for, a frame that may be too large).
        """
        nid = self._inbox_node(reply)
        if nid is None or self._closed or reply in self._reply_routes:
            return None
        ls = self._inbox_links.get(nid)
        n = len(payload)
        if ls is None or nid == self.node_id:
            return None  # (our own inbox: delivered here, whoever else subscribed to it)
        bound = self._send_bound
        if n > bound - _ROOM and n + 4 * len(reply) + 64 > bound:
            return None
        link = ls.link
        try:
            if ls.dropped_unreported:
                self._send_drop_notice(ls)
            if n >= _LARGE_PAYLOAD:  # a large result: no frame of its own (frames.msg_head)
                link.send_parts(fr.msg_head(reply, None, None, n), payload)
                link.flush_now()
            else:
                link.send_now(_encode(_MsgFrame(reply, None, None, payload)))
        except (ConnectionClosed, FrameTooLarge):
            return None
        self.msgs_out += 1
        self.bytes_out += n
        return [link] if link.pending_out > link.high_water else []

    @property
    def spinner(self) -> Spinner | None:
        """The node's busy-poller (:mod:`ipcbus.spin`), or ``None`` when spinning is off."""
        return self._spinner

    def _awaiting_replies(self) -> bool:
        """Whether replies are due: requests made here in flight, or passed on lately.

        A request passed on (a hub) stays tracked until its reply comes, and
        forever if its responder hangs; only the last ``_DUE_NS`` count.
        """
        return bool(self.inbox.futures) or (
            bool(self._reply_routes) and time.monotonic_ns() - self._tracked_at < _DUE_NS
        )

    def new_reply_subject(self) -> tuple[str, str]:
        """A fresh (token, reply subject) in this node's inbox."""
        token = format(next(self._tokens), "x")
        return token, self._reply_prefix + token

    def release(self, ls: LinkState) -> None:
        """Route messages to ``ls`` from now on (added with ``held=True``), and
        pass on the interest it announced meanwhile."""
        if not ls.held:
            return
        ls.held = False
        self._interest_changed()
        keys, ls.held_keys = ls.held_keys, set()
        for key in keys:
            self._remote.add(key[0], (ls, key[1]))
            self._bump(key, 1, ls)

    def forget_reply(self, reply: str, *, requester_gone: bool = False) -> None:
        """The requester is done with ``reply`` (answered, timed out, cancelled).

        A reply that arrived already removed its tracking; one that has not
        stops counting as in flight on the link it went out on (a pool's
        shutdown waits for those).  Its responder may still be working on it
        (a request that timed out because it is slow): until its late reply
        comes back, for :data:`_ABANDONED_TTL` at most, it still counts in
        that link's load, so that queue-group picks leave a stuck responder
        alone.  Not when the requester is gone (``requester_gone``): its late
        reply is dropped on the way and would never clear it.
        """
        routes = self._reply_routes.pop(reply, None)
        if routes:
            for ls in routes:
                self._give_up(ls, reply, requester_gone)
        if self._heard_here:
            self._heard_here.discard(reply)

    def forget_own(self, ls: LinkState, reply: str) -> None:
        """As :meth:`forget_reply`, for a request :meth:`_send_fast` sent on ``ls``
        for :meth:`Bus.request <ipcbus.client.Bus.request>` (tracked there only)."""
        self._give_up(ls, reply, False)

    def _give_up(self, ls: LinkState, reply: str, requester_gone: bool) -> None:
        """The request on ``reply`` that went out on ``ls`` is over without its reply."""
        if ls.inflight.pop(reply, None) is None:
            return
        if not requester_gone:
            given_up = ls.abandoned
            given_up[reply] = time.monotonic()
            if len(given_up) > _ABANDONED_CAP:
                del given_up[next(iter(given_up))]
        # The peer may have passed it on (a hub) and track it too.
        if not ls.closed.is_set():
            if not self._given_up:
                assert self.loop is not None
                self.loop.call_soon(self._send_given_up)
            self._given_up.setdefault(ls, []).append(reply)

    def _send_given_up(self) -> None:
        """Tell each link of the requests sent on it that were given up on this
        turn (``gave_up`` notices): a node that passed them on, a hub, would
        otherwise keep each one until its link closes (up to 65,536 per link)."""
        given_up, self._given_up = self._given_up, {}
        for ls, replies in given_up.items():
            if ls.closed.is_set():
                continue
            # As many as fit in the smallest frame a peer may announce (1 KiB).
            per = max(1, min(_GIVEN_UP_BATCH, (ls.send_max - 64) // (max(map(len, replies)) + 4)))
            for i in range(0, len(replies), per):
                notice = fr.Notice("gave_up", subjects=tuple(replies[i : i + per]))
                with contextlib.suppress(ConnectionClosed, FrameTooLarge):
                    ls.send_control(_encode(notice))

    async def flush(self, timeout: float | None = 10.0) -> None:
        """Wait until every link's peer has processed everything sent so far.

        Links that break meanwhile are skipped (see :meth:`ping` to be told);
        raises ``TimeoutError`` if a live peer does not answer in time.
        """
        results = await asyncio.gather(
            *(self.ping(ls, timeout) for ls in list(self.links) if not ls.closed.is_set()),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, TimeoutError):
                raise r

    async def ping(self, ls: LinkState, timeout: float | None = 10.0) -> None:
        """Wait until the peer of one link has processed everything sent on it so far.

        Unlike :meth:`flush`, which skips links that break, this raises
        :class:`ConnectionClosed` when the link breaks (or is dropped) before
        the peer answers: what was sent may then not have arrived.
        """
        if ls.closed.is_set():
            raise ConnectionClosed(f"link {ls.name} is closed: {ls.close_reason}")
        token, fut = self.send_ping(ls)
        try:
            with anyio.fail_after(timeout):
                await fut  # _drop_link fails it with ConnectionClosed
        finally:
            ls.pongs.pop(token, None)

    def send_ping(self, ls: LinkState) -> tuple[int, asyncio.Future[None]]:
        """Send a ping on ``ls``; return its token and the future its pong resolves.

        The caller waits as it likes and then removes the token from
        ``ls.pongs`` (:meth:`ping` is the usual way).
        """
        token = next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ls.pongs[token] = fut
        try:
            ls.send_control(_encode(fr.Ping(token)))
        except BaseException:
            del ls.pongs[token]
            raise
        return token, fut

    # -- introspection -------------------------------------------------------

    def stats(self) -> NodeStats:
        """Counters for the node and each link."""
        subs = list(self._subs.values())
        return {
            "node_id": self.node_id,
            "name": self.name,
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "spin_us": self.spin_us,
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "pending": sum(len(s.pending) for s in subs),
            "dropped": self.dropped,
            "subscriptions": [
                {
                    "sid": s.sid,
                    "subject": s.subject,
                    "queue": s.queue,
                    "pending": len(s.pending),
                    "delivered": s.delivered,
                    "dropped": s.dropped_total,
                }
                for s in subs
            ],
            "links": [ls.stats() for ls in self.links],
        }


def _decode_large(view: memoryview) -> fr.Msg | None:
    """Link.decode_large: a Msg decoded where it lies, or None (the link sends its bytes)."""
    try:
        frame = fr.frame_decoder.decode(view)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
    return frame if type(frame) is _MsgFrame else None


async def wait_writable(links: list[Link]) -> None:
    """Backpressure: wait until each link is back under its low-water mark (a broken one is skipped)."""
    for link in links:
        with contextlib.suppress(ConnectionClosed):
            await link.wait_writable()


def _only_listens(ls: LinkState, subject: str) -> bool:
    """Whether ``ls`` wants ``subject`` only through a catch-all ``>`` subscription.

    Such a subscriber (a monitor: ``ipcbus sub '>'``) gets every request but
    answers none, so it does not keep a request whose responder's link
    closed waiting for its timeout.  Any other pattern matching ``subject``
    (``svc.>``, a queue group) may be a service's.
    """
    keys = ls.remote_keys
    return _CATCH_ALL in keys and not any(
        key != _CATCH_ALL and matches(key[0], subject) for key in keys
    )


def _takes(member: SubscriptionCore | LinkState, size: int) -> bool:
    """Whether a queue-group member can be sent a frame of ``size`` bytes."""
    return not isinstance(member, LinkState) or member.send_max >= size


_T = TypeVar("_T")
_CATCH_ALL: Final = (">", None)
_NODE_ID = re.compile(r"[^\s.*>]{1,64}\Z")


async def say_goodbye(links: Sequence[Link], why: str) -> None:
    """Tell each link's peer this side is closing (a ``shutdown`` notice), then
    close them all at once: each close may wait (up to its flush timeout) for
    a peer that stopped reading, and the others must not wait behind it.  A
    failure to send or close is not the closer's problem (gone either way)."""
    for link in links:
        with contextlib.suppress(Exception):
            link.send_nowait(_encode(fr.Notice("shutdown", why)))

    async def close(link: Link) -> None:
        with contextlib.suppress(Exception):
            await link.aclose()

    async with anyio.create_task_group() as tg:
        for link in links:
            tg.start_soon(close, link)


async def shielded(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end, in a task of its own, even if the caller is cancelled.

    For clean-up that must not stop half-way (links closed, kernel objects
    removed, waiting requests failed).  ``anyio.CancelScope(shield=True)``
    only holds off anyio's cancellations; asyncio's own (``task.cancel()``,
    ``asyncio.timeout``, a ``TaskGroup`` failing) pass through it.  Here a
    cancellation of the caller is held back until ``aw`` has ended, then
    raised.  ``aw`` must not wait for the caller itself.
    """
    task = asyncio.ensure_future(aw)
    cancelled: asyncio.CancelledError | None = None
    # anyio re-delivers its cancellation on every loop turn to a task in a
    # cancelled scope: its shield keeps those off (else this would spin).
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.done():  # the task itself was cancelled (the loop is shutting down)
                    raise
                cancelled = exc
                continue
            break
    if cancelled is not None:
        raise cancelled
    # An anyio scope cancelled meanwhile (a deadline passed) delivers its
    # cancellation here, as at any checkpoint, instead of being lost.
    await anyio.lowlevel.checkpoint_if_cancelled()
    return result


async def first_of(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(ev: asyncio.Event) -> None:
            await ev.wait()
            tg.cancel_scope.cancel()

        for ev in events:
            tg.start_soon(wait, ev)
