"""The interface every runtime implements: open a sandbox for a session, run commands in it.

A runtime is created once per worker process. ``open`` gives a :class:`Sandbox` for one task;
``exec`` runs one command in it with the session's workspace at :attr:`Sandbox.workdir`.
``remove`` drops what a runtime keeps for a session between tasks (a boxlite box, a warm
sandbox), ``kept`` lists the sessions it keeps something for; for runtimes that keep nothing
both are no-ops. ``warm_command`` says how the worker's keeper starts a warm sandbox.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Self

from claudebox_pool.tasks.settings import Settings

if TYPE_CHECKING:
    from claudebox_pool.workers.runtimes.launch import Launch

LineSink = Callable[[str, str], None]
"""Called with ("stdout" | "stderr", line) for every line a command prints, as it prints it."""

WORKSPACE = "/workspace"
"""Where a sandbox sees the session's workspace."""
AGENT_HOME = "/root"
"""Where a sandbox sees the session's agent home (the CLI's ~/.claude lives there)."""


@dataclass(frozen=True)
class Probe:
    """Whether a runtime can run on this host, and why (one line a user can act on)."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class Mount:
    host: Path
    guest: str
    read_only: bool = True


@dataclass(frozen=True)
class GatewayMount(Mount):
    """A run's way out to the worker's model gateway, among a spec's mounts.

    Without ``port`` it is the lease's socket directory, bound in like any mount. With it (a
    runtime whose sandboxes reach the gateway over TCP, :attr:`Runtime.gateway_host`) it is
    not shared at all: it tells the runtime that the run needs its network opened to the
    lease's TCP port on the host, and to nothing else the runtime can close.
    """

    port: int | None = None


@dataclass(frozen=True)
class Identity:
    """The unprivileged host user and group a sandbox's processes run as."""

    uid: int
    gid: int


@dataclass(frozen=True)
class SandboxSpec:
    """What a session's sandbox is made of.

    ``identity``: the session's own host identity (:mod:`workers.identity`); a runtime that
    runs host processes (bwrap) needs one when the worker is root, and runs as the worker's
    user otherwise.
    """

    session_id: str
    workspace: Path
    home: Path
    cpus: int
    memory_mib: int
    disk_size_gb: int
    image: str | None = None
    mounts: tuple[Mount, ...] = ()
    persistent: bool = True
    identity: Identity | None = None


STDERR_TAIL_LINES = 20


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    cancelled: bool = False
    limit: str | None = None
    """The sandbox limit the command crossed (memory, processes, /tmp), in words naming its
    setting; None if it crossed none, or the runtime cannot tell."""

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines of stderr, for error messages."""
        return self.stderr.splitlines()[-STDERR_TAIL_LINES:]


class Sandbox(ABC):
    """One session's sandbox for the length of a task."""

    workdir: str = WORKSPACE
    home: str = AGENT_HOME
    private_network: bool = True
    """Whether loopback inside is the sandbox's own (False: the host's, as for ``local``)."""
    gateway_host: str | None = None
    """How the sandbox reaches the model gateway. None: through the lease's unix socket, bound
    in and bridged to loopback by socat. Else the name under which the sandbox reaches the
    host's loopback over TCP (a micro-VM, which a unix socket cannot enter); no bridge then."""

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec

    @abstractmethod
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
        """Run ``argv`` in the sandbox, cwd at the workspace; never raises for a non-zero exit.

        Output is read from both pipes as it comes; at ``timeout_s`` or when ``cancel`` is set
        the command and everything it started are killed. ``stdin`` is written to the
        command's standard input, then closed (None: it reads end of file at once); a prompt
        travels there, as argv holds no argument over 128 KB.
        """

    def tmp_bytes(self) -> int:
        """What the sandbox's /tmp holds now, counted in its session's disk use while a
        command runs (0 where the runtime cannot tell, or /tmp is on the sandbox's own disk)."""
        return 0

    def path_of(self, mount: Mount) -> str:
        """Where the sandbox's processes see ``mount``."""
        return mount.guest

    def close(self) -> None:
        """Release the sandbox at the end of a task (stop a VM, keep its disk)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Runtime(ABC):
    name: str
    gateway_host: str | None = None
    """:attr:`Sandbox.gateway_host` of this runtime's sandboxes, known before one is opened
    (the gateway lease is made first, and its way out is part of the sandbox's spec)."""
    keeper_holds: ClassVar[bool] = False
    """Whether, with warm sandboxes on, the worker's keeper holds the runtime itself and every
    sandbox of it, and pool children only lease them (:class:`workers.warm.sandbox.KeptRuntime`):
    for a runtime that is one per process and slow to start a sandbox (boxlite)."""

    @classmethod
    def start_timeout_of(cls, settings: Settings) -> float:
        """The longest :meth:`open` may take with ``settings`` (a VM's image import and boot)."""
        return 15.0

    @classmethod
    def gateway_host_of(cls, settings: Settings) -> str | None:
        """:attr:`gateway_host` of an instance made with ``settings``, without making one."""
        return cls.gateway_host

    @classmethod
    @abstractmethod
    def probe(cls) -> Probe:
        """Can this runtime run here? Cheap enough to call at worker start."""

    @abstractmethod
    def open(self, spec: SandboxSpec) -> Sandbox:
        """A sandbox for one task of ``spec.session_id``."""

    @classmethod
    def warm_command(cls) -> Callable[[SandboxSpec, int, int | None], Launch] | None:
        """How to start a warm sandbox running the exec server on an inherited descriptor
        (:mod:`workers.warm`), with the seccomp program on the other one if not None, or None
        where this runtime keeps no warm sandboxes."""
        return None

    def remove(self, session_id: str) -> bool:
        """Drop what is kept for the session between tasks; True if something was removed."""
        return False

    def kept(self) -> list[str]:
        """Ids of the sessions this runtime keeps something for (what ``remove`` would drop)."""
        return []

    def close(self) -> None:
        """Release the runtime at worker shutdown."""
