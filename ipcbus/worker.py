"""Entry point of a WorkerPool child: ``python -m ipcbus.worker SPEC TARGET NAME MAX_FRAME PPID SPIN_US``.

``SPEC`` names the link to the parent: ``pipe:R,W`` (inherited pipe fds),
``shm:{...}`` (the ids of a shared-memory ring pair the parent created) or
``sysv:{...}`` (the ids and keys of the two SysV message queues it created).
``PPID`` is the parent's pid, ``SPIN_US`` the busy-poll window the pool was
given (:mod:`ipcbus.spin`).

The child wraps its inherited pipe ends in a link to the parent's node,
imports ``TARGET`` (``"module:function"``), runs ``await setup(bus)``, and
sends a ``ready`` notice (or ``setup_failed`` with the error, then exits 1).
It runs until the parent closes the link — or dies, which the child sees as
end of stream — and then exits, so a dead parent never leaves orphans.
"""

from __future__ import annotations

import importlib
import inspect
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

from . import frames as fr
from .client import Bus
from .node import Node
from .transports.base import Link
from .transports.pipe import PipeLink

__all__ = ["load_target", "main", "run_worker"]


def load_target(target: str) -> Callable[[Bus], Awaitable[Any]]:
    """Import ``"module:function"`` and return the function."""
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"target must be 'module:function', not {target!r}")
    module = importlib.import_module(module_name)
    try:
        func = getattr(module, func_name)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no function {func_name!r}") from None
    if not callable(func):
        raise TypeError(f"{target!r} is not callable")
    return func  # type: ignore[no-any-return]


async def _open_link(spec: str, parent_pid: int, max_frame: int) -> Link:
    """The link to the parent from its argv spec: ``pipe:R,W``, ``shm:{...}`` or ``sysv:{...}``."""
    kind, _, rest = spec.partition(":")
    if kind == "pipe":
        r, w = (int(x) for x in rest.split(","))
        return PipeLink(r, w, max_frame=max_frame, peer_pid=parent_pid)
    if kind == "shm":
        from .transports.shm import ShmLink

        params = msgspec.json.decode(rest.encode(), type=dict[str, int | str])
        return await ShmLink.attach(params, peer_pid=parent_pid, max_frame=max_frame)
    if kind == "sysv":
        from .transports.sysv import SysvPairLink

        pair = msgspec.json.decode(rest.encode(), type=dict[str, int | str])
        return await SysvPairLink.attach(pair, peer_pid=parent_pid, max_frame=max_frame)
    raise ValueError(f"unknown worker link spec {spec!r}")


async def run_worker(
    spec: str, target: str, name: str, max_frame: int, parent_pid: int, spin_us: float | None = None
) -> int:
    """Run one worker until its parent goes away; return the exit code."""
    async with Node(name=name, max_frame=max_frame, spin_us=spin_us) as node:
        link = await _open_link(spec, parent_pid, max_frame)
        ls = await node.add_link(link, name="parent", wait=False)
        node.upstream = ls
        bus = Bus(node)
        try:
            setup = load_target(target)
            result = setup(bus)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            link.send_nowait(fr.encode_frame(fr.Notice("setup_failed", msg[:3000])))
            await link.aclose()
            await node.aclose()
            return 1
        # Make sure the interest set up by `setup` reaches the parent before "ready".
        link.send_nowait(fr.encode_frame(fr.Notice("ready")))
        await ls.closed.wait()
        await node.aclose()
    return 0


def main(argv: list[str] | None = None) -> None:
    """Parse the argv the pool passes and run the worker on uvloop when available."""
    args = sys.argv[1:] if argv is None else argv
    spec, target, name = args[0], args[1], args[2]
    max_frame, parent_pid = int(args[3]), int(args[4])
    spin_us = float(args[5]) if len(args) > 5 else None
    # The parent handles Ctrl-C and shuts workers down through their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path.insert(0, "")
    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    code = anyio.run(
        run_worker,
        spec,
        target,
        name,
        max_frame,
        parent_pid,
        spin_us,
        backend_options=backend_options,
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
