"""A killed pool child leaves no sandbox behind (bwrap's --die-with-parent), and its task
completes once on the redelivery."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import redis

from tasks import keys
from tests.conftest import WorkerFactory
from tests.faults.conftest import entries_of, open_session, result_of, send_code
from tests.support.processes import Worker, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bwrap_pool(start_workers: WorkerFactory) -> list[Worker]:
    return start_workers(2, concurrency=1, CLAUDEBOX_LOCK_TTL_S="2", CLAUDEBOX_LOCK_WAIT_S="30")


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


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent for {pid}")


def test_a_killed_pool_child_takes_its_sandbox_with_it(
    bwrap_pool: list[Worker], clean_state: redis.Redis
) -> None:
    open_session("sandboxed")
    # A sleep of a unique length names the sandbox and what runs in it, from the outside.
    marker = f"29.{random.randrange(10**8):08d}"
    task_id = send_code(
        "sandboxed",
        f"if [ -e .attempted ]; then echo finished; exit 0; fi; touch .attempted; "
        f"exec sleep {marker}",
    )

    def sandbox() -> list[int]:
        return [pid for pid, argv in processes_naming(marker).items() if argv[0].endswith("bwrap")]

    wait_for(lambda: sandbox() and len(processes_naming(marker)) >= 2, 20, "the sandbox")
    outer = min(sandbox())
    child = parent_of(outer)
    assert any(
        worker.proc is not None and os.getpgid(child) == worker.proc.pid for worker in bwrap_pool
    )

    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not processes_naming(marker), 5, "the sandbox to die with its worker")
    result = result_of(task_id, 60)

    assert result.success and result.response.strip() == "finished"
    assert len(entries_of("sandboxed", "code_execution", task_id)) == 1
    assert len(entries_of("sandboxed", "attempt_interrupted", task_id)) == 1
    assert clean_state.exists(keys.session_lock("sandboxed")) == 0
