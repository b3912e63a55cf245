"""A real Matrix client, matrix-js-sdk (pinned in tests/e2e/js/package-lock.json), through the
router in front of real Synapse: under both launchers whatever SYNAPSE_ROUTER_LAUNCHER says, on
both topologies of scripts/synapse_deploy.py.

tests/e2e/js/scenario.mjs logs in two users and a second device, syncs with the SDK's own loop
and exercises messages, typing, receipts, read markers, to-device, account data, everyday calls,
presence, 5 MiB of media, simplified sliding sync and logout; it records every response the SDK
got. The router runs with debug headers on and, on the default topology, the README's pools
(sync, client_reader, room over the generic workers); on the full one, a pool for each of its
processes (stream writers, media repository, readers). No request may fail, none may be a 5xx,
every response must carry the debug headers, and no Synapse process may log an ERROR during the
run. scripts/test installs the Node packages (`npm ci`) before pytest runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Router

from .conftest import HEALTH, WHOAMI, Names, wait_until_routing
from .deployment import Deployment
from .matrix_helpers import register_user

pytestmark = pytest.mark.e2e

JS = Path(__file__).resolve().parent / "js"
SDK_VERSION = "37.5.0"
MEDIA_BYTES = 5 * 1024 * 1024
SCENARIO_TIMEOUT = 600.0


def _node() -> str:
    node = shutil.which("node")
    installed = JS / "node_modules" / "matrix-js-sdk" / "package.json"
    if node is None or not installed.exists():
        pytest.fail(f"node or matrix-js-sdk missing: scripts/test installs them (npm ci in {JS})")
    version = json.loads(installed.read_text())["version"]
    assert version == SDK_VERSION, f"matrix-js-sdk {version} installed in {JS}, the lock file pins {SDK_VERSION}"
    return node


# The router's stream-writer pools, named as Synapse names the streams.
WRITER_POOLS = (
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
    "push_rules",
    "device_lists",
    "thread_subscriptions",
)


def _pools(topology: str, dep: Deployment) -> dict[str, list[str]]:
    """default: the README's pools over the generic workers. full: every pool the topology has
    a process for, stream writers as its `stream_writers` says."""
    w = dep.workers
    if topology == "default":
        urls = list(w.values())
        return {"sync": urls, "client_reader": urls, "room": urls}
    pools = {
        "sync": [w["sync1"]],
        "initial_sync": [w["initial_sync1"]],
        "client_reader": [w["client_reader1"]],
        "federation_reader": [w["federation_reader1"]],
        "media": [w["media1"]],
    }
    for stream, writers in dep.info["stream_writers"].items():
        if stream in WRITER_POOLS:
            pools[stream] = [w[name] for name in writers]
    return pools


@pytest.mark.parametrize("launcher", ["mitmdump", "synapse-router"])
@pytest.mark.parametrize("topology", ["default", "full"])
def test_matrix_js_sdk_scenario(
    start_router: Callable[..., Router],
    names: Names,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    topology: str,
    launcher: str,
) -> None:
    node = _node()
    dep: Deployment = request.getfixturevalue("deployment" if topology == "default" else "full_deployment")
    config = {"workers": _pools(topology, dep), "health": HEALTH, "whoami": WHOAMI, "debug_headers": True}
    router = start_router(dep.main, config, launcher=launcher)
    try:
        wait_until_routing(router)
        summary = _scenario(
            node, dep, router, names(f"{topology[0]}{launcher[0]}", 2), tmp_path, f"{topology}/{launcher}"
        )
        if topology == "full":  # media went to the media repository worker, through the media pool
            assert summary["decisions"]["media"] == {dep.workers["media1"]: summary["routes"]["media"]}, summary
    finally:
        router.stop()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _error_lines(path: str, offset: int) -> list[str]:
    """ERROR lines a Synapse process logged after `offset` (its log's size before the run)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [line[:400] for line in text.splitlines() if " - ERROR - " in line]


def _scenario(
    node: str, deployment: Deployment, router: Router, localparts: list[str], tmp_path: Path, label: str
) -> dict[str, Any]:
    """Runs scenario.mjs through `router`, checks its summary and Synapse's logs; the summary."""
    users = {}
    for role, localpart in zip(("alice", "bob"), localparts, strict=True):
        password = os.urandom(12).hex()
        register_user(deployment.main, deployment.secret, localpart, password)
        users[role] = {"user": localpart, "password": password}
    summary_path = tmp_path / "summary.json"
    config_path = tmp_path / "scenario.json"
    config_path.write_text(
        json.dumps(
            {"base_url": router.url, "users": users, "media_bytes": MEDIA_BYTES, "summary_path": str(summary_path)}
        )
    )

    log_sizes = {name: _size(path) for name, path in deployment.logs.items()}
    started = time.monotonic()
    try:
        run = subprocess.run(
            [node, str(JS / "scenario.mjs"), str(config_path)],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=SCENARIO_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"the js-sdk scenario ran over {SCENARIO_TIMEOUT:.0f}s:\n{stderr[-6000:]}")
    elapsed = time.monotonic() - started
    assert summary_path.exists(), f"no summary (exit {run.returncode}):\n{run.stderr[-6000:]}"
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    debug = summary["debug_headers"]
    print(
        f"{label}: js-sdk scenario {elapsed:.1f}s, {summary['requests']} requests, statuses "
        f"{summary['statuses']}, {summary['error_count']} errors, debug headers on {debug['with']}"
        f"/{summary['requests']}; routes {summary['routes']}; workers {summary['workers']}; "
        f"steps (ms) {summary['steps']}; sliding sync {summary.get('sliding_sync')}"
    )
    context = f"{json.dumps(summary, indent=1)}\n--- scenario stderr ---\n{run.stderr[-6000:]}"
    assert summary["failures"] == [], context
    assert summary["error_count"] == 0, context
    assert not [s for s in summary["statuses"] if int(s) >= 500], context
    assert summary["requests"] > 0 and debug["without"] == 0 and debug["with"] == summary["requests"], context
    assert summary["media"]["bytes"] == MEDIA_BYTES, context
    assert run.returncode == 0, context
    # A request can fail inside Synapse and still be answered (a partial write before an error):
    # Synapse's own logs of the run must hold no ERROR line.
    errors = {name: _error_lines(path, log_sizes[name]) for name, path in deployment.logs.items()}
    assert not any(errors.values()), errors
    assert router.proc.poll() is None, router.log()[-4000:]  # the router is still up
    assert "Traceback" not in router.log() and "Addon error" not in router.log(), router.log()[-8000:]
    return summary
