"""Every setting of claudebox-pool, declared once.

Each field is read from the environment with the ``CLAUDEBOX_`` prefix (``CLAUDEBOX_HOME``,
``CLAUDEBOX_BROKER_URL``, ...) or from a ``.env`` file in the working directory. Units sit in
the names (``_s`` seconds, ``_bytes``, ``_usd``). The README's settings table is generated from
this class by :func:`settings_markdown` and a test keeps the two equal.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import socket
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Self, get_args
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from claudebox_pool.tasks.errors import InvalidSettingError

RuntimeName = Literal["auto", "boxlite", "bwrap", "local"]
AgentName = Literal["claude", "shell"]

PREFIX = "CLAUDEBOX_"
ENV_FILE = Path(".env")
"""Read relative to the working directory, as pydantic-settings does."""
CLAUDE_CLI_VERSION = "2.1.332"
"""The Claude Code CLI release this project is tested against (npm `@anthropic-ai/claude-code`)."""
CLI_BETAS = (
    "claude-code-20250219",
    "interleaved-thinking-2025-05-14",
    "context-management-2025-06-27",
    "per-turn-control-2026-07-01",
    "mid-conversation-tool-changes-2026-07-01",
    "thinking-token-count-2026-05-13",
    "advanced-tool-use-2025-11-20",
    "effort-2025-11-24",
    "thinking-display-updates-2026-08-18",
    "afk-mode-2026-01-31",
    "dangerous-tool-use-2026-09-03",
)
"""The `anthropic-beta` values that CLI release sends (measured with the scripted model server
of `tests/support/model_server.py`; the last two only with `--permission-mode plan` or `auto`):
the model gateway's default allow-list."""


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


def find_cli(settings: Settings) -> Path | None:
    """The CLI binary: the setting, else the pinned install, else ``claude`` on PATH."""
    if settings.claude_cli is not None:
        candidate: Path | None = settings.claude_cli.expanduser()
    else:
        pinned = default_cli_dir() / "node_modules" / ".bin" / "claude"
        on_path = shutil.which("claude")
        candidate = pinned if pinned.exists() else (Path(on_path) if on_path else None)
    if candidate is None or not candidate.exists():
        return None
    return candidate.resolve()


class Settings(BaseSettings):
    """claudebox-pool configuration, shared by producers, workers, beat and Flower."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=ENV_FILE,
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
    redis_outage_s: int = Field(
        default=60,
        ge=0,
        description="How long producers waiting for results, and tasks recording an outcome, "
        "retry a lost Redis (with backoff) before they fail with PoolUnavailableError.",
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
        description="Agent output kept of each pipe while it runs, and in a result's "
        "`raw_output`; beyond it the tail is kept, after a marker saying how much was cut.",
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
    max_line_bytes: int = Field(
        default=4_000_000,
        gt=0,
        description="Longest output line a worker keeps; the rest of a longer line is dropped "
        "as it is read, and a marker says how many bytes were cut. Claude Code's final "
        "stream-json line holds the whole answer: keep this above `CLAUDEBOX_MAX_RESPONSE_BYTES`.",
    )
    max_response_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="Longest `response` in a result; its start is kept, with a marker.",
    )
    max_error_bytes: int = Field(
        default=64_000,
        gt=0,
        description="Longest `error` in a result and in history; its start is kept, with a marker.",
    )
    max_files_listed: int = Field(
        default=1000,
        gt=0,
        description="Most names a result and history list in `files_created`; a marker entry "
        "says how many more there were (`total_files_created` counts them all).",
    )
    max_files_listed_bytes: int = Field(
        default=100_000,
        gt=0,
        description="Most bytes of names a result and history list in `files_created`.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log records of workers and beat: `text` (Celery's line, its message on one "
        "line with control characters escaped) or `json` (one JSON object a line).",
    )
    log_max_bytes: int = Field(
        default=10_000_000,
        ge=0,
        description="Size at which `up --detach` rotates a process's log file to `<name>.log.1` "
        "(0: never).",
    )
    log_backups: int = Field(
        default=5,
        ge=1,
        description="Rotated log files `up --detach` keeps of each process (`<name>.log.1` "
        "is the newest).",
    )
    stream_max_bytes: int = Field(
        default=8_000_000,
        gt=0,
        description="Bytes of text one task may put in its live output stream; past it the "
        "stream says so once and only the end event follows (the result keeps the tail).",
    )
    max_trajectory_page_bytes: int = Field(
        default=2_000_000,
        gt=1000,
        description="Largest page (as JSON) of a session's trajectory one `trajectory` task "
        "returns; the producer asks for pages until the last. A single turn over it keeps its "
        "usage and timings but its content is replaced by a marker.",
    )
    transfer_chunk_bytes: int = Field(
        default=1 << 20,
        ge=4096,
        le=64 << 20,
        description="Size of the chunks a file or tree travels in through Redis between a "
        "producer and a worker (`box.files`, upload, download).",
    )
    transfer_window_chunks: int = Field(
        default=8,
        gt=0,
        description="Chunks of one transfer that may wait in Redis unread; the sender waits "
        "for the receiver past it, so a transfer holds at most this many chunks in Redis.",
    )
    transfer_idle_s: int = Field(
        default=120,
        gt=0,
        description="How long a worker waits for the producer's next chunk (or for room to "
        "send one) before it gives a transfer up as abandoned.",
    )
    max_list_entries: int = Field(
        default=10_000,
        gt=0,
        description="Most entries `box.files.list` returns for one directory; a larger one "
        "is refused (list a subdirectory, or download it).",
    )
    max_result_bytes: int = Field(
        default=6_000_000,
        gt=1000,
        description="Largest result (as JSON) a `code` task stores in Redis; `raw_output`, "
        "then `response`, are cut to fit. Keep it under Redis's pub/sub output buffer soft "
        "limit (8 MB), or a producer waiting for the result is disconnected.",
    )
    redis_maxmemory_bytes: int = Field(
        default=1 << 30,
        gt=0,
        description="`maxmemory` of the Redis that `claudebox-pool up` starts (no eviction: "
        "past it Redis refuses writes instead of dropping queued tasks). See the README's "
        "Deploy section on sizing it.",
    )
    up_restart_delay_s: float = Field(
        default=1.0,
        gt=0,
        description="How long `claudebox-pool up` waits before restarting a process of the "
        "pool that crashed (exited non-zero or by a signal); it doubles with each crash in a "
        "row, up to `CLAUDEBOX_UP_RESTART_MAX_DELAY_S`.",
    )
    progress_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often `claudebox-pool submit` prints a progress line when its output "
        "is not a terminal (a pipe, a CI log); each finished job prints a line too.",
    )
    up_restart_max_delay_s: float = Field(
        default=60.0,
        gt=0,
        description="The longest `claudebox-pool up` waits before restarting a crashed process; "
        "one that then runs this long is counted stable again (its next delay starts over).",
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
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port on which each worker serves its Prometheus metrics (`/metrics`); "
        "unset or 0: no metrics. `up --workers N` gives its workers this port and the next N-1.",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="Address the workers' metrics server binds; `0.0.0.0` in a container whose "
        "port only the internal network reaches.",
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
    gateway_allow_server_tools: bool = Field(
        default=False,
        description="Let sandboxes' model calls use provider-side tools (`mcp_servers`, "
        "web fetch, web search, code execution: any tool with a `type`), which reach the "
        "internet past the egress allow-list at fees the gateway does not meter.",
    )
    gateway_allowed_betas: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(CLI_BETAS),
        description="`anthropic-beta` values a sandbox's model call may carry, comma-separated; "
        "a call with any other is refused. Default: those the pinned CLI sends.",
    )
    flower_basic_auth: SecretStr | None = Field(
        default=None,
        description="`user:password` Flower requires; `claudebox-pool flower` refuses to start "
        "without it unless `--insecure-dev`.",
    )
    flower_control_api: bool = Field(
        default=False,
        description="Turn on Flower's control API (send or apply tasks, revoke and terminate "
        "them, shut down, restart or resize workers, rate and time limits, queues); off, "
        "Flower only shows the pool. Anyone with Flower's password can then run commands in "
        "any session.",
    )
    cpus: int = Field(default=2, gt=0, description="Default vCPUs of a session's sandbox.")
    memory_mib: int = Field(
        default=2048, gt=0, description="Default memory of a session's sandbox (MiB)."
    )
    disk_size_gb: int = Field(
        default=10,
        gt=0,
        description="Default disk of a session's micro-VM (GB); on bwrap, the session's disk "
        "quota unless CLAUDEBOX_SESSION_DISK_BYTES is set.",
    )
    pids_max: int = Field(
        default=512,
        gt=0,
        description="Most processes and threads one sandbox may run at once (bwrap: cgroup pids "
        "controller; RLIMIT_NPROC where sandboxes run as their own uid).",
    )
    tmp_size_mib: int = Field(
        default=512,
        gt=0,
        description="Size of a bwrap sandbox's /tmp (a tmpfs: held in memory, so within its "
        "memory limit too, and counted in its session's disk use).",
    )
    session_disk_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Most bytes one session may hold: its directory, its /tmp and its model "
        "gateway lease, checked while a task runs; past it the task is stopped with "
        "DiskFullError. Unset: the session's disk_size_gb.",
    )
    disk_watch_s: float = Field(
        default=1.0,
        gt=0,
        description="How often a running task's disk use (its session, the sessions root's "
        "limit and free space) is measured (less often for a session whose walk takes longer "
        "than a tenth of it); a task past a limit is stopped at the next check.",
    )
    seccomp: bool = Field(
        default=True,
        description="Whether bwrap sandboxes get the seccomp filter that denies the system calls "
        "an agent never needs (mount, ptrace, bpf, kexec, new user namespaces ...).",
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

    @field_validator("egress_allow", "gateway_allowed_betas", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _local_redis_password(self) -> Self:
        # `claudebox-pool up` starts its Redis with a generated password, recorded in the run
        # directory; a later command in the same home finds it there.
        try:
            password = self.local_redis_password_file.read_text().strip()
        except OSError:
            return self
        if password:
            self.broker_url = _with_password(self.broker_url, password)
            self.result_backend = _with_password(self.result_backend, password)
        return self

    @property
    def local_redis_password_file(self) -> Path:
        """Where ``up`` keeps the password of the Redis it started (mode 0600)."""
        return self.home / "run" / "redis" / "password"

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


LOCAL_REDIS_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _with_password(url: str, password: str) -> str:
    """A loopback ``redis://`` URL without a password, given ``password``; others unchanged."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.password or parts.hostname not in LOCAL_REDIS_HOSTS:
        return url
    return urlunsplit(parts._replace(netloc=f":{password}@{parts.netloc.rpartition('@')[2]}"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (call ``get_settings.cache_clear()`` after env edits).

    Raises :class:`InvalidSettingError` naming each variable whose value is refused.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise InvalidSettingError(_refused(exc)) from None
    except SettingsError as exc:
        # pydantic-settings raises this one, not a ValidationError, for a JSON value it cannot
        # parse; its message names the field and the source, its cause says what is wrong.
        found = re.search(r'field "(\w+)"', str(exc))
        field = found.group(1) if found else ""
        raise InvalidSettingError(
            f"{_variable(field)}: not valid JSON ({exc.__cause__}); correct or unset it"
        ) from None


def _dotenv() -> dict[str, str | None]:
    return dotenv_values(ENV_FILE, encoding="utf-8") if ENV_FILE.is_file() else {}


def _variable(field: str, value: str = "") -> str:
    """A field's variable name, the value given (if any) and where it was read."""
    variable = f"{PREFIX}{field.upper()}"
    in_environment = any(name.upper() == variable for name in os.environ)
    return f"{variable}{value} (in {'the environment' if in_environment else ENV_FILE})"


def _refused(error: ValidationError) -> str:
    """One line: each refused variable, its value (unless a secret) and what is wrong."""
    problems: dict[str, str] = {}
    for each in error.errors():
        field, *inner = (str(part) for part in each["loc"])
        info = Settings.model_fields.get(field)
        secret = info is not None and SecretStr in (info.annotation, *get_args(info.annotation))
        value = each.get("input")
        shown = f"={value!r}" if isinstance(value, str) and not secret and len(value) < 80 else ""
        where = f"{'.'.join(inner)}: " if inner else ""
        message = " ".join(each["msg"].split())
        problems.setdefault(field, f"{_variable(field, shown)}: {where}{message}")
    return "; ".join(problems.values()) + "; correct or unset it"


@lru_cache(maxsize=1)
def unknown_variables() -> tuple[str, ...]:
    """A warning for each ``CLAUDEBOX_*`` variable of the environment or ``.env`` that names no
    setting (a typo is otherwise silently ignored), with the closest real name if one is near."""
    return tuple(unknown_variable_warnings(os.environ, _dotenv()))


def unknown_variable_warnings(
    environ: Mapping[str, str], dotenv: Mapping[str, str | None]
) -> list[str]:
    fields = [name.upper() for name in Settings.model_fields]
    seen: dict[str, str] = {}
    for where, names in (("", environ), (f" (in {ENV_FILE})", dotenv)):
        for name in names:
            if name.upper().startswith(PREFIX):
                seen.setdefault(name.upper(), f"{name}{where}")
    warnings = []
    for upper, shown in sorted(seen.items()):
        # Compared without the prefix, which every name shares and would make all look close.
        rest = upper.removeprefix(PREFIX)
        if rest in fields:
            continue
        close = difflib.get_close_matches(rest, fields, n=1)
        hint = f"; did you mean {PREFIX}{close[0]}?" if close else " (see the README's settings)"
        warnings.append(f"{shown} is not a claudebox-pool setting{hint}")
    return warnings


def settings_markdown() -> str:
    """The README's settings table, generated from :class:`Settings`."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, dict):
            default = json.dumps({key: value.model_dump() for key, value in default.items()})
        shown = "(unset)" if default in (None, []) else f"`{default}`"
        rows.append(f"| `{PREFIX}{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
