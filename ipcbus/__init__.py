"""ipcbus: an asyncio message bus for processes on one Linux host.

Publish/subscribe and request/reply over msgspec-encoded frames, carried by
anonymous pipes, FIFOs, System V message queues or shared-memory rings.
"""

from __future__ import annotations

from .client import Bus, Msg, Service, Subscription
from .connect import ClientBus, Connecting, connect
from .errors import (
    BadBusName,
    BadSubject,
    BusBusy,
    BusClosed,
    BusNotFound,
    ConnectionClosed,
    DecodeError,
    DoorFull,
    EncodeError,
    EndOfStream,
    FrameTooLarge,
    HandshakeTimeout,
    IpcBusError,
    NoResponders,
    PermissionRefused,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    SlowConsumer,
    WorkerCrashed,
    WorkerStartError,
)
from .frames import DEFAULT_MAX_FRAME, PROTOCOL_VERSION
from .heap import keep_heap
from .hub import Hub, HubTransport
from .node import LinkState, Node, Overflow
from .pool import PoolTransport, WorkerPool
from .spin import DEFAULT_SPIN_US, SPIN_ENV, Spinner, spin_window
from .stats import (
    HubStats,
    HubSubscription,
    LinkStats,
    NodeCounters,
    NodeStats,
    PoolStats,
    SubscriptionStats,
    WorkerState,
    WorkerStats,
)
from .transports.base import Link, LinkInfo

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_FRAME",
    "DEFAULT_SPIN_US",
    "PROTOCOL_VERSION",
    "SPIN_ENV",
    "BadBusName",
    "BadSubject",
    "Bus",
    "BusBusy",
    "BusClosed",
    "BusNotFound",
    "ClientBus",
    "Connecting",
    "ConnectionClosed",
    "DecodeError",
    "DoorFull",
    "EncodeError",
    "EndOfStream",
    "FrameTooLarge",
    "HandshakeTimeout",
    "Hub",
    "HubStats",
    "HubSubscription",
    "HubTransport",
    "IpcBusError",
    "Link",
    "LinkInfo",
    "LinkState",
    "LinkStats",
    "Msg",
    "NoResponders",
    "Node",
    "NodeCounters",
    "NodeStats",
    "Overflow",
    "PermissionRefused",
    "PoolStats",
    "PoolTransport",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "Service",
    "SlowConsumer",
    "Spinner",
    "Subscription",
    "SubscriptionStats",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerStartError",
    "WorkerState",
    "WorkerStats",
    "__version__",
    "connect",
    "keep_heap",
    "spin_window",
]
