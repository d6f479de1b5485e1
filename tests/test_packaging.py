"""The package as a user installs it: a wheel built from this checkout, installed (not editable)
into a fresh venv with exactly the lock's versions, runs a pool from any working directory; and
a user's `tasks.py`, `workers.py`, `producer.py` or `celery.py` there changes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from claudebox_pool.tasks import keys
from tests.support.processes import REPO, RedisServer, die_with_parent, free_port, wait_for

pytestmark = pytest.mark.slow

UV = Path(sys.executable).parent / "uv"
# Read before any fixture moves HOME: the cache that makes the install take seconds.
UV_CACHE = os.environ.get("UV_CACHE_DIR") or str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uv"
)
OUR_NAMES = ("tasks", "workers", "producer")
CLASHING = {
    "tasks.py": "raise RuntimeError('the user\\'s tasks.py was imported')\n",
    "workers.py": "ClaudeBox = app = None  # names our modules define\n",
    "producer.py": "raise RuntimeError('the user\\'s producer.py was imported')\n",
    "celery.py": "raise RuntimeError('the user\\'s celery.py was imported')\n",
}


@dataclass(frozen=True)
class Install:
    """Where the interpreter and the `claudebox-pool` command of one installation live."""

    bin: Path
    wheel: Path | None = None

    @property
    def python(self) -> str:
        return str(self.bin / "python")

    @property
    def command(self) -> str:
        return str(self.bin / "claudebox-pool")


def clean_env(home: Path, **settings: str) -> dict[str, str]:
    """This process's environment without its pool settings or any path to the checkout."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CLAUDEBOX_") and name not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    return {**env, "HOME": str(home), **settings}


def uv(*args: str | Path) -> None:
    subprocess.run(
        [str(UV), *map(str, args)],
        cwd=REPO,
        env={**os.environ, "UV_CACHE_DIR": UV_CACHE},
        check=True,
        capture_output=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    root = tmp_path_factory.mktemp("wheel")
    requirements = root / "requirements.txt"
    uv(
        "export",
        "--frozen",
        "--no-dev",
        "--no-emit-project",
        "--no-hashes",
        "-q",
        "-o",
        requirements,
    )
    # sdist first, then the wheel from it: what a user of the published package gets.
    uv("build", "-q", "-o", root / "dist", REPO)
    (wheel,) = (root / "dist").glob("*.whl")
    uv("venv", "-q", "--python", sys.executable, root / "venv")
    uv(
        "pip",
        "install",
        "-q",
        "--python",
        root / "venv" / "bin" / "python",
        "-r",
        requirements,
        wheel,
    )
    return Install(root / "venv" / "bin", wheel)


@pytest.fixture
def clashing_cwd(tmp_path: Path) -> Path:
    cwd = tmp_path / "project"
    cwd.mkdir()
    for name, text in CLASHING.items():
        (cwd / name).write_text(text)
    return cwd


def run(
    install: Install, *args: str, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [install.command, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_the_wheel_adds_one_top_level_package_with_everything_a_worker_reads(
    installed: Install,
) -> None:
    assert installed.wheel is not None
    names = zipfile.ZipFile(installed.wheel).namelist()

    assert {name.split("/")[0] for name in names} == {
        "claudebox_pool",
        "claudebox_pool-0.1.0.dist-info",
    }
    for needed in (
        "claudebox_pool/py.typed",
        "claudebox_pool/workers/runtimes/exec_server.py",  # copied into every bwrap sandbox
        "claudebox_pool/producer/flowerconfig.py",  # Flower's --conf
    ):
        assert needed in names


@pytest.mark.parametrize("which", ["checkout", "wheel"])
def test_no_module_is_importable_as_plain_tasks_workers_or_producer(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    install = installed_or_checkout(which, request)
    probe = f"import importlib.util as u; print([n for n in {OUR_NAMES!r} if u.find_spec(n)])"

    done = subprocess.run(
        [install.python, "-c", probe],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )

    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("which", ["checkout", "wheel"])
def test_the_public_api_and_doctor_ignore_clashing_modules_in_the_cwd(
    which: str, request: pytest.FixtureRequest, clashing_cwd: Path, tmp_path: Path
) -> None:
    install = installed_or_checkout(which, request)
    env = clean_env(tmp_path)
    api = (
        "from claudebox_pool import ClaudeBox, SessionNotFoundError\n"
        "import claudebox_pool.producer.cli, claudebox_pool.workers.app\n"
        "print(ClaudeBox.__module__, SessionNotFoundError.__module__)\n"
    )
    # Without its celery.py: a module named like any dependency shadows it for `python -c`,
    # whatever package imports it.
    (clashing_cwd / "celery.py").unlink()

    imported = subprocess.run(
        [install.python, "-c", api], cwd=clashing_cwd, env=env, capture_output=True, text=True
    )

    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == [
        "claudebox_pool.producer.client",
        "claudebox_pool.tasks.errors",
    ]

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    try:
        doctor = run(
            install,
            "doctor",
            cwd=clashing_cwd,
            env={**env, "CLAUDEBOX_BROKER_URL": redis_server.url},
        )
    finally:
        redis_server.stop()

    assert "Traceback" not in doctor.stderr, doctor.stderr
    assert f"redis              ok {redis_server.url}" in doctor.stdout
    assert "workers            no none running" in doctor.stdout
    assert doctor.returncode == 3  # no worker: the one failure it reports


def installed_or_checkout(which: str, request: pytest.FixtureRequest) -> Install:
    if which == "wheel":
        install: Install = request.getfixturevalue("installed")
        return install
    return Install(Path(sys.executable).parent)


@pytest.fixture
def wheel_pool(installed: Install, clashing_cwd: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A redis-server and one worker started with the installed `claudebox-pool worker`, from a
    working directory full of clashing modules; yields the environment to reach them."""
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    env = clean_env(
        tmp_path / "home",
        CLAUDEBOX_BROKER_URL=redis_server.url,
        CLAUDEBOX_RESULT_BACKEND=redis_server.url,
        CLAUDEBOX_RUNTIME="bwrap",
        CLAUDEBOX_AGENT="shell",
        CLAUDEBOX_WORKER_HEARTBEAT_S="1",
    )
    hostname = f"pkg-{uuid.uuid4().hex[:8]}@test"
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [installed.command, "worker", "--concurrency", "1", "--hostname", hostname],
            cwd=clashing_cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    client = redis_server.client()

    def ready() -> bool:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{log_path.read_text()[-3000:]}")
        return client.zscore(keys.workers(), hostname) is not None

    try:
        wait_for(ready, 90, f"worker {hostname} from the wheel to be ready")
        yield env
    finally:
        worker.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        redis_server.stop()


def test_a_worker_from_the_wheel_runs_code_submit_and_doctor(
    installed: Install, wheel_pool: dict[str, str], clashing_cwd: Path
) -> None:
    env = wheel_pool

    code = run(
        installed, "code", "wheel-demo", "echo hi > hi.txt && cat hi.txt", cwd=clashing_cwd, env=env
    )

    assert (code.returncode, code.stdout) == (0, "hi\n"), code.stderr
    workspace = Path(env["HOME"]) / ".claudebox" / "sessions" / "wheel-demo" / "workspace"
    assert (workspace / "hi.txt").read_text() == "hi\n"

    jobs = clashing_cwd / "jobs.jsonl"
    jobs.write_text(
        "\n".join(
            json.dumps(
                {"id": f"job-{n}", "session_id": "wheel-batch", "prompt": f"echo {n} >> n.txt"}
            )
            for n in range(3)
        )
        + "\n"
    )
    submitted = run(
        installed, "submit", "jobs.jsonl", "--results", "results.jsonl", cwd=clashing_cwd, env=env
    )

    assert submitted.returncode == 0, submitted.stderr
    results = [
        json.loads(line) for line in (clashing_cwd / "results.jsonl").read_text().splitlines()
    ]
    assert sorted((r["id"], r["success"]) for r in results) == [
        ("job-0", True),
        ("job-1", True),
        ("job-2", True),
    ]
    batch = Path(env["HOME"]) / ".claudebox" / "sessions" / "wheel-batch" / "workspace" / "n.txt"
    assert batch.read_text().split() == ["0", "1", "2"]

    doctor = run(installed, "doctor", cwd=clashing_cwd, env=env)

    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "workers            ok 1 alive" in doctor.stdout


def test_up_from_the_wheel_runs_a_batch_and_down_stops_it(
    installed: Install, clashing_cwd: Path, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = clean_env(
        tmp_path / "home",
        CLAUDEBOX_BROKER_URL=url,
        CLAUDEBOX_RESULT_BACKEND=url,
        CLAUDEBOX_RUNTIME="bwrap",
    )
    (clashing_cwd / "jobs.jsonl").write_text('{"session_id": "up-1", "prompt": "echo up"}\n')

    up = run(
        installed,
        "up",
        "--detach",
        "--workers",
        "1",
        "--concurrency",
        "1",
        cwd=clashing_cwd,
        env=env,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        submitted = run(
            installed, "submit", "jobs.jsonl", "--results", "r.jsonl", cwd=clashing_cwd, env=env
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        (result,) = [
            json.loads(line) for line in (clashing_cwd / "r.jsonl").read_text().splitlines()
        ]
        assert (result["success"], result["response"]) == (True, "up\n")
    finally:
        down = run(installed, "down", "--timeout", "10", cwd=clashing_cwd, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (tmp_path / "home" / ".claudebox" / "run" / "pool.json").exists()
