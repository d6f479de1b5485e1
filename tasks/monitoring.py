"""What monitors (Flower, `celery events`, `celery inspect`) see of a claudebox task's arguments.

A task message carries ``argsrepr``, the text that task events and Flower show instead of the
arguments. Celery fills it with a repr of the payload, which would show whole prompts and the
values of ``env`` (API keys, tokens). The shared app builds its messages with
:class:`RedactingAMQP`, which writes that text with :func:`describe` for every claudebox task,
whoever sends it: a producer, a worker sending the next step of a chain, or Flower's own task
API. Only a short list of harmless fields is shown, and the prompt only shortened, so a field
added to a payload later stays hidden until it is listed here.

A worker answers ``celery inspect active`` (and ``reserved``, ``scheduled``, ``query_task``)
with each request's ``info()``, which holds the raw arguments unless the asker passes
``safe=True``; :class:`RedactedTask` gives every claudebox task a request class whose
``info()`` shows the display text whatever is asked.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.app.amqp import AMQP

TASK_PREFIX = "claudebox."
PROMPT_PREVIEW_CHARS = 60
SHOWN_FIELDS = ("session_id", "mode", "agent", "remove_workspace", "prompt")
"""Payload fields a monitor may show, in this order; ``session_id`` is shown as ``session``."""


def preview(prompt: str, limit: int = PROMPT_PREVIEW_CHARS) -> str:
    """The prompt on one line, shortened to ``limit`` characters."""
    flat = " ".join(prompt.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(task_name: str, args: Any) -> str:
    """``[session=demo agent=shell prompt=echo hi]``: a task's arguments, safe to display."""
    payload = args[0] if isinstance(args, list | tuple) and args else None
    parts = []
    for name in SHOWN_FIELDS:
        value = payload.get(name) if isinstance(payload, dict) else None
        if value is None:
            continue
        label = "session" if name == "session_id" else name
        shown = preview(value) if name == "prompt" and isinstance(value, str) else value
        parts.append(f"{label}={shown}")
    return "[" + (" ".join(parts) or task_name.removeprefix(TASK_PREFIX)) + "]"


class RedactingAMQP(AMQP):  # type: ignore[misc]  # Celery ships no type information
    """Celery's task message factory, with ``describe`` writing claudebox tasks' display text."""

    def as_task_v2(self, task_id: str, name: str, *args: Any, **options: Any) -> Any:
        # Celery passes the task's positional arguments first; the display text it would make
        # of them comes as the ``argsrepr`` option, which this replaces.
        if name.startswith(TASK_PREFIX):
            options["argsrepr"] = describe(name, args[0] if args else options.get("args"))
            options["kwargsrepr"] = "{}"
        return super().as_task_v2(task_id, name, *args, **options)


class RedactedTask(Task):  # type: ignore[misc]
    """The shared app's task class: its worker-side request never shows raw arguments."""

    # A path, resolved only by a worker: producers need not import the worker's request class.
    Request = "claudebox_pool.tasks.redacted_request:RedactedRequest"
