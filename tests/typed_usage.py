"""Application code as a strictly typed user writes it: tests/test_api.py
checks it with ``mypy --strict`` (it is never run).  Each ``assert_type``
pins what the public API gives back."""

from __future__ import annotations

import asyncio
from typing import Literal, assert_type

import msgspec

import ipcbus


class Job(msgspec.Struct):
    """A request."""

    n: int


class Done(msgspec.Struct):
    """A reply."""

    total: int


def double(job: Job) -> Done:
    """A typed handler."""
    return Done(job.n * 2)


def raw(data: bytes) -> bytes:
    """A handler given the payload itself."""
    return data[::-1]


async def client() -> None:
    """A client of a hub, each way of connecting."""
    async with ipcbus.connect("typed") as bus:
        assert_type(bus, ipcbus.ClientBus)
        await bus.wait_connected(timeout=None)
        rep = await bus.request("double", Job(2), timeout=5)
        assert_type(rep.decode(Done), Done)
        maybe: int | None = rep.decode(int | None)
        print(maybe)
        status: Literal["ok", "busy"] = rep.decode(Literal["ok", "busy"])
        assert_type(rep.decode(int | None), int | None)
        assert_type(rep.decode(list[Done]), list[Done])
        assert_type(rep.decode(Literal["ok", "busy"]), Literal["ok", "busy"])
        print(status)
        await bus.flush(timeout=None)
    pending: ipcbus.Connecting = ipcbus.connect("typed", transport="sysv")
    other = await asyncio.create_task(pending)
    assert_type(other, ipcbus.ClientBus)
    async with other as same:
        assert_type(same, ipcbus.ClientBus)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(ipcbus.connect("typed"))
    assert_type(task.result(), ipcbus.ClientBus)


async def pool() -> None:
    """A worker pool and an embedded node."""
    async with ipcbus.WorkerPool("examples.workers:setup", workers=2) as p:
        assert_type(p, ipcbus.WorkerPool)
        await p.wait_ready(timeout=None)
        sub = await p.bus.subscribe("events.>")
        async with sub as s:
            assert_type(s, ipcbus.Subscription)
            async for msg in s:
                assert_type(msg, ipcbus.Msg)
                assert_type(msg.decode(bytes), bytes)
                break
    async with ipcbus.Node(name="embedded") as node:
        assert_type(node, ipcbus.Node)
        bus = ipcbus.Bus(node)
        await bus.serve("double", double)
        await bus.serve("raw", raw)
        await bus.drain(timeout=None)


def counters(bus: ipcbus.Bus, pool: ipcbus.WorkerPool, hub: ipcbus.Hub) -> int:
    """The stats() snapshots, typed key by key."""
    st = bus.stats()
    assert_type(st, ipcbus.NodeStats)
    assert_type(st["msgs_in"], int)
    for link in st["links"]:
        assert_type(link, ipcbus.LinkStats)
        assert_type(link["peer_pid"], int | None)
    for sub in st["subscriptions"]:
        assert_type(sub["queue"], str | None)
    ps = pool.stats()
    crashes = sum(w["crashes"] for w in ps["workers"])
    node = ps["node"]
    if node is not None:
        crashes += node["dropped"]
    hs = hub.stats()
    assert_type(hs["node"], ipcbus.NodeCounters)
    return crashes + hs["accepted"] + len(hs["subscriptions"])
