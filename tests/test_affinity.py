"""Session affinity across nodes that share no storage, on one machine.

Two worker nodes, ``node-a`` and ``node-b``, each with a sessions root of its own
(CLAUDEBOX_HOME), share one Redis. Sessions a1 and a2 are created while node-a is the only node
up, b1 and b2 while node-b is: that is where their files live, and every task of theirs must
run there and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox
from claudebox_pool.producer import pool
from claudebox_pool.producer.routing import Route
from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.tasks.errors import (
    NodeUnavailableError,
    SessionAlreadyExistsError,
    WrongNodeError,
)
from claudebox_pool.tasks.models import CodeRequest
from claudebox_pool.tasks.registry import read_one
from claudebox_pool.tasks.settings import get_settings
from tests.conftest import WorkerFactory
from tests.support.processes import REPO, Worker, wait_for

SESSIONS = {"node-a": ("a1", "a2"), "node-b": ("b1", "b2")}


@dataclass
class Nodes:
    start_workers: WorkerFactory
    homes: dict[str, Path]
    running: dict[str, Worker] = field(default_factory=dict)

    def start(self, node: str) -> None:
        env = {"CLAUDEBOX_HOME": str(self.homes[node]), "CLAUDEBOX_NODE_NAME": node}
        (self.running[node],) = self.start_workers(1, concurrency=2, **env)

    def stop(self, node: str) -> None:
        self.running.pop(node).stop()

    def ensure(self, node: str, up: bool) -> None:
        if up and node not in self.running:
            self.start(node)
        elif not up and node in self.running:
            self.stop(node)

    def workspace(self, node: str, session_id: str) -> Path:
        return self.homes[node] / "sessions" / session_id / "workspace"

    def ran_here(self, node: str, session_id: str) -> set[str]:
        """The task ids of the code runs recorded in the session's history on ``node``."""
        history = self.homes[node] / "sessions" / session_id / ".claudebox" / "history.jsonl"
        if not history.exists():
            return set()
        entries = [json.loads(line) for line in history.read_text().splitlines()]
        return {
            entry["context"]["task_id"] for entry in entries if entry["action"] == "code_execution"
        }


def create(*session_ids: str) -> None:
    async def go() -> None:
        for session_id in session_ids:
            async with ClaudeBox(session_id=session_id):
                pass

    asyncio.run(go())


@pytest.fixture(scope="module")
def nodes(
    start_workers: WorkerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nodes]:
    base = tmp_path_factory.mktemp("nodes")
    two = Nodes(start_workers, {node: base / node for node in SESSIONS})
    # Creation goes to the common queue: the only node up takes it, and holds the session.
    two.start("node-a")
    create(*SESSIONS["node-a"])
    two.start("node-b")
    two.stop("node-a")
    create(*SESSIONS["node-b"])
    two.start("node-a")
    yield two
    for node in SESSIONS:
        two.ensure(node, up=False)
    client = redis.Redis.from_url(get_settings().result_backend)
    for session_ids in SESSIONS.values():
        client.hdel(keys.registry(), *session_ids)
    # Gone for good: later modules' calls on every node must not wait for these two.
    client.zrem(keys.nodes(), *SESSIONS)


@pytest.fixture
def grace_s(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A short node grace period for this test's producer calls."""
    monkeypatch.setenv("CLAUDEBOX_NODE_GRACE_S", "4")
    get_settings.cache_clear()
    yield 4
    monkeypatch.undo()
    get_settings.cache_clear()


def test_every_task_of_a_session_runs_on_the_node_holding_it(nodes: Nodes) -> None:
    async def run(session_id: str) -> list[str]:
        async with ClaudeBox.reconnect(session_id) as box:
            return [(await box.code(f"echo {n} >> log.txt")).task_id for n in range(3)]

    async def run_all() -> list[list[str]]:
        every = [sid for session_ids in SESSIONS.values() for sid in session_ids]
        return await asyncio.gather(*(run(session_id) for session_id in every))

    task_ids = iter(asyncio.run(run_all()))

    for node, session_ids in SESSIONS.items():
        other = next(n for n in SESSIONS if n != node)
        for session_id in session_ids:
            # Results keep no task arguments nor worker (secrets): each node's history tells.
            ran = set(next(task_ids))
            assert ran <= nodes.ran_here(node, session_id)
            assert not ran & nodes.ran_here(other, session_id)
            log = nodes.workspace(node, session_id) / "log.txt"
            assert log.read_text().split() == ["0", "1", "2"]
            assert not nodes.workspace(other, session_id).exists()


def test_creating_a_session_whose_id_lives_on_another_node_is_refused_there(
    nodes: Nodes,
) -> None:
    with pytest.raises(SessionAlreadyExistsError, match="'b1'"):
        create("b1")

    assert not nodes.workspace("node-a", "b1").exists()


def test_a_task_that_reaches_the_wrong_node_is_refused_without_running(nodes: Nodes) -> None:
    request = CodeRequest(session_id="a1", prompt="touch stray", agent="shell")
    wrong = Route(names.node_queue("node-b"))

    task_id = pool.send(names.CODE, request.model_dump(mode="json"), wrong.queue)
    with pytest.raises(WrongNodeError, match=r"lives on node 'node-a'.*reached node 'node-b'"):
        asyncio.run(pool.wait(task_id, 30, wrong))

    assert not nodes.workspace("node-a", "a1").joinpath("stray").exists()
    assert not nodes.workspace("node-b", "a1").exists()


def test_beats_sweeps_and_reindex_reach_the_sessions_root_of_every_node(
    nodes: Nodes, redis_server: object
) -> None:
    for node in SESSIONS:
        nodes.ensure(node, up=True)
    reports = {node: nodes.homes[node] / "sweeps.jsonl" for node in SESSIONS}

    def sweeps_run(node: str) -> int:
        path = reports[node]
        return len(path.read_text().splitlines()) if path.exists() else 0

    before = {node: sweeps_run(node) for node in SESSIONS}
    client = redis.Redis.from_url(get_settings().result_backend)
    client.hdel(keys.registry(), "a1", "b1")

    # As beat sends them: once, to the common queue, which one worker of one node takes.
    app.send_task(names.SWEEP_LEAKS, args=[{"every_s": 1.0, "every_node": True}])
    app.send_task(names.REINDEX, args=[{"every_node": True}])

    wait_for(
        lambda: all(sweeps_run(node) == before[node] + 1 for node in SESSIONS),
        20,
        "each node to sweep its own sessions root once",
    )
    wait_for(
        lambda: read_one(client, "a1") is not None and read_one(client, "b1") is not None,
        20,
        "each node to reindex its own sessions root",
    )
    a1, b1 = read_one(client, "a1"), read_one(client, "b1")
    assert a1 is not None and a1.node == "node-a"
    assert b1 is not None and b1.node == "node-b"


def test_a_task_for_a_stopped_node_waits_in_its_queue_until_it_returns(nodes: Nodes) -> None:
    nodes.ensure("node-b", up=False)

    async def scenario() -> str:
        async with ClaudeBox.reconnect("b1") as box:
            return (await box.code("echo back > back.txt")).task_id

    async def while_node_b_is_down() -> str:
        call = asyncio.ensure_future(scenario())
        await asyncio.sleep(1.5)  # long enough for node-a to have taken it, were it routed there
        assert not call.done()
        await asyncio.to_thread(nodes.start, "node-b")
        return await asyncio.wait_for(call, 30)

    task_id = asyncio.run(while_node_b_is_down())

    assert task_id in nodes.ran_here("node-b", "b1")
    assert task_id not in nodes.ran_here("node-a", "b1")
    assert (nodes.workspace("node-b", "b1") / "back.txt").read_text() == "back\n"
    assert not nodes.workspace("node-a", "b1").exists()


def test_a_task_for_a_node_gone_past_the_grace_fails_clearly_and_runs_nowhere(
    nodes: Nodes, grace_s: int
) -> None:
    nodes.ensure("node-b", up=False)

    async def reconnect() -> None:
        await ClaudeBox.reconnect("b2")

    # Sent within the grace period, the task waits in node-b's queue until the period ends.
    with pytest.raises(NodeUnavailableError, match="node 'node-b'"):
        asyncio.run(reconnect())
    started = time.monotonic()
    with pytest.raises(NodeUnavailableError) as refused:
        asyncio.run(reconnect())

    assert time.monotonic() - started < 1  # past the grace period nothing is even queued
    assert "CLAUDEBOX_NODE_NAME=node-b" in str(refused.value)
    assert "`claudebox-pool sessions move b2 --to NODE`" in str(refused.value)
    assert "'b2'" not in nodes.running["node-a"].log()  # no task of b2 ran or failed there
    assert not nodes.workspace("node-a", "b2").exists()


def sessions_move(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "claudebox_pool.producer.cli", "sessions", "move", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CLAUDEBOX_NODE_GRACE_S": "2"},
        timeout=60,
        check=False,
    )


def test_sessions_move_binds_a_session_to_the_node_its_files_were_copied_to(
    nodes: Nodes, redis_server: object
) -> None:
    nodes.ensure("node-b", up=False)
    client = redis.Redis.from_url(get_settings().result_backend)
    wait_for(
        lambda: time.time() - (client.zscore(keys.nodes(), "node-b") or 0) > 2,
        10,
        "node-b to be silent past the grace period",
    )
    session = nodes.homes["node-b"] / "sessions" / "b1"

    not_copied = sessions_move("b1", "--to", "node-a")
    shutil.copytree(session, nodes.homes["node-a"] / "sessions" / "b1", symlinks=True)
    moved = sessions_move("b1", "--to", "node-a")

    assert not_copied.returncode == 2
    assert "copy its directory there from node 'node-b' first" in not_copied.stderr
    assert moved.returncode == 0, moved.stderr
    record = read_one(client, "b1")
    assert record is not None
    assert record.node == "node-a"
    assert record.workspace_path == str(nodes.workspace("node-a", "b1"))

    async def continue_on_node_a() -> str:
        async with ClaudeBox.reconnect("b1") as box:
            return (await box.code("cat back.txt")).response

    assert asyncio.run(continue_on_node_a()) == "back\n"

    # node-b comes back with its old copy: the session stays where it was moved to.
    nodes.ensure("node-b", up=True)
    record = read_one(client, "b1")
    assert record is not None
    assert record.node == "node-a"


def test_get_or_create_raced_across_nodes_creates_the_session_on_one(nodes: Nodes) -> None:
    nodes.ensure("node-a", up=True)
    nodes.ensure("node-b", up=True)

    async def one(n: int) -> tuple[str, bool]:
        async with ClaudeBox.get_or_create("spread") as box:
            result = await box.code(f"echo {n} >> racers.txt")
            return result.task_id, result.success

    async def race() -> list[tuple[str, bool]]:
        return await asyncio.gather(*(one(n) for n in range(8)))

    ran = asyncio.run(race())
    try:
        assert all(success for _, success in ran)
        holders = [node for node in SESSIONS if nodes.workspace(node, "spread").exists()]
        assert len(holders) == 1  # one node created it; the other creators found it there
        (holder,) = holders
        assert {task_id for task_id, _ in ran} <= nodes.ran_here(holder, "spread")
        racers = (nodes.workspace(holder, "spread") / "racers.txt").read_text().split()
        assert sorted(racers) == [str(n) for n in range(8)]
        # An existing session on either node is opened where it lives, not created anew.
        client = redis.Redis.from_url(get_settings().result_backend)
        for session_ids in SESSIONS.values():
            session_id = session_ids[0]
            bound = read_one(client, session_id)
            assert bound is not None

            async def reopen(session_id: str = session_id) -> str:
                async with ClaudeBox.get_or_create(session_id) as box:
                    return (await box.code("cat log.txt | wc -l")).task_id

            assert asyncio.run(reopen()) in nodes.ran_here(bound.node, session_id)
    finally:
        asyncio.run(ClaudeBox.cleanup_session("spread", remove_workspace=True))
