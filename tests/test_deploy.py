"""deploy/: linted with the tools that run without a container engine or a cluster, and checked
for what a production pool needs (passwords, persistence, one beat, warm shutdown).

Tools: the Compose specification's JSON schema (vendored by check-jsonschema), the Kubernetes
OpenAPI schemas (kubernetes-validate), hadolint for the Dockerfile, `systemd-analyze verify`
for the units and `kubectl kustomize` for the overlays (each of the last two where installed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from claudebox_pool.tasks.settings import CLAUDE_CLI_VERSION, Settings
from tests.support.processes import REPO

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
OVERLAYS = ("shared", "pinned")
UNITS = [
    *sorted((DEPLOY / "systemd").glob("*.service")),
    DEPLOY / "flower" / "claudebox-flower.service",
]
INSTALLED_CLI = "/opt/claudebox-pool/.venv/bin/claudebox-pool"
STOP_AFTER_S = max(
    Settings.model_fields["task_time_limit_s"].default,
    Settings.model_fields["shutdown_grace_s"].default,
)
"""What a worker's stop timeout must exceed: the longest task, and the shutdown grace after
which the worker requeues what still runs (a service manager's SIGKILL before it loses that)."""
VENV_BIN = Path(sys.executable).parent

Manifest = dict[str, Any]


PROVIDED_BY = {"kubectl": "kubectl", "systemd-analyze": "systemd"}
"""Host tools the checks use beyond the dev dependencies, and what provides them."""


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"needs {name} on this host (from {PROVIDED_BY.get(name, name)})")
    return found


def duration_s(text: str) -> int:
    """A compose or systemd duration ("65m", "65min", "30s") in seconds."""
    found = re.fullmatch(r"(\d+)(s|m|min|h)", text)
    assert found, text
    return int(found.group(1)) * {"s": 1, "m": 60, "min": 60, "h": 3600}[found.group(2)]


# Compose


def compose() -> Manifest:
    loaded: Manifest = yaml.safe_load(COMPOSE.read_text())
    return loaded


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    misspelt = tmp_path / "compose.yaml"
    misspelt.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_perod:"))

    assert check_compose(COMPOSE).returncode == 0, check_compose(COMPOSE).stdout
    assert check_compose(misspelt).returncode == 1  # the schema does catch a wrong key


def test_compose_redis_has_a_password_an_append_only_file_no_eviction_and_no_port() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])

    assert "requirepass" in command and "$$REDIS_PASSWORD" in command
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "ports" not in redis
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_compose_workers_scale_share_sessions_and_outlast_a_task_when_stopped() -> None:
    services = compose()["services"]
    worker = services["worker"]

    assert "container_name" not in worker and "ports" not in worker
    assert any(v.endswith(":/var/lib/claudebox/sessions") for v in worker["volumes"])
    assert worker["environment"]["CLAUDEBOX_NODE_NAME"] == "compose"
    assert duration_s(worker["stop_grace_period"]) > STOP_AFTER_S
    assert services["beat"]["command"] == ["beat"]
    assert "deploy" not in services["beat"]  # never replicated
    assert {name for name, s in services.items() if "healthcheck" in s} >= {
        "redis",
        "worker",
        "flower",
    }


def test_compose_flower_requires_credentials_and_listens_on_loopback_only() -> None:
    flower = compose()["services"]["flower"]

    assert flower["environment"]["CLAUDEBOX_FLOWER_BASIC_AUTH"].startswith(
        "${CLAUDEBOX_FLOWER_BASIC_AUTH:?"
    )
    assert [port.split(":")[0] for port in flower["ports"]] == ["127.0.0.1"]


def test_compose_flower_is_healthy_only_while_the_pool_can_take_work() -> None:
    probe = " ".join(compose()["services"]["flower"]["healthcheck"]["test"])

    assert "127.0.0.1:5555/health'" in probe  # the pool's health, not Flower's /healthcheck


# Secrets


SECRETS = re.compile(
    r"redis://:(?P<url>\$\{[^}]*\}|[^@\s]+)@"
    r"|^[# \t-]*[\w.]*(?:PASSWORD|BASIC_AUTH|API_KEY)[ \t]*(?:=|:[ \t])[ \t]*(?P<value>.*?)[ \t]*$",
    re.MULTILINE,
)
REFERENCE = re.compile(r"\$\{[A-Z_]+(:[-?][^}]*)?\}|\$\([A-Z_]+\)|\$\$?[A-Z_]+|")
ILLUSTRATIVE = re.compile(r"CHANGE-ME|password|secret", re.IGNORECASE)


def test_no_deploy_file_holds_a_secret() -> None:
    """Every password in deploy/ is a reference (${VAR}, $(VAR)) or an obvious placeholder."""
    found = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for match in SECRETS.finditer(path.read_text(errors="ignore")):
            value = (match.group("url") or match.group("value") or "").strip("\"'")
            if not REFERENCE.fullmatch(value) and not ILLUSTRATIVE.search(value):
                found.append(f"{path.relative_to(REPO)}: {value}")

    assert found == []


# Kubernetes


def resources(kustomization_dir: Path) -> list[Manifest]:
    """The objects a kustomization lists, read the way `kubectl kustomize` would gather them."""
    kustomization = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    found: list[Manifest] = []
    for entry in kustomization["resources"]:
        path = (kustomization_dir / entry).resolve()
        if path.is_dir():
            found += resources(path)
        else:
            found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def invalid(manifests: list[Manifest]) -> list[str]:
    problems = []
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest, "1.37.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {exc.message}")
    return problems


def by_kind(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    return next(m for m in manifests if (m["kind"], m["metadata"]["name"]) == (kind, name))


def containers(manifests: list[Manifest]) -> list[Manifest]:
    pods = [m["spec"]["template"]["spec"] for m in manifests if "template" in m.get("spec", {})]
    return [container for pod in pods for container in pod["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_manifests_follow_the_kubernetes_schemas(overlay: str) -> None:
    manifests = resources(DEPLOY / "k8s" / overlay)
    broken = dict(manifests[0], bogus=True)

    assert invalid(manifests) == []
    assert invalid([broken]) != []  # strict validation does catch an unknown field


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_builds_each_overlay_into_valid_objects(overlay: str) -> None:
    built = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert built.returncode == 0, built.stderr
    manifests = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert invalid(manifests) == []
    assert {m["metadata"].get("namespace") for m in manifests if m["kind"] != "Namespace"} == {
        "claudebox-pool"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_pods_take_redis_and_flower_passwords_from_the_secret(overlay: str) -> None:
    manifests = resources(DEPLOY / "k8s" / overlay)

    for container in containers(manifests):
        env = {item["name"]: item for item in container.get("env", [])}
        for name in ("REDIS_PASSWORD", "CLAUDEBOX_FLOWER_BASIC_AUTH"):
            if name in env:
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "claudebox-secrets"
        for name in ("CLAUDEBOX_BROKER_URL", "CLAUDEBOX_RESULT_BACKEND"):
            if name in env:
                assert env[name]["value"].startswith("redis://:$(REDIS_PASSWORD)@")
    flower = by_kind(manifests, "Deployment", "flower")["spec"]["template"]["spec"]
    assert "CLAUDEBOX_FLOWER_BASIC_AUTH" in {e["name"] for e in flower["containers"][0]["env"]}
    services = [m for m in manifests if m["kind"] == "Service"]
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_runs_one_beat_and_lets_workers_finish_their_tasks(overlay: str) -> None:
    manifests = resources(DEPLOY / "k8s" / overlay)
    beat = by_kind(manifests, "Deployment", "claudebox-beat")["spec"]
    kind = "Deployment" if overlay == "shared" else "StatefulSet"
    worker = by_kind(manifests, kind, "claudebox-worker")["spec"]

    assert (beat["replicas"], beat["strategy"]["type"]) == (1, "Recreate")
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] > STOP_AFTER_S
    node = {e["name"]: e for e in worker["template"]["spec"]["containers"][0]["env"]}[
        "CLAUDEBOX_NODE_NAME"
    ]
    if overlay == "shared":
        claim = by_kind(manifests, "PersistentVolumeClaim", "claudebox-sessions")
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert node["value"] == "shared"
    else:
        assert worker["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert node["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_flower_is_ready_only_while_the_pool_can_take_work(overlay: str) -> None:
    manifests = resources(DEPLOY / "k8s" / overlay)
    [flower] = by_kind(manifests, "Deployment", "flower")["spec"]["template"]["spec"]["containers"]

    assert flower["readinessProbe"]["httpGet"]["path"] == "/health"
    assert flower["livenessProbe"]["httpGet"]["path"] == "/healthcheck"


# Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False
    )

    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_installs_the_claude_cli_version_the_project_pins() -> None:
    pinned = re.search(r"ARG CLAUDE_CODE_VERSION=(\S+)", (DEPLOY / "Dockerfile").read_text())

    assert pinned is not None
    assert pinned.group(1) == CLAUDE_CLI_VERSION


def test_dockerfile_installs_from_the_lock_with_the_uv_it_names() -> None:
    lock = (DEPLOY.parent / "uv.lock").read_text()
    locked = re.search(r'name = "uv"\nversion = "([^"]+)"', lock)
    dockerfile = (DEPLOY / "Dockerfile").read_text()

    assert locked is not None
    assert f"uv=={locked.group(1)}" in dockerfile
    assert "uv export --frozen" in dockerfile
    assert "--require-hashes" in dockerfile


# systemd


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify checks that ExecStart exists: point the units at this checkout's install.
    for unit in [*UNITS, DEPLOY / "systemd" / "claudebox-pool.target"]:
        text = unit.read_text().replace(INSTALLED_CLI, str(VENV_BIN / "claudebox-pool"))
        (tmp_path / unit.name).write_text(text)

    done = subprocess.run(
        [analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        check=False,
    )

    # It warns about unknown or malformed settings on stderr but still exits 0.
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_systemd_units_read_secrets_from_a_file_and_stop_warm() -> None:
    worker = (DEPLOY / "systemd" / "claudebox-worker@.service").read_text()

    assert all("EnvironmentFile=/etc/claudebox/env" in unit.read_text() for unit in UNITS)
    assert "KillMode=mixed" in worker
    stop = re.search(r"TimeoutStopSec=(\S+)", worker)
    assert stop is not None and duration_s(stop.group(1)) > STOP_AFTER_S
