"""Run the fault-injection suite and write docs/reliability.md from what it measured.

    python -m tests.faults.report                   # run tests/faults, then write the page
    python -m tests.faults.report --no-run FILE     # only render an existing results file
    python -m tests.faults.report -- -k sigterm     # extra arguments go to pytest

``make reliability`` runs the first form.  The suite records its measurements
through ``tests/faults/conftest.py`` (``$IPCBUS_FAULTS_RESULTS``): one JSON
line per test with its outcome over every phase (the leak checks included)
and the values the test recorded.  The exit code is pytest's, so a failing
scenario fails ``make reliability`` too — after the page, failures shown, is
written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "docs" / "reliability.md"
RESULTS_ENV = "IPCBUS_FAULTS_RESULTS"

# Sections of the page, in order: test module -> (title, what the fault is).
SECTIONS: dict[str, tuple[str, str]] = {
    "test_kill.py": (
        "Process deaths (SIGKILL)",
        "A publisher, a subscriber or a responder is SIGKILLed mid-traffic (the responder "
        "holding a request), on each transport, with a bystander on another transport; a pool "
        "worker is SIGKILLed with requests in flight; the hub is SIGKILLed under load, then "
        "a new hub recovers the bus and a client with `reconnect=True` resumes.",
    ),
    "test_ipcrm.py": (
        "`ipcrm` under load",
        "The bus's SysV queue, one client's queue, and a shm link's segment and semaphores "
        "are removed by id (what `ipcrm -q/-m/-s ID` does) while numbered traffic flows.",
    ),
    "test_slow.py": (
        "A subscriber that stops reading",
        "One of two subscribers is SIGSTOPped while a publisher continues (hub "
        "`outbound_limit` 1 MiB). The other must receive every batch while it is stopped; "
        "the stopped one, once SIGCONTed, must read everything that was not dropped and be "
        "told about exactly the messages that were (`SlowConsumer`), and `ipcbus ls --json` "
        "must show the drops.",
    ),
    "test_garbage.py": (
        "Garbage",
        "Junk written into the door FIFO, into a client's link FIFO (bypassing the framing), "
        "into the SysV queues with raw `msgsnd`, and onto a shm ring (the segment attached "
        "by id by another process).",
    ),
    "test_churn.py": (
        "Churn",
        "200 clients connect, publish, flush and close one after the other (fifo, sysv and "
        "shm in turn) while a publisher streams to a subscriber through the same hub.",
    ),
    "test_sigterm.py": (
        "SIGTERM of the hub under load",
        "The hub gets SIGTERM while a publisher streams and a request is held by a responder.",
    ),
}

COLUMNS = (
    ("scenario", "scenario"),
    ("transport", "transport"),
    ("outcome", "outcome"),
    ("acked", "acknowledged"),
    ("received", "received"),
    ("lost", "lost"),
    ("time_to_error_s", "error seen after"),
    ("detect_s", "hub noticed after"),
    ("notes", "notes"),
)


def run_suite(results: Path, pytest_args: list[str]) -> tuple[int, float]:
    """Run ``pytest tests/faults`` recording into ``results``; return (exit code, seconds)."""
    env = dict(os.environ, **{RESULTS_ENV: str(results)})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults", *pytest_args]
    start = time.monotonic()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    return code, time.monotonic() - start


def load(results: Path) -> list[dict[str, Any]]:
    """The result lines, in the order the tests ran."""
    rows = []
    for line in results.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _cell(key: str, row: dict[str, Any]) -> str:
    values = row.get("values", {})
    if key == "outcome":
        out = str(row["outcome"])
        return {"passed": "pass", "xfailed": "known bug (xfail)"}.get(out, f"**{out.upper()}**")
    if key == "scenario":
        return str(values.get("scenario") or row["id"].split("::")[-1])
    v = values.get(key)
    if v is None or v == "":
        return ""
    if key == "detect_s":
        return f"{float(v):.3f} s"
    if key == "time_to_error_s":
        what = values.get("blocked", "")
        return f"{float(v):.3f} s" + (f" ({what})" if what else "")
    if key == "lost" and values.get("in_flight_lost"):
        return f"{v} (+{values['in_flight_lost']} unacknowledged, lost with the hub)"
    return str(v).replace("|", "\\|")


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The whole page."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lost = sum(int(r.get("values", {}).get("lost") or 0) for r in rows)
    acked = sum(int(r.get("values", {}).get("acked") or 0) for r in rows)
    out: list[str] = []
    w = out.append
    w("# Reliability: the fault-injection suite\n")
    w(
        "<!-- Generated by `python -m tests.faults.report` (`make reliability`) from the suite's "
        "measurements; edit tests/faults/report.py, not this file. -->\n"
    )
    w(
        "What a bus does when its processes are killed, its kernel objects are removed under "
        "it and its peers send garbage: measured by `tests/faults/`, with real processes and "
        "real kernel objects, on every run of `make test`. This page is that suite's last "
        "recorded run.\n"
    )
    w(
        "**Regenerate it** with `make reliability` (that is, `python -m tests.faults.report`: "
        "it runs `pytest tests/faults` with `$IPCBUS_FAULTS_RESULTS` set, then rewrites this page; "
        "`python -m tests.faults.report --no-run FILE` renders a results file again).\n"
    )
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    w(
        f"Last run: {meta['date']} on Linux {meta['kernel']} ({meta['cpus']} CPUs), Python "
        f"{meta['python']}; {len(rows)} tests ({summary}) in {meta['seconds']:.0f} s"
        + (f" (pytest exit code {meta['exit']})" if meta["exit"] is not None else "")
        + f". Messages acknowledged in all scenarios: {acked}; "
        f"acknowledged and lost: **{lost}**.\n"
    )
    w("## What every scenario checks\n")
    w(
        "* **Nothing acknowledged is lost.** Publishers send numbered messages (a source, a "
        "sequence number, a body derived from both); each subscriber checks every message "
        "for gaps, duplicates, reordering and corruption. A message counts as *acknowledged* "
        "when the publisher's `flush()` returned after it (the hub had routed it: `flush()` "
        "now raises `ConnectionClosed` when the link broke first), or when its request was "
        "answered. When the *hub* is killed, only what the subscriber had already confirmed "
        "counts: messages the dead hub held are shown as *unacknowledged, lost with the hub* "
        "(at-most-once delivery, as in NATS core).\n"
        "* **Survivors keep working.** After the fault, the remaining clients (on the same and "
        "on another transport) exchange new numbered messages and requests, and new clients "
        "connect.\n"
        "* **Blocked calls fail, clearly and promptly.** A request held by a responder, a "
        "`flush()` or a publish that was waiting fails with `ConnectionClosed` (or "
        "`WorkerCrashed`) well within 10 s, against a 60 s request timeout: the time is "
        "measured from the fault to the error reaching the test process (*error seen "
        "after*; for garbage and `ipcrm`, until the affected link closed). *Hub noticed "
        "after* is how long the hub took to drop the dead or broken client's link.\n"
        "* **Nothing is left behind.** After the survivors close: no new SysV queue, segment "
        "or semaphore (`/proc/sysvipc`), no FIFO, pid file or record in the bus folder; the "
        "root conftest also fails a test that leaves a thread, a child process or a /dev/shm "
        "file.\n"
    )
    by_file: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_file.setdefault(r["id"].split("::")[0].rsplit("/", 1)[-1], []).append(r)
    w("## Results\n")
    for module, (title, what) in SECTIONS.items():
        section = by_file.pop(module, [])
        if not section:
            continue
        w(f"### {title}\n")
        w(what + "\n")
        w("| " + " | ".join(h for _, h in COLUMNS) + " |")
        w("|" + "---|" * len(COLUMNS))
        for r in section:
            w("| " + " | ".join(_cell(k, r) for k, _ in COLUMNS) + " |")
        w("")
        extra = [r for r in section if r.get("values", {}).get("before")]
        for r in extra:
            v = r["values"]
            w(
                "Measured on the hub process and the host, after a warm-up round, before and "
                "after the churn: "
                + ", ".join(f"{k} {v['before'][k]} → {v['after'][k]}" for k in v["before"])
                + ".\n"
            )
    for module, section in by_file.items():  # a test file the page does not know yet
        w(f"### {module}\n")
        for r in section:
            w(f"* `{r['id']}`: {r['outcome']}")
        w("")
    bugs = [r for r in rows if r["outcome"] == "xfailed"]
    failed = [r for r in rows if r["outcome"] not in ("passed", "xfailed")]
    if failed:
        w("## Failures in this run\n")
        for r in failed:
            w(f"* `{r['id']}` ({r['outcome']}): {' '.join(r.get('error', []))}")
        w("")
    w("## Known bugs\n")
    if bugs:
        w(
            "Each is a test marked `xfail(strict=True)`: it fails today, and the suite fails as "
            "soon as the bug is fixed, so the mark gets removed.\n"
        )
        for r in bugs:
            w(f"* `{r['id']}`: {r.get('xfail_reason', '')}")
        w("")
    else:
        w("None known.\n")
    w("## How each transport reacts\n")
    w(
        "* **A client dies** (any transport): the hub sees end of stream at once (FIFO: EOF; "
        "sysv and shm: a pidfd on the peer, then everything the peer sent before dying is "
        "delivered), drops its subscriptions and queue-group memberships, answers requests "
        "in flight to it with `ConnectionClosed`, and removes its FIFOs or its SysV queue.\n"
        "* **The hub dies**: every client sees `ConnectionClosed` on its next call and at once "
        "on calls that were waiting. The pid file and door stay until the next hub (or "
        "`ipcbus gc`) has proven the old pid dead; the bus's SysV queue outlives the hub "
        "(SysV objects are not tied to a process) and the next hub removes it through the "
        "bus folder's records. shm segments are already marked `IPC_RMID`, so the kernel "
        "frees them when the clients detach.\n"
        "* **`ipcrm -q` of the bus queue**: the hub's receiver thread sees `EIDRM`; every "
        "SysV link ends with `ConnectionClosed` (clients are told with an ABORT message in "
        "their own queue), and the hub *recreates* the queue at once, so new and "
        "reconnecting SysV clients carry on; FIFO and shm links are unaffected "
        "([SysV transport](transports/sysv.md)). `ipcrm -q` of one client's queue ends that "
        "client's link only.\n"
        "* **`ipcrm -m` / `-s` on a shm link**: nothing happens. Once both sides are attached "
        "the segment is already marked `IPC_RMID` (removing it again is a no-op; the kernel "
        "frees it when both detach) and the link's POSIX named semaphores are already "
        "unlinked, so no name is left to remove; no SysV semaphore set belongs to a bus "
        "([shm transport](transports/shm.md)).\n"
        "* **A stopped subscriber** costs the others nothing: above `outbound_limit` bytes "
        "queued toward one link, the hub drops that link's messages, counts them "
        "(`dropped`, `slow_consumer_events` in `ipcbus ls`) and tells the subscriber the "
        "exact number (`SlowConsumer`) when it reads again.\n"
        "* **Garbage on the door** is logged and skipped; because honest knocks are written "
        "atomically, the door resynchronises on the next read. A knock that arrives in the "
        "same read as a lying length prefix can be swallowed with it: that client's connect "
        "then fails with a clear timeout error and it can retry.\n"
        "* **Garbage on a link** (a frame that is not MessagePack, an absurd or zero length, "
        "a SysV message with a wrong header or sequence, a corrupt shm head counter or "
        "record) closes that link with `ProtocolError` and nothing else. Junk on the bus "
        "queue that names no live client, or has an unknown type, is discarded and counted.\n"
        "* **SIGTERM**: the hub stops accepting, sends every client a `shutdown` notice, "
        "flushes what it queued to every client at once, for up to 2 s (so everything it "
        "acknowledged reaches every client that reads; a client that is stopped, or does not "
        "read for those 2 s, loses what it had not read), closes each link, removes its door, "
        "pid file, FIFOs, records and queue, and exits 0. From the moment it starts closing "
        "it acknowledges nothing more: a client's `flush()` then gets no answer and raises "
        "`ConnectionClosed` as the link closes (a flush answered while the hub drained had "
        "acknowledged messages its other links, already closed, never carried).\n"
    )
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m tests.faults.report", description=__doc__.splitlines()[0])
    p.add_argument("--no-run", metavar="FILE", help="render this results file; run nothing")
    p.add_argument("--output", default=str(OUTPUT), help="where to write the page (default: %(default)s)")
    p.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = p.parse_args()
    meta: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds": 0.0,
        "exit": 0,
    }
    if args.no_run:
        rows = load(Path(args.no_run))
        meta["seconds"] = sum(float(r.get("duration", 0.0)) for r in rows)
        meta["exit"] = None
    else:
        with tempfile.TemporaryDirectory(prefix="ipcbus-faults-") as tmp:
            results = Path(tmp) / "results.jsonl"
            results.touch()
            meta["exit"], meta["seconds"] = run_suite(results, args.pytest_args)
            rows = load(results)
    if not rows:
        sys.exit(f"no results recorded (pytest exit code {meta['exit']}); page not written")
    Path(args.output).write_text(render(rows, meta), encoding="utf-8")
    print(f"wrote {args.output}: {len(rows)} scenarios, pytest exit code {meta['exit']}")
    sys.exit(int(meta["exit"] or 0))


if __name__ == "__main__":
    main()
