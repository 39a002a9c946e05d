"""ipcbus.keep_heap: large frames stop re-faulting the heap (measured in page faults)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ipcbus

# Each run is a fresh process: the setting is process-wide and applied once.
_CHILD = """
import resource, sys
import ipcbus
ok = ipcbus.keep_heap(int(sys.argv[1]))
if sys.argv[2] == "trim":
    import ctypes
    trim = ctypes.CDLL(None).malloc_trim
else:
    trim = None
def cycle():
    # A received 1 MiB frame, then the payload kept from it: two large blocks
    # allocated and freed per message.
    a = b"x" * (1 << 20)
    b = a + b"y"
    del a
    c = b + b"z"
    del b, c
    if trim is not None:
        trim(0)
for _ in range(5):
    cycle()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    cycle()
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(ok, (f1 - f0) / 100)
"""


def _faults_per_cycle(pad: int, then: str = "") -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(pad), then or "-"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()
    return out[0] == "True", float(out[1])


def test_keep_heap_stops_page_faults_per_large_message() -> None:
    took, faults = _faults_per_cycle(64 << 20)
    if not took:
        pytest.skip("not glibc: keep_heap has nothing to tune")
    assert faults < 16, f"{faults} page faults per 1 MiB message with the heap kept"
    # The measure sees the faults of a heap handed back after each message:
    # what glibc does by itself whenever the freed blocks end at the top of
    # the heap (trimmed here at each message, so as not to depend on what the
    # interpreter happened to allocate before: an unrelated import changed it).
    untouched, before = _faults_per_cycle(0, "trim")
    assert not untouched
    assert before > 10 * max(faults, 1), (before, faults)


def test_keep_heap_is_applied_once_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipcbus import heap

    monkeypatch.setattr(heap, "_done", False)
    monkeypatch.setenv("IPCBUS_HEAP_PAD", "0")
    assert ipcbus.keep_heap() is False  # 0: leave the allocator alone
    monkeypatch.setenv("IPCBUS_HEAP_PAD", "lots")
    with pytest.raises(ValueError, match="IPCBUS_HEAP_PAD must be a number of bytes"):
        ipcbus.keep_heap()
    monkeypatch.delenv("IPCBUS_HEAP_PAD")
    took = ipcbus.keep_heap()
    assert ipcbus.keep_heap() is took  # a second call changes nothing


def test_keep_heap_refuses_a_bad_pad(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipcbus import heap

    monkeypatch.setattr(heap, "_done", False)
    with pytest.raises(TypeError, match="pad must be an int"):
        ipcbus.keep_heap("x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pad must be at least 0 \(bytes\), not -1"):
        ipcbus.keep_heap(-1)
    assert ipcbus.keep_heap(0) is False  # 0: leave the allocator alone
