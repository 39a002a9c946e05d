"""The ``ipcbus`` command: hub, pub, sub, req, reply, ls, gc, bench, demo.

Built on click.  Exit codes are stable and documented in docs/cli.md:

==  ===========================================================
0   success
1   error (a clear message on stderr)
2   usage error (bad option or argument, invalid bus name or subject)
3   no hub serves the bus (``BusNotFound``)
4   request timed out
5   no responders for the request's subject
6   the responder raised (``RemoteError``)
7   the connection to the hub closed
8   another hub already serves the bus (``BusBusy``)
==  ===========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import click
import msgspec

from .errors import (
    BadBusName,
    BadSubject,
    BusBusy,
    BusNotFound,
    ConnectionClosed,
    HandshakeTimeout,
    IpcBusError,
    NoResponders,
    RemoteError,
    RequestTimeout,
)

if TYPE_CHECKING:
    from .hub import HubTransport

__all__ = ["EXIT_CODES", "main"]

T = TypeVar("T")

EXIT_CODES: dict[type[BaseException], int] = {
    BadBusName: 2,
    BadSubject: 2,
    BusNotFound: 3,
    RequestTimeout: 4,
    NoResponders: 5,
    RemoteError: 6,
    ConnectionClosed: 7,
    BusBusy: 8,
    HandshakeTimeout: 9,
}

def _bus_name(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Reject an invalid bus name as a usage error, while the command line is parsed."""
    from .busdir import validate_bus_name

    if value is not None:
        try:
            validate_bus_name(value)
        except BadBusName as exc:
            raise click.BadParameter(str(exc), param=param) from None
    return value


bus_option = click.option(
    "--bus", "bus_name", default="default", show_default=True, callback=_bus_name, help="Name of the bus."
)
transport_option = click.option(
    "--transport",
    type=click.Choice(["fifo", "sysv", "shm"]),
    default="fifo",
    show_default=True,
    help="Transport used to reach the hub.",
)


def _run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop (when installed), mapping ipcbus errors to exit codes."""
    try:
        try:
            import uvloop

            return uvloop.run(coro_fn())
        except ImportError:  # pragma: no cover
            return asyncio.run(coro_fn())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (IpcBusError, ValueError, OSError) as exc:
        _fail(exc)


def _fail(exc: BaseException) -> NoReturn:
    """Print ``exc`` on stderr and exit with its code from :data:`EXIT_CODES` (else 1)."""
    code = 1
    for etype, c in EXIT_CODES.items():
        if isinstance(exc, etype):
            code = c
            break
    text = exc.cli_message if isinstance(exc, BusNotFound) else str(exc)  # no autostart= here
    click.echo(f"ipcbus: {text}", err=True)
    raise SystemExit(code) from None


def _payload(data: str, raw: bool) -> bytes:
    """DATA from the command line: JSON (re-encoded as MessagePack) or, with --raw, bytes."""
    if raw:
        return data.encode()
    try:
        value = msgspec.json.decode(data.encode())
    except msgspec.DecodeError:
        raise click.BadParameter(
            f"{data!r} is not JSON; quote strings as '\"text\"' or pass --raw for bytes",
            param_hint="DATA",
        ) from None
    return msgspec.msgpack.encode(value)


def _check_subject(subject: str, *, pattern: bool = False) -> None:
    """Reject a bad SUBJECT as a usage error before connecting (a pattern may use wildcards)."""
    from .subjects import validate_pattern, validate_subject

    try:
        (validate_pattern if pattern else validate_subject)(subject)
    except BadSubject as exc:
        raise click.BadParameter(str(exc), param_hint="SUBJECT") from None


def render_payload(data: bytes) -> str:
    """Readable JSON when the payload decodes as MessagePack, else a bytes preview."""
    try:
        value = msgspec.msgpack.decode(data)
        return msgspec.json.encode(value).decode()
    except (msgspec.DecodeError, TypeError, ValueError, UnicodeDecodeError):
        pass
    preview = data[:64]
    text = repr(preview)
    return text + (f"... ({len(data)} bytes)" if len(data) > 64 else "")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.version_option(package_name="ipcbus")
def main(verbose: int) -> None:
    """ipcbus: an asyncio message bus for processes on one Linux host."""
    _setup_logging(verbose)


# -- hub ----------------------------------------------------------------------


def _daemonize() -> int:
    """Double-fork; return the write end of a pipe the daemon reports readiness on.

    Runs before any event loop exists.  The original process waits for the
    daemon's word ("ok" or an error) and exits with the matching code.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        with os.fdopen(r, "rb") as f:
            word = f.read().decode(errors="replace")
        if word.startswith("ok"):
            click.echo(word[3:].strip())
            os._exit(0)
        if word.startswith("busy"):
            click.echo(f"ipcbus: {word[5:].strip()}", err=True)
            os._exit(8)
        click.echo(f"ipcbus: hub failed to start: {word.strip() or 'no word from the daemon'}", err=True)
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    # Close every other inherited fd.  A parent that spawned us without
    # close_fds (uvloop's subprocess does not close them) may have passed the
    # write end of the pipe it reads our stderr from: holding it open forever
    # would make that parent wait for an EOF that never comes.
    os.closerange(3, w)
    os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
    return w


@main.command()
@click.argument("name", default=None, required=False, callback=_bus_name)
@click.option(
    "--bus",
    "bus_name",
    default=None,
    callback=_bus_name,
    help="Name of the bus (same as NAME; default `default`).",
)
@click.option("--daemon", is_flag=True, help="Detach and run in the background.")
@click.option("--group", default=None, help="Open the bus to this Unix group (0660 objects).")
@click.option(
    "--transports",
    default="fifo,sysv,shm",
    show_default=True,
    help="Comma-separated transports to accept.",
)
@click.option(
    "--spin-us",
    type=click.FloatRange(0, 1_000_000),
    default=None,
    help="Busy-poll window while replies are due in microseconds; 0 turns it off "
    "(default: $IPCBUS_SPIN_US, else 200).",
)
def hub(
    name: str | None,
    bus_name: str | None,
    daemon: bool,
    group: str | None,
    transports: str,
    spin_us: float | None,
) -> None:
    """Serve bus NAME until SIGTERM/SIGINT (foreground unless --daemon)."""
    from .hub import ALL_TRANSPORTS, Hub

    if name is not None and bus_name is not None and name != bus_name:
        raise click.UsageError(f"NAME {name!r} and --bus {bus_name!r} disagree; give one of them")
    name = name or bus_name or "default"

    # Checked just below (a typo is a usage error, not a traceback).
    chosen = cast("tuple[HubTransport, ...]", tuple(t for t in transports.split(",") if t))
    bad = [t for t in chosen if t not in ALL_TRANSPORTS]
    if bad or not chosen:
        raise click.BadParameter(
            f"{transports!r}: choose one or more of {','.join(ALL_TRANSPORTS)}, comma-separated",
            param_hint="--transports",
        )
    ready_fd = _daemonize() if daemon else -1

    def tell(word: str, *, done: bool = True) -> None:
        # On success the pipe closes now: the waiting parent exits and the
        # daemon serves on.  On failure the daemon keeps the pipe open until
        # it exits (the kernel closes it), so the parent, and whoever waits
        # for the parent, returns only once this process is gone.
        nonlocal ready_fd
        if ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(ready_fd, word.encode())
            if done:
                os.close(ready_fd)
            ready_fd = -1

    async def serve() -> None:
        try:
            h = Hub(name, group=group, transports=chosen, spin_us=spin_us)
            await h.__aenter__()
        except BusBusy as exc:
            tell(f"busy {exc}", done=False)
            raise
        except BaseException as exc:
            tell(f"error {exc}", done=False)
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(h.aclose()))
        tell(f"ok hub for bus {name!r} running (pid {os.getpid()})")
        if not daemon:
            click.echo(f"hub for bus {name!r} serving {h.path} (pid {os.getpid()}); Ctrl-C stops it")
        try:
            await h.wait_closed()
        finally:
            await h.aclose()

    _run(serve)


# -- clients ------------------------------------------------------------------


@main.command()
@click.argument("subject")
@click.argument("data", default="null")
@click.option("--raw", is_flag=True, help="Send DATA as raw bytes instead of JSON.")
@bus_option
@transport_option
def pub(subject: str, data: str, raw: bool, bus_name: str, transport: HubTransport) -> None:
    """Publish DATA (JSON, or bytes with --raw) on SUBJECT."""
    from .connect import connect

    _check_subject(subject)
    payload = _payload(data, raw)

    async def go() -> None:
        async with connect(bus_name, transport=transport, name="ipcbus-pub") as bus:
            await bus.publish(subject, payload)
            await bus.flush()

    _run(go)


@main.command()
@click.argument("subject")
@click.option(
    "--count", type=click.IntRange(min=0), default=0, help="Exit after N messages (0: run until Ctrl-C)."
)
@click.option("--queue", default=None, help="Join this queue group.")
@bus_option
@transport_option
def sub(subject: str, count: int, queue: str | None, bus_name: str, transport: HubTransport) -> None:
    """Print each message on SUBJECT (wildcards allowed) until Ctrl-C or --count."""
    from .connect import connect

    _check_subject(subject, pattern=True)

    async def go() -> None:
        async with connect(bus_name, transport=transport, name="ipcbus-sub") as bus:
            s = await bus.subscribe(subject, queue=queue)
            await bus.flush()
            click.echo(f"listening on {subject!r}", err=True)
            seen = 0
            async for m in s:
                click.echo(f"[{m.subject}] {render_payload(m.data)}")
                seen += 1
                if count and seen >= count:
                    return
            raise _hub_gone(bus)  # the subscription ended under us: exit 7, not 0

    _run(go)


@main.command()
@click.argument("subject")
@click.argument("data", default="null")
@click.option("--raw", is_flag=True, help="Send DATA as raw bytes instead of JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=1e9),  # NaN is refused below
    default=2.0,
    show_default=True,
    help="Seconds to wait.",
)
@bus_option
@transport_option
def req(subject: str, data: str, raw: bool, timeout: float, bus_name: str, transport: HubTransport) -> None:
    """Send a request with DATA to SUBJECT and print the reply."""
    from .connect import connect

    if timeout != timeout:  # NaN passes FloatRange
        raise click.BadParameter("nan is not a number of seconds", param_hint="--timeout")
    _check_subject(subject)
    payload = _payload(data, raw)

    async def go() -> None:
        async with connect(bus_name, transport=transport, name="ipcbus-req") as bus:
            rep = await bus.request(subject, payload, timeout=timeout)
            click.echo(render_payload(rep.data))

    _run(go)


@main.command()
@click.argument("subject")
@click.option("--data", default=None, help="Fixed JSON reply (default: echo the request).")
@click.option("--queue", default=None, help="Join this queue group.")
@click.option(
    "--count", type=click.IntRange(min=0), default=0, help="Exit after N requests (0: until Ctrl-C)."
)
@bus_option
@transport_option
def reply(
    subject: str, data: str | None, queue: str | None, count: int, bus_name: str, transport: HubTransport
) -> None:
    """A toy responder: answer requests on SUBJECT (echo, or --data)."""
    from .connect import connect
    from .node import first_of

    _check_subject(subject, pattern=True)

    fixed = _payload(data, False) if data is not None else None

    async def go() -> None:
        async with connect(bus_name, transport=transport, name="ipcbus-reply") as bus:
            done = asyncio.Event()
            handled = 0

            def handler(m: Any) -> bytes:
                nonlocal handled
                handled += 1
                click.echo(f"[{m.subject}] {render_payload(m.data)}")
                if count and handled >= count:
                    asyncio.get_running_loop().call_soon(done.set)
                return fixed if fixed is not None else bytes(m.data)

            await bus.serve(subject, handler, queue=queue)
            await bus.flush()
            click.echo(f"replying on {subject!r}", err=True)
            assert bus.hub_link is not None
            await first_of(done, bus.hub_link.closed)
            if not done.is_set():
                raise _hub_gone(bus)
            await bus.drain()

    _run(go)


def _hub_gone(bus: Any) -> ConnectionClosed:
    """The error for a long-running command whose hub went away (exit code 7)."""
    link = bus.hub_link
    why = f": {link.close_reason}" if link is not None and link.close_reason else ""
    return ConnectionClosed(f"the hub of bus {bus.busdir.name!r} went away{why}")


# -- operations -----------------------------------------------------------------


@main.command(name="ls")
@bus_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def ls_cmd(bus_name: str, as_json: bool) -> None:
    """Show what is on a bus: hub, links, subscriptions, kernel objects."""
    from .ops import list_bus, render_ls

    info = _run(lambda: list_bus(bus_name))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        render_ls(info)
    if info.get("error") or (not info.get("hub") and not info.get("objects")):
        raise SystemExit(1)


@main.command()
@click.option("--bus", "bus_name", default=None, callback=_bus_name, help="Collect this bus only.")
@click.option("--all", "all_buses", is_flag=True, help="Collect every bus in the bus root.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
def gc(bus_name: str | None, all_buses: bool, dry_run: bool) -> None:
    """Remove what crashed processes left behind (only ours, only when the owner is dead)."""
    from .ops import gc_command

    if not bus_name and not all_buses:
        raise click.UsageError("name a bus with --bus NAME, or pass --all")
    try:
        code = gc_command(bus_name, all_buses, dry_run)
    except (IpcBusError, OSError) as exc:  # a bad bus name, an untrusted directory
        _fail(exc)
    raise SystemExit(code)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--quick", is_flag=True, help="Fewer repeats and smaller counts.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(quick: bool, args: tuple[str, ...]) -> None:
    """Run the benchmarks (same as `make bench`); ARGS go to `python -m ipcbus.bench`
    (`ipcbus bench --only W2 --list`; see `python -m ipcbus.bench --help`)."""
    import runpy

    sys.argv = ["ipcbus.bench", *(["--quick"] if quick else []), *args]
    runpy.run_module("ipcbus.bench", run_name="__main__")


@main.command()
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Pool size.")
@click.option(
    "--requests", type=click.IntRange(min=1), default=5000, show_default=True, help="Requests to send."
)
def demo(workers: int, requests: int) -> None:
    """Show pub/sub and request/reply on a pool and a hub, with throughput and latency."""
    from .demo import run_demo

    _run(lambda: run_demo(workers=workers, requests=requests))


if __name__ == "__main__":  # pragma: no cover
    main()
