"""A batch's sent-journal: which job went out under which idempotency key, so that a resumed
batch reruns only the jobs that never ran.

``<results>.sent`` lies beside the results file, one :class:`Sent` line per code task, appended
and fsynced *before* the task is sent: a job the journal does not name was never sent. A job it
names whose outcome the results file does not hold (the producer was killed, or Redis went away
while it waited) is sent again under the same key, and the session that already completed it
gives back the recorded outcome instead of running it twice (``workers.sessions``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from claudebox_pool.tasks.errors import InvalidRequestError

SUFFIX = ".sent"


class Sent(BaseModel):
    """One line of the journal: job ``job_id`` of batch ``batch_id`` sent for the ``round``-th
    time (a new round only after a known outcome: a retry, or a resume of a failed job)."""

    batch_id: str
    job_id: str
    round: int = 1

    @property
    def key(self) -> str:
        return f"{self.batch_id}/{self.job_id}/{self.round}"


@dataclass(frozen=True)
class Start:
    """How a job of a resumed batch is first sent."""

    sent: Sent
    unknown: bool
    """The interrupted run sent it under this key and never learned its outcome."""


def path_of(results: Path) -> Path:
    return results.with_name(results.name + SUFFIX)


def new_batch_id() -> str:
    return uuid.uuid4().hex[:16]


def read(results: Path) -> list[Sent]:
    """The journal beside ``results``; empty when there is none (a batch from before it)."""
    path = path_of(results)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror}") from None
    journal = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            journal.append(Sent.model_validate_json(line))
        except ValidationError:
            # Only the last line can be torn (killed mid-write): that send never happened.
            if number == len(lines):
                break
            raise InvalidRequestError(f"{path}:{number}: not a journal line") from None
    return journal


def starts(
    batch_id: str, job_ids: Sequence[str], journal: Sequence[Sent], known: Mapping[str, str]
) -> dict[str, Start]:
    """How each job is first sent: under the key its last send used when that send's outcome
    is unknown, else under a new round. ``known`` maps a job to the key of its last outcome
    that the results file holds."""
    last = {sent.job_id: sent for sent in journal if sent.batch_id == batch_id}
    plan = {}
    for job_id in job_ids:
        sent = last.get(job_id)
        if sent is None:
            plan[job_id] = Start(Sent(batch_id=batch_id, job_id=job_id), unknown=False)
        elif known.get(job_id) == sent.key:
            plan[job_id] = Start(sent.model_copy(update={"round": sent.round + 1}), unknown=False)
        else:
            plan[job_id] = Start(sent, unknown=True)
    return plan


class Journal:
    """The journal being written; a resumed batch's earlier lines are carried over first."""

    def __init__(self, path: Path, carried: Sequence[Sent]) -> None:
        self.path = path
        # Replaced whole: --resume may name this very file, whose lines must survive a crash.
        staged = path.with_name(path.name + ".tmp")
        with staged.open("w", encoding="utf-8") as handle:
            handle.writelines(sent.model_dump_json() + "\n" for sent in carried)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
        self._file = path.open("a", encoding="utf-8")

    def record(self, sent: Sent) -> None:
        """Write ``sent`` to disk; returns once it would survive a crash of this host."""
        self._file.write(sent.model_dump_json() + "\n")
        self._sync()

    def close(self) -> None:
        self._file.close()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
