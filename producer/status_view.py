"""How ``claudebox-pool status`` and ``tasks`` draw what ``producer.ops`` reads."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from claudebox_pool.producer.ops import PoolStatus, TaskSummary

STATE_STYLES = {
    "alive": "green",
    "silent": "red",
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "revoked": "magenta",
}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def status(pool: PoolStatus) -> RenderableType:
    workers = Table("worker", "node", "state", "busy", "heartbeat", "warm", box=None)
    for worker in pool.workers:
        workers.add_row(
            escape(worker.hostname),
            escape(worker.node or "-"),
            Text(worker.state, style=STATE_STYLES[worker.state]),
            # A silent worker did not say what it runs.
            f"{worker.busy}/{worker.slots}" if worker.slots is not None else "-",
            f"{_age(worker.heartbeat_age_s)} ago" if worker.heartbeat_age_s is not None else "-",
            str(worker.warm),
        )
    alive = sum(worker.state == "alive" for worker in pool.workers)
    silent = len(pool.workers) - alive
    header = Text(
        f"{alive} workers alive, {silent} silent; {pool.busy}/{pool.slots} slots busy; "
        f"{sum(q.depth for q in pool.queues)} tasks queued",
        style="bold",
    )
    queues = Table("queue", "waiting", box=None)
    for queue in pool.queues:
        queues.add_row(escape(queue.queue), str(queue.depth))
    running = Table("running task", "name", "session", "agent", "age", "worker", box=None)
    for task in pool.running:
        running.add_row(
            task.task_id,
            task.name.removeprefix("claudebox."),
            escape(task.session_id or "-"),
            escape(task.agent or "-"),
            _age(task.age_s),
            escape(task.worker),
        )
    parts: list[RenderableType] = [header, workers, queues]
    parts.append(running if pool.running else Text("no task running"))
    if pool.warm:
        warm = Table("warm sandbox of session", "kept by", box=None)
        for held in pool.warm:
            warm.add_row(escape(held.session_id), escape(held.worker))
        parts.append(warm)
    return Group(*parts)


def tasks(found: Sequence[TaskSummary]) -> RenderableType:
    table = Table("task", "name", "state", "session", "agent", "sent", "arguments", box=None)
    for task in found:
        table.add_row(
            task.task_id,
            task.name.removeprefix("claudebox."),
            Text(task.state, style=STATE_STYLES[task.state]),
            escape(task.session_id or "-"),
            escape(task.agent or "-"),
            task.sent_at[:19],
            escape(task.shown),
        )
    return table
