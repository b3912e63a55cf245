"""sd_notify readiness (sdnotify.py) against a real AF_UNIX datagram socket."""

from __future__ import annotations

import socket
from pathlib import Path

from synapse_router.launcher.sdnotify import notify


def test_ready_reaches_the_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert server.recv(64) == b"READY=1"


def test_abstract_namespace_socket() -> None:
    name = f"synapse-router-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(64) == b"READY=1"


def test_nothing_without_a_notify_socket(tmp_path: Path) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "relative/path"})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})  # unreachable: no error
