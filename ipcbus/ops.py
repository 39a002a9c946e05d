"""What ``ipcbus ls`` and ``ipcbus gc`` do, as functions the CLI and tests call."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .busdir import BusDir, bus_root, check_bus_path
from .errors import BusNotFound, IpcBusError, PermissionRefused
from .gc import collect, reclaim_pools, scan, sysv_table

if TYPE_CHECKING:
    from .hub import HubTransport

__all__ = ["gc_command", "list_bus", "render_ls"]


def _console() -> Any:
    """A rich console; output that is not a terminal (a pipe, a file) is not cut to
    80 columns, and its lines are not wrapped (one finding, one line)."""
    from rich.console import Console

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console()
    return Console(width=200, soft_wrap=True)


def _objects_from_records(busdir: Path) -> list[dict[str, Any]]:
    tables = {k: sysv_table(k) for k in ("msg", "shm", "sem")}
    out: list[dict[str, Any]] = []
    for finding, rec in scan(busdir):
        if rec is None:
            out.append({"kind": "?", "ident": finding.what, "state": finding.reason})
            continue
        row: dict[str, Any] = {
            "kind": rec.kind,
            "ident": rec.ident,
            "key": rec.key,
            "creator_pid": rec.creator_pid,
            "creator_alive": rec.creator_alive,
            "state": f"{finding.action}: {finding.reason}",
        }
        table = {"msq": "msg", "shm": "shm", "sem": "sem"}.get(rec.kind)
        if table is not None and rec.ident.isdigit():
            st = tables[table].get(int(rec.ident))
            if st is not None:
                row["mode"] = oct(st["perms"] & 0o777)
                row["owner_uid"] = st["uid"]
                if table == "msg":
                    row["messages"] = st["qnum"]
                    row["bytes"] = st["cbytes"]
                elif table == "shm":
                    row["nattch"] = st["nattch"]
                    row["size"] = st["size"]
                else:
                    row["nsems"] = st["nsems"]
        out.append(row)
    return out


async def list_bus(name: str) -> dict[str, Any]:
    """Everything known about bus ``name``: from its live hub, else from the records."""
    from .connect import connect

    bd = BusDir(name)
    info: dict[str, Any] = {"bus": name, "directory": str(bd.path), "hub": None}
    live = bd.hub_pid()
    if live is not None:
        served = bd.hub_transports() or ("fifo",)
        preferred: tuple[HubTransport, ...] = ("fifo", "shm", "sysv")
        transport: HubTransport = next((t for t in preferred if t in served), "fifo")
        try:
            async with connect(name, transport=transport, name="ipcbus-ls") as bus:
                rep = await bus.request("$SYS.stats", timeout=5.0)
                stats = rep.decode(dict[str, Any])
        except IpcBusError as exc:
            info["error"] = f"hub pid {live} is running but did not answer (stopped? overloaded?): {exc}"
        else:
            info["hub"] = {
                "pid": stats["hub_pid"],
                "uptime": stats["uptime"],
                "transports": stats["transports"],
                "accepted": stats["accepted"],
                "refused": stats["refused"],
                "dropped": stats["node"]["dropped"],
            }
            info["links"] = [lk for lk in stats["links"] if lk.get("peer_name") != "ipcbus-ls"]
            info["subscriptions"] = stats["subscriptions"]
    info["objects"] = _objects_from_records(bd.path) if bd.path.is_dir() else []
    return info


def render_ls(info: dict[str, Any]) -> None:
    """Print ``list_bus`` output as tables (rich)."""
    from rich.table import Table

    console = _console()
    hub = info.get("hub")
    if hub is None and info.get("error"):
        console.print(f"bus {info['bus']!r}: {info['error']}")
    elif hub is None and not info.get("objects"):
        console.print(
            f"bus {info['bus']!r}: no hub is running and no records in {info['directory']}; "
            f"start one with `ipcbus hub {info['bus']}`"
        )
        return
    if hub is None:
        if not info.get("error"):
            console.print(f"bus {info['bus']!r}: no hub running ({info['directory']})")
    else:
        console.print(
            f"bus {info['bus']!r}: hub pid {hub['pid']}, up {hub['uptime']:.0f} s, "
            f"transports {','.join(hub['transports'])}, accepted {hub['accepted']}, "
            f"refused {hub['refused']}, dropped {hub['dropped']}"
        )
        t = Table(title="links")
        for col in ("transport", "peer pid", "uid", "name", "since", "msgs in/out",
                    "bytes in/out", "pending", "dropped", "slow"):  # fmt: skip
            t.add_column(col)
        for lk in info.get("links", []):
            t.add_row(
                str(lk.get("transport")),
                str(lk.get("peer_pid")),
                str(lk.get("peer_uid")),
                str(lk.get("peer_name") or lk.get("name")),
                time.strftime("%H:%M:%S", time.localtime(lk.get("since", 0))),
                f"{lk.get('msgs_in', 0)}/{lk.get('msgs_out', 0)}",
                f"{lk.get('bytes_in', 0)}/{lk.get('bytes_out', 0)}",
                str(lk.get("pending_out", 0)),
                str(lk.get("dropped", 0)),
                str(lk.get("slow_consumer_events", 0)),
            )
        console.print(t)
        s = Table(title="subscriptions")
        for col in ("subject", "queue", "link", "pid"):
            s.add_column(col)
        for sub in info.get("subscriptions", []):
            s.add_row(sub["subject"], sub.get("queue") or "", sub["link"], str(sub["pid"]))
        console.print(s)
    o = Table(title="kernel objects")
    for col in ("kind", "id", "key", "mode", "owner", "creator", "depth / nattch", "state"):
        o.add_column(col)
    for obj in info.get("objects", []):
        depth = ""
        if "messages" in obj:
            depth = f"{obj['messages']} msgs, {obj['bytes']} B"
        elif "nattch" in obj:
            depth = f"nattch {obj['nattch']}, {obj['size']} B"
        elif "nsems" in obj:
            depth = f"{obj['nsems']} sems"
        key = obj.get("key")
        o.add_row(
            str(obj.get("kind")),
            str(obj.get("ident")),
            f"{key:#x}" if isinstance(key, int) else "",
            str(obj.get("mode", "")),
            str(obj.get("owner_uid", "")),
            f"{obj.get('creator_pid', '')}" + (" (alive)" if obj.get("creator_alive") else ""),
            depth,
            str(obj.get("state", "")),
        )
    console.print(o)


def gc_command(bus: str | None, all_buses: bool, dry_run: bool) -> int:
    """Run gc on one bus or all; print findings; return the exit code."""
    console = _console()
    if all_buses:
        root = bus_root()
        names = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith("_pool-")
        )
    else:
        assert bus is not None
        names = [bus]
    total = 0
    for name in names:
        bd = BusDir(name)
        try:
            # Never through a symbolic link, nor in a folder another user controls.
            check_bus_path(bd.path, bus=name)
        except BusNotFound:
            console.print(f"bus {name!r}: no directory at {bd.path}; nothing to collect")
            continue
        except PermissionRefused as exc:
            console.print(f"bus {name!r}: skipped: {exc}")
            continue
        findings = collect(bd.path, dry_run=dry_run)
        for f in findings:
            console.print(f"{name}: {f}")
            total += f.action in ("removed", "remove")
        if not findings:
            console.print(f"{name}: nothing to collect")
    if all_buses:
        # Worker pools over shm record their objects in _pool-<pid>-<start> folders.
        for f in reclaim_pools(root, dry_run=dry_run):
            console.print(f"worker pools: {f}")
            total += f.action in ("removed", "remove") and not f.what.startswith("folder ")
    verb = "would remove" if dry_run else "removed"
    console.print(f"gc: {verb} {total} object(s)")
    return 0


