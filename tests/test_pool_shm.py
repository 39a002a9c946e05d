"""WorkerPool over shared-memory rings: large payloads, crash and restart, clean kernel state."""

from __future__ import annotations

import os
import signal
import zlib

import pytest

import ipcbus
from ipcbus import WorkerCrashed, WorkerPool, WorkerStartError

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
