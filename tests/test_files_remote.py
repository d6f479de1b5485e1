"""A producer that cannot see the workers' disk uses sessions through the files API: it runs in
a mount namespace of its own, where an empty tmpfs covers the workers' CLAUDEBOX_HOME."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from claudebox_pool.tasks.settings import get_settings
from tests.support.processes import REPO

pytestmark = pytest.mark.usefixtures("pool", "clean_state")

SCRIPT = Path(__file__).parent / "support" / "remote_producer.py"


def test_a_producer_without_the_workers_disk_runs_the_guide_templates_and_a_batch(
    pool_env: dict[str, str], tmp_path: Path
) -> None:
    home = get_settings().home
    assert home.is_dir()
    hide = 'mount -t tmpfs -o size=1m,mode=0700 tmpfs "$0" && exec "$@"'
    command = [sys.executable, str(SCRIPT), str(tmp_path), str(home)]

    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, str(home), *command],
        capture_output=True,
        text=True,
        env={**pool_env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=600,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["hidden_root_entries"] == []
    assert seen["workspace_visible_here"] is False
    assert seen["listed"] == ["README.md", "src", "tests"]
    assert seen["src"] == ["__init__.py"]
    assert seen["ran"] == "hello from afar"
    assert seen["edited"] == "print('hello from afar')\nprint(2)\n"
    assert seen["phases"] == ["one\n", "two\n"]
    assert seen["archived"] == ["README.md", "hello.py", "src", "src/__init__.py", "tests"]
    assert seen["cleaned_up"] is True
    assert seen["continued"] == "print(1)\n"
    assert seen["batch_exit"] == 0, seen["batch_stderr"]
    assert seen["batch"] == [
        "batch-a/b.txt",
        "batch-a/out/a.txt",
        "batch-b/c.txt",
        "batch-b/seeded.txt",
    ]
    # The workers' disk, seen from here, holds what the producer did there.
    sessions = get_settings().sessions_root
    assert (sessions / "new-service" / "workspace" / "src" / "continued.py").is_file()
    assert not (sessions / "my-project").exists()
