"""The processes of a local pool: started each in a session of its own, recorded with their
start time, stopped step by step, and restarted when they crash, like systemd's
``Restart=on-failure`` with a growing ``RestartSec``. A process that exits 0 was stopped on
purpose (Celery's remote shutdown, a ``kill``) and stays stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import BaseModel
from rich.console import Console
from rich.text import Text

from claudebox_pool.producer.logfiles import RotatingLog, copy_lines

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red")
SUPERVISE_POLL_S = 0.2

Step = tuple[signal.Signals, float | None]
"""A signal, and how long to wait for the processes to go after it (None: as long as it takes)."""
WARM: Step = (signal.SIGTERM, None)
"""Celery's warm shutdown: running tasks finish; Redis: save and exit."""
COLD: Step = (signal.SIGQUIT, 20)
"""Celery's cold shutdown: running tasks are stopped, and requeued as they are acked late."""
SOON: Step = (signal.SIGTERM, 30)


class Recorded(BaseModel):
    """A process as ``up`` recorded it. The start time tells it from a later process that the
    system gave the same pid once it had exited."""

    pid: int
    started: int
    """Clock ticks after boot (``/proc/<pid>/stat``, field 22)."""


@dataclass
class Member:
    """One process of the pool; ``proc`` is set in the process that started it."""

    name: str
    pid: int
    started: int | None
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def of(cls, name: str, recorded: Recorded) -> Member:
        return cls(name, recorded.pid, recorded.started)

    def recorded(self) -> Recorded:
        return Recorded(pid=self.pid, started=self.started or 0)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.started is not None and start_ticks(self.pid) == self.started

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """Kill whatever is left of its process group (pool children that outlived it)."""
        if self.proc is None and not self.alive() and Path(f"/proc/{self.pid}").exists():
            return  # the pid is another process's now, and so may its group be
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot); None if no such process runs, or it has
    exited and is not reaped yet (as under an init that reaps nothing, in some containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # After the command name in parentheses: the state is field 3, the start time field 22.
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else int(fields[19])


@dataclass
class Launcher:
    """Starts the pool's processes, each in its own session, with its output where it belongs."""

    out: Console
    logs: Path | None
    """Where each process's output goes, ``<name>.log``; None: to ``out``, line by line."""
    max_bytes: int = 0
    """Size at which a log file is rotated (:mod:`producer.logfiles`); 0: never."""
    backups: int = 1
    json_lines: bool = False
    """Whether log files hold JSON lines only (``CLAUDEBOX_LOG_FORMAT=json``)."""
    pumps: list[threading.Thread] = field(default_factory=list)
    colours: Iterator[str] = field(default_factory=lambda: itertools.cycle(COLOURS))

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, umask: int = -1
    ) -> Member:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            umask=umask,
        )
        assert proc.stdout is not None
        if self.logs is not None:
            self.logs.mkdir(parents=True, exist_ok=True)
            log = RotatingLog(
                self.logs / f"{name}.log", self.max_bytes, self.backups, self.json_lines
            )
            pump = threading.Thread(target=copy_lines, args=(proc.stdout, log), daemon=True)
        else:
            pump = threading.Thread(
                target=self._pump, args=(name, proc.stdout, next(self.colours)), daemon=True
            )
        pump.start()
        self.pumps.append(pump)
        return Member(name, proc.pid, start_ticks(proc.pid), proc)

    def _pump(self, name: str, stream: IO[bytes], colour: str) -> None:
        prefix = f"{name:<9}| "
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.out.print(Text.assemble((prefix, colour), line), soft_wrap=True)

    def drain(self) -> None:
        for pump in self.pumps:
            pump.join(5)


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


@dataclass
class Child:
    """A process ``up`` keeps running: how to start it, and where its restarts stand."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    umask: int = -1
    member: Member | None = None
    crashes: int = 0
    """Crashes in a row, which set the next restart's delay."""
    started_at: float = 0.0
    restart_at: float | None = None
    finished: bool = False
    """Exited 0: stopped on purpose (Celery's remote shutdown, a `kill`), so left stopped."""

    def start(self, launcher: Launcher) -> Member:
        self.member = launcher.start(self.name, self.argv, self.env, self.umask)
        self.started_at = time.monotonic()
        self.restart_at = None
        return self.member


@dataclass
class Backoff:
    """systemd's ``RestartSec`` growing to ``RestartMaxDelaySec``: the delay doubles with each
    crash in a row, and a process that runs ``max_s`` is counted stable again."""

    first_s: float
    max_s: float

    def delay(self, crashes: int) -> float:
        return min(self.first_s * 2.0 ** (crashes - 1), self.max_s)


def supervise(
    celery: list[Child],
    others: list[Child],
    launcher: Launcher,
    backoff: Backoff,
    out: Console,
    on_restart: Callable[[], None],
) -> None:
    """Restart each child that crashes (exits non-zero or by a signal) after ``backoff``, calling
    ``on_restart`` once it runs again; return once every one of ``celery`` has exited 0."""
    while not all(child.finished for child in celery):
        now = time.monotonic()
        for child in [*celery, *others]:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    pid = child.start(launcher).pid
                    on_restart()
                    out.print(f"restarted {child.name} (pid {pid})", highlight=False)
                continue
            if child.finished or child.member is None or child.member.proc is None:
                continue
            code = child.member.proc.poll()
            if code is None:
                if now - child.started_at >= backoff.max_s:
                    child.crashes = 0
                continue
            if code == 0:
                child.finished = True
                out.print(f"{child.name} exited 0; left stopped", highlight=False)
                continue
            # What it started may still run (a worker's pool processes): like systemd's
            # KillMode=control-group, none of it outlives the crash to meet its replacement.
            child.member.kill_group()
            child.crashes += 1
            delay = backoff.delay(child.crashes)
            child.restart_at = now + delay
            how = f"by signal {-code}" if code < 0 else f"with code {code}"
            out.print(
                f"[red]{child.name} exited {how}; restarting it in {delay:.1f}s "
                f"(crash {child.crashes} in a row)[/]",
                highlight=False,
            )
        time.sleep(SUPERVISE_POLL_S)
