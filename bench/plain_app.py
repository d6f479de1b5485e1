"""A plain Celery app with a no-op task: the baseline the pool's dispatch is measured against."""

from __future__ import annotations

import os

from celery import Celery

url = os.environ["CLAUDEBOX_BROKER_URL"]
app = Celery("plain", broker=url, backend=url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue="plain",
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)


@app.task(name="plain.noop")
def noop() -> None:
    return None
