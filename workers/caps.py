"""The caps on what a ``code`` task records and returns, each from a setting, each marked.

Output reaches here already read in bounded lines and tails (:mod:`workers.runtimes.output`);
these caps bound each field of the result and of its history entry, then the result as a
whole, before anything is written to disk or Redis. Every cut leaves a marker naming the
setting that made it, so that a reader knows text is missing and what to raise.
"""

from __future__ import annotations

import dataclasses

from claudebox_pool.tasks.models import CodeResult
from claudebox_pool.tasks.settings import Settings
from claudebox_pool.workers.agents.base import AgentOutcome
from claudebox_pool.workers.runtimes.output import cut_marker
from claudebox_pool.workers.workspace_scan import Created


def head(text: str, limit: int, setting: str) -> str:
    """``text``'s first ``limit`` bytes, then a marker if more were cut."""
    data = text.encode(errors="surrogatepass")
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore") + cut_marker(len(data) - limit, setting)


def tail(text: str, limit: int, setting: str) -> str:
    """A marker if bytes were cut, then ``text``'s last ``limit`` bytes."""
    data = text.encode(errors="surrogatepass")
    if len(data) <= limit:
        return text
    kept = data[len(data) - limit :]  # not data[-limit:], which is all of it for 0
    return f"{cut_marker(len(data) - limit, setting)}\n" + kept.decode(errors="ignore")


def outcome(found: AgentOutcome, settings: Settings) -> AgentOutcome:
    """``found`` with its response, error and raw output cut to their settings."""
    return dataclasses.replace(
        found,
        response=head(found.response, settings.max_response_bytes, "max_response_bytes"),
        error=None
        if found.error is None
        else head(found.error, settings.max_error_bytes, "max_error_bytes"),
        raw_output=tail(found.raw_output, settings.max_output_bytes, "max_output_bytes"),
    )


def files_listed(created: Created, settings: Settings) -> list[str]:
    """The names to list, then a marker entry if some were left out."""
    left_out = created.count - len(created.listed)
    if not left_out:
        return created.listed
    by_count = len(created.listed) >= settings.max_files_listed
    setting = "max_files_listed" if by_count else "max_files_listed_bytes"
    return [
        *created.listed,
        f"[... {left_out:,} more files cut by CLAUDEBOX_{setting.upper()} ...]",
    ]


SHRUNK_FIRST = ("raw_output", "response", "error")
"""What gives way when a result is over ``CLAUDEBOX_MAX_RESULT_BYTES``: the tail of output
first (the least read), the answer last."""
MARGIN_BYTES = 200
"""Room for the marker that replaces the cut text."""


def fit(result: CodeResult, settings: Settings) -> CodeResult:
    """``result`` cut to ``CLAUDEBOX_MAX_RESULT_BYTES`` as JSON, in the order of SHRUNK_FIRST;
    the list of files last, to its marker alone."""
    limit = settings.max_result_bytes
    for name in SHRUNK_FIRST:
        over = len(result.model_dump_json().encode()) - limit
        if over <= 0:
            return result
        text: str | None = getattr(result, name)
        if not text:
            continue
        size = len(text.encode(errors="surrogatepass"))
        keep = max(size - over - MARGIN_BYTES, 0)
        # Escaping (a control byte is six in JSON) makes the JSON shrink at least as fast.
        cut = tail if name == "raw_output" else head
        result = result.model_copy(update={name: cut(text, keep, "max_result_bytes")})
    if len(result.model_dump_json().encode()) > limit and result.files_created:
        count = len(result.files_created)
        marker = f"[... {count:,} file names cut by CLAUDEBOX_MAX_RESULT_BYTES ...]"
        result = result.model_copy(update={"files_created": [marker]})
    return result
