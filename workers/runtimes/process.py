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
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from claudebox_pool.workers.runtimes.base import ExecResult, LineSink
from claudebox_pool.workers.runtimes.exec_server import feed_stdin
from claudebox_pool.workers.runtimes.output import READ_BYTES, OutputLimits, StreamReader


def _pump(pipe: IO[bytes], reader: StreamReader, on_line: LineSink | None) -> None:
    # os.read in chunks, not readline: readline holds a whole line however long it grows.
    while chunk := os.read(pipe.fileno(), READ_BYTES):
        _deliver(reader, reader.feed(chunk), on_line)
    _deliver(reader, reader.end(), on_line)
    pipe.close()


def _deliver(reader: StreamReader, lines: list[str], on_line: LineSink | None) -> None:
    if on_line is not None:
        for line in lines:
            on_line(reader.name, line.rstrip("\n"))


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    tick: Callable[[], None] | None,
) -> None:
    """Kill the command's process group at the deadline or on cancel, unless it ended; call
    ``tick`` every period meanwhile."""
    while not finished.wait(WATCH_PERIOD_S):
        if tick is not None:
            tick()
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
    limits: OutputLimits | None = None,
    *,
    preexec: Callable[[], None] | None = None,
    pass_fds: Sequence[int] = (),
    tick: Callable[[], None] | None = None,
    stdin: bytes | None = None,
) -> ExecResult:
    """``preexec`` runs in the child before exec (a sandbox's setup: its cgroup, rlimits, binds,
    then the privilege drop); ``pass_fds`` are inherited by the command (bwrap's ``--seccomp``
    program, a cold sandbox's lease pipe); ``tick`` is called every watch period while the
    command runs (a lease's renewals passed on); ``stdin`` is written to the command's standard
    input from a thread of its own, so that a command printing before it reads cannot stall."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=preexec,
        pass_fds=tuple(pass_fds),
    )
    assert proc.stdout is not None and proc.stderr is not None
    bounds = limits or OutputLimits.of()
    out, err = StreamReader("stdout", bounds), StreamReader("stderr", bounds)
    pumps = [
        threading.Thread(target=_pump, args=(pipe, reader, on_line), daemon=True)
        for pipe, reader in ((proc.stdout, out), (proc.stderr, err))
    ]
    if stdin is not None:
        assert proc.stdin is not None
        pumps.append(threading.Thread(target=feed_stdin, args=(proc.stdin, stdin), daemon=True))
    for pump in pumps:
        pump.start()
    stopped: list[str] = []
    finished = threading.Event()
    threading.Thread(
        target=_watchdog,
        args=(proc, started + timeout_s, cancel, finished, stopped, tick),
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
    return ExecResult(
        exit_code=proc.returncode,
        stdout=out.tail.text(),
        stderr=err.tail.text(),
        duration_s=time.monotonic() - started,
        timed_out="timeout" in stopped,
        cancelled="cancel" in stopped,
    )
