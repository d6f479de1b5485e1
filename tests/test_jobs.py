"""The worker's task registrations: every task name of ``tasks.names`` answered by one module."""

from __future__ import annotations

import json
import subprocess
import sys

from claudebox_pool.tasks import names

# In a process of its own: importing the worker's entry point connects its signals and
# bootsteps to the shared app, which this test process also uses as a producer.
LIST_TASKS = """
import json
from claudebox_pool.tasks.app import app
import claudebox_pool.workers.app
print(json.dumps({name: task.run.__module__ for name, task in app.tasks.items()}))
"""


def test_every_task_name_is_registered_by_workers_jobs_alone() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LIST_TASKS], capture_output=True, text=True, check=True
    )
    registered: dict[str, str] = json.loads(done.stdout)

    declared = {
        value
        for value in vars(names).values()
        if isinstance(value, str) and value.startswith(f"{names.QUEUE}.")
    }
    ours = {
        name: module for name, module in registered.items() if name.startswith(f"{names.QUEUE}.")
    }
    assert ours.keys() == declared
    assert set(ours.values()) == {"claudebox_pool.workers.jobs"}
