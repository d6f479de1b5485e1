"""What monitors are told of a failed agent run: one short line, never the output."""

from __future__ import annotations

from claudebox_pool.tasks.models import CodeResult
from claudebox_pool.workers.failed_runs import SUMMARY_CHARS, summary


def failed_run(error: str | None, exit_code: int = 1) -> CodeResult:
    return CodeResult(
        success=False,
        response="the answer so far",
        exit_code=exit_code,
        raw_output="every line it printed",
        error=error,
        duration_s=1.0,
        session_id="s",
    )


def test_the_summary_is_the_exit_code_and_the_reason_on_one_line() -> None:
    said = summary(failed_run("exit code 2: make: *** [all]\n  Error 2", exit_code=2))

    assert said == "agent exited 2: exit code 2: make: *** [all] Error 2"


def test_a_long_reason_is_cut_and_a_run_without_one_says_its_exit_code() -> None:
    long = summary(failed_run("x" * 10_000))

    assert len(long) == SUMMARY_CHARS and long.endswith("...")
    assert summary(failed_run(None, exit_code=137)) == "agent exited 137"
    assert "every line" not in long and "answer" not in long
