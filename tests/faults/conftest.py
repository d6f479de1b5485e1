"""Helpers of the fault tests: open a session, send a `code` task, read its result and history.

Tasks are sent with ``producer.pool.send`` rather than ``ClaudeBox.code`` so that a test holds
the task id (to find the delivery in history, or to send it twice) while it breaks things.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from claudebox_pool import ClaudeBox
from claudebox_pool.producer import pool
from claudebox_pool.tasks import names
from claudebox_pool.tasks.app import app, configure
from claudebox_pool.tasks.models import CodeRequest, CodeResult, HistoryEntry
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.store import SessionStore
from tests.support.processes import RedisServer, Worker


def open_session(session_id: str) -> Path:
    """Create the persistent session ``session_id``; its workspace."""

    async def scenario() -> str:
        async with ClaudeBox(session_id=session_id) as box:
            return box.workspace_path

    return Path(asyncio.run(scenario()))


def send_code(session_id: str, prompt: str, task_id: str | None = None) -> str:
    """Queue a shell-agent `code` task (under ``task_id`` if given); its task id."""
    payload = CodeRequest(session_id=session_id, prompt=prompt, agent="shell")
    if task_id is None:
        return pool.send(names.CODE, payload.model_dump(mode="json"))
    app.send_task(
        names.CODE, args=[payload.model_dump(mode="json")], task_id=task_id, queue=names.QUEUE
    )
    return task_id


def result_of(task_id: str, timeout_s: float) -> CodeResult:
    """The task's result; its ClaudeBoxError re-raised as the same class."""
    raw: Any = asyncio.run(pool.wait(task_id, timeout_s))
    return CodeResult.model_validate(raw)


def history(session_id: str) -> list[HistoryEntry]:
    return SessionStore(get_settings().sessions_root).history(session_id)


def entries_of(session_id: str, action: str, task_id: str) -> list[HistoryEntry]:
    return [
        entry
        for entry in history(session_id)
        if entry.action == action and entry.context.get("task_id") == task_id
    ]


def running_in(task_id: str) -> tuple[str, int] | None:
    """The worker (hostname) and pool process (pid) running ``task_id``, as the workers
    answer Celery's remote control (`celery inspect active`); None until one says so."""
    active = app.control.inspect(timeout=2).active() or {}
    for hostname, requests in active.items():
        for request in requests:
            if request.get("id") == task_id and request.get("worker_pid"):
                return str(hostname), int(request["worker_pid"])
    return None


def read_pid(path: Path) -> int | None:
    """The pid a task script wrote to ``path``, once it is there whole."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") and text.strip().isdigit() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def reap_stray(pid: int | None) -> None:
    """Kill what a task left running (a `local` runtime agent outlives a killed worker)."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def reconfigure() -> None:
    """Point this process's producer at the Redis the environment names now.

    ``tasks.app.configure`` drops the backend and connection pool, but not the producer pool
    that Celery caches on first ``send_task``: without this, tasks would still be published to
    the Redis of the tests that ran before.
    """
    get_settings.cache_clear()
    configure()
    app.amqp._producer_pool = None


@contextlib.contextmanager
def pool_of_its_own(
    pool_env: dict[str, str], base: Path, **env: str
) -> Iterator[tuple[RedisServer, Worker]]:
    """A Redis with an append-only file under ``base`` and one worker (two slots, `local`
    runtime) on it, this process pointed at it meanwhile: for tests that kill or stop Redis."""
    server = RedisServer(base / "redis", appendonly=True)
    server.start()
    env = {
        "CLAUDEBOX_BROKER_URL": server.url,
        "CLAUDEBOX_RESULT_BACKEND": server.url,
        "CLAUDEBOX_HOME": str(base / "home"),
        "CLAUDEBOX_RUNTIME": "local",
        **env,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    reconfigure()
    worker = Worker({**pool_env, **env}, base / "logs", concurrency=2)
    try:
        worker.start()
        worker.wait_ready(server.client())
        yield server, worker
    finally:
        worker.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reconfigure()
        server.stop()
