"""The pool's health (`claudebox-pool health`, Flower's `/health`): Redis answers and a worker
is alive. Flower's own `/healthcheck` answers OK either way, which is why the deploy files
probe these instead."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudebox_pool.producer.health import check
from claudebox_pool.tasks.settings import get_settings
from tests.conftest import WorkerFactory
from tests.support.flower import FlowerClient, running_flower
from tests.support.processes import claudebox_pool, free_port, wait_for

REDIS_PASSWORD = "health-secret"


@pytest.fixture(scope="module")
def flower(
    pool_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerClient]:
    with running_flower(tmp_path_factory.mktemp("flower") / "flower.log") as client:
        yield client


def dead_redis_env() -> dict[str, str]:
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    return {"CLAUDEBOX_BROKER_URL": url, "CLAUDEBOX_RESULT_BACKEND": url}


def test_health_fails_with_redis_down_and_says_so_without_its_password(tmp_path: Path) -> None:
    env = dead_redis_env()

    done = claudebox_pool("health", env=env)
    as_json = claudebox_pool("health", "--json", env=env)

    assert done.returncode == 3, done.stderr
    assert "unhealthy: cannot reach Redis at redis://:***@127.0.0.1:" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    report = json.loads(as_json.stdout)
    assert (as_json.returncode, report["healthy"], report["redis"]) == (3, False, False)
    assert REDIS_PASSWORD not in done.stderr + as_json.stdout


def test_flower_answers_its_healthcheck_with_redis_down_but_not_health(tmp_path: Path) -> None:
    with running_flower(tmp_path / "flower.log", **dead_redis_env()) as flower:
        status, body = flower.get("/health", auth=None)

        assert flower.get("/healthcheck", auth=None)[0] == 200
    assert status == 503
    assert json.loads(body)["redis"] is False
    assert REDIS_PASSWORD not in body


def test_health_fails_with_redis_up_but_no_worker_alive(flower: FlowerClient) -> None:
    # A worker of an earlier module may have beaten a moment ago: its beat ages out.
    wait_for(
        lambda: check().workers_alive == 0,
        3 * get_settings().worker_alive_s,
        "earlier workers' heartbeats to age out",
    )
    report = check()

    done = claudebox_pool("health")

    assert (report.healthy, report.redis) == (False, True)
    assert done.returncode == 3
    assert "unhealthy: no worker sent a heartbeat in the last 3s" in done.stderr
    status, body = flower.get("/health", auth=None)
    assert status == 503 and json.loads(body)["workers_alive"] == 0


def test_health_passes_once_a_worker_is_alive(
    flower: FlowerClient, start_workers: WorkerFactory
) -> None:
    start_workers(1, concurrency=1)

    done = claudebox_pool("health")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "healthy: Redis answers, 1 worker(s) alive"
    status, body = flower.get("/health", auth=None)
    assert status == 200
    assert json.loads(body) == {"healthy": True, "redis": True, "workers_alive": 1, "problems": []}
