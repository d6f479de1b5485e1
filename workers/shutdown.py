"""A warm shutdown with a deadline: running tasks get ``CLAUDEBOX_SHUTDOWN_GRACE_S`` to finish.

On SIGTERM Celery stops taking tasks and waits for the running ones, for as long as they take.
At the end of the grace the pool processes still running a task are killed: the failure the pool
is built for. ``task_reject_on_worker_lost`` requeues each task at once for another worker, its
next delivery records the interrupted attempt, what it ran in its sandbox dies with it (a warm
sandbox's keeper stops a sandbox whose lessee died), and its lock lapses. A worker whose tasks
end sooner exits as soon as they do.

Not Celery's soft shutdown (``worker_soft_shutdown_timeout``): SIGTERM gets it only with
``REMAP_SIGTERM=SIGQUIT`` in the worker's environment (billiard reads it on import, before any
configuration), it waits the whole timeout even when the tasks end sooner, and its cancel has the
pool process unwind its task as if the task had ended, so that the next delivery would not be
counted as a second attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from celery import signals
from celery.worker import state

from claudebox_pool.workers.context import context

log = logging.getLogger(__name__)

_grace_timer: threading.Timer | None = None


def start_grace(how: str = "", **_: Any) -> None:
    """On a warm shutdown, stop the tasks still running when the grace is over."""
    global _grace_timer
    if how != "Warm" or _grace_timer is not None:
        return
    _grace_timer = threading.Timer(context().settings.shutdown_grace_s, kill_running_tasks)
    _grace_timer.daemon = True
    _grace_timer.start()


def kill_running_tasks() -> None:
    running = [request for request in tuple(state.active_requests) if request.worker_pid]
    if running:
        log.warning(
            "shutdown grace of %ss is over: stopping %d running task(s), which are requeued",
            context().settings.shutdown_grace_s,
            len(running),
        )
    for request in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(request.worker_pid, signal.SIGKILL)


signals.worker_shutting_down.connect(start_grace)
