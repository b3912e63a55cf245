"""Fixtures for the end-to-end tests: a real Synapse deployment (scripts/synapse_deploy.py) and
a real mitmdump with the router addon in front of it.

The deployment is brought up once per session. It is taken down at the end only if this session
started it (nothing of it was running before), so a developer's running deployment is left
alone; E2E_KEEP_DEPLOYMENT=1 keeps it up in any case (faster reruns).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, Router, RouterStarter

DEPLOY = ROOT / "scripts" / "synapse_deploy.py"
# A first `up` on a fresh machine installs PostgreSQL, Redis and Synapse: minutes, not seconds.
UP_TIMEOUT = 1200.0

# The router's health checks must notice a stopped or restarted worker within about a second.
HEALTH = {"interval": 0.5, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}
# Real Synapse on a 2-core machine can take more than the default 2 s to answer whoami while it
# is busy (registrations, a 50 MB upload); a timed-out whoami routes by token hash instead of by
# user, which is a different (documented) behaviour than the one these tests check.
WHOAMI = {"timeout": 10}


@dataclass
class Deployment:
    info: dict[str, Any]
    state_dir: Path
    started_here: bool
    stopped_workers: set[str] = field(default_factory=set)

    @property
    def main(self) -> str:
        return str(self.info["main"])

    @property
    def workers(self) -> dict[str, str]:
        return dict(self.info["workers"])

    @property
    def worker_of_url(self) -> dict[str, str]:
        return {url: name for name, url in self.workers.items()}

    @property
    def logs(self) -> dict[str, str]:
        return dict(self.info["logs"])

    @property
    def secret(self) -> str:
        return str(self.info["registration_shared_secret"])

    @property
    def server_name(self) -> str:
        return str(self.info["server_name"])

    def run(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(DEPLOY), *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def stop_worker(self, name: str) -> None:
        self.stopped_workers.add(name)
        result = self.run("stop-worker", name, timeout=120)
        assert result.returncode == 0, f"stop-worker {name} failed:\n{result.stderr}"

    def start_worker(self, name: str) -> None:
        result = self.run("start-worker", name, timeout=180)
        assert result.returncode == 0, f"start-worker {name} failed:\n{result.stderr}"
        self.stopped_workers.discard(name)


def _state_dir() -> Path:
    return Path(os.environ.get("E2E_STATE_DIR", ROOT / ".synapse-deploy")).resolve()


def _nothing_running(status_stderr: str) -> bool:
    """`status` says on stderr what is down; every process down (or no deployment at all) means
    that nobody else is using this deployment."""
    if "no deployment in" in status_stderr:
        return True
    names = ("postgres", "redis", "main", "generic1", "generic2", "generic3")
    return all(f"{name} is not running" in status_stderr for name in names)


@pytest.fixture(scope="session")
def deployment() -> Iterator[Deployment]:
    state_dir = _state_dir()
    probe = Deployment({}, state_dir, started_here=False)
    status = probe.run("status", timeout=60)
    started_here = status.returncode != 0 and _nothing_running(status.stderr)
    if status.returncode == 0:
        out = status.stdout
    else:
        up = probe.run("up", timeout=UP_TIMEOUT)
        if up.returncode != 0:
            pytest.fail(f"synapse_deploy.py up failed ({up.returncode}):\n{up.stderr[-4000:]}")
        out = up.stdout
    info = json.loads(out.strip().splitlines()[-1])
    dep = Deployment(info, state_dir, started_here)
    try:
        yield dep
    finally:
        # A test that stopped a worker restarts it itself; this is the safety net.
        for name in sorted(dep.stopped_workers):
            dep.run("start-worker", name, timeout=180)
        if started_here and os.environ.get("E2E_KEEP_DEPLOYMENT") != "1":
            down = dep.run("down", timeout=300)
            if down.returncode != 0:
                print(f"synapse_deploy.py down failed:\n{down.stderr}", file=sys.stderr)


def router_config(dep: Deployment, **overrides: Any) -> dict[str, Any]:
    urls = list(dep.workers.values())
    config: dict[str, Any] = {
        "workers": {"sync": urls, "client_reader": urls},
        "health": HEALTH,
        "whoami": WHOAMI,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def start_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterStarter]:
    """Start a real mitmdump with the addon (as tests/integration's fixture does)."""
    starter = RouterStarter(tmp_path_factory.mktemp("router"))
    try:
        yield starter
    finally:
        starter.stop_all()


@pytest.fixture(scope="session")
def router(deployment: Deployment, start_router: Callable[..., Router]) -> Iterator[Router]:
    r = start_router(deployment.main, router_config(deployment))
    # Wait until the router answers through to Synapse (the addon has loaded its config).
    deadline = time.monotonic() + 30
    import httpx

    while True:
        try:
            if httpx.get(f"{r.url}/_matrix/client/versions", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if r.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"router did not come up:\n{r.log()[-4000:]}")
        time.sleep(0.2)
    yield r
    if r.proc.poll() is not None:
        print(f"router exited with {r.proc.returncode}:\n{r.log()[-4000:]}", file=sys.stderr)


@pytest.fixture(scope="session")
def run_id() -> str:
    """Unique per session, so reruns against a kept database register new users."""
    return f"{time.strftime('%y%m%d%H%M%S')}{os.urandom(2).hex()}"


Names = Callable[[str, int], list[str]]


@pytest.fixture
def names(run_id: str, request: pytest.FixtureRequest) -> Names:
    """names(prefix, n): n fresh localparts for this test."""

    def make(prefix: str, n: int) -> list[str]:
        test = request.node.name.removeprefix("test_").replace("_", "")[:12]
        return [f"e2e{run_id}{test}{prefix}{i}" for i in range(n)]

    return make
