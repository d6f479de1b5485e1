"""A producer on "another machine": run by tests/test_files_remote.py in a mount namespace where
an empty tmpfs hides the workers' CLAUDEBOX_HOME. It runs the sessions guide's examples that
touch a workspace with the files API instead of the workers' disk, the template pattern through
``template_dir``, and a batch with ``submit --download``, then prints what it saw as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from claudebox_pool import ClaudeBox, SessionNotFoundError


async def guide(local: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    # Persistent session: its workspace persists; this machine sees it through box.files.
    async with ClaudeBox(session_id="my-project") as box:
        await box.code("mkdir -p src tests && touch src/__init__.py README.md")
        seen["workspace_visible_here"] = os.path.exists(box.workspace_path)
        seen["listed"] = [info.path for info in await box.files.list()]
        seen["src"] = [info.name for info in await box.files.list("src")]

    # Reconnect continues in the same workspace; a file written from here is the agent's.
    async with ClaudeBox.reconnect("my-project") as box:
        await box.files.write("hello.py", "print('hello from afar')\n")
        seen["ran"] = (await box.code("python3 hello.py")).response.strip()
        await box.code("echo 'print(2)' >> hello.py")
        seen["edited"] = (await box.files.read("hello.py")).decode()

    # Session with checkpoints: a download after each phase instead of copytree.
    async with ClaudeBox(session_id="phases") as box:
        await box.code("echo one > phase.txt")
        await box.download(local / "checkpoints" / "phases-phase1")
        await box.code("echo two > phase.txt")
        await box.download(local / "checkpoints" / "phases-phase2")
    seen["phases"] = [
        (local / "checkpoints" / f"phases-phase{n}" / "phase.txt").read_text() for n in (1, 2)
    ]

    # Archive and cleanup (Strategy 1): download the workspace, then remove the session.
    await ClaudeBox(session_id="my-project").download(local / "archive" / "my-project")
    await ClaudeBox.cleanup_session("my-project", remove_workspace=True)
    seen["archived"] = sorted(
        str(path.relative_to(local / "archive" / "my-project"))
        for path in (local / "archive" / "my-project").rglob("*")
    )
    try:
        await ClaudeBox.reconnect("my-project")
    except SessionNotFoundError:
        seen["cleaned_up"] = True

    # Session templates: the template session's workspace, downloaded, seeds a new session.
    async with ClaudeBox(session_id="python-template") as box:
        await box.code("mkdir -p src && echo 'print(1)' > src/main.py")
        await box.download(local / "python-template")
    async with ClaudeBox(session_id="new-service", template_dir=local / "python-template") as box:
        await box.code("cp src/main.py src/continued.py")
        seen["continued"] = (await box.files.read("src/continued.py")).decode()
    return seen


def batch(local: Path) -> dict[str, Any]:
    jobs = local / "jobs.jsonl"
    lines = [
        {"id": "make", "session_id": "batch-a", "prompt": "mkdir -p out && echo a > out/a.txt"},
        {"id": "more", "session_id": "batch-a", "prompt": "echo b > b.txt && echo a2 >> out/a.txt"},
        {"id": "other", "session_id": "batch-b", "prompt": "touch seeded.txt && echo c > c.txt"},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "claudebox_pool.producer.cli",
            "submit",
            str(jobs),
            "--results",
            str(local / "results.jsonl"),
            "--download",
            str(local / "results"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    files = sorted(
        str(path.relative_to(local / "results"))
        for path in (local / "results").rglob("*")
        if path.is_file()
    )
    return {"batch_exit": done.returncode, "batch_stderr": done.stderr[-2000:], "batch": files}


async def seed_batch_sessions() -> None:
    # Files from before the batch are not among its results: only what its jobs changed.
    async with ClaudeBox(session_id="batch-a") as box:
        await box.files.write("old.txt", "from before\n")
    async with ClaudeBox(session_id="batch-b") as box:
        await box.files.write("old.txt", "from before\n")


def main() -> None:
    local, hidden = Path(sys.argv[1]), Path(sys.argv[2])
    seen: dict[str, Any] = {"hidden_root_entries": os.listdir(hidden)}
    seen.update(asyncio.run(guide(local)))
    asyncio.run(seed_batch_sessions())
    seen.update(batch(local))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
