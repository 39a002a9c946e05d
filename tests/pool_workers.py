"""Worker setup functions for the WorkerPool tests (imported by the worker processes).

Each ``setup_*`` is an ``async def setup(bus)`` given to
:class:`ipcbus.WorkerPool` as ``"pool_workers:setup_*"`` (the tests put this
directory on the workers' ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import ipcbus


async def setup(bus: ipcbus.Bus) -> None:
    """A good worker: ``echo`` and ``pid`` in queue groups, plus the slow services."""
    await bus.serve("echo", lambda m: m.data, queue="echo")
    await bus.serve("pid", lambda m: os.getpid(), queue="pid")
    await bus.serve("pid.b", lambda m: os.getpid(), queue="pid.b")  # a second group on the same workers
    await bus.serve("spin", lambda m: bus.stats()["spin_us"], queue="spin")

    async def hang(m: ipcbus.Msg) -> bytes:
        # Tell the test which worker took the request *before* blocking, so it
        # can kill exactly that worker while the request is in flight.
        await bus.publish("started", os.getpid())
        await asyncio.Event().wait()  # never answers
        return b""

    async def sleep(seconds: float) -> str:
        await bus.publish("started", os.getpid())
        await asyncio.sleep(seconds)  # a slow handler, finishing on its own
        return "slept"

    gate = asyncio.Event()

    async def gated(m: ipcbus.Msg) -> str:
        await bus.publish("started", os.getpid())
        await gate.wait()  # until the parent publishes "release"
        return "released"

    async def block(seconds: float) -> str:
        await bus.publish("started", os.getpid())
        await bus.flush()  # it leaves before the loop stops
        time.sleep(seconds)  # noqa: ASYNC251  (blocks the loop: it answers no ping meanwhile)
        return "blocked"

    await bus.serve("slow.block", block, queue="slow")

    async def relay(subject: str) -> bytes:
        # A plugin asking a service it does not know where: up the tree.
        return (await bus.request(subject, timeout=10)).data

    await bus.serve("relay", relay, queue="relay")
    await bus.serve("slow.hang", hang, queue="slow")
    await bus.serve("slow.sleep", sleep, queue="slow")
    await bus.serve("slow.gated", gated, queue="slow")
    await bus.serve("release", lambda m: gate.set())  # every worker: no queue group

    # Handlers that raise what is not an Exception (plugin code does).
    def base(m: ipcbus.Msg) -> bytes:
        raise PluginAbort("a BaseException of the plugin's own")

    def cancelled(m: ipcbus.Msg) -> bytes:
        raise asyncio.CancelledError()

    async def awaits_cancelled(m: ipcbus.Msg) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        fut.cancel()  # someone else cancelled what the handler waits for
        return await fut

    def exit_now(m: ipcbus.Msg) -> bytes:
        os._exit(3)

    def close_reader(m: ipcbus.Msg) -> str:
        # A plugin closing file descriptors: the reading end of the link to
        # the parent (pipe:R,W on the command line).  It still writes.
        os.close(int(sys.argv[1].removeprefix("pipe:").split(",")[0]))
        return "closed"

    async def close_bus(m: ipcbus.Msg) -> str:
        await bus.aclose()  # from its own handler: closes after this reply
        return "closing"

    await bus.serve("close.reader", close_reader, queue="close")
    await bus.serve("close.bus", close_bus, queue="close")
    await bus.serve("exit", exit_now, queue="exit")
    await bus.serve("bad.base", base, queue="bad")
    await bus.serve("bad.cancelled", cancelled, queue="bad")
    await bus.serve("bad.awaits_cancelled", awaits_cancelled, queue="bad")


class PluginAbort(BaseException):
    """Not an Exception: what a plugin may raise to get out of a deep call."""


async def setup_raises(bus: ipcbus.Bus) -> None:
    """Setup that fails with a clear error."""
    await bus.serve("echo", lambda m: m.data)
    raise RuntimeError("setup exploded on purpose")


async def setup_raises_base(bus: ipcbus.Bus) -> None:
    """Setup that fails with a BaseException of its own (not an Exception)."""
    raise PluginAbort("setup gave up on purpose")


def setup_sync(bus: ipcbus.Bus) -> None:
    """A plain (non-async) setup function is not awaited but still runs."""


async def setup_crash(bus: ipcbus.Bus) -> None:
    """Setup that kills its own process without a word (a crash on start)."""
    os._exit(3)


def _first_start() -> bool:
    """True the first time any worker of the test calls it: ``IPCBUS_TEST_MARKER``
    names a file that records that a first start happened."""
    try:
        fd = os.open(os.environ["IPCBUS_TEST_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


async def setup_crash_on_restart(bus: ipcbus.Bus) -> None:
    """Starts fine the first time; every later start (a restart) crashes."""
    if not _first_start():
        os._exit(4)
    await setup(bus)


def _count_start() -> int:
    """This start's number among the test's workers (``IPCBUS_TEST_MARKER`` names
    a file that counts them)."""
    fd = os.open(os.environ["IPCBUS_TEST_MARKER"], os.O_CREAT | os.O_APPEND | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"x")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


async def setup_slow_after_serving(bus: ipcbus.Bus) -> None:
    """Serves; the starts after the first ``IPCBUS_TEST_FAST_STARTS`` (1) then say
    so (``setting.up``, its pid), ask the parent's ``parent.ping`` service (its
    answer on ``setup.asked``) and go on setting up for 30 s (a plugin that
    loads a model after registering its services)."""
    await setup(bus)

    async def via(m: ipcbus.Msg) -> int:  # its own group's service, through the parent
        return (await bus.request("pid", timeout=5)).decode(int)

    await bus.serve("pid.via", via, queue="via")
    if _count_start() > int(os.environ.get("IPCBUS_TEST_FAST_STARTS", "1")):
        await bus.flush()  # the parent's interest has arrived
        await bus.publish("setting.up", os.getpid())
        await bus.publish("setup.asked", (await bus.request("parent.ping", timeout=10)).data)
        await asyncio.sleep(30)


async def setup_hang_on_restart(bus: ipcbus.Bus) -> None:
    """Starts fine the first time; every later start hangs in setup (never ready)."""
    if not _first_start():
        await asyncio.Event().wait()
    await setup(bus)


not_callable = 42


async def setup_says_pid_then_hangs(bus: ipcbus.Bus) -> None:
    """Prints this worker's pid on stdout (the parent's), then never finishes setup."""
    os.write(1, f"{os.getpid()}\n".encode())  # one write: two workers share the pipe
    await asyncio.Event().wait()


def setup_says_pid_then_blocks(bus: ipcbus.Bus) -> None:
    """Prints this worker's pid on stdout, then blocks its event loop for ever
    (plugin code that never yields: the worker cannot see its link end)."""
    os.write(1, f"{os.getpid()}\n".encode())
    while True:
        time.sleep(0.05)


async def setup_fails_second_start(bus: ipcbus.Bus) -> None:
    """Start 1 works, start 2 (the first restart) fails, later starts work again.
    ``IPCBUS_TEST_MARKER`` names a file that counts the starts."""
    if _count_start() == 2:
        raise RuntimeError("second start fails on purpose")
    await setup(bus)


def _start_helper(keep_fds: bool) -> None:
    """Start a process that outlives this worker (a plugin's helper daemon);
    its pid is appended to the file ``IPCBUS_TEST_MARKER`` names, for the test
    to end it.  ``keep_fds``: the plugin passes it every fd it has open
    (``Popen(pass_fds=...)``, or fds the plugin made inheritable)."""
    import subprocess

    if keep_fds:
        for fd in range(3, 256):
            try:
                os.set_inheritable(fd, True)
            except OSError:
                pass
    helper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], close_fds=False, start_new_session=True
    )
    with open(os.environ["IPCBUS_TEST_MARKER"], "a") as f:
        f.write(f"{helper.pid}\n")


async def setup_with_helper(bus: ipcbus.Bus) -> None:
    """``setup``, after starting a helper process with ``close_fds=False`` (as
    ``os.system`` does)."""
    _start_helper(keep_fds=False)
    await setup(bus)


async def setup_with_helper_keeping_fds(bus: ipcbus.Bus) -> None:
    """``setup``, after starting a helper process that has a copy of every fd."""
    _start_helper(keep_fds=True)
    await setup(bus)


async def setup_b(bus: ipcbus.Bus) -> None:
    """A second kind of plugin: ``b.name`` answers ``"b"`` and its worker's pid."""
    await bus.serve("b.name", lambda m: ["b", os.getpid()], queue="b")


async def setup_streams(bus: ipcbus.Bus) -> None:
    """``stream`` (seconds): publish 1 KiB on ``data.<pid>`` as fast as flow control lets it."""

    async def run(seconds: float) -> None:
        end = time.monotonic() + seconds
        payload = b"x" * 1024
        while time.monotonic() < end:
            await bus.publish(f"data.{os.getpid()}", payload)
        await bus.publish("streamed", os.getpid())

    tasks: set[asyncio.Task[None]] = set()

    def start(seconds: float) -> int:
        task = asyncio.get_running_loop().create_task(run(seconds))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return os.getpid()

    await bus.serve("stream", start)


async def setup_leaky(bus: ipcbus.Bus) -> None:
    """``setup``, plus ``leak`` (MiB): keep that much more memory resident for good
    (a plugin that leaks); answers this worker's pid."""
    kept: list[bytes] = []

    def leak(mib: int) -> int:
        kept.append(b"\x01" * (mib << 20))  # written, so resident (not calloc's lazy zero pages)
        return os.getpid()

    await bus.serve("leak", leak, queue="leak")
    await setup(bus)


async def setup_slow_later_starts(bus: ipcbus.Bus) -> None:
    """``setup``; every start after the first publishes ``setting.up`` (its pid)
    and takes ``IPCBUS_TEST_SETUP_SECONDS`` (1) more seconds before it serves."""
    if _count_start() > 1:
        await bus.flush()  # the parent's interest has arrived
        await bus.publish("setting.up", os.getpid())
        await asyncio.sleep(float(os.environ.get("IPCBUS_TEST_SETUP_SECONDS", "1")))
    await setup(bus)


async def setup_notes(bus: ipcbus.Bus) -> None:
    """``setup``, plus ``note`` (seconds), a published message (no reply): say
    ``started`` (its pid), take that long, then append a line to the file
    ``IPCBUS_TEST_MARKER`` names; and ``ev.*`` (a service) and ``obs.*`` (a
    subscription it reads), each event appended there (``<pid> <subject>``)."""

    async def note(seconds: float) -> None:
        await bus.publish("started", os.getpid())
        await bus.flush()
        await asyncio.sleep(seconds)
        fd = os.open(os.environ["IPCBUS_TEST_MARKER"], os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        try:
            os.write(fd, f"{os.getpid()} noted\n".encode())
        finally:
            os.close(fd)

    def event(m: ipcbus.Msg) -> None:  # a plain subscription: every event, once
        fd = os.open(os.environ["IPCBUS_TEST_MARKER"], os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        try:
            os.write(fd, f"{os.getpid()} {m.subject}\n".encode())
        finally:
            os.close(fd)

    await bus.serve("note", note)
    await bus.serve("ev.*", event)
    sub = await bus.subscribe("obs.*")  # a plain subscription the plugin reads itself

    async def observe() -> None:
        async for m in sub:
            event(m)

    _KEEP.append(asyncio.get_running_loop().create_task(observe()))
    await setup(bus)


_KEEP: list[asyncio.Task[None]] = []  # tasks a setup started (a reference keeps them alive)
