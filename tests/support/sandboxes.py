"""Finding sandboxes from the host: the processes whose command line names a path."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from claudebox_pool.workers.runtimes.base import Identity, SandboxSpec

SANDBOX_ID = "[ -e /tmp/id ] || cat /proc/sys/kernel/random/uuid > /tmp/id; cat /tmp/id"
"""A shell command printing the id of the sandbox it runs in: drawn by the sandbox's first
command and kept in its own /tmp (a pid namespace's inode number is used again once it is gone,
so it cannot tell one sandbox from the next)."""


def processes_naming(marker: str) -> dict[int, list[str]]:
    """Live processes whose command line holds ``marker``: pid → argv."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(marker in arg for arg in argv):
            found[int(entry.name)] = argv
    return found


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ")".
    return int(stat.rpartition(")")[2].split()[1])


def sandboxes_of(workspace: Path | str) -> dict[int, int | None]:
    """The bwrap sandboxes binding ``workspace``: the pid of each one's outer bwrap (not its
    forked namespace init, which names it too) → the process that started it."""
    bwraps = {
        pid: parent_of(pid)
        for pid, argv in processes_naming(str(workspace)).items()
        if Path(argv[0]).name == "bwrap"
    }
    return {pid: parent for pid, parent in bwraps.items() if parent not in bwraps}


TEST_UID = 299_999
"""The identity tests give sandboxes they make without a session (the top of the default
range: sessions are given uids from its bottom)."""


def owned(spec: SandboxSpec) -> SandboxSpec:
    """``spec`` as a root worker makes it for a session: with an identity of its own, which
    owns the workspace and agent home. Unchanged where the tests do not run as root."""
    if os.geteuid() != 0:
        return spec
    for path in (spec.workspace, spec.home):
        os.chown(path, TEST_UID, TEST_UID)
    return dataclasses.replace(spec, identity=Identity(TEST_UID, TEST_UID))
