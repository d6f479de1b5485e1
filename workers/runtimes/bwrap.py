"""A Linux namespace sandbox per command, with bubblewrap.

The system is bound read-only piece by piece (``--ro-bind / /`` would make ``/workspace``
impossible to create), the workspace read-write at ``/workspace``, the session's agent home at
``/root``. Every namespace is unshared, network and user included (loopback only; no nested
user namespace), and the sandbox dies with the worker. It runs as an unprivileged host identity:
the session's own uid where the worker is root, else the worker's user (:mod:`.launch`), mapped
to root inside with no capability. Environment values travel in the process environment, never
on bwrap's command line, where any host user could read them in /proc.

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
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path

from claudebox_pool.tasks.errors import SandboxError
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers import lock
from claudebox_pool.workers.runtimes import exec_server, limits, seccomp
from claudebox_pool.workers.runtimes.base import (
    AGENT_HOME,
    WORKSPACE,
    ExecResult,
    Identity,
    LineSink,
    Probe,
    Runtime,
    Sandbox,
    SandboxSpec,
)
from claudebox_pool.workers.runtimes.launch import Launch, staged_sources
from claudebox_pool.workers.runtimes.limits import Confinement
from claudebox_pool.workers.runtimes.process import run_process
from claudebox_pool.workers.runtimes.remote import Renewal
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


NAMESPACES = ["--unshare-all", "--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns"]
"""Every namespace, the user's included, with the sandbox's root mapped to the uid bwrap runs
as (the session's, or the worker's own), and no nested user namespace (an escape's first step).
"""


def sandbox_identity(spec: SandboxSpec) -> Identity | None:
    """Whom the sandbox runs as on the host: the session's identity when the worker is root
    (never root itself), else the worker's own user (None: no switch, and none possible)."""
    if os.geteuid() != 0:
        return None
    if spec.identity is None:
        raise SandboxError(
            f"session '{spec.session_id}' has no sandbox identity, and a sandbox started by a "
            "root worker never runs as root; open the session through the pool, which gives it "
            "one (CLAUDEBOX_SANDBOX_UID_BASE)"
        )
    return spec.identity


def launch(
    spec: SandboxSpec, argv: Sequence[str], seccomp_fd: int | None = None, tmp_bytes: int = 0
) -> Launch:
    """The sandbox's bwrap command and the child's setup: read-only system, the workspace
    read-write at /workspace, the agent home at /root, the spec's mounts; ``seccomp_fd`` the
    filter bwrap loads, ``tmp_bytes`` the size of /tmp (0: the tmpfs default, half the host's
    memory)."""
    return launch_as(spec, argv, sandbox_identity(spec), seccomp_fd, tmp_bytes)


def launch_as(
    spec: SandboxSpec,
    argv: Sequence[str],
    identity: Identity | None,
    seccomp_fd: int | None = None,
    tmp_bytes: int = 0,
) -> Launch:
    """:func:`launch` for a sandbox run as ``identity`` (None: the worker's own user)."""
    binds = [
        (str(spec.workspace), WORKSPACE, False),
        (str(spec.home), AGENT_HOME, False),
        *((str(mount.host), mount.guest, mount.read_only) for mount in spec.mounts),
    ]
    sources, setup = staged_sources([(host, ro) for host, _, ro in binds], identity)
    args = [
        "bwrap",
        *NAMESPACES,
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
    ]
    for (_, guest, read_only), source in zip(binds, sources, strict=True):
        args += ["--ro-bind" if read_only else "--bind", source, guest]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return Launch([*args, "--chdir", WORKSPACE, "--", *argv], setup, identity)


def bwrap_argv(spec: SandboxSpec, argv: Sequence[str]) -> list[str]:
    return launch(spec, argv).argv


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
        *,
        stdin: bytes | None = None,
    ) -> ExecResult:
        settings = get_settings()
        self._confinement = confinement = limits.confine(self.spec, settings, limits.COLD)
        program = seccomp.program_fd() if settings.seccomp else None
        leased = _Leased.of(argv)
        try:
            started = launch(self.spec, leased.argv, program, confinement.limits.tmp_bytes)
            started.confine(confinement)
            try:
                result = run_process(
                    started.argv,
                    env,
                    "/",
                    timeout_s,
                    on_line,
                    cancel,
                    preexec=started.preexec,
                    pass_fds=(*leased.pass_fds, *(() if program is None else (program,))),
                    tick=leased.tick,
                    stdin=stdin,
                )
            except subprocess.SubprocessError as exc:
                raise SandboxError(
                    f"the sandbox of session '{self.spec.session_id}' could not be set up "
                    f"before bwrap started ({exc}); `claudebox-pool doctor` says whether bwrap "
                    "works here"
                ) from exc
            result.limit = confinement.breach()
            return result
        finally:
            if program is not None:
                os.close(program)
            leased.close()
            self._confinement = None
            confinement.close()

    def tmp_bytes(self) -> int:
        confinement = self._confinement
        return confinement.tmp_bytes() if confinement is not None else 0


class _Leased:
    """A cold command run under the exec server's lease watchdog when the task holds a session
    lock: the sandbox gets the read end of a pipe, the worker alone keeps the write end and
    writes each renewal of the lease to it, so a worker frozen whole (on any host) cannot keep
    the command running past its lease, and nothing inside can extend it."""

    def __init__(
        self,
        argv: list[str],
        ends: tuple[int, ...] = (),
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.argv, self.pass_fds, self.tick = argv, ends[:1], tick
        self._ends = ends

    @classmethod
    def of(cls, argv: Sequence[str]) -> _Leased:
        left = lock.lease_left()
        interpreter = _interpreter() if left is not None else None
        if left is None or interpreter is None:
            return cls(list(argv))
        read_end, write_end = os.pipe()
        # A sandbox that stopped reading must not block the worker's watchdog thread.
        os.set_blocking(write_end, False)
        wrapped = [
            interpreter, "-I", "-S", "-c", _server_source(),
            "--lease", str(read_end), repr(left), "--", *argv,
        ]  # fmt: skip
        renewal = Renewal(lambda seconds: _write_lease(write_end, seconds), lock.lease_left, left)
        return cls(wrapped, (read_end, write_end), renewal.send_if_renewed)

    def close(self) -> None:
        for fd in self._ends:
            os.close(fd)


def _write_lease(fd: int, seconds: float) -> None:
    os.write(fd, f"{seconds}\n".encode())


class BwrapRuntime(Runtime):
    name = "bwrap"

    def __init__(self) -> None:
        self._keeper = warm_client.current()

    @classmethod
    def probe(cls) -> Probe:
        return _probe()

    @classmethod
    def warm_command(cls) -> Callable[[SandboxSpec, int, int | None], Launch] | None:
        interpreter = _interpreter()
        if interpreter is None:
            return None

        def command(spec: SandboxSpec, fd: int, seccomp_fd: int | None) -> Launch:
            server = [interpreter, "-I", "-S", "-c", _server_source(), str(fd)]
            tmp_bytes = get_settings().tmp_size_mib * limits.MIB
            return launch(spec, server, seccomp_fd, tmp_bytes)

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
    identity = _probe_identity()
    who = f"uid {identity.uid}" if identity else "the worker's user"
    # A sandbox as the pool makes one: its directories in a 0700 one, staged for a root worker.
    with tempfile.TemporaryDirectory(prefix="claudebox-probe-") as scratch:
        inside = Path(scratch) / "workspace"
        inside.mkdir()
        inside.chmod(0o755)  # whatever the umask: the sandbox's uid must enter it
        spec = SandboxSpec("probe", inside, inside, 1, 1, 1, identity=identity)
        trial = launch_as(spec, ["true"], identity)
        try:
            done = subprocess.run(
                trial.argv,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                cwd="/",
                preexec_fn=trial.preexec,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return Probe(
                False,
                f"bubblewrap's sandbox could not be set up as {who} ({exc}); a root worker "
                "needs CAP_SYS_ADMIN to bind a session's directories in a mount namespace",
            )
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or ["no message"]
        return Probe(
            False,
            f"bubblewrap cannot create an unprivileged user namespace as {who} here: {why[0]} "
            "(is /proc/sys/user/max_user_namespaces 0?)",
        )
    if trial.identity is None:
        return Probe(
            True,
            "bubblewrap namespaces work (no network, read-only system; sandboxes run as the "
            "worker's user in a user namespace of their own)",
        )
    return Probe(
        True,
        "bubblewrap namespaces work (no network, read-only system; each session runs as its "
        "own unprivileged uid)",
    )


def _probe_identity() -> Identity | None:
    if os.geteuid() != 0:
        return None
    base = get_settings().sandbox_uid_base
    return Identity(base, base)
