"""A ``code`` task whose agent run failed ends as a failed Celery task.

Monitors count what a task's state says: a run that exited 1 returned as a value would be a
success in Flower's filters and ``task-failed`` counts. So the task raises
:class:`AgentRunFailedError`, whose arguments carry the CodeResult to the producer (which
returns it: callers still get ``success=False``), and whose text is a one-line summary.

A failed task stops its Celery chain and marks every later step failed with its error. A
``submit --no-wait`` chain runs a job after the ones before it even when their runs failed
(``producer.canvas``), so the next step is sent here, as Celery sends it after a success, and
the request's chain is emptied before the error is raised.
"""

from __future__ import annotations

from typing import Any

from celery import Task, signature

from claudebox_pool.tasks.errors import AgentRunFailedError
from claudebox_pool.tasks.models import CodeResult

SUMMARY_CHARS = 200


def summary(result: CodeResult) -> str:
    """``agent exited 1: exit code 1: boom``: the run's failure on one short line."""
    said = f"agent exited {result.exit_code}"
    if result.error:
        said += ": " + " ".join(result.error.split())
    return said if len(said) <= SUMMARY_CHARS else said[: SUMMARY_CHARS - 3] + "..."


def failed(task: Task[Any, Any], result: CodeResult) -> AgentRunFailedError:
    """The error for the task to raise; its chain's next step is sent first."""
    shown = result.model_dump(mode="json")
    _send_next_step(task, shown)
    return AgentRunFailedError(summary(result), shown)


def _send_next_step(task: Task[Any, Any], shown: dict[str, Any]) -> None:
    # Celery keeps a chain's remaining steps in the request, last step first; the next one
    # gets the rest, as in celery.app.trace after a success.
    steps = task.request.chain
    if not steps:
        return
    request = task.request
    priority = (
        (request.delivery_info or {}).get("priority")
        if task.app.conf.task_inherit_parent_priority
        else None
    )
    signature(steps[-1], app=task.app).apply_async(
        (shown,),
        chain=steps[:-1],
        parent_id=request.id,
        root_id=request.root_id or request.id,
        priority=priority,
    )
    request.chain = None
