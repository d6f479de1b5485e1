"""``claudebox-pool doctor``: can this pool work, and if not, what to do."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.connections import redacted, sync_redis, text
from claudebox_pool.tasks.models import WorkerInfo
from claudebox_pool.tasks.settings import Settings, find_cli, get_settings

Status = Literal["ok", "warn", "no", "info"]
SHOWN: dict[Status, str] = {
    "ok": "[green]ok[/] ",
    "no": "[red]no[/] ",
    "warn": "[yellow]warn[/] ",
    "info": "",
}
CLI_PACKAGE = "@anthropic-ai/claude-code"


class Check(BaseModel):
    name: str
    status: Status
    detail: str


class DoctorReport(BaseModel):
    """What ``claudebox-pool doctor`` found; ``ok`` when the pool can run work."""

    ok: bool
    checks: list[Check]
    workers: list[WorkerInfo]
    """The alive workers that have described themselves."""
    undescribed: list[str] = []
    """Alive workers that have not described themselves yet."""


def doctor_report(out: Console) -> bool:
    """Print each check; True when the pool can run work."""
    report = examine()
    for check in report.checks:
        out.print(f"{check.name:<18} {SHOWN[check.status]}{escape(check.detail)}", highlight=False)
    for name in report.undescribed:
        out.print(f"  {name}: (no details yet)")
    for info in report.workers:
        name = info.hostname
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
    return report.ok


def examine() -> DoctorReport:
    """Check the tools, Redis and the workers."""
    settings = get_settings()
    checks = [
        Check(name="sessions root", status="info", detail=str(settings.sessions_root)),
        Check(name="default agent", status="info", detail=settings.agent),
        Check(name="runtime setting", status="info", detail=settings.runtime),
    ]
    for tool, why in (
        ("redis-server", "for `claudebox-pool up` (apt-get install redis-server)"),
        ("bwrap", "for the bwrap sandbox (apt-get install bubblewrap)"),
        ("socat", "for the model gateway bridge (apt-get install socat)"),
        ("npm", "for `claudebox-pool install-cli`"),
    ):
        found = shutil.which(tool)
        checks.append(Check(name=tool, status="ok" if found else "no", detail=found or why))
    status, detail = node_check(settings)
    checks.append(Check(name="node", status=status, detail=detail))

    client = sync_redis(settings)
    url = redacted(settings.broker_url)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        checks.append(Check(name="redis", status="no", detail=f"{url}: {exc}"))
        return DoctorReport(ok=False, checks=checks, workers=[])
    checks.append(Check(name="redis", status="ok", detail=url))

    since = time.time() - settings.worker_alive_s
    members: list[bytes] = client.zrangebyscore(keys.workers(), since, "+inf")  # type: ignore[assignment]
    alive = [text(name) for name in members]
    if not alive:
        detail = "none running: start one with `claudebox-pool worker`"
        checks.append(Check(name="workers", status="no", detail=detail))
        return DoctorReport(ok=False, checks=checks, workers=[])
    checks.append(Check(name="workers", status="ok", detail=f"{len(alive)} alive"))
    workers, undescribed = [], []
    for name in alive:
        raw = client.hget(keys.worker_info(), name)
        try:
            info = WorkerInfo.model_validate_json(raw) if raw else None
        except ValidationError:
            info = None
        if info is None:
            undescribed.append(name)
        else:
            workers.append(info)
    return DoctorReport(ok=True, checks=checks, workers=workers, undescribed=undescribed)


def node_check(settings: Settings) -> tuple[Status, str]:
    """Node's version against the engine the Claude Code CLI's package declares. A mismatch is
    a warning: npm installs the CLI anyway (EBADENGINE) and its native binary runs."""
    cli = find_cli(settings)
    package = cli_package(cli) if cli else None
    engine = package.get("engines", {}).get("node") if package else None
    version = node_version()
    if not isinstance(engine, str):
        what = "Claude Code CLI declares no Node engine" if cli else "Claude Code CLI not found"
        return "info", f"{version or 'not found'} ({what})"
    declared = f"Claude Code {package.get('version', '?') if package else '?'} declares {engine}"
    fix = "install a Node.js in that range (nodejs.org, or nvm)"
    if version is None:
        return "warn", f"not found; {declared}: {fix}"
    matches = satisfies(version, engine)
    if matches is None:
        return "info", f"{version}; {declared} (a range doctor cannot check)"
    if matches:
        return "ok", f"{version}; {declared}"
    return "warn", f"{version}, but {declared}: the CLI runs here but is unsupported; {fix}"


def cli_package(cli: Path) -> dict[str, Any] | None:
    """The CLI's package.json: the binary (resolved) sits in the package's directory tree."""
    for directory in cli.resolve().parents:
        manifest = directory / "package.json"
        if manifest.is_file():
            try:
                package = json.loads(manifest.read_text())
            except (OSError, ValueError):
                return None
            return (
                package
                if isinstance(package, dict) and package.get("name") == CLI_PACKAGE
                else None
            )
    return None


def node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


Version = tuple[int, int, int]
COMPARATOR = re.compile(r"(>=|<=|>|<|=|\^|~)?\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def satisfies(version: str, engine: str) -> bool | None:
    """Whether ``version`` (``v20.1.0``) is in npm's range ``engine`` (``>=22.0.0``,
    ``^18 || >=20``, ...); None for a range this small reader does not understand."""
    parsed = COMPARATOR.fullmatch(version.strip())
    if parsed is None or parsed.group(1):
        return None
    have = _version(parsed)
    for alternative in engine.split("||"):
        tokens = alternative.split()
        comparators = [COMPARATOR.fullmatch(token) for token in tokens]
        if not tokens or any(each is None for each in comparators):
            return None
        if all(_holds(have, each) for each in comparators if each is not None):
            return True
    return False


def _version(match: re.Match[str]) -> Version:
    return (int(match.group(2)), int(match.group(3) or 0), int(match.group(4) or 0))


def _holds(have: Version, comparator: re.Match[str]) -> bool:
    op, want = comparator.group(1) or "=", _version(comparator)
    major, minor, _ = want
    if op == "^":
        return want <= have < (major + 1, 0, 0)
    if op == "~":
        return want <= have < (major, minor + 1, 0)
    return {
        ">=": have >= want,
        "<=": have <= want,
        ">": have > want,
        "<": have < want,
        "=": have == want,
    }[op]
