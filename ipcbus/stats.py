"""The shapes of the ``stats()`` snapshots: plain dicts, typed for checkers.

Every ``stats()`` returns a fresh dict of built-in values (msgspec and JSON
encode it as it is: ``ipcbus ls --json`` prints one).  These ``TypedDict``
classes name its keys and their types, so that ``bus.stats()["msgs_in"]`` is
an ``int`` to mypy and a misspelt key is an error before the program runs.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

__all__ = [
    "HubStats",
    "HubSubscription",
    "LinkStats",
    "NodeCounters",
    "NodeStats",
    "PoolStats",
    "SubscriptionStats",
    "WorkerState",
    "WorkerStats",
]

WorkerState = Literal["starting", "ready", "crashed", "restarting", "failed", "stopped", "retiring"]
"""Where a pool's worker is: starting (or restarting) its process and setup,
ready (serving), crashed (gone, a restart to come), restarting (between
failed restart attempts), failed (given up on), stopped (the pool closed) or
retiring (replaced by a fresh process, or removed by a resize: finishing what
it took, then exiting)."""


class LinkStats(TypedDict):
    """One link of a node (``Bus.stats()["links"]``, ``LinkState.stats()``)."""

    transport: str
    """``"pipe"``, ``"fifo"``, ``"sysv"``, ``"shm"`` or ``"memory"``."""
    peer_pid: int | None
    peer_uid: int | None
    peer_name: str
    local_pid: int
    since: float
    """When the link was made (``time.time()``)."""
    msgs_in: int
    msgs_out: int
    bytes_in: int
    bytes_out: int
    objects: dict[str, Any]
    """The transport's kernel objects (FIFO paths, queue ids, segment ids)."""
    name: str
    """The link's name in this node (``ipcbus ls``, log lines)."""
    peer_node: str | None
    pending_out: int
    """Bytes queued toward the peer that the kernel has not taken yet."""
    dropped: int
    """Messages forwarded to this link that were dropped (its outbound limit)."""
    slow_consumer_events: int
    inflight_requests: int
    """Requests sent on this link whose reply has not come yet."""
    abandoned_requests: int
    """Requests sent on this link whose requester gave up (timeout, cancellation)
    before the reply came: they still count in the link's load (queue-group
    picks) until their late reply comes, for 60 s at most."""
    interest: list[str]
    """The subjects the peer wants (``"subject [queue]"`` for a queue group)."""


class SubscriptionStats(TypedDict):
    """One subscription of a node (``Bus.stats()["subscriptions"]``)."""

    sid: int
    subject: str
    queue: str | None
    pending: int
    """Messages waiting to be read."""
    delivered: int
    dropped: int
    """Messages dropped by its overflow policy, in all."""


class NodeCounters(TypedDict):
    """A node's own counters (``HubStats["node"]``; :class:`NodeStats` without links)."""

    node_id: str
    name: str
    pid: int
    uptime: float
    """Seconds since the node started."""
    spin_us: float
    """The busy-poll window in use (0: off)."""
    msgs_in: int
    msgs_out: int
    bytes_in: int
    bytes_out: int
    pending: int
    """Messages waiting in all its subscriptions."""
    dropped: int
    """Messages dropped in all (subscriptions' overflow and links' outbound limits)."""
    subscriptions: list[SubscriptionStats]


class NodeStats(NodeCounters):
    """What ``Bus.stats()`` returns: the node's counters and every link's."""

    links: list[LinkStats]


class WorkerStats(TypedDict):
    """One worker of a pool (``WorkerPool.stats()["workers"]``)."""

    index: int
    pid: int | None
    """The current process's pid (``None`` between a crash and its restart)."""
    state: WorkerState
    starts: int
    crashes: int
    recycles: int
    """How many times its process was replaced by a fresh one (``WorkerPool.recycle()``,
    ``max_messages``, ``max_rss``)."""
    messages: int
    """Messages sent to the current process since it became ready (what ``max_messages`` counts)."""
    rss: int | None
    """The current process's resident memory in bytes (what ``max_rss`` reads); ``None``
    with no process running."""
    last_error: str
    """Why it last crashed or failed to start (empty: never)."""


class PoolStats(TypedDict):
    """What ``WorkerPool.stats()`` returns."""

    workers: list[WorkerStats]
    errors: list[str]
    """Workers that crashed on start and are not restarted."""
    node: NodeStats | None
    """The parent's node (``None`` before the pool started)."""


class HubSubscription(TypedDict):
    """One subscription a client announced to a hub (``HubStats["subscriptions"]``)."""

    link: str
    pid: int | None
    subject: str
    queue: str | None


class HubStats(TypedDict):
    """What ``Hub.stats()`` returns (and ``ipcbus ls --json`` prints)."""

    bus: str
    directory: str
    hub_pid: int
    uptime: float
    transports: list[str]
    accepted: int
    """Clients accepted since the hub started."""
    refused: int
    """Knocks refused (bad version, uid, parameters)."""
    node: NodeCounters
    links: list[LinkStats]
    subscriptions: list[HubSubscription]
    objects: list[dict[str, Any]]
    """The bus folder's records: kind, ident, key, creator and its liveness."""
