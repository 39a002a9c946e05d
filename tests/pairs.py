"""Link pairs made in this process, for transport tests: a creator and an attacher.

Transports whose links come in creator/attacher halves (shm, SysV pair
links) make the first half with ``create()``, hand its parameters to the
other half's ``attach()``, and may have a last step before both are usable
(``ready``).  Both halves are closed on exit, the attacher first.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ipcbus.transports.base import Link

L = TypeVar("L", bound=Link)


@contextlib.asynccontextmanager
async def created_pair(
    create: Callable[[], tuple[L, Any]],
    attach: Callable[[Any], Awaitable[L]],
    ready: Callable[[L], Awaitable[None] | None] | None = None,
) -> AsyncIterator[tuple[L, L]]:
    """``(creator, attacher)``: ``create()``, then ``attach(params)``, then ``ready(creator)``."""
    a, params = create()
    try:
        b = await attach(params)
        try:
            if ready is not None:
                done = ready(a)
                if inspect.isawaitable(done):
                    await done
            yield a, b
        finally:
            await b.aclose()
    finally:
        await a.aclose()
