"""What the pool's Celery processes (workers, beat) write to their logs, and how.

A log file is read line by line, by people and by tools that split it on the record format
(``[time: LEVEL/Process] ...``). Text that comes from a sandbox — an agent's output, an error
message quoting it, a result — must never make a line of its own there, or an agent could
print ``[...: ERROR/MainProcess] ...`` and have it read as the worker's. So every record is
rendered on one line: its message with control characters escaped and ANSI sequences removed;
its traceback, if any, indented under it. ``CLAUDEBOX_LOG_FORMAT=json`` writes one JSON object
a record instead. Agent output itself is logged a line a record, prefixed with the session
(:func:`agent_output`), at DEBUG: at INFO the log holds no output, which may carry secrets.

Celery's own "Task ... succeeded in 0.1s: <result>" line would print the whole result (raw
newlines included); :class:`ResultsNotLogged` cuts it to the result's size.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from datetime import UTC, datetime
from typing import IO, Any, TextIO

from celery import signals
from celery._state import get_current_task

from claudebox_pool.tasks.settings import get_settings

AGENT_LOGGER = "claudebox_pool.agent"
"""The logger of agent output lines (DEBUG): silence or route it by this name."""

MAX_LINE_CHARS = 2000
"""An agent output line is cut to this many characters in the log (the result keeps it)."""

# CSI (colours, cursor moves), OSC (titles, links) and two-character escape sequences.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# C0 and C1 controls and the separators str.splitlines and many viewers take as line ends.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str, limit: int | None = None) -> str:
    """``text`` as one printable line: ANSI sequences dropped, controls escaped (``\\n``,
    ``\\x1b``), cut to ``limit`` characters with a note of how many went."""
    plain = _ANSI.sub("", text)
    cut = 0
    if limit is not None and len(plain) > limit:
        plain, cut = plain[:limit], len(plain) - limit
    shown = _CONTROL.sub(lambda m: _NAMED.get(m[0]) or _code(ord(m[0])), plain)
    return f"{shown}... [{cut} more chars]" if cut else shown


def _code(point: int) -> str:
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}"


_agent_log = logging.getLogger(AGENT_LOGGER)


def agent_output(session_id: str, stream: str, line: str) -> None:
    """Log one line an agent printed, escaped and marked as the agent's."""
    if _agent_log.isEnabledFor(logging.DEBUG):
        _agent_log.debug(
            "agent[session=%s] %s: %s",
            session_id,
            stream,
            escape(line.rstrip("\n"), MAX_LINE_CHARS),
        )


_sandbox_log = logging.getLogger("claudebox_pool.sandbox")

SANDBOX_STDERR_LINES = 100
"""Lines of a warm sandbox's own stderr logged; past them the rest is read and dropped."""


def sandbox_stderr(session_id: str, pipe: IO[bytes]) -> None:
    """Log what a sandbox process writes to its own stderr (bwrap's errors, and whatever the
    sandbox's code can write there) as WARNINGs, escaped and marked, until the pipe ends."""
    for logged, raw in enumerate(iter(lambda: pipe.readline(MAX_LINE_CHARS), b"")):
        if logged < SANDBOX_STDERR_LINES:
            line = escape(raw.decode(errors="replace").rstrip("\n"), MAX_LINE_CHARS)
            _sandbox_log.warning("sandbox[session=%s] stderr: %s", session_id, line)
        elif logged == SANDBOX_STDERR_LINES:
            _sandbox_log.warning("sandbox[session=%s] stderr: more lines dropped", session_id)
    pipe.close()


def _one_line_record(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose message is escaped; the original stays as other handlers
    (a test's caplog, Sentry) got it."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = escape(record.getMessage()), None
    return copy


class OneLineFormatter(logging.Formatter):
    """Wraps Celery's formatter: the message on one line, a traceback indented under it, so
    that only the formatter's own line starts at the left margin."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = self.inner.format(_one_line_record(record)).split("\n")
        return "\n".join([first, *(f"    {escape(line)}" for line in rest)])


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time (UTC, ISO-8601), level, logger, process, the task's id
    and name when a task runs, the message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .replace(tzinfo=None)
            .isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
        }
        task = get_current_task()
        if task is not None and task.request.id is not None:
            entry["task_id"], entry["task_name"] = task.request.id, task.name
        entry["message"] = _ANSI.sub("", record.getMessage())
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ResultsNotLogged(logging.Filter):
    """Celery's success line without the result: its size stands in for it.

    ``celery.app.trace`` logs ``LOG_SUCCESS`` with the result's repr in ``return_value``
    (``resultrepr_maxsize`` only shortens it); the context dict is rewritten here, before any
    handler formats it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        if isinstance(context, dict) and "return_value" in context:
            size = len(str(context["return_value"]))
            record.args = {**context, "return_value": f"<result of {size} chars, not logged>"}
        return True


_results_filter = ResultsNotLogged()


def install(logger: logging.Logger) -> None:
    """Give every handler of ``logger`` the configured format, and keep results out of it."""
    json_format = get_settings().log_format == "json"
    for handler in logger.handlers:
        current = handler.formatter or logging.Formatter()
        if isinstance(current, JsonFormatter | OneLineFormatter):
            continue
        handler.setFormatter(JsonFormatter() if json_format else OneLineFormatter(current))
    trace = logging.getLogger("celery.app.trace")
    if _results_filter not in trace.filters:
        trace.addFilter(_results_filter)


def _warning_as_json(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    record = logging.LogRecord(
        "py.warnings",
        logging.WARNING,
        filename,
        lineno,
        "%s: %s",
        (category.__name__, message),
        None,
    )
    (file or sys.stderr).write(JsonFormatter().format(record) + "\n")


def _worker_starting(**_: Any) -> None:
    # Celery warns (running as root, say) before it sets logging up: in JSON mode such a
    # warning is a JSON line too. Once logging is set up, warnings go through it.
    if get_settings().log_format == "json":
        warnings.showwarning = _warning_as_json


def _root_set_up(logger: logging.Logger, **_: Any) -> None:
    install(logger)


def _task_logger_set_up(logger: logging.Logger, **_: Any) -> None:
    install(logger)


signals.celeryd_init.connect(_worker_starting)
signals.after_setup_logger.connect(_root_set_up)
signals.after_setup_task_logger.connect(_task_logger_set_up)
