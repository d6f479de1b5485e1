"""``claudebox-pool doctor``: can this pool work, and if not, what to do."""

from __future__ import annotations

import shutil
import time

import redis
from pydantic import ValidationError
from rich.console import Console

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.connections import redacted, sync_redis, text
from claudebox_pool.tasks.models import WorkerInfo
from claudebox_pool.tasks.settings import get_settings

OK = "[green]ok[/]"
BAD = "[red]no[/]"


def doctor_report(out: Console) -> bool:
    """Print each check; True when the pool can run work."""
    settings = get_settings()
    out.print(f"sessions root      {settings.sessions_root}")
    out.print(f"default agent      {settings.agent}")
    out.print(f"runtime setting    {settings.runtime}")
    for tool, why in (
        ("redis-server", "for `claudebox-pool up` (apt-get install redis-server)"),
        ("bwrap", "for the bwrap sandbox (apt-get install bubblewrap)"),
        ("socat", "for the model gateway bridge (apt-get install socat)"),
        ("npm", "for `claudebox-pool install-cli`"),
    ):
        found = shutil.which(tool)
        out.print(f"{tool:<18} {OK if found else BAD} {found or why}", highlight=False)

    client = sync_redis(settings)
    url = redacted(settings.broker_url)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        out.print(f"redis              {BAD} {url}: {exc}", highlight=False)
        return False
    out.print(f"redis              {OK} {url}", highlight=False)

    since = time.time() - settings.worker_alive_s
    members: list[bytes] = client.zrangebyscore(keys.workers(), since, "+inf")  # type: ignore[assignment]
    alive = [text(name) for name in members]
    if not alive:
        out.print(f"workers            {BAD} none running: start one with `claudebox-pool worker`")
        return False
    out.print(f"workers            {OK} {len(alive)} alive")
    for name in alive:
        raw = client.hget(keys.worker_info(), name)
        try:
            info = WorkerInfo.model_validate_json(raw) if raw else None
        except ValidationError:
            info = None
        if info is None:
            out.print(f"  {name}: (no details yet)")
            continue
        cli = (
            f"claude {info.claude_version} at {info.claude_cli}"
            if info.claude_cli
            else ("claude CLI not found (claudebox-pool install-cli)")
        )
        out.print(f"  {name}: {info.runtime_reason}", highlight=False)
        out.print(
            f"  {' ' * len(name)}  {cli}; node {info.node}, sessions in {info.sessions_root}",
            highlight=False,
        )
        if info.warm:
            out.print(f"  {' ' * len(name)}  warm sandboxes: {info.warm}", highlight=False)
        for line in info.containment:
            out.print(f"  {' ' * len(name)}  limit: {line}", highlight=False)
    return True
