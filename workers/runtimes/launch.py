"""Starting a sandbox's host process: what its child does between fork and exec, in order.

A worker running as root must never hand root to a sandbox. The child forked for bwrap runs
the :class:`Launch`'s ``setup`` steps with the worker's privileges (joining a cgroup, setting
rlimits, staging the binds), and as its very last act drops to the session's unprivileged
identity (:func:`become`). bwrap then makes an unprivileged user namespace itself: the
sandbox's root is the session's uid on the host, holds no capability in the host's namespaces,
and every mount it inherits from a more privileged namespace is locked, so that a read-only
bind stays read-only whatever the sandbox does.

Why stage: bwrap resolves every bind source with ``realpath`` as the uid it runs as (``--bind-fd``
too: the descriptor's ``/proc/self/fd`` link is resolved to its path), and that uid cannot
traverse a 0700 ``CLAUDEBOX_HOME``. So the child, still root, enters a mount namespace of its own
and binds each source under a fresh tmpfs on /tmp (:class:`Staging`), read-only ones remounted
read-only there, which the user namespace then locks; bwrap binds from there. /tmp is bwrap's
own scratch mount point, where it mounts a tmpfs of its own first, so nothing of the host's
/tmp is needed in the child.

Steps run in a forked child of a threaded process: they call only what was prepared before the
fork (no import, no logging, no lock).
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from claudebox_pool.workers.runtimes.base import Identity
from claudebox_pool.workers.runtimes.limits import Confinement

Step = Callable[[], None]
"""One thing the child does before it execs the sandbox; raises OSError when it cannot."""

STAGE = "/tmp"  # noqa: S108  (a private tmpfs mounted there, in the child's own mount namespace)
STAGE_OPTIONS = b"mode=0755,size=1m"

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _checked(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: bytes | None
) -> None:
    _checked(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data,
        ),
        f"mount {target}",
    )


@dataclass(frozen=True)
class Staging:
    """A step: the bind sources made reachable for an unprivileged uid, in the child only.

    Source ``i`` is bound at ``/tmp/<i><its host path>``: the host path stays in bwrap's command
    line (``ps`` still tells which session a sandbox is), and no source can land inside another.
    """

    sources: tuple[tuple[str, bool], ...]
    """(host path, read-only) of each bind."""

    def path(self, index: int) -> str:
        return f"{STAGE}/{index}{self.sources[index][0]}"

    def __call__(self) -> None:
        _checked(_libc.unshare(_CLONE_NEWNS), "unshare the mount namespace")
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
        # Opened in the new namespace (a bind's source must be in the caller's), before the
        # tmpfs hides what lies under /tmp.
        fds = [os.open(source, os.O_PATH | os.O_CLOEXEC) for source, _ in self.sources]
        _mount("tmpfs", STAGE, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, STAGE_OPTIONS)
        for index, ((_, read_only), fd) in enumerate(zip(self.sources, fds, strict=True)):
            target = self.path(index)
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC, None)
            locked = _MS_NOSUID | _MS_NODEV | (_MS_RDONLY if read_only else 0)
            _mount(None, target, None, _MS_BIND | _MS_REMOUNT | locked, None)
            os.close(fd)


def become(identity: Identity) -> None:
    """Drop every group, then the gid, then the uid, for good; no exec may regain any."""
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    _checked(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


@dataclass
class Launch:
    """A sandbox's command and what its child does before exec: ``setup`` in order, with the
    worker's privileges, then the drop to ``identity`` (always last)."""

    argv: list[str]
    setup: list[Step] = field(default_factory=list)
    identity: Identity | None = None

    def confine(self, confinement: Confinement) -> None:
        """Join ``confinement``'s cgroup and take its rlimits first of all, as root; the
        process-count rlimit only where the sandbox has a host uid of its own."""
        own_uid = self.identity is not None
        self.setup.insert(0, lambda: confinement.enter(nproc=own_uid))

    def preexec(self) -> None:
        for step in self.setup:
            step()
        if self.identity is not None:
            become(self.identity)


def staged_sources(
    binds: Sequence[tuple[str, bool]], identity: Identity | None
) -> tuple[list[str], list[Step]]:
    """The paths bwrap binds from, and the setup that makes them reachable: the host paths
    as they are for a sandbox of the worker's own user, staged ones for another identity."""
    if identity is None:
        return [source for source, _ in binds], []
    staging = Staging(tuple(binds))
    return [staging.path(index) for index in range(len(binds))], [staging]
