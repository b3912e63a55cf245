"""Real processes on loopback for tests and the demo: stand-in Synapse servers and a real
mitmdump with the addon."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "standin.py"
BIN = Path(sys.executable).parent
MITMDUMP = BIN / "mitmdump"


def unpaced(config: dict[str, Any], *checkouts: Path | None) -> dict[str, Any]:
    """`config` with per-address request pacing off, for a benchmark whose load generator is one
    address standing for many clients (paced, it would measure `limits.request_rate_per_address`);
    unchanged if one of `checkouts` (a `--before` worktree) predates pacing: it would refuse
    the key, and it paces nothing."""
    if any(c is not None and not (c / "addons/synapse_router/edge/request_pacing.py").exists() for c in checkouts):
        return config
    limits = {**config.get("limits", {}), "request_rate_per_address": 0}
    return {**config, "limits": limits}


def read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (none: empty): status, headers with
    lower-case names, body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        rest += chunk
    return status, headers, rest[:length]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@dataclass
class Standin:
    name: str
    port: int
    whoami_file: Path | None = None
    whoami_delay: float = 0.0
    whoami_trickle: float = 0.0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, str(STANDIN), "--name", self.name, "--port", str(self.port)]
        if self.whoami_file is not None:
            cmd += ["--whoami", str(self.whoami_file), "--whoami-delay", str(self.whoami_delay)]
            cmd += ["--whoami-trickle", str(self.whoami_trickle)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/__standin/stats", timeout=5).json()

    def release(self) -> None:
        """End every `standin_delay` now and from now on."""
        httpx.get(f"{self.url}/__standin/release", timeout=5).raise_for_status()


@dataclass
class Fleet:
    """Named stand-in servers; `main` is the reverse-mode target."""

    tmp: Path
    servers: dict[str, Standin] = field(default_factory=dict)

    def add(
        self,
        name: str,
        whoami: dict[str, str] | None = None,
        start: bool = True,
        whoami_delay: float = 0.0,
        whoami_trickle: float = 0.0,
    ) -> Standin:
        whoami_file = None
        if whoami is not None:
            whoami_file = self.tmp / f"whoami-{name}.json"
            whoami_file.write_text(json.dumps(whoami))
        server = Standin(name, free_port(), whoami_file, whoami_delay, whoami_trickle)
        self.servers[name] = server
        if start:
            server.start()
        return server

    def __getitem__(self, name: str) -> Standin:
        return self.servers[name]

    def stop(self) -> None:
        for server in self.servers.values():
            server.kill()


@dataclass
class Router:
    proc: subprocess.Popen[bytes]
    port: int
    output: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")


# Which launcher the integration tests run: mitmdump with the addon script (default) or the
# lean `synapse-router`; .ci/run runs the integration tests with both.
DEFAULT_LAUNCHER = os.environ.get("SYNAPSE_ROUTER_LAUNCHER", "mitmdump")


def router_command(
    main_url: str, port: int, config_path: Path, extra: list[str], launcher: str = DEFAULT_LAUNCHER
) -> list[str]:
    """`launcher` "mitmdump": mitmdump with the addon script; "synapse-router": the lean
    launcher (console script in the same bin directory), which has the router built in."""
    script = ["-s", str(ROOT / "addons" / "router.py")] if launcher == "mitmdump" else []
    return [
        str(MITMDUMP if launcher == "mitmdump" else BIN / launcher),
        "--mode",
        f"reverse:{main_url}@127.0.0.1:{port}",
        *script,
        "--set",
        f"router_config={config_path}",
        *extra,
    ]


class RouterStarter:
    """Starts routers (real processes) with their config and output in `work`; `stop_all` ends them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[Router] = []

    def __call__(
        self,
        main_url: str,
        config: dict[str, Any] | str,
        extra: list[str] | None = None,
        launcher: str = DEFAULT_LAUNCHER,
        wait: bool = True,
        wait_timeout: float = 20.0,
        port: int | None = None,
    ) -> Router:
        """`port`: listen there (e.g. a running router's, for a rolling restart), not on a free one."""
        n = len(self.started)
        config_path = self.work / f"router-{n}.yaml"
        config_path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        port = free_port() if port is None else port
        output = self.work / f"router-{n}.log"
        with output.open("wb") as out:
            proc = subprocess.Popen(
                router_command(main_url, port, config_path, extra or [], launcher=launcher),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        router = Router(proc, port, output, config_path)
        self.started.append(router)
        if wait:
            wait_for_port(port, proc, timeout=wait_timeout)
        return router

    def stop_all(self) -> None:
        for router in self.started:
            router.stop()
