"""The operator's commands against a real pool: task handles, status, tasks, result, logs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from claudebox_pool.producer.local_pool import logs_dir
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import REPO, claudebox_pool, wait_for

pytestmark = pytest.mark.usefixtures("pool")

TASK_LINE = re.compile(r"^task ([0-9a-f-]{36})$", re.MULTILINE)
UUID = re.compile(r"[0-9a-f-]{36}")


def task_id_of(stderr: str) -> str:
    found = TASK_LINE.search(stderr)
    assert found, stderr
    return found.group(1)


def detached(session_id: str, prompt: str) -> str:
    done = claudebox_pool("code", session_id, prompt, "--detach")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    assert UUID.fullmatch(task_id), done.stdout
    return task_id


def final_result(task_id: str, *options: str) -> subprocess.CompletedProcess[str]:
    """`result`, once the task has one (it exits 4 before)."""

    def ended() -> subprocess.CompletedProcess[str] | None:
        done = claudebox_pool("result", task_id, *options)
        return None if done.returncode == 4 else done

    found = wait_for(ended, 60, f"the result of task {task_id}")
    assert found is not None
    return found


def status() -> dict[str, Any]:
    done = claudebox_pool("status", "--json")
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def test_code_tells_its_task_id_first_and_result_reads_it_again(clean_state: object) -> None:
    done = claudebox_pool("code", "handle", "echo hi")

    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    assert done.stderr.splitlines()[0].startswith("task ")
    again = claudebox_pool("result", task_id_of(done.stderr))
    assert (again.returncode, again.stdout) == (0, "hi\n"), again.stderr


def test_result_of_a_failed_run_exits_1_and_json_is_the_whole_result(clean_state: object) -> None:
    task_id = task_id_of(claudebox_pool("code", "sad", "echo no >&2; exit 3").stderr)

    done = claudebox_pool("result", task_id)
    as_json = claudebox_pool("result", task_id, "--json")

    assert done.returncode == 1
    assert "exit code 3" in done.stderr
    assert json.loads(as_json.stdout)["success"] is False


def test_code_dash_reads_the_prompt_from_stdin(clean_state: object) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "code", "piped", "-"],
        input="echo from-stdin\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )

    assert (done.returncode, done.stdout) == (0, "from-stdin\n"), done.stderr


def test_detach_returns_at_once_and_logs_follow_the_run_to_its_end(clean_state: object) -> None:
    gate = get_settings().sessions_root / "detached" / "workspace" / "go"
    started = time.monotonic()
    task_id = detached("detached", "echo one; while [ ! -e go ]; do sleep 0.1; done; echo two")
    # It returned while the run waits for the gate it cannot pass alone.
    assert time.monotonic() - started < 60
    wait_for(lambda: "one" in claudebox_pool("logs", task_id).stdout, 60, "the first line")
    assert claudebox_pool("result", task_id).returncode == 4

    follower = subprocess.Popen(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "logs", "-f", task_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    gate.touch()
    stdout, stderr = follower.communicate(timeout=60)

    assert (follower.returncode, stdout) == (0, "one\ntwo\n"), stderr
    assert final_result(task_id).stdout == "one\ntwo\n"


def test_env_and_env_file_reach_the_agent_and_are_never_printed(
    clean_state: object, tmp_path: Path
) -> None:
    env_file = tmp_path / "run.env"
    env_file.write_text("# secrets\nA=file-a\nexport B='file-b'\n")

    done = claudebox_pool(
        "code", "envs", 'echo "$A $B" > seen', "--env-file", str(env_file), "-e", "B=flag-b"
    )

    assert done.returncode == 0, done.stderr
    seen = get_settings().sessions_root / "envs" / "workspace" / "seen"
    assert seen.read_text() == "file-a flag-b\n"
    assert "file-a" not in done.stdout + done.stderr
    assert "flag-b" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("content", "where"),
    [("A=1\n\nnot a pair\n", "run.env:3"), ("A=1\nB\n", "run.env:2: B has no '='")],
)
def test_a_bad_env_file_line_is_one_error_line_naming_it(
    tmp_path: Path, content: str, where: str
) -> None:
    env_file = tmp_path / "run.env"
    env_file.write_text(content)

    done = claudebox_pool("code", "x", "true", "--env-file", str(env_file))

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert where in done.stderr


def test_a_bad_env_pair_exits_2_without_its_value() -> None:
    done = claudebox_pool("code", "x", "true", "--env", "secret-value")

    assert done.returncode == 2
    assert "--env number 1" in done.stderr
    assert "secret-value" not in done.stderr


def test_an_unknown_agent_is_refused_with_the_choices() -> None:
    done = claudebox_pool("code", "x", "true", "--agent", "gpt")

    assert done.returncode == 2
    assert "'claude', 'shell'" in done.stderr


@pytest.mark.parametrize("verb", ["cancel", "result", "logs"])
def test_an_unknown_task_id_exits_2(verb: str) -> None:
    done = claudebox_pool(verb, "5f1c2a00-0000-0000-0000-000000000000")

    assert done.returncode == 2, done.stdout + done.stderr
    assert "No task '5f1c2a00-0000-0000-0000-000000000000' is known" in done.stderr


def test_cancel_json_says_whether_it_asked(clean_state: object) -> None:
    finished = task_id_of(claudebox_pool("code", "c", "true").stderr)
    sent = claudebox_pool("code", "c2", "sleep 60", "--detach", "--json")
    running = json.loads(sent.stdout)["task_id"]

    late = claudebox_pool("cancel", finished, "--json")
    asked = claudebox_pool("cancel", running, "--json")

    assert (late.returncode, json.loads(late.stdout)) == (
        1,
        {"task_id": finished, "cancelled": False},
    )
    assert (asked.returncode, json.loads(asked.stdout)) == (
        0,
        {"task_id": running, "cancelled": True},
    )

    stopped = final_result(running, "--json")
    assert (stopped.returncode, json.loads(stopped.stdout)["error"]) == (1, "cancelled")


def test_status_shows_slots_queues_and_the_running_task(clean_state: object) -> None:
    task_id = detached("watched", "sleep 60")

    def running() -> dict[str, Any] | None:
        now = status()
        return now if now["running"] else None

    now = wait_for(running, 60, "the task to run")
    claudebox_pool("cancel", task_id)
    assert now is not None

    (task,) = now["running"]
    assert (task["task_id"], task["session_id"], task["agent"]) == (task_id, "watched", "shell")
    assert task["age_s"] >= 0
    (worker,) = [w for w in now["workers"] if w["hostname"] == task["worker"]]
    assert (worker["state"], worker["busy"], worker["slots"]) == ("alive", 1, 2)
    assert {"queue": "claudebox", "depth": 0} in now["queues"]
    table = claudebox_pool("status")
    assert "slots busy" in table.stdout


def test_status_names_a_worker_that_stopped_answering(clean_state: redis.Redis) -> None:
    clean_state.zadd(keys.workers(), {"gone@nowhere": time.time() - 120})
    try:
        now = status()
    finally:
        clean_state.zrem(keys.workers(), "gone@nowhere")

    (gone,) = [w for w in now["workers"] if w["hostname"] == "gone@nowhere"]
    assert gone["state"] == "silent"
    assert gone["heartbeat_age_s"] >= 120


def test_tasks_lists_recent_tasks_by_session_and_state(clean_state: object) -> None:
    ok = task_id_of(claudebox_pool("code", "listed-a", "true").stderr)
    bad = task_id_of(claudebox_pool("code", "listed-a", "exit 1").stderr)
    other = task_id_of(claudebox_pool("code", "listed-b", "true").stderr)

    def listed(*filters: str) -> list[tuple[str, str]]:
        done = claudebox_pool("tasks", "--json", *filters)
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        return [(row["task_id"], row["state"]) for row in rows if row["name"] == "claudebox.code"]

    assert listed("--session", "listed-a") == [(bad, "failed"), (ok, "succeeded")]
    assert listed("--state", "failed") == [(bad, "failed")]
    assert listed("--session", "listed-b") == [(other, "succeeded")]
    assert len(claudebox_pool("tasks", "--json", "--limit", "1").stdout.splitlines()) == 1


def test_logs_of_a_worker_show_its_file_and_name_the_others() -> None:
    directory = logs_dir(get_settings())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "worker-1.log").write_text("[INFO/MainProcess] ready\n")
    try:
        by_host = claudebox_pool("logs", "--worker", "w1@somehost")
        unknown = claudebox_pool("logs", "--worker", "worker-9")
    finally:
        (directory / "worker-1.log").unlink()

    assert (by_host.returncode, by_host.stdout) == (0, "[INFO/MainProcess] ready\n")
    assert unknown.returncode == 2
    assert "there are: worker-1" in unknown.stderr


@pytest.mark.parametrize("verb", [["code"], ["submit"], ["status"], ["logs"], ["up"]])
def test_help_shows_flags_as_flags(verb: list[str]) -> None:
    done = claudebox_pool(*verb, "--help")

    assert done.returncode == 0
    assert "<bool>" not in done.stdout


def test_shell_completion_completes_commands() -> None:
    script = claudebox_pool("--show-completion", "bash", env={"SHELL": "/bin/bash"})
    completed = claudebox_pool(
        env={
            "_CLAUDEBOX_POOL_COMPLETE": "complete_bash",
            "COMP_WORDS": "claudebox-pool sta",
            "COMP_CWORD": "1",
        }
    )

    assert script.returncode == 0, script.stderr
    assert "_CLAUDEBOX_POOL_COMPLETE=complete_bash" in script.stdout
    assert "complete" in script.stdout and "claudebox-pool" in script.stdout
    assert completed.stdout.split() == ["status"], completed.stdout + completed.stderr


def test_doctor_json_is_the_report() -> None:
    done = claudebox_pool("doctor", "--json")

    report = json.loads(done.stdout)
    assert (done.returncode, report["ok"]) == (0, True), done.stderr
    checks = {check["name"]: check["status"] for check in report["checks"]}
    assert (checks["redis"], checks["workers"]) == ("ok", "ok")
    assert report["workers"][0]["runtime"] == "bwrap"


def test_piped_submit_prints_each_finished_job_and_progress_while_it_waits(
    clean_state: object, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    waiting = "for i in $(seq 600); do [ -e go ] && break; sleep 0.1; done; test -e go"
    lines = [
        {"id": "quick", "session_id": "piped-1", "prompt": "true"},
        {"id": "gated", "session_id": "piped-2", "prompt": waiting},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    gate = get_settings().sessions_root / "piped-2" / "workspace" / "go"
    submit = subprocess.Popen(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "submit", str(jobs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "CLAUDEBOX_PROGRESS_INTERVAL_S": "0.2"},
    )
    assert submit.stdout is not None
    seen = []
    for line in submit.stdout:
        seen.append(line)
        if line.startswith("progress: 1/2 jobs, 1 ok, 0 failed"):
            break
    gate.touch()
    rest, stderr = submit.communicate(timeout=120)

    assert submit.returncode == 0, stderr
    assert seen[-1].startswith("progress: 1/2 jobs"), seen
    assert any(line.startswith("ok quick (session piped-1, ") for line in seen), seen
    assert "ok gated (session piped-2, " in rest
    assert "batch summary" in rest


def test_status_lists_the_sandbox_a_worker_keeps_warm(clean_state: object) -> None:
    assert claudebox_pool("code", "kept-warm", "true").returncode == 0

    def warm() -> list[dict[str, Any]]:
        return [w for w in status()["warm"] if w["session_id"] == "kept-warm"]

    (held,) = wait_for(warm, 30, "the sandbox to be kept warm")
    (worker,) = [w for w in status()["workers"] if w["hostname"] == held["worker"]]
    assert worker["warm"] >= 1


def test_status_watch_in_a_pipe_prints_a_document_a_line_until_ctrl_c() -> None:
    watching = subprocess.Popen(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "status", "--watch", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert watching.stdout is not None
    readings = [json.loads(watching.stdout.readline()) for _ in range(2)]
    watching.send_signal(signal.SIGINT)
    _, stderr = watching.communicate(timeout=30)

    assert watching.returncode == 0, stderr
    assert [reading["slots"] for reading in readings] == [2, 2]
    assert readings[0]["at"] < readings[1]["at"]


def test_logs_follow_a_worker_log_as_it_grows_until_ctrl_c() -> None:
    directory = logs_dir(get_settings())
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "worker-2.log"
    log.write_text("first\n")
    following = subprocess.Popen(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "logs", "-f", "--worker", "worker-2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert following.stdout is not None
    try:
        first = following.stdout.readline()
        with log.open("a") as more:
            more.write("second\n")
        second = following.stdout.readline()
        following.send_signal(signal.SIGINT)
        _, stderr = following.communicate(timeout=30)
    finally:
        log.unlink()

    assert (first, second) == ("first\n", "second\n")
    assert following.returncode == 0, stderr
