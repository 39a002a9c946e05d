"""The FIFO transport and the door: conformance, the FIFO rules, security, bad input.

Clients run as child processes (``python -m tests.fifo_peer ...``) wherever
the point is that the processes are unrelated; checks of what the hub does
with a crafted knock build the knock in this process.  Events are ordered
with pipes, child output lines and log records, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from ipcbus.busdir import BusDir, client_fifo_names
from ipcbus.errors import (
    BusBusy,
    BusNotFound,
    ConnectionClosed,
    EndOfStream,
    PermissionRefused,
    ProtocolError,
)
from ipcbus.frames import HEADER, PROTOCOL_VERSION, pack
from ipcbus.testing import check_link
from ipcbus.transports.base import Link
from ipcbus.transports.door import (
    MAX_KNOCK,
    Acceptor,
    Door,
    HandshakeTimeout,
    Knock,
    encode_knock,
    send_knock,
    serve_door,
)
from ipcbus.transports.fifo import ACK, FifoAcceptor, FifoLink, connect_fifo, fifo_pair

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
USERS_GID = 100

# -- helpers -----------------------------------------------------------------


class LogWatch(logging.Handler):
    """Collects ``ipcbus.door`` warnings; tests await a record containing a fragment."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._changed: asyncio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if self._changed is not None:
            self._changed.set()  # emitted on the loop's thread (the accept tasks)

    async def wait_for(self, fragment: str, timeout: float = 20.0) -> str:
        self._changed = asyncio.Event()
        with anyio.fail_after(timeout):
            while True:
                for m in self.messages:
                    if fragment in m:
                        self.messages.remove(m)
                        return m
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def door_log() -> Iterator[LogWatch]:
    h = LogWatch()
    logger = logging.getLogger("ipcbus.door")
    logger.addHandler(h)
    try:
        yield h
    finally:
        logger.removeHandler(h)


@pytest.fixture
def bus(bus_root: str) -> Iterator[BusDir]:
    bd = BusDir(f"t-{secrets.token_hex(4)}").ensure()
    try:
        yield bd
    finally:
        shutil.rmtree(bd.path, ignore_errors=True)


class RunningHub:
    def __init__(self, door: Door, acceptor: FifoAcceptor) -> None:
        self.door = door
        self.acceptor = acceptor
        self.links: asyncio.Queue[tuple[Link, Knock]] = asyncio.Queue()
        self.taken: list[Link] = []

    def on_link(self, link: Link, knock: Knock) -> None:
        self.taken.append(link)
        self.links.put_nowait((link, knock))

    async def next_link(self, timeout: float = 20.0) -> tuple[Link, Knock]:
        with anyio.fail_after(timeout):
            return await self.links.get()


@contextlib.asynccontextmanager
async def running_hub(
    busdir: Path,
    *,
    timeout: float = 5.0,
    acceptors: dict[str, Acceptor] | None = None,
    mode: int = 0o600,
    gid: int | None = None,
) -> AsyncIterator[RunningHub]:
    """A minimal hub: a door, a FIFO acceptor and serve_door, in this process."""
    async with (
        Door(busdir, mode=mode, gid=gid) as door,
        FifoAcceptor(busdir, timeout=timeout, mode=mode, gid=gid) as acc,
    ):
        hub = RunningHub(door, acc)
        accs: dict[str, Acceptor] = {"fifo": acc} if acceptors is None else acceptors
        task = asyncio.create_task(serve_door(door, accs, hub.on_link))
        try:
            yield hub
        finally:
            door.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for link in hub.taken:
                await link.aclose()


@contextlib.asynccontextmanager
async def peers() -> AsyncIterator[Callable[..., Any]]:
    """Spawn ``python -m tests.fifo_peer`` children; every one is reaped on exit."""
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(*args: str, **kw: Any) -> asyncio.subprocess.Process:
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fifo_peer",
            *args,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            **kw,
        )
        procs.append(p)
        return p

    try:
        yield spawn
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await p.wait()


async def line(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    with anyio.fail_after(timeout):
        return (await proc.stdout.readline()).decode().strip()


def client_fifos(busdir: Path) -> list[str]:
    return sorted(p.name for p in busdir.iterdir() if p.name.startswith("fifo-"))


async def good_client_roundtrip(bus: BusDir, hub: RunningHub) -> None:
    """Prove the door still serves: connect, exchange a frame each way, close."""
    client = await connect_fifo(bus.path, hub_pid=os.getpid(), name="good")
    link, knock = await hub.next_link()
    try:
        assert knock.name == "good"
        await client.send(b"still serving?")
        assert await link.recv() == b"still serving?"
        await link.send(b"yes")
        assert await client.recv() == b"yes"
    finally:
        await client.aclose()


# -- conformance and the basic link ------------------------------------------


async def test_fifo_link_conformance(bus: BusDir) -> None:
    @contextlib.asynccontextmanager
    async def make_pair() -> AsyncIterator[tuple[Link, Link]]:
        a, b = await fifo_pair(bus.path)
        try:
            yield a, b
        finally:
            await a.aclose()
            await b.aclose()

    await check_link(make_pair)
    assert client_fifos(bus.path) == []


async def test_link_through_the_door_and_unlink_while_open(bus: BusDir) -> None:
    async with running_hub(bus.path) as hub:
        client = await connect_fifo(bus.path, hub_pid=os.getpid(), name="me")
        link, knock = await hub.next_link()
        try:
            # Both FIFO files are already unlinked: the open link does not need them.
            assert client_fifos(bus.path) == []
            assert knock.transport == "fifo" and knock.pid == os.getpid()
            assert link.info.transport == "fifo"
            assert link.info.peer_pid == os.getpid() and link.info.peer_uid == os.geteuid()
            assert link.info.peer_name == "me"
            assert client.info.peer_pid == os.getpid()
            for i in range(100):
                await client.send(b"c%d" % i)
                await link.send(b"h%d" % i)
            for i in range(100):
                assert await link.recv() == b"c%d" % i
                assert await client.recv() == b"h%d" % i
        finally:
            await client.aclose()
        with pytest.raises(EndOfStream):
            await link.recv()


async def test_unlinked_fifo_keeps_working(bus: BusDir) -> None:
    """The kernel rule on its own: open both ends, unlink the name, data still flows."""
    path = bus.path / "plain.fifo"
    os.mkfifo(path, 0o600)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.unlink(path)
    r2, w2 = os.pipe()
    a = FifoLink(r2, w)  # writes into the unlinked FIFO
    b = FifoLink(r, os.dup(w2))
    os.close(w2)
    try:
        await a.send(b"through an unlinked FIFO")
        assert await b.recv() == b"through an unlinked FIFO"
    finally:
        await a.aclose()
        await b.aclose()


async def test_read_with_no_writer_yet_is_not_end_of_stream(bus: BusDir) -> None:
    path = bus.path / "nowriter.fifo"
    os.mkfifo(path, 0o600)
    try:
        rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        probe = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # The trap: a blind read() with no writer yet returns b"" like EOF ...
        assert os.read(probe, 16) == b""
        os.close(probe)
        unused_r, unused_w = os.pipe()
        os.close(unused_r)
        link = FifoLink(rfd, unused_w)
        try:
            # ... but the kernel does not report the fd readable, and the link
            # reads only when told: recv() keeps waiting across many loop polls.
            task = asyncio.create_task(link.recv())
            for _ in range(50):
                await asyncio.sleep(0)
            assert not task.done(), "recv() returned before any writer came"
            wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(wfd, pack(b"first frame"))
            assert await task == b"first frame"
            os.close(wfd)  # the writer came and went: now it is end of stream
            with pytest.raises(EndOfStream):
                await link.recv()
        finally:
            await link.aclose()
    finally:
        os.unlink(path)


async def test_writer_whose_reader_is_gone_gets_connection_closed(bus: BusDir) -> None:
    async with running_hub(bus.path) as hub, peers() as spawn:
        child = await spawn("connect-exit", str(bus.path), str(os.getpid()))
        link, knock = await hub.next_link()
        assert knock.pid == child.pid
        assert await link.recv() == f"pid {child.pid}".encode()
        with pytest.raises(EndOfStream):
            await link.recv()
        assert await child.wait() == 0
        # The reader is gone: writing is EPIPE (SIGPIPE is ignored), surfaced
        # as ConnectionClosed -- and this process is still alive to see it.
        with pytest.raises(ConnectionClosed, match="EPIPE"), anyio.fail_after(20):
            while True:
                await link.send(b"x" * 4096)
                await link.drain()


async def test_sigkilled_client_is_end_of_stream_and_leaves_no_fifo(bus: BusDir) -> None:
    async with running_hub(bus.path) as hub, peers() as spawn:
        child = await spawn("echo", str(bus.path), str(os.getpid()))
        assert await line(child) == "linked"
        link, _ = await hub.next_link()
        assert await link.recv() == f"pid {child.pid}".encode()
        await link.send(b"echo me")
        assert await link.recv() == b"echo me"
        child.kill()
        await child.wait()
        with pytest.raises(EndOfStream):
            await link.recv()
        assert client_fifos(bus.path) == []


@pytest.mark.single_loop
async def test_fifty_clients_knock_at_once(bus: BusDir, door_log: LogWatch) -> None:
    n = 50
    async with running_hub(bus.path) as hub, peers() as spawn:
        # One child imports once and forks 50 clients held at a barrier, then
        # releases them together: 50 unrelated processes knocking at once.
        swarm = await spawn("swarm", str(n), str(bus.path), str(os.getpid()), start_new_session=True)
        try:
            assert await line(swarm) == "ready"
            links: dict[int, Link] = {}
            for _ in range(n):
                link, knock = await hub.next_link()
                links[knock.pid] = link
            assert len(links) == n and swarm.pid not in links
            for pid, link in links.items():
                assert link.info.peer_pid == pid
                assert await link.recv() == f"pid {pid}".encode()
                payload = secrets.token_bytes(3000)
                await link.send(payload)
                assert await link.recv() == payload
            for link in links.values():
                await link.aclose()  # each client sees end of stream and exits 0
            out = [await line(swarm) for _ in range(n + 1)]
            assert out.count("linked") == n and out[-1] == "done 0", out
            assert await swarm.wait() == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(swarm.pid, signal.SIGKILL)
        assert hub.door.knocks_read == n
        assert hub.door.garbage == 0
        assert door_log.messages == []
        assert client_fifos(bus.path) == []


async def test_garbage_frames_after_handshake_close_only_that_link(bus: BusDir) -> None:
    """A client doing the handshake by hand (as a C program would), then sending garbage."""
    async with running_hub(bus.path) as hub:
        good = await connect_fifo(bus.path, hub_pid=os.getpid())
        good_link, _ = await hub.next_link()

        c2h, h2c = client_fifo_names(os.getpid(), secrets.token_hex(8))
        for name in (c2h, h2c):
            os.mkfifo(bus.path / name, 0o600)
        rfd = os.open(bus.path / h2c, os.O_RDONLY | os.O_NONBLOCK)
        tmp = os.open(bus.path / c2h, os.O_RDWR | os.O_NONBLOCK)
        send_knock(
            bus.path,
            Knock(
                version=PROTOCOL_VERSION,
                transport="fifo",
                pid=os.getpid(),
                uid=os.geteuid(),
                params={"c2h": str(bus.path / c2h), "h2c": str(bus.path / h2c)},
            ),
        )
        with anyio.fail_after(20):
            await anyio.wait_readable(rfd)
        assert os.read(rfd, 1) == ACK
        wfd = os.open(bus.path / c2h, os.O_WRONLY | os.O_NONBLOCK)
        os.close(tmp)
        os.write(wfd, ACK + HEADER.pack(0xFFFFFFFF) + b"garbage")
        bad_link, _ = await hub.next_link()
        with pytest.raises(ProtocolError, match="exceeds the maximum frame size"):
            await bad_link.recv()
        await bad_link.aclose()
        os.close(wfd)
        os.close(rfd)
        # The other link is unaffected.
        await good.send(b"fine")
        assert await good_link.recv() == b"fine"
        await good.aclose()
        assert client_fifos(bus.path) == []


# -- security and bad knocks -------------------------------------------------


def _knock(c2h: Path | str, h2c: Path | str, **kw: Any) -> Knock:
    fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "transport": "fifo",
        "pid": os.getpid(),
        "uid": os.geteuid(),
        "params": {"c2h": str(c2h), "h2c": str(h2c)},
    }
    fields.update(kw)
    return Knock(**fields)


def _pair(where: Path, *, mode: int = 0o600, pid: int | None = None) -> tuple[Path, Path]:
    c2h, h2c = client_fifo_names(pid or os.getpid(), secrets.token_hex(8))
    paths = (where / c2h, where / h2c)
    for p in paths:
        os.mkfifo(p, 0o600)
        os.chmod(p, mode)
    return paths


def _outside(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    c, h = _pair(tmp)
    return _knock(c, h), []


def _dotdot(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    other = bus.root / f"other-{secrets.token_hex(4)}"
    other.mkdir(mode=0o700)
    c, h = _pair(other)
    via = bus.path / ".." / other.name
    return _knock(via / c.name, via / h.name), [other]


def _foreign_owner(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    c, h = _pair(bus.path)
    for p in (c, h):
        os.chown(p, NOBODY, NOBODY)
    return _knock(c, h, uid=NOBODY), [c, h]


def _not_a_fifo(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    c2h, h2c = client_fifo_names(os.getpid(), secrets.token_hex(8))
    paths = [bus.path / c2h, bus.path / h2c]
    for p in paths:
        p.write_bytes(b"")
        p.chmod(0o600)
    return _knock(*paths), paths


def _symlink(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    target_c, _target_h = _pair(tmp)
    c2h, h2c = client_fifo_names(os.getpid(), secrets.token_hex(8))
    link = bus.path / c2h
    link.symlink_to(target_c)
    os.mkfifo(bus.path / h2c, 0o600)
    return _knock(link, bus.path / h2c), [link, bus.path / h2c]


def _missing(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    c2h, h2c = client_fifo_names(os.getpid(), secrets.token_hex(8))
    return _knock(bus.path / c2h, bus.path / h2c), []


def _open_mode(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    c, h = _pair(bus.path, mode=0o666)
    return _knock(c, h), [c, h]


def _uid_claim(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    c, h = _pair(bus.path)
    return _knock(c, h, uid=12345), [c, h]


def _bad_params(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    return _knock("", "", params={"c2h": 7}), []


def _wrong_pid(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    c, h = _pair(bus.path, pid=1)
    return _knock(c, h), [c, h]


def _wrong_version(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    return _knock("x", "y", version=PROTOCOL_VERSION + 41), []


def _unknown_transport(bus: BusDir, tmp: Path) -> tuple[Knock, list[Path]]:
    return _knock("x", "y", transport="carrier-pigeon"), []


BAD_KNOCKS = {
    "outside_bus_dir": (_outside, "is outside the bus folder"),
    "dotdot_path": (_dotdot, "is outside the bus folder"),
    "fifo_of_another_user": (_foreign_owner, "only the bus owner"),
    "not_a_fifo": (_not_a_fifo, "is a regular file, not a FIFO"),
    "symlink": (_symlink, "is a symbolic link"),
    "missing_fifos": (_missing, "does not exist"),
    "fifo_open_to_others": (_open_mode, "open to other users"),
    "uid_claim_mismatch": (_uid_claim, "the knock claims uid 12345"),
    "bad_params": (_bad_params, "must name its FIFOs"),
    "name_with_another_pid": (_wrong_pid, "with the knocking pid"),
    "protocol_version": (_wrong_version, "protocol version"),
    "unknown_transport": (_unknown_transport, "unknown transport 'carrier-pigeon'"),
}


@pytest.mark.parametrize("case", list(BAD_KNOCKS))
async def test_bad_knock_is_refused_logged_and_the_door_keeps_serving(
    case: str, bus: BusDir, door_log: LogWatch
) -> None:
    setup, fragment = BAD_KNOCKS[case]
    tmp = Path(tempfile.mkdtemp(prefix="ipcbus-out-"))
    extra: list[Path] = []
    try:
        async with running_hub(bus.path) as hub:
            knock, extra = setup(bus, tmp)
            send_knock(bus.path, knock)
            msg = await door_log.wait_for(fragment)
            assert f"pid {knock.pid}" in msg
            # Files that failed the checks are not the hub's to remove.
            for p in extra:
                if p.name.startswith("fifo-"):
                    assert p.is_symlink() or p.exists(), f"the hub removed {p}, which it refused"
            await good_client_roundtrip(bus, hub)
            assert hub.taken and len(hub.taken) == 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in extra:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


async def test_client_that_never_opens_its_fifos_times_out(bus: BusDir, door_log: LogWatch) -> None:
    async with running_hub(bus.path, timeout=0.5) as hub:
        c, h = _pair(bus.path)
        send_knock(bus.path, _knock(c, h))
        # While that handshake hangs, others are served.
        await good_client_roundtrip(bus, hub)
        await door_log.wait_for("did not open its FIFOs within 0.5 s")
        assert not c.exists() and not h.exists(), "the hub left the FIFOs of a failed handshake"
        await good_client_roundtrip(bus, hub)


async def test_client_that_never_opens_its_write_end_times_out(bus: BusDir, door_log: LogWatch) -> None:
    """The client reads h2c but never opens c2h: the hub's read end has no writer yet,
    which is not end of stream, so the hub waits for the ACK until its deadline."""
    async with running_hub(bus.path, timeout=0.5) as hub:
        c, h = _pair(bus.path)
        rfd = os.open(h, os.O_RDONLY | os.O_NONBLOCK)
        try:
            send_knock(bus.path, _knock(c, h))
            await door_log.wait_for("did not finish the FIFO handshake within 0.5 s")
            assert os.read(rfd, 1) == ACK
        finally:
            os.close(rfd)
        assert not c.exists() and not h.exists()
        await good_client_roundtrip(bus, hub)


async def test_client_sigkilled_after_knocking(bus: BusDir, door_log: LogWatch) -> None:
    async with running_hub(bus.path, timeout=30) as hub, peers() as spawn:
        child = await spawn("knock-only", str(bus.path))
        assert await line(child) == "knocked"
        child.kill()
        await child.wait()
        await door_log.wait_for(f"client pid {child.pid} exited before opening its FIFOs")
        assert client_fifos(bus.path) == []
        await good_client_roundtrip(bus, hub)


async def test_on_link_failure_closes_the_link_and_keeps_serving(
    bus: BusDir, caplog: pytest.LogCaptureFixture
) -> None:
    got: asyncio.Queue[Link] = asyncio.Queue()
    calls = 0

    def on_link(link: Link, knock: Knock) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("hub is confused")
        got.put_nowait(link)

    async with Door(bus.path) as door, FifoAcceptor(bus.path) as acc:
        task = asyncio.create_task(serve_door(door, {"fifo": acc}, on_link))
        try:
            first = await connect_fifo(bus.path, hub_pid=os.getpid())
            with pytest.raises(EndOfStream), anyio.fail_after(20):
                await first.recv()  # the hub closed the link it could not take
            await first.aclose()
            second = await connect_fifo(bus.path, hub_pid=os.getpid())
            link = await got.get()
            await second.send(b"ok")
            assert await link.recv() == b"ok"
            await second.aclose()
            await link.aclose()
        finally:
            door.close()
            await task
    assert "hub is confused" in caplog.text


async def test_a_second_knock_for_a_pair_being_accepted_is_refused(bus: BusDir) -> None:
    # A group bus's members see each other's FIFO names: a second knock for
    # a pair in the middle of its handshake must not start a second one
    # (its ACK would land in, or its read steal a byte from, the first link).
    c2h, h2c = _pair(bus.path)
    async with FifoAcceptor(bus.path) as acc:
        first = asyncio.ensure_future(acc.accept(_knock(c2h, h2c)))
        await asyncio.sleep(0)  # the first handshake waits for the client to open its ends
        assert not first.done()
        with pytest.raises(ProtocolError, match="already being accepted"):
            await acc.accept(_knock(c2h, h2c))
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
    assert not c2h.exists() and not h2c.exists()  # the first handshake's cleanup ran


class _KernelSaidNo(Exception):
    """Stands for a sysv_ipc/posix_ipc error: not an IpcBusError, OSError or ValueError."""


async def test_an_acceptor_failing_unexpectedly_refuses_only_that_knock(
    bus: BusDir, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky:
        """Fails the first knock with an error admit() did not use to catch."""

        inner: FifoAcceptor | None = None
        calls = 0

        async def accept(self, knock: Knock) -> Link:
            self.calls += 1
            if self.calls == 1 or self.inner is None:
                raise _KernelSaidNo("the kernel refused something")
            return await self.inner.accept(knock)

    flaky = Flaky()
    async with running_hub(bus.path, acceptors={"fifo": flaky}) as hub:
        flaky.inner = hub.acceptor
        with pytest.raises((HandshakeTimeout, ConnectionClosed)), anyio.fail_after(20):
            await connect_fifo(bus.path, hub_pid=os.getpid(), timeout=1)
        await good_client_roundtrip(bus, hub)  # the door still serves
    assert "_KernelSaidNo: the kernel refused something" in caplog.text


# -- group buses (another uid, for real) -------------------------------------


@pytest.mark.single_loop
async def test_group_bus_admits_members_and_refuses_others() -> None:
    root = Path(tempfile.mkdtemp(prefix="ipcbus-grp-"))
    try:
        bd = BusDir("shared", root=root, group=USERS_GID).ensure()
        st = os.lstat(bd.path)
        assert stat.S_IMODE(st.st_mode) == 0o3770 and st.st_gid == USERS_GID
        async with running_hub(bd.path, mode=0o660, gid=USERS_GID) as hub, peers() as spawn:
            member = await spawn("echo", str(bd.path), str(os.getpid()), "--as", f"{NOBODY}:{USERS_GID}")
            assert await line(member) == "linked"
            link, knock = await hub.next_link()
            assert knock.uid == NOBODY and link.info.peer_uid == NOBODY
            assert await link.recv() == f"pid {member.pid}".encode()
            await link.aclose()
            assert await member.wait() == 0

            outsider = await spawn("echo", str(bd.path), str(os.getpid()), "--as", f"{NOBODY}:{NOBODY}")
            out = await line(outsider)
            assert out.startswith("refused PermissionRefused"), out
            assert "not a member" in out
            assert await outsider.wait() == 3
        assert client_fifos(bd.path) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_group_bus_refuses_fifos_of_another_group(door_log: LogWatch) -> None:
    root = Path(tempfile.mkdtemp(prefix="ipcbus-grp-"))
    try:
        bd = BusDir("shared", root=root, group=USERS_GID).ensure()
        async with running_hub(bd.path, mode=0o660, gid=USERS_GID):
            c, h = _pair(bd.path, mode=0o660)
            for p in (c, h):
                os.chown(p, NOBODY, NOBODY)
            send_knock(bd.path, _knock(c, h, uid=NOBODY))
            await door_log.wait_for(f"only the bus owner and group {USERS_GID} may join")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the client side of failures ---------------------------------------------


async def test_connect_without_a_hub_is_bus_not_found(bus: BusDir) -> None:
    with pytest.raises(BusNotFound, match=f"ipcbus hub {bus.name}"):
        await connect_fifo(bus.path, hub_pid=0)
    os.mkfifo(bus.door, 0o600)  # a dead hub's door: nobody reads it
    try:
        with pytest.raises(BusNotFound):
            await connect_fifo(bus.path, hub_pid=0)
    finally:
        bus.door.unlink()
    assert client_fifos(bus.path) == []
    with pytest.raises(BusNotFound):
        await connect_fifo(bus.root / "no-such-bus", hub_pid=0)


async def test_refused_client_gets_a_clear_timeout(bus: BusDir, door_log: LogWatch) -> None:
    async with running_hub(bus.path, acceptors={}):
        with pytest.raises(HandshakeTimeout, match="refused it") as info:
            await connect_fifo(bus.path, hub_pid=os.getpid(), timeout=0.5)
        assert isinstance(info.value, TimeoutError)
        await door_log.wait_for("unknown transport 'fifo'")
    assert client_fifos(bus.path) == []


async def test_hub_dying_during_the_handshake_fails_it_at_once(bus: BusDir) -> None:
    sleeper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE
    )
    try:

        def knock_and_kill(knock: Knock) -> None:
            sleeper.kill()  # the "hub" dies right after the knock

        with anyio.fail_after(20), pytest.raises(ConnectionClosed, match="exited during"):
            await connect_fifo(bus.path, hub_pid=sleeper.pid, send_knock=knock_and_kill, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            sleeper.kill()
        await sleeper.wait()
    assert client_fifos(bus.path) == []


async def test_connect_refuses_an_untrusted_bus_folder(bus: BusDir) -> None:
    os.chmod(bus.path, 0o755)
    try:
        with pytest.raises(PermissionRefused, match="expected 0700"):
            await connect_fifo(bus.path, hub_pid=0)
    finally:
        os.chmod(bus.path, 0o700)


# -- the door ----------------------------------------------------------------


async def _next(it: AsyncIterator[Knock]) -> Knock:
    with anyio.fail_after(20):
        return await it.__anext__()


def _door_writer(door: Door) -> int:
    return os.open(door.path, os.O_WRONLY | os.O_NONBLOCK)


async def test_door_splits_several_knocks_in_one_write(bus: BusDir) -> None:
    async with Door(bus.path) as door:
        it = door.knocks()
        data = b"".join(encode_knock(_knock("a", "b", name=f"k{i}")) for i in range(3))
        fd = _door_writer(door)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        assert [(await _next(it)).name for _ in range(3)] == ["k0", "k1", "k2"]
        assert door.knocks_read == 3
        await it.aclose()  # type: ignore[attr-defined]
    assert not bus.door.exists()


GARBAGE = {
    "zero_length": (b"\0\0\0\0", "announced as 0 bytes"),
    "oversized_length": (HEADER.pack(MAX_KNOCK) + b"x" * 100, f"announced as {MAX_KNOCK} bytes"),
    "truncated": (b"\0\0", "stray bytes"),
    "longer_than_pipe_buf": (b"\x7f" * 5000, "announced as"),
    "undecodable_body": (HEADER.pack(3) + b"\xc1\xc1\xc1", "malformed knock"),
    "not_a_knock": (HEADER.pack(2) + b"\x91\x01", "malformed knock"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
async def test_door_skips_garbage_and_keeps_serving(case: str, bus: BusDir, door_log: LogWatch) -> None:
    garbage, fragment = GARBAGE[case]
    async with Door(bus.path) as door:
        it = door.knocks()
        fd = _door_writer(door)
        try:
            os.write(fd, garbage)
            await door_log.wait_for(fragment)
            assert door.garbage >= 1
            os.write(fd, encode_knock(_knock("a", "b", name="after")))
        finally:
            os.close(fd)
        assert (await _next(it)).name == "after"
        await it.aclose()  # type: ignore[attr-defined]


async def test_door_skips_a_malformed_knock_without_losing_its_neighbours(
    bus: BusDir, door_log: LogWatch
) -> None:
    async with Door(bus.path) as door:
        it = door.knocks()
        bad = HEADER.pack(3) + b"\xc1\xc1\xc1"
        data = encode_knock(_knock("a", "b", name="one")) + bad + encode_knock(_knock("a", "b", name="two"))
        fd = _door_writer(door)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        assert (await _next(it)).name == "one"
        assert (await _next(it)).name == "two"
        await door_log.wait_for("malformed knock")
        await it.aclose()  # type: ignore[attr-defined]


def test_send_knock_refuses_a_knock_over_pipe_buf(bus: BusDir) -> None:
    with pytest.raises(ValueError, match="exceeds PIPE_BUF"):
        send_knock(bus.path, _knock("a", "b", name="x" * MAX_KNOCK))


def test_send_knock_refuses_a_door_that_is_not_a_fifo(bus: BusDir) -> None:
    bus.door.write_bytes(b"")
    try:
        with pytest.raises(PermissionRefused, match="not a FIFO"):
            send_knock(bus.path, _knock("a", "b"))
        assert bus.door.read_bytes() == b""
    finally:
        bus.door.unlink()
    bus.door.symlink_to("/dev/null")
    try:
        with pytest.raises(PermissionRefused, match="symbolic link"):
            send_knock(bus.path, _knock("a", "b"))
    finally:
        bus.door.unlink()


async def test_door_replaces_a_stale_door_but_not_a_served_one(bus: BusDir) -> None:
    os.mkfifo(bus.door, 0o600)  # stale: nobody reads it
    async with Door(bus.path) as door:
        assert stat.S_IMODE(os.lstat(bus.door).st_mode) == 0o600
        with pytest.raises(BusBusy, match="another process is serving the door"):
            async with Door(bus.path):
                pass
        assert not door.closed
    assert not bus.door.exists()
    bus.door.write_bytes(b"")
    try:
        with pytest.raises(PermissionRefused, match="is not a FIFO"):
            async with Door(bus.path):
                pass
    finally:
        bus.door.unlink()


async def test_acceptor_needs_its_context(bus: BusDir) -> None:
    acc = FifoAcceptor(bus.path)
    with pytest.raises(ConnectionClosed, match="async with"):
        await acc.accept(_knock("a", "b"))
    with pytest.raises(BusNotFound):
        async with FifoAcceptor(bus.root / "nope"):
            pass


def test_enxio_is_what_a_readerless_fifo_open_gives(bus: BusDir) -> None:
    """Why send_knock maps ENXIO to BusNotFound: O_WRONLY|O_NONBLOCK with no reader."""
    os.mkfifo(bus.door, 0o600)
    try:
        with pytest.raises(OSError) as info:
            os.open(bus.door, os.O_WRONLY | os.O_NONBLOCK)
        assert info.value.errno == errno.ENXIO
    finally:
        bus.door.unlink()
