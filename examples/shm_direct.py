"""Two processes over a direct shared-memory link, moving large frames.

No hub: the parent creates the link (a SysV segment with two rings and four
POSIX semaphores), hands its parameters to a child on the command line, and
the child attaches.  The parent then streams 16 MiB frames — twice the size
of the 8 MiB ring, so each one is cut into pieces and reassembled whole —
and the child answers each with its CRC-32.

    python examples/shm_direct.py

See docs/transports/shm.md for the layout and the handshake.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import zlib

from ipcbus.errors import EndOfStream
from ipcbus.transports.shm import ShmLink

FRAME = 16 * 1024 * 1024
COUNT = 16


async def child(params: dict[str, int | str], parent_pid: int) -> None:
    """Attach to the parent's link and answer every frame with its CRC-32."""
    link = await ShmLink.attach(params, peer_pid=parent_pid)
    async with link:
        try:
            while True:
                frame = await link.recv()  # bytes (a Msg only for a node's links)
                assert isinstance(frame, bytes)
                await link.send(b"%d %d" % (len(frame), zlib.crc32(frame)))
        except EndOfStream:  # the parent closed the link: we are done
            pass


async def parent() -> None:
    link, params = ShmLink.create(None)  # busdir=None: a private link, not recorded on a bus
    async with link:
        # Any channel will do to hand over the params; here: the child's argv.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child", json.dumps(params), str(os.getpid())
        )
        try:
            # Returns once the child has attached.  From then on the segment is
            # marked IPC_RMID and the semaphore names are unlinked: whichever
            # process dies, the kernel frees everything.
            await link.wait_attached(peer_pid=proc.pid)
            print("child attached")  # child attached
            payload = bytearray(os.urandom(FRAME))
            t0 = time.perf_counter()
            for i in range(COUNT):
                payload[:8] = i.to_bytes(8, "big")  # make every frame different
                frame = bytes(payload)
                await link.send(frame)
                answer = await link.recv()
                assert isinstance(answer, bytes)
                size, crc = map(int, answer.split())
                assert size == FRAME and crc == zlib.crc32(frame), f"frame {i} corrupted"
            secs = time.perf_counter() - t0
            print(f"{COUNT} frames checked by the child")  # 16 frames checked by the child
            print(f"  {COUNT * FRAME / secs / 1e6:.0f} MB/s, CRC included", file=sys.stderr)
        finally:
            await link.aclose()  # the child sees end of stream and exits
            await proc.wait()
    print("link closed, nothing left behind")  # link closed, nothing left behind


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        asyncio.run(child(json.loads(sys.argv[2]), int(sys.argv[3])))
    else:
        asyncio.run(parent())
