"""A task's lease on a warm sandbox, on the pool child's side, and the runtime that only leases.

:class:`WarmSandbox` sends each command to the sandbox's exec server over the control socket
the keeper handed over, and gives the sandbox back at the end of the task. :class:`KeptRuntime`
stands in a pool child for a runtime whose sandboxes the keeper itself holds (boxlite: one
boxlite runtime per worker, in its main process), so that the child never opens one of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence

from claudebox_pool.tasks.errors import SandboxError
from claudebox_pool.tasks.settings import Settings, get_settings
from claudebox_pool.workers import lock
from claudebox_pool.workers.runtimes import limits
from claudebox_pool.workers.runtimes.base import (
    WORKSPACE,
    ExecResult,
    LineSink,
    Probe,
    Runtime,
    Sandbox,
    SandboxSpec,
)
from claudebox_pool.workers.runtimes.remote import SandboxGoneError, run_remote
from claudebox_pool.workers.warm.client import KeeperClient
from claudebox_pool.workers.warm.keeper import WarmError

log = logging.getLogger(__name__)


class WarmSandbox(Sandbox):
    """The session's warm sandbox for one task: commands go to its exec server.

    ``cold`` makes a cold sandbox to run a command in if the warm one is found gone before the
    command started; without it that is a SandboxError.
    """

    def __init__(
        self,
        spec: SandboxSpec,
        keeper: KeeperClient,
        control: socket.socket,
        *,
        gateway_host: str | None = None,
        cold: Callable[[SandboxSpec], Sandbox] | None = None,
    ) -> None:
        super().__init__(spec)
        self.gateway_host = gateway_host
        self._keeper = keeper
        self._control = control
        self._cold = cold
        self._healthy = True
        # The keeper runs in the worker's main process, the pool children's parent.
        self._confinement = limits.attach(spec, get_settings(), os.getppid(), limits.WARM)

    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        timeout_s: float,
        on_line: LineSink | None = None,
        cancel: threading.Event | None = None,
        *,
        stdin: bytes | None = None,
    ) -> ExecResult:
        if self._healthy:
            self._confinement.mark()
            try:
                result = run_remote(
                    self._control,
                    argv,
                    env,
                    WORKSPACE,
                    timeout_s,
                    on_line,
                    cancel,
                    lease=lock.lease_left,
                    stdin=stdin,
                )
            except SandboxGoneError as exc:
                log.warning("warm sandbox of %s lost: %s", self.spec.session_id, exc)
                self._healthy = False
                self._release()
            else:
                result.limit = self._confinement.breach()
                return result
        if self._cold is None:
            raise SandboxError(
                f"the sandbox of session '{self.spec.session_id}' stopped before the command "
                "started; run the call again"
            )
        return self._cold(self.spec).exec(argv, env, timeout_s, on_line, cancel, stdin=stdin)

    def tmp_bytes(self) -> int:
        return self._confinement.tmp_bytes()

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._control.fileno() == -1:
            return
        self._control.close()
        try:
            self._keeper.release(self.spec.session_id, self._healthy)
        except WarmError as exc:
            log.warning("warm sandbox of %s not released: %s", self.spec.session_id, exc)


class KeptRuntime(Runtime):
    """A pool child's view of a runtime whose sandboxes its worker's keeper holds."""

    def __init__(self, held: type[Runtime], keeper: KeeperClient, settings: Settings) -> None:
        self.name = held.name
        self.gateway_host = held.gateway_host_of(settings)
        self._keeper = KeeperClient(keeper.address, held.start_timeout_of(settings))

    @property
    def start_timeout_s(self) -> float:
        """How long a lease waits for the keeper to start a sandbox."""
        return self._keeper.start_timeout_s

    @classmethod
    def probe(cls) -> Probe:
        return Probe(True, "the worker's keeper holds the sandboxes")

    def open(self, spec: SandboxSpec) -> Sandbox:
        try:
            control = self._keeper.acquire(spec)
        except WarmError as exc:
            raise SandboxError(
                f"{self.name} could not give session '{spec.session_id}' a sandbox: {exc}"
            ) from exc
        return WarmSandbox(spec, self._keeper, control, gateway_host=self.gateway_host)

    def remove(self, session_id: str) -> bool:
        try:
            return self._keeper.drop(session_id, everywhere=True, remove=True)
        except WarmError as exc:
            raise SandboxError(
                f"{self.name} could not remove the sandbox of session '{session_id}': {exc}"
            ) from exc

    def kept(self) -> list[str]:
        try:
            return self._keeper.sessions()
        except WarmError as exc:
            raise SandboxError(f"{self.name} could not list its sandboxes: {exc}") from exc
