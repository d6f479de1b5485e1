"""``claudebox-pool up`` / ``down``: a whole pool on one machine, for development and demos.

It uses the Redis of CLAUDEBOX_BROKER_URL if one answers there, else starts the system's
redis-server on that (loopback) address: append-only file on, no eviction, files private to
its user, and the URL's password or else a generated one, kept 0600 in the run directory where
every later command in the same home finds it (``Settings``). Workers, beat and, with
``--flower``, Flower are ``claudebox-pool`` processes; only workers get the model key.

Each process runs in a process group of its own, so that a Ctrl-C in the terminal reaches only
``up``, which then stops the pool in order: the Celery processes first, with Celery's warm
shutdown (running tasks finish, queued ones stay in Redis), and the Redis it started last, once
nothing needs it. A second Ctrl-C turns that into a cold shutdown: running tasks are stopped
and go back to the queue. In the foreground the processes' output is one stream, each line
prefixed with its process's name; with ``--detach`` it goes to ``<home>/run/logs/<name>.log``,
rotated by size (``producer.logfiles``).

``up`` supervises what it started, restarting what crashes (``supervisor``); ``up --detach``
starts that supervisor in a session of its own and returns once the pool is ready. The
supervisor and each process, with its start time, are recorded in ``<home>/run/pool.json`` for
``down``; a record whose supervisor is gone is what a crash left behind, which ``up`` clears.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel
from rich.console import Console

from claudebox_pool.producer.flowerconfig import basic_auth_problem
from claudebox_pool.producer.supervisor import (
    COLD,
    SOON,
    WARM,
    Backoff,
    Child,
    Launcher,
    Member,
    Recorded,
    start_ticks,
    stop,
    supervise,
)
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.connections import redacted, sync_redis
from claudebox_pool.tasks.errors import InvalidRequestError, PoolUnavailableError
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.settings import Settings, get_settings

READY_TIMEOUT_S = 90
DOWN_TIMEOUT_S = 120
"""How long `down` lets running tasks finish before it stops them (they are requeued)."""
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

COLD_AND_REDIS_S = 60
"""How long a supervisor's cold shutdown and its Redis's stop may take together (20 s + 30 s)."""

WORKER_ONLY_ENV = (
    "CLAUDEBOX_ANTHROPIC_API_KEY",
    "CLAUDEBOX_CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
)
"""The model credential: only workers (their gateways) get it, never beat or Flower."""
FLOWER_ONLY_ENV = ("CLAUDEBOX_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH")


class PoolState(BaseModel):
    """What ``up`` started, for ``down`` (and for ``up`` to refuse starting a second pool)."""

    supervisor: Recorded | None = None
    """The ``up`` process that started the pool and restarts what crashes in it."""
    ready: bool = False
    members: dict[str, Recorded] = {}
    """Process name (``worker-1``, ``beat``, ``flower``) -> each Celery process."""
    redis: Recorded | None = None
    worker_names: list[str] = []


def run_dir(settings: Settings) -> Path:
    """The pool's pid files, logs and Redis: 0700, like CLAUDEBOX_HOME above it."""
    private_dir(settings.home)
    return private_dir(settings.home / "run")


def state_file(settings: Settings) -> Path:
    return run_dir(settings) / "pool.json"


def logs_dir(settings: Settings) -> Path:
    return run_dir(settings) / "logs"


def _cli(*arguments: str) -> list[str]:
    # -P: modules in the working directory (a user's `celery.py`) do not shadow installed ones.
    return [sys.executable, "-P", "-m", "claudebox_pool.producer.cli", *arguments]


def _redis_answers(settings: Settings) -> bool:
    client = sync_redis(settings)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _redis_argv(settings: Settings) -> list[str]:
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
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # In a file only its owner reads, not on the command line, which `ps` shows to all.
    config = directory / "auth.conf"
    _write_private(config, f"requirepass {url.password}\n")
    argv = [server, str(config)]  # redis-server takes its config file as the first argument
    argv += ["--bind", url.hostname or "127.0.0.1", "--port", str(url.port or 6379)]
    argv += ["--dir", str(directory), "--appendonly", "yes", "--maxmemory-policy", "noeviction"]
    argv += ["--maxmemory", str(settings.redis_maxmemory_bytes)]
    return argv


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _with_generated_password(settings: Settings) -> Settings:
    """``settings`` for a Redis this command starts: a password is generated unless the broker
    URL has one, and kept 0600 in the run directory beside the Redis's data, where later
    commands (and the next ``up`` on that data) find it."""
    if urlsplit(settings.broker_url).password:
        return settings
    password_file = settings.local_redis_password_file
    password_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(password_file, secrets.token_urlsafe(32))
    # Built again, every field as given, so that the validator adds the password to the URLs.
    return Settings(**settings.model_dump())


def _child_env(settings: Settings, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a process of the pool: this one's, with the pool's Redis URLs (which
    carry a generated password) and without ``drop``."""
    env = {name: value for name, value in os.environ.items() if name not in drop}
    env["CLAUDEBOX_BROKER_URL"] = settings.broker_url
    env["CLAUDEBOX_RESULT_BACKEND"] = settings.result_backend
    return env


def _wait_for(condition: Callable[[], bool], members: list[Member], timeout_s: float) -> None:
    """Poll ``condition`` until true; PoolUnavailableError if a member exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for member in members:
            if not member.alive():
                raise PoolUnavailableError(
                    f"{member.name} exited during start; see its output above (or with "
                    f"--detach, {logs_dir(get_settings()) / member.name}.log)"
                )
        if time.monotonic() > deadline:
            raise PoolUnavailableError(f"the pool was not ready after {timeout_s:.0f}s")
        time.sleep(0.1)


def _workers_ready(settings: Settings, names: list[str], launched: float) -> Callable[[], bool]:
    def ready() -> bool:
        client = sync_redis(settings)
        try:
            # Heartbeats of these processes only: workers of the same names that ran earlier
            # (a pool that crashed a moment ago) are known too.
            since = max(launched, time.time() - settings.worker_alive_s)
            seen = [client.zscore(keys.workers(), name) for name in names]
            return all(score is not None and score >= since for score in seen)
        finally:
            client.close()

    return ready


@dataclass
class Pool:
    """The processes of one ``up``, and their record in ``pool.json``."""

    settings: Settings
    launcher: Launcher
    state: PoolState
    celery: list[Child] = field(default_factory=list)
    redis: Child | None = None

    def members(self, children: list[Child]) -> list[Member]:
        return [child.member for child in children if child.member is not None]

    def record(self) -> None:
        """Write pool.json whole (temporary file, then rename): ``down`` may read it any time."""
        self.state.members = {m.name: m.recorded() for m in self.members(self.celery)}
        redis_member = self.members([self.redis] if self.redis else [])
        self.state.redis = redis_member[0].recorded() if redis_member else None
        path = state_file(self.settings)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        _write_private(temporary, self.state.model_dump_json())
        temporary.replace(path)

    def supervise(self, out: Console) -> None:
        """Restart what crashes, until every Celery process has exited 0 (or a signal comes)."""
        backoff = Backoff(self.settings.up_restart_delay_s, self.settings.up_restart_max_delay_s)
        others = [self.redis] if self.redis else []
        supervise(self.celery, others, self.launcher, backoff, out, self.record)
        out.print("[red]every Celery process of the pool has exited; stopping it[/]")

    def stop(self, out: Console) -> None:
        """Celery's warm shutdown, cold on a second signal; the Redis it started last."""
        celery = self.members(self.celery)
        try:
            stop(celery, [WARM, COLD])
        except KeyboardInterrupt:
            out.print("stopping now: running tasks go back to the queue")
            stop(celery, [COLD])
        stop(self.members([self.redis] if self.redis else []), [SOON])


def up(
    workers: int,
    concurrency: int,
    detach: bool,
    out: Console,
    *,
    flower_port: int | None = None,
) -> None:
    """Start the pool, then supervise it until a signal (Ctrl-C, ``down``) and stop it. With
    ``detach`` (the supervisor that ``start_detached`` starts), output goes to the run directory,
    and this process's own there too once the pool is ready."""
    settings = get_settings()
    if workers < 1 or concurrency < 1:
        raise InvalidRequestError("--workers and --concurrency must be at least 1")
    if flower_port is not None and settings.flower_basic_auth is None:
        raise InvalidRequestError(
            "--flower needs CLAUDEBOX_FLOWER_BASIC_AUTH=user:password: Flower shows every task "
            "of the pool and is never started without a password"
        )
    if flower_port is not None and settings.flower_basic_auth is not None:
        problem = basic_auth_problem(settings.flower_basic_auth.get_secret_value())
        if problem is not None:
            raise InvalidRequestError(problem)
    _clear_stale(settings, out)
    # SIGINT too: a shell starts background jobs with it ignored, and Python then leaves it so.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _interrupt) for sig in handled}
    try:
        pool = _start(
            settings,
            Launcher(
                out,
                logs_dir(settings) if detach else None,
                settings.log_max_bytes,
                settings.log_backups,
                settings.log_format == "json",
            ),
            workers,
            concurrency,
            flower_port,
        )
        out.print(
            f"pool up: {workers} worker(s) x {concurrency} slots, beat"
            + (f", Flower at http://127.0.0.1:{flower_port} (basic auth)" if flower_port else "")
            + f"; sessions in {settings.sessions_root}",
            highlight=False,
        )
        if detach:
            out.print(f"logs in {logs_dir(settings)}; stop with `claudebox-pool down`")
            _detach_output(settings)
        try:
            try:
                pool.supervise(out)
            except KeyboardInterrupt:
                out.print("stopping: running tasks finish first (Ctrl-C again to requeue them now)")
            pool.stop(out)
        finally:
            state_file(settings).unlink(missing_ok=True)
            pool.launcher.drain()
        out.print("pool stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(
    settings: Settings, launcher: Launcher, workers: int, concurrency: int, flower_port: int | None
) -> Pool:
    """Start Redis (unless one answers), the workers, beat and Flower; wait for the workers."""
    me = Recorded(pid=os.getpid(), started=start_ticks(os.getpid()) or 0)
    pool = Pool(settings, launcher, PoolState(supervisor=me))
    out = launcher.out
    try:
        if _redis_answers(settings):
            out.print(f"using the Redis at {redacted(settings.broker_url)}", highlight=False)
        else:
            settings = _with_generated_password(settings)
            # umask 077: the append-only file and snapshots hold every queued task.
            pool.redis = Child("redis", _redis_argv(settings), umask=0o077)
            redis_member = pool.redis.start(launcher)
            _wait_for(lambda: _redis_answers(settings), [redis_member], 10)
            out.print(f"started redis-server at {redacted(settings.broker_url)}", highlight=False)
        launched = time.time()
        host = os.uname().nodename
        for index in range(1, workers + 1):
            name = f"w{index}@{host}"
            argv = _cli("worker", "--concurrency", str(concurrency), "--hostname", name)
            env = _child_env(settings)
            if settings.metrics_port:
                # One port a worker: each serves its own metrics.
                env["CLAUDEBOX_METRICS_PORT"] = str(settings.metrics_port + index - 1)
            pool.celery.append(Child(f"worker-{index}", argv, env))
            pool.state.worker_names.append(name)
        beat_env = _child_env(settings, WORKER_ONLY_ENV + FLOWER_ONLY_ENV)
        pool.celery.append(Child("beat", _cli("beat"), beat_env))
        if flower_port is not None:
            flower_argv = _cli("flower", "--port", str(flower_port))
            pool.celery.append(Child("flower", flower_argv, _child_env(settings, WORKER_ONLY_ENV)))
        for child in pool.celery:
            child.start(launcher)
        pool.record()
        with out.status(f"waiting for {workers} worker(s)"):
            ready = _workers_ready(settings, pool.state.worker_names, launched)
            _wait_for(ready, pool.members(pool.celery), READY_TIMEOUT_S)
        pool.state.ready = True
        pool.record()
    except BaseException:
        stop(pool.members(pool.celery), [SOON])
        stop(pool.members([pool.redis] if pool.redis else []), [SOON])
        state_file(settings).unlink(missing_ok=True)
        raise
    return pool


def _detach_output(settings: Settings) -> None:
    """Send this process's stdout and stderr to its log from now on. The ``up`` that started it
    reads them until they close, so that closing them tells it the pool is up."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(logs_dir(settings) / "up.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, sys.stdout.fileno())
    os.dup2(fd, sys.stderr.fileno())
    os.close(fd)


def start_detached(workers: int, concurrency: int, *, flower_port: int | None = None) -> int:
    """``up --detach``: start the supervising ``up`` in a session of its own (a closed terminal
    does not stop it), show what it prints until the pool is ready, and return its outcome as
    an exit code: 0 once the pool is up, else the supervisor's own."""
    settings = get_settings()  # a refused value is reported here, once, not by both processes
    argv = _cli("up", "--workers", str(workers), "--concurrency", str(concurrency), "--supervise")
    if flower_port is not None:
        argv += ["--flower", "--flower-port", str(flower_port)]
    # Its stderr is this process's: its error line, if it fails to start, reaches the user as is.
    supervisor = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
    )
    assert supervisor.stdout is not None
    try:
        for line in supervisor.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
    except KeyboardInterrupt:
        supervisor.terminate()
        supervisor.wait()
        raise
    state = _read_state(settings)
    ours = state is not None and state.supervisor is not None and state.supervisor.pid
    if state is not None and state.ready and ours == supervisor.pid:
        return 0
    code = supervisor.wait()
    return code if code >= 0 else 128 - code


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def down(out: Console, timeout_s: float = DOWN_TIMEOUT_S) -> None:
    settings = get_settings()
    path = state_file(settings)
    if not path.exists():
        out.print(f"no local pool is recorded in {path}; nothing to stop")
        return
    state = _read_state(settings)
    if state is not None and state.supervisor is not None:
        _stop_supervisor(Member.of("up", state.supervisor), timeout_s)
        state = _read_state(settings)
    if state is not None:
        # What a supervisor killed outright, or one that did not stop in time, left running.
        celery = [Member.of(name, recorded) for name, recorded in state.members.items()]
        stop(celery, [(signal.SIGTERM, timeout_s), COLD])
        if state.redis is not None:
            stop([Member.of("redis", state.redis)], [SOON])
    path.unlink(missing_ok=True)
    out.print("pool stopped")


def _stop_supervisor(supervisor: Member, timeout_s: float) -> None:
    """Its warm shutdown; after ``timeout_s``, a second signal (as a second Ctrl-C) for its cold
    one; SIGKILL if that did not end it either. Its process alone: a foreground ``up`` shares
    its process group with the terminal's job."""
    for wait_s in (timeout_s, COLD_AND_REDIS_S):
        if not supervisor.alive():
            return
        supervisor.signal(signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while supervisor.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    if supervisor.alive():
        supervisor.signal(signal.SIGKILL)


def _read_state(settings: Settings) -> PoolState | None:
    try:
        return PoolState.model_validate_json(state_file(settings).read_text())
    except (OSError, ValueError):
        return None


def _clear_stale(settings: Settings, out: Console) -> None:
    """Refuse if the recorded pool's supervisor runs; else stop what is left of that pool (a
    crash of ``up``, a SIGKILL, a reboot) and forget it."""
    path = state_file(settings)
    if not path.exists():
        return
    state = _read_state(settings) or PoolState()
    if state.supervisor is not None and Member.of("up", state.supervisor).alive():
        raise InvalidRequestError(
            f"a local pool is already running (pid {state.supervisor.pid}); stop it with "
            "`claudebox-pool down`"
        )
    recorded = [Member.of(name, each) for name, each in state.members.items()]
    if state.redis is not None:
        recorded.append(Member.of("redis", state.redis))
    left = [member for member in recorded if member.alive()]
    stop(left, [SOON])
    path.unlink(missing_ok=True)
    names = ", ".join(member.name for member in left)
    out.print(
        "the last pool ended without `claudebox-pool down`; "
        + (f"stopped what was left of it ({names})" if left else "cleared its record"),
        highlight=False,
    )
