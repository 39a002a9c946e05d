"""The benchmark runner behind ``make bench`` / ``python -m ipcbus.bench``.

It plans every measurement (table x row x size x pinning x repeat), runs each
one as a fresh driver process (``python -m ipcbus.bench.workloads run ...``,
see :mod:`ipcbus.bench.workloads`), collects the JSON each prints, and shows
one table per workload: medians over the repeats with their spread (min-max),
unpinned and pinned side by side, a ratio against the table's baseline
measured in the same run, and the issue's target next to the rows that have
one.

Repeats are interleaved (repeat 1 of everything, then repeat 2...) so that a
noisy minute on the machine spreads over every row instead of sinking one.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import msgspec
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ipcbus.bench.workloads import DRIVERS, MODULE, Outcome, Params
from ipcbus.testing import host_lock, own_kernel_objects, remove_kernel_objects

__all__ = [
    "TABLES",
    "TARGETS",
    "BenchTable",
    "Job",
    "RowResult",
    "Target",
    "cli",
    "main",
    "plan",
    "run_jobs",
]

KiB = 1024
MiB = 1024 * 1024

# ---------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal from the issues: ``impl``'s ``metric`` vs ``baseline``'s, same size and run."""

    table: str
    impl: str
    size: int
    metric: str
    baseline: str
    op: str  # ">=" (higher is better) or "<=" (lower is better)
    ratio: float
    issue: int

    def label(self) -> str:
        """``"≥ 1.0x mp.Pipe"``."""
        sign = "≥" if self.op == ">=" else "≤"
        return f"target {sign} {self.ratio:g}x {self.baseline}"

    def met(self, ratio: float) -> bool:
        """Whether a measured ratio meets the target."""
        return ratio >= self.ratio if self.op == ">=" else ratio <= self.ratio


@dataclass(frozen=True)
class Row:
    """One implementation in a table, at the payload sizes it is measured at."""

    impl: str
    sizes: tuple[int, ...] = (64,)
    quick: tuple[int, ...] | None = None
    """Sizes measured under ``--quick`` (None: the same as ``sizes``; () skips the row)."""

    def sizes_for(self, quick: bool) -> tuple[int, ...]:
        """The sizes measured in this run."""
        return self.quick if quick and self.quick is not None else self.sizes


@dataclass(frozen=True)
class BenchTable:
    """One printed table: a workload, its rows, its baseline(s) and how long to measure."""

    key: str
    workload: str
    title: str
    metric: str
    extra: tuple[str, ...]
    higher_is_better: bool
    baselines: tuple[tuple[int, str], ...]
    """``(from_size, impl)``: the ratio column's reference for sizes >= from_size."""
    rows: tuple[Row, ...]
    count: Callable[[int, bool], int]
    """``count(size, quick)``: messages or requests per measurement (a cap when
    ``duration`` is set)."""
    duration: tuple[float, float] = (0.0, 0.0)
    """Seconds of timed sending per measurement: (default run, ``--quick``); 0 = exact count."""
    inflight: int = 1

    def baseline_for(self, size: int) -> str:
        """The implementation the ratio column compares against at ``size``."""
        base = self.baselines[0][1]
        for start, impl in self.baselines:
            if size >= start:
                base = impl
        return base

    def params(self, size: int, quick: bool, pinned: bool) -> Params:
        """The :class:`Params` of one measurement."""
        n = self.count(size, quick)
        return Params(
            size=size,
            count=n,
            warmup=max(2, min(200, n // 10, 64 * MiB // size)),
            inflight=self.inflight,
            pinned=pinned,
            duration=self.duration[1] if quick else self.duration[0],
        )


# W1-W3 are timed (``duration``): their counts are only caps.  W4 is the
# issue's fixed 20,000 requests.
_SMALL = (64, KiB, 64 * KiB)

TABLES: tuple[BenchTable, ...] = (
    BenchTable(
        key="W1",
        workload="W1",
        title="W1 one-way stream, parent -> child",
        metric="msgs_s",
        extra=("mb_s",),
        higher_is_better=True,
        baselines=((0, "mp.Pipe"), (MiB, "zmq PUSH/PULL")),
        rows=(
            Row("os.pipe", (64, KiB, 64 * KiB, MiB)),
            Row("mp.Pipe", _SMALL),
            Row("uvloop unix", _SMALL, quick=(64, KiB)),
            Row("zmq PUSH/PULL", (64, KiB, 64 * KiB, MiB, 16 * MiB), quick=(64, KiB, MiB)),
            Row("sysv_ipc raw", (64, KiB), quick=(KiB,)),  # one msgsnd: <= msgmax (8 KiB)
            Row("memcpy", (64 * KiB, MiB, 16 * MiB), quick=(MiB,)),
            Row("shm link (raw)", (64, 64 * KiB, MiB, 16 * MiB), quick=(64, MiB)),
            Row("pipe link (raw)", (64, MiB), quick=()),
            Row("ipcbus pipe", (64, KiB, 64 * KiB, MiB, 16 * MiB), quick=(64, KiB, 64 * KiB, MiB)),
            Row("ipcbus hub+fifo", (64, 64 * KiB), quick=(64,)),
            Row("ipcbus hub+sysv", _SMALL, quick=(KiB,)),
            Row("ipcbus pool+sysv", _SMALL, quick=(KiB,)),
            Row("ipcbus pool+shm", (64, 64 * KiB, MiB, 16 * MiB), quick=(64, MiB)),
            Row("ipcbus hub+shm", (64 * KiB, MiB), quick=(MiB,)),
        ),
        count=lambda size, quick: min(2_000_000, max(16, 4096 * MiB // size)),
        duration=(0.2, 0.1),
    ),
    BenchTable(
        key="W2",
        workload="W2",
        title="W2 request/reply 64 B, sequential",
        metric="p50_us",
        extra=("p99_us",),
        higher_is_better=False,
        baselines=((0, "mp.Pipe"),),
        rows=(
            Row("os.pipe"),
            Row("mp.Pipe"),
            Row("uvloop unix"),
            Row("zmq REQ/REP"),
            Row("NATS"),
            Row("sysv_ipc raw"),
            Row("shm link (raw)"),
            Row("ipcbus pipe"),
            Row("ipcbus hub+fifo"),
            Row("ipcbus hub+sysv"),
            Row("ipcbus pool+sysv"),
            Row("ipcbus pool+shm"),
            Row("ipcbus hub+shm"),
        ),
        count=lambda size, quick: 20_000,
        duration=(0.4, 0.25),
    ),
    BenchTable(
        key="W2x",
        workload="W2x",
        title="W2 request/reply 64 B, 32 in flight",
        metric="req_s",
        extra=(),
        higher_is_better=True,
        baselines=((0, "uvloop unix"),),
        rows=(
            Row("uvloop unix"),
            Row("zmq DEALER/ROUTER"),
            Row("NATS"),
            Row("ipcbus pipe"),
            Row("ipcbus hub+fifo"),
        ),
        count=lambda size, quick: 200_000,
        duration=(0.3, 0.2),
        inflight=32,
    ),
    BenchTable(
        key="W3",
        workload="W3",
        title="W3 fan-out 64 B, 1 publisher -> 3 subscriber processes (delivered)",
        metric="delivered_s",
        extra=("loss",),
        higher_is_better=True,
        baselines=((0, "NATS"),),
        rows=(
            Row("NATS"),
            Row("zmq PUB/SUB"),
            Row("ipcbus hub+fifo"),
            Row("ipcbus hub+sysv", quick=()),
            Row("ipcbus hub+shm", quick=()),
        ),
        count=lambda size, quick: 1_000_000,
        duration=(0.3, 0.15),
    ),
    BenchTable(
        key="W4",
        workload="W4",
        title="W4 worker pool, 2 workers, echo 64 B, 64 in flight",
        metric="req_s",
        extra=(),
        higher_is_better=True,
        baselines=((0, "ProcessPoolExecutor"),),
        rows=(Row("ProcessPoolExecutor"), Row("ipcbus pool")),
        count=lambda size, quick: 3_000 if quick else 20_000,
        inflight=64,
    ),
)
"""Every table ``make bench`` prints, in order."""

TARGETS: tuple[Target, ...] = (
    # issue 2 (core: pipe transport, pool)
    Target("W1", "ipcbus pipe", 64, "msgs_s", "mp.Pipe", ">=", 1.0, 2),
    Target("W2", "ipcbus pipe", 64, "p50_us", "mp.Pipe", "<=", 1.5, 2),
    Target("W2x", "ipcbus pipe", 64, "req_s", "uvloop unix", ">=", 1.0, 2),
    Target("W4", "ipcbus pool", 64, "req_s", "ProcessPoolExecutor", ">=", 10.0, 2),
    # issue 3 (hub + FIFO)
    Target("W3", "ipcbus hub+fifo", 64, "delivered_s", "NATS", ">=", 1.0, 3),
    Target("W2", "ipcbus hub+fifo", 64, "p50_us", "NATS", "<=", 0.5, 3),
    # issue 4 (SysV)
    Target("W2", "ipcbus hub+sysv", 64, "p50_us", "sysv_ipc raw", "<=", 1.3, 4),
    Target("W1", "ipcbus hub+sysv", KiB, "msgs_s", "sysv_ipc raw", ">=", 0.7, 4),
    # ... and over one SysV link (a pool worker), as the raw baseline is
    Target("W2", "ipcbus pool+sysv", 64, "p50_us", "sysv_ipc raw", "<=", 1.3, 4),
    Target("W1", "ipcbus pool+sysv", KiB, "msgs_s", "sysv_ipc raw", ">=", 0.7, 4),
    # issue 5 (shared memory): direct shm link vs the pipe transport and pyzmq
    Target("W1", "ipcbus pool+shm", MiB, "mb_s", "zmq PUSH/PULL", ">=", 1.5, 5),
    Target("W1", "ipcbus pool+shm", MiB, "mb_s", "ipcbus pipe", ">=", 2.0, 5),
    Target("W1", "ipcbus pool+shm", 64, "msgs_s", "ipcbus pipe", ">=", 0.8, 5),
)
"""The performance targets of issues 2-5, each a ratio measured in one run."""


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One measurement: one fresh driver process."""

    table: BenchTable
    impl: str
    size: int
    pinned: bool
    repeat: int
    params: Params

    @property
    def cell(self) -> tuple[str, str, int, bool]:
        """The result cell this job contributes a sample to."""
        return (self.table.key, self.impl, self.size, self.pinned)

    def describe(self) -> str:
        """Short text for the progress line."""
        pin = "pinned" if self.pinned else "unpinned"
        return f"{self.table.key} {fmt_size(self.size)} {self.impl} ({pin}, #{self.repeat + 1})"


@dataclass
class RowResult:
    """The samples of one (table, impl, size, pinning) cell."""

    table: str
    impl: str
    size: int
    pinned: bool
    runs: list[dict[str, float]] = field(default_factory=list)
    status: str = "pending"
    reason: str = ""
    errors: int = 0
    stderr: str = ""
    """The tail of the driver's stderr at the last error (for ``--json``)."""
    wall: float = 0.0
    """Seconds spent on this cell, process start-up and tear-down included."""

    def median(self, metric: str) -> float | None:
        """Median of ``metric`` over the successful runs."""
        vals = [r[metric] for r in self.runs if metric in r]
        return statistics.median(vals) if vals else None

    def spread(self, metric: str) -> tuple[float, float] | None:
        """(min, max) of ``metric`` over the successful runs."""
        vals = [r[metric] for r in self.runs if metric in r]
        return (min(vals), max(vals)) if vals else None

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        metrics = sorted({k for r in self.runs for k in r})
        return {
            "table": self.table,
            "impl": self.impl,
            "size": self.size,
            "pinned": self.pinned,
            "status": self.status,
            "reason": self.reason,
            "stderr": self.stderr,
            "runs": self.runs,
            "wall_s": round(self.wall, 3),
            "median": {m: self.median(m) for m in metrics},
            "min": {m: s[0] for m in metrics if (s := self.spread(m))},
            "max": {m: s[1] for m in metrics if (s := self.spread(m))},
        }


Results = dict[tuple[str, str, int, bool], RowResult]
"""Samples by cell: (table key, implementation, size, pinned)."""


def plan(
    tables: Sequence[BenchTable],
    *,
    repeats: int,
    quick: bool,
    pinnings: Sequence[bool],
    impl_filter: Sequence[str] = (),
) -> list[Job]:
    """Every measurement, repeats interleaved (all of repeat 1, then repeat 2...)."""
    jobs: list[Job] = []
    for rep in range(repeats):
        for table in tables:
            for row in table.rows:
                if (table.workload, row.impl) not in DRIVERS:
                    raise KeyError(f"table {table.key} lists {row.impl!r}, which has no driver")
                if impl_filter and not _is_reference(table, row.impl) and not any(
                    f.lower() in row.impl.lower() for f in impl_filter
                ):
                    continue
                for size in row.sizes_for(quick):
                    for pinned in pinnings:
                        p = table.params(size, quick, pinned)
                        jobs.append(Job(table, row.impl, size, pinned, rep, p))
    return jobs


def _is_reference(table: BenchTable, impl: str) -> bool:
    """Whether ``impl`` is a baseline of ``table`` or of one of its targets."""
    return any(b == impl for _, b in table.baselines) or any(
        t.table == table.key and t.baseline == impl for t in TARGETS
    )


def _child_env(rundir: str) -> dict[str, str]:
    """The environment for drivers (and so their peers), inside ``rundir``.

    The package is importable from any cwd.  ``TMPDIR`` points into
    ``rundir``, so the sockets, FIFOs and bus directories of a measurement
    that had to be killed are removed with it at the end of the run.
    Bytecode is cached in ``rundir`` even where the environment says
    ``PYTHONDONTWRITEBYTECODE``: a run starts well over a thousand
    interpreters, and recompiling ipcbus in each costs about 40 ms.
    """
    env = dict(os.environ)
    tmp = os.path.join(rundir, "tmp")
    os.makedirs(tmp, mode=0o700, exist_ok=True)
    env["TMPDIR"] = tmp
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(rundir, "pycache")
    return env


def run_one(job: Job, *, timeout: float, env: dict[str, str]) -> tuple[Outcome, str]:
    """Run one driver process; return its outcome and the tail of its stderr.

    The driver gets its own session, so on a timeout the whole measurement
    (driver, peers, servers) is killed as one process group.
    """
    cmd = [
        sys.executable,
        "-m",
        MODULE,
        "run",
        job.table.workload,
        job.impl,
        msgspec.json.encode(job.params).decode(),
    ]
    with host_lock():  # a test's leak check must not take this measurement's objects
        return _run_locked(cmd, timeout=timeout, env=env)


def _run_locked(cmd: list[str], *, timeout: float, env: dict[str, str]) -> tuple[Outcome, str]:
    # We hold the host lock: whatever appears meanwhile is this measurement's.
    before = own_kernel_objects()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        remove_kernel_objects(own_kernel_objects() - before)  # its finally blocks never ran
        return Outcome("timeout", reason=f"timed out after {timeout:g} s"), err.decode()[-2000:]
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    # A driver can also leave peers behind when it crashes: end its group.
    _kill_group(proc, quiet=True)
    tail = err.decode(errors="replace")[-2000:]
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        last = tail.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return Outcome("error", reason=f"driver printed nothing: {last[0]}"), tail
    try:
        return msgspec.json.decode(lines[-1], type=Outcome), tail
    except msgspec.DecodeError:
        return Outcome("error", reason=f"driver printed {lines[-1][:200]!r}"), tail


def _kill_group(proc: subprocess.Popen[bytes], quiet: bool = False) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if not quiet:
            proc.kill()


def run_jobs(
    jobs: Sequence[Job],
    console: Console,
    *,
    timeout: float = 300.0,
    verbose: bool = False,
    results: Results | None = None,
) -> Results:
    """Run every job with a rich progress display; collect the results by cell.

    An implementation that reports itself unavailable is not tried again
    (for any size or pinning); a cell that failed twice is skipped from then on.
    ``results``, when given, is filled in place (so a Ctrl-C keeps what ran).
    """
    results = {} if results is None else results
    unavailable: dict[tuple[str, str], str] = {}
    rundir = tempfile.mkdtemp(prefix="ipcbus-bench-run-")
    try:
        return _run_jobs(jobs, console, results, unavailable, _child_env(rundir), timeout, verbose)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _run_jobs(
    jobs: Sequence[Job],
    console: Console,
    results: Results,
    unavailable: dict[tuple[str, str], str],
    env: dict[str, str],
    timeout: float,
    verbose: bool,
) -> Results:
    for job in jobs:
        results.setdefault(job.cell, RowResult(job.table.key, job.impl, job.size, job.pinned))
    progress = Progress(
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    hung: dict[tuple[str, str], str] = {}  # rows with a measurement that timed out
    with progress:
        task = progress.add_task("benchmarks", total=len(jobs))
        for job in jobs:
            res = results[job.cell]
            key = (job.table.key, job.impl)
            if key in unavailable:
                res.status, res.reason = "unavailable", unavailable[key]
                progress.advance(task)
                continue
            if res.errors >= 2 or key in hung:
                # A row that hangs would cost the whole timeout for each of its
                # cells and repeats: one hang is enough to skip the rest of it.
                if key in hung and not res.runs:
                    res.status, res.reason = "error", hung[key]
                progress.advance(task)
                continue
            progress.update(task, description=job.describe())
            t_job = time.monotonic()
            outcome, tail = run_one(job, timeout=timeout, env=env)
            res.wall += time.monotonic() - t_job
            if outcome.status == "ok":
                res.runs.append(outcome.metrics)
                res.status = "ok"
            elif outcome.status == "unavailable":
                unavailable[key] = outcome.reason
                res.status, res.reason = "unavailable", outcome.reason
            else:
                res.errors += 1
                if res.status != "ok":
                    res.status = "error"
                res.reason = outcome.reason
                if outcome.status == "timeout":
                    hung[key] = f"skipped: a measurement of this row {outcome.reason}"
                res.stderr = tail
                console.log(Text(f"{job.describe()}: {outcome.reason}"[:300], style="red"))
                if verbose and tail.strip():
                    console.log(Text(tail.strip()[-1500:], style="dim"))
            progress.advance(task)
    # Cells skipped after their implementation turned out unavailable.
    for res in results.values():
        key = (res.table, res.impl)
        if key in unavailable and not res.runs:
            res.status, res.reason = "unavailable", unavailable[key]
    return results


# ---------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------


def fmt_size(n: int) -> str:
    """64 B, 1 KiB, 64 KiB, 1 MiB..."""
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def _unit(x: float) -> tuple[float, str]:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return div, suffix
    return 1.0, ""


def fmt_num(x: float | None, metric: str = "") -> str:
    """Human figures: 1.36M, 158k, 313 (µs), 2.1% (loss)."""
    if x is None:
        return "-"
    if metric == "loss":
        return f"{x * 100:.1f}%"
    if metric.endswith("_us"):
        return f"{x:.1f}" if x < 100 else f"{x:.0f}"
    div, suffix = _unit(x)
    return f"{x / div:.3g}{suffix}"


def fmt_range(r: tuple[float, float] | None, metric: str) -> str:
    """``min-max`` of the repeats, in one unit: ``1.21-1.42M``, ``81-95`` (µs)."""
    if r is None:
        return ""
    lo, hi = r
    if metric == "loss" or metric.endswith("_us"):
        return f"{fmt_num(lo, metric)}-{fmt_num(hi, metric)}"
    div, suffix = _unit(hi)
    return f"{lo / div:.3g}-{hi / div:.3g}{suffix}"


METRIC_LABELS = {
    "msgs_s": "msgs/s",
    "mb_s": "MB/s",
    "p50_us": "p50 µs",
    "p99_us": "p99 µs",
    "req_s": "req/s",
    "delivered_s": "deliv/s",
    "loss": "loss",
}

def ratio(
    results: Results,
    table: str,
    impl: str,
    base: str,
    size: int,
    pinned: bool,
    metric: str,
) -> float | None:
    """``impl``'s median over ``base``'s median for one cell (None if either is missing)."""
    a = results.get((table, impl, size, pinned))
    b = results.get((table, base, size, pinned))
    if a is None or b is None:
        return None
    ma, mb = a.median(metric), b.median(metric)
    if ma is None or mb is None or mb == 0:
        return None
    return ma / mb


def render_table(table: BenchTable, results: Results, pinnings: Sequence[bool]) -> Table | None:
    """The rich table of one workload (None when nothing of it ran).

    Per pinning: the median, the min-max range over the repeats, the extra
    figures, and the ratio to the table's baseline; then the targets.
    """
    # Grouped by size (a section each), rows in table order within a size.
    order = {row.impl: i for i, row in enumerate(table.rows)}
    rows = sorted(
        {(impl, size) for (key, impl, size, p) in results if key == table.key and p in pinnings},
        key=lambda r: (r[1], order.get(r[0], 99)),
    )
    if not rows:
        return None
    better = "higher is better" if table.higher_is_better else "lower is better"
    t = Table(
        title=f"[bold]{table.title}[/]  [dim]({METRIC_LABELS[table.metric]}: {better})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        header_style="bold",
    )
    t.add_column("size", justify="right", no_wrap=True)
    t.add_column("implementation", no_wrap=True)
    for pinned in pinnings:
        tag = "pinned" if pinned else "unpinned"
        t.add_column(f"{METRIC_LABELS[table.metric]}\n{tag}", justify="right", no_wrap=True)
        t.add_column("\nrange", justify="right", style="dim", no_wrap=True)
        for m in table.extra:
            t.add_column(f"{METRIC_LABELS[m]}\n{tag}", justify="right", no_wrap=True)
        t.add_column(f"vs base\n{tag}", justify="right", no_wrap=True)
    both = " / ".join("pinned" if p else "unpinned" for p in pinnings)
    t.add_column(f"target\n({both})")
    last_size: int | None = None
    for impl, size in rows:
        if last_size is not None and size != last_size:
            t.add_section()
        last_size = size
        cells: list[str | Text] = [fmt_size(size), _impl_label(impl, table, size)]
        note = ""
        for pinned in pinnings:
            res = results.get((table.key, impl, size, pinned))
            if res is None or not res.runs:
                if res is not None and res.status in ("unavailable", "error"):
                    note = f"{res.status}: {res.reason}"
                cells.extend(["-"] * (3 + len(table.extra)))
                continue
            cells.append(fmt_num(res.median(table.metric), table.metric))
            cells.append(fmt_range(res.spread(table.metric), table.metric))
            cells.extend(fmt_num(res.median(m), m) for m in table.extra)
            base = table.baseline_for(size)
            r = ratio(results, table.key, impl, base, size, pinned, table.metric)
            cells.append("" if r is None else f"{r:.2f}x")
        targets = [x for x in TARGETS if (x.table, x.impl, x.size) == (table.key, impl, size)]
        if note:
            cells.append(Text(note[:120], style="yellow"))
        else:
            cell = _targets_cell(targets, results, pinnings)
            if "loss" not in table.extra:
                # A row that lost messages (slow-consumer drops) says so.
                for p in pinnings:
                    res = results.get((table.key, impl, size, p))
                    loss = res.median("loss") if res is not None else None
                    if loss:
                        tag = "pinned" if p else "unpinned"
                        cell.append(("\n" if cell else "") + f"{tag}: loss {fmt_num(loss, 'loss')}",
                                    style="yellow")
            cells.append(cell)
        t.add_row(*cells)
    bases = ", ".join(
        f"{b}" + (f" from {fmt_size(start)}" if start else "") for start, b in table.baselines
    )
    t.caption = f"vs base: ratio to {bases} (same size, same pinning, same run)"
    t.caption_justify = "left"
    return t


def _impl_label(impl: str, table: BenchTable, size: int) -> Text:
    if impl == table.baseline_for(size):
        return Text(f"{impl} (base)", style="bold")
    if impl.startswith("ipcbus"):
        return Text(impl, style="cyan")
    return Text(impl)


def _targets_cell(targets: Iterable[Target], results: Results, pinnings: Sequence[bool]) -> Text:
    out = Text()
    for tgt in targets:
        if out:
            out.append("\n")
        out.append(tgt.label() + ": ")
        for i, pinned in enumerate(pinnings):
            if i:
                out.append(" / ")
            r = ratio(results, tgt.table, tgt.impl, tgt.baseline, tgt.size, pinned, tgt.metric)
            if r is None:
                out.append("n/a", style="dim")
            else:
                ok = tgt.met(r)
                out.append(f"{r:.2f}x {'✓' if ok else '✗'}", style="green" if ok else "red")
    return out


def render_targets(results: Results, pinnings: Sequence[bool], keys: Iterable[str]) -> Table:
    """One table of every target of the selected workloads, met or not."""
    t = Table(
        title="[bold]Targets from the issues[/] (ratios of medians, same run)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        header_style="bold",
    )
    for col in ("issue", "workload", "size", "implementation", "metric", "target"):
        t.add_column(col, no_wrap=True)
    for pinned in pinnings:
        t.add_column("pinned" if pinned else "unpinned", justify="right", no_wrap=True)
    wanted = set(keys)
    for tgt in TARGETS:
        if tgt.table not in wanted:
            continue
        cells: list[str | Text] = [
            f"#{tgt.issue}",
            tgt.table,
            fmt_size(tgt.size),
            tgt.impl,
            METRIC_LABELS[tgt.metric],
            tgt.label().removeprefix("target "),
        ]
        for pinned in pinnings:
            r = ratio(results, tgt.table, tgt.impl, tgt.baseline, tgt.size, pinned, tgt.metric)
            if r is None:
                cells.append(Text("n/a", style="dim"))
            else:
                ok = tgt.met(r)
                cells.append(Text(f"{r:.2f}x {'✓' if ok else '✗'}",
                                  style="green" if ok else "red"))
        t.add_row(*cells)
    return t


def target_report(results: Results, pinnings: Sequence[bool]) -> list[dict[str, Any]]:
    """Each target with its measured ratios (for ``--json``)."""
    out = []
    for tgt in TARGETS:
        entry: dict[str, Any] = {
            "issue": tgt.issue,
            "table": tgt.table,
            "impl": tgt.impl,
            "size": tgt.size,
            "metric": tgt.metric,
            "baseline": tgt.baseline,
            "op": tgt.op,
            "ratio": tgt.ratio,
        }
        for pinned in pinnings:
            r = ratio(results, tgt.table, tgt.impl, tgt.baseline, tgt.size, pinned, tgt.metric)
            tag = "pinned" if pinned else "unpinned"
            entry[f"measured_{tag}"] = r
            entry[f"met_{tag}"] = None if r is None else tgt.met(r)
        out.append(entry)
    return out


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = "not installed"
    return {
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _select(only: str | None) -> list[BenchTable]:
    if not only:
        return list(TABLES)
    wanted = [w.strip().upper() for w in only.split(",") if w.strip()]
    known = {t.key.upper() for t in TABLES}
    for w in wanted:
        if not any(k.startswith(w) for k in known):
            raise click.BadParameter(
                f"{w!r} names no workload; choose from {', '.join(t.key for t in TABLES)}",
                param_hint="--only",
            )
    return [t for t in TABLES if any(t.key.upper().startswith(w) for w in wanted)]


@click.command(name="bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="3 repeats and smaller counts (about 3 minutes).")
@click.option(
    "--repeats",
    type=click.IntRange(1, 100),
    default=None,
    help="Runs per measurement; medians are reported.  [default: 5, --quick: 3]",
)
@click.option(
    "--only",
    metavar="W1,W2,...",
    help="Only these workloads (W2 covers both W2 tables, W2x only the in-flight one).",
)
@click.option(
    "--impl",
    "impls",
    multiple=True,
    metavar="TEXT",
    help="Only implementations whose name contains TEXT (repeatable); "
    "each table's baseline always runs.",
)
@click.option(
    "--pin",
    type=click.Choice(["both", "pinned", "unpinned"]),
    default="both",
    show_default=True,
    help="Run unpinned, pinned (every process on one CPU), or both as separate columns.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write every sample, median, spread and target ratio to this file.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1.0),
    default=120.0,
    show_default=True,
    help="Seconds before one measurement is killed (with all its processes); "
    "a row with one such measurement skips the rest of its cells.",
)
@click.option("--list", "list_only", is_flag=True, help="List the planned rows and exit.")
@click.option("-v", "--verbose", is_flag=True, help="Show the stderr of failed measurements.")
def cli(
    quick: bool,
    repeats: int | None,
    only: str | None,
    impls: tuple[str, ...],
    pin: str,
    json_path: Path | None,
    timeout: float,
    list_only: bool,
    verbose: bool,
) -> None:
    """Benchmark ipcbus against raw pipes, multiprocessing, asyncio, pyzmq and NATS.

    Every measurement runs in fresh processes; results are medians over the
    repeats, with the baseline ratio and the project's target beside each row.
    """
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and CI: do not squeeze the tables to 80 columns
    tables = _select(only)
    reps = repeats if repeats is not None else (3 if quick else 5)
    pinnings = {"both": (False, True), "pinned": (True,), "unpinned": (False,)}[pin]
    jobs = plan(tables, repeats=reps, quick=quick, pinnings=pinnings, impl_filter=impls)
    if list_only:
        seen = set()
        for job in jobs:
            key = (job.table.key, job.impl, job.size)
            if key not in seen:
                seen.add(key)
                console.print(
                    f"{job.table.key:4} {fmt_size(job.size):>7}  {job.impl:22} "
                    f"count={job.params.count}"
                )
        console.print(f"{len(jobs)} measurements")
        return
    info = machine_info()
    console.print(
        f"[bold]ipcbus benchmarks[/]: {info['cpus']} CPUs ({info['cpu_model'] or 'unknown'}), "
        f"Linux {info['kernel']}, Python {info['python']}, uvloop {info['uvloop']}; "
        f"{reps} repeats{' (quick)' if quick else ''}, {len(jobs)} measurements",
        highlight=False,
    )
    started = time.monotonic()
    interrupted = False
    results: Results = {}
    try:
        run_jobs(jobs, console, timeout=timeout, verbose=verbose, results=results)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        interrupted = True
        console.print("[yellow]interrupted: showing what ran[/]")
    elapsed = time.monotonic() - started
    for table in tables:
        rendered = render_table(table, results, pinnings)
        if rendered is not None:
            console.print()
            console.print(rendered)
    console.print()
    console.print(render_targets(results, pinnings, [t.key for t in tables]))
    console.print(
        f"\n[dim]{elapsed:.0f} s. Pinned: every process of a measurement on one CPU "
        "(sched_setaffinity, inherited by children). Ratios: medians of the same run.[/]",
        highlight=False,
    )
    if json_path is not None:
        doc = {
            "machine": info,
            "settings": {"quick": quick, "repeats": reps, "pin": pin, "only": only,
                         "elapsed_s": elapsed},
            "rows": [r.to_json() for r in results.values()],
            "targets": target_report(results, pinnings),
        }
        json_path.write_bytes(msgspec.json.format(msgspec.json.encode(doc)))
        console.print(f"[dim]wrote {json_path}[/]")
    if interrupted:
        raise SystemExit(130)
    failed = [r for r in results.values() if r.status == "error"]
    if failed:
        console.print(
            f"[red]{len(failed)} cell(s) failed (see the log above; -v shows their stderr)[/]"
        )
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the click command (``python -m ipcbus.bench``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="python -m ipcbus.bench")

