"""No sandbox at all: the agent runs as a plain host process in the workspace. Development only."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from claudebox_pool.workers.runtimes.base import (
    ExecResult,
    LineSink,
    Mount,
    Probe,
    Runtime,
    Sandbox,
    SandboxSpec,
)
from claudebox_pool.workers.runtimes.process import run_process


class LocalSandbox(Sandbox):
    private_network = False

    def __init__(self, spec: SandboxSpec) -> None:
        super().__init__(spec)
        self.workdir = str(spec.workspace)
        self.home = str(spec.home)

    def path_of(self, mount: Mount) -> str:
        return str(mount.host)

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
        return run_process(argv, env, self.workdir, timeout_s, on_line, cancel, stdin=stdin)


class LocalRuntime(Runtime):
    name = "local"

    @classmethod
    def probe(cls) -> Probe:
        return Probe(
            True,
            "local runs the agent unsandboxed on the host as the worker's own user, root "
            "included (development only: no containment)",
        )

    def open(self, spec: SandboxSpec) -> Sandbox:
        return LocalSandbox(spec)
