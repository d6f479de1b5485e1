"""The exec server inside a warm sandbox, and the framing every warm-sandbox socket speaks.

A warm sandbox is one long-lived sandbox whose first process is this module, run by the host's
own interpreter (``python3 -I -S -c <this source> <fd>``, so it needs nothing but the standard
library and nothing of the worker's environment). It owns the inherited unix socket ``fd`` and
runs one command per request on it, one at a time:

- request: ``{"argv", "env", "cwd"}`` with two file descriptors attached (the write ends of the
  caller's stdout and stderr pipes), so output goes straight from the command to the worker
  with no copy in between; reply ``{"exit": code}`` when the command has ended. An optional
  ``"stdin"`` (base64) is written to the command's standard input, which is then closed.
- during a run, ``{"op": "kill"}`` (a deadline or a cancel) or the socket's end kills it.
- a request may carry ``lease_s``: the seconds left of its holder's session lock. Unless a
  ``{"op": "renew", "lease_s"}`` frame extends it in time, the command is killed when the lease
  runs out, by this server alone: a holder frozen whole (SIGSTOP) or cut off from Redis cannot
  keep a command running into the next holder's run, whose lock it no longer has.

A cold sandbox's command runs under this module too when its holder has a lease
(``python3 -I -S -c <this source> --lease <fd> <lease_s> -- argv...``, see :func:`run_leased`):
``fd`` is the read end of a pipe whose write end only the worker holds, one line of seconds per
renewal, so that a cold command of a frozen worker on another host stops at its lease as well.

After every command everything else in the sandbox is killed too (the sandbox has its own pid
namespace: every pid but 1, bwrap's reaper, and this server), so that no process a task left
behind lives into the next task, as none would in a cold sandbox. A frame is a 4-byte length
and that many bytes of JSON; descriptors ride on the frame's first byte.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

HEADER = struct.Struct("!I")
MAX_FDS = 2
MAX_FRAME_BYTES = 64 << 20
KILL_PASSES = 5
KILL_WAIT_S = 5.0
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
EXIT_LEASE_EXPIRED = 128 + signal.SIGKILL


def send_frame(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    body = json.dumps(message).encode()
    data = HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next frame and the descriptors that came with it; (None, []) at the socket's end."""
    head, fds, _, _ = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    if not head:
        return None, fds
    head += _recv_exact(sock, HEADER.size - len(head))
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes is over the limit")
    message: dict[str, Any] = json.loads(_recv_exact(sock, size))
    return message, fds


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the socket ended in the middle of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def kill_the_rest() -> None:
    """SIGKILL every process of the sandbox but its reaper (pid 1) and this server, and wait
    until each is dead: a run's outcome is reported only once nothing it started lives on."""
    keep = {1, os.getpid()}
    for _ in range(KILL_PASSES):
        dying = [pidfd for name in os.listdir("/proc") if (pidfd := _killed(name, keep))]
        if not dying:
            return
        for pidfd in dying:
            # A pidfd reads ready once its process has ended (a zombie for the reaper).
            select.select([pidfd], [], [], KILL_WAIT_S)
            os.close(pidfd)


def _killed(name: str, keep: set[int]) -> int | None:
    """A pidfd of process ``name``, sent SIGKILL; None for what is not a live process of the
    sandbox to kill (kept, gone, or already a zombie)."""
    if not name.isdigit() or int(name) in keep:
        return None
    try:
        with open(f"/proc/{name}/stat", "rb") as stat:
            if stat.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return None
        pidfd = os.pidfd_open(int(name))
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        os.close(pidfd)
        return None
    return pidfd


def _start(request: dict[str, Any], fds: list[int]) -> subprocess.Popen[bytes] | int:
    """The started command, or the exit code of a command that could not start."""
    stdout, stderr = fds
    stdin = request.get("stdin")
    try:
        proc = subprocess.Popen(
            request["argv"],
            env=request["env"],
            cwd=request["cwd"],
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        if stdin is not None:
            # From a thread: a command that prints before it reads must not stall this server.
            data = base64.b64decode(stdin)
            threading.Thread(target=feed_stdin, args=(proc.stdin, data), daemon=True).start()
        return proc
    except OSError as exc:
        os.write(stderr, f"{request['argv'][0]}: {exc.strerror or exc}\n".encode())
        return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
    finally:
        for fd in fds:
            os.close(fd)


def feed_stdin(pipe: Any, data: bytes) -> None:
    """Write ``data`` to a command's stdin and close it; a command that stops reading early
    is no error here (its exit status says what happened)."""
    # The server runs with SIGPIPE's default action: blocked in this thread alone, a write to a
    # command gone is EPIPE here, and the signal dies pending with the thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    with contextlib.suppress(OSError):
        pipe.write(data)
    with contextlib.suppress(OSError):
        pipe.close()


EXITED, LEASE_OUT, GO_ON, STOP, DEAF = "exited", "lease out", "go on", "stop", "deaf"


def watch(pid: int, channel: int, lease_s: float | None, hear: Callable[[], float | str]) -> str:
    """Wait until the command ``pid`` ends (EXITED) or its lease does, unrenewed (LEASE_OUT:
    everything in the sandbox is killed then); ``hear`` reads ``channel`` when it has news: the
    seconds of a renewed lease, GO_ON, STOP (the run is over: returned) or DEAF (nothing more
    will come on it)."""
    pidfd = os.pidfd_open(pid)
    watched = [pidfd, channel]
    expires = None if lease_s is None else time.monotonic() + float(lease_s)
    try:
        while True:
            wait_s = None if expires is None else max(expires - time.monotonic(), 0.0)
            ready, _, _ = select.select(watched, [], [], wait_s)
            if pidfd in ready:
                return EXITED
            if not ready:
                # The lease ran out unrenewed: its holder is frozen or cut off, and another
                # worker may soon hold the session. Nothing of this run may outlive the lease.
                kill_the_rest()
                return LEASE_OUT
            news = hear()
            if isinstance(news, float):
                expires = time.monotonic() + news
            elif news == STOP:
                return STOP
            elif news == DEAF:
                watched.remove(channel)
    finally:
        os.close(pidfd)


def run(sock: socket.socket, request: dict[str, Any], fds: list[int]) -> int | None:
    """Run one command to its end; its exit code, or None if the socket ended meanwhile."""
    started = _start(request, fds)
    if isinstance(started, int):
        return started
    lease_s = request.get("lease_s")

    def hear() -> float | str:
        message, extra = recv_frame(sock)
        for fd in extra:
            os.close(fd)
        if message is not None and message.get("op") == "renew":
            return float(message["lease_s"])
        kill_the_rest()
        return GO_ON if message is not None else STOP

    try:
        ended = watch(started.pid, sock.fileno(), lease_s, hear)
        started.wait()
    finally:
        kill_the_rest()
    return {EXITED: started.returncode, LEASE_OUT: EXIT_LEASE_EXPIRED}.get(ended)


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_leased(channel: int, lease_s: float, argv: list[str]) -> int:
    """Run a cold sandbox's command (stdio, environment and cwd inherited) to its end; its exit
    code, or the command is killed with everything else in the sandbox once ``lease_s`` pass
    with no renewal read from ``channel``."""
    try:
        proc = subprocess.Popen(argv)
    except OSError as exc:
        os.write(2, f"{argv[0]}: {exc.strerror or exc}\n".encode())
        return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
    for number in FORWARDED:
        signal.signal(number, lambda number, _frame: proc.send_signal(number))

    def hear() -> float | str:
        heard = os.read(channel, 4096).split()
        # At the pipe's end the worker is gone: no renewal can come any more.
        return float(heard[-1]) if heard else DEAF

    ended = watch(proc.pid, channel, lease_s, hear)
    proc.wait()
    return EXIT_LEASE_EXPIRED if ended == LEASE_OUT else proc.returncode


def _exit_as(code: int) -> None:
    """End this process as the command ended: by the same signal (so bwrap reports it as it
    would the command's own), else with its exit code."""
    if code < 0:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        code = 128 - code
    sys.exit(code)


Runner = Callable[[socket.socket, "dict[str, Any]", "list[int]"], "int | None"]
"""Runs one request to its end: its exit code, or None if the socket ended meanwhile."""


def serve_requests(sock: socket.socket, runner: Runner) -> None:
    """Answer the requests on ``sock`` one at a time with ``runner`` until the socket ends."""
    while True:
        try:
            request, fds = recv_frame(sock)
        except (OSError, EOFError, ValueError):
            return
        if request is None:
            return
        if len(fds) != MAX_FDS:
            for fd in fds:
                os.close(fd)
            send_frame(sock, {"error": f"a request needs {MAX_FDS} descriptors"})
            continue
        code = runner(sock, request, fds)
        if code is None:
            return
        try:
            send_frame(sock, {"exit": code})
        except OSError:
            return


def serve(sock: socket.socket) -> None:
    send_frame(sock, {"ready": os.getpid()})
    serve_requests(sock, run)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if sys.argv[1] == "--lease":
        _exit_as(run_leased(int(sys.argv[2]), float(sys.argv[3]), sys.argv[5:]))
    serve(socket.socket(fileno=int(sys.argv[1])))
