"""What a run shows while it runs, on stderr: a live display on a terminal, plain lines elsewhere.

``run_stage`` reports a ``StageProgress`` when Ray starts, when planning starts and whenever a shard
commits; ``ProgressView`` turns those into one line per stage (rows, ok and dropped, rate, ETA) under a
line for the pipeline. Off a terminal it writes plain, timestamped lines without ANSI codes: when a
stage starts and ends, and every ``CURATE_PROGRESS_INTERVAL`` seconds (10) while it runs. Without -v,
native libraries' writes to file descriptor 2 are kept out of both (``_NativeStderr``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import click

# Seconds between plain progress lines when stderr is not a terminal (a log file, a CI job).
PROGRESS_INTERVAL_S = float(os.environ.get("CURATE_PROGRESS_INTERVAL", "10"))


def fmt_s(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_fields(p, now: float | None = None) -> dict[str, str]:
    """Rows, counts, rate and ETA of a StageProgress as short texts (shared by bar and log line)."""
    now = time.time() if now is None else now
    if p.phase == "start":
        return {"rows": f"starting Ray ({fmt_s(now - p.started)})" if p.started else "starting Ray",
                "counts": "", "rate": "", "eta": ""}
    if p.phase == "plan":
        return {"rows": f"planning ({fmt_s(now - p.started)})" if p.started else "planning",
                "counts": "", "rate": "", "eta": ""}
    elapsed = max(now - p.started, 1e-9)
    done = p.rows_done + p.rows_running  # rows finished inside running shards count too
    this_run = p.rows_this_run + p.rows_running
    rate = this_run / elapsed if this_run else None
    left_shards = p.shards_total - p.shards_done
    if p.rows_total is not None:
        rows = f"{done:,}/{p.rows_total:,} rows"
        eta = (max(p.rows_total - done, 0) / rate) if rate else None
    else:
        rows = f"{done:,} rows"
        eta = (elapsed / p.shards_this_run * left_shards) if p.shards_this_run else None
    if left_shards == 0:
        eta = 0.0
    return {"rows": f"{rows} ({p.shards_done}/{p.shards_total} shards)",
            "counts": f"ok {p.kept:,}  dropped {p.dropped:,}",
            "rate": f"{rate:,.0f} rows/s" if rate else "- rows/s",
            "eta": f"ETA {fmt_s(eta)}" if eta is not None else "ETA ?"}


class ProgressView:
    """Shows run_stage's progress for one stage or a pipeline of them, on stderr.

    On a terminal: a live display with a line per stage (rows, ok/dropped, rate, ETA) under one line
    for the pipeline. Elsewhere: plain lines, no ANSI codes: one when a stage starts and ends, and
    one every PROGRESS_INTERVAL_S seconds while it runs.
    """

    def __init__(self, name: str, n_stages: int, live: bool | None = None,
                 interval: float | None = None):
        self.name, self.n_stages = name, n_stages
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.live = sys.stderr.isatty() if live is None else live
        self.index = 0
        self.label = self.stage = ""
        self._shown = False
        self.current = None  # latest StageProgress
        self.rows_before = 0  # rows in of the pipeline's finished stages
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prog = None
        self._task = None
        self._pipe_task = None

    # lifecycle
    def __enter__(self) -> ProgressView:
        self._native = _NativeStderr() if os.environ.get("CURATE_VERBOSE", "0") == "0" else None
        if self._native:
            self._native.start()
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            def text(field: str) -> TextColumn:
                return TextColumn(field, table_column=Column(no_wrap=True))

            self._prog = Progress(
                text("{task.description}"), BarColumn(bar_width=20), text("{task.fields[rows]}"),
                text("{task.fields[counts]}"), text("{task.fields[rate]}"), text("{task.fields[eta]}"),
                TimeElapsedColumn(), console=Console(stderr=True), refresh_per_second=4)
            if self.n_stages > 1:
                self._pipe_task = self._prog.add_task(f"pipeline {self.name}", total=self.n_stages,
                                                      rows=f"stage 0/{self.n_stages}", counts="", rate="", eta="")
            self._prog.start()
        elif self.n_stages > 1:
            self._line(f"pipeline {self.name}: {self.n_stages} stages")
        self._thread = threading.Thread(target=self._tick, name="curate-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type=None, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        if self._prog:
            self._prog.stop()
        if self._native:
            # a usage error (exit 2) is one line: nothing is added to it
            usage = exc_type is not None and issubclass(exc_type, click.ClickException) and exc_type.exit_code == 2
            self._native.stop(failed=exc_type is not None and not usage)

    # events
    def stage_started(self, stage: str) -> None:
        self.index += 1
        label = f"[{self.index}/{self.n_stages}] {stage}" if self.n_stages > 1 else stage
        with self._lock:
            self.current = None
            self.label = label
            self.stage = stage
            self._shown = False

    def _show(self, announce: bool = True) -> None:
        """The stage's first line, once its input passed the checks (an input error stays one line)."""
        if self._shown:
            return
        self._shown = True
        if self._prog:
            self._task = self._prog.add_task(self.label, total=None, rows="starting", counts="", rate="", eta="")
            self._pipe(self.stage)
        elif announce:
            self._line(f"{self.label}: starting")

    def update(self, p) -> None:
        self._show()
        with self._lock:
            self.current = p
            if self._prog and self._task is not None:
                total = p.rows_total if p.rows_total is not None else p.shards_total or None
                done = p.rows_done + p.rows_running if p.rows_total is not None else p.shards_done
                self._prog.update(self._task, completed=done, total=total, **progress_fields(p))

    def stage_done(self, summary: dict[str, Any], wall: float) -> None:
        self._show(announce=not summary.get("skipped"))  # a skipped stage is one line
        self.rows_before += summary.get("rows_in", 0)
        rate = summary.get("rows_in", 0) / wall if wall > 0 else 0
        if summary.get("skipped"):
            text = f"complete already (ok {summary['kept']:,}  dropped {summary['dropped']:,}); skipped"
        else:
            text = (f"done: {summary['rows_in']:,} rows in {fmt_s(wall)}, ok {summary['kept']:,}  "
                    f"dropped {summary['dropped']:,}, {rate:,.0f} rows/s")
        with self._lock:  # the ticker never redraws a finished stage's line
            last, self.current = self.current, None
            if self._prog and self._task is not None:
                # the same columns as while running, so the display keeps its layout
                shards = f" ({last.shards_total} shards)" if last is not None and last.shards_total else ""
                self._prog.update(self._task, total=1, completed=1, rows=f"{summary['rows_in']:,} rows{shards}",
                                  counts=f"ok {summary['kept']:,}  dropped {summary['dropped']:,}",
                                  rate="skipped" if summary.get("skipped") else f"{rate:,.0f} rows/s",
                                  eta="complete" if summary.get("skipped") else f"done in {fmt_s(wall)}")
                self._pipe(None)
            else:
                self._line(f"{self.label}: {text}")

    # drawing
    def _pipe(self, running: str | None) -> None:
        if self._pipe_task is None:
            return
        finished = self.index - (1 if running else 0)
        self._prog.update(self._pipe_task, completed=finished,
                          rows=f"stage {self.index}/{self.n_stages}" + (f" ({running})" if running else ""),
                          counts=f"{self.rows_before:,} rows in done stages")

    def _tick(self) -> None:
        """Plain mode: a line every interval. Live mode: fresh rate, ETA and phase times every second
        (shards commit seldom; the clock does not wait for them)."""
        while not self._stop.wait(1.0 if self._prog else self.interval):
            with self._lock:
                p, label, task = self.current, self.label, self._task
                if p is None or not label:
                    continue
                f = progress_fields(p)
                if self._prog and task is not None:
                    self._prog.update(task, **f)
                elif not self._prog:
                    self._line(f"{label}: " + ", ".join(v for v in f.values() if v))

    def _line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        click.echo(f"{stamp} {text}", err=True)


class _NativeStderr:
    """Native libraries (faiss's C++ clustering warnings, Ray's core worker) write to file descriptor
    2 directly, past Python's logging, through the live display and into log files. Without -v that
    descriptor points at a file while stages run; Python's sys.stderr keeps the real one, so curate's
    own lines, errors and progress still show. The file is named on stderr when the run fails."""

    def __init__(self) -> None:
        self.saved: int | None = None
        self.path = ""

    def start(self) -> None:
        import tempfile

        try:
            if sys.stderr.fileno() != 2:  # a test harness or a caller capturing stderr: leave it alone
                return
        except (AttributeError, OSError, ValueError):
            return
        sys.stderr.flush()
        fd, self.path = tempfile.mkstemp(prefix="curate-native-stderr-", suffix=".log")
        self.saved = os.dup(2)
        self.old = sys.stderr
        sys.stderr = open(os.dup(self.saved), "w", buffering=1, encoding=self.old.encoding or "utf-8",
                          errors="backslashreplace")
        os.dup2(fd, 2)
        os.close(fd)

    def stop(self, failed: bool) -> None:
        if self.saved is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        sys.stderr.close()
        sys.stderr = self.old
        self.saved = None
        if failed and os.path.getsize(self.path):
            click.echo(f"output of native libraries during this run: {self.path}", err=True)
        else:
            os.unlink(self.path)
