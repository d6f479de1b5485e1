"""A Linux namespace sandbox per command, with bubblewrap.

The system is bound read-only piece by piece (``--ro-bind / /`` would make ``/workspace``
impossible to create), the workspace read-write at ``/workspace``, the session's agent home at
``/root``. Every namespace is unshared, network included (loopback only), and the sandbox dies
with the worker. Environment values travel in the process environment, never on bwrap's
command line, where any host user could read them in /proc.

A sandbox is cold (one bwrap per command) or warm: one bwrap per session kept by the worker's
keeper (:mod:`workers.warm`) and running the exec server (:mod:`workers.runtimes.exec_server`)
under the host's own Python, which sees the same read-only system as any command; commands
are then sent to it and the sandbox start is paid once per session, not per task. A warm
sandbox's ``/tmp`` lives as long as the sandbox. Where the keeper cannot serve (warm sandboxes
off, no Python under /usr, a run that needs the model gateway), the sandbox is cold.

Every sandbox, cold or warm, runs in a cgroup of its own with rlimits (:mod:`.limits`), a sized
/tmp, and the seccomp filter of :mod:`.seccomp`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path

from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.runtimes import exec_server, limits, seccomp
from claudebox_pool.workers.runtimes.base import (
    AGENT_HOME,
    WORKSPACE,
    ExecResult,
    LineSink,
    Probe,
    Runtime,
    Sandbox,
    SandboxSpec,
)
from claudebox_pool.workers.runtimes.limits import Confinement
from claudebox_pool.workers.runtimes.process import run_process
from claudebox_pool.workers.warm import client as warm_client
from claudebox_pool.workers.warm.keeper import WarmError
from claudebox_pool.workers.warm.protocol import warmable
from claudebox_pool.workers.warm.sandbox import WarmSandbox

log = logging.getLogger(__name__)

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


def bwrap_argv(
    spec: SandboxSpec, argv: Sequence[str], seccomp_fd: int | None = None, tmp_bytes: int = 0
) -> list[str]:
    """``tmp_bytes``: the size of /tmp (0: the tmpfs default, half the host's memory)."""
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
        *(["--size", str(tmp_bytes)] if tmp_bytes else []),
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
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return [*args, "--chdir", WORKSPACE, "--", *argv]


class BwrapSandbox(Sandbox):
    def __init__(self, spec: SandboxSpec) -> None:
        super().__init__(spec)
        self._confinement: Confinement | None = None

    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        timeout_s: float,
        on_line: LineSink | None = None,
        cancel: threading.Event | None = None,
    ) -> ExecResult:
        settings = get_settings()
        self._confinement = confinement = limits.confine(self.spec, settings, limits.COLD)
        program = seccomp.program_fd() if settings.seccomp else None
        try:
            command = bwrap_argv(self.spec, argv, program, confinement.limits.tmp_bytes)
            result = run_process(
                command,
                env,
                str(self.spec.workspace),
                timeout_s,
                on_line,
                cancel,
                preexec=confinement.enter,
                pass_fds=() if program is None else (program,),
            )
            result.limit = confinement.breach()
            return result
        finally:
            if program is not None:
                os.close(program)
            self._confinement = None
            confinement.close()

    def tmp_bytes(self) -> int:
        confinement = self._confinement
        return confinement.tmp_bytes() if confinement is not None else 0


class BwrapRuntime(Runtime):
    name = "bwrap"

    def __init__(self) -> None:
        self._keeper = warm_client.current()

    @classmethod
    def probe(cls) -> Probe:
        return _probe()

    @classmethod
    def warm_command(cls) -> Callable[[SandboxSpec, int, int | None], list[str]] | None:
        interpreter = _interpreter()
        if interpreter is None:
            return None

        def command(spec: SandboxSpec, fd: int, seccomp_fd: int | None) -> list[str]:
            server = [interpreter, "-I", "-S", "-c", _server_source(), str(fd)]
            tmp_bytes = get_settings().tmp_size_mib * limits.MIB
            return bwrap_argv(spec, server, seccomp_fd, tmp_bytes)

        return command

    def open(self, spec: SandboxSpec) -> Sandbox:
        if self._keeper is not None:
            if not warmable(spec):
                # A cold sandbox for this run: none may stay warm for the session meanwhile.
                self.remove(spec.session_id)
                return BwrapSandbox(spec)
            try:
                control = self._keeper.acquire(spec)
            except WarmError as exc:
                log.warning("no warm sandbox for %s (%s); running cold", spec.session_id, exc)
            else:
                return WarmSandbox(spec, self._keeper, control, cold=BwrapSandbox)
        return BwrapSandbox(spec)

    def remove(self, session_id: str) -> bool:
        """Stop the session's warm sandbox, wherever a worker keeps one."""
        if self._keeper is None:
            return False
        try:
            return self._keeper.drop(session_id, everywhere=True)
        except WarmError as exc:
            log.warning("warm sandbox of %s not dropped: %s", session_id, exc)
            return False

    def kept(self) -> list[str]:
        if self._keeper is None:
            return []
        try:
            return self._keeper.sessions()
        except WarmError:
            return []


@cache
def _interpreter() -> str | None:
    """A Python the sandbox can run (one under /usr, which it sees read-only) that has what the
    exec server needs: ``socket.send_fds`` (3.9+) and a kernel with ``pidfd_open`` (5.3+)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        resolved = Path(os.path.realpath(candidate))
        if resolved.parts[1:2] != ("usr",) or not os.access(resolved, os.X_OK):
            continue
        try:
            subprocess.run(
                [str(resolved), "-I", "-S", "-c", _SERVER_NEEDS],
                check=True,
                capture_output=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        return str(resolved)
    return None


_SERVER_NEEDS = "import os, socket; socket.send_fds; os.close(os.pidfd_open(os.getpid()))"


@cache
def _server_source() -> str:
    return Path(exec_server.__file__).read_text()


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
