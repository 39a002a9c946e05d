"""The ``ipcbus`` command line: help, round trips through a hub process, exit codes, demo.

Every command runs as a real ``python -m ipcbus ...`` process against a hub
child process; ordering comes from the lines each command prints
(``listening on ...``, ``replying on ...``), never from sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest
from click.testing import CliRunner

from ipcbus.busdir import BusDir
from ipcbus.cli import EXIT_CODES, main, render_payload
from ipcbus.errors import BusBusy, BusNotFound, HandshakeTimeout, NoResponders, RemoteError, RequestTimeout

try:
    from hub_client import REPO, peers, wait_gone
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.hub_client import REPO, peers, wait_gone

_names = itertools.count()
COMMANDS = ["hub", "pub", "sub", "req", "reply", "ls", "gc", "bench", "demo"]


@pytest.fixture
def bus_name() -> str:
    """A bus name no other test uses."""
    return f"c{os.getpid()}-{next(_names)}"


class Cmd:
    """A running ``python -m ipcbus ...`` process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, stream: str = "stdout", timeout: float = 15.0) -> str:
        s = self.proc.stdout if stream == "stdout" else self.proc.stderr
        assert s is not None
        async with asyncio.timeout(timeout):
            return (await s.readline()).decode()

    async def finish(self, timeout: float = 15.0) -> tuple[int, str, str]:
        try:
            async with asyncio.timeout(timeout):
                out, err = await self.proc.communicate()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.communicate()


async def start(*args: str) -> Cmd:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ipcbus", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    return Cmd(proc)


async def run(*args: str, timeout: float = 15.0) -> tuple[int, str, str]:
    """Run ``ipcbus ARGS`` to completion: (exit code, stdout, stderr)."""
    return await (await start(*args)).finish(timeout)


@contextlib.asynccontextmanager
async def hub(name: str) -> AsyncIterator[Cmd]:
    """``ipcbus hub NAME --transports fifo`` in the foreground; SIGTERM (exit 0) on exit."""
    h = await start("hub", name, "--transports", "fifo")
    try:
        assert "serving" in await h.line()
        yield h
    finally:
        if h.proc.returncode is None:
            h.proc.send_signal(signal.SIGTERM)
        code, _out, err = await h.finish()
        assert code == 0, err


@contextlib.asynccontextmanager
async def background(*args: str, ready: str) -> AsyncIterator[Cmd]:
    """A long-running command, once it printed ``ready`` on stderr; killed if still running."""
    c = await start(*args)
    try:
        line = await c.line("stderr")
        assert ready in line, line
        yield c
    finally:
        await c.stop()


# -- help, usage ------------------------------------------------------------------


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in top.output
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage:" in res.output
    assert runner.invoke(main, ["-h"]).exit_code == 0
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and "version" in version.output


def test_exit_codes_table_matches_docs() -> None:
    assert EXIT_CODES[BusNotFound] == 3
    assert EXIT_CODES[RequestTimeout] == 4
    assert EXIT_CODES[NoResponders] == 5
    assert EXIT_CODES[RemoteError] == 6
    assert EXIT_CODES[BusBusy] == 8
    assert EXIT_CODES[HandshakeTimeout] == 9
    doc = (REPO / "docs" / "cli.md").read_text()
    for code in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        assert f"| {code} " in doc, f"exit code {code} is not in docs/cli.md"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["pub"], "Missing argument"),
        (["pub", "x", "{not json"], "is not JSON"),
        (["req", "x", "'single'"], "is not JSON"),
        (["sub", "x", "--count", "many"], "not a valid integer"),
        (["gc"], "--bus NAME, or pass --all"),
        (["pub", "x", "1", "--bus", "a/b"], "invalid bus name"),
        (["pub", "x", "1", "--bus", ".."], "invalid bus name"),
        (["hub", "../etc"], "invalid bus name"),
        (["hub", "x", "--transports", "fifo,tcp"], "choose one or more of fifo,sysv,shm"),
        (["hub", "a", "--bus", "b"], "disagree"),
        (["hub", "--bus", "../etc"], "invalid bus name"),
        (["pub", "a..b", "1", "--bus", "x"], "invalid subject 'a..b'"),
        (["req", "a.*", "1"], "invalid subject 'a.*'"),
        (["sub", "a.>.b"], "invalid subject"),
        (["reply", " "], "invalid subject"),
        (["gc", "--bus", "a/../b"], "invalid bus name"),
        (["ls", "--bus", "a/b"], "invalid bus name"),
        (["pub", "x", "1", "--transport", "tcp"], "Invalid value"),
        (["nosuchcommand"], "No such command"),
        (["hub", "..", "--daemon"], "invalid bus name"),  # checked before detaching
        (["req", "x", "--timeout", "-1"], "not in the range"),
        (["req", "x", "--timeout", "0"], "not in the range"),
        (["req", "x", "--timeout", "nan"], "nan is not a number of seconds"),
        (["sub", "x", "--count", "-1"], "not in the range"),
        (["reply", "x", "--count", "-1"], "not in the range"),
        (["demo", "--workers", "0"], "not in the range"),
    ],
)
def test_usage_errors_exit_2(args: list[str], fragment: str) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, (args, res.output, res.exception)
    assert fragment in res.output, res.output
    # click's usage message, as docs/cli.md says of every usage error
    assert "Usage: " in res.output and "Error: " in res.output, res.output


def test_render_payload() -> None:
    import msgspec

    assert render_payload(msgspec.msgpack.encode({"a": [1, "x"]})) == '{"a":[1,"x"]}'
    assert render_payload(b"hello") == "b'hello'"
    long = render_payload(b"\xc1" * 100)
    assert long.endswith("... (100 bytes)") and long.startswith("b'\\xc1")


# -- round trips through a hub process ---------------------------------------------


@pytest.mark.single_loop
async def test_pub_sub_req_reply_round_trip(bus_name: str) -> None:
    b = ("--bus", bus_name)
    async with hub(bus_name):
        async with background("sub", "cli.>", "--count", "3", *b, ready="listening on") as sub:
            assert await run("pub", "cli.json", '{"k": [1, 2]}', *b) == (0, "", "")
            assert (await run("pub", "cli.raw", "--raw", "hello", *b))[0] == 0
            assert (await run("pub", "cli.none", *b))[0] == 0  # DATA defaults to null
            code, out, _err = await sub.finish()
            assert code == 0
            assert out.splitlines() == ['[cli.json] {"k":[1,2]}', "[cli.raw] b'hello'", "[cli.none] null"]

        async with background("reply", "cli.echo", "--count", "2", *b, ready="replying on") as rep:
            code, out, err = await run("req", "cli.echo", '{"n": 1}', *b)
            assert (code, out, err) == (0, '{"n":1}\n', "")
            code, out, _ = await run("req", "cli.echo", "--raw", "bytes!", *b)
            assert (code, out) == (0, "b'bytes!'\n")
            code, out, _ = await rep.finish()
            assert code == 0
            assert out.splitlines() == ['[cli.echo] {"n":1}', "[cli.echo] b'bytes!'"]

        fixed = ("reply", "cli.fixed", "--data", '"always"', "--queue", "q", *b)
        async with background(*fixed, ready="replying on"):
            assert await run("req", "cli.fixed", "[]", *b) == (0, '"always"\n', "")

        # A queue-group member from the command line.
        q = ("sub", "cli.q", "--queue", "workers", "--count", "1", *b)
        async with background(*q, ready="listening") as s1:
            assert (await run("pub", "cli.q", '"job"', *b))[0] == 0
            assert await s1.finish() == (0, '[cli.q] "job"\n', "")


@pytest.mark.single_loop
async def test_exit_codes(bus_name: str) -> None:
    b = ("--bus", bus_name)
    # 3: no hub serves the bus.
    code, out, err = await run("req", "x", "1", *b)
    assert code == 3 and out == ""
    assert f"ipcbus hub {bus_name}" in err and "autostart" not in err  # no such option here
    assert (await run("pub", "x", "1", *b))[0] == 3
    assert (await run("sub", "x", *b))[0] == 3
    async with hub(bus_name) as h:
        # 8: a second hub for the same bus.
        code, _out, err = await run("hub", bus_name, "--transports", "fifo")
        assert code == 8 and f"already served by hub pid {h.proc.pid}" in err, err
        # 5: nobody serves the subject.
        code, _, err = await run("req", "nobody", "1", *b)
        assert code == 5 and "no responders for 'nobody'" in err
        # 4: someone listens but never answers.
        async with background("sub", "silent", *b, ready="listening"):
            code, _, err = await run("req", "silent", "1", "--timeout", "0.3", *b)
            assert code == 4 and "no reply on 'silent' within 0.3 s" in err
        async with peers(bus_name, 1) as (p,):
            # 6: the handler raised.
            await p.call("serve", subject="boom", mode="raise")
            code, _, err = await run("req", "boom", '"x"', *b)
            assert code == 6 and "ValueError" in err and "refusing" in err
            # 7: the hub went away while the request was in flight.
            await p.call("serve", subject="hang", mode="block")
            req = await start("req", "hang", "--timeout", "30", *b)
            await p.expect("request", subject="hang")
            h.proc.send_signal(signal.SIGTERM)
            code, _, err = await req.finish()
            assert code == 7, err
            assert await h.proc.wait() == 0
            await p.expect("closed")


@pytest.mark.single_loop
async def test_sub_and_reply_exit_7_when_the_hub_goes_away(bus_name: str) -> None:
    b = ("--bus", bus_name)
    async with hub(bus_name) as h:
        sub = await start("sub", "news.>", *b)
        assert "listening" in await sub.line("stderr")
        rep = await start("reply", "svc", *b)
        assert "replying" in await rep.line("stderr")
        h.proc.send_signal(signal.SIGTERM)
        assert await h.proc.wait() == 0
        for cmd in (sub, rep):
            code, _, err = await cmd.finish()
            assert code == 7 and f"the hub of bus {bus_name!r} went away" in err, (code, err)


@pytest.mark.single_loop
async def test_daemon_hub_from_the_command_line(bus_name: str) -> None:
    bd = BusDir(bus_name)
    code, out, err = await run("hub", bus_name, "--daemon", "--transports", "fifo")
    pid = bd.hub_pid()
    try:
        assert code == 0, err
        assert pid is not None and f"pid {pid}" in out
        # A second daemon refuses with exit 8; the first keeps serving.
        code, _, err = await run("hub", bus_name, "--daemon", "--transports", "fifo")
        assert code == 8 and "already served" in err
        assert bd.hub_pid() == pid
        async with background("reply", "d.echo", "--count", "1", "--bus", bus_name, ready="replying"):
            assert (await run("req", "d.echo", "7", "--bus", bus_name))[:2] == (0, "7\n")
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            await wait_gone(pid)
    assert not bd.pidfile.exists() and not bd.door.exists()


# -- the demo ----------------------------------------------------------------------


@pytest.mark.single_loop
async def test_bench_passes_its_options_on() -> None:
    """`ipcbus bench --only W2 --list` said "No such option '--only'" (exit 2):
    only what followed `--` reached the benchmark runner."""
    code, out, err = await run("bench", "--only", "W2x", "--impl", "uvloop unix", "--list", timeout=60)
    assert code == 0, err
    assert "W2x" in out and "uvloop unix" in out and "W1 " not in out
    assert out.strip().splitlines()[-1] == "10 measurements"


async def test_demo_runs() -> None:
    code, out, err = await run("demo", "--requests", "500", timeout=90)
    assert code == 0, err
    for fragment in (
        "== worker pool: 2 workers over anonymous pipes",
        "fan-out: 1000 messages published",
        "500 requests, 64 in flight",
        "== hub",
        "fifo client -> hub -> fifo client: 1000 requests",
        "the fifo responder received 1000 of them",
        "sysv client answered:",
        "shm client checked an 8 MiB frame: crc ok",
        "0 dropped",
        "demo finished in",
    ):
        assert fragment in out, f"{fragment!r} missing from the demo output:\n{out}\n{err}"
