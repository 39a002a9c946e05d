"""Busy-polling while a reply is due, instead of sleeping at once.

A process that sleeps in ``epoll_wait`` pays to be woken: on the 2-vCPU
virtual machines ipcbus is measured on, a sleeping CPU halts and the wake-up
costs 30-40 µs and more CPU time than the message itself.  Request/reply
traffic sleeps and wakes once per hop, so that cost, not the work, sets its
latency.

When a node sends a request, or passes one on (a hub), or receives frames
while replies are still due, its :class:`Spinner` keeps the event loop
polling (``epoll_wait`` with a zero timeout, every ready callback and task
still running as usual) for up to ``spin_us`` microseconds, and yields the
CPU (``sched_yield``) on every idle turn so that another runnable process on
the same CPU goes first.  A reply that comes back meanwhile is picked up
without a wake-up.  Polling stops as soon as no reply is due, or when the
window passes with nothing new; then the loop sleeps as before.  A node that
served a request polls for a quarter of the window (:meth:`Spinner.answered`):
requests come in runs, and the next one then costs no wake-up either.  Idle
responders cost nothing.  (SysV links linger longer: see :meth:`Spinner.linger`.)

The same pattern appears elsewhere as spin-then-park: the Go scheduler,
Aeron's idle strategies, Linux ``SO_BUSY_POLL``.  The cost is CPU on the
waiting side, for at most the time a reply takes (often less CPU per request
than a wake-up costs, see docs/concepts.md).  With a single usable CPU,
spinning only delays the peer that has to answer, so it is off whenever the
process's affinity allows fewer than two CPUs.  With more runnable processes
than CPUs, polling would take CPU time from processes that have work: a
yield that comes back late (another process ran for a whole time slice) ends
the window, and when that repeats, the spinner ignores kicks for a growing
while (see :class:`Spinner`).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from typing import Final

__all__ = ["BACKOFF_MS", "DEFAULT_SPIN_US", "SPIN_ENV", "Spinner", "spin_window"]

DEFAULT_SPIN_US: Final = 200.0
"""Default busy-poll window in microseconds (see :mod:`ipcbus.spin`)."""

SPIN_ENV: Final = "IPCBUS_SPIN_US"
"""Environment variable that sets the window when no ``spin_us`` is given; ``0`` turns spinning off."""

_MAX_SPIN_US: Final = 1_000_000.0

BACKOFF_MS: Final = 20
"""The longest time kicks are ignored after polling kept giving way to other processes."""

_BACKOFF_NS: Final = BACKOFF_MS * 1_000_000
_SHARED_NS: Final = 250_000  # a yield this slow let a busy process run


def spin_window(spin_us: float | None = None) -> float:
    """The busy-poll window to use, in microseconds.

    ``spin_us`` if given, else ``$IPCBUS_SPIN_US``, else
    :data:`DEFAULT_SPIN_US`; always ``0.0`` (off) when this process may run
    on fewer than two CPUs.  Raises ``ValueError`` for a negative, non-finite
    or unparsable value, or one above a second.
    """
    source = "spin_us"
    if spin_us is None:
        raw = os.environ.get(SPIN_ENV, "").strip()
        if not raw:
            spin_us = DEFAULT_SPIN_US
        else:
            source = f"${SPIN_ENV}"
            try:
                spin_us = float(raw)
            except ValueError:
                raise ValueError(
                    f"{SPIN_ENV}={raw!r} is not a number of microseconds; "
                    f"unset it, or set e.g. {SPIN_ENV}=200 (0 turns spinning off)"
                ) from None
    if isinstance(spin_us, bool) or not isinstance(spin_us, int | float):
        raise TypeError(f"spin_us must be a number of microseconds, not {type(spin_us).__name__}")
    if not math.isfinite(spin_us) or spin_us < 0 or spin_us > _MAX_SPIN_US:
        raise ValueError(
            f"{source} must be between 0 (off) and {_MAX_SPIN_US:.0f} microseconds, not {spin_us!r}"
        )
    if spin_us and _usable_cpus() < 2:
        return 0.0
    return float(spin_us)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class Spinner:
    """Keeps one event loop polling for ``window_us`` after each :meth:`kick`.

    ``waiting``, if given, says whether anything is expected (a node: replies
    to requests in flight); polling stops as soon as it returns false.
    While the window is open, one callback re-schedules itself on every loop
    turn (so the loop polls with a zero timeout) and, on a turn that found
    nothing to do (no kick since the last one), yields the CPU.  When a
    yield comes back late, another process ran on this CPU meanwhile, and
    the window closes at once.  When that happens in consecutive windows, the
    machine has more runnable processes than CPUs and polling would only take
    CPU time from them: kicks are then ignored for 1 ms, 2 ms, 4 ms, ... up
    to :data:`BACKOFF_MS`, until a window passes with the CPU to itself.
    """

    __slots__ = (
        "_active",
        "_answer_window",
        "_kicks",
        "_linger_until",
        "_loop",
        "_quiet_until",
        "_seen",
        "_strikes",
        "_until",
        "_waiting",
        "_window",
        "backoffs",
        "gave_way",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        window_us: float,
        waiting: Callable[[], object] | None = None,
    ) -> None:
        self._loop = loop
        self._waiting = waiting
        self._window = int(window_us * 1000)
        self._until = 0
        self._linger_until = 0
        self._answer_window = self._window // 4
        self._kicks = 0
        self._seen = 0  # _kicks as of the last turn: a change means a kick in between
        self._quiet_until = 0
        self._strikes = 0
        self._active = False
        self.backoffs = 0
        """How often kicks were then ignored for a while (the CPU stayed contended)."""
        self.gave_way = 0
        """How often a window closed early because another process needed the CPU."""

    @property
    def active(self) -> bool:
        """Whether the loop is polling right now."""
        return self._active

    def kick(self) -> None:
        """Activity: keep polling until ``window_us`` from now."""
        # A requester kicks once per request: while polling, a kick only counts,
        # and the next turn (which reads the clock anyway) extends the window.
        self._kicks += 1
        if not self._active:
            now = time.monotonic_ns()
            self._poll(now, now + self._window)

    def linger(self) -> None:
        """Like :meth:`kick`, but poll for the window even if nothing is ``waiting``.

        For work that usually comes in runs: a node that received frames over
        a link whose frames reach the loop through a thread
        (:attr:`ipcbus.transports.base.Link.poll_after_request`) polls for the
        next ones, which the link then takes without its thread
        (:attr:`ipcbus.transports.base.Link.keep_polling`).
        """
        now = time.monotonic_ns()
        self._poll(now, now + self._window)
        self._linger_until = self._until

    def answered(self) -> None:
        """A request was served here: poll for :attr:`answer_window_us`, waiting or not.

        Requests come in runs (a pool's parent keeps many in flight, a client
        sends the next one as soon as the reply is in): the next one then
        costs no wake-up.  A quarter of the window, so that an isolated
        request costs its responder little CPU (see docs/concepts.md).
        """
        now = time.monotonic_ns()
        until = now + self._answer_window
        self._poll(now, until)
        if until > self._linger_until:
            self._linger_until = until

    @property
    def answer_window_us(self) -> float:
        """How long a responder polls after serving a request, in microseconds."""
        return self._answer_window / 1000

    def _poll(self, now: int, until: int) -> None:
        """Poll until ``until`` at least (monotonic ns), unless backing off."""
        if until > self._until:
            self._until = until
        if not self._active and now >= self._quiet_until:
            self._active = True
            self._loop.call_soon(self._spin)

    def close(self) -> None:
        """Stop polling (within two loop turns; later kicks poll no longer than that)."""
        self._until = self._linger_until = 0
        self._window = self._answer_window = 0  # a kick seen on the next turn extends nothing

    def _spin(self) -> None:
        t = time.monotonic_ns()
        if self._kicks != self._seen:  # kicked since the last turn: busy, not waiting
            self._seen = self._kicks
            until = t + self._window  # the kicks' window (kick() leaves it to this turn)
            if until > self._until:
                self._until = until
            self._loop.call_soon(self._spin)
            return
        if t >= self._until:
            self._active = False
            self._strikes = 0  # a whole window with the CPU to itself
            return
        if self._waiting is not None and t >= self._linger_until and not self._waiting():
            self._active = False  # nothing is expected any more
            return
        os.sched_yield()
        if time.monotonic_ns() - t > _SHARED_NS:
            # Someone else ran on this CPU meanwhile: it needs the CPU.
            self._active = False
            self.gave_way += 1
            self._strikes += 1
            if self._strikes > 1:
                self._quiet_until = t + min(_BACKOFF_NS, 1_000_000 << min(self._strikes - 2, 8))
                self.backoffs += 1
            return
        self._loop.call_soon(self._spin)
