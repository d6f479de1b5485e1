"""A real `celery beat` process of the pool under test, with its own schedule file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from tests.support.processes import REPO


class Beat:
    def __init__(self, env: Mapping[str, str], directory: Path) -> None:
        self.name = f"beat-{uuid.uuid4().hex[:8]}"
        self.env = dict(env)
        self.directory = directory
        self.log_path = directory / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "claudebox_pool.tasks.app",
                    "beat",
                    "--schedule",
                    str(self.directory / f"{self.name}-schedule"),
                    "--max-interval",
                    "1",
                    "--loglevel",
                    "INFO",
                ],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sent(self, entry: str) -> int:
        """How many times this beat sent the schedule entry ``entry``."""
        return self.log().count(f"Sending due task {entry} ")

    def stop(self, timeout_s: float = 15) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
