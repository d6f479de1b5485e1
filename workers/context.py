"""What a worker process holds for its whole life: settings, store, Redis, its runtime, agents.

Built lazily once per process, so that each forked pool child makes its own (a boxlite runtime
and a Redis connection must not be shared across a fork).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property

import redis

from claudebox_pool.tasks.connections import sync_redis
from claudebox_pool.tasks.settings import AgentName, Settings, get_settings
from claudebox_pool.workers.agents.base import Agent
from claudebox_pool.workers.agents.claude import ClaudeAgent
from claudebox_pool.workers.agents.shell import ShellAgent
from claudebox_pool.workers.gateway import Gateway
from claudebox_pool.workers.model_access import credential, start_gateway
from claudebox_pool.workers.runtimes.auto import choose
from claudebox_pool.workers.runtimes.base import Runtime
from claudebox_pool.workers.store import SessionStore
from claudebox_pool.workers.warm import client as warm_client
from claudebox_pool.workers.warm.sandbox import KeptRuntime

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings

    @property
    def node(self) -> str:
        return self.settings.node

    @cached_property
    def store(self) -> SessionStore:
        return SessionStore(self.settings.sessions_root, node=self.node)

    @cached_property
    def redis(self) -> redis.Redis:
        return sync_redis(self.settings)

    @cached_property
    def runtime(self) -> Runtime:
        choice = choose(self.settings.runtime)
        log.info("runtime: %s", choice.reason)
        keeper = warm_client.current()
        if keeper is not None and choice.runtime.keeper_holds:
            # The worker's keeper holds this runtime and its sandboxes: only lease them here.
            return KeptRuntime(choice.runtime, keeper, self.settings)
        return choice.runtime()

    @cached_property
    def gateway(self) -> Gateway:
        return start_gateway(self.settings)

    @cached_property
    def has_credential(self) -> bool:
        return credential(self.settings) is not None

    def agent(self, name: AgentName) -> Agent:
        if name == "shell":
            return ShellAgent()
        return ClaudeAgent(self.settings)


_contexts: dict[int, WorkerContext] = {}


def context() -> WorkerContext:
    pid = os.getpid()
    if pid not in _contexts:
        _contexts.clear()
        _contexts[pid] = WorkerContext(get_settings())
    return _contexts[pid]
