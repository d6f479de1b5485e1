"""deploy/: linted with the tools that run without a container engine or a cluster, and checked
for what a production pool needs (passwords, persistence, one beat, warm shutdown).

Tools: the Compose specification's JSON schema (vendored by check-jsonschema), the Kubernetes
OpenAPI schemas (kubernetes-validate), hadolint for the Dockerfile, `systemd-analyze verify`
for the units and `kubectl kustomize` for the overlays (each of the last two where installed),
and Grafana's own dashboard models (grafana-foundation-sdk) for the dashboard.
"""

from __future__ import annotations

import json
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
from grafana_foundation_sdk.cog.encoder import JSONEncoder as GrafanaEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard as GrafanaDashboard

from claudebox_pool.tasks.connections import sync_redis
from claudebox_pool.tasks.settings import CLAUDE_CLI_VERSION, Settings, get_settings
from claudebox_pool.workers.metrics import PoolCollector, Recorded
from claudebox_pool.workers.store import SessionStore
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


# Monitoring: the workers' metrics, Prometheus and the Grafana dashboard

DASHBOARD = DEPLOY / "grafana" / "claudebox.json"
METRIC = re.compile(r"\bclaudebox_[a-z0-9_]+\b")
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}


def dashboard() -> Manifest:
    loaded: Manifest = json.loads(DASHBOARD.read_text())
    return loaded


def lost(original: Any, loaded: Any, path: str = "") -> list[str]:
    """Where ``loaded`` misses or changes something of ``original``, as paths."""
    if isinstance(original, dict):
        if not isinstance(loaded, dict):
            return [path]
        return [
            where
            for key, value in original.items()
            for where in (
                lost(value, loaded[key], f"{path}.{key}") if key in loaded else [f"{path}.{key}"]
            )
        ]
    if isinstance(original, list):
        if not isinstance(loaded, list) or len(original) != len(loaded):
            return [path]
        return [
            where
            for index, (a, b) in enumerate(zip(original, loaded, strict=True))
            for where in lost(a, b, f"{path}[{index}]")
        ]
    return [] if original == loaded else [f"{path}: {original!r} became {loaded!r}"]


def not_in_grafanas_schema(board: Manifest) -> list[str]:
    """What Grafana's own dashboard models (grafana-foundation-sdk, generated from Grafana's
    schemas, with its panel and Prometheus query types) do not carry: they load what they know
    and drop the rest, so a key the schema lacks, misspelt or misplaced, is listed."""
    register_default_plugins()
    loaded = json.loads(json.dumps(GrafanaDashboard.from_json(board), cls=GrafanaEncoder))
    return lost(board, loaded)


def queries(board: Manifest) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def defined_samples(settings: Settings) -> dict[str, set[str]]:
    """Each metric family the workers serve, with the names its samples carry."""
    families = [family for metric in vars(Recorded()).values() for family in metric.collect()]
    store = SessionStore(settings.sessions_root)
    collector = PoolCollector(settings, sync_redis(settings), store, lambda: {"idle": 0})
    families += list(collector.collect())
    return {
        family.name: {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
        for family in families
    }


def test_the_grafana_dashboard_loads_into_grafanas_dashboard_schema_whole() -> None:
    board = dashboard()
    misspelt = json.loads(DASHBOARD.read_text().replace('"gridPos"', '"gridpos"', 1))
    misplaced = json.loads(DASHBOARD.read_text().replace('"legendFormat"', '"legend"', 1))

    assert not_in_grafanas_schema(board) == []
    # The check does catch a wrong key, in a panel and in a Prometheus query.
    assert not_in_grafanas_schema(misspelt) != []
    assert not_in_grafanas_schema(misplaced) != []
    assert {panel["type"] for panel in board["panels"]} <= {"row", "timeseries", "stat"}
    assert {
        target["datasource"]["type"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
    } == {"prometheus"}


def test_every_dashboard_query_reads_metrics_the_workers_serve_and_every_metric_has_a_panel(
    pool_env: dict[str, str],
) -> None:
    served = defined_samples(get_settings())
    samples = set().union(*served.values())
    read = {name for expr in queries(dashboard()) for name in METRIC.findall(expr)}

    assert read - samples == set()
    assert {family for family, names in served.items() if not names & read} == set()


def test_metrics_ports_stay_on_the_internal_networks() -> None:
    services = compose()["services"]
    worker = services["worker"]
    port = int(worker["environment"]["CLAUDEBOX_METRICS_PORT"])
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    config = by_kind(resources(DEPLOY / "k8s" / "base"), "ConfigMap", "claudebox-config")

    assert "ports" not in worker and worker["expose"] == [str(port)]
    assert jobs["claudebox-workers"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": port, "refresh_interval": "30s"}
    ]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert [p.split(":")[0] for p in services[name]["ports"]] == ["127.0.0.1"]
    assert int(config["data"]["CLAUDEBOX_METRICS_PORT"]) == port
    for overlay in OVERLAYS:
        manifests = resources(DEPLOY / "k8s" / overlay)
        [worker_container] = [c for c in containers(manifests) if c["name"] == "worker"]
        assert {"name": "metrics", "containerPort": port} in worker_container["ports"]
        kind = "Deployment" if overlay == "shared" else "StatefulSet"
        pod = by_kind(manifests, kind, "claudebox-worker")["spec"]["template"]["metadata"]
        assert pod["annotations"]["prometheus.io/port"] == str(port)
        service = by_kind(manifests, "Service", "claudebox-worker-metrics")["spec"]
        assert service.get("type", "ClusterIP") == "ClusterIP"
        assert service["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics"}]
