"""The claudebox-pool command against a real pool: output, files, and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import claudebox_pool, free_port

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
