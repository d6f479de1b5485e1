"""The keeper of warm sandboxes, in this process: real bwrap sandboxes, a real redis-server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path

import pytest
import redis

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers.runtimes.base import Runtime, SandboxSpec
from claudebox_pool.workers.runtimes.bwrap import BwrapRuntime, BwrapSandbox
from claudebox_pool.workers.runtimes.local import LocalRuntime
from claudebox_pool.workers.warm import client as warm_client
from claudebox_pool.workers.warm.client import KeeperClient
from claudebox_pool.workers.warm.keeper import Keeper
from claudebox_pool.workers.warm.sandbox import KeptRuntime, WarmSandbox
from tests.support.processes import RedisServer, wait_for
from tests.support.sandboxes import SANDBOX_ID, owned, processes_naming, sandboxes_of

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
HOSTNAME = "keeper@test"


@pytest.fixture
def make_keeper(
    redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[list[Keeper], redis.Redis]]:
    started: list[Keeper] = []
    yield started, redis_server.client()
    for keeper in started:
        keeper.close()
    warm_client.set_address(None)


def start(
    made: tuple[list[Keeper], redis.Redis],
    held: Callable[[], Runtime] | None = None,
    **settings: int,
) -> Keeper:
    """A keeper of bwrap sandboxes running the exec server, or holding ``held``'s sandboxes."""
    started, client = made
    command = BwrapRuntime.warm_command() if held is None else None
    assert held is not None or command is not None, "no Python under /usr for the exec server"
    keeper = Keeper(
        Settings(**settings),  # type: ignore[arg-type]
        HOSTNAME,
        client,
        lambda hostname, session_id: True,
        lambda hostname: None,
        command=command,
        held=held,
    ).start()
    started.append(keeper)
    warm_client.set_address(keeper.address)
    return keeper


def spec_for(tmp_path: Path, session_id: str) -> SandboxSpec:
    workspace, home = tmp_path / session_id / "workspace", tmp_path / session_id / "home"
    workspace.mkdir(parents=True)
    home.mkdir()
    return owned(SandboxSpec(session_id, workspace, home, cpus=1, memory_mib=512, disk_size_gb=1))


def run(runtime: BwrapRuntime, spec: SandboxSpec, command: str, timeout_s: float = 10) -> str:
    with runtime.open(spec) as sandbox:
        assert isinstance(sandbox, WarmSandbox)
        result = sandbox.exec(["sh", "-c", command], ENV, timeout_s)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def test_a_sandbox_idle_past_its_time_is_stopped_and_forgotten(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    keeper = start(make_keeper, warm_idle_s=1)
    spec = spec_for(tmp_path, "idle")
    run(BwrapRuntime(), spec, "true")
    assert make_keeper[1].get(keys.warm("idle")) == HOSTNAME.encode()
    assert len(sandboxes_of(spec.workspace)) == 1

    wait_for(lambda: not sandboxes_of(spec.workspace), 5, "the idle sandbox to stop")

    assert keeper.sessions() == []
    assert make_keeper[1].get(keys.warm("idle")) is None


def test_a_sandbox_leased_by_a_process_that_died_is_stopped_with_its_command(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    keeper = start(make_keeper, warm_idle_s=60)
    spec = spec_for(tmp_path, "lessee")
    marker = "31.4159265"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from claudebox_pool.workers.runtimes.base import SandboxSpec\n"
        "from claudebox_pool.workers.warm.client import KeeperClient\n"
        "from tests.support.sandboxes import owned\n"
        "spec = owned(SandboxSpec('lessee', Path(sys.argv[2]), Path(sys.argv[3]), 1, 512, 1))\n"
        "control = KeeperClient(Path(sys.argv[1])).acquire(spec)\n"
        "from claudebox_pool.workers.runtimes.exec_server import send_frame\n"
        "import os\n"
        "r, w = os.pipe(); send_frame(control, {'argv': ['sleep', sys.argv[4]], "
        "'env': {'PATH': '/usr/bin:/bin'}, 'cwd': '/workspace'}, [w, w])\n"
        "os._exit(0)\n"
    )
    # A task's process that takes the sandbox, starts a command, and dies without a release.
    subprocess.run(
        [sys.executable, "-c", script, str(keeper.address), spec.workspace, spec.home, marker],
        check=True,
        cwd=Path(__file__).parent.parent,
        timeout=30,
    )

    wait_for(lambda: not processes_naming(marker), 5, "the orphaned command to be killed")
    wait_for(lambda: keeper.sessions() == [], 5, "the keeper to stop the orphaned sandbox")


def test_past_the_limit_the_longest_idle_sandbox_is_stopped(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    keeper = start(make_keeper, warm_idle_s=60, warm_max=2)
    runtime = BwrapRuntime()
    specs = [spec_for(tmp_path, name) for name in ("oldest", "middle", "newest")]
    for spec in specs:
        run(runtime, spec, "true")

    assert keeper.sessions() == ["middle", "newest"]
    assert sandboxes_of(specs[0].workspace) == {}
    assert keeper.created == 3


def test_another_shape_gets_another_sandbox_and_the_same_shape_the_same(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    keeper = start(make_keeper, warm_idle_s=60)
    runtime = BwrapRuntime()
    spec = spec_for(tmp_path, "shaped")
    first = run(runtime, spec, SANDBOX_ID)
    same = run(runtime, spec, SANDBOX_ID)
    wider = SandboxSpec(**{**spec.__dict__, "cpus": 2})
    other = run(runtime, wider, SANDBOX_ID)

    assert first == same != other
    assert keeper.created == 2
    assert len(sandboxes_of(spec.workspace)) == 1


def test_nothing_a_command_starts_outlives_it_in_a_warm_sandbox(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    start(make_keeper, warm_idle_s=60)
    runtime = BwrapRuntime()
    spec = spec_for(tmp_path, "stragglers")
    marker = "27.1828182"
    run(runtime, spec, f"setsid sleep {marker} > /dev/null 2>&1 & echo started")

    assert processes_naming(marker) == {}
    # Left in the sandbox: its reaper, the exec server, and the shell counting them (the killed
    # straggler may stay a zombie for a moment, until the reaper collects it).
    wait_for(
        lambda: run(runtime, spec, "set -- /proc/[0-9]*; echo $#") == "3",
        5,
        "the sandbox to hold only its reaper, exec server and the counting shell",
    )


def test_a_deadline_and_a_cancel_kill_the_command_and_the_sandbox_serves_on(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    keeper = start(make_keeper, warm_idle_s=60)
    runtime = BwrapRuntime()
    spec = spec_for(tmp_path, "stopped")
    with runtime.open(spec) as sandbox:
        started = time.monotonic()
        timed = sandbox.exec(["sh", "-c", "echo begun; sleep 30"], ENV, 0.5)
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        cancelled = sandbox.exec(["sleep", "30"], ENV, 30, cancel=cancel)
        elapsed = time.monotonic() - started

    assert timed.timed_out and timed.exit_code < 0 and timed.stdout == "begun\n"
    assert cancelled.cancelled and cancelled.exit_code < 0
    assert elapsed < 5
    assert run(runtime, spec, "echo still here") == "still here"
    assert keeper.created == 1


def test_without_a_reachable_keeper_the_sandbox_is_cold(tmp_path: Path) -> None:
    warm_client.set_address(tmp_path / "nobody.sock")
    try:
        runtime = BwrapRuntime()
        spec = spec_for(tmp_path, "cold")
        with runtime.open(spec) as sandbox:
            result = sandbox.exec(["echo", "cold"], ENV, 10)
    finally:
        warm_client.set_address(None)

    assert isinstance(sandbox, BwrapSandbox)
    assert result.stdout == "cold\n"


def test_a_held_runtime_keeps_each_sessions_sandbox_open_and_serves_it_itself(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    # boxlite is held this way (one runtime per worker, in its main process); it cannot boot
    # here, so the local runtime stands in: what is tested is the keeper's side.
    keeper = start(make_keeper, held=LocalRuntime, warm_idle_s=60)
    runtime = KeptRuntime(LocalRuntime, KeeperClient(keeper.address), Settings())
    spec = spec_for(tmp_path, "held")
    lines: list[tuple[str, str]] = []
    with runtime.open(spec) as sandbox:
        first = sandbox.exec(
            ["sh", "-c", "pwd; echo oops >&2; exit 3"],
            ENV,
            10,
            on_line=lambda stream, line: lines.append((stream, line)),
        )
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        cancelled = sandbox.exec(["sleep", "30"], ENV, 30, cancel=cancel)
        timed = sandbox.exec(["sleep", "30"], ENV, 0.5)
    with runtime.open(spec) as sandbox:
        again = sandbox.exec(["echo", "again"], ENV, 10)

    assert (first.exit_code, first.stdout, first.stderr) == (3, f"{spec.workspace}\n", "oops\n")
    assert sorted(lines) == [("stderr", "oops"), ("stdout", str(spec.workspace))]
    assert cancelled.cancelled and timed.timed_out
    assert again.stdout == "again\n"
    assert keeper.created == 1
    assert runtime.kept() == ["held"]
    assert runtime.remove("held") is True
    assert runtime.kept() == []


PROMPT_SIZED = bytes(range(256)) * 4096
"""A megabyte of every byte value: stdin carries bytes, not only text, and no argv could."""
DIGEST = ["sha256sum"]
DIGESTED = f"{sha256(PROMPT_SIZED).hexdigest()}  -\n"


def test_stdin_of_a_megabyte_reaches_a_warm_command_and_one_that_reads_none_costs_nothing(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    keeper = start(make_keeper, warm_idle_s=60)
    runtime = BwrapRuntime()
    spec = spec_for(tmp_path, "fed")
    with runtime.open(spec) as sandbox:
        ignored = sandbox.exec(["true"], ENV, 10, stdin=PROMPT_SIZED)
        read = sandbox.exec(DIGEST, ENV, 10, stdin=PROMPT_SIZED)
        empty = sandbox.exec(["cat"], ENV, 10)

    assert ignored.exit_code == 0
    assert read.stdout == DIGESTED
    assert (empty.exit_code, empty.stdout) == (0, "")
    assert keeper.created == 1


def test_stdin_of_a_megabyte_reaches_a_cold_command(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "cold-fed")
    with BwrapSandbox(spec) as sandbox:
        read = sandbox.exec(DIGEST, ENV, 10, stdin=PROMPT_SIZED)

    assert read.stdout == DIGESTED


def test_stdin_of_a_megabyte_reaches_a_command_of_a_held_sandbox(
    make_keeper: tuple[list[Keeper], redis.Redis], tmp_path: Path
) -> None:
    keeper = start(make_keeper, held=LocalRuntime, warm_idle_s=60)
    runtime = KeptRuntime(LocalRuntime, KeeperClient(keeper.address), Settings())
    with runtime.open(spec_for(tmp_path, "held-fed")) as sandbox:
        read = sandbox.exec(DIGEST, ENV, 10, stdin=PROMPT_SIZED)

    assert read.stdout == DIGESTED
