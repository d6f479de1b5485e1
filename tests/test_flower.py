"""Flower on a real pool: `claudebox-pool flower` started as a process, driven over HTTP.

Flower learns about tasks from Celery's events, which are not kept: the test waits until Flower
has heard a worker's heartbeat (its Prometheus gauge says the worker is online) before it runs
the tasks it then looks for.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from claudebox_pool import ClaudeBox, CodeResult, SessionNotFoundError
from claudebox_pool.tasks import names
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.store import SessionStore
from tests.conftest import WorkerFactory
from tests.support.flower import USER, FlowerClient, running_flower
from tests.support.processes import RedisServer, Worker, wait_for

CANARY = "sk-canary-never-in-flower"
LONG_PROMPT = "echo hi # " + "x" * 500


def metric_lines(flower: FlowerClient, name: str, *labels: str) -> list[str]:
    """The lines of Flower's Prometheus output for metric ``name`` carrying all ``labels``."""
    lines = flower.get("/metrics")[1].splitlines()
    return [
        line for line in lines if line.startswith(name + "{") and all(x in line for x in labels)
    ]


def state_of(flower: FlowerClient, task_id: str) -> str | None:
    """The task's state in Flower's task list; None while Flower has not heard of it."""
    task = flower.json("/api/tasks").get(task_id)
    return None if task is None else str(task["state"])


@pytest.fixture(scope="module")
def worker(start_workers: WorkerFactory) -> Worker:
    return start_workers(1, concurrency=2)[0]


@pytest.fixture(scope="module")
def flower(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerClient]:
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    with running_flower(log_path) as client:
        online = f'worker="{worker.hostname}"'
        wait_for(
            lambda: any(
                line.endswith(" 1.0")
                for line in metric_lines(client, "flower_worker_online", online)
            ),
            60,
            "Flower to hear the worker",
        )
        yield client


pytestmark = pytest.mark.usefixtures("clean_state")


def test_flower_refuses_a_request_without_or_with_wrong_credentials(flower: FlowerClient) -> None:
    assert flower.get("/api/tasks", auth=None)[0] == 401
    assert flower.get("/api/workers", auth=(USER, "wrong"))[0] == 401


def test_flower_lists_the_worker(flower: FlowerClient, worker: Worker) -> None:
    assert worker.hostname in flower.json("/api/workers?refresh=1")


def test_a_finished_task_shows_its_session_and_a_short_prompt_but_no_env_value(
    flower: FlowerClient,
) -> None:
    async def scenario() -> str:
        async with ClaudeBox(session_id="watched", env={"API_TOKEN": CANARY}) as box:
            return (await box.code(LONG_PROMPT)).task_id

    task_id = asyncio.run(scenario())

    wait_for(lambda: state_of(flower, task_id) == "SUCCESS", 30, "Flower to see the task end")
    task = flower.json(f"/api/task/info/{task_id}")
    assert task["name"] == "claudebox.code"
    assert task["args"].startswith("[session=watched agent=shell prompt=echo hi # xxx")
    assert len(task["args"]) < 120
    assert task["kwargs"] == "{}"
    assert CANARY not in json.dumps(flower.json("/api/tasks"))
    counted = metric_lines(flower, "flower_events_total", f'worker="{task["worker"]}"')
    assert any('type="task-succeeded"' in line and "claudebox.code" in line for line in counted)


def tasks_in(flower: FlowerClient, state: str, name: str = "claudebox.code") -> dict[str, Any]:
    """Flower's task list under its filter for ``state`` (the dashboard's Failed, Started...)."""
    found: dict[str, Any] = flower.json(f"/api/tasks?state={state}&taskname={name}")
    return found


def test_a_running_task_is_listed_under_started(flower: FlowerClient) -> None:
    workspace = get_settings().sessions_root / "long-one" / "workspace"

    async def scenario() -> str:
        async with ClaudeBox(session_id="long-one") as box:
            call = asyncio.ensure_future(box.code("while [ ! -f go ]; do sleep 0.02; done"))
            while box.running_task_id is None:
                await asyncio.sleep(0.01)
            task_id = box.running_task_id
            await asyncio.to_thread(
                wait_for,
                lambda: task_id in tasks_in(flower, "STARTED"),
                30,
                "Flower to list the running task under Started",
            )
            (workspace / "go").touch()
            await call
            return task_id

    task_id = asyncio.run(scenario())

    wait_for(lambda: state_of(flower, task_id) == "SUCCESS", 30, "Flower to see the task end")
    assert task_id not in tasks_in(flower, "STARTED")


def test_a_failed_run_is_a_failed_task_with_a_one_line_reason_and_the_caller_gets_its_result(
    flower: FlowerClient, redis_server: RedisServer
) -> None:
    async def scenario() -> CodeResult:
        async with ClaudeBox(session_id="failing") as box:
            return await box.code(f"echo partial-{CANARY}; echo boom >&2; exit 3")

    result = asyncio.run(scenario())

    assert (result.success, result.exit_code, result.response) == (False, 3, f"partial-{CANARY}\n")
    wait_for(lambda: result.task_id in tasks_in(flower, "FAILURE"), 30, "Flower to list it failed")
    task = flower.json(f"/api/task/info/{result.task_id}")
    assert task["exception"] == "AgentRunFailedError('agent exited 3: exit code 3: boom')"
    assert CANARY not in task["exception"] + task["traceback"]
    assert len(task["traceback"].splitlines()) < 15
    assert result.task_id not in tasks_in(flower, "SUCCESS")
    counted = metric_lines(flower, "flower_events_total", 'type="task-failed"', "claudebox.code")
    assert counted and all(not line.endswith(" 0.0") for line in counted)
    # Acknowledged, neither retried nor requeued (late acks): it ran once.
    client = redis_server.client()
    wait_for(lambda: client.hlen("unacked") == 0, 30, "the failed task's message to be acked")
    assert client.llen(names.QUEUE) == 0
    history = SessionStore(get_settings().sessions_root).history("failing")
    runs = [entry for entry in history if entry.action == "code_execution"]
    assert [run.context["task_id"] for run in runs] == [result.task_id]


def test_the_probe_before_creating_a_new_session_is_not_a_failure(flower: FlowerClient) -> None:
    async def scenario() -> str:
        try:
            box = await ClaudeBox.reconnect("probed")
        except SessionNotFoundError:
            box = ClaudeBox(session_id="probed")
        async with box:
            return (await box.code("echo here")).response

    assert asyncio.run(scenario()) == "here\n"

    def probes() -> dict[str, Any]:
        opened = flower.json("/api/tasks?taskname=claudebox.open")
        return {
            task_id: task
            for task_id, task in opened.items()
            if "session=probed" in task["args"] and "mode=reconnect" in task["args"]
        }

    wait_for(
        lambda: [task["state"] for task in probes().values()] == ["SUCCESS"],
        30,
        "Flower to see the probe succeed",
    )
    assert not any(
        "session=probed" in task["args"]
        for task in tasks_in(flower, "FAILURE", "claudebox.open").values()
    )
