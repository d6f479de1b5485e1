"""The claudebox-pool command against a real pool: output, files, and exit codes."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import claudebox_pool as package
from claudebox_pool.producer.cli import EXIT_CODES, exit_code_for
from claudebox_pool.tasks import errors, keys
from claudebox_pool.tasks.settings import CLAUDE_CLI_VERSION, get_settings
from tests.conftest import CLAUDE_CLI, WorkerFactory
from tests.support.processes import REPO, claudebox_pool, free_port, wait_for

pytestmark = pytest.mark.usefixtures("pool")


def test_code_creates_the_file_in_the_sessions_workspace(clean_state: object) -> None:
    done = claudebox_pool("code", "demo", "echo hi > hi.txt && cat hi.txt")

    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\n"
    hi = get_settings().sessions_root / "demo" / "workspace" / "hi.txt"
    assert hi.read_text() == "hi\n"


def test_code_continues_an_existing_session(clean_state: object) -> None:
    claudebox_pool("code", "again", "echo 1 > n.txt")

    done = claudebox_pool("code", "again", "cat n.txt")

    assert (done.returncode, done.stdout) == (0, "1\n")


def test_a_failing_agent_exits_1_with_its_error(clean_state: object) -> None:
    done = claudebox_pool("code", "fails", "echo broken >&2; exit 4")

    assert done.returncode == 1
    assert "exit code 4: broken" in done.stderr


def test_a_bad_session_id_exits_2_without_a_traceback(clean_state: object) -> None:
    done = claudebox_pool("code", "my project", "true")

    assert done.returncode == 2
    assert "Invalid session id 'my project'" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_redis_exits_3_and_says_where_it_looked() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    env = {"CLAUDEBOX_BROKER_URL": url, "CLAUDEBOX_RESULT_BACKEND": url}

    done = claudebox_pool("code", "x", "true", env=env)

    assert done.returncode == 3
    assert "cannot reach Redis" in done.stderr
    assert "hunter2" not in done.stderr


def readme_exit_codes() -> dict[str, int]:
    """Error class name -> exit code, as the README's exit code table lists them."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- exit-codes:start -->")[1].split("<!-- exit-codes:end -->")[0]
    listed = {}
    for row in table.splitlines()[2:]:
        code, _, names = row.strip("|").split("|")
        for name in re.findall(r"`(\w+Error)`", names):
            listed[name] = int(code)
    return listed


def test_every_error_exits_with_the_code_the_readme_lists() -> None:
    tree = [
        kind
        for _, kind in inspect.getmembers(errors, inspect.isclass)
        if issubclass(kind, errors.ClaudeBoxError) and kind is not errors.ClaudeBoxError
    ]
    listed = readme_exit_codes()

    assert {kind.__name__: exit_code_for(kind) for kind in tree} == {
        kind.__name__: listed.get(kind.__name__) for kind in tree
    }
    assert set(EXIT_CODES.values()) == {1, 2, 3, 4, 5}


def test_a_missing_argument_exits_2() -> None:
    done = claudebox_pool("code", "only-a-session")

    assert done.returncode == 2
    assert "Missing argument" in done.stderr


def test_a_worker_whose_runtime_cannot_run_exits_3() -> None:
    done = claudebox_pool("worker", env={"CLAUDEBOX_RUNTIME": "boxlite"})

    assert done.returncode == 3, done.stderr
    assert "runtime 'boxlite' cannot run here" in done.stderr


def test_a_corrupted_session_exits_4_and_says_how_to_remove_it(clean_state: object) -> None:
    assert claudebox_pool("code", "torn", "true").returncode == 0
    session_json = get_settings().sessions_root / "torn" / ".claudebox" / "session.json"
    session_json.write_text(session_json.read_text()[:20])

    done = claudebox_pool("code", "torn", "true")

    assert done.returncode == 4, done.stderr
    assert "Session 'torn' is corrupted" in done.stderr
    assert "claudebox-pool sessions cleanup torn --yes" in done.stderr


def test_a_task_whose_lock_was_taken_from_it_exits_5(clean_state: redis.Redis) -> None:
    """The pool failed the task (its lock was lost mid-run): not the user's mistake, not the
    agent's failure, not the session's state."""
    running = subprocess.Popen(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "code", "stolen", "sleep 2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = keys.session_lock("stolen")
    wait_for(lambda: clean_state.exists(lock), 30, "the task to hold its lock")
    clean_state.set(lock, "another-holder", px=30_000)

    _, stderr = running.communicate(timeout=60)

    assert running.returncode == 5, stderr
    assert "The lock on session 'stolen' was lost mid-task" in stderr


def test_json_output_is_the_whole_result(clean_state: object) -> None:
    done = claudebox_pool("code", "as-json", "echo out", "--json")

    result = json.loads(done.stdout)
    assert result["success"] is True
    assert result["session_id"] == "as-json"


def test_cleanup_without_a_terminal_refuses_unless_yes(clean_state: object) -> None:
    claudebox_pool("code", "doomed", "touch f")
    workspace = get_settings().sessions_root / "doomed"

    refused = claudebox_pool("sessions", "cleanup", "doomed")
    assert refused.returncode == 2
    assert workspace.exists()

    done = claudebox_pool("sessions", "cleanup", "doomed", "--yes")
    assert done.returncode == 0
    assert not workspace.exists()


def test_sessions_list_json_lists_every_session(clean_state: object) -> None:
    claudebox_pool("code", "listed-1", "true")
    claudebox_pool("code", "listed-2", "true")

    done = claudebox_pool("sessions", "list", "--json")

    ids = [json.loads(line)["session_id"] for line in done.stdout.splitlines()]
    assert ids == ["listed-1", "listed-2"]


def test_reindex_rebuilds_the_registry_from_disk(clean_state: object) -> None:
    claudebox_pool("code", "indexed", "true")
    client = clean_state
    for key in client.scan_iter("claudebox:sessions*"):  # type: ignore[attr-defined]
        client.delete(key)  # type: ignore[attr-defined]

    done = claudebox_pool("sessions", "reindex")

    assert done.returncode == 0, done.stderr
    assert "indexed 1 sessions" in done.stdout
    listed = claudebox_pool("sessions", "list", "--json")
    assert json.loads(listed.stdout)["session_id"] == "indexed"


def test_submit_runs_each_session_in_order_and_reports_failures(
    clean_state: object, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"id": f"{s}-{n}", "session_id": s, "prompt": f"echo {n} >> order.txt"}
        for s in ("b-1", "b-2")
        for n in range(5)
    ]
    lines.append({"id": "bad", "session_id": "b-3", "prompt": "exit 9"})
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    results = tmp_path / "results.jsonl"

    done = claudebox_pool("submit", str(jobs), "--results", str(results))

    assert done.returncode == 1
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(written) == 11
    assert [r["id"] for r in written if not r["success"]] == ["bad"]
    for session in ("b-1", "b-2"):
        order = get_settings().sessions_root / session / "workspace" / "order.txt"
        assert order.read_text().split() == ["0", "1", "2", "3", "4"]


def test_submit_names_the_line_of_a_bad_job(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "true"}\n{"session_id": "a b", "prompt": "true"}\n')

    done = claudebox_pool("submit", str(jobs))

    assert done.returncode == 2
    assert "jobs.jsonl:2" in done.stderr


@pytest.mark.parametrize(
    "verb",
    [
        [],
        ["worker"],
        ["beat"],
        ["flower"],
        ["code"],
        ["submit"],
        ["cancel"],
        ["sessions", "list"],
        ["up"],
    ],
)
def test_every_verb_has_help(verb: list[str]) -> None:
    done = claudebox_pool(*verb, "--help")

    assert done.returncode == 0
    assert "Usage" in done.stdout


def test_flower_refuses_to_start_without_credentials() -> None:
    done = claudebox_pool("flower", env={"CLAUDEBOX_FLOWER_BASIC_AUTH": ""})

    assert done.returncode == 2
    assert "CLAUDEBOX_FLOWER_BASIC_AUTH" in done.stderr


def test_version_prints_the_package_and_the_pinned_cli() -> None:
    done = claudebox_pool("--version")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"claudebox-pool {package.__version__} (Claude Code CLI {CLAUDE_CLI_VERSION} pinned)"
    )
    assert package.__version__ != "0+unknown"


@pytest.mark.parametrize("verb", [[], ["code"], ["sessions", "list"]])
def test_dash_h_is_help(verb: list[str]) -> None:
    done = claudebox_pool(*verb, "-h")

    assert done.returncode == 0, done.stderr
    assert done.stdout == claudebox_pool(*verb, "--help").stdout
    assert "Usage" in done.stdout


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused setting gives: exit code 2, no traceback, nothing else."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "verb",
    [
        ["doctor"],
        ["code", "x", "true"],
        ["sessions", "list"],
        ["worker"],
        ["beat"],
        ["up"],
        ["up", "--detach"],
    ],
    ids=" ".join,
)
def test_a_bad_value_in_the_environment_is_one_line_naming_it(verb: list[str]) -> None:
    done = claudebox_pool(*verb, env={"CLAUDEBOX_LOCK_TTL_S": "abc"})

    line = one_error_line(done)
    assert "CLAUDEBOX_LOCK_TTL_S='abc' (in the environment)" in line
    assert "valid integer" in line


def test_a_bad_line_in_dotenv_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CLAUDEBOX_CPUS=two\n")

    line = one_error_line(claudebox_pool("doctor", cwd=tmp_path))

    assert "CLAUDEBOX_CPUS='two' (in .env)" in line
    assert "valid integer" in line


def test_a_value_that_is_not_json_is_one_line_naming_it() -> None:
    done = claudebox_pool("doctor", env={"CLAUDEBOX_MODEL_PRICES": '{"opus": '})

    line = one_error_line(done)
    assert "CLAUDEBOX_MODEL_PRICES (in the environment): not valid JSON" in line


def test_help_and_version_work_with_a_bad_value(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CLAUDEBOX_RUNTIME=docker\n")

    for args in (["--help"], ["code", "--help"], ["-h"], ["--version"]):
        done = claudebox_pool(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""


def test_an_unknown_variable_is_warned_once_with_the_closest_name(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CLAUDEBOX_LOCKTTL=20\n")

    done = claudebox_pool("doctor", env={"CLAUDEBOX_MEMORY_MB": "512"}, cwd=tmp_path)

    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: CLAUDEBOX_LOCKTTL (in .env) is not a claudebox-pool setting; "
        "did you mean CLAUDEBOX_LOCK_TTL_S?",
        "warning: CLAUDEBOX_MEMORY_MB is not a claudebox-pool setting; "
        "did you mean CLAUDEBOX_MEMORY_MIB?",
    ]
    assert done.returncode == 0, done.stderr


def test_a_known_variable_is_not_warned_about() -> None:
    done = claudebox_pool("--version", env={"CLAUDEBOX_MEMORY_MIB": "512"})

    assert done.stderr == ""


def test_a_worker_logs_an_unknown_variable_once_at_start(start_workers: WorkerFactory) -> None:
    (worker,) = start_workers(1, concurrency=1, CLAUDEBOX_SWEEP_AGE_DAYS="3")
    worker.stop()

    warned = re.findall(r"WARNING.*CLAUDEBOX_SWEEP_AGE_DAYS.*", worker.log())
    assert len(warned) == 1, worker.log()[-3000:]
    assert "did you mean CLAUDEBOX_SWEEP_MAX_AGE_DAYS?" in warned[0]


def cli_package(root: Path, engine: str) -> Path:
    """An npm install of a CLI whose package declares ``engine``; returns its bin link."""
    package_dir = root / "node_modules" / "@anthropic-ai" / "claude-code"
    (package_dir / "bin").mkdir(parents=True)
    manifest = {
        "name": "@anthropic-ai/claude-code",
        "version": "9.9.9",
        "engines": {"node": engine},
    }
    (package_dir / "package.json").write_text(json.dumps(manifest))
    binary = package_dir / "bin" / "claude.exe"
    binary.write_text("#!/bin/sh\necho '9.9.9 (Claude Code)'\n")
    binary.chmod(0o755)
    link = root / "node_modules" / ".bin" / "claude"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "@anthropic-ai" / "claude-code" / "bin" / "claude.exe")
    return link


def doctor_node_line(cli: Path | str) -> tuple[int, str]:
    done = claudebox_pool("doctor", env={"CLAUDEBOX_CLAUDE_CLI": str(cli)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("node ")]
    assert len(lines) == 1, done.stdout
    return done.returncode, " ".join(lines[0].split())


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="no node on PATH")


@needs_node
def test_doctor_warns_when_node_is_older_than_the_clis_engine(tmp_path: Path) -> None:
    code, line = doctor_node_line(cli_package(tmp_path, ">=999.0.0"))

    assert code == 0  # a warning, not a failure
    assert line.startswith("node warn v")
    assert "but Claude Code 9.9.9 declares >=999.0.0" in line
    assert "the CLI runs here but is unsupported" in line
    assert "install a Node.js in that range" in line


@needs_node
def test_doctor_is_content_when_node_meets_the_clis_engine(tmp_path: Path) -> None:
    code, line = doctor_node_line(cli_package(tmp_path, "^1.0.0 || >=2"))

    assert code == 0
    assert line.startswith("node ok v")
    assert line.endswith("Claude Code 9.9.9 declares ^1.0.0 || >=2")


@needs_node
def test_doctor_checks_node_against_the_pinned_cli() -> None:
    if not Path(CLAUDE_CLI).exists():
        pytest.skip("the pinned Claude Code CLI is not installed (claudebox-pool install-cli)")
    manifest = Path(CLAUDE_CLI).resolve().parents[1] / "package.json"
    engine = json.loads(manifest.read_text())["engines"]["node"]

    code, line = doctor_node_line(CLAUDE_CLI)

    assert code == 0
    assert f"Claude Code {CLAUDE_CLI_VERSION} declares {engine}" in line
