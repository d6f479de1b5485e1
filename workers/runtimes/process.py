"""Running a host process to completion: both pipes read as they fill, one deadline, kill all.

Used by the runtimes that start a host process per command (bwrap, local).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from claudebox_pool.workers.runtimes.base import ExecResult, LineSink

OUTPUT_LIMIT_BYTES = 4_000_000


class OutputTail:
    """Keeps the last ``limit`` bytes of a stream's lines."""

    def __init__(self, limit: int) -> None:
        self.lines: deque[str] = deque()
        self.size = 0
        self.limit = limit

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.size += len(line)
        while self.size > self.limit and len(self.lines) > 1:
            self.size -= len(self.lines.popleft())

    def text(self) -> str:
        return "".join(self.lines)


def _pump(stream: IO[bytes], name: str, into: OutputTail, on_line: LineSink | None) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        into.add(line)
        if on_line is not None:
            on_line(name, line.rstrip("\n"))
    stream.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


WATCH_PERIOD_S = 0.05


def _watchdog(
    proc: subprocess.Popen[bytes],
    deadline: float,
    cancel: threading.Event | None,
    finished: threading.Event,
    stopped: list[str],
) -> None:
    """Kill the command's process group at the deadline or on cancel, unless it ended."""
    while not finished.wait(WATCH_PERIOD_S):
        if cancel is not None and cancel.is_set():
            stopped.append("cancel")
        elif time.monotonic() >= deadline:
            stopped.append("timeout")
        else:
            continue
        _kill_group(proc)
        return


def run_process(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    timeout_s: float,
    on_line: LineSink | None = None,
    cancel: threading.Event | None = None,
    output_limit: int = OUTPUT_LIMIT_BYTES,
    preexec: Callable[[], None] | None = None,
) -> ExecResult:
    """``preexec``: run in the child before exec (a sandbox's setup and privilege drop)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=preexec,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = OutputTail(output_limit), OutputTail(output_limit)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, "stdout", out, on_line), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "stderr", err, on_line), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    stopped: list[str] = []
    finished = threading.Event()
    threading.Thread(
        target=_watchdog,
        args=(proc, started + timeout_s, cancel, finished, stopped),
        daemon=True,
    ).start()
    try:
        # Blocking in waitpid returns the moment the command ends; the watchdog alone polls.
        proc.wait()
    finally:
        finished.set()
        # Children that outlive the main process keep the pipes open; do not wait for them.
        # Killed on the way out too (a task interrupted by SystemExit), or they run on.
        _kill_group(proc)
    for pump in pumps:
        pump.join(timeout=5)
    stderr = err.text()
    return ExecResult(
        exit_code=proc.returncode,
        stdout=out.text(),
        stderr=stderr,
        duration_s=time.monotonic() - started,
        timed_out="timeout" in stopped,
        cancelled="cancel" in stopped,
    )
