"""``claudebox-pool up`` / ``down``: a whole pool on one machine, for development and demos.

It uses the Redis of CLAUDEBOX_BROKER_URL if one answers there, else starts the system's
redis-server on that address (append-only file on, no eviction). Workers and beat are
``claudebox-pool worker`` / ``beat`` processes. In the foreground, Ctrl-C reaches every process
of the pool and Celery's warm shutdown lets running tasks finish; with ``--detach`` the pool's
processes are written to ``<home>/run/pool.json`` for ``down``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel
from rich.console import Console

from tasks import keys
from tasks.connections import redacted, sync_redis
from tasks.errors import InvalidRequestError, PoolUnavailableError
from tasks.settings import Settings, get_settings

READY_TIMEOUT_S = 90
STOP_TIMEOUT_S = 120
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class PoolState(BaseModel):
    redis_pid: int | None = None
    worker_pids: list[int] = []
    beat_pid: int | None = None
    worker_names: list[str] = []


def run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def state_file(settings: Settings) -> Path:
    return run_dir(settings) / "pool.json"


def _redis_answers(settings: Settings) -> bool:
    client = sync_redis(settings)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _start_redis(settings: Settings, detach: bool) -> subprocess.Popen[bytes]:
    url = urlsplit(settings.broker_url)
    if url.scheme != "redis" or (url.hostname or "") not in LOCAL_HOSTS:
        raise PoolUnavailableError(
            f"no Redis answers at {redacted(settings.broker_url)} and it is not a local address "
            "this command could start one on; start that Redis, or unset CLAUDEBOX_BROKER_URL"
        )
    server = shutil.which("redis-server")
    if server is None:
        raise PoolUnavailableError(
            "redis-server is not installed: apt-get install redis-server (or brew install redis)"
        )
    directory = run_dir(settings) / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        server,
        "--bind",
        url.hostname or "127.0.0.1",
        "--port",
        str(url.port or 6379),
        "--dir",
        str(directory),
        "--appendonly",
        "yes",
        "--maxmemory-policy",
        "noeviction",
    ]
    if url.password:
        argv += ["--requirepass", url.password]
    proc = _spawn(argv, settings, "redis", detach)
    deadline = time.monotonic() + 10
    while not _redis_answers(settings):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise PoolUnavailableError(
                f"redis-server did not start (see {run_dir(settings) / 'logs' / 'redis.log'})"
            )
        time.sleep(0.05)
    return proc


def _spawn(argv: list[str], settings: Settings, name: str, detach: bool) -> subprocess.Popen[bytes]:
    output: IO[bytes] | None = None
    if detach:
        logs = run_dir(settings) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        output = (logs / f"{name}.log").open("ab")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if detach else None,
            start_new_session=detach,
        )
    finally:
        if output is not None:
            output.close()


def _cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "producer.cli", *arguments]


def _wait_ready(settings: Settings, names: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    client = sync_redis(settings)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while not all(client.zscore(keys.workers(), name) is not None for name in names):
            if any(proc.poll() is not None for proc in procs):
                raise PoolUnavailableError(
                    f"a worker exited during start; see {run_dir(settings) / 'logs'}"
                )
            if time.monotonic() > deadline:
                raise PoolUnavailableError(f"workers not ready after {READY_TIMEOUT_S}s")
            time.sleep(0.1)
    finally:
        client.close()


def up(workers: int, concurrency: int, detach: bool, out: Console) -> None:
    settings = get_settings()
    if workers < 1 or concurrency < 1:
        raise InvalidRequestError("--workers and --concurrency must be at least 1")
    if detach and state_file(settings).exists() and _alive(_read_state(settings)):
        raise InvalidRequestError(
            "a local pool is already running; stop it with `claudebox-pool down`"
        )
    state = PoolState()
    redis_proc = None
    if _redis_answers(settings):
        out.print(f"using the Redis at {redacted(settings.broker_url)}", highlight=False)
    else:
        redis_proc = _start_redis(settings, detach)
        state.redis_pid = redis_proc.pid
        out.print(f"started redis-server at {redacted(settings.broker_url)}", highlight=False)
    node = os.uname().nodename
    procs = []
    for index in range(1, workers + 1):
        name = f"w{index}@{node}"
        argv = _cli("worker", "--concurrency", str(concurrency), "--hostname", name)
        procs.append(_spawn(argv, settings, f"worker-{index}", detach))
        state.worker_names.append(name)
    state.worker_pids = [proc.pid for proc in procs]
    beat = _spawn(_cli("beat"), settings, "beat", detach)
    state.beat_pid = beat.pid
    if detach:
        state_file(settings).parent.mkdir(parents=True, exist_ok=True)
        state_file(settings).write_text(state.model_dump_json())
    everyone = [*procs, beat]
    try:
        with out.status(f"waiting for {workers} worker(s)"):
            _wait_ready(settings, state.worker_names, procs)
    except BaseException:
        _stop([proc.pid for proc in everyone], signal.SIGTERM, 30)
        if redis_proc is not None:
            _stop([redis_proc.pid], signal.SIGTERM, 30)
        state_file(settings).unlink(missing_ok=True)
        raise
    out.print(
        f"pool up: {workers} worker(s) x {concurrency} slots, beat; sessions in "
        f"{settings.sessions_root}",
        highlight=False,
    )
    if detach:
        out.print(f"logs in {run_dir(settings) / 'logs'}; stop with `claudebox-pool down`")
        return
    try:
        for proc in everyone:
            proc.wait()
    except KeyboardInterrupt:
        out.print("stopping: running tasks finish first (Ctrl-C again to stop at once)")
        for proc in everyone:
            proc.wait()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(30)


def down(out: Console) -> None:
    settings = get_settings()
    path = state_file(settings)
    if not path.exists():
        raise InvalidRequestError(f"no local pool is recorded in {path}; nothing to stop")
    state = _read_state(settings)
    pool = [*state.worker_pids, *([state.beat_pid] if state.beat_pid else [])]
    _stop(pool, signal.SIGTERM, STOP_TIMEOUT_S)
    if state.redis_pid:
        _stop([state.redis_pid], signal.SIGTERM, 30)
    path.unlink()
    out.print("pool stopped")


def _read_state(settings: Settings) -> PoolState:
    return PoolState.model_validate_json(state_file(settings).read_text())


def _alive(state: PoolState) -> bool:
    return any(_exists(pid) for pid in state.worker_pids)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(pids: list[int], sig: signal.Signals, timeout_s: float) -> None:
    """Signal each leader (Celery's warm shutdown then stops its own pool), wait for them to
    go, and kill whatever is left of their process groups at the deadline."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    while any(_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
