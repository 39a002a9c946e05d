"""Typed messages on a raw System V queue, between Python (asyncio) and C.

The C side is tests/c/msgq_peer.c, the Linux IPC guide's msgsnd example: a
message is a ``long`` type and a 256-byte text.  It receives type-1
messages and answers each with a type-2 message "C got: <text>", then says
"bye" with type 3.  If no C compiler is available, a Python stand-in speaks
the same protocol.

Run:  python examples/sysv_typed_messages.py

What it shows:
* ``await q.send(data, type=n)`` / ``await q.receive(type=t)`` never block the
  event loop, and ``receive(type=...)`` selects messages like ``msgrcv``
  (0 = first, n = that type, -n = lowest type <= n);
* ``q.stat()`` reads ``msqid_ds`` (depth, bytes, last sender pid...);
* the queue outlives its processes until ``await q.remove()``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ipcbus.sysv import MessageQueue

C_SOURCE = Path(__file__).resolve().parent.parent / "tests" / "c" / "msgq_peer.c"
TEXT = 256  # sizeof(struct custom_msg.msg_data) in the C program


def c_text(s: str) -> bytes:
    """Encode like the C struct: 256 bytes, NUL-terminated and NUL-padded."""
    raw = s.encode()[: TEXT - 1]
    return raw + b"\0" * (TEXT - len(raw))


def from_c(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode()


PY_PEER = r"""
import asyncio, sys
from ipcbus.sysv import MessageQueue
async def main(key, count):
    async with MessageQueue.open(key) as q:
        for _ in range(count):
            m = await q.receive(type=1)
            text = m.data.split(b"\0", 1)[0].decode()
            reply = ("python peer got: " + text).encode()[:255]
            await q.send(reply + b"\0" * (256 - len(reply)), type=2)
        await q.send(b"bye" + b"\0" * 253, type=3)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def peer_command(workdir: Path, key: int, count: int) -> list[str]:
    """The C peer if it can be compiled here, else the Python stand-in."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc and C_SOURCE.exists():
        exe = workdir / "msgq_peer"
        subprocess.run([cc, "-O2", "-o", str(exe), str(C_SOURCE)], check=True)
        return [str(exe), str(key), str(count)]
    return [sys.executable, "-c", PY_PEER, str(key), str(count)]


async def main() -> None:
    texts = ["hello from asyncio", "SysV types select messages", "third"]
    async with MessageQueue.create(mode=0o600) as q:  # a fresh queue, random key
        try:
            print(f"queue id {q.id}, key {q.key:#x}")
            for t in texts:
                await q.send(c_text(t), type=1)
            await q.send(b"left for later", type=9)  # the peer never asks for type 9
            with tempfile.TemporaryDirectory() as d:
                cmd = peer_command(Path(d), q.key, len(texts))
                peer = await asyncio.create_subprocess_exec(*cmd)
                for _ in texts:
                    reply = await q.receive(type=2)
                    print(f"type {reply.type}: {from_c(reply.data)}")
                bye = await q.receive(type=3)
                print(f"type {bye.type}: {from_c(bye.data)}")
                await peer.wait()
            st = q.stat()
            print(
                f"still queued: {st.messages} message(s), {st.bytes} bytes; "
                f"last sender pid {st.last_send_pid} (the peer was {peer.pid})"
            )
            later = await q.receive(type=-10)  # lowest type <= 10
            print(f"type {later.type}: {later.data.decode()}")
        finally:
            await q.remove()  # SysV queues persist until removed


if __name__ == "__main__":
    asyncio.run(main())
