"""Real processes for the tests: a redis-server on a free port and `celery worker`s."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import redis

from claudebox_pool.tasks import keys, names

REPO = Path(__file__).resolve().parents[2]


def die_with_parent() -> None:
    """In the child before exec: be killed if the test process dies without its teardown
    (a timeout, a Ctrl-C), so that no worker or Redis outlives the run that started it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1


def claudebox_pool(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 120, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run the `claudebox-pool` command as a user would, with this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "claudebox_pool.producer.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    """The condition's first truthy value, polled with a growing delay up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    return value


class RedisServer:
    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 10, "redis-server to answer PING")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Worker:
    """One `celery worker` process of the pool under test."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_dir: Path,
        concurrency: int = 1,
        queues: tuple[str, ...] = (names.QUEUE,),
        loglevel: str = "INFO",
    ) -> None:
        self.loglevel = loglevel
        self.hostname = f"w-{uuid.uuid4().hex[:8]}@test"
        self.env = dict(env)
        self.log_path = log_dir / f"{self.hostname.split('@')[0]}.log"
        self.concurrency = concurrency
        self.queues = queues
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "claudebox_pool.workers.app",
                "worker",
                "--hostname",
                self.hostname,
                "--concurrency",
                str(self.concurrency),
                "--queues",
                ",".join(self.queues),
                "--loglevel",
                self.loglevel,
                "--without-gossip",
                "--without-mingle",
            ],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()

    def wait_ready(self, client: redis.Redis, timeout_s: float = 60) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()[-3000:]}")
            return client.zscore(keys.workers(), self.hostname) is not None

        wait_for(ready, timeout_s, f"worker {self.hostname} to be ready")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self) -> None:
        """Ask for Celery's warm shutdown: running tasks finish, then the worker exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = 30) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        # Pool children that outlived their parent must not keep consuming.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 30) -> None:
        self.terminate()
        self.wait_stopped(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def tcp_ports_of(pid: int) -> set[int]:
    """Local TCP ports of the sockets held by ``pid`` and its descendants (their connections to
    Redis, among others)."""
    inodes: set[str] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        fd_dir = Path(f"/proc/{current}/fd")
        try:
            links = [os.readlink(fd_dir / name) for name in os.listdir(fd_dir)]
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
        inodes.update(link[8:-1] for link in links if link.startswith("socket:["))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def redis_forgot(client: redis.Redis, ports: set[int]) -> bool:
    """Whether Redis holds no connection from any of ``ports`` (a killed process's are only
    dropped once Redis notices them closed; until then it may still hand them a message)."""
    listed = client.client_list()
    return not any(int(str(each["addr"]).rsplit(":", 1)[1]) in ports for each in listed)
