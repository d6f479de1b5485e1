"""`claudebox-pool up` / `down`: a whole local pool, started and stopped as a user would.

Each test gives the pool its own HOME and a free Redis port, so that `up` starts its own
redis-server, and marks every process of the pool through its environment, so that "no process
left behind" is checked against the whole process table rather than a list of pids.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from tests.support.processes import REPO, free_port, wait_for

CLAUDEBOX_POOL = str(Path(sys.executable).parent / "claudebox-pool")
MARKER = "CLAUDEBOX_TEST_POOL"
NODE = "local-pool-test"


@dataclass
class LocalPool:
    home: Path
    port: int
    env: dict[str, str]

    @property
    def sessions(self) -> Path:
        return self.home / ".claudebox" / "sessions"

    def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLAUDEBOX_POOL, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )

    def start(self, *args: str, output: Path) -> subprocess.Popen[bytes]:
        """A `claudebox-pool` process in a session of its own, as a terminal would run it."""
        with output.open("wb") as sink:
            return subprocess.Popen(
                [CLAUDEBOX_POOL, *args],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def redis(self) -> redis.Redis:
        """A client of the Redis `up` started, with the password it generated."""
        password = (self.home / ".claudebox" / "run" / "redis" / "password").read_text()
        return redis.Redis(port=self.port, password=password.strip())

    def processes(self) -> list[str]:
        """Command lines of every process carrying this pool's marker."""
        tag = f"{MARKER}={self.env[MARKER]}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            try:
                environ = (proc / "environ").read_bytes()
                cmdline = (proc / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if tag in environ.split(b"\0"):
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
        return found


@pytest.fixture
def local_pool(tmp_path: Path) -> Iterator[LocalPool]:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLAUDEBOX_")}
    env |= {
        "HOME": str(tmp_path),
        "CLAUDEBOX_BROKER_URL": url,
        "CLAUDEBOX_RESULT_BACKEND": url,
        "CLAUDEBOX_NODE_NAME": NODE,
        MARKER: uuid.uuid4().hex,
    }
    pool = LocalPool(tmp_path, port, env)
    yield pool
    # Whatever a failed test left running must not outlive it.
    if (tmp_path / ".claudebox" / "run" / "pool.json").exists():
        pool.run("down", "--timeout", "5")


def test_up_detach_submit_down_runs_the_batch_and_leaves_no_process(
    local_pool: LocalPool,
) -> None:
    results = local_pool.home / "results.jsonl"

    started = local_pool.run("up", "--detach")
    submitted = local_pool.run("submit", "examples/batch.jsonl", "--results", str(results))
    stopped = local_pool.run("down")

    assert started.returncode == 0, started.stdout + started.stderr
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(written) == 50
    assert all(result["success"] for result in written)
    assert local_pool.processes() == []


def test_ctrl_c_finishes_the_running_task_and_a_restart_runs_the_queued_one(
    local_pool: LocalPool,
) -> None:
    up_log = local_pool.home / "up.log"
    up = local_pool.start("up", "--concurrency", "1", output=up_log)
    wait_for(lambda: "pool up" in up_log.read_text(), 60, "the pool to start")
    client = local_pool.redis()
    # The slow task holds the only slot until the test lets it go (a file appears), however
    # long the next producer takes to start on a loaded machine.
    running = local_pool.start(
        "code",
        "slow",
        "i=0; until [ -e go ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done;"
        " echo one > one.txt",
        output=local_pool.home / "slow.log",
    )
    wait_for(lambda: client.exists(keys.session_lock("slow")), 30, "the slow task to run")
    # The only slot is busy: the first task of this call waits in the common queue. Its
    # producer rides out a Redis outage for CLAUDEBOX_REDIS_OUTAGE_S, short here: the pool's
    # Redis goes with the pool.
    local_pool.env["CLAUDEBOX_REDIS_OUTAGE_S"] = "3"
    queued = local_pool.start("code", "queued", "true", output=local_pool.home / "queued.log")

    def queued_task() -> str | None:
        for raw in client.lrange(names.QUEUE, 0, -1):
            headers = json.loads(raw)["headers"]
            if "session=queued" in headers.get("argsrepr", ""):
                return str(headers["id"])
        return None

    queued_id = wait_for(queued_task, 30, "a task to wait in the queue")
    result_key = app.backend.get_key_for_task(queued_id)

    os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    wait_for(lambda: "stopping: running tasks finish first" in up_log.read_text(), 30, "up to stop")
    (local_pool.sessions / "slow" / "workspace" / "go").touch()

    assert up.wait(60) == 0, up_log.read_text()
    assert running.wait(30) == 0, (local_pool.home / "slow.log").read_text()
    assert (local_pool.sessions / "slow" / "workspace" / "one.txt").read_text() == "one\n"
    assert queued.wait(30) == 3  # its producer lost Redis; its task did not
    assert local_pool.processes() == []
    log = up_log.read_text()
    assert "worker-1 | " in log and "beat     | " in log and "redis    | " in log

    local_pool.env["CLAUDEBOX_FLOWER_BASIC_AUTH"] = "ops:s3cret"
    flower = str(free_port())
    restarted = local_pool.run("up", "--detach", "--flower", "--flower-port", flower)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    wait_for(lambda: client.exists(result_key), 30, "the queued task to run")
    wait_for(lambda: flower_status(int(flower), None) != 0, 30, "Flower to answer")
    assert flower_status(int(flower), None) == 401
    assert flower_status(int(flower), "ops:wrong") == 401
    assert flower_status(int(flower), "ops:s3cret") == 200
    assert local_pool.run("down").returncode == 0
    assert local_pool.processes() == []


def test_up_refuses_flower_without_credentials_and_starts_nothing(
    local_pool: LocalPool,
) -> None:
    refused = local_pool.run("up", "--detach", "--flower")

    assert refused.returncode == 2
    assert "CLAUDEBOX_FLOWER_BASIC_AUTH" in refused.stderr
    assert local_pool.processes() == []


def flower_status(port: int, credentials: str | None) -> int:
    """The HTTP status of Flower's workers API; 0 while nothing answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers")
    if credentials is not None:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def free_port_pair() -> int:
    """A port that is free with the next one, below the ephemeral range (where a connection's
    own port could take the second at any time)."""
    for first in range(20_000, 32_000, 2):
        with socket.socket() as one, socket.socket() as two:
            try:
                one.bind(("127.0.0.1", first))
                two.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
            return first
    raise RuntimeError("no two free ports in a row")


def test_up_gives_each_worker_a_metrics_port_of_its_own(local_pool: LocalPool) -> None:
    first = free_port_pair()
    local_pool.env["CLAUDEBOX_METRICS_PORT"] = str(first)

    started = local_pool.run("up", "--detach", "--workers", "2", "--concurrency", "1")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        for port in (first, first + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                assert 'claudebox_queue_depth{queue="claudebox"} 0.0' in page.read().decode()
    finally:
        stopped = local_pool.run("down")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not (local_pool.home / ".claudebox" / "run" / "metrics").exists() or not any(
        (local_pool.home / ".claudebox" / "run" / "metrics").iterdir()
    )
