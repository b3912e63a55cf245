"""Fixtures: stand-in Synapse servers and a real mitmdump with the addon, on loopback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Fleet, RouterStarter, free_port, router_command, wait_for_port
from tests.hostile import STATS

__all__ = ["Fleet", "free_port", "router_command", "served"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[RouterStarter]:
    starter = RouterStarter(tmp_path)
    try:
        yield starter
    finally:
        starter.stop_all()


def served(response: httpx.Response) -> dict:
    """What the stand-in that answered saw."""
    assert response.status_code < 500, response.text
    body = response.json()
    body["headers"] = {k.lower(): v for k, v in body["headers"]}
    return body


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private redis-server on loopback (Debian's package; scripts/test installs it)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: scripts/test installs Debian's redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.kill()
        proc.wait()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The hostile-client suite's count (tests/integration/test_hostile.py), when it ran."""
    if STATS.inputs:
        terminalreporter.write_line(STATS.line())
