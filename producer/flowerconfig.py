"""Flower's configuration for claudebox-pool; ``claudebox-pool flower`` passes this file as
``--conf`` (``deploy/flower/flowerconfig.py`` points at it for a Flower started by hand).

Flower executes the file and takes the names below that are Flower options. Credentials are
not set here: basic auth comes from ``CLAUDEBOX_FLOWER_BASIC_AUTH``, handed to Flower in its
environment. Task arguments are already safe to show (``tasks.monitoring`` writes them); the
formatter below is a second line for tasks that some other client sent without that.
"""

from __future__ import annotations

from typing import Any

max_tasks = 20_000
"""Tasks kept in memory: a large batch plus its neighbours."""
purge_offline_workers = 3600
"""A worker gone for an hour leaves the workers page and the metrics."""
tasks_columns = "name,uuid,state,args,received,started,runtime,worker"
task_runtime_metric_buckets = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
"""Buckets of ``flower_task_runtime_seconds`` for agent runs of seconds to an hour (Flower's
defaults end at 10 s)."""

HIDDEN = "[hidden: sent without claudebox-pool's display text]"


def format_task(task: Any) -> Any:
    """Hide the arguments of a claudebox task whose display text is a raw payload repr."""
    if str(task.name or "").startswith("claudebox.") and "{'" in str(task.args or ""):
        task.args = HIDDEN
    return task
