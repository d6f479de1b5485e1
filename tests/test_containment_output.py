"""Output floods from inside a sandbox, against a real pool: every byte that leaves is bounded.

The attacks of issue 14 ("Output"), sized for a 2-core CI: one 100 MB stdout line, 32 MB as
16 KB lines, a 30 MB stderr line, 5,000 new files. Each run goes through a real worker (bwrap
sandbox, warm exec server) with small caps, and the checks read what it left behind: the
result, the Redis keys (result and live stream), history.jsonl, the pool child's peak memory.
The cold path (a host process per command) is measured in a fresh interpreter of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from claudebox_pool import ClaudeBox
from claudebox_pool.producer.local_pool import _redis_argv, _with_generated_password
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.models import CodeResult
from claudebox_pool.tasks.settings import Settings, get_settings
from claudebox_pool.workers import caps
from claudebox_pool.workers.runtimes.output import OutputLimits, cut_marker
from claudebox_pool.workers.runtimes.supervise import LoopThread, Output, supervise
from claudebox_pool.workers.workspace_scan import Created
from tests.conftest import CLAUDE_CLI, WorkerFactory
from tests.support.model_server import ModelServer, Text
from tests.support.processes import REPO, Worker, free_port, wait_for

MB = 1_000_000
CAPS = {
    "CLAUDEBOX_MAX_LINE_BYTES": "100000",
    "CLAUDEBOX_MAX_RESPONSE_BYTES": "50000",
    "CLAUDEBOX_MAX_ERROR_BYTES": "20000",
    "CLAUDEBOX_MAX_OUTPUT_BYTES": "200000",
    "CLAUDEBOX_MAX_FILES_LISTED": "100",
    "CLAUDEBOX_MAX_FILES_LISTED_BYTES": "2000",
    "CLAUDEBOX_STREAM_MAX_BYTES": "300000",
    "CLAUDEBOX_MAX_RESULT_BYTES": "150000",
}
MARKER_ROOM = 100
"""Bytes a cut marker may add beyond its cap."""
CELERY_META_ROOM = 2000
"""What Celery's result record adds around the result itself (status, task id, dates)."""
PEAK_RSS_BOUND_KB = 150_000
"""A pool child's peak resident memory after the floods: it was 0.6 to 1.1 GB for one 200 MB
line; a child of this worker peaked at 81 MB here."""


def line_of(size: int, char: str = "a") -> str:
    return f"head -c {size} /dev/zero | tr '\\0' {char}"


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


@pytest.fixture(scope="module")
def capped_pool(start_workers: WorkerFactory, model: ModelServer) -> Worker:
    (worker,) = start_workers(
        1,
        concurrency=2,
        CLAUDEBOX_MODEL_API_URL=model.url,
        CLAUDEBOX_ANTHROPIC_API_KEY="sk-ant-test-output-caps",
        **CAPS,
    )
    return worker


pytestmark = pytest.mark.usefixtures("capped_pool", "clean_state")


def run(session_id: str, prompt: str) -> tuple[CodeResult, float]:
    async def scenario() -> tuple[CodeResult, float]:
        async with ClaudeBox(session_id=session_id) as box:
            started = time.monotonic()
            result = await box.code(prompt)
            return result, time.monotonic() - started

    return asyncio.run(scenario())


def size(text: str | None) -> int:
    return len((text or "").encode())


def stored_result_bytes(client: redis.Redis, task_id: str) -> int:
    return int(client.strlen(app.backend.get_key_for_task(task_id)))


def stream_text_bytes(client: redis.Redis, task_id: str) -> tuple[int, list[dict[str, object]]]:
    """The bytes of the task's live stream entries as stored, and its events."""
    raw = [fields[b"e"] for _, fields in client.xrange(keys.task_output(task_id)) or [] if fields]
    return sum(len(value) for value in raw), [json.loads(value) for value in raw]


def history_lines(session_id: str) -> list[bytes]:
    path = get_settings().sessions_root / session_id / ".claudebox" / "history.jsonl"
    return path.read_bytes().splitlines()


def peak_rss_kb_of_pool_children(worker: Worker) -> list[int]:
    """VmHWM of each pool process of ``worker`` (its children running Python, not bwrap)."""
    assert worker.proc is not None
    peaks = []
    for task in Path(f"/proc/{worker.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if os.readlink(f"/proc/{child}/exe") != os.readlink(f"/proc/{worker.proc.pid}/exe"):
                continue
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]))
    return peaks


def test_a_100_mb_stdout_line_is_cut_as_read_and_another_session_still_gets_its_result(
    capped_pool: Worker, clean_state: redis.Redis
) -> None:
    async def scenario() -> tuple[CodeResult, float, CodeResult]:
        async with ClaudeBox(session_id="flood") as flood, ClaudeBox(session_id="calm") as calm:
            started = time.monotonic()
            flooded = asyncio.ensure_future(flood.code(f"{line_of(100 * MB)}; echo; echo end"))
            quiet = await calm.code("echo calm")
            result = await flooded
            return result, time.monotonic() - started, quiet

    result, elapsed_s, quiet = asyncio.run(scenario())

    assert quiet.success and quiet.response == "calm\n"
    assert result.success, result.error
    assert result.response.startswith("aaa")
    assert "bytes cut by CLAUDEBOX_MAX_RESPONSE_BYTES" in result.response
    assert size(result.response) <= 50_000 + MARKER_ROOM
    assert "99,900,000 bytes cut by CLAUDEBOX_MAX_LINE_BYTES" in result.raw_output
    assert result.raw_output.endswith("end\n")
    # The line (100 KB) and the response (50 KB) are over the result's 150 KB with room to
    # spare only after raw_output gave way.
    assert "cut by CLAUDEBOX_MAX_RESULT_BYTES" in result.raw_output
    assert stored_result_bytes(clean_state, result.task_id) <= 150_000 + CELERY_META_ROOM
    assert max(len(line) for line in history_lines("flood")) < 40_000
    # Read linearly: 100 MB took 120 s for 128 MB before (quadratic); a sandbox start and
    # the run on a loaded 2-core machine fit well within this.
    assert elapsed_s < 30
    assert max(peak_rss_kb_of_pool_children(capped_pool)) < PEAK_RSS_BOUND_KB


def test_many_long_lines_stop_the_live_stream_at_its_byte_cap(clean_state: redis.Redis) -> None:
    # 2,000 lines of 16 KB: 32 MB, each line under the line cap.
    result, _ = run("lines", f'yes "$({line_of(16_383, "x")})" | head -n 2000; echo last')

    assert result.success, result.error
    # The response is stdout's tail, which starts by saying how much came before it.
    assert result.response.startswith("[... ")
    assert "bytes cut by CLAUDEBOX_MAX_OUTPUT_BYTES ...]\nxxx" in result.response
    assert result.raw_output.endswith("last\n")
    stream_bytes, events = stream_text_bytes(clean_state, result.task_id)
    # What the stream counts is the events' text (16,000 characters a line, shortened for
    # watching) plus a fixed overhead each; entries carry their JSON keys beyond that.
    assert stream_bytes < 300_000 + 20 * 200
    texts = [str(event.get("text", "")) for event in events]
    assert any("live output stops here" in text for text in texts)
    assert any("bytes cut by CLAUDEBOX_STREAM_MAX_BYTES" in text for text in texts)
    assert events[-1]["kind"] == "end" and events[-1]["success"] is True
    assert int(clean_state.memory_usage(keys.task_output(result.task_id)) or 0) < 1 * MB


def test_a_30_mb_stderr_line_is_cut_in_error_history_and_result(clean_state: redis.Redis) -> None:
    result, _ = run("stderr", f"{line_of(30 * MB, 'e')} >&2; exit 3")

    assert not result.success and result.exit_code == 3
    assert result.error is not None and result.error.startswith("exit code 3: eee")
    assert "bytes cut by CLAUDEBOX_MAX_ERROR_BYTES" in result.error
    assert size(result.error) <= 20_000 + MARKER_ROOM
    assert "29,900,000 bytes cut by CLAUDEBOX_MAX_LINE_BYTES" in result.raw_output
    assert stored_result_bytes(clean_state, result.task_id) <= 150_000 + CELERY_META_ROOM
    code_line = next(line for line in history_lines("stderr") if b"code_execution" in line)
    assert len(code_line) < 20_000 + 2_000


def test_files_created_lists_up_to_its_cap_and_counts_them_all() -> None:
    result, _ = run("files", "mkdir many && cd many && seq 5000 | xargs touch")

    assert result.success, result.error
    assert len(result.files_created) == 101
    assert result.files_created[-1] == (
        "[... 4,900 more files cut by CLAUDEBOX_MAX_FILES_LISTED ...]"
    )
    assert all(name.startswith("many/") for name in result.files_created[:-1])
    root = get_settings().sessions_root / "files" / ".claudebox"
    record = json.loads((root / "session.json").read_text())
    assert record["total_files_created"] == 5000
    created = [line for line in history_lines("files") if b'"file_created"' in line]
    assert len(created) == 100


needs_cli = pytest.mark.skipif(
    not Path(CLAUDE_CLI).exists(),
    reason="needs the Claude Code CLI from the npm registry (scripts/setup installs it)",
)


def claude(session_id: str, prompt: str) -> CodeResult:
    async def scenario() -> CodeResult:
        async with ClaudeBox(session_id=session_id, agent="claude") as box:
            return await box.code(prompt)

    return asyncio.run(scenario())


@needs_cli
def test_a_long_claude_answer_is_cut_to_the_response_cap(model: ModelServer) -> None:
    model.reset()
    model.push([Text("w" * 60_000)])

    result = claude("long-answer", "say a lot")

    assert result.success, result.error
    assert result.response.startswith("www")
    assert result.response.endswith("bytes cut by CLAUDEBOX_MAX_RESPONSE_BYTES ...]")
    assert size(result.response) <= 50_000 + MARKER_ROOM


@needs_cli
def test_a_claude_answer_over_the_line_cap_fails_naming_the_setting(model: ModelServer) -> None:
    model.reset()
    model.push([Text("w" * 300_000)])

    result = claude("huge-answer", "say far too much")

    assert not result.success
    assert "over CLAUDEBOX_MAX_LINE_BYTES" in (result.error or "")
    assert size(result.raw_output) <= 200_000 + MARKER_ROOM


def test_the_cold_path_reads_a_100_mb_line_in_linear_time_and_bounded_memory(
    tmp_path: Path,
) -> None:
    script = f"""
import json, time
from collections.abc import Iterator
from pathlib import Path
from claudebox_pool.workers.runtimes.base import SandboxSpec
from claudebox_pool.workers.runtimes.bwrap import BwrapRuntime
from tests.support.sandboxes import owned
ws, home = Path({str(tmp_path)!r}) / "ws", Path({str(tmp_path)!r}) / "home"
ws.mkdir(); home.mkdir()
spec = owned(SandboxSpec("cold", ws, home, cpus=1, memory_mib=256, disk_size_gb=1))
lines = []
started = time.monotonic()
with BwrapRuntime().open(spec) as sandbox:
    done = sandbox.exec(["sh", "-c", {line_of(100 * MB) + "; echo; echo end"!r}],
                        {{"PATH": "/usr/bin:/bin"}}, 60, lambda s, l: lines.append(len(l)))
elapsed = time.monotonic() - started
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print(json.dumps({{"s": elapsed, "hwm": int(hwm), "lines": lines, "out": len(done.stdout)}}))
"""
    env = {**os.environ, "CLAUDEBOX_MAX_LINE_BYTES": "100000"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    assert measured["s"] < 10
    assert measured["hwm"] < 100_000  # KB: the interpreter and its imports, no 100 MB line
    assert measured["lines"] == [100_000 + len(cut_marker(99_900_000, "max_line_bytes")), 3]
    assert measured["out"] < 101_000


def test_the_vm_path_cuts_a_long_line_as_its_chunks_arrive() -> None:
    """boxlite hands output over in chunks on its event loop: 10 MB of one line, 64 KB a time."""
    chunk, chunks = b"v" * 65_536, 160

    async def command(output: Output, stop: asyncio.Event) -> int:
        for _ in range(chunks):
            output.put("stdout", chunk)
        output.put("stdout", "\nend\n")
        output.end("stdout")
        output.end("stderr")
        return 0

    loop = LoopThread()
    try:
        started = time.monotonic()
        result = supervise(loop, command, 30, limits=OutputLimits(line_bytes=1000, tail_bytes=5000))
        elapsed_s = time.monotonic() - started
    finally:
        loop.close()

    cut = len(chunk) * chunks - 1000
    assert result.stdout == "v" * 1000 + cut_marker(cut, "max_line_bytes") + "\nend\n"
    assert elapsed_s < 5


# --- caps on their own ---------------------------------------------------------------------


def test_a_result_over_its_size_gives_up_raw_output_then_response() -> None:
    settings = Settings(max_result_bytes=5000)
    result = CodeResult(
        success=True,
        response="r" * 4000,
        exit_code=0,
        raw_output="o" * 4000,
        duration_s=0.1,
        session_id="s",
    )

    fitted = caps.fit(result, settings)

    assert len(fitted.model_dump_json().encode()) <= 5000
    assert fitted.response == "r" * 4000
    assert fitted.raw_output.startswith("[... ") and fitted.raw_output.endswith("o" * 500)
    assert "cut by CLAUDEBOX_MAX_RESULT_BYTES" in fitted.raw_output


def test_control_bytes_that_json_escapes_sixfold_still_fit_the_result() -> None:
    settings = Settings(max_result_bytes=5000)
    result = CodeResult(
        success=True,
        response="\0" * 3000,
        exit_code=0,
        raw_output="\0" * 3000,
        duration_s=0.1,
        session_id="s",
    )

    assert len(caps.fit(result, settings).model_dump_json().encode()) <= 5000


def test_files_past_the_byte_cap_are_named_by_their_setting() -> None:
    settings = Settings(max_files_listed=100, max_files_listed_bytes=30)
    listed = caps.files_listed(Created(listed=["a" * 10, "b" * 10], count=7), settings)

    assert listed == [
        "a" * 10,
        "b" * 10,
        "[... 5 more files cut by CLAUDEBOX_MAX_FILES_LISTED_BYTES ...]",
    ]


# --- the Redis that holds it all -----------------------------------------------------------


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_the_redis_that_up_starts_has_maxmemory_with_noeviction(tmp_path: Path) -> None:
    port = free_port()
    settings = _with_generated_password(
        Settings(
            home=tmp_path,
            broker_url=f"redis://127.0.0.1:{port}/0",
            redis_maxmemory_bytes=123 * MB,
        )
    )
    server = subprocess.Popen(
        _redis_argv(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        client = redis.Redis.from_url(settings.broker_url)
        wait_for(lambda: answers(client), 10, "the Redis of up to answer")
        config = client.config_get("maxmemory*")
    finally:
        server.terminate()
        server.wait(10)

    assert config["maxmemory"] == str(123 * MB)
    assert config["maxmemory-policy"] == "noeviction"


def test_compose_and_kubernetes_give_redis_maxmemory_with_noeviction() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    command = " ".join(compose["services"]["redis"]["command"])
    k8s = next(
        doc
        for doc in yaml.safe_load_all((REPO / "deploy" / "k8s" / "base" / "redis.yaml").read_text())
        if doc and doc["kind"] == "StatefulSet"
    )
    container = k8s["spec"]["template"]["spec"]["containers"][0]
    k8s_command = " ".join(container["command"])

    assert "--maxmemory-policy noeviction" in command and "--maxmemory " in command
    assert "--maxmemory-policy noeviction" in k8s_command
    assert "--maxmemory 1536mb" in k8s_command
    assert container["resources"]["limits"]["memory"] == "2Gi"  # the 3/4 rule of the README
