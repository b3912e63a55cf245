"""`synapse-router routes audit`, `config from-synapse` and `config check` against the real
Synapse that scripts/synapse_deploy.py installs (the full topology, whose configuration has a
process of every kind the route table names): the audit runs synapse_introspect.py with that
Synapse's interpreter and finds no misroute and no uncovered servlet; the router
configuration written from the deployment's Synapse files checks clean against them, and routes
real requests to the stream writer that `stream_writers` names."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import ROOT, Router

from .conftest import HEALTH, WHOAMI, wait_until_routing
from .deployment import Deployment

pytestmark = pytest.mark.e2e

LAUNCHER = Path(sys.executable).parent / "synapse-router"


def synapse_files(dep: Deployment) -> list[str]:
    state = Path(dep.info["state_dir"])
    workers = sorted(dep.info["resources"])  # every worker of the topology
    return [str(state / "homeserver.yaml"), *(str(state / "workers" / f"{name}.yaml") for name in workers)]


def test_routes_audit_against_the_installed_synapse(full_deployment: Deployment, tmp_path: Path) -> None:
    saved = tmp_path / "servlets.json"
    done = subprocess.run(
        [
            LAUNCHER,
            "routes",
            "audit",
            "--synapse-python",
            full_deployment.info["python"],
            "--save-servlets",
            str(saved),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Synapse {full_deployment.info['synapse_version']}:" in done.stdout
    assert "misrouted: 0\n" in done.stdout and "uncovered (no route, and main does not serve it): 0\n" in done.stdout
    assert saved.stat().st_size > 10_000


def test_config_from_synapse_checks_clean_and_routes_to_the_writer(
    full_deployment: Deployment, start_router: Callable[..., Router], tmp_path: Path
) -> None:
    files = synapse_files(full_deployment)
    out = tmp_path / "router.yaml"
    done = subprocess.run([LAUNCHER, "config", "from-synapse", *files, "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pools = yaml.safe_load(out.read_text())["workers"]
    workers = full_deployment.workers
    for stream, names in full_deployment.info["stream_writers"].items():
        if stream != "events":
            assert pools[stream] == [workers[n] for n in names], stream
    done = subprocess.run([LAUNCHER, "config", "check", str(out), "--synapse", *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 disagreement(s)" in done.stdout

    router = start_router(
        full_deployment.main, {"workers": pools, "health": HEALTH, "whoami": WHOAMI, "debug_headers": True}
    )
    wait_until_routing(router)
    response = httpx.put(f"{router.url}/_matrix/client/v3/sendToDevice/m.x/1", json={"messages": {}}, timeout=60)
    assert response.status_code == 401  # no token; what matters is who answered
    assert response.headers["X-Synapse-Router-Worker"] == pools["to_device"][0]
