"""A daemon that hosts plugins in separate processes, on a bus other programs use.

The host runs a hub (embedded: in its own process), joins it as a client, and
puts two kinds of plugins on that one node, each in a pool of its own
(``WorkerPool(..., bus=host)``):

* ``spell`` plugins serve ``spell.check``;
* ``render`` plugins serve ``render``, and ask ``spell.check`` themselves: a
  plugin reaches a plugin of another pool through the host's node;
* the host serves ``host.config`` for the plugins.

Then a separate program (here a second client of the same hub) asks
``render``: hub -> host -> a render plugin -> host -> a spell plugin and back.
A render plugin whose handler blocks its event loop is found hung
(``hang_timeout``), killed and restarted. Last, the host changes its
configuration and reloads the spell plugins with it (``recycle()``: one
process after the other, each new one ready before the old one stops), while
the other program keeps asking: no request fails. Run it from the
repository root::

    python examples/plugin_host.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that `examples.*` imports from any directory

import ipcbus  # noqa: E402
from examples.workers import requests_during, worker_env  # noqa: E402

BUS = "plugin-host"  # a fixed name: its folder under the bus root is reused by every run


async def spell_plugin(bus: ipcbus.Bus) -> None:
    """A `spell` plugin process: flags the words it does not know."""
    known = set((await bus.request("host.config", "words", timeout=5)).decode(list[str]))

    def check(words: list[str]) -> list[str]:
        return [w for w in words if w.lower() not in known]

    await bus.serve("spell.check", check, queue="spell")


async def render_plugin(bus: ipcbus.Bus) -> None:
    """A `render` plugin process: renders a text, asking a spell plugin first."""

    async def render(text: str) -> str:
        if text == "freeze":
            time.sleep(600)  # noqa: ASYNC251  (a plugin bug: a blocking call holds its loop)
        unknown = (await bus.request("spell.check", text.split(), timeout=5)).decode(list[str])
        marked = " ".join(f"[{w}]" if w in unknown else w for w in text.split())
        return f"<p>{marked}</p> (render pid {os.getpid()})"

    await bus.serve("render", render, queue="render")


async def main() -> int:
    """Host the plugins, ask them from another program, check each step."""
    ok = True
    async with (
        ipcbus.Hub(BUS, transports=("fifo",)),
        ipcbus.connect(BUS, transport="fifo", name="host") as host,
    ):
        words = ["the", "cat", "sat", "on", "mat"]
        await host.serve("host.config", lambda key: words)  # read by each plugin as it starts
        env = worker_env()
        async with (
            ipcbus.WorkerPool(
                "examples.plugin_host:spell_plugin", 2, name="spell", env=env, bus=host
            ) as spell,
            ipcbus.WorkerPool(
                "examples.plugin_host:render_plugin", 2, name="render", env=env, bus=host,
                hang_timeout=1.0,
            ) as render,
        ):
            await host.flush()  # the hub has heard of the plugins' services
            print(f"host: spell and render plugins up; render pids {sorted(render.pids)}")
            async with ipcbus.connect(BUS, transport="fifo", name="app") as app:
                page = (await app.request("render", "the cat sat on teh mat", timeout=10)).decode(str)
                print(f"app: {page}")
                ok &= page.startswith("<p>the cat sat on [teh] mat</p>")

                before = set(render.pids)
                try:
                    await app.request("render", "freeze", timeout=30)
                    ok = False
                except ipcbus.ConnectionClosed as exc:  # WorkerCrashed, passed on by the hub
                    print(f"app: a render plugin hung: {type(exc).__name__}: {exc}")
                    ok &= "hung" in str(exc)
                await render.wait_ready(timeout=15)
                print(f"host: render pids now {sorted(render.pids)} (one replaced)")
                ok &= len(set(render.pids) - before) == 1
                page = (await app.request("render", "on the mat", timeout=10)).decode(str)
                print(f"app: {page}")
                ok &= page.startswith("<p>on the mat</p>")

                # A new configuration: reload the spell plugins while the app asks on.
                words.append("teh")
                asked, failed = await requests_during(app, "render", "the cat", spell.recycle())
                print(f"host: spell plugins reloaded, {asked} requests meanwhile, {failed} failed")
                ok &= asked > 0 and failed == 0
                page = (await app.request("render", "teh mat", timeout=10)).decode(str)
                print(f"app: {page}")
                ok &= page.startswith("<p>teh mat</p>")
        print(f"host: plugins stopped; the host's bus is still open: {not host.closed}")
        ok &= not host.closed
    print("all steps as expected:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
