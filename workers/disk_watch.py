"""A running task's disk use, measured while it runs: the session's quota and the pool's limits.

The guard (:mod:`workers.disk`) refuses a task that would start on a full disk; this stops one
that fills it. A thread measures what the session holds (its directory, the sandbox's /tmp,
its model gateway lease) every ``CLAUDEBOX_DISK_WATCH_S`` and once more when the command ends,
and stops the command when the session is past its quota (``CLAUDEBOX_SESSION_DISK_BYTES``,
else its ``disk_size_gb``), or when its growth breaks the pool's free-space floor or size
limit. Only a session that grew during the run is stopped: one already over its quota may
still run the commands that bring it back under. The kernel enforces a part of it on its own:
RLIMIT_FSIZE (:mod:`workers.runtimes.limits`) stops a single file at the quota.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from claudebox_pool.tasks.errors import DiskFullError
from claudebox_pool.tasks.lifecycle import megabytes
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers import disk
from claudebox_pool.workers.runtimes.base import GatewayMount, Sandbox, SandboxSpec
from claudebox_pool.workers.runtimes.limits import quota_bytes
from claudebox_pool.workers.store import SessionStore

CANCEL_POLL_S = 0.05
"""How soon the caller's cancel reaches the command through the watch."""
WATCH_CPU_SHARE = 0.1
"""Most of a core the periodic measuring may take, whatever the session's size."""


class DiskWatch:
    """Watches one run; hand :attr:`stop` to the sandbox as its cancel event."""

    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        spec: SandboxSpec,
        cancel: threading.Event | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.session_id = spec.session_id
        self.quota = quota_bytes(spec, settings)
        self.stop = threading.Event()
        """Set when the caller cancels or the session breaks a disk limit."""
        self.breach: DiskFullError | None = None
        self._cancel = cancel
        self._dirs = [
            store.paths(spec.session_id).root,
            *(m.host for m in spec.mounts if isinstance(m, GatewayMount) and m.port is None),
        ]
        self._sandbox: Sandbox | None = None
        self._start = 0
        self._others = 0
        self._done = threading.Event()

    @contextmanager
    def watching(self, sandbox: Sandbox) -> Iterator[DiskWatch]:
        self._sandbox = sandbox
        self._start = self._used()
        thread = threading.Thread(target=self._run, name="disk-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._done.set()
            thread.join()
            if self.breach is None:
                self._check()

    def _run(self) -> None:
        if self.settings.max_sessions_bytes is not None:
            # The other sessions, measured once: the limit then costs one walk per run.
            total = disk.usage(self.settings, self.store).total_bytes
            self._others = max(total - self._start, 0)
        period = self.settings.disk_watch_s
        due = time.monotonic() + period
        while not self._done.wait(CANCEL_POLL_S):
            if self._cancel is not None and self._cancel.is_set():
                self.stop.set()
            began = time.monotonic()
            if began < due:
                continue
            if self._check():
                return
            # A session of many files is walked less often: the watch keeps to a share of a core.
            took = time.monotonic() - began
            due = time.monotonic() + max(period, took / WATCH_CPU_SHARE)

    def _used(self) -> int:
        seen: set[tuple[int, int]] = set()
        used = sum(disk.tree_size(path, seen)[0] for path in self._dirs)
        return used + (self._sandbox.tmp_bytes() if self._sandbox is not None else 0)

    def _check(self) -> bool:
        """Measure once; True (and the command stopped) if the session broke a limit."""
        used = self._used()
        if used <= self._start:
            return False
        settings, doing = self.settings, f"session '{self.session_id}' was stopped"
        problem = None
        if used > self.quota:
            problem = (
                f"{doing}: it holds {megabytes(used)} (workspace, agent home, /tmp and model "
                f"lease), over its quota of {megabytes(self.quota)} "
                "(CLAUDEBOX_SESSION_DISK_BYTES, else the session's disk_size_gb)"
            )
        elif settings.min_free_bytes and (
            disk.free_bytes(self.store.root) < settings.min_free_bytes
        ):
            problem = (
                f"{doing}: the disk holding {self.store.root} fell below the floor of "
                f"{megabytes(settings.min_free_bytes)} free (CLAUDEBOX_MIN_FREE_BYTES)"
            )
        elif (
            settings.max_sessions_bytes is not None
            and self._others + used > settings.max_sessions_bytes
        ):
            problem = (
                f"{doing}: the sessions in {self.store.root} grew past the limit of "
                f"{megabytes(settings.max_sessions_bytes)} (CLAUDEBOX_MAX_SESSIONS_BYTES)"
            )
        if problem is None:
            return False
        self.breach = DiskFullError(problem, {self.session_id: used})
        self.stop.set()
        return True
