"""Fixtures for the end-to-end tests: a real Synapse deployment (scripts/synapse_deploy.py) and
a real mitmdump with the router addon in front of it.

The deployment is brought up once per session. It is taken down at the end only if this session
started it (nothing of it was running before), so a developer's running deployment is left
alone; E2E_KEEP_DEPLOYMENT=1 keeps it up in any case (faster reruns).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.deployment import Deployment, bring_up
from tests.harness import ROOT, Router, RouterStarter

# The router's health checks must notice a stopped or restarted worker within about a second.
HEALTH = {"interval": 0.5, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}
# Real Synapse on a 2-core machine can take more than the default 2 s to answer whoami while it
# is busy (registrations, a 50 MB upload); a timed-out whoami routes by token hash instead of by
# user, which is a different (documented) behaviour than the one these tests check.
WHOAMI = {"timeout": 10}


def _state_dir() -> Path:
    return Path(os.environ.get("E2E_STATE_DIR", ROOT / ".synapse-deploy")).resolve()


@pytest.fixture(scope="session")
def deployment() -> Iterator[Deployment]:
    yield from _deployment(_state_dir())


@pytest.fixture(scope="session")
def full_deployment() -> Iterator[Deployment]:
    """The `full` topology (every kind of process the route table names), in its own state
    directory, sharing the default deployment's Synapse install."""
    state = Path(os.environ.get("E2E_FULL_STATE_DIR", ROOT / ".synapse-deploy-full")).resolve()
    yield from _deployment(state, "full", _state_dir() / "venv")


@pytest.fixture(scope="module")
def mas_deployment() -> Iterator[Deployment]:
    """The `mas` topology (Synapse in MAS mode with the MAS stand-in, QR login on, `compress:
    true`), in its own state directory, sharing the default deployment's Synapse install. Per
    module: only tests/e2e/test_qr_login_mas.py uses it, and its ~800 MB go once that is done."""
    state = Path(os.environ.get("E2E_MAS_STATE_DIR", ROOT / ".synapse-deploy-mas")).resolve()
    yield from _deployment(state, "mas", _state_dir() / "venv")


def _deployment(state: Path, topology: str = "default", venv: Path | None = None) -> Iterator[Deployment]:
    try:
        dep = bring_up(state, topology, venv)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield dep
    finally:
        # A test that stopped a worker restarts it itself; this is the safety net.
        for name in sorted(dep.stopped_workers):
            dep.run("start-worker", name, timeout=180)
        if dep.started_here and os.environ.get("E2E_KEEP_DEPLOYMENT") != "1":
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


def wait_until_routing(r: Router) -> None:
    """Wait until the router answers through to Synapse (the addon has loaded its config)."""
    import httpx

    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{r.url}/_matrix/client/versions", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if r.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"router did not come up:\n{r.log()[-4000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def router(deployment: Deployment, start_router: Callable[..., Router]) -> Iterator[Router]:
    r = start_router(deployment.main, router_config(deployment))
    wait_until_routing(r)
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
