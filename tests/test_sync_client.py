"""The synchronous client, ``claudebox_pool.sync``: the guide's persistent-session example from a
plain script, and from a thread whose event loop is running (a notebook's)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest
import redis

from claudebox_pool.sync import ClaudeBox
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.streaming import StreamEvent
from tests.support.processes import REPO, Worker, wait_for

# The guide's "Persistent Session (First Time)" and "Basic Reconnection" examples, with the sync
# client: no asyncio, no await. The shell agent runs the prompts.
GUIDE_SCRIPT = """
from claudebox_pool.sync import ClaudeBox

def create_project():
    with ClaudeBox(session_id="my-project") as box:
        result = box.code("mkdir -p src && echo initialised > src/README")
        print(f"Workspace: {box.workspace_path}")
        # Workspace persists after exit

def reconnect_example():
    with ClaudeBox.reconnect("my-project") as box:
        print(box.code("cat src/README").response.strip())

create_project()
reconnect_example()
print(sorted(s.session_id for s in ClaudeBox.list_sessions()))
print(ClaudeBox.cleanup_session("my-project", remove_workspace=True).removed_workspace)
"""


def test_a_plain_script_runs_the_guides_persistent_session_example(
    pool: list[Worker], clean_state: redis.Redis, pool_env: dict[str, str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", GUIDE_SCRIPT],
        cwd=REPO,
        env=pool_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    workspace, readme, listed, removed = done.stdout.splitlines()
    assert workspace.startswith("Workspace: ") and workspace.endswith("/my-project/workspace")
    assert (readme, listed, removed) == ("initialised", "['my-project']", "True")


def test_the_whole_api_blocks_inside_a_running_event_loop(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    async def notebook_cell() -> list[object]:
        # As in Jupyter: this thread's loop is running, and the sync calls block it.
        seen: list[object] = []
        with ClaudeBox.get_or_create("nb") as box:
            seen.append(box.code("echo one > a.txt").success)
            stream = box.stream("cat a.txt")
            events = list(stream)
            seen.append(any(isinstance(e, StreamEvent) for e in events))
            seen.append(stream.result is not None and stream.result.response.strip())
            seen.append(box.checkpoint("first").name)
            box.code("echo two > a.txt")
            box.restore("first")
            seen.append(box.code("cat a.txt").response.strip())
            seen.append(box.checkpoints())
            # box.files, another helper's API, reached through the generic wrapper.
            box.files.write("notes/f.txt", "from a notebook")
            seen.append(box.files.read("notes/f.txt"))
        again = ClaudeBox.get_or_create("nb")
        seen.append(again.code("cat a.txt").response.strip())
        # Not a method of the sync class: reached through the generic wrapper, made blocking.
        seen.append([r.session_id for r in again.alist_sessions(prefix="nb")])
        seen.append([e.action for e in again.history()][-1])
        again.close()
        seen.append([r.session_id for r in ClaudeBox.list_sessions_paged(prefix="n")])
        return seen

    assert asyncio.run(notebook_cell()) == [
        True,
        True,
        "one",
        "first",
        "one",
        ["first"],
        b"from a notebook",
        "one",
        ["nb"],
        "code_execution",
        ["nb"],
    ]


def test_a_blocking_call_from_the_clients_own_loop_fails_at_once(
    pool: list[Worker], clean_state: redis.Redis
) -> None:
    def on_output(event: StreamEvent) -> None:
        ClaudeBox.list_sessions_paged()

    with ClaudeBox() as box, pytest.raises(RuntimeError, match="own event loop"):
        box.code("echo hi", on_output=on_output)


INTERRUPTED_SCRIPT = """
from claudebox_pool.sync import ClaudeBox

box = ClaudeBox(session_id="interrupted").__enter__()
print("open", flush=True)
try:
    box.code("sleep 60")
except KeyboardInterrupt:
    print("interrupted", flush=True)
box.close()
"""


def test_ctrl_c_in_a_blocking_call_cancels_its_task(
    pool: list[Worker], clean_state: redis.Redis, pool_env: dict[str, str]
) -> None:
    script = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_SCRIPT],
        cwd=REPO,
        env=pool_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert script.stdout is not None and script.stdout.readline() == "open\n"
        lock = keys.session_lock("interrupted")
        wait_for(lambda: clean_state.exists(lock), 60, "the call to take the session's lock")
        script.send_signal(signal.SIGINT)
        out, err = script.communicate(timeout=60)
    finally:
        script.kill()
    assert (script.returncode, out) == (0, "interrupted\n"), err
    # The agent's 60-second sleep was stopped: the lock went well before it would have ended.
    wait_for(lambda: not clean_state.exists(lock), 20, "the cancelled call to let the lock go")
