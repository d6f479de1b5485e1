"""Sandbox limits, as an attacker meets them: memory, process, /tmp and disk floods end the run
with success=False naming the limit and its setting, while the worker and other sessions go on;
the seccomp filter refuses what an agent never needs; `doctor` says what enforces each limit.

Through a real worker (warm sandboxes: one cgroup holds the whole sandbox), and on the cold
path by the runtime itself. Limits are small so that a flood costs a 2-core CI little.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox
from claudebox_pool.tasks.models import CodeResult
from claudebox_pool.tasks.settings import get_settings
from claudebox_pool.workers.runtimes import limits
from claudebox_pool.workers.runtimes.base import SandboxSpec
from claudebox_pool.workers.runtimes.bwrap import BwrapSandbox
from tests.conftest import WorkerFactory
from tests.support.processes import REPO, Worker, claudebox_pool, wait_for
from tests.support.sandboxes import owned

MEMORY_MIB = 96
PIDS_MAX = 48
TMP_MIB = 16
QUOTA_BYTES = 40_000_000
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root"}

MEMORY_FLOOD = "python3 -c 'b=b\"\\x01\"*(2*1024**3)'"
FORK_FLOOD = "for i in $(seq 200); do sleep 2 & done; wait"

needs_cgroups = pytest.mark.skipif(
    not limits.backend().base, reason=f"no cgroup the worker may use: {limits.backend().reason}"
)


@pytest.fixture(scope="module")
def limited_pool(start_workers: WorkerFactory) -> list[Worker]:
    return start_workers(
        1,
        concurrency=2,
        CLAUDEBOX_MEMORY_MIB=str(MEMORY_MIB),
        CLAUDEBOX_PIDS_MAX=str(PIDS_MAX),
        CLAUDEBOX_TMP_SIZE_MIB=str(TMP_MIB),
        CLAUDEBOX_SESSION_DISK_BYTES=str(QUOTA_BYTES),
        CLAUDEBOX_DISK_WATCH_S="0.2",
    )


def flood_then_recover(prompt: str) -> tuple[CodeResult, CodeResult, CodeResult]:
    """Run ``prompt`` in one session, then a call in another session and one in the same."""

    async def scenario() -> tuple[CodeResult, CodeResult, CodeResult]:
        async with ClaudeBox(session_id="flood") as flood, ClaudeBox(session_id="calm") as calm:
            flooded = await flood.code(prompt)
            other = await calm.code("echo fine")
            again = await flood.code("echo back")
            return flooded, other, again

    return asyncio.run(scenario())


def last_run_in_history(session_id: str) -> dict[str, object]:
    history = get_settings().sessions_root / session_id / ".claudebox" / "history.jsonl"
    runs = [
        json.loads(line)["context"]
        for line in history.read_text().splitlines()
        if json.loads(line)["action"] == "code_execution"
    ]
    return dict(runs[-2])  # the flood; the last is the call after it


def assert_contained(
    outcome: tuple[CodeResult, CodeResult, CodeResult], named: str, worker: Worker
) -> None:
    flooded, other, again = outcome
    assert not flooded.success
    assert flooded.error is not None and named in flooded.error
    recorded = last_run_in_history("flood")
    assert recorded["success"] is False
    assert named in str(recorded["error"])
    assert other.success and other.response == "fine\n"
    assert again.success and again.response == "back\n"
    assert worker.proc is not None and worker.proc.poll() is None


# --- through a worker -------------------------------------------------------------------------


@needs_cgroups
@pytest.mark.usefixtures("clean_state")
def test_a_memory_flood_is_killed_and_named(limited_pool: list[Worker]) -> None:
    outcome = flood_then_recover(MEMORY_FLOOD)

    assert_contained(outcome, f"CLAUDEBOX_MEMORY_MIB={MEMORY_MIB}", limited_pool[0])


@needs_cgroups
@pytest.mark.usefixtures("clean_state")
def test_a_fork_flood_meets_the_process_limit(limited_pool: list[Worker]) -> None:
    outcome = flood_then_recover(FORK_FLOOD)

    assert_contained(outcome, f"CLAUDEBOX_PIDS_MAX={PIDS_MAX}", limited_pool[0])


@needs_cgroups
@pytest.mark.usefixtures("clean_state")
def test_a_tmp_flood_stops_at_the_size_of_tmp(limited_pool: list[Worker]) -> None:
    outcome = flood_then_recover(f"head -c {4 * TMP_MIB}M /dev/zero > /tmp/fill")

    assert_contained(outcome, f"CLAUDEBOX_TMP_SIZE_MIB={TMP_MIB}", limited_pool[0])


@pytest.mark.usefixtures("clean_state")
def test_a_disk_flood_is_stopped_during_the_run_at_the_session_quota(
    limited_pool: list[Worker],
) -> None:
    # Each file stays under the quota (RLIMIT_FSIZE would cut a larger one): their sum does not.
    prompt = "for f in a b c; do head -c 30000000 /dev/zero > $f; done; sleep 30"

    outcome = flood_then_recover(prompt)

    assert_contained(outcome, "CLAUDEBOX_SESSION_DISK_BYTES", limited_pool[0])
    assert outcome[0].error is not None and outcome[0].error.startswith("DiskFullError")
    assert outcome[0].duration_s < 20


@needs_cgroups
@pytest.mark.usefixtures("clean_state")
def test_what_tmp_holds_counts_toward_the_session_quota(limited_pool: list[Worker]) -> None:
    # 30 MB in the workspace is under the quota; with 12 MiB in /tmp the session is over it.
    prompt = "head -c 30000000 /dev/zero > a; head -c 12M /dev/zero > /tmp/t; sleep 30"

    outcome = flood_then_recover(prompt)

    assert_contained(outcome, "CLAUDEBOX_SESSION_DISK_BYTES", limited_pool[0])
    assert outcome[0].duration_s < 20


@needs_cgroups
@pytest.mark.usefixtures("limited_pool", "clean_state")
def test_a_warm_sandboxs_cgroup_is_removed_with_the_sandbox() -> None:
    def groups() -> list[Path]:
        return [
            path
            for base in limits.backend().base.values()
            for path in base.glob(f"{limits.PREFIX}*-{limits.WARM}-kept")
        ]

    async def scenario() -> None:
        async with ClaudeBox(session_id="kept") as box:
            assert (await box.code("sleep 0")).success
            assert len(groups()) == len(limits.backend().base)
            await ClaudeBox.cleanup_session("kept", remove_workspace=True)

    asyncio.run(scenario())

    wait_for(lambda: not groups(), 10, "the warm sandbox's cgroup removed")


@pytest.mark.usefixtures("limited_pool", "clean_state")
def test_the_seccomp_filter_refuses_a_new_user_namespace_in_the_warm_sandbox() -> None:
    async def scenario() -> CodeResult:
        async with ClaudeBox() as box:
            return await box.code("unshare -U -r id")

    result = asyncio.run(scenario())

    assert not result.success
    assert result.error is not None and "Operation not permitted" in result.error


@pytest.mark.usefixtures("limited_pool")
def test_doctor_says_what_enforces_each_limit() -> None:
    done = claudebox_pool("doctor")

    assert done.returncode == 0, done.stdout + done.stderr
    found = limits.backend()
    memory = f"cgroup v{found.version} (memory)" if "memory" in found.base else "not enforced"
    assert f"limit: memory {MEMORY_MIB} MiB: {memory}" in done.stdout
    assert f"limit: processes {PIDS_MAX}:" in done.stdout
    assert f"limit: /tmp {TMP_MIB} MiB: tmpfs size" in done.stdout
    assert "limit: seccomp: " in done.stdout and "denied" in done.stdout


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv to run as another user")
def test_a_worker_that_may_not_use_cgroups_falls_back_to_rlimits_and_says_so() -> None:
    script = (
        "from claudebox_pool.workers.runtimes import limits\n"
        "from claudebox_pool.tasks.settings import Settings\n"
        "print('\\n'.join(limits.report(Settings(memory_mib=300))))\n"
    )
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    done = subprocess.run(
        [*nobody, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "memory 300 MiB: not enforced" in done.stdout
    assert "cgroups: none: " in done.stdout
    assert "core dumps: RLIMIT_CORE=0" in done.stdout


# --- the cold path, by the runtime ------------------------------------------------------------


@pytest.fixture
def spec(tmp_path: Path) -> SandboxSpec:
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    return owned(SandboxSpec("cold-limits", workspace, home, cpus=1, memory_mib=64, disk_size_gb=1))


def cold_groups() -> list[Path]:
    return [
        path
        for base in limits.backend().base.values()
        for path in base.glob(f"{limits.PREFIX}*-{limits.COLD}-cold-limits")
    ]


@needs_cgroups
def test_a_cold_sandbox_runs_in_a_cgroup_of_its_limits_removed_after(spec: SandboxSpec) -> None:
    seen: dict[str, str] = {}

    def read_while_running() -> None:
        wait_for(cold_groups, 10, "the sandbox's cgroup")
        for path in cold_groups():
            for name in ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us"):
                if (path / name).exists():
                    seen[name] = (path / name).read_text().strip()

    reader = threading.Thread(target=read_while_running)
    reader.start()
    result = BwrapSandbox(spec).exec(["sleep", "1"], ENV, 20)
    reader.join()

    assert result.exit_code == 0
    assert seen.get("memory.limit_in_bytes", seen.get("memory.max")) == str(64 << 20)
    assert seen["pids.max"] == str(get_settings().pids_max)
    if "cpu.cfs_quota_us" in seen:
        assert seen["cpu.cfs_quota_us"] == "100000"
    assert cold_groups() == []


@needs_cgroups
def test_a_cold_memory_flood_names_the_memory_limit(spec: SandboxSpec) -> None:
    result = BwrapSandbox(spec).exec(["sh", "-c", MEMORY_FLOOD], ENV, 30)

    assert result.exit_code != 0
    assert result.limit is not None and "CLAUDEBOX_MEMORY_MIB=64" in result.limit


def test_rlimits_hold_in_the_sandbox_without_core_dumps_or_giant_files(spec: SandboxSpec) -> None:
    started = time.monotonic()
    result = BwrapSandbox(spec).exec(["sh", "-c", "ulimit -c; ulimit -f"], ENV, 20)

    assert result.stdout.split() == ["0", str(1_000_000_000 // 512)]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("call", "why"),
    [
        ("libc.unshare(0x10000000) != -1 or err()", "unshare(CLONE_NEWUSER)"),
        ("libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) != -1 or err()", "mount"),
        ("libc.syscall(101, 16, 1, 0, 0) != -1 or err()", "ptrace(PTRACE_ATTACH)"),
        ("libc.syscall(250, 0, b'user', b'x', 0, 0) != -1 or err()", "keyctl"),
        ("libc.syscall(321, 0, 0, 0) != -1 or err()", "bpf"),
        ("libc.personality(0x0040000) != -1 or err()", "personality(ADDR_NO_RANDOMIZE)"),
        ("libc.ioctl(0, 0x5412, b'x') != -1 or err()", "ioctl(TIOCSTI)"),
    ],
)
def test_the_seccomp_filter_denies_what_an_agent_never_needs(
    spec: SandboxSpec, call: str, why: str
) -> None:
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def err():\n"
        "    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))\n"
        f"{call}\n"
        "print('allowed')\n"
    )

    result = BwrapSandbox(spec).exec(["python3", "-c", script], ENV, 20)

    assert "allowed" not in result.stdout, why
    assert "Operation not permitted" in result.stderr, (why, result.stderr)
