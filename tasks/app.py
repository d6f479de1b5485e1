"""The Celery app both sides share, configured from :class:`tasks.settings.Settings`.

The options below are chosen for long, stateful tasks (see the README's "Reliability" notes):
late acks with requeue on a lost worker, one message prefetched at a time, and a Redis
visibility timeout longer than any task may stay unacked, so that Redis never hands a running
task to a second worker. (How a worker stops its tasks at the end of a shutdown's grace
period is the worker's own business: ``workers.shutdown``.)
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

# logs: its Celery signal handlers set the log format of every worker and beat.
from claudebox_pool.tasks import logs, names, task_records  # noqa: F401
from claudebox_pool.tasks.monitoring import RedactedTask, RedactingAMQP
from claudebox_pool.tasks.schedule import beat_schedule
from claudebox_pool.tasks.settings import Settings, get_settings


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # kombu looks for unacked messages past the visibility timeout every 10 s
        # (`unacked_restore_interval`) but scans only every 10th time by default: scan each
        # time, so that a vanished worker's task runs again within 10 s of the timeout.
        "broker_transport_options": {**transport, "unacked_restore_throttle": 1},
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": names.QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # No STARTED state in the result backend: nothing reads it (monitors learn that a task
        # started from its task-started event), and it cost every task a write and every
        # waiting producer a wake-up.
        "task_track_started": False,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "worker_prefetch_multiplier": 1,
        # Cancelling kills commands mid-run when Redis restarts, to be run again later: a
        # redelivered message is instead answered from history (task id, idempotency key).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A run that ended while Redis was away stores its result once Redis is back
        # (jittered backoff under 1 s a try: about CLAUDEBOX_REDIS_OUTAGE_S in all).
        "result_backend_always_retry": True,
        "result_backend_max_retries": max(1, 2 * settings.redis_outage_s),
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 1000,
        "worker_hijack_root_logger": False,
        "task_soft_time_limit": settings.task_time_limit_s + 30,
        "task_time_limit": settings.task_time_limit_s + 60,
        "result_expires": settings.result_ttl_s,
        # Extended results would keep every task's arguments (whole prompts) in Redis for
        # CLAUDEBOX_RESULT_TTL_S; producers know what they sent, and monitors read events.
        "result_extended": False,
        "enable_utc": True,
        "beat_schedule": beat_schedule(settings),
    }


def configure(settings: Settings | None = None) -> Celery:
    """(Re)apply settings to the shared app; call it after changing the environment."""
    app.conf.update(celery_config(settings or get_settings()))
    # Celery caches the result backend, the broker connection pool and the producer pool on
    # first use; drop them so that the next use connects to the configured URLs.
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)
    app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    return app


app = Celery("claudebox", amqp=RedactingAMQP, task_cls=RedactedTask)
# Read on the app's first use, not at import: a command's --help works with a bad setting, and
# the error comes where the command can report it.
app.add_defaults(lambda: celery_config(get_settings()))


def _record_sent(headers: dict[str, Any], body: Any, routing_key: str = "", **_: Any) -> None:
    """Every task this process sends is recorded for `claudebox-pool tasks` (``task_records``)."""
    record = task_records.from_message(headers or {}, body, routing_key or None)
    if record is not None:
        task_records.write(app.backend.client, record, get_settings().result_ttl_s)


signals.after_task_publish.connect(_record_sent)
