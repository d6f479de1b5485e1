"""`claudebox-pool flower` started as a process, and a client for its HTTP API."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.processes import REPO, free_port, wait_for

USER, PASSWORD = "ops", "flower-test-password"


class FlowerClient:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def answers(self) -> bool:
        try:
            return self.get("/healthcheck")[0] == 200
        except OSError:
            return False


@contextmanager
def running_flower(log_path: Path, **env: str) -> Iterator[FlowerClient]:
    """Flower on a free port with basic auth, this process's environment and ``env``; stopped
    on exit."""
    port = free_port()
    full_env = {**os.environ, "CLAUDEBOX_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}", **env}
    with log_path.open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "claudebox_pool.producer.cli", "flower", "--port", str(port)],
            env=full_env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    client = FlowerClient(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: client.answers() or child.poll() is not None, 60, "Flower to answer")
        assert child.poll() is None, log_path.read_text()
        yield client
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(30)
