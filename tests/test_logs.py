"""What reaches the pool's logs: agent output only escaped, a record a line and marked as the
agent's; results never whole; JSON lines on request; `up`'s files rotated by size.

The pool tests run a real worker (bwrap sandbox, shell agent) on the session's Redis and read
the log file it wrote; the rotation test runs `claudebox-pool up --detach` with small files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudebox_pool import ClaudeBox
from claudebox_pool.producer.logfiles import RotatingLog, backup
from claudebox_pool.tasks.logs import (
    MAX_LINE_CHARS,
    SANDBOX_STDERR_LINES,
    OneLineFormatter,
    ResultsNotLogged,
    escape,
    sandbox_stderr,
)
from claudebox_pool.tasks.models import CodeResult
from tests.support.processes import RedisServer, Worker
from tests.test_local_pool import LocalPool, local_pool  # noqa: F401

FORGED = "[2026-12-06 10:00:00,000: ERROR/MainProcess] worker lost its mind"
SECRET = "sk-ant-api03-NOT-A-REAL-KEY-0123456789"
# Two ordinary lines, the forged one, an ANSI-coloured one, a carriage-return overwrite.
PRINTS = (
    "printf 'first line\\n%s\\n\\033[31mred alert\\033[0m\\nspinner\\rdone\\n' "
    f"'{FORGED}'; echo '{SECRET}'"
)
RECORD_START = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: [A-Z]+/")


def run_code(session_id: str, prompt: str) -> CodeResult:
    async def go() -> CodeResult:
        async with ClaudeBox(session_id=session_id) as box:
            return await box.code(prompt)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def debug_worker(
    pool_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    worker = Worker(pool_env, tmp_path_factory.mktemp("logs"), loglevel="DEBUG")
    worker.start()
    worker.wait_ready(redis_server.client())
    yield worker
    worker.stop()


# --- escaping, unit by unit -------------------------------------------------------------------


def test_escape_drops_ansi_and_escapes_line_breaks_and_other_controls() -> None:
    assert escape("a\x1b[31mred\x1b[0m\nb\rc\x00\u2028") == "ared\\nb\\rc\\x00\\u2028"


def test_escape_cuts_a_long_line_and_says_how_much_went() -> None:
    assert escape("x" * 10, limit=4) == "xxxx... [6 more chars]"


def test_a_traceback_is_indented_under_its_record_so_no_line_of_it_starts_a_record() -> None:
    formatter = OneLineFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/x] %(message)s"))
    try:
        raise RuntimeError(f"agent said:\n{FORGED}")
    except RuntimeError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info()
        )

    lines = formatter.format(record).split("\n")

    assert lines[0].endswith("failed: a\\nb")
    assert len(lines) > 2
    assert all(line.startswith("    ") for line in lines[1:])


def test_celerys_success_line_keeps_the_size_of_the_result_not_the_result() -> None:
    record = logging.LogRecord(
        "celery.app.trace",
        logging.INFO,
        __file__,
        1,
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
        ({"name": "claudebox.code", "id": "t1", "runtime": 0.5, "return_value": f"'{SECRET}'"},),
        None,
    )

    ResultsNotLogged().filter(record)

    assert record.getMessage() == (
        "Task claudebox.code[t1] succeeded in 0.5s: "
        f"<result of {len(SECRET) + 2} chars, not logged>"
    )


def test_a_sandboxs_own_stderr_is_logged_escaped_and_marked_up_to_a_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as sandbox:
        sandbox.write(f"bwrap: oops\n{FORGED}\x1b[0m\n".encode())
        sandbox.write(b"more\n" * SANDBOX_STDERR_LINES)

    with caplog.at_level(logging.WARNING, "claudebox_pool.sandbox"):
        sandbox_stderr("s1", os.fdopen(read_end, "rb"))

    messages = [record.getMessage() for record in caplog.records]
    assert messages[:2] == [
        "sandbox[session=s1] stderr: bwrap: oops",
        f"sandbox[session=s1] stderr: {FORGED}",
    ]
    assert len(messages) == SANDBOX_STDERR_LINES + 1
    assert messages[-1] == "sandbox[session=s1] stderr: more lines dropped"


# --- a real worker's log ----------------------------------------------------------------------


def test_agent_output_is_in_the_worker_log_one_escaped_marked_record_a_line(
    debug_worker: Worker, clean_state: object
) -> None:
    result = run_code("forger", PRINTS)

    assert FORGED in result.response  # the caller gets the output as printed
    log = debug_worker.log()
    agent_lines = [line for line in log.splitlines() if "agent[session=forger]" in line]
    assert len(agent_lines) == 5
    assert any(line.endswith(f"stdout: {FORGED}") for line in agent_lines)
    assert any(line.endswith("stdout: red alert") for line in agent_lines)
    assert any(line.endswith("stdout: spinner\\rdone") for line in agent_lines)
    # Whatever the agent printed is inside a worker record, never at the start of a line.
    assert not [line for line in log.splitlines() if line.startswith(FORGED[:24])]
    assert all(RECORD_START.match(line) for line in agent_lines)
    assert "\x1b" not in log
    assert "\r" not in log


def test_a_result_is_not_in_the_log_at_info(debug_worker: Worker, clean_state: object) -> None:
    # Made in the sandbox, so that the prompt (which Celery shows at DEBUG) does not hold it.
    result = run_code("secretive", f"printf 'sk-%s\\n' '{SECRET.removeprefix('sk-')}'")

    assert result.success
    log = debug_worker.log().splitlines()
    assert any(f"Task claudebox.code[{result.task_id}] succeeded" in line for line in log)
    assert any(line.endswith("not logged>") for line in log)
    # Only the agent's own line has it, at DEBUG: a worker run at INFO never writes it.
    assert [line for line in log if SECRET in line] == [
        line for line in log if SECRET in line and "DEBUG/" in line and "agent[session=" in line
    ]
    assert [line for line in log if SECRET in line]


def test_an_agent_line_past_the_cap_is_cut_in_the_log(
    debug_worker: Worker, clean_state: object
) -> None:
    run_code("long-liner", f"head -c {MAX_LINE_CHARS + 500} /dev/zero | tr '\\0' y; echo")

    lines = [
        line for line in debug_worker.log().splitlines() if "agent[session=long-liner]" in line
    ]
    assert len(lines) == 1
    assert lines[0].endswith("y... [500 more chars]")


# --- up's files -------------------------------------------------------------------------------


def test_a_rotating_log_keeps_whole_lines_and_at_most_its_backups(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    log = RotatingLog(path, max_bytes=100, backups=2)
    lines = [f"line {n:03}\n".encode() for n in range(100)]  # 9 bytes each
    for line in lines:
        log.write(line)
    log.close()

    files = [backup(path, 2), backup(path, 1), path]
    assert not backup(path, 3).exists()
    kept = b"".join(file.read_bytes() for file in files)
    assert kept.splitlines(keepends=True) == lines[-len(kept.splitlines()) :]
    assert all(file.stat().st_size <= 100 for file in files)
    assert len(kept.splitlines()) >= 2 * 11 + 1  # each full file holds 11 lines


def test_up_detach_writes_json_lines_and_rotates_them_without_losing_any(
    local_pool: LocalPool,  # noqa: F811
) -> None:
    local_pool.env |= {
        "CLAUDEBOX_LOG_FORMAT": "json",
        "CLAUDEBOX_LOG_MAX_BYTES": "4000",
        "CLAUDEBOX_LOG_BACKUPS": "50",
        "CLAUDEBOX_RUNTIME": "local",
    }
    jobs = local_pool.home / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps({"prompt": f"echo job {n}", "session_id": f"j{n}"}) + "\n" for n in range(20)
        )
    )

    started = local_pool.run("up", "--detach", "--workers", "1")
    submitted = local_pool.run("submit", str(jobs), "--results", str(local_pool.home / "out.jsonl"))
    stopped = local_pool.run("down")

    assert started.returncode == 0, started.stdout + started.stderr
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    logs = local_pool.home / ".claudebox" / "run" / "logs"
    log = logs / "worker-1.log"
    files = [backup(log, n) for n in range(50, 0, -1) if backup(log, n).exists()] + [log]
    assert len(files) >= 3, "the worker's log was not rotated"
    assert all(file.stat().st_size <= 4000 for file in files)
    # Every line of the pool's processes' files (beat's, Redis's too) is one JSON object; only
    # up.log, the supervisor's own few words, is plain text.
    for file in set(logs.iterdir()) - {logs / "up.log"}:
        assert all(json.loads(line) for line in file.read_text().splitlines()), file
    records = [json.loads(line) for file in files for line in file.read_text().splitlines()]
    # Every job's success line is there, once: nothing lost or repeated in rotation.
    succeeded = [
        record
        for record in records
        if record.get("task_name") == "claudebox.code" and "succeeded" in record["message"]
    ]
    assert len({record["task_id"] for record in succeeded}) == len(succeeded) == 20
    assert all(record["message"].endswith("not logged>") for record in succeeded)
