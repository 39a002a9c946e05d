"""Keep the C heap from being returned to the kernel after every large frame.

glibc's ``free()`` gives the top of the heap back to the kernel (``brk``
shrinks) once more than ``M_TRIM_THRESHOLD`` bytes are free there.  A process
that receives large frames allocates and frees a few megabytes per message
(the frame, then the payload the user keeps), so the heap grows and shrinks
on every message and every page of it is faulted in again: measured on a
1 MiB stream over shared memory, 330 µs of page faults per message, more
than the copies themselves.  Raising ``M_TOP_PAD`` keeps that much free
memory at the top of the heap: the first large message faults it in, later
ones reuse it.

:func:`keep_heap` does that once per process; the shared-memory transport
(the one meant for large frames) calls it when a link is made, and any
program that moves large payloads over another transport may call it.  The
cost is up to ``pad`` bytes of free heap that stay mapped.  Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Final

from .checks import check_count

__all__ = ["HEAP_PAD", "keep_heap"]

HEAP_PAD: Final = 64 * 1024 * 1024
"""Free heap kept mapped by :func:`keep_heap` unless ``IPCBUS_HEAP_PAD`` says otherwise."""

_M_TRIM_THRESHOLD: Final = -1
_M_TOP_PAD: Final = -2
_M_MMAP_THRESHOLD: Final = -3
_MMAP_THRESHOLD_MAX: Final = 32 * 1024 * 1024  # glibc's ceiling on 64-bit

_done = False


def keep_heap(pad: int | None = None) -> bool:
    """Keep ``pad`` bytes of free heap mapped (glibc ``M_TOP_PAD``/``M_TRIM_THRESHOLD``).

    ``pad`` defaults to ``$IPCBUS_HEAP_PAD`` or :data:`HEAP_PAD`; ``0`` leaves
    the allocator alone.  Applied once per process; returns True if the
    allocator took the setting.  Raises ``TypeError`` for a ``pad`` that is
    not an int and ``ValueError`` for a negative one.
    """
    global _done
    if pad is not None:
        pad = check_count("pad", pad, 0, "bytes")
    if _done:
        return True
    if pad is None:
        env = os.environ.get("IPCBUS_HEAP_PAD", "")
        try:
            pad = int(env) if env else HEAP_PAD
        except ValueError:
            raise ValueError(
                f"IPCBUS_HEAP_PAD must be a number of bytes, not {env!r}; unset it for the default"
            ) from None
    if pad <= 0:  # 0, or a negative $IPCBUS_HEAP_PAD: leave the allocator alone
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    pad = min(pad, 2**31 - 1)
    # Setting any of these turns off glibc's own (dynamic) mmap threshold, so
    # set it too: blocks up to 32 MiB come from the heap, larger ones are mapped.
    ok = (
        bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
        and bool(mallopt(_M_TOP_PAD, pad))
        and bool(mallopt(_M_TRIM_THRESHOLD, pad))
    )
    _done = ok
    return ok
