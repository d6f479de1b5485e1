"""One sandbox's claim on the gateway: its own socket, its usage and budget, what happened.

The gateway's event loop writes a lease's ledger while the task that owns the lease reads it
from another thread, hence the lock; readers get snapshots.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from claudebox_pool.tasks.allowlist import AllowList
from claudebox_pool.workers.gateway.usage import Tokens, Usage

Event = tuple[str, dict[str, Any]]
"""(action, context), e.g. ("egress_denied", {"host": "example.com", "port": 443})."""


class Ledger:
    """A lease's running usage, its events, and the budget check before each model call."""

    def __init__(
        self, session_id: str, budget_usd: float | None, spent_usd: float, egress: AllowList
    ) -> None:
        self.session_id = session_id
        self.budget_usd = budget_usd
        self.spent_before_usd = spent_usd
        self.egress = egress
        self._usage = Usage()
        self._events: list[Event] = []
        self._lock = threading.Lock()

    @property
    def usage(self) -> Usage:
        with self._lock:
            return self._usage

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def record(self, action: str, context: dict[str, Any]) -> None:
        with self._lock:
            self._events.append((action, context))

    def count_request(self) -> None:
        with self._lock:
            self._usage = self._usage.model_copy(update={"requests": self._usage.requests + 1})

    def charge(self, model: str | None, tokens: Tokens, cost_usd: float) -> None:
        with self._lock:
            self._usage = self._usage.plus(model, tokens, cost_usd)

    def over_budget(self) -> dict[str, Any] | None:
        """The ``budget_exceeded`` context if the session may not call the model again."""
        if self.budget_usd is None:
            return None
        spent = self.spent_before_usd + self.usage.cost_usd
        if spent < self.budget_usd:
            return None
        return {"budget_usd": self.budget_usd, "spent_usd": round(spent, 6)}


class Lease:
    """The gateway as one sandbox sees it; close it when the sandbox is gone.

    Bind :attr:`socket_dir` into the sandbox (read-write, it holds a socket) at
    ``bridge.GUEST_SOCKET_DIR`` and wrap the agent's command with ``bridge.bridged_argv``; or,
    for a lease made with ``tcp_host``, let the sandbox connect to :attr:`tcp_address`.
    """

    def __init__(
        self,
        ledger: Ledger,
        socket_path: Path,
        closer: Callable[[], None],
        tcp_address: tuple[str, int] | None = None,
    ) -> None:
        self._ledger = ledger
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        """``(host, port)`` the lease also listens on, or None (socket only)."""
        self._closer = closer

    @property
    def session_id(self) -> str:
        return self._ledger.session_id

    @property
    def socket_dir(self) -> Path:
        return self.socket_path.parent

    @property
    def usage(self) -> Usage:
        return self._ledger.usage

    @property
    def events(self) -> list[Event]:
        return self._ledger.events

    def give_to(self, uid: int, gid: int) -> None:
        """Let a sandbox running as ``uid`` (not the worker's user) use the socket: its
        directory and the socket become that user's."""
        os.chown(self.socket_dir, uid, gid)
        os.chown(self.socket_path, uid, gid)

    def close(self) -> None:
        """Stop serving the socket (and TCP port), end its open connections and remove the
        socket; idempotent."""
        self._closer()

    def __repr__(self) -> str:
        return f"Lease(session_id={self.session_id!r}, socket_path={str(self.socket_path)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
