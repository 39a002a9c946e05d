"""The anonymous-pipe transport: conformance and the pipe rules of the Linux IPC guide."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ipcbus.testing import check_link
from ipcbus.transports.base import Link
from ipcbus.transports.memory import memory_pair
from ipcbus.transports.pipe import pipe_pair


@contextlib.asynccontextmanager
async def _pipes() -> AsyncIterator[tuple[Link, Link]]:
    a, b = pipe_pair()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@contextlib.asynccontextmanager
async def _memory() -> AsyncIterator[tuple[Link, Link]]:
    a, b = memory_pair()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_pipe_link_conformance() -> None:
    await check_link(_pipes)


async def test_memory_link_conformance() -> None:
    await check_link(_memory)
