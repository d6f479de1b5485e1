"""The exec server's protocol served by the keeper itself, for a sandbox it holds open.

For a runtime whose sandboxes run no exec server of ours (a boxlite VM: a unix socket cannot
cross into it), the keeper keeps the runtime's :class:`Sandbox` open between tasks and serves
the protocol of :mod:`workers.runtimes.exec_server` on its end of the control socket, one
thread per sandbox: each request runs through ``Sandbox.exec``, whose lines are written to the
pipes the pool child sent, and a kill, the socket's end or the run's lease running out
unrenewed sets the run's cancel event. The
pool child cannot tell the two servers apart.
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import socket
import threading
import time
from typing import Any

from claudebox_pool.workers.runtimes.base import Sandbox
from claudebox_pool.workers.runtimes.exec_server import recv_frame, serve_requests

DEFAULT_TIMEOUT_S = 24 * 3600.0
"""A run's deadline here when the request names none: the pool child enforces its own."""


def serve_sandbox(sock: socket.socket, sandbox: Sandbox) -> None:
    """Serve requests on ``sock`` until it ends."""
    serve_requests(sock, lambda sock, request, fds: _run(sock, sandbox, request, fds))


def _run(
    sock: socket.socket, sandbox: Sandbox, request: dict[str, Any], fds: list[int]
) -> int | None:
    """Run one request while watching the socket for a kill; its exit code, or None if the
    socket ended meanwhile."""
    cancel = threading.Event()
    ended = threading.Event()
    wake_read, wake_write = os.pipe()
    lease_s = request.get("lease_s")
    expires = None if lease_s is None else time.monotonic() + float(lease_s)
    watcher = threading.Thread(
        target=_watch,
        args=(sock, wake_read, cancel, ended, expires),
        name="held-watch",
        daemon=True,
    )
    watcher.start()
    outputs = {"stdout": fds[0], "stderr": fds[1]}

    def write(stream: str, line: str) -> None:
        # A pool child that died reads no more: what it would have read is dropped.
        with contextlib.suppress(OSError):
            os.write(outputs[stream], (line + "\n").encode())

    try:
        result = sandbox.exec(
            request["argv"],
            request["env"],
            float(request.get("timeout_s") or DEFAULT_TIMEOUT_S),
            on_line=write,
            cancel=cancel,
            stdin=None if request.get("stdin") is None else base64.b64decode(request["stdin"]),
        )
    finally:
        for fd in fds:
            os.close(fd)
        os.write(wake_write, b"x")
        watcher.join()
        os.close(wake_read)
        os.close(wake_write)
    return None if ended.is_set() else result.exit_code


def _watch(
    sock: socket.socket,
    wake: int,
    cancel: threading.Event,
    ended: threading.Event,
    expires: float | None,
) -> None:
    """Cancel the run at a kill, at the socket's end, or when its lease runs out unrenewed."""
    while True:
        wait_s = None if expires is None else max(expires - time.monotonic(), 0.0)
        ready, _, _ = select.select([sock.fileno(), wake], [], [], wait_s)
        if wake in ready:
            return
        if not ready:
            cancel.set()
            return
        try:
            message, fds = recv_frame(sock)
        except (OSError, EOFError, ValueError):
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is not None and message.get("op") == "renew":
            expires = time.monotonic() + float(message["lease_s"])
            continue
        if message is None:
            ended.set()
        cancel.set()
        if message is None:
            return
