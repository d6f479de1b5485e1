"""Resource limits of a bwrap sandbox: memory, CPU and processes per sandbox, rlimits as a floor.

A sandbox gets a cgroup of its own (one per worker process and session, removed with the
sandbox) from the first backend the host lets the worker use:

- ``v2``: the unified hierarchy, under the worker's own cgroup (``memory.max``, ``cpu.max``,
  ``pids.max``); it needs the worker's cgroup to delegate those controllers to children, which a
  cgroup holding processes cannot (run the worker in a delegated cgroup, e.g. systemd
  ``Delegate=yes``).
- ``v1``: one cgroup per controller under the worker's own cgroup of that controller, as
  ``/proc/self/cgroup`` names it (``memory.limit_in_bytes``, ``cpu.cfs_quota_us``,
  ``pids.max``).
- ``none``: no cgroup; only the rlimits hold.

The sandbox's first process joins the cgroup and sets its rlimits itself, in the child between
fork and exec (:meth:`Confinement.enter`, a ``preexec_fn``), so that nothing it starts runs
outside them; a launcher that drops privileges must call it before the drop. After a run the
cgroup's own counters (OOM kills, refused forks) say which limit the run crossed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from claudebox_pool.tasks.errors import SandboxError
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers.runtimes.base import SandboxSpec
from claudebox_pool.workers.runtimes.process import alive

CGROUP_ROOT = Path("/sys/fs/cgroup")
PREFIX = "claudebox-"
CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
REMOVE_TIMEOUT_S = 2.0
TMP_FULL_RATIO = 0.95
"""A /tmp this full after a run that grew it is reported as the limit the run met."""
MIB = 1 << 20
COLD, WARM = "cold", "warm"
"""Kinds of sandbox, part of a cgroup's name: a warm one is the keeper's, a cold one a task's."""
OPTIONAL_FILES = frozenset({"memory.memsw.limit_in_bytes", "memory.swap.max"})
"""Swap limits, which exist only where the kernel accounts swap."""


@dataclass(frozen=True)
class Limits:
    """What one sandbox may use."""

    memory_mib: int
    cpus: int
    pids_max: int
    tmp_bytes: int
    file_bytes: int
    """RLIMIT_FSIZE: no file written larger than the session's disk quota."""

    @classmethod
    def of(cls, spec: SandboxSpec, settings: Settings) -> Limits:
        return cls(
            memory_mib=spec.memory_mib,
            cpus=spec.cpus,
            pids_max=settings.pids_max,
            tmp_bytes=settings.tmp_size_mib * MIB,
            file_bytes=quota_bytes(spec, settings),
        )


def quota_bytes(spec: SandboxSpec, settings: Settings) -> int:
    """The session's disk quota: CLAUDEBOX_SESSION_DISK_BYTES, else its disk_size_gb."""
    return settings.session_disk_bytes or spec.disk_size_gb * 1_000_000_000


@dataclass(frozen=True)
class Counters:
    """A cgroup's counters at one moment."""

    oom_kills: int = 0
    pids_refused: int = 0
    shmem_bytes: int = 0
    """Memory held by tmpfs files (the sandbox's /tmp) charged to the cgroup."""


@dataclass(frozen=True)
class Group:
    """One sandbox's cgroup: a directory per controller (v1) or one for all (v2)."""

    version: int
    dirs: dict[str, Path]

    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in dict.fromkeys(self.dirs.values())]

    def counters(self) -> Counters:
        memory, pids = self.dirs.get("memory"), self.dirs.get("pids")
        oom = shmem = refused = 0
        if memory is not None:
            events = memory / ("memory.events" if self.version == 2 else "memory.oom_control")
            oom = _field(events, "oom_kill")
            shmem = _field(memory / "memory.stat", "shmem")
        if pids is not None:
            refused = _field(pids / "pids.events", "max")
        return Counters(oom_kills=oom, pids_refused=refused, shmem_bytes=shmem)

    def remove(self) -> None:
        """Kill what is left in the cgroup and remove it (a cgroup with members cannot go)."""
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        for path in dict.fromkeys(self.dirs.values()):
            while path.exists():
                for pid in _members(path):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    time.sleep(0.001)  # killed members leave the cgroup as they are reaped


class Confinement:
    """One sandbox's limits: its cgroup (if any) and its rlimits."""

    def __init__(self, limits: Limits, group: Group | None) -> None:
        self.limits = limits
        self.group = group
        self._procs = [str(path) for path in group.procs_files()] if group else []
        self._before = self.counters()

    def enter(self, nproc: bool = False) -> None:
        """Run in the sandbox's first process before exec (and before any privilege drop):
        join the cgroup, set the rlimits. ``nproc``: also RLIMIT_NPROC, which counts every
        process of the host uid and so only fits a uid of the sandbox's own."""
        for procs in self._procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0": the writing process itself
            finally:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        fsize = self.limits.file_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if nproc:
            # Where the cgroup counts processes, the rlimit is only a backstop above it, so that
            # the cgroup refuses first and the run's error can name CLAUDEBOX_PIDS_MAX.
            most = self.limits.pids_max * (2 if self._procs else 1)
            resource.setrlimit(resource.RLIMIT_NPROC, (most, most))

    def counters(self) -> Counters:
        return self.group.counters() if self.group is not None else Counters()

    def mark(self) -> None:
        """Take the counters now as the start of the next run (a warm sandbox's commands)."""
        self._before = self.counters()

    def tmp_bytes(self) -> int:
        """What the sandbox's /tmp holds now (0 where no memory cgroup counts it)."""
        return self.counters().shmem_bytes

    def breach(self) -> str | None:
        """The limit the run since :meth:`mark` crossed, in words a user can act on, or None."""
        if self.group is None:
            return None
        before, after, limits = self._before, self.counters(), self.limits
        if after.oom_kills > before.oom_kills:
            return (
                f"the sandbox ran out of memory (CLAUDEBOX_MEMORY_MIB={limits.memory_mib}) and "
                "its largest process was killed; use less memory, or give the session more "
                "with sandbox options memory_mib"
            )
        if after.pids_refused > before.pids_refused:
            return (
                f"the sandbox reached its process limit (CLAUDEBOX_PIDS_MAX={limits.pids_max}): "
                "new processes or threads were refused; run fewer at once, or raise "
                "CLAUDEBOX_PIDS_MAX"
            )
        full = limits.tmp_bytes * TMP_FULL_RATIO
        if after.shmem_bytes >= full and after.shmem_bytes > before.shmem_bytes:
            return (
                f"the sandbox's /tmp is full (CLAUDEBOX_TMP_SIZE_MIB={limits.tmp_bytes // MIB}); "
                "write large files to /workspace, or raise CLAUDEBOX_TMP_SIZE_MIB"
            )
        return None

    def close(self) -> None:
        if self.group is not None:
            self.group.remove()


def group_name(session_id: str, owner: int, kind: str) -> str:
    """Unique per worker process (``owner``: its pid) and session; short enough for a path
    component whatever the session id."""
    return f"{PREFIX}{owner}-{kind}-{_tag(session_id)}"


def _tag(session_id: str) -> str:
    return session_id if len(session_id) <= 64 else hashlib.sha256(session_id.encode()).hexdigest()


def kill_others(session_id: str, own: set[int]) -> list[str]:
    """Kill every process of the session's sandboxes on this host that a worker process not in
    ``own`` started; the cgroups that held some.

    Run by a new holder of the session's lock: a holder whose lock lapsed because it was frozen
    (SIGSTOP, a paused VM) or cut off may still have a command running in the workspace, in a
    sandbox that is no child of anything stopped (a warm sandbox has a session of its own). A
    stopped process dies of SIGKILL too. SandboxError when some survive it.
    """
    found = backend()
    tag, killed = _tag(session_id), []
    for base in dict.fromkeys(found.base.values()):
        for path in base.glob(f"{PREFIX}*-*-{tag}"):
            owner, _, rest = path.name.removeprefix(PREFIX).partition("-")
            if rest.partition("-")[2] != tag or not owner.isdigit() or int(owner) in own:
                continue
            deadline = time.monotonic() + REMOVE_TIMEOUT_S
            while members := _members(path):
                if time.monotonic() > deadline:
                    raise SandboxError(
                        f"processes {members} of an earlier holder of session '{session_id}' "
                        f"survive SIGKILL in {path}; the session cannot run until they are gone"
                    )
                for pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.001)  # killed members leave the cgroup as they exit
                if path.name not in killed:
                    killed.append(path.name)
    return killed


def confine(spec: SandboxSpec, settings: Settings, kind: str) -> Confinement:
    """A new cgroup (where the host allows one) with ``spec``'s limits, owned by this process."""
    limits = Limits.of(spec, settings)
    found = backend()
    group = None
    if found.base:
        name = group_name(spec.session_id, os.getpid(), kind)
        try:
            group = found.create(name, limits)
        except OSError as exc:
            # Never a sandbox without the limits the worker said it enforces.
            raise SandboxError(
                f"the sandbox of session '{spec.session_id}' cannot get its cgroup {name} "
                f"({exc.strerror or exc}); see the worker's cgroups with `claudebox-pool doctor`"
            ) from exc
    return Confinement(limits, group)


def attach(spec: SandboxSpec, settings: Settings, owner: int, kind: str) -> Confinement:
    """The confinement of a sandbox another process of this worker started (the keeper's warm
    sandbox, seen from a pool child): its counters only, never removed from here."""
    found = backend()
    group = found.existing(group_name(spec.session_id, owner, kind)) if found.base else None
    return Confinement(Limits.of(spec, settings), group)


class Backend:
    """Where this worker may create cgroups: a base directory per controller (one for all on
    v2), empty for the ``none`` backend, and why."""

    def __init__(self, version: int, base: dict[str, Path], reason: str) -> None:
        self.version = version
        self.base = base
        self.reason = reason

    @property
    def name(self) -> str:
        return f"cgroup v{self.version}" if self.base else "none"

    def existing(self, name: str) -> Group | None:
        dirs = {controller: base / name for controller, base in self.base.items()}
        if not all(path.is_dir() for path in dirs.values()):
            return None
        return Group(self.version, dirs)

    def create(self, name: str, limits: Limits) -> Group:
        dirs = {controller: base / name for controller, base in self.base.items()}
        group = Group(self.version, dirs)
        try:
            for path in dict.fromkeys(dirs.values()):
                path.mkdir(exist_ok=True)
            for controller, path in dirs.items():
                for file, value in _settings_of(self.version, controller, limits):
                    if file in OPTIONAL_FILES and not (path / file).exists():
                        continue
                    (path / file).write_text(value)
        except BaseException:
            group.remove()
            raise
        return group


def _settings_of(version: int, controller: str, limits: Limits) -> list[tuple[str, str]]:
    memory = str(limits.memory_mib * MIB)
    quota = str(limits.cpus * CFS_PERIOD_US)
    if version == 2:
        return {
            "memory": [("memory.max", memory), ("memory.swap.max", "0")],
            "cpu": [("cpu.max", f"{quota} {CFS_PERIOD_US}")],
            "pids": [("pids.max", str(limits.pids_max))],
        }[controller]
    return {
        # memsw (memory + swap) exists only with swap accounting; it must not be below the limit.
        "memory": [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory)],
        "cpu": [("cpu.cfs_period_us", str(CFS_PERIOD_US)), ("cpu.cfs_quota_us", quota)],
        "pids": [("pids.max", str(limits.pids_max))],
    }[controller]


@cache
def backend() -> Backend:
    """The first backend that works here, tried once per process with a probe cgroup."""
    v1, v2 = _mounts()
    own = _own_cgroups()
    tried: list[str] = []
    if v2 is not None and "" in own:
        base = v2 / own[""].lstrip("/")
        found = _try(2, dict.fromkeys(CONTROLLERS, base), tried, _delegate)
        if found is not None:
            return found
    bases = {
        controller: v1[controller] / own[controller].lstrip("/")
        for controller in CONTROLLERS
        if controller in v1 and controller in own
    }
    if bases:
        found = _try(1, bases, tried, None)
        if found is not None:
            return found
    why = "; ".join(tried) or "no cgroup controller for memory, cpu or pids is mounted"
    return Backend(0, {}, why)


def _try(
    version: int,
    bases: dict[str, Path],
    tried: list[str],
    prepare: Callable[[str, Path], None] | None,
) -> Backend | None:
    usable = {}
    for controller, base in bases.items():
        try:
            if prepare is not None:
                prepare(controller, base)
            _sweep(base)
            probe = base / f"{PREFIX}{os.getpid()}-probe"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
        except OSError as exc:
            tried.append(f"v{version} {controller} at {base}: {exc.strerror or exc}")
            continue
        usable[controller] = base
    if not usable:
        return None
    shown = ", ".join(f"{controller} at {base}" for controller, base in usable.items())
    return Backend(version, usable, shown)


def _delegate(controller: str, base: Path) -> None:
    """Enable ``controller`` for the worker's children (v2); fails (EBUSY) where the worker's
    own cgroup holds processes, which v2 allows no children with controllers beside."""
    if controller not in (base / "cgroup.controllers").read_text().split():
        raise OSError(errno.ENOTSUP, "not delegated to the worker's cgroup")
    (base / "cgroup.subtree_control").write_text(f"+{controller}")


def _sweep(base: Path) -> None:
    """Remove the cgroups of worker processes that died without removing theirs."""
    for path in base.glob(f"{PREFIX}*"):
        owner = path.name.removeprefix(PREFIX).partition("-")[0]
        if owner.isdigit() and not alive(int(owner)) and path.is_dir():
            Group(0, {"any": path}).remove()


def _mounts() -> tuple[dict[str, Path], Path | None]:
    """Mount points of the v1 controllers and of the v2 hierarchy, from /proc/self/mountinfo."""
    v1: dict[str, Path] = {}
    v2 = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mine, _, theirs = line.partition(" - ")
            fields, fs = mine.split(), theirs.split()
            if len(fields) < 5 or len(fs) < 3:
                continue
            if fs[0] == "cgroup2":
                v2 = v2 or Path(fields[4])
            elif fs[0] == "cgroup":
                for option in fs[2].split(","):
                    if option in CONTROLLERS:
                        v1.setdefault(option, Path(fields[4]))
    return v1, v2


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller, and its v2 cgroup under the key ""."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def _members(path: Path) -> list[int]:
    try:
        return [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _field(path: Path, name: str) -> int:
    """The value of ``name`` in a flat-keyed cgroup file (``key value`` lines); 0 if absent."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def report(settings: Settings) -> list[str]:
    """What a bwrap sandbox's limits are here and what enforces each, one line per resource."""
    found = backend()
    by = found.base

    def means(controller: str) -> str:
        return f"{found.name} ({controller})" if controller in by else "not enforced"

    lines = [
        f"memory {settings.memory_mib} MiB: {means('memory')}",
        f"cpu {settings.cpus}: {means('cpu')}",
        f"processes {settings.pids_max}: "
        + (means("pids") if "pids" in by else "RLIMIT_NPROC only with a uid per sandbox"),
        f"/tmp {settings.tmp_size_mib} MiB: tmpfs size"  # noqa: S108  (the sandbox's own)
        + (", counted in the session's disk use" if "memory" in by else ""),
        "disk per session: "
        + (
            f"{settings.session_disk_bytes} bytes"
            if settings.session_disk_bytes
            else "the session's disk_size_gb"
        )
        + f", measured every {settings.disk_watch_s:g}s; RLIMIT_FSIZE caps one file",
        "core dumps: RLIMIT_CORE=0",
    ]
    lines.append(f"cgroups: {found.name}: {found.reason}")
    return lines
