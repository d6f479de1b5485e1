"""Every setting of claudebox-pool, declared once.

Each field is read from the environment with the ``CLAUDEBOX_`` prefix (``CLAUDEBOX_HOME``,
``CLAUDEBOX_BROKER_URL``, ...) or from a ``.env`` file in the working directory. Units sit in
the names (``_s`` seconds, ``_bytes``, ``_usd``). The README's settings table is generated from
this class by :func:`settings_markdown` and a test keeps the two equal.
"""

from __future__ import annotations

import json
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

RuntimeName = Literal["auto", "boxlite", "bwrap", "local"]
AgentName = Literal["claude", "shell"]

CLAUDE_CLI_VERSION = "2.1.332"
"""The Claude Code CLI release this project is tested against (npm `@anthropic-ai/claude-code`)."""


class ModelPrice(BaseModel):
    """USD per million tokens; ``cache_write`` is the 5-minute cache's write price."""

    model_config = ConfigDict(frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float = Field(ge=0)
    cache_read: float = Field(ge=0)


DEFAULT_MODEL_PRICES = {
    "opus": ModelPrice(input=5.0, output=25.0, cache_write=6.25, cache_read=0.50),
    "sonnet": ModelPrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30),
    "haiku": ModelPrice(input=1.0, output=5.0, cache_write=1.25, cache_read=0.10),
}
"""Anthropic's list prices for the current generation (Opus 4.5, Sonnet 4.5, Haiku 4.5)."""


def default_cli_dir() -> Path:
    """Where `claudebox-pool install-cli` puts the pinned CLI (outside any session's reach)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "claudebox-pool" / f"claude-code-{CLAUDE_CLI_VERSION}"


class Settings(BaseSettings):
    """claudebox-pool configuration, shared by producers, workers, beat and Flower."""

    model_config = SettingsConfigDict(
        env_prefix="CLAUDEBOX_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    home: Path = Field(
        default=Path("~/.claudebox"),
        description="Root of all state on disk; sessions live in `<home>/sessions/<id>/`.",
    )
    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Celery broker (Redis) URL. Put the password in it for production.",
    )
    result_backend: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Celery result backend (Redis) URL; also holds the registry and locks.",
    )
    runtime: RuntimeName = Field(
        default="auto",
        description="Sandbox for sessions: `auto` picks the strongest the host can run "
        "(boxlite where hardware virtualisation exists, else bwrap); `local` is dev only.",
    )
    agent: AgentName = Field(
        default="shell",
        description="Default agent of producers: `shell` (the prompt is run by `sh -c`; works "
        "offline) or `claude` (Claude Code CLI; needs a model credential on the workers).",
    )
    task_time_limit_s: int = Field(
        default=3600,
        gt=0,
        description="Longest a `code` task may run; the agent is stopped at this limit.",
    )
    lock_ttl_s: int = Field(
        default=30,
        gt=1,
        description="Session lock lifetime; the holder renews it every third of it.",
    )
    lock_wait_s: int = Field(
        default=600,
        ge=0,
        description="How long a task for a busy session keeps retrying before it fails with "
        "SessionBusyError.",
    )
    visibility_margin_s: int = Field(
        default=600,
        gt=0,
        description="Added to `CLAUDEBOX_TASK_TIME_LIMIT_S + CLAUDEBOX_LOCK_WAIT_S` to make "
        "Redis's visibility timeout: a task left unacknowledged that long (its worker host "
        "vanished) is handed to another worker.",
    )
    shutdown_grace_s: int = Field(
        default=3600,
        gt=0,
        description="How long a worker told to stop (SIGTERM) lets its running tasks finish; "
        "then it stops them and requeues them for another worker at once. Keep the service "
        "manager's stop timeout above it.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Deliveries of one task (worker crashes included) before it is failed "
        "instead of requeued again.",
    )
    result_ttl_s: int = Field(
        default=86400,
        gt=0,
        description="How long task results stay in Redis.",
    )
    max_prompt_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="Largest prompt accepted (UTF-8 bytes); larger ones are refused before "
        "they reach the queue.",
    )
    max_output_bytes: int = Field(
        default=4_000_000,
        gt=0,
        description="Agent output kept in a result (`raw_output`); the tail is kept beyond it.",
    )
    stream_ttl_s: int = Field(
        default=86400,
        gt=0,
        description="How long a task's live output stream stays in Redis after its last line, "
        "for consumers that attach late (`box.stream`, `claudebox-pool code`).",
    )
    stream_max_events: int = Field(
        default=10_000,
        gt=0,
        description="Events kept in one task's live output stream; the oldest are trimmed "
        "beyond it (the result's `raw_output` still holds the output's tail).",
    )
    reindex_every_s: int = Field(
        default=3600,
        gt=0,
        description="How often beat has the registry rebuilt from disk.",
    )
    worker_heartbeat_s: int = Field(
        default=5,
        gt=0,
        description="How often a worker announces itself in Redis; producers refuse to "
        "enqueue when no worker was seen for three of these.",
    )
    node_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="The worker's node: the place its sessions root lives. A session is bound "
        "to the node that created it and its tasks go to that node's queue "
        "(`claudebox.node.<name>`); workers sharing one sessions root (one host, or shared "
        "storage) use one name. Default: the hostname.",
    )
    node_grace_s: int = Field(
        default=60,
        gt=0,
        description="How long a node may send no heartbeat before tasks for its sessions fail "
        "with NodeUnavailableError instead of waiting in its queue.",
    )
    warm_idle_s: int = Field(
        default=300,
        ge=0,
        description="How long a worker keeps a session's sandbox running after a task, so that "
        "the session's next task skips the sandbox start; the session's tasks go to that "
        "worker's own queue (`claudebox.worker.<hostname>`) meanwhile. 0: a fresh sandbox for "
        "every task.",
    )
    warm_max: int = Field(
        default=16,
        gt=0,
        description="Most warm sandboxes one worker keeps; past it the longest idle is stopped.",
    )
    claude_cli: Path | None = Field(
        default=None,
        description="Path of the Claude Code CLI; default: the pinned install of "
        "`claudebox-pool install-cli`, else `claude` on PATH.",
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        description="Model API key, held by the worker's model gateway only (else the worker's "
        "`ANTHROPIC_API_KEY`); sandboxes never see it.",
    )
    claude_code_oauth_token: SecretStr | None = Field(
        default=None,
        description="Claude Code OAuth token, held like the API key (else the worker's "
        "`CLAUDE_CODE_OAUTH_TOKEN`).",
    )
    model_api_url: str = Field(
        default="https://api.anthropic.com",
        description="Where the model gateway forwards the sandboxes' model calls.",
    )
    model_prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_MODEL_PRICES),
        description="USD per million tokens by model family (a substring of the model name), "
        'as JSON like `{"opus": {"input": 5, "output": 25, "cache_write": 6.25, '
        '"cache_read": 0.5}}`; an unknown model is charged as `sonnet`.',
    )
    session_budget_usd: float | None = Field(
        default=None,
        gt=0,
        description="Default spend cap of a session's model calls, in USD (unset: none); "
        "`ClaudeBox(budget_usd=...)` sets one per session.",
    )
    egress_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="`host[:port]` entries every sandbox may reach through the egress proxy, "
        "comma-separated (default: none); `ClaudeBox(egress_allow=[...])` adds per session.",
    )
    flower_basic_auth: SecretStr | None = Field(
        default=None,
        description="`user:password` Flower requires; `claudebox-pool flower` refuses to start "
        "without it unless `--insecure-dev`.",
    )
    cpus: int = Field(default=2, gt=0, description="Default vCPUs of a session's sandbox.")
    memory_mib: int = Field(
        default=2048, gt=0, description="Default memory of a session's sandbox (MiB)."
    )
    disk_size_gb: int = Field(
        default=10, gt=0, description="Default disk of a session's micro-VM (GB)."
    )
    boxlite_image: str | None = Field(
        default=None,
        description="Image of the boxlite runtime's micro-VMs: a local OCI image layout "
        "directory (built by `deploy/image/build.sh`, no registry needed) or a registry image "
        "name; default: `<home>/images/claudebox-sandbox` when that directory exists.",
    )
    boxlite_home: Path | None = Field(
        default=None,
        description="Where boxlite keeps VM disks and its image cache (put it on a local "
        "disk); default: `<home>/boxlite`. Each worker process takes its own "
        "`<hostname>/slot-<n>` below it, as boxlite allows one runtime per directory.",
    )
    boxlite_host_alias: str = Field(
        default="host.boxlite.internal",
        min_length=1,
        description="The name under which a boxlite micro-VM reaches its host's loopback, where "
        "the model gateway listens for it; boxlite's user-mode network (gvproxy) resolves "
        "`host.boxlite.internal` to 192.168.127.254 and carries it to the host's 127.0.0.1.",
    )
    boxlite_start_timeout_s: int = Field(
        default=120,
        gt=0,
        description="Longest a session's micro-VM may take to start (image import and boot) "
        "before the task fails.",
    )
    sandbox_uid_base: int = Field(
        default=200_000,
        ge=1000,
        description="First host uid (and gid) of the range a root worker gives sessions: each "
        "session's bwrap sandbox runs as its own unprivileged uid from it, recorded in "
        "session.json. Pick a range no host user or other subordinate range uses.",
    )
    sandbox_uid_count: int = Field(
        default=100_000,
        gt=0,
        description="Size of that range: how many sessions one sessions root can hold at once "
        "(a removed session's uid is given again).",
    )
    archive_dir: Path | None = Field(
        default=None,
        description="Where session archives are written (`cleanup_session(..., archive=True)`, "
        "the age sweep) and restored from; default: `<home>/archives`.",
    )
    lease_ttl_s: int = Field(
        default=600,
        gt=0,
        description="How long an open box counts as in use after its producer's last sign of "
        "life (the producer renews it every third of it); sweeps never remove a leased session.",
    )
    sweep_leaks_every_s: int = Field(
        default=300,
        gt=0,
        description="How often beat runs the leak sweep: ephemeral sessions with no producer "
        "lease, idle for `CLAUDEBOX_LEASE_TTL_S`, and sandboxes kept for sessions that are gone.",
    )
    sweep_age_every_s: int = Field(
        default=3600,
        gt=0,
        description="How often beat runs the age sweep (see `CLAUDEBOX_SWEEP_MAX_AGE_DAYS`).",
    )
    sweep_max_age_days: float | None = Field(
        default=None,
        gt=0,
        description="Days since `updated_at` after which the age sweep removes a session; unset: "
        "never, except where `CLAUDEBOX_SWEEP_AGE_RULES` says.",
    )
    sweep_age_rules: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default={},
        description='Age limits in days by session id prefix, as JSON like `{"temp-": 7}`; '
        "the longest matching prefix wins over `CLAUDEBOX_SWEEP_MAX_AGE_DAYS`.",
    )
    sweep_archive: bool = Field(
        default=True,
        description="Whether the age sweep archives a session before removing it.",
    )
    max_sessions_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Size limit of the sessions root (unset: none); tasks that would grow it "
        "past the limit fail with DiskFullError. Checking it walks the root before each task.",
    )
    min_free_bytes: int = Field(
        default=1_000_000_000,
        ge=0,
        description="Free space the sessions root's disk must keep; below it, tasks that write "
        "fail with DiskFullError instead of filling the disk (0: no floor).",
    )

    @field_validator(
        "anthropic_api_key", "claude_code_oauth_token", "flower_basic_auth", mode="before"
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("egress_allow", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def sessions_root(self) -> Path:
        return self.home / "sessions"

    @property
    def node(self) -> str:
        return self.node_name or socket.gethostname()

    @property
    def archives_root(self) -> Path:
        return (self.archive_dir or self.home / "archives").expanduser().absolute()

    @property
    def worker_alive_s(self) -> int:
        """How recent a worker's last heartbeat must be for it to count as alive: three beats."""
        return 3 * self.worker_heartbeat_s

    @property
    def visibility_timeout_s(self) -> int:
        """Above the longest a message may stay unacked: queued waits plus the run itself."""
        return self.task_time_limit_s + self.lock_wait_s + self.visibility_margin_s


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (call ``get_settings.cache_clear()`` after env edits)."""
    return Settings()


def settings_markdown() -> str:
    """The README's settings table, generated from :class:`Settings`."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, dict):
            default = json.dumps({key: value.model_dump() for key, value in default.items()})
        shown = "(unset)" if default in (None, []) else f"`{default}`"
        rows.append(f"| `CLAUDEBOX_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
