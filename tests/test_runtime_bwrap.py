"""The bwrap sandbox: what a command inside it can and cannot reach."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from claudebox_pool.workers.runtimes.base import ExecResult, LineSink, Mount, SandboxSpec
from claudebox_pool.workers.runtimes.bwrap import BwrapRuntime, bwrap_argv
from tests.support.sandboxes import owned

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root"}


@pytest.fixture
def spec(tmp_path: Path) -> SandboxSpec:
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    return owned(SandboxSpec("s1", workspace, home, cpus=1, memory_mib=256, disk_size_gb=1))


def run(
    spec: SandboxSpec,
    script: str,
    timeout_s: float = 20,
    on_line: LineSink | None = None,
    cancel: threading.Event | None = None,
) -> ExecResult:
    with BwrapRuntime().open(spec) as sandbox:
        return sandbox.exec(["sh", "-c", script], ENV, timeout_s, on_line, cancel)


def test_probe_says_bwrap_works_here() -> None:
    assert BwrapRuntime.probe().ok


def test_the_workspace_is_writable_at_slash_workspace(spec: SandboxSpec) -> None:
    result = run(spec, "pwd; echo data > made.txt")

    assert result.stdout == "/workspace\n"
    assert (spec.workspace / "made.txt").read_text() == "data\n"


def test_the_system_is_read_only(spec: SandboxSpec) -> None:
    result = run(spec, "touch /usr/bin/evil || touch /etc/evil || exit 0; exit 1")

    assert result.exit_code == 0
    assert not Path("/usr/bin/evil").exists()


def test_the_host_filesystem_outside_the_binds_is_invisible(spec: SandboxSpec) -> None:
    secret = spec.workspace.parent / "outside.txt"
    secret.write_text("host only")

    result = run(spec, f"cat {secret}")

    assert result.exit_code != 0
    assert "host only" not in result.stdout


def test_there_is_no_network_even_to_the_hosts_loopback(spec: SandboxSpec) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    probe = (
        'python3 -c "import socket; s=socket.socket(); s.settimeout(2); '
        f"s.connect(('127.0.0.1', {port}))\""
    )

    result = run(spec, probe)
    server.close()

    assert result.exit_code != 0
    assert "ConnectionRefused" in result.stderr


def test_environment_values_never_appear_on_the_bwrap_command_line(spec: SandboxSpec) -> None:
    argv = bwrap_argv(spec, ["env"])
    with BwrapRuntime().open(spec) as sandbox:
        result = sandbox.exec(["sh", "-c", "echo $TOKEN"], {**ENV, "TOKEN": "canary-42"}, 20)

    assert result.stdout == "canary-42\n"
    assert not any("canary-42" in part for part in argv)


def test_read_only_mounts_are_read_only(spec: SandboxSpec, tmp_path: Path) -> None:
    extra = tmp_path / "inputs"
    extra.mkdir()
    (extra / "data.csv").write_text("a,b\n")
    spec = SandboxSpec(**{**spec.__dict__, "mounts": (Mount(extra, "/inputs/data"),)})

    result = run(spec, "cat /inputs/data/data.csv && touch /inputs/data/x")

    assert result.stdout == "a,b\n"
    assert result.exit_code != 0
    assert not (extra / "x").exists()


def test_a_command_past_its_time_limit_is_killed_with_its_children(spec: SandboxSpec) -> None:
    result = run(spec, "sleep 60 & sleep 60", timeout_s=0.5)

    assert result.timed_out
    assert result.duration_s < 10


def test_cancel_stops_a_running_command(spec: SandboxSpec) -> None:
    cancel = threading.Event()
    lines: list[str] = []

    def on_line(stream: str, line: str) -> None:
        lines.append(line)
        cancel.set()

    result = run(spec, "echo started; sleep 60", on_line=on_line, cancel=cancel)

    assert result.cancelled
    assert lines == ["started"]


def test_large_output_on_both_pipes_does_not_deadlock(spec: SandboxSpec) -> None:
    script = "head -c 3000000 /dev/zero | tr '\\0' a; head -c 3000000 /dev/zero | tr '\\0' b >&2"

    result = run(spec, script)

    assert result.exit_code == 0
    assert len(result.stdout) == 3_000_000
    assert len(result.stderr) == 3_000_000


def test_the_sandbox_runs_as_its_own_pid_namespace(spec: SandboxSpec) -> None:
    result = run(spec, "ls /proc | grep -c '^[0-9]'")

    assert int(result.stdout) < 10
