"""Fixtures: stand-in Synapse servers and a real mitmdump with the addon, on loopback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import ROOT, Fleet, Router, free_port, router_command, wait_for_port

__all__ = ["Fleet", "free_port", "router_command", "served"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator:
    started: list[Router] = []

    def start(main_url: str, config: dict | str, extra: list[str] | None = None, wait: bool = True) -> Router:
        config_path = tmp_path / f"router-{len(started)}.yaml"
        config_path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        port = free_port()
        output = tmp_path / f"router-{len(started)}.log"
        with output.open("wb") as out:
            proc = subprocess.Popen(
                router_command(main_url, port, config_path, extra or []),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        router = Router(proc, port, output, config_path)
        started.append(router)
        if wait:
            wait_for_port(port, proc)
        return router

    try:
        yield start
    finally:
        for r in started:
            r.stop()


def served(response: httpx.Response) -> dict:
    """What the stand-in that answered saw."""
    assert response.status_code < 500, response.text
    body = response.json()
    body["headers"] = {k.lower(): v for k, v in body["headers"]}
    return body
