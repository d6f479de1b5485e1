"""A Linux namespace sandbox per command, with bubblewrap.

The system is bound read-only piece by piece (``--ro-bind / /`` would make ``/workspace``
impossible to create), the workspace read-write at ``/workspace``, the session's agent home at
``/root``. Every namespace is unshared, network included (loopback only), and the sandbox dies
with the worker. Environment values travel in the process environment, never on bwrap's
command line, where any host user could read them in /proc.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from workers.runtimes.base import (
    AGENT_HOME,
    WORKSPACE,
    ExecResult,
    LineSink,
    Probe,
    Runtime,
    Sandbox,
    SandboxSpec,
)
from workers.runtimes.process import run_process

_SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def system_args() -> list[str]:
    """Read-only system: /usr and /etc bound, the merged-/usr links recreated as on the host."""
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in _SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", str(host.readlink()), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    return args


def bwrap_argv(spec: SandboxSpec, argv: Sequence[str]) -> list[str]:
    args = [
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        *system_args(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",  # noqa: S108  (the sandbox's own private tmpfs, not the host's /tmp)
        "--bind",
        str(spec.workspace),
        WORKSPACE,
        "--bind",
        str(spec.home),
        AGENT_HOME,
    ]
    for mount in spec.mounts:
        args += ["--ro-bind" if mount.read_only else "--bind", str(mount.host), mount.guest]
    return [*args, "--chdir", WORKSPACE, "--", *argv]


class BwrapSandbox(Sandbox):
    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        timeout_s: float,
        on_line: LineSink | None = None,
        cancel: threading.Event | None = None,
    ) -> ExecResult:
        return run_process(
            bwrap_argv(self.spec, argv), env, str(self.spec.workspace), timeout_s, on_line, cancel
        )


class BwrapRuntime(Runtime):
    name = "bwrap"

    @classmethod
    def probe(cls) -> Probe:
        return _probe()

    def open(self, spec: SandboxSpec) -> Sandbox:
        return BwrapSandbox(spec)


@cache
def _probe() -> Probe:
    if shutil.which("bwrap") is None:
        return Probe(False, "bubblewrap is not installed (apt-get install bubblewrap)")
    trial = ["bwrap", "--unshare-all", "--die-with-parent", *system_args(), "--", "true"]
    try:
        done = subprocess.run(trial, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe(False, f"bubblewrap failed to start: {exc}")
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or ["no message"]
        return Probe(False, f"bubblewrap cannot create namespaces here: {why[0]}")
    return Probe(True, "bubblewrap namespaces work (no network, read-only system)")
