"""Running one command through a warm sandbox's exec server, from the calling thread alone.

The caller makes the two output pipes and hands their write ends to the server with the
request (:mod:`workers.runtimes.exec_server`); then one ``select`` loop on this thread reads
both pipes and the control socket, enforces the deadline and watches the cancel event. No
thread is started per command, where a cold run needs three (two pipe readers, a watchdog).
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from claudebox_pool.workers.runtimes.base import ExecResult, LineSink
from claudebox_pool.workers.runtimes.exec_server import recv_frame, send_frame
from claudebox_pool.workers.runtimes.output import READ_BYTES, OutputLimits, StreamReader

CANCEL_POLL_S = 0.05
"""How often a run looks at its cancel event (a threading.Event cannot be selected on)."""
RENEWED_BY_S = 0.05
"""A lease that moved less than this was not renewed (the clock moved, not the lease)."""
DRAIN_S = 5.0
"""How long output may still be read after the command ended (killed stragglers closing)."""


class SandboxGoneError(Exception):
    """The warm sandbox's exec server is gone and the command was never started (internal: the
    runtime drops that sandbox and runs the command in a cold one)."""


class _Stream:
    def __init__(self, name: str, fd: int, limits: OutputLimits) -> None:
        self.fd = fd
        self.reader = StreamReader(name, limits)

    def read(self, on_line: LineSink | None) -> bool:
        """Take what the pipe holds; False at its end."""
        chunk = os.read(self.fd, READ_BYTES)
        lines = self.reader.feed(chunk) if chunk else self.reader.end()
        if on_line is not None:
            for line in lines:
                on_line(self.reader.name, line.rstrip("\n"))
        return bool(chunk)


def run_remote(
    control: socket.socket,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    timeout_s: float,
    on_line: LineSink | None = None,
    cancel: threading.Event | None = None,
    limits: OutputLimits | None = None,
    lease: Callable[[], float | None] | None = None,
    stdin: bytes | None = None,
) -> ExecResult:
    """Run ``argv`` in the sandbox behind ``control``; SandboxGoneError if it is not there.

    With ``lease`` (the seconds its caller may still run it, as ``workers.lock.lease_left``),
    the sandbox kills the command by itself unless it hears of each renewal in time. ``stdin``
    rides in the request, for the server to write to the command's standard input.
    """
    started = time.monotonic()
    pipes = [os.pipe(), os.pipe()]
    streams = [
        _Stream(name, read_end, limits or OutputLimits.of())
        for name, (read_end, _) in zip(("stdout", "stderr"), pipes, strict=True)
    ]
    try:
        ends = [write_end for _, write_end in pipes]
        try:
            request: dict[str, Any] = {"argv": list(argv), "env": dict(env), "cwd": cwd}
            if stdin is not None:
                request["stdin"] = base64.b64encode(stdin).decode()
            left = lease() if lease is not None else None
            if left is not None:
                request["lease_s"] = left
            send_frame(control, request, ends)
        except OSError as exc:
            raise SandboxGoneError(f"the warm sandbox is gone: {exc}") from exc
        finally:
            for fd in ends:
                os.close(fd)
        renewal = None
        if lease is not None and left is not None:
            renewal = Renewal(_renew_frame(control), lease, left)
        return _follow(control, streams, started, timeout_s, on_line, cancel, renewal)
    finally:
        for stream in streams:
            os.close(stream.fd)


def _follow(
    control: socket.socket,
    streams: list[_Stream],
    started: float,
    timeout_s: float,
    on_line: LineSink | None,
    cancel: threading.Event | None,
    renewal: Renewal | None,
) -> ExecResult:
    open_streams = {stream.fd: stream for stream in streams}
    deadline = started + timeout_s
    exit_code: int | None = None
    stopped: str | None = None
    drain_until: float | None = None
    while open_streams or exit_code is None:
        now = time.monotonic()
        if exit_code is None and stopped is None:
            if cancel is not None and cancel.is_set():
                stopped = "cancel"
            elif now >= deadline:
                stopped = "timeout"
            if stopped is not None:
                _ask_to_kill(control)
        if drain_until is not None and now >= drain_until:
            break
        if renewal is not None and exit_code is None and stopped is None:
            renewal.send_if_renewed()
        watched = list(open_streams) + ([control.fileno()] if exit_code is None else [])
        polled = cancel is not None or renewal is not None
        wait_s = CANCEL_POLL_S if polled else max(deadline - now, 0.0) + 0.01
        ready, _, _ = select.select(watched, [], [], wait_s)
        for fd in ready:
            if fd == control.fileno():
                exit_code = _exit_code(control)
                drain_until = time.monotonic() + DRAIN_S
            elif not open_streams[fd].read(on_line):
                del open_streams[fd]
    stdout, stderr = (stream.reader.tail.text() for stream in streams)
    return ExecResult(
        exit_code=-signal.SIGKILL if exit_code is None else exit_code,
        stdout=stdout,
        stderr=stderr,
        duration_s=time.monotonic() - started,
        timed_out=stopped == "timeout",
        cancelled=stopped == "cancel",
    )


class Renewal:
    """Passes each renewal of its caller's lease on to the sandbox (``send``: the seconds left),
    as the run loop comes by: a warm sandbox's socket or a cold sandbox's lease pipe."""

    def __init__(
        self, send: Callable[[float], None], lease: Callable[[], float | None], left: float
    ):
        self._send, self._lease = send, lease
        self._until = time.monotonic() + left

    def send_if_renewed(self) -> None:
        left = self._lease()
        if left is None:
            return
        until = time.monotonic() + left
        if until > self._until + RENEWED_BY_S:
            self._until = until
            # A sandbox that is gone took the command with it.
            with contextlib.suppress(OSError):
                self._send(left)


def _renew_frame(control: socket.socket) -> Callable[[float], None]:
    return lambda left: send_frame(control, {"op": "renew", "lease_s": left})


def _ask_to_kill(control: socket.socket) -> None:
    # A server that is gone took the command with it.
    with contextlib.suppress(OSError):
        send_frame(control, {"op": "kill"})


def _exit_code(control: socket.socket) -> int:
    try:
        reply, fds = recv_frame(control)
    except (OSError, EOFError, ValueError):
        reply, fds = None, []
    for fd in fds:
        os.close(fd)
    if reply is None or "exit" not in reply:
        # The server died mid-run (the sandbox was dropped): the command died with it.
        return -signal.SIGKILL
    return int(reply["exit"])
