"""Secrets at rest and in the dashboard, attacked the way an operator's neighbour would.

A task's env values and its whole prompt must not be readable from the result backend, from
``celery inspect`` (asked for raw arguments), from Flower's task API, or from Redis once the
task is done; beat and Flower never hold the model key; Flower cannot be used to run commands
or stop workers unless an operator turns its control API on; ``up`` protects its Redis.
Everything here is real: redis-server, worker processes, Flower, ``claudebox-pool up``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from claudebox_pool import ClaudeBox, enqueue
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.settings import get_settings
from tests.conftest import WorkerFactory
from tests.support.processes import REPO, RedisServer, Worker, free_port, wait_for
from tests.test_local_pool import LocalPool, local_pool  # noqa: F401  # the fixture

CANARY = "sk-canary-env-value-0f3c9"
MODEL_KEY = "sk-ant-api03-model-key-only-for-workers"
TAIL = "prompt-tail-7d1e2b-never-stored"
USER, PASSWORD = "ops", "flower-secrets-password"
CELERY = (sys.executable, "-m", "celery", "-A", "claudebox_pool.tasks.app")

pytestmark = pytest.mark.usefixtures("clean_state")


def everything_in(client: redis.Redis) -> dict[str, bytes]:
    """Every key of the Redis and the raw bytes of its value, whatever its type."""
    dump: dict[str, bytes] = {}
    for raw_key in client.scan_iter(count=1000):
        key = raw_key.decode()
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "zset":
            value = client.zrange(key, 0, -1)
        elif kind == "stream":
            value = client.xrange(key)
        else:
            value = b""
        dump[key] = repr(value).encode()
    return dump


def holding(dump: dict[str, bytes], needle: str) -> set[str]:
    return {key for key, value in dump.items() if needle.encode() in value}


def inspect_active_cli() -> str:
    """``celery inspect active`` as an operator (or anyone with the broker URL) runs it."""
    done = subprocess.run(
        [*CELERY, "inspect", "active"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def worker(start_workers: WorkerFactory) -> Worker:
    return start_workers(1, concurrency=2)[0]


def test_env_values_and_the_whole_prompt_stay_out_of_results_inspect_and_redis(
    worker: Worker, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    workspace = get_settings().sessions_root / "secretive" / "workspace"
    prompt = (
        "printenv API_TOKEN > seen; while [ ! -f go ]; do sleep 0.02; done # " + "x" * 200 + TAIL
    )
    seen: dict[str, Any] = {}

    async def scenario() -> str:
        async with ClaudeBox(session_id="secretive", env={"API_TOKEN": CANARY}) as box:
            call = asyncio.ensure_future(box.code(prompt))
            await asyncio.to_thread(
                wait_for, lambda: (workspace / "seen").exists(), 30, "the task to run"
            )
            seen["raw"] = app.control.inspect(timeout=5).active(safe=False)
            seen["reserved"] = app.control.inspect(timeout=5).reserved()
            seen["cli"] = await asyncio.to_thread(inspect_active_cli)
            seen["running"] = everything_in(client)
            (workspace / "go").touch()
            return (await call).task_id

    task_id = asyncio.run(scenario())

    assert (workspace / "seen").read_text() == CANARY + "\n"
    raw = json.dumps(seen["raw"])
    assert task_id in raw and "session=secretive" in raw
    assert "session=secretive" in seen["cli"]
    for shown in (raw, json.dumps(seen["reserved"]), seen["cli"]):
        assert CANARY not in shown
        assert TAIL not in shown
    # While it runs, the values wait in their own short-lived key and nowhere else.
    assert {key.rpartition(":")[0] for key in holding(seen["running"], CANARY)} == {
        keys.task_env("x").rpartition(":")[0]
    }
    done = everything_in(client)
    assert holding(done, CANARY) == set()
    assert holding(done, TAIL) == set()
    meta = json.loads(client.get(app.backend.get_key_for_task(task_id)) or b"{}")
    assert meta["status"] == "SUCCESS"
    assert "args" not in meta and "kwargs" not in meta


def test_queued_batch_jobs_carry_their_env_values_beside_the_messages(
    worker: Worker, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    sessions = get_settings().sessions_root
    wait = "while [ ! -f go ]; do sleep 0.02; done"
    jobs: list[dict[str, Any]] = [
        {"id": "first", "session_id": "batched", "prompt": wait},
        {"id": "second", "session_id": "batched", "prompt": "printenv API_TOKEN > seen"},
    ]
    jobs[1]["env"] = {"API_TOKEN": CANARY}

    queued = asyncio.run(enqueue(jobs))
    wait_for(lambda: client.exists(keys.session_lock("batched")), 30, "the first job to run")
    waiting = everything_in(client)
    (sessions / "batched" / "workspace" / "go").touch()
    second = AsyncResult(queued[1].task_id, app=app)
    second.get(timeout=30)

    # The chain's later step waits inside the first one's message: without its env values.
    assert {key.rpartition(":")[0] for key in holding(waiting, CANARY)} == {
        keys.task_env("x").rpartition(":")[0]
    }
    assert (sessions / "batched" / "workspace" / "seen").read_text() == CANARY + "\n"
    assert holding(everything_in(client), CANARY) == set()


def test_a_task_whose_env_values_expired_fails_with_a_message(
    worker: Worker, redis_server: RedisServer
) -> None:
    client = redis_server.client()

    async def scenario() -> None:
        async with ClaudeBox(session_id="expired") as box:
            await box.code("true")
        payload = {
            "session_id": "expired",
            "prompt": "printenv API_TOKEN",
            "agent": "shell",
            "env_ref": "gone-token",
        }
        result = app.send_task(names.CODE, args=[payload], queue=names.QUEUE)
        with pytest.raises(Exception, match="expired in Redis before a worker ran it"):
            await asyncio.to_thread(result.get, timeout=30)

    asyncio.run(scenario())
    assert not client.exists(keys.task_env("gone-token"))


# --- Flower ---------------------------------------------------------------------------------


class Flower:
    def __init__(self, port: int, child: subprocess.Popen[bytes]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.child = child

    def call(
        self, method: str, path: str, body: bytes | None = None, auth: bool = True
    ) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if auth:
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def answers(self) -> bool:
        try:
            return self.call("GET", "/healthcheck")[0] == 200
        except OSError:
            return False


def start_flower(log: Path, **env: str) -> Flower:
    port = free_port()
    environment = {
        **os.environ,
        "CLAUDEBOX_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "CLAUDEBOX_ANTHROPIC_API_KEY": MODEL_KEY,
        "ANTHROPIC_API_KEY": MODEL_KEY,
        **env,
    }
    with log.open("wb") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "claudebox_pool.producer.cli", "flower", "--port", str(port)],
            env=environment,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    flower = Flower(port, child)
    wait_for(lambda: flower.answers() or child.poll() is not None, 60, "Flower to answer")
    assert child.poll() is None, log.read_text()
    return flower


def stop_flower(flower: Flower) -> None:
    os.killpg(flower.child.pid, signal.SIGTERM)
    flower.child.wait(30)


@pytest.fixture(scope="module")
def flower(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    started = start_flower(tmp_path_factory.mktemp("flower") / "flower.log")
    yield started
    stop_flower(started)


def environ_of(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return [entry.decode(errors="replace") for entry in raw.split(b"\0") if entry]


def test_flower_runs_without_the_model_key(flower: Flower) -> None:
    environ = environ_of(flower.child.pid)

    assert any(entry.startswith("FLOWER_BASIC_AUTH=") for entry in environ)
    assert not any(MODEL_KEY in entry for entry in environ)


def test_flower_task_api_shows_no_env_value_and_no_whole_prompt(
    flower: Flower, worker: Worker
) -> None:
    async def scenario() -> str:
        async with ClaudeBox(session_id="shown", env={"API_TOKEN": CANARY}) as box:
            return (await box.code("true # " + "y" * 200 + TAIL)).task_id

    task_id = asyncio.run(scenario())

    def listed() -> bool:
        status, body = flower.call("GET", "/api/tasks")
        return status == 200 and task_id in json.loads(body)

    wait_for(listed, 30, "Flower to hear of the task")
    for path in ("/api/tasks", f"/api/task/info/{task_id}", f"/api/task/result/{task_id}"):
        status, body = flower.call("GET", path)
        assert status == 200, body
        assert CANARY not in body and TAIL not in body


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"/api/task/send-task/{names.CODE}", {"args": [{"session_id": "x", "prompt": "id"}]}),
        (f"/api/task/async-apply/{names.CODE}", {"args": []}),
        ("/api/task/revoke/some-task?terminate=true", None),
        ("/api/worker/shutdown/{worker}", None),
        ("/api/worker/pool/shrink/{worker}", None),
        ("/api/worker/pool/autoscale/{worker}?min=1&max=9", None),
        ("/api/worker/queue/cancel-consumer/{worker}?queue=claudebox", None),
        ("/api/task/rate-limit/claudebox.code?workername={worker}&ratelimit=1/h", None),
    ],
)
def test_flower_control_api_is_off(
    flower: Flower, worker: Worker, path: str, body: dict[str, Any] | None
) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    target = path.format(worker=worker.hostname)

    status, text = flower.call("POST", target, data)
    anonymous, _ = flower.call("POST", target, data, auth=False)

    assert status == 403, text
    assert "CLAUDEBOX_FLOWER_CONTROL_API" in text
    assert anonymous == 401
    assert worker.proc is not None and worker.proc.poll() is None


def test_flower_control_api_answers_once_an_operator_turns_it_on(
    worker: Worker, tmp_path: Path
) -> None:
    opened = start_flower(tmp_path / "flower.log", CLAUDEBOX_FLOWER_CONTROL_API="true")
    try:
        status, text = opened.call("POST", "/api/task/revoke/no-such-task", b"")
    finally:
        stop_flower(opened)

    assert status == 200, text
    assert "no-such-task" in text


@pytest.mark.parametrize("auth", ["ops:", ":pw", "ops", "ops:pw,admin:"])
def test_flower_refuses_malformed_basic_auth_at_start(auth: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "flower", "--port", "1"],
        env={**os.environ, "CLAUDEBOX_FLOWER_BASIC_AUTH": auth},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "CLAUDEBOX_FLOWER_BASIC_AUTH" in done.stderr


def test_a_flower_started_by_hand_refuses_empty_basic_auth() -> None:
    conf = REPO / "deploy" / "flower" / "flowerconfig.py"
    done = subprocess.run(
        [*CELERY, "flower", f"--conf={conf}", "--port=1"],
        env={**os.environ, "FLOWER_BASIC_AUTH": "ops:"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2, done.stdout + done.stderr
    assert "basic auth must be user:password" in done.stderr


def test_beat_runs_without_the_model_key(worker: Worker, tmp_path: Path) -> None:
    env = {**os.environ, "CLAUDEBOX_ANTHROPIC_API_KEY": MODEL_KEY, "ANTHROPIC_API_KEY": MODEL_KEY}
    with (tmp_path / "beat.log").open("wb") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "claudebox_pool.producer.cli", "beat"],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        # The CLI replaces itself with Celery's beat: same pid, new command line and environment.
        wait_for(
            lambda: (
                b"beat" in Path(f"/proc/{child.pid}/cmdline").read_bytes()
                and b"celery" in Path(f"/proc/{child.pid}/cmdline").read_bytes()
            ),
            30,
            "beat to start",
        )
        environ = environ_of(child.pid)
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(30)

    assert any(entry.startswith("CLAUDEBOX_BROKER_URL=") for entry in environ)
    assert not any(MODEL_KEY in entry for entry in environ)


# --- `claudebox-pool up` --------------------------------------------------------------------


def test_up_protects_its_redis_and_gives_the_model_key_to_workers_only(
    local_pool: LocalPool,  # noqa: F811  # the fixture imported above
) -> None:
    local_pool.env |= {
        "CLAUDEBOX_ANTHROPIC_API_KEY": MODEL_KEY,
        "CLAUDEBOX_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
    }
    flower_port = str(free_port())
    started = local_pool.run("up", "--detach", "--flower", "--flower-port", flower_port)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        ran = local_pool.run("code", "by-user", "echo hi")
        anonymous = redis.Redis(port=local_pool.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        redis_dir = local_pool.home / ".claudebox" / "run" / "redis"
        files = [path for path in redis_dir.rglob("*") if path.is_file()]
        environs = {cmdline: environ_of(pid) for pid, cmdline in pool_processes(local_pool)}
    finally:
        local_pool.run("down", "--timeout", "10")

    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "hi" in ran.stdout
    assert any(path.name == "password" for path in files)
    assert any("appendonly" in path.name for path in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    by_role = {
        role: [env for cmdline, env in environs.items() if f" {role} " in f"{cmdline} "]
        for role in ("worker", "beat", "flower")
    }
    assert all(by_role.values()), list(environs)
    assert all(MODEL_KEY in "\n".join(env) for env in by_role["worker"])
    for role in ("beat", "flower"):
        assert not any(MODEL_KEY in "\n".join(env) for env in by_role[role]), role


def pool_processes(pool: LocalPool) -> list[tuple[int, str]]:
    """(pid, command line) of every live process carrying the pool's marker."""
    tag = f"CLAUDEBOX_TEST_POOL={pool.env['CLAUDEBOX_TEST_POOL']}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if tag in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(proc.name), cmdline))
        except OSError:
            continue
    return found
