"""WorkerPool over shared-memory rings: large payloads, crash and restart, clean kernel state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import zlib
from pathlib import Path

import anyio
import pytest

import ipcbus
from ipcbus import WorkerCrashed, WorkerPool, WorkerStartError
from ipcbus.gc import sysv_table
from ipcbus.records import list_records

try:
    from test_pool import worker_env
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.test_pool import worker_env

pytestmark = pytest.mark.single_loop


async def test_shm_pool_moves_large_frames_both_ways() -> None:
    big = os.urandom(4096) * 4096  # 16 MiB, larger than the 8 MiB ring
    async with WorkerPool("pool_workers:setup", workers=2, transport="shm", env=worker_env()) as pool:
        rep = await pool.bus.request("echo", big, timeout=30)
        assert zlib.crc32(rep.data) == zlib.crc32(big) and len(rep.data) == len(big)
        # Sizes that fit in the ring whole: decoded where they lie, replies sent in two parts.
        for size in (64 * 1024, 300_000, 1 << 20, 3 << 20):
            data = os.urandom(size)
            assert (await pool.bus.request("echo", data, timeout=30)).data == data
        pids = {(await pool.bus.request("pid", timeout=5)).decode(int) for _ in range(6)}
        assert pids == set(pool.pids)
        assert all(lk["transport"] == "shm" for lk in pool.bus.stats()["links"])


async def test_shm_pool_worker_crash_fails_request_and_restarts() -> None:
    async with WorkerPool(
        "pool_workers:setup", workers=1, transport="shm", env=worker_env(), restart_backoff=0.01
    ) as pool:
        started = await pool.bus.subscribe("started")
        await pool.bus.flush()
        import anyio

        async with anyio.create_task_group() as tg:
            failures: list[BaseException] = []

            async def call() -> None:
                try:
                    await pool.bus.request("slow.hang", timeout=30)
                except ipcbus.IpcBusError as exc:
                    failures.append(exc)

            tg.start_soon(call)
            victim = (await started.next(timeout=10)).decode(int)
            os.kill(victim, signal.SIGKILL)
        assert len(failures) == 1 and isinstance(failures[0], WorkerCrashed), failures
        await pool.wait_ready(timeout=20)
        assert pool.pids and pool.pids[0] != victim
        rep = await pool.bus.request("echo", b"after", timeout=10)
        assert rep.data == b"after"


async def test_shm_pool_setup_failure_is_reported() -> None:
    with pytest.raises(WorkerStartError, match="setup exploded on purpose"):
        async with WorkerPool(
            "pool_workers:setup_raises", workers=1, transport="shm", env=worker_env()
        ):
            pass


async def test_unknown_pool_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown pool transport 'tcp'"):
        WorkerPool("pool_workers:setup", transport="tcp")


# -- a pool killed while a worker starts: its objects are recorded and reclaimed --

_KILLED_PARENT = """
import asyncio, sys
import ipcbus

async def main():
    # sys.argv[1] stands in for the interpreter: it never attaches.
    async with ipcbus.WorkerPool("pool_workers:setup", workers=1, transport="shm",
                                 python=sys.argv[1]):
        pass

asyncio.run(main())
"""


def _pool_dirs() -> list[Path]:
    root = Path(os.environ["IPCBUS_DIR"])
    return sorted(p for p in root.iterdir() if p.name.startswith("_pool-"))


async def test_a_shm_pool_leaves_no_records_folder() -> None:
    async with WorkerPool("pool_workers:setup", workers=1, transport="shm", env=worker_env()) as pool:
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
    assert _pool_dirs() == []


@pytest.mark.parametrize("reclaimer", ["next pool", "gc --all"])
async def test_objects_of_a_pool_killed_before_its_worker_attached_are_reclaimed(
    tmp_path: Path, reclaimer: str
) -> None:
    pidfile = tmp_path / "worker.pid"
    fake = tmp_path / "never-attaches"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    fake.chmod(0o700)
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_PARENT, str(fake), env=worker_env()
    )
    worker_pid = 0
    try:
        with anyio.fail_after(20):
            while not pidfile.exists() or not pidfile.read_text().strip():
                await asyncio.sleep(0.02)
        worker_pid = int(pidfile.read_text())
        parent.kill()  # SIGKILL: the objects made for the worker stay behind
        await parent.wait()
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if worker_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGKILL)
    (folder,) = _pool_dirs()
    kinds = sorted(rec.kind for _, rec in list_records(folder) if rec is not None)
    assert kinds == ["fifo", "fifo", "posix_sem", "posix_sem", "posix_sem", "posix_sem", "shm"]
    shmid = next(int(rec.ident) for _, rec in list_records(folder) if rec and rec.kind == "shm")
    assert shmid in sysv_table("shm")
    if reclaimer == "next pool":
        async with WorkerPool("pool_workers:setup", workers=1, transport="shm", env=worker_env()) as pool:
            assert (await pool.bus.request("echo", b"y", timeout=10)).data == b"y"
    else:
        gc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ipcbus", "gc", "--all", stdout=asyncio.subprocess.PIPE
        )
        out = (await gc.communicate())[0].decode()
        assert gc.returncode == 0 and "removed 7 object(s)" in out, out
    assert _pool_dirs() == []
    assert shmid not in sysv_table("shm")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("sem.ipcbus.")]
