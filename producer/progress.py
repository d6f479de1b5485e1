"""The live display of a running batch, and the summary printed after it.

The display redraws a few times a second: one line for the whole batch (a bar, jobs done, ok
and failed, elapsed time) and a table with each session's state (waiting, opening, running,
retrying, done, failed), its jobs done of its total, and its current job. Sessions that are at
work are listed first; beyond :data:`MAX_ROWS` the rest are counted, not listed. On a terminal
the display is replaced by the summary at the end. Elsewhere (a pipe, a CI log) nothing can be
redrawn: a line is printed per finished job, and a progress line every
``CLAUDEBOX_PROGRESS_INTERVAL_S``, so that a long batch never looks stuck.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from claudebox_pool.tasks.models import TokenUsage, merged_usage, usage_total
from claudebox_pool.tasks.settings import get_settings

if TYPE_CHECKING:
    from claudebox_pool.producer.batch import Job, JobResult

MAX_ROWS = 20
MAX_FAILURES_LISTED = 20
ACTIVE_FIRST = {"running": 0, "retrying": 0, "opening": 1, "waiting": 2, "failed": 3, "done": 4}
STYLES = {
    "running": "cyan",
    "retrying": "yellow",
    "opening": "cyan",
    "failed": "red",
    "done": "green",
}


@dataclass
class SessionView:
    name: str
    total: int
    ok: int = 0
    failed: int = 0
    state: str = "waiting"
    job_id: str | None = None
    since: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.ok + self.failed


class BatchProgress:
    """A :class:`producer.batch.BatchObserver` that draws the batch live on ``console``."""

    def __init__(
        self,
        console: Console,
        jobs: Sequence[Job],
        done: Mapping[str, JobResult],
        record: Callable[[JobResult], None],
    ) -> None:
        self.console = console
        self.record = record
        self.started = time.monotonic()
        self.total = len(jobs)
        self.sessions: dict[str, SessionView] = {}
        for job in jobs:
            view = self.sessions.setdefault(job.session_key, SessionView(job.session_key, 0))
            view.total += 1
            if job.id in done:
                view.ok += 1
        self._session_of = {job.id: job.session_key for job in jobs}
        self._live = Live(self, console=console, refresh_per_second=4, transient=True)
        self._piped = not console.is_terminal
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)

    def session_state(self, session: str, state: str, job_id: str | None = None) -> None:
        view = self.sessions[session]
        if (view.state, view.job_id) != (state, job_id):
            view.state, view.job_id, view.since = state, job_id, time.monotonic()

    def job_done(self, result: JobResult) -> None:
        self.record(result)
        view = self.sessions[self._session_of[result.id]]
        if result.success:
            view.ok += 1
        else:
            view.failed += 1
        if self._piped:
            outcome = Text("ok", style="green") if result.success else Text("failed", style="red")
            line = Text.assemble(
                outcome,
                f" {result.id} (session {result.session_id}, {result.duration_s:.1f}s)",
                "" if result.success else f": {_first_line(result.error)}",
            )
            self.console.print(line, highlight=False)

    def progress_line(self) -> str:
        views = list(self.sessions.values())
        ok = sum(view.ok for view in views)
        failed = sum(view.failed for view in views)
        at_work = sum(view.state in ("running", "retrying", "opening") for view in views)
        return (
            f"progress: {ok + failed}/{self.total} jobs, {ok} ok, {failed} failed, "
            f"{at_work} sessions at work, {time.monotonic() - self.started:.0f}s"
        )

    def _tick(self) -> None:
        while not self._stop.wait(get_settings().progress_interval_s):
            self.console.print(self.progress_line(), highlight=False, markup=False)

    def __rich__(self) -> RenderableType:
        views = list(self.sessions.values())
        ok = sum(view.ok for view in views)
        failed = sum(view.failed for view in views)
        at_work = sum(view.state in ("running", "retrying", "opening") for view in views)
        elapsed = time.monotonic() - self.started
        header = Table.grid(padding=(0, 1))
        header.add_row(
            ProgressBar(total=self.total, completed=ok + failed, width=30),
            Text(f"{ok + failed}/{self.total} jobs"),
            Text(f"{ok} ok", style="green"),
            Text(f"{failed} failed", style="red" if failed else ""),
            Text(f"{len(views)} sessions, {at_work} at work, {elapsed:.0f}s"),
        )
        table = Table("session", "state", "jobs", "failed", "job", "for", box=None)
        ordered = sorted(views, key=lambda view: ACTIVE_FIRST.get(view.state, 5))
        for view in ordered[:MAX_ROWS]:
            table.add_row(
                escape(view.name),
                Text(view.state, style=STYLES.get(view.state, "")),
                f"{view.finished}/{view.total}",
                str(view.failed or ""),
                escape(view.job_id or ""),
                f"{time.monotonic() - view.since:.0f}s",
            )
        if len(ordered) > MAX_ROWS:
            table.add_row(f"... {len(ordered) - MAX_ROWS} more", "", "", "", "", "")
        return Group(header, table)

    def __enter__(self) -> Self:
        if self._piped:
            self._ticker.start()
        else:
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._piped:
            self._stop.set()
            self._ticker.join()
        else:
            self._live.stop()


def summary(results: Sequence[JobResult]) -> RenderableType:
    """Per session: jobs, ok, failed, seconds, cost; the model usage of the whole batch; then
    the failed jobs with their errors."""
    per_session: dict[str, list[JobResult]] = {}
    for result in results:
        per_session.setdefault(result.session_id or "(not opened)", []).append(result)
    table = Table("session", "jobs", "ok", "failed", "seconds", "cost", title="batch summary")
    for session_id, session_results in sorted(per_session.items()):
        ok = sum(result.success for result in session_results)
        table.add_row(
            escape(session_id),
            str(len(session_results)),
            str(ok),
            str(len(session_results) - ok),
            f"{sum(result.duration_s for result in session_results):.2f}",
            _usd(sum(result.cost_usd for result in session_results)),
        )
    used = merged_usage(*(result.usage for result in results))
    tables = [table, usage_table(used, "batch model usage")] if used else [table]
    failures = [result for result in results if not result.success]
    lines = [
        Text.assemble(("failed ", "red"), f"{result.id}: ", _first_line(result.error))
        for result in failures[:MAX_FAILURES_LISTED]
    ]
    if len(failures) > MAX_FAILURES_LISTED:
        lines.append(Text(f"... and {len(failures) - MAX_FAILURES_LISTED} more failed jobs"))
    resent = [result for result in results if result.resent]
    if resent:
        replayed = sum(result.replayed for result in resent)
        lines.append(
            Text(
                f"{len(resent)} jobs were sent by the interrupted run without a known outcome; "
                f"asked again by idempotency key: {replayed} had already run (their recorded "
                f"outcome is kept), {len(resent) - replayed} were run now or failed to send"
            )
        )
    return Group(*tables, *lines)


def usage_table(usage: Mapping[str, TokenUsage], title: str) -> Table:
    """Tokens and cost per model, and their total when there are several models."""
    table = Table(
        "model", "input", "output", "cache write", "cache read", "cost", title=title, box=None
    )
    rows = sorted(usage.items())
    if len(rows) > 1:
        rows.append(("total", usage_total(usage)))
    for model, used in rows:
        table.add_row(
            escape(model),
            f"{used.input_tokens:,}",
            f"{used.output_tokens:,}",
            f"{used.cache_creation_input_tokens:,}",
            f"{used.cache_read_input_tokens:,}",
            _usd(used.cost_usd),
        )
    return table


def _usd(amount: float) -> str:
    return f"${amount:.4f}"


def _first_line(error: str | None) -> str:
    lines = (error or "failed").strip().splitlines()
    return lines[0] if lines else "failed"
