"""The real Synapse deployment of scripts/synapse_deploy.py, as the e2e tests and
scripts/bench_e2e.py see it: its JSON description plus the commands that act on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.synapse_deploy import TOPOLOGIES
from tests.harness import ROOT

DEPLOY = ROOT / "scripts" / "synapse_deploy.py"
# A first `up` on a fresh machine installs PostgreSQL, Redis and Synapse: minutes, not seconds.
UP_TIMEOUT = 1200.0
# `up`'s own deadline (--timeout) counts from its start, installs included; its default of 120 s
# ran out on a busy 2-core machine before a freshly installed main process answered /health.
UP_DEADLINE = 900.0


@dataclass
class Deployment:
    info: dict[str, Any]  # what `synapse_deploy.py up` / `status` print as their last line
    state_dir: Path
    started_here: bool  # nothing of it ran before: whoever brought it up takes it down
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
    def pids(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.info["pids"].items() if v}

    @property
    def secret(self) -> str:
        return str(self.info["registration_shared_secret"])

    @property
    def server_name(self) -> str:
        return str(self.info["server_name"])

    def run(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return run_deploy(self.state_dir, *args, timeout=timeout)

    def stop_worker(self, name: str) -> None:
        self.stopped_workers.add(name)
        result = self.run("stop-worker", name, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"stop-worker {name} failed:\n{result.stderr}")

    def kill_worker(self, name: str) -> None:
        """SIGKILL, as a crash: the requests in flight on it are cut (a SIGTERM lets Synapse
        answer some of them first)."""
        self.stopped_workers.add(name)
        os.kill(int((self.state_dir / "pids" / f"{name}.pid").read_text().split()[0]), signal.SIGKILL)

    def start_worker(self, name: str) -> None:
        result = self.run("start-worker", name, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"start-worker {name} failed:\n{result.stderr}")
        self.stopped_workers.discard(name)


def run_deploy(state_dir: Path, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY), *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def bring_up(state_dir: Path, topology: str = "default", venv: Path | None = None) -> Deployment:
    """The running deployment in `state_dir`, or a new one of `topology` (its Synapse installed
    in `venv`, default STATE/venv); RuntimeError if `up` fails."""
    status = run_deploy(state_dir, "status", timeout=60)
    if status.returncode == 0:
        return Deployment(_description(status.stdout), state_dir, started_here=False)
    options = ["--topology", topology, "--timeout", str(UP_DEADLINE), *(["--venv", str(venv)] if venv else [])]
    up = run_deploy(state_dir, "up", *options, timeout=UP_TIMEOUT)
    if up.returncode != 0:
        raise RuntimeError(f"synapse_deploy.py up failed ({up.returncode}):\n{up.stderr[-4000:]}")
    processes = (*TOPOLOGIES[topology].helper_names, *TOPOLOGIES[topology].synapse_names)
    return Deployment(_description(up.stdout), state_dir, started_here=_nothing_running(status.stderr, processes))


def _description(stdout: str) -> dict[str, Any]:
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def _nothing_running(status_stderr: str, processes: tuple[str, ...]) -> bool:
    """`status` says on stderr what is down; every process down (or no deployment at all) means
    that nobody else is using this deployment."""
    if "no deployment in" in status_stderr:
        return True
    return all(f"{name} is not running" in status_stderr for name in processes)
