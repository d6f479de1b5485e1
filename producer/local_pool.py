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
prefixed with its process's name; with ``--detach`` it goes to ``<home>/run/logs/<name>.log``.
Either way the processes are recorded in ``<home>/run/pool.json`` for ``claudebox-pool down``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, NoReturn
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel
from rich.console import Console
from rich.text import Text

from claudebox_pool.producer.flowerconfig import basic_auth_problem
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.connections import redacted, sync_redis
from claudebox_pool.tasks.errors import InvalidRequestError, PoolUnavailableError
from claudebox_pool.tasks.files import private_dir
from claudebox_pool.tasks.settings import Settings, get_settings

READY_TIMEOUT_S = 90
DOWN_TIMEOUT_S = 120
"""How long `down` lets running tasks finish before it stops them (they are requeued)."""
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red")

Step = tuple[signal.Signals, float | None]
"""A signal, and how long to wait for the processes to go after it (None: as long as it takes)."""
WARM: Step = (signal.SIGTERM, None)
"""Celery's warm shutdown: running tasks finish; Redis: save and exit."""
COLD: Step = (signal.SIGQUIT, 20)
"""Celery's cold shutdown: running tasks are stopped, and requeued as they are acked late."""
SOON: Step = (signal.SIGTERM, 30)

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

    members: dict[str, int] = {}
    """Process name (``worker-1``, ``beat``, ``flower``) -> pid of each Celery process."""
    redis_pid: int | None = None
    worker_names: list[str] = []


@dataclass
class Member:
    """One process of the pool; ``proc`` is set in the process that started it."""

    name: str
    pid: int
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _is_zombie(self.pid)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """Kill whatever is left of its process group (pool children that outlived it)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    """Exited but not reaped, as under an init that reaps nothing (some containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def run_dir(settings: Settings) -> Path:
    """The pool's pid files, logs and Redis: 0700, like CLAUDEBOX_HOME above it."""
    private_dir(settings.home)
    return private_dir(settings.home / "run")


def state_file(settings: Settings) -> Path:
    return run_dir(settings) / "pool.json"


def logs_dir(settings: Settings) -> Path:
    return run_dir(settings) / "logs"


@dataclass
class Launcher:
    """Starts the pool's processes, each in its own session, with its output where it belongs."""

    settings: Settings
    detach: bool
    out: Console
    exited: threading.Event = field(default_factory=threading.Event)
    pumps: list[threading.Thread] = field(default_factory=list)
    colours: Iterator[str] = field(default_factory=lambda: itertools.cycle(COLOURS))

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, umask: int = -1
    ) -> Member:
        output: IO[bytes] | int = subprocess.PIPE
        if self.detach:
            logs_dir(self.settings).mkdir(parents=True, exist_ok=True)
            output = (logs_dir(self.settings) / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                umask=umask,
            )
        finally:
            if not isinstance(output, int):
                output.close()
        if proc.stdout is not None:
            pump = threading.Thread(
                target=self._pump, args=(name, proc.stdout, next(self.colours)), daemon=True
            )
            pump.start()
            self.pumps.append(pump)
        return Member(name, proc.pid, proc)

    def _pump(self, name: str, stream: IO[bytes], colour: str) -> None:
        prefix = f"{name:<9}| "
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.out.print(Text.assemble((prefix, colour), line), soft_wrap=True)
        # End of output: the process (and every child sharing its stdout) has gone.
        self.exited.set()

    def drain(self) -> None:
        for pump in self.pumps:
            pump.join(5)


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


def _workers_ready(settings: Settings, names: list[str]) -> Callable[[], bool]:
    def ready() -> bool:
        client = sync_redis(settings)
        try:
            # Fresh heartbeats only: a worker of the same name stopped earlier is known too.
            since = time.time() - settings.worker_alive_s
            seen = [client.zscore(keys.workers(), name) for name in names]
            return all(score is not None and score >= since for score in seen)
        finally:
            client.close()

    return ready


def stop(members: list[Member], steps: list[Step]) -> None:
    """Signal what still runs, step by step, then kill what is left of each process group."""
    try:
        for sig, wait_s in steps:
            running = [member for member in members if member.alive()]
            for member in running:
                member.signal(sig)
            deadline = None if wait_s is None else time.monotonic() + wait_s
            while any(member.alive() for member in running):
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    finally:
        for member in members:
            member.kill_group()


def up(
    workers: int,
    concurrency: int,
    detach: bool,
    out: Console,
    *,
    flower_port: int | None = None,
) -> None:
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
    if any(member.alive() for member in _recorded(settings)):
        raise InvalidRequestError(
            "a local pool is already running; stop it with `claudebox-pool down`"
        )
    launcher = Launcher(settings, detach, out)
    state = PoolState()
    started: list[Member] = []
    celery: list[Member] = []
    try:
        if _redis_answers(settings):
            out.print(f"using the Redis at {redacted(settings.broker_url)}", highlight=False)
        else:
            settings = _with_generated_password(settings)
            # umask 077: the append-only file and snapshots hold every queued task.
            started.append(launcher.start("redis", _redis_argv(settings), umask=0o077))
            state.redis_pid = started[0].pid
            _wait_for(lambda: _redis_answers(settings), started, 10)
            out.print(f"started redis-server at {redacted(settings.broker_url)}", highlight=False)
        host = os.uname().nodename
        for index in range(1, workers + 1):
            name = f"w{index}@{host}"
            argv = _cli("worker", "--concurrency", str(concurrency), "--hostname", name)
            celery.append(launcher.start(f"worker-{index}", argv, _child_env(settings)))
            state.worker_names.append(name)
        beat_env = _child_env(settings, WORKER_ONLY_ENV + FLOWER_ONLY_ENV)
        celery.append(launcher.start("beat", _cli("beat"), beat_env))
        if flower_port is not None:
            flower_argv = _cli("flower", "--port", str(flower_port))
            celery.append(
                launcher.start("flower", flower_argv, _child_env(settings, WORKER_ONLY_ENV))
            )
        state.members = {member.name: member.pid for member in celery}
        state_file(settings).parent.mkdir(parents=True, exist_ok=True)
        state_file(settings).write_text(state.model_dump_json())
        with out.status(f"waiting for {workers} worker(s)"):
            _wait_for(_workers_ready(settings, state.worker_names), celery, READY_TIMEOUT_S)
    except BaseException:
        stop(celery, [SOON])
        stop(started, [SOON])
        state_file(settings).unlink(missing_ok=True)
        raise
    out.print(
        f"pool up: {workers} worker(s) x {concurrency} slots, beat"
        + (f", Flower at http://127.0.0.1:{flower_port} (basic auth)" if flower_port else "")
        + f"; sessions in {settings.sessions_root}",
        highlight=False,
    )
    if detach:
        out.print(f"logs in {logs_dir(settings)}; stop with `claudebox-pool down`")
        return
    _run_in_foreground(launcher, celery, started, out)
    state_file(settings).unlink(missing_ok=True)


def _run_in_foreground(
    launcher: Launcher, celery: list[Member], started_redis: list[Member], out: Console
) -> None:
    """Until Ctrl-C (or SIGTERM, or a process of the pool exits), then stop the pool."""
    # SIGINT too: a shell starts background jobs with it ignored, and Python then leaves it so.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _interrupt) for sig in handled}
    try:
        try:
            launcher.exited.wait()
            gone = [member.name for member in [*celery, *started_redis] if not member.alive()]
            shown = ", ".join(gone) or "a process"
            out.print(f"[red]{shown} exited; stopping the pool[/]", highlight=False)
        except KeyboardInterrupt:
            out.print("stopping: running tasks finish first (Ctrl-C again to requeue them now)")
        try:
            stop(celery, [WARM, COLD])
        except KeyboardInterrupt:
            out.print("stopping now: running tasks go back to the queue")
            stop(celery, [COLD])
        stop(started_redis, [SOON])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        launcher.drain()
    out.print("pool stopped")


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def down(out: Console, timeout_s: float = DOWN_TIMEOUT_S) -> None:
    settings = get_settings()
    path = state_file(settings)
    if not path.exists():
        out.print(f"no local pool is recorded in {path}; nothing to stop")
        return
    state = PoolState.model_validate_json(path.read_text())
    celery = [Member(name, pid) for name, pid in state.members.items()]
    stop(celery, [(signal.SIGTERM, timeout_s), COLD])
    if state.redis_pid:
        stop([Member("redis", state.redis_pid)], [SOON])
    # A foreground `up` whose processes this stopped may have removed it already.
    path.unlink(missing_ok=True)
    out.print("pool stopped")


def _recorded(settings: Settings) -> list[Member]:
    try:
        state = PoolState.model_validate_json(state_file(settings).read_text())
    except (OSError, ValueError):
        return []
    return [Member(name, pid) for name, pid in state.members.items()]
