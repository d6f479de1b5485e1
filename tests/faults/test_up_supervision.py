"""`claudebox-pool up` supervises its pool: a crashed process is restarted with a growing delay,
and a pool killed outright (supervisor included) leaves nothing that stops the next `up`.

Each test runs `up --detach` in a HOME of its own with its own Redis (see tests/test_local_pool),
with the default restart settings, and kills processes with SIGKILL as a crash would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.support.processes import wait_for
from tests.test_local_pool import LocalPool, local_pool  # noqa: F401  # the fixture


def recorded(pool: LocalPool) -> dict[str, object]:
    """pool.json as `up` wrote it; {} while it is absent or being replaced."""
    try:
        return dict(json.loads((pool.home / ".claudebox" / "run" / "pool.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def member_pid(pool: LocalPool, name: str) -> int | None:
    members = recorded(pool).get("members") or {}
    assert isinstance(members, dict)
    member = members.get(name)
    return int(member["pid"]) if member else None


def worker_pid(pool: LocalPool) -> int | None:
    return member_pid(pool, "worker-1")


def up_log(pool: LocalPool) -> str:
    return (pool.home / ".claudebox" / "run" / "logs" / "up.log").read_text()


def test_a_killed_worker_is_restarted_after_a_delay_that_doubles(
    local_pool: LocalPool,  # noqa: F811
) -> None:
    started = local_pool.run("up", "--detach")
    assert started.returncode == 0, started.stdout + started.stderr
    first = worker_pid(local_pool)
    assert first is not None

    pool_children = children_of(first)
    killed_at = time.monotonic()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: worker_pid(local_pool) not in (None, first), 30, "worker-1 to restart")
    restarted_after = time.monotonic() - killed_at
    left_over = [pid for pid in pool_children if alive(pid)]
    second = worker_pid(local_pool)
    ran = local_pool.run("code", "after-crash", "echo back")
    again = local_pool.run("up", "--detach")

    assert 1.0 <= restarted_after < 6, restarted_after  # the first delay is 1 s
    assert pool_children and left_over == []  # the crashed worker's pool went with it
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout == "back\n"
    assert again.returncode == 2
    assert "a local pool is already running" in again.stderr
    log = up_log(local_pool)
    assert "worker-1 exited by signal 9; restarting it in 1.0s (crash 1 in a row)" in log
    assert f"restarted worker-1 (pid {second})" in log

    assert second is not None
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: worker_pid(local_pool) not in (None, second), 30, "a second restart")
    beat = member_pid(local_pool, "beat")
    assert beat is not None
    os.kill(beat, signal.SIGKILL)
    wait_for(lambda: member_pid(local_pool, "beat") not in (None, beat), 30, "beat to restart")
    stopped = local_pool.run("down")

    log = up_log(local_pool)
    assert "worker-1 exited by signal 9; restarting it in 2.0s (crash 2 in a row)" in log
    assert "beat exited by signal 9; restarting it in 1.0s (crash 1 in a row)" in log
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert local_pool.processes() == []


def test_up_after_the_whole_pool_was_killed_clears_its_state_and_starts(
    local_pool: LocalPool,  # noqa: F811
) -> None:
    started = local_pool.run("up", "--detach")
    assert started.returncode == 0, started.stdout + started.stderr
    supervisor = recorded(local_pool)["supervisor"]
    assert isinstance(supervisor, dict)
    tag = local_pool.env["CLAUDEBOX_TEST_POOL"]
    for pid in pids_tagged(tag):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pids_tagged(tag) == [], 30, "every process of the pool to die")
    # Its pid is given to an unrelated process, as happens once a pid is free again.
    stranger = subprocess.Popen(["sleep", "300"])
    state = recorded(local_pool)
    state["supervisor"] = {"pid": stranger.pid, "started": supervisor["started"]}
    (local_pool.home / ".claudebox" / "run" / "pool.json").write_text(json.dumps(state))

    try:
        again = local_pool.run("up", "--detach")
        ran = local_pool.run("code", "after-kill", "echo again")
        stopped = local_pool.run("down")
        assert stranger.poll() is None  # not ours: neither taken for the pool nor stopped
    finally:
        stranger.kill()
        stranger.wait()

    assert again.returncode == 0, again.stdout + again.stderr
    assert "the last pool ended without `claudebox-pool down`" in again.stdout
    assert (ran.returncode, ran.stdout) == (0, "again\n"), ran.stderr
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert local_pool.processes() == []


def test_processes_stopped_on_purpose_stay_stopped_and_then_up_stops_the_pool(
    local_pool: LocalPool,  # noqa: F811
) -> None:
    output = local_pool.home / "up.log"
    up = local_pool.start("up", output=output)
    wait_for(lambda: "pool up" in output.read_text(), 60, "the pool to start")

    for name in ("worker-1", "beat"):
        pid = member_pid(local_pool, name)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # Celery's warm shutdown: it exits 0

    assert up.wait(60) == 0, output.read_text()
    log = output.read_text()
    assert "worker-1 exited 0; left stopped" in log
    assert "beat exited 0; left stopped" in log
    assert "every Celery process of the pool has exited; stopping it" in log
    assert "restarted" not in log
    assert local_pool.processes() == []


def children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found += [int(child) for child in children.read().split()]
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (the restarted pool's own processes are reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pids_tagged(tag: str) -> list[int]:
    """Live processes whose environment holds the pool's marker (zombies are dead already)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if f"CLAUDEBOX_TEST_POOL={tag}".encode() not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found
