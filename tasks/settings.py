"""Every setting of claudebox-pool, declared once.

Each field is read from the environment with the ``CLAUDEBOX_`` prefix (``CLAUDEBOX_HOME``,
``CLAUDEBOX_BROKER_URL``, ...) or from a ``.env`` file in the working directory. Units sit in
the names (``_s`` seconds, ``_bytes``, ``_usd``). The README's settings table is generated from
this class by :func:`settings_markdown` and a test keeps the two equal.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RuntimeName = Literal["auto", "boxlite", "bwrap", "local"]
AgentName = Literal["claude", "shell"]

CLAUDE_CLI_VERSION = "2.1.332"
"""The Claude Code CLI release this project is tested against (npm `@anthropic-ai/claude-code`)."""


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
    claude_cli: Path | None = Field(
        default=None,
        description="Path of the Claude Code CLI; default: the pinned install of "
        "`claudebox-pool install-cli`, else `claude` on PATH.",
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        description="Model API key for the `claude` agent (else the worker's `ANTHROPIC_API_KEY`).",
    )
    claude_code_oauth_token: SecretStr | None = Field(
        default=None,
        description="Claude Code OAuth token (else the worker's `CLAUDE_CODE_OAUTH_TOKEN`).",
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
    boxlite_start_timeout_s: int = Field(
        default=120,
        gt=0,
        description="Longest a session's micro-VM may take to start (image import and boot) "
        "before the task fails.",
    )

    @field_validator(
        "anthropic_api_key", "claude_code_oauth_token", "flower_basic_auth", mode="before"
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def sessions_root(self) -> Path:
        return self.home / "sessions"

    @property
    def visibility_timeout_s(self) -> int:
        """Above the longest a message may stay unacked: queued waits plus the run itself."""
        return self.task_time_limit_s + self.lock_wait_s + 600


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (call ``get_settings.cache_clear()`` after env edits)."""
    return Settings()


def settings_markdown() -> str:
    """The README's settings table, generated from :class:`Settings`."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "(unset)" if default is None else f"`{default}`"
        rows.append(f"| `CLAUDEBOX_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
