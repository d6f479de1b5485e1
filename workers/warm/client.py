"""A pool child's side of its worker's keeper (:mod:`workers.warm.keeper`).

The keeper's address is set in the main process before the pool forks (:func:`set_address`),
so every child knows it; a process without one (warm sandboxes off, the solo pool of a test,
a benchmark) gets None from :func:`current` and starts cold sandboxes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from claudebox_pool.workers.runtimes.base import SandboxSpec
from claudebox_pool.workers.runtimes.exec_server import recv_frame, send_frame
from claudebox_pool.workers.warm.keeper import READY_TIMEOUT_S, WarmError
from claudebox_pool.workers.warm.protocol import Reply, Request, WarmSpec

_address: Path | None = None


def set_address(address: Path | None) -> None:
    global _address
    _address = address


def current() -> KeeperClient | None:
    return KeeperClient(_address) if _address is not None else None


class KeeperClient:
    def __init__(self, address: Path, start_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.address = address
        self.start_timeout_s = start_timeout_s
        """How long an acquire may wait for the keeper to start a sandbox."""

    def acquire(self, spec: SandboxSpec) -> socket.socket:
        """The control socket of the session's warm sandbox (started if need be)."""
        request = Request(op="acquire", session_id=spec.session_id, spec=WarmSpec.of(spec))
        _, fds = self._call(request, self.start_timeout_s + 5)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise WarmError("the keeper answered an acquire without a sandbox")
        return socket.socket(fileno=fds[0])

    def release(self, session_id: str, healthy: bool = True) -> None:
        self._call(Request(op="release", session_id=session_id, healthy=healthy))

    def drop(self, session_id: str, everywhere: bool = False, remove: bool = False) -> bool:
        """Stop the session's warm sandbox here (with ``everywhere``, on any other worker
        holding one too; with ``remove``, remove what a held runtime keeps for it); True if
        this worker had something to stop or remove."""
        request = Request(op="drop", session_id=session_id, everywhere=everywhere, remove=remove)
        return self._call(request)[0].dropped

    def sessions(self) -> list[str]:
        return self._call(Request(op="list"))[0].sessions

    def _call(
        self, request: Request, timeout_s: float = READY_TIMEOUT_S + 5
    ) -> tuple[Reply, list[int]]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout_s)
                conn.connect(str(self.address))
                send_frame(conn, request.model_dump(mode="json", exclude_defaults=True))
                message, fds = recv_frame(conn)
        except (OSError, EOFError, ValueError) as exc:
            raise WarmError(f"the worker's warm-sandbox keeper is unreachable: {exc}") from exc
        if message is None:
            raise WarmError("the worker's warm-sandbox keeper closed the connection")
        reply = Reply.model_validate(message)
        if reply.error is not None:
            for fd in fds:
                os.close(fd)
            raise WarmError(reply.error)
        return reply, fds
