"""WorkerPool over shared-memory rings: large payloads, clean kernel state.

Crashes, a dead parent and the records of killed pools are tested for every
pool transport in test_pool.py.
"""

from __future__ import annotations

import os
import zlib

import pytest

from ipcbus import WorkerPool

try:
    from test_pool import pool_dirs, worker_env
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.test_pool import pool_dirs, worker_env

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


async def test_unknown_pool_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown pool transport 'tcp'"):
        WorkerPool("pool_workers:setup", transport="tcp")


async def test_a_shm_pool_leaves_no_records_folder() -> None:
    async with WorkerPool("pool_workers:setup", workers=1, transport="shm", env=worker_env()) as pool:
        assert (await pool.bus.request("echo", b"x", timeout=10)).data == b"x"
    assert pool_dirs() == []

