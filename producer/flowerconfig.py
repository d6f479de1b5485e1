"""Flower's configuration for claudebox-pool; ``claudebox-pool flower`` passes this file as
``--conf`` (``deploy/flower/flowerconfig.py`` points at it for a Flower started by hand).

Flower executes the file and takes the names below that are Flower options. Credentials are
not set here: basic auth comes from ``CLAUDEBOX_FLOWER_BASIC_AUTH``, handed to Flower in its
environment. Task arguments are already safe to show (``tasks.monitoring`` writes them); the
formatter below is a second line for tasks that some other client sent without that.

Run inside Flower, the file also locks it down: basic auth that is empty or malformed stops
Flower at start, and Flower's control API (sending tasks, which runs commands in any session;
revoking and terminating them; shutting down, restarting and resizing workers; rate limits,
time limits and queues) answers 403 unless ``CLAUDEBOX_FLOWER_CONTROL_API`` turns it on.
Flower reads its routes from one list (``flower.urls.handlers``) when it builds its app, after
reading this file, so the control routes are swapped for a refusal in that list, and
``/health``, the pool's health, is added to it.
"""

from __future__ import annotations

import sys
from typing import Any

max_tasks = 20_000
"""Tasks kept in memory: a large batch plus its neighbours."""
purge_offline_workers = 3600
"""A worker gone for an hour leaves the workers page and the metrics."""
tasks_columns = "name,uuid,state,args,received,started,runtime,worker"
task_runtime_metric_buckets = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
"""Buckets of ``flower_task_runtime_seconds`` for agent runs of seconds to an hour (Flower's
defaults end at 10 s)."""

HEALTH_ROUTE = r"/health"
"""The pool's health (``producer.health``), served beside Flower's ``/healthcheck``, which says
only that Flower answers."""

HIDDEN = "[hidden: sent without claudebox-pool's display text]"
CONTROL_ROUTES = (
    r"/api/worker/shutdown/",
    r"/api/worker/pool/",
    r"/api/worker/queue/",
    r"/api/task/apply/",
    r"/api/task/async-apply/",
    r"/api/task/send-task/",
    r"/api/task/abort/",
    r"/api/task/timeout/",
    r"/api/task/rate-limit/",
    r"/api/task/revoke/",
)
"""Prefixes of Flower's routes that act on the pool rather than show it."""


def format_task(task: Any) -> Any:
    """Hide the arguments of a claudebox task whose display text is a raw payload repr."""
    if str(task.name or "").startswith("claudebox.") and "{'" in str(task.args or ""):
        task.args = HIDDEN
    return task


def basic_auth_problem(value: str) -> str | None:
    """What is wrong with Flower basic auth ``user:password[,user:password...]``, or None."""
    for entry in value.split(","):
        user, colon, password = entry.partition(":")
        if not colon or not user.strip() or not password:
            return (
                "Flower basic auth must be user:password with neither part empty (comma-"
                "separated for several users); fix CLAUDEBOX_FLOWER_BASIC_AUTH"
            )
    return None


def _lock_down() -> None:
    # Imported here: only the Flower process has Flower and tornado loaded.
    import tornado.routing
    import tornado.web
    from flower import urls
    from flower.api import BaseApiHandler
    from tornado.options import options

    from claudebox_pool.tasks.settings import get_settings

    problem = basic_auth_problem(",".join(options.basic_auth)) if options.basic_auth else None
    if problem is not None:
        print(f"claudebox-pool: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if get_settings().flower_control_api:
        return

    class ControlApiOff(BaseApiHandler):  # type: ignore[misc]  # Flower ships no types
        def prepare(self) -> None:
            super().prepare()
            if not self.current_user:  # Flower's own check: 401 without valid credentials
                raise tornado.web.HTTPError(401)
            self.set_status(403)
            self.finish(
                {
                    "error": "Flower's control API is off in claudebox-pool; an operator can "
                    "turn it on with CLAUDEBOX_FLOWER_CONTROL_API=true"
                }
            )

    for index, handler in enumerate(urls.handlers):
        pattern = (
            handler.regex.pattern if isinstance(handler, tornado.routing.URLSpec) else handler[0]
        )
        if str(pattern).startswith(CONTROL_ROUTES):
            urls.handlers[index] = (pattern, ControlApiOff)


def _serve_health() -> None:
    # Imported here, as in _lock_down: only the Flower process has tornado loaded.
    import asyncio

    import tornado.web
    from flower import urls

    from claudebox_pool.producer.health import check

    class PoolHealth(tornado.web.RequestHandler):
        """``/health``: 200 when the pool can take work, 503 saying why not (producer.health).
        Without authentication, like Flower's ``/healthcheck``: probes carry no credentials,
        and the report holds no secret (URLs are shown with their password hidden)."""

        async def get(self) -> None:
            # In a thread: an unanswering Redis would hold Flower's event loop for the timeout.
            report = await asyncio.to_thread(check)
            self.set_status(200 if report.healthy else 503)
            self.finish(report.model_dump(mode="json"))

    urls.handlers.insert(0, (HEALTH_ROUTE, PoolHealth))


# Flower executes this file with flower.command already loaded; anywhere else it is imported.
if "flower.command" in sys.modules:
    _lock_down()
    _serve_health()
