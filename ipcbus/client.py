"""The client API: :class:`Bus`, :class:`Subscription`, :class:`Msg`, :class:`Service`.

A :class:`Bus` is a handle on this process's node.  Payloads are the user's
values encoded once with msgspec (MessagePack); ``bytes`` are sent as they
are.  Nothing here knows about transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar, overload

import anyio
import anyio.abc
import msgspec

from . import frames as fr
from .checks import check_count
from .errors import (
    BusClosed,
    ConnectionClosed,
    DecodeError,
    EncodeError,
    FrameTooLarge,
    IpcBusError,
    NoResponders,
    RemoteError,
    WorkerCrashed,
)
from .node import (
    DEFAULT_MAX_PENDING,
    DEFAULT_PENDING_BYTES,
    ERROR_MSG_HEADER,
    ERROR_TYPE_HEADER,
    STATUS_HEADER,
    LinkState,
    Node,
    Overflow,
    SubscriptionCore,
    wait_writable,
)
from .stats import NodeStats
from .subjects import _valid_subjects, validate_name, validate_subject

if TYPE_CHECKING:  # for type checkers only: no runtime dependency
    from typing_extensions import TypeForm
from .transports.base import Link

__all__ = ["Bus", "Msg", "Service", "Subscription", "encode_payload"]

T = TypeVar("T")
log = logging.getLogger("ipcbus.client")

_encoder = msgspec.msgpack.Encoder()


def encode_payload(data: Any) -> bytes:
    """Encode a payload: bytes-like as is, anything else with msgspec MessagePack."""
    if type(data) is bytes:
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, Msg):  # (a struct msgspec would encode, bus and all)
        raise EncodeError(
            "cannot encode a payload of type Msg: pass msg.data to send its payload on, "
            "or msg.decode() to send its value"
        )
    try:
        return _encoder.encode(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(
            f"cannot encode a payload of type {type(data).__name__}: {exc}; pass bytes, "
            "a msgspec.Struct, or built-in types msgspec can encode"
        ) from None


async def _writable_or_done(links: list[Link], fut: asyncio.Future[Any]) -> None:
    """A request's backpressure: wait until ``links`` are writable again, unless the
    request is over first (answered, timed out, its link closed)."""
    writable = asyncio.ensure_future(wait_writable(links))
    try:
        await asyncio.wait((writable, fut), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not writable.done():
            writable.cancel()
    if writable.done() and not writable.cancelled():
        exc = writable.exception()  # retrieved either way: no "never retrieved" warning
        if exc is not None and not fut.done():
            raise exc  # the link broke: ConnectionClosed


def _check_headers(headers: Any) -> None:
    """Headers are a ``dict[str, str]``; refuse anything else before it reaches the wire."""
    if not isinstance(headers, dict) or not all(
        type(k) is str and type(v) is str for k, v in headers.items()
    ):
        raise EncodeError(
            f"headers must be a dict of str to str, not {headers!r}; convert the values to str"
        )
    for k, v in headers.items():
        if not (k.isascii() and v.isascii()):
            for text in (k, v):
                try:
                    text.encode()
                except UnicodeEncodeError as exc:
                    raise EncodeError(
                        f"header {k!r}: {text!r} cannot be encoded as UTF-8 ({exc.reason}, "
                        "a lone surrogate?); pass valid text"
                    ) from None


_INF: Final = float("inf")

# The service whose handler runs in this task, or in a task it started (tasks
# inherit their creator's context): drain() or aclose() called from there
# cannot wait for that handler (see Bus._from_own_handler).
_SERVING: contextvars.ContextVar[Service | None] = contextvars.ContextVar("ipcbus_serving", default=None)


def serving_node() -> Node | None:
    """The node whose service handler the running task runs, if any.

    Closing that node from there would wait for the handler itself (the
    node's task group holds it): a closer asked from a handler closes in the
    background instead (:meth:`Bus.aclose`, :meth:`ipcbus.Hub.aclose`).
    """
    serving = _SERVING.get()
    return None if serving is None else serving._bus._node


_YIELD_MASK: Final = 1023  # Bus.publish yields at least every 1024 calls
ASKER_WAIT: Final = 5.0
"""Seconds a close asked for from a handler waits for that handler to finish."""


async def _logged(work: Awaitable[None]) -> None:
    """Await a close started in the background; log a failure (nobody awaits it)."""
    try:
        await work
    except Exception:
        log.exception("closing the bus in the background failed")


def _timeout_or_none(timeout: Any) -> float | None:
    """A timeout argument checked: seconds as a float, ``None`` for none (also for infinity).

    Raises ``TypeError`` for something that is not a number and ``ValueError``
    for NaN; a negative timeout is already over.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds or None, not NaN")
    return None if timeout == _INF else float(timeout)


_DRAIN_FLUSH: Final = 5.0  # seconds a draining service waits for its peers to know


# A struct, not a class with __slots__: one is made per message received and
# per reply, and a struct is made in a third of the time.  eq=False: messages
# compare (and hash) by identity, as they always did.
class Msg(msgspec.Struct, eq=False):
    """A received message: ``subject``, ``data`` (bytes), ``reply``, ``headers``.

    Made by the bus; ``Msg(subject, data, reply, headers, bus=None)`` makes
    one for a handler's unit test (it has no bus to :meth:`respond` on).
    """

    subject: str
    data: bytes
    reply: str | None
    headers: dict[str, str] | None
    bus: Bus | None
    """The bus it came on (:meth:`respond` publishes there); ``None`` when made outside one."""

    @overload
    def decode(self) -> Any: ...
    @overload
    def decode(self, type: type[T]) -> T: ...
    @overload
    def decode(self, type: TypeForm[T]) -> T: ...  # unions, Optional, Literal, list[X], ...
    def decode(self, type: Any = Any) -> Any:
        """Decode the payload (MessagePack) and validate it into ``type``.

        ``type`` is anything msgspec validates into: a class, a
        ``msgspec.Struct``, ``int | None``, a tagged union, ``Literal[...]``.
        ``bytes`` (or ``bytearray``, ``memoryview``) gives the payload itself:
        bytes are sent as they are, never encoded (see :meth:`Bus.publish`).
        Raises :class:`~ipcbus.errors.DecodeError` (a ``ValueError``) if the
        payload does not decode or does not match ``type``.
        """
        try:
            return _decode(self.data, type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(
                f"payload on {self.subject!r} does not decode as {_type_name(type)}: {exc}"
            ) from None

    async def respond(self, data: Any = b"", *, headers: dict[str, str] | None = None) -> None:
        """Publish ``data`` to this message's reply subject."""
        if self.reply is None:
            raise ValueError(f"message on {self.subject!r} has no reply subject to respond to")
        if self.bus is None:
            raise BusClosed("message is not attached to a bus")
        await self.bus.publish(self.reply, data, headers=headers)

    def __repr__(self) -> str:
        return f"<Msg {self.subject!r} {len(self.data)} B reply={self.reply!r}>"


class Subscription:
    """A subscription: an async iterator of :class:`Msg` and an async context manager.

    When messages arrive faster than they are read, at most ``max_pending``
    wait here; beyond that the overflow policy drops (``drop_new`` keeps the
    oldest, ``drop_old`` the newest), counts the loss in ``stats()`` and
    raises :class:`~ipcbus.errors.SlowConsumer` from the next read.  Reading
    again continues with the messages that were kept.
    """

    def __init__(self, bus: Bus, core: SubscriptionCore) -> None:
        self._bus = bus
        self._core = core

    @property
    def subject(self) -> str:
        """The subscribed pattern."""
        return self._core.subject

    @property
    def queue(self) -> str | None:
        """The queue group, if any."""
        return self._core.queue

    @property
    def pending(self) -> int:
        """Messages received and not yet read."""
        return len(self._core.pending)

    @property
    def dropped(self) -> int:
        """Messages dropped for this subscription since it started."""
        return self._core.dropped_total

    def _wrap(self, m: fr.Msg) -> Msg:
        return Msg(m.subject, m.payload, m.reply, m.headers, self._bus)

    async def next(self, timeout: float | None = None) -> Msg:
        """The next message; ``TimeoutError`` after ``timeout`` seconds.

        Cancel-safe: a cancelled or timed-out ``next()`` takes no message, so
        none is lost or duplicated.  Raises :class:`~ipcbus.errors.SlowConsumer`
        once after messages for this subscription were dropped (reading again
        goes on with those kept), and :class:`~ipcbus.errors.BusClosed` once
        the subscription is closed and drained.
        """
        timeout = _timeout_or_none(timeout)
        if timeout is None:
            m = await self._core.get()
        else:
            try:
                async with asyncio.timeout(timeout):
                    m = await self._core.get()
            except TimeoutError:
                raise TimeoutError(f"no message on {self.subject!r} within {timeout:g} s") from None
        if m is None:
            raise BusClosed(f"subscription to {self.subject!r} is closed{self._bus._why_closed()}")
        return self._wrap(m)

    def __aiter__(self) -> AsyncIterator[Msg]:
        return self

    async def __anext__(self) -> Msg:
        core = self._core
        if core.pending and not core.dropped:  # common case: no await, no extra call
            f = core.pending.popleft()
            core._pending_bytes -= len(f.payload)
            return Msg(f.subject, f.payload, f.reply, f.headers, self._bus)
        m = await core.get()
        if m is None:
            raise StopAsyncIteration
        return self._wrap(m)

    async def unsubscribe(self) -> None:
        """Stop receiving; messages already pending can still be read."""
        self._bus._node.unsubscribe(self._core)
        self._bus._subs.pop(self._core.sid, None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.unsubscribe()

    def __repr__(self) -> str:
        q = f" queue={self.queue!r}" if self.queue else ""
        return f"<Subscription {self.subject!r}{q} pending={self.pending}>"


Handler = Callable[..., Any]


class Service:
    """A running request handler created by :meth:`Bus.serve`.

    A handler takes the :class:`Msg`, or — when its first parameter is
    annotated with another type — the request decoded and validated into that
    type.  Its return value is the reply (bytes as is, anything else encoded
    with msgspec).  A handler that raises, a request that does not validate
    and a reply that cannot be encoded all go back to the requester as
    :class:`~ipcbus.errors.RemoteError`; the service keeps serving.
    """

    def __init__(
        self, bus: Bus, sub: Subscription, handler: Handler, concurrency: int, arg_type: Any = None
    ) -> None:
        self._bus = bus
        self.subscription = sub
        self.handler = handler
        self.handled = 0
        self.errors = 0
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004
        )
        self._arg_type = arg_type
        self._limiter = anyio.Semaphore(concurrency)
        self._done = anyio.Event()
        self._active = 0  # async handlers running
        self._idle: asyncio.Event | None = None  # created only while drain() waits
        self._peers_know: asyncio.Event | None = None  # set once drain()'s withdrawal is flushed
        self._finishing: set[asyncio.Task[None]] = set()
        # Async handlers running, each in a cancel scope of its own: cancelling
        # one task of an anyio task group outright would cancel the whole group.
        self._handling: dict[asyncio.Task[Any], anyio.CancelScope] = {}
        self._answering: set[asyncio.Task[Any]] = set()  # those of _handling with a requester
        self._stopped = False  # its bus closed: handlers still running were cancelled
        self._forget_when_idle = False  # drained from its own handler: let go once none runs
        sub._core.serving = True
        if not self._is_async:
            # A synchronous handler runs as its request is routed (in the read
            # callback of the link it came on): no queue, no task switch.
            sub._core.inline = self._handle_inline

    @property
    def subject(self) -> str:
        """The subject served."""
        return self.subscription.subject

    async def _run(self) -> None:
        try:
            core = self.subscription._core
            if not self._is_async:
                # Requests are answered as they are routed (_handle_inline): this
                # task only waits for the subscription to end.
                while True:
                    try:
                        f = await core.get()
                    except Exception as exc:  # SlowConsumer reported by a hub: keep serving
                        log.warning("service %r: %s", self.subject, exc)
                        continue
                    if f is None:
                        return
                    self._handle_inline(f)
            bus = self._bus
            async with anyio.create_task_group() as tg:
                while True:
                    if core.pending and not core.dropped:  # no await while requests wait
                        f = core.pending.popleft()
                        core._pending_bytes -= len(f.payload)
                        m = Msg(f.subject, f.payload, f.reply, f.headers, bus)
                    else:
                        try:
                            m = await self.subscription.next()
                        except BusClosed:
                            break
                        except Exception as exc:  # SlowConsumer: requests were lost; keep serving
                            log.warning("service %r: %s", self.subject, exc)
                            continue
                    await self._limiter.acquire()
                    if self._stopped:  # its bus closed while this one waited for a turn
                        self._limiter.release()
                        self._closed_status(m.reply)
                        continue
                    self._enter()
                    tg.start_soon(self._handle_async, m)
        finally:
            self._done.set()
            if self._forget_when_idle and not self._active:
                self._forget()

    def _handle_inline(self, f: fr.Msg) -> None:
        m = Msg(f.subject, f.payload, f.reply, f.headers, self._bus)
        try:
            result = self.handler(m if self._arg_type is None else self._arg(m))
        except (KeyboardInterrupt, SystemExit):
            raise  # the program is meant to stop
        except BaseException as exc:  # an Exception, or a BaseException of its own (CancelledError)
            # An answer, not a raise: this runs in the read callback of the
            # link, with the rest of the batch (other requests) still to route.
            self._error_now(m, exc)
            return
        if type(result) is not bytes and inspect.isawaitable(result):
            # A sync function that returned an awaitable: finish in a task.
            self._enter()
            task = asyncio.get_running_loop().create_task(self._finish(m, result))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
            return
        # Replies are queued even above the link's high-water mark: they are
        # bounded by the requests in flight, and a callback cannot wait.
        self._reply_now(m, result)

    async def _finish(self, m: Msg, pending: Awaitable[Any]) -> None:
        _SERVING.set(self)  # this task's own context: see Bus._from_own_handler
        try:
            await self._complete(m, lambda: pending)
        finally:
            self._leave()

    async def _handle_async(self, m: Msg) -> None:
        _SERVING.set(self)  # this task's own context (and its children's)
        task = asyncio.current_task()
        assert task is not None
        try:
            with anyio.CancelScope() as scope:
                self._handling[task] = scope
                if m.reply is not None:
                    self._answering.add(task)
                await self._complete(m, lambda: self.handler(self._arg(m)))
        finally:
            self._handling.pop(task, None)
            self._answering.discard(task)
            self._limiter.release()
            self._leave()

    async def _complete(self, m: Msg, call: Callable[[], Awaitable[Any]]) -> None:
        """Await the handler's result and send it (or its failure), with backpressure."""
        try:
            result = await call()
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                # Not this task being cancelled: the handler's own (it awaited a
                # future or task that someone cancelled).  Its requester gets
                # the error, as for any exception.
                full = self._error_now(m, exc)
            else:
                if self._stopped:  # tell the requester now, not at its timeout
                    self._closed_status(m.reply)
                raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a BaseException of the handler's own
            full = self._error_now(m, exc)
        else:
            full = self._reply_now(m, result)
        if full:
            await wait_writable(full)

    def _enter(self) -> None:
        self._active += 1

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            if self._idle is not None:
                self._idle.set()
            if self._forget_when_idle and self._done.is_set():
                self._forget()

    def _arg(self, m: Msg) -> Any:
        return m if self._arg_type is None else _decode(m.data, self._arg_type)

    def _reply_now(self, m: Msg, result: Any) -> list[Link]:
        """Send the handler's result; return links to wait on (backpressure)."""
        reply = m.reply
        if reply is None:
            self.handled += 1
            return []
        if type(result) is bytes:
            payload = result
        else:
            try:
                payload = encode_payload(result)
            except EncodeError as exc:
                return self._error_now(m, exc)
        node = self._bus._node
        try:
            # Most replies go straight to the link of the requester's node.
            full = node.reply_now(reply, payload)
        except FrameTooLarge as exc:  # the reply is over max_frame: tell the requester
            return self._error_now(m, exc)
        except ConnectionClosed:
            full = []
        self.handled += 1
        return full

    def _error_now(self, m: Msg, exc: BaseException) -> list[Link]:
        """Send the handler's failure as a RemoteError reply; return links to wait on."""
        self.errors += 1
        name = type(exc).__name__
        if isinstance(exc, msgspec.ValidationError | msgspec.DecodeError):
            name = "ValidationError"
        log.debug("service %r: handler raised %s: %s", self.subject, name, exc)
        if m.reply is None:
            log.warning("service %r: handler raised %s: %s", self.subject, name, exc)
            return []
        text = str(exc)[:4000]
        node = self._bus._node
        # The error text must fit in a frame too: on a bus with a small max_frame, cut it.
        limit = min(node.max_frame, node._send_bound)  # the requester's link may take less
        text = text[: max(0, (limit - 4 * len(m.reply) - 200) // 4)]
        headers = {ERROR_TYPE_HEADER: name, ERROR_MSG_HEADER: text}
        try:
            return node.publish_now(m.reply, b"", headers=headers)
        except ConnectionClosed:
            pass
        except FrameTooLarge:  # max_frame too small for even a short error: the requester times out
            log.warning("service %r: error reply does not fit in max_frame", self.subject)
        return []

    async def drain(self) -> None:
        """Stop taking requests and wait for the ones being handled.

        Called from one of this service's own handlers, it only stops taking
        requests (waiting would wait for that very handler).
        """
        node = self._bus._node
        core = self.subscription._core
        if self._peers_know is None and not core.closed and not node.closed:
            # Peers stop choosing this member first; what they sent before
            # they knew arrives before their answer to the flush, and is served.
            self._peers_know = asyncio.Event()
            node.withdraw(core)
            try:
                with contextlib.suppress(IpcBusError, TimeoutError):
                    await node.flush(_DRAIN_FLUSH)
            finally:
                self._peers_know.set()
        elif self._peers_know is not None:
            await self._peers_know.wait()  # another drain() is flushing: after it
        await self.subscription.unsubscribe()
        if _SERVING.get() is self:
            # Its bus must still cancel the handlers running (or still to
            # run: requests already queued) if it closes meanwhile: let go of
            # it once its subscription has ended and none runs (_run, _leave).
            self._forget_when_idle = True
            if self._done.is_set() and not self._active:
                self._forget()
            return
        await self._done.wait()
        while self._active:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()  # one event for every drain() waiting
            await self._idle.wait()
        self._forget()

    def _forget(self) -> None:
        """Stopped: its bus lets go of it (a bus serving a subject per session
        or job would otherwise keep every service it ever stopped)."""
        with contextlib.suppress(ValueError):
            self._bus._services.remove(self)

    async def stop(self) -> None:
        """Stop serving (requests already received are still answered)."""
        await self.drain()

    def _cancel(self, spare: asyncio.Task[Any] | None) -> None:
        """Its bus closed: cancel the handlers still running (except ``spare``,
        the one that closed the bus) and answer the requests still queued; their
        requesters get a ``closed`` status (:class:`~ipcbus.errors.ConnectionClosed`)
        at once.  The subscription has ended: no request comes any more."""
        self._stopped = True
        core = self.subscription._core
        while core.pending:
            f = core.pending.popleft()
            core._pending_bytes -= len(f.payload)
            self._closed_status(f.reply)
        for task, scope in list(self._handling.items()):
            if task is not spare:
                scope.cancel()
        for task in list(self._finishing):  # plain tasks, in no task group
            if task is not spare:
                task.cancel()

    def _drop_requests(self) -> None:
        """Nobody waits for this service's answers any more (a pool worker whose
        parent closed the link, after waiting for what it had asked): cancel
        the handlers answering requests and drop the requests still queued.
        Handlers of published messages go on (see :meth:`drain`)."""
        core = self.subscription._core
        if any(f.reply is not None for f in core.pending):
            kept = [f for f in core.pending if f.reply is None]
            core.pending.clear()
            core.pending.extend(kept)
            core._pending_bytes = sum(len(f.payload) for f in kept)
        for task in list(self._answering):
            self._handling[task].cancel()

    def _closed_status(self, reply: str | None) -> None:
        """Answer ``reply`` with a ``closed`` status: this service will not answer it."""
        if reply is not None:
            self._bus._node.closed_status(
                reply, "ConnectionClosed", f"the service on {self.subject!r} closed before answering"
            )


_RAW_TYPES: Final = (bytes, bytearray, memoryview)
"""Types whose value is the payload itself (bytes go out as they are, unencoded)."""


def _decode(data: bytes, tp: Any) -> Any:
    """``data`` validated into ``tp``; the bytes themselves for a raw type.

    Raises msgspec's ``DecodeError``/``ValidationError``.
    """
    if tp in _RAW_TYPES:
        return data if tp is bytes else tp(data)
    return msgspec.msgpack.decode(data, type=tp)


def _type_name(tp: Any) -> str:
    """``str`` for a class, the usual spelling (``int | None``) for anything else."""
    return tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _request_type(handler: Handler) -> Any:
    """The type the handler's first parameter is annotated with, unless it is Msg/Any.

    Raises ``TypeError`` for a handler that is not callable, cannot take
    exactly one argument, or whose annotation cannot be resolved.
    """
    if not callable(handler):
        raise TypeError(f"handler must be a function taking the request, not {handler!r}")
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: called with the Msg
    params = list(sig.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    takes_one = bool(params) and (
        params[0].kind in positional or params[0].kind is inspect.Parameter.VAR_POSITIONAL
    )
    needs_more = [
        p.name
        for p in params[1:]
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if not takes_one or needs_more:
        raise TypeError(
            f"handler {handler!r} must take exactly one positional argument (the request)"
            + (f"; it also needs {', '.join(needs_more)}: give them defaults" if needs_more else "")
        )
    first = params[0]
    ann: Any = first.annotation
    if ann is inspect.Parameter.empty or first.kind is inspect.Parameter.VAR_POSITIONAL:
        return None
    if isinstance(ann, str):
        target = handler if inspect.isfunction(handler) else getattr(handler, "__call__", handler)  # noqa: B004
        try:
            hints = typing.get_type_hints(target)
        except Exception as exc:
            raise TypeError(
                f"cannot resolve the annotation {ann!r} of handler {handler!r}'s first "
                f"parameter ({type(exc).__name__}: {exc}); define the type at module level "
                "(string annotations, as with `from __future__ import annotations`, are "
                "looked up in the handler's module)"
            ) from None
        ann = hints.get(first.name, None)
    if ann is None or ann is Any or ann is Msg:
        return None
    return ann


class Bus:
    """A process's handle on the bus: publish, subscribe, request, serve.

    Obtain one from :func:`ipcbus.connect`, from a :class:`~ipcbus.Hub`
    (``hub.bus``), from a :class:`~ipcbus.WorkerPool` (``pool.bus``), or in a
    worker's ``setup(bus)``.  ``Bus(node)`` makes another handle on a
    started :class:`~ipcbus.Node` (its own subscriptions and services, ended
    by its :meth:`aclose`); with ``owns_node=True`` closing it closes the
    node too.
    """

    # Whether _check_open() checks more than the flags request() looks at
    # itself (a ClientBus: its link to the hub).
    _checks_link: bool = False

    def __init__(self, node: Node, *, owns_node: bool = False) -> None:
        self._node = node
        self._owns_node = owns_node
        self._services: list[Service] = []
        self._subs: dict[int, SubscriptionCore] = {}  # made here, ended by aclose()
        # Reply subjects of requests made here.  A bus on a node it does not own
        # marks its own with a token prefix: its aclose() fails just those
        # (closing an owned node fails every request waiting on it).
        self._reply_prefix = (
            node._reply_prefix if owns_node else f"{node._reply_prefix}{next(node._bus_ids):x}g"
        )
        self._closing: asyncio.Task[None] | None = None
        self._spare: asyncio.Task[Any] | None = None  # the handler that closed the bus, if one did
        self._closed = False
        self.error_for_closed: type[ConnectionClosed] = ConnectionClosed

    @property
    def node(self) -> Node:
        """The reactor underneath (for transports and tools)."""
        return self._node

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed or self._node.closed

    def _check_open(self) -> None:
        node = self._node
        if self._closed or node._closed or node.loop is None:  # on every call: no properties
            if node.loop is None and not self._closed:
                raise BusClosed(
                    f"node {node.name!r} is not started: use `async with node` or "
                    "`await node.start()` before using its bus"
                )
            raise BusClosed("bus is closed")

    def _why_closed(self) -> str:
        """Why the bus closed when its owner did not close it (``": ..."``), else ``""``."""
        return ""

    async def publish(
        self,
        subject: str,
        data: Any = b"",
        *,
        headers: dict[str, str] | None = None,
        reply: str | None = None,
    ) -> None:
        """Publish ``data`` on ``subject``.

        Waits while an outbound link is above its high-water mark
        (backpressure); never drops.  Raises
        :class:`~ipcbus.errors.BadSubject`, :class:`~ipcbus.errors.EncodeError`
        or :class:`~ipcbus.errors.FrameTooLarge` before sending anything.
        """
        self._check_open()  # a ClientBus also checks its link to the hub
        node = self._node
        if type(subject) is not str or subject not in _valid_subjects:
            validate_subject(subject)  # (once per subject: it is remembered)
        payload = data if type(data) is bytes else encode_payload(data)
        # Node.publish inline, without an extra coroutine on the hot path:
        # route now, await only for backpressure on the links it went out on
        # (a broken link is skipped: the node drops it).
        full = None
        if reply is None and headers is None:
            full = node.publish_plain(subject, payload)
        else:
            if reply is not None:
                validate_name(reply, "reply subject")
            if headers is not None:
                _check_headers(headers)
        if full is None:
            full = node.publish_now(subject, payload, reply=reply, headers=headers)
        if full:
            await wait_writable(full)
            return
        n = node.publishes = node.publishes + 1
        if node.local_pressure or not n & _YIELD_MASK:
            # A subscription in this process is more than half full (its reader
            # catches up before messages are dropped), or this is the 1024th
            # publish: one loop turn, so that a loop of publishes below every
            # high-water mark still lets other tasks run and can be cancelled.
            node.local_pressure = False
            await asyncio.sleep(0)

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        pending_bytes: int = DEFAULT_PENDING_BYTES,
        overflow: Overflow = "drop_new",
    ) -> Subscription:
        """Subscribe to ``subject`` (``*`` and ``>`` wildcards), optionally in a queue group.

        Members of one ``queue`` group share the messages: each goes to one
        of them.  At most ``max_pending`` messages and ``pending_bytes``
        payload bytes wait unread; past that, ``overflow`` drops the new
        message (``"drop_new"``, keeping the oldest) or the oldest
        (``"drop_old"``), counts it, and the next read raises
        :class:`~ipcbus.errors.SlowConsumer`.  Raises
        :class:`~ipcbus.errors.BadSubject` for an invalid subject or queue
        name and ``ValueError`` for a bad limit or policy.
        """
        self._check_open()
        core = self._node.subscribe(
            subject,
            queue=queue,
            max_pending=max_pending,
            pending_bytes=pending_bytes,
            overflow=overflow,
        )
        self._subs[core.sid] = core
        return Subscription(self, core)

    async def request(
        self,
        subject: str,
        data: Any = b"",
        *,
        timeout: float | None = 1.0,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """Send a request and return the first reply.

        Raises :class:`~ipcbus.errors.NoResponders` at once when nobody serves
        ``subject``, :class:`~ipcbus.errors.RequestTimeout` after ``timeout``
        seconds (``None``: no limit),
        :class:`~ipcbus.errors.RemoteError` when the handler raised, and
        :class:`~ipcbus.errors.ConnectionClosed` (or
        :class:`~ipcbus.errors.WorkerCrashed`) when the responder's link
        closed while the request was in flight.
        """
        node = self._node
        if self._closed or node._closed or node.loop is None or self._checks_link:
            self._check_open()  # (its common case inlined; a ClientBus also checks its link)
        if type(subject) is not str or subject not in _valid_subjects:
            validate_subject(subject)  # (once per subject: it is remembered)
        if type(timeout) is not float or not 0 <= timeout < _INF:
            timeout = _timeout_or_none(timeout)  # None, an int, infinity, NaN, not a number
        if headers is not None:
            _check_headers(headers)
        payload = data if type(data) is bytes else encode_payload(data)
        reply = self._reply_prefix + hex(next(node._tokens))[2:]  # (as node.new_reply_subject())
        fut: asyncio.Future[fr.Msg] = (node.loop or asyncio.get_running_loop()).create_future()
        futures = node.inbox.futures
        futures[reply] = fut
        sent: LinkState | Literal[True] | None = None
        try:
            try:
                # Most requests go to one service across one link: one step.
                sent = node._send_fast(subject, payload, reply, True) if headers is None else None
                if sent is None:  # (the one-step path was tried: it declined)
                    full = node.send_request(subject, payload, reply, headers, fast=False)
                elif sent is True:
                    full = None
                else:
                    link = sent.link
                    full = [link] if link.pending_out > link.high_water else None
            except NoResponders:
                full, waited = await self._no_responders(subject, payload, reply, headers, timeout)
                if timeout is not None:
                    timeout = max(0.0, timeout - waited)
            # The node's deadlines fail the future on time: a fraction of the
            # cost of a cancel scope (or a loop timer) per request.  Armed
            # first: the timeout covers the wait for a full link too.
            if timeout is not None:
                node.deadlines.add(timeout, reply, subject)
            if full:
                await _writable_or_done(full, fut)
            if fut.done():
                # Answered within this call (a plain-def service in this
                # process): still a checkpoint, so that a loop of such
                # requests lets the loop's other tasks run.
                await asyncio.sleep(0)
            m = await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed (its deadline) as the caller was cancelled: seen, not logged
            raise
        finally:
            del futures[reply]
            # Tracked on the link it went out on only (Node._send_fast): a reply
            # that came over it cleared that already.
            if type(sent) is LinkState and reply in sent.inflight:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    # Answered over another link: its service passed the request
                    # on (publish with reply=) to one behind another link.
                    del sent.inflight[reply]
                else:
                    node.forget_own(sent, reply)
            # Passed on here too (as above), or sent by the general path.
            if node._reply_routes and reply in node._reply_routes:
                node.forget_reply(reply)
            if not fut.done():  # cancelled before its reply: nothing may fail it later
                fut.cancel()
        h = m.headers
        if h:
            status = h.get(STATUS_HEADER)
            if status == "no-responders":
                raise NoResponders(subject)
            if status == "closed":
                kind = h.get(ERROR_TYPE_HEADER, "ConnectionClosed")
                exc_type = WorkerCrashed if kind == "WorkerCrashed" else ConnectionClosed
                raise exc_type(
                    f"request on {subject!r} failed: {h.get(ERROR_MSG_HEADER, 'responder gone')}"
                )
            if ERROR_TYPE_HEADER in h:
                raise RemoteError(h[ERROR_TYPE_HEADER], h.get(ERROR_MSG_HEADER, ""), subject)
        return Msg(m.subject, m.payload, m.reply, m.headers, self)

    async def _no_responders(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, str] | None,
        timeout: float | None,
    ) -> tuple[list[Link], float]:
        """Nobody serves ``subject`` for a request being made.  Raises
        :class:`~ipcbus.errors.NoResponders`; a subclass may instead wait for a
        responder, send the request and return what
        :meth:`~ipcbus.node.Node.send_request` returned and the seconds it waited."""
        # Raised before any await: a caller that retries at once would never
        # let the loop run (its own timeout, a worker's restart).
        await asyncio.sleep(0)
        raise NoResponders(subject)

    @overload
    async def serve(
        self,
        subject: str,
        handler: Callable[[Msg], object],  # also async: a coroutine is an object
        *,
        queue: str | None = ...,
        concurrency: int = ...,
        max_pending: int = ...,
    ) -> Service: ...
    @overload
    async def serve(
        self,
        subject: str,
        handler: Callable[[T], object],
        *,
        queue: str | None = ...,
        concurrency: int = ...,
        max_pending: int = ...,
    ) -> Service: ...
    async def serve(
        self,
        subject: str,
        handler: Callable[[Any], Any] | Callable[[Any], Awaitable[Any]],
        *,
        queue: str | None = None,
        concurrency: int = 64,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Service:
        """Answer requests on ``subject`` with ``handler`` (see :class:`Service`).

        Raises ``TypeError`` for a handler that cannot take the request (see
        :class:`Service`) or a ``concurrency`` that is not an int, and
        ``ValueError`` for ``concurrency`` below 1, before subscribing.
        """
        self._check_open()
        arg_type = _request_type(handler)
        concurrency = check_count("concurrency", concurrency, unit="requests handled at once")
        tg = self._node.task_group  # raises for a node not started (before subscribing)
        sub = await self.subscribe(subject, queue=queue, max_pending=max_pending)
        svc = Service(self, sub, handler, concurrency, arg_type)
        self._services.append(svc)
        tg.start_soon(svc._run, name=f"ipcbus-serve-{subject}")
        return svc

    async def flush(self, timeout: float | None = 10.0) -> None:
        """Wait until every directly linked peer has processed what was sent.

        Raises ``TimeoutError`` after ``timeout`` seconds (``None``: no limit).
        """
        self._check_open()
        await self._node.flush(_timeout_or_none(timeout))

    async def drain(self, timeout: float | None = 10.0) -> None:
        """Stop services (finishing requests they already took), flush, then close.

        ``timeout`` bounds the waiting for services and the flush (``None``: no
        limit); past it, the bus closes anyway.

        Called from one of this bus's own handlers (a "shutdown" request), it
        cannot wait for that handler to finish: it starts the drain in the
        background and returns at once; the handler then finishes (its reply
        is sent) and the drain completes after it.
        """
        if self.closed:
            return
        limit = _timeout_or_none(timeout)
        if self._from_own_handler(lambda: self.drain(timeout)):
            return
        with anyio.move_on_after(_INF if limit is None else limit):
            await self._drain_services()
            await self._node.flush(limit)
        await self.aclose()

    async def _drain_services(self) -> None:
        """Stop every service of this bus, waiting for the requests they took:
        all at once (each stops taking requests at the start, not after the
        services before it are done)."""
        async with anyio.create_task_group() as tg:
            for svc in list(self._services):
                tg.start_soon(svc.drain)

    def _from_own_handler(self, then: Callable[[], Awaitable[None]]) -> bool:
        """If called from a task running one of this bus's handlers, start ``then()``
        in a task of its own (waiting for the caller from the caller would never
        end) and return True."""
        if not self._in_own_handler():
            return False
        self._spare = asyncio.current_task()  # closing must not cancel the handler that asked
        if self._closing is None or self._closing.done():
            # A fresh context: the task is not part of the handler (see _SERVING).
            self._closing = asyncio.get_running_loop().create_task(
                _logged(then()), context=contextvars.Context()
            )
        return True

    def _in_own_handler(self) -> bool:
        """Whether the running task runs one of this bus's handlers."""
        serving = _SERVING.get()
        return serving is not None and serving._bus is self

    async def aclose(self) -> None:
        """Close the bus (and its node, if this bus owns it).  Idempotent.

        Called from one of this bus's own handlers, it closes in the background
        and returns at once (as :meth:`drain`).  Otherwise it returns once the
        bus is closed, also when another call is closing it, and a
        cancellation of the caller waits until then (see :meth:`Node.aclose
        <ipcbus.node.Node.aclose>`).
        """
        if not self._closed:
            self._closed = True  # at once, also when the rest happens in the background
            if not self._from_own_handler(self._close_now):
                await self._close_now()
        elif self._owns_node and not self._in_own_handler():
            await self._node.aclose()  # a close under way: wait for it

    async def _close_now(self) -> None:
        self._end_here()
        spare = self._spare
        if spare is not None and spare is not asyncio.current_task():
            # Closed from a handler: it finishes first, and its reply goes out
            # before the links close (bounded: it might wait for the close).
            await asyncio.wait([spare], timeout=ASKER_WAIT)
        if self._owns_node:
            await self._node.aclose()

    def _end_here(self) -> None:
        # Every subscription made here, its services' too: readers drain what
        # is pending, then get BusClosed (this matters for a bus on a node it
        # does not own, Bus(node); an owned node ends them all anyway).
        for core in list(self._subs.values()):
            self._node.unsubscribe(core)
        self._subs.clear()
        for svc in self._services:  # handlers still running are cancelled
            svc._cancel(self._spare)
        if not self._owns_node:
            prefix = self._reply_prefix
            for reply, fut in list(self._node.inbox.futures.items()):
                if reply.startswith(prefix) and not fut.done():
                    fut.set_exception(BusClosed("bus closed while waiting for a reply"))

    def stats(self) -> NodeStats:
        """Counters: msgs/bytes in and out, pending, dropped, per subscription and per link."""
        return self._node.stats()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
