"""One exception tree for all of ipcbus.

Every error ipcbus raises derives from :class:`IpcBusError`; where an error
resembles a builtin, it inherits that too, so ``except TimeoutError`` catches
:class:`RequestTimeout` and ``except ConnectionError`` catches
:class:`ConnectionClosed`.  Errors carry data (sizes, limits, names), not only
text.
"""

from __future__ import annotations

__all__ = [
    "BadBusName",
    "BadSubject",
    "BusBusy",
    "BusClosed",
    "BusNotFound",
    "ConnectionClosed",
    "DecodeError",
    "DoorFull",
    "EncodeError",
    "EndOfStream",
    "FrameTooLarge",
    "HandshakeTimeout",
    "IpcBusError",
    "NoResponders",
    "PermissionRefused",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "SlowConsumer",
    "WorkerCrashed",
    "WorkerStartError",
]


class IpcBusError(Exception):
    """Root of every exception raised by ipcbus."""


class ProtocolError(IpcBusError):
    """A peer sent bytes that are not a valid ipcbus frame.

    The link that carried them is closed; every other link keeps running.
    """


class FrameTooLarge(ProtocolError, ValueError):
    """A frame is larger than the bus's maximum frame size.

    Raised on the sending side before anything is written, and on the
    receiving side (as a protocol error that closes the link) before any
    allocation.  ``size`` is the offending size, ``limit`` the maximum.
    """

    def __init__(self, size: int, limit: int, what: str = "frame", advice: str = "") -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"{what} of {size} bytes exceeds the maximum frame size of {limit} bytes; "
            + (advice or "send smaller messages or raise max_frame on both sides")
        )


class ConnectionClosed(IpcBusError, ConnectionError):
    """The link or bus is closed: the peer went away, or this side closed it."""


class EndOfStream(ConnectionClosed, EOFError):
    """The peer closed its side cleanly; every frame it sent has been received."""


class WorkerCrashed(ConnectionClosed):
    """A worker process of a :class:`~ipcbus.WorkerPool` died while serving a request."""


class WorkerStartError(IpcBusError):
    """A worker process of a :class:`~ipcbus.WorkerPool` could not start its setup function."""


class BusClosed(ConnectionClosed):
    """The bus object was closed by this process; no further operations are possible."""


class BadSubject(IpcBusError, ValueError):
    """A subject, subscription pattern, queue group name or reply subject is
    not valid NATS subject syntax.

    ``subject`` is the value given (any object: a wrong type is refused too),
    ``reason`` what is wrong with it, ``what`` which of these it was.
    """

    def __init__(self, subject: object, reason: str, what: str = "subject") -> None:
        self.subject = subject
        self.reason = reason
        self.what = what
        shown = repr(subject)
        if len(shown) > 120:  # the whole subject stays in .subject
            length = f" ({len(subject)} characters)" if isinstance(subject, str) else ""
            shown = f"{shown[:100]}...{length}"
        super().__init__(f"invalid {what} {shown}: {reason}")


class EncodeError(IpcBusError, TypeError):
    """A value could not be encoded by msgspec (a payload or headers to send)."""


class DecodeError(IpcBusError, ValueError):
    """A received payload does not decode (MessagePack), or does not validate
    into the type asked for (:meth:`ipcbus.Msg.decode`)."""


class BadBusName(IpcBusError, ValueError):
    """A bus name is not a valid folder name (``/``, ``..``, too long, odd characters).

    ``name`` is the value given (any object: a wrong type is refused too),
    ``reason`` what is wrong with it.
    """

    def __init__(self, name: object, reason: str) -> None:
        from .busdir import MAX_BUS_NAME

        self.name = name
        self.reason = reason
        super().__init__(
            f"invalid bus name {name!r}: {reason}; use 1 to {MAX_BUS_NAME} characters "
            "from A-Z a-z 0-9 _ . - (not starting with '.' or '-', no '..')"
        )


class DoorFull(IpcBusError, BlockingIOError):
    """The door FIFO is full: its hub is not reading knocks (overloaded or hung)."""


class HandshakeTimeout(IpcBusError, TimeoutError):
    """A rendezvous did not complete in time (the other side never opened its end)."""


class RequestTimeout(IpcBusError, TimeoutError):
    """No reply arrived before the request's timeout."""

    def __init__(self, subject: str, timeout: float) -> None:
        self.subject = subject
        self.timeout = timeout
        super().__init__(f"no reply on {subject!r} within {timeout:g} s")


class NoResponders(IpcBusError):
    """Nobody on the bus subscribes to the subject a request was sent to."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        super().__init__(f"no responders for {subject!r}: nothing on the bus serves this subject")


class RemoteError(IpcBusError):
    """A request handler raised; ``type_name`` and ``message`` describe its exception."""

    def __init__(self, type_name: str, message: str, subject: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.subject = subject
        where = f" serving {subject!r}" if subject else ""
        super().__init__(f"remote handler{where} raised {type_name}: {message}")


class SlowConsumer(IpcBusError):
    """Messages for a subscription were dropped because it did not keep up
    (or, across a link, because one was over the max_frame its node took).

    ``dropped`` counts the messages lost since the last report.
    """

    def __init__(self, subject: str, dropped: int) -> None:
        self.subject = subject
        self.dropped = dropped
        super().__init__(
            f"slow consumer on {subject!r}: {dropped} message(s) dropped; "
            "read faster, or raise the subscription's max_pending (messages) or pending_bytes "
            "(a message over a link's max_frame is dropped too, and logged where)"
        )


class BusNotFound(IpcBusError, FileNotFoundError):
    """No hub serves the named bus."""

    def __init__(self, bus: str, directory: str) -> None:
        self.bus = bus
        self.directory = directory
        self.cli_message = (
            f"no hub is running for bus {bus!r} (looked in {directory}); start one with `ipcbus hub {bus}`"
        )
        """The message without the advice that only applies to Python code (``autostart=True``)."""
        super().__init__(f"{self.cli_message} or pass autostart=True")


class BusBusy(IpcBusError):
    """Another hub already serves the named bus."""


class PermissionRefused(IpcBusError, PermissionError):
    """A kernel object, file or peer is not ours, or we may not use it."""
