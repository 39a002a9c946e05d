"""The ``stats()`` snapshots have exactly the keys and value types their
``TypedDict`` classes (``ipcbus.stats``) declare, for every transport's links."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

import ipcbus
from ipcbus.pool import PoolTransport
from ipcbus.stats import HubStats, NodeStats, PoolStats

TESTS = Path(__file__).resolve().parent


def same_keys(value: Any, tp: Any, where: str = "stats") -> int:
    """Assert that every TypedDict level of ``value`` has exactly ``tp``'s keys;
    return how many dicts were checked (so a test can tell it saw the nesting)."""
    origin = typing.get_origin(tp)
    if typing.is_typeddict(tp):
        assert isinstance(value, dict), where
        hints = typing.get_type_hints(tp)
        assert set(value) == set(hints), f"{where}: {sorted(set(value) ^ set(hints))}"
        return 1 + sum(same_keys(value[k], hints[k], f"{where}[{k!r}]") for k in hints)
    if origin is list:
        (item,) = typing.get_args(tp)
        return sum(same_keys(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is not None and len(args) == 1 and typing.is_typeddict(args[0]):  # X | None
        return same_keys(value, args[0], where)
    return 0


def check(value: Any, tp: Any) -> int:
    """``value`` is a ``tp``: its types (msgspec validates, strictly) and its keys."""
    msgspec.convert(value, tp, strict=True)
    return same_keys(value, tp)


async def test_bus_and_hub_stats_match_their_types() -> None:
    name = f"stats{os.getpid()}"
    async with (
        ipcbus.Hub(name, transports=("fifo", "sysv", "shm")) as hub,
        ipcbus.connect(name, transport="fifo", name="f") as fb,
        ipcbus.connect(name, transport="sysv", name="s") as sb,
        ipcbus.connect(name, transport="shm", name="m") as mb,
    ):
        await fb.subscribe("a.>", queue="q")
        await sb.serve("echo", lambda m: m.data)
        await mb.subscribe("b")
        for bus in (fb, sb, mb):
            await bus.flush()  # the hub has every subscription
        assert (await mb.request("echo", b"x", timeout=5)).data == b"x"
        for b in (fb, sb, mb):
            assert check(b.stats(), NodeStats) >= 3  # node, a subscription, a link
        st = hub.stats()
        assert check(st, HubStats) >= 5
        assert {lk["transport"] for lk in st["links"]} == {"fifo", "sysv", "shm"}
        assert {(s["subject"], s["queue"]) for s in st["subscriptions"]} >= {("a.>", "q"), ("b", None)}


@pytest.mark.parametrize("transport", ["pipe", "sysv", "shm"])
async def test_pool_stats_match_their_types(transport: PoolTransport) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    async with ipcbus.WorkerPool("pool_workers:setup", workers=2, transport=transport, env=env) as pool:
        st = pool.stats()
        assert check(st, PoolStats) >= 4  # pool, node, two workers
        assert [w["state"] for w in st["workers"]] == ["ready", "ready"]
        assert st["node"] is not None and len(st["node"]["links"]) == 2
