"""The anonymous-pipe transport: two ``pipe()`` pairs between a parent and its child.

Rendezvous is inheritance: the parent creates both pipes, passes the child's
ends to it (``pass_fds``), and closes them itself right after spawning, so
that end of stream and EPIPE work (a pipe only reports EOF once *every*
write end is closed, including a forgotten copy in the parent).

Each pipe is enlarged with ``F_SETPIPE_SZ`` (1 MiB where the system allows
it unprivileged; measured here to triple throughput over the 64 KiB
default).  All fds are close-on-exec except the ones deliberately passed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass

from ..frames import DEFAULT_MAX_FRAME
from .base import DEFAULT_HIGH_WATER
from .stream import FdStreamLink

__all__ = ["DEFAULT_PIPE_SIZE", "ChildPipes", "PipeLink", "enlarge_pipe", "pipe_pair"]

DEFAULT_PIPE_SIZE = 1 << 20


def enlarge_pipe(fd: int, size: int = DEFAULT_PIPE_SIZE) -> int:
    """Ask the kernel for a ``size``-byte pipe buffer; return the size obtained.

    Unprivileged processes may go up to ``/proc/sys/fs/pipe-max-size``; past
    that (EPERM) or on a kernel without ``F_SETPIPE_SZ`` the pipe keeps its
    current size.
    """
    setsz = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    getsz = getattr(fcntl, "F_GETPIPE_SZ", 1032)
    while size >= 65536:
        try:
            return fcntl.fcntl(fd, setsz, size)
        except OSError:
            size //= 2
    with contextlib.suppress(OSError):
        return fcntl.fcntl(fd, getsz)
    return 0


class PipeLink(FdStreamLink):
    """A link over two anonymous pipes (parent and child)."""

    def __init__(
        self,
        rfd: int,
        wfd: int,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        high_water: int = DEFAULT_HIGH_WATER,
        peer_pid: int | None = None,
    ) -> None:
        super().__init__(
            rfd,
            wfd,
            transport="pipe",
            max_frame=max_frame,
            high_water=high_water,
            peer_pid=peer_pid,
            peer_uid=os.getuid(),
            objects={"rfd": rfd, "wfd": wfd},
        )


@dataclass
class ChildPipes:
    """The four fds of a parent/child pipe link, before the child is spawned.

    Pass :attr:`child_fds` to the child (``pass_fds=``) with their numbers
    (e.g. in argv), then call :meth:`parent_link` after spawning: it closes
    the child's ends in this process and returns the parent's link.  If the
    spawn failed, call :meth:`close` instead.
    """

    parent_r: int
    parent_w: int
    child_r: int
    child_w: int

    @classmethod
    def create(cls, pipe_size: int = DEFAULT_PIPE_SIZE) -> ChildPipes:
        """Create both pipes (close-on-exec) and enlarge them."""
        down_r, down_w = os.pipe2(os.O_CLOEXEC)  # parent -> child
        up_r, up_w = os.pipe2(os.O_CLOEXEC)  # child -> parent
        for fd in (down_w, up_w):
            enlarge_pipe(fd, pipe_size)
        return cls(parent_r=up_r, parent_w=down_w, child_r=down_r, child_w=up_w)

    @property
    def child_fds(self) -> tuple[int, int]:
        """(read fd, write fd) for the child."""
        return (self.child_r, self.child_w)

    def close_child_ends(self) -> None:
        """Close the child's ends in this process (after the spawn)."""
        for fd in (self.child_r, self.child_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.child_r = self.child_w = -1

    def parent_link(
        self,
        *,
        peer_pid: int | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> PipeLink:
        """Close the child's ends here and wrap the parent's ends in a link."""
        self.close_child_ends()
        link = PipeLink(
            self.parent_r,
            self.parent_w,
            max_frame=max_frame,
            high_water=high_water,
            peer_pid=peer_pid,
        )
        self.parent_r = self.parent_w = -1
        return link

    def close(self) -> None:
        """Close every fd still held (a failed spawn)."""
        self.close_child_ends()
        for fd in (self.parent_r, self.parent_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.parent_r = self.parent_w = -1


def pipe_pair(
    *, max_frame: int = DEFAULT_MAX_FRAME, high_water: int = DEFAULT_HIGH_WATER
) -> tuple[PipeLink, PipeLink]:
    """Two connected pipe links in this process (for tests and benchmarks)."""
    p = ChildPipes.create()
    child = PipeLink(p.child_r, p.child_w, max_frame=max_frame, high_water=high_water)
    p.child_r = p.child_w = -1
    parent = p.parent_link(max_frame=max_frame, high_water=high_water)
    return parent, child
