"""A private network and mount namespace (Linux, root: `unshare`, `nsenter`, overlayfs) that
looks like the container or host a recipe describes: its paths (`/opt/synapse-router`,
`/etc/synapse-router/router.yaml`, ...) bound to this checkout's files, its host names in
/etc/hosts, and its fixed ports (8080, 9105, 8008) on a loopback of its own, so a recipe's
command runs with exactly its argv without touching the machine or colliding with anyone.

The namespaces are held by a process that serves the stand-in Synapse main process
(tests/standin.py) on `main_port`; commands run in them through nsenter. Directories are laid
over with overlayfs (upper layers in a temporary directory), so nothing is written outside it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.harness import STANDIN

# Running as the image's unprivileged user is out of reach here (the only Python 3.12 lives in
# root's home); instead commands run with no capability at all and no way to gain one.
UNPRIVILEGED = ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--"]


class Sandbox:
    def __init__(self, work: Path, binds: Mapping[str, Path], hosts: Sequence[str], main_port: int) -> None:
        """binds: path in the sandbox -> path here; hosts: names that resolve to 127.0.0.1."""
        self.work = work
        self.binds = dict(binds)
        self.hosts = list(hosts)
        self.main_port = main_port
        self.holder: subprocess.Popen[bytes] | None = None

    def _setup_script(self) -> str:
        lines = ["set -e", "ip link set lo up"]
        tops = sorted({"/" + Path(target).parts[1] for target in self.binds} | {"/etc"})
        for i, top in enumerate(tops):
            upper, workdir = self.work / f"upper{i}", self.work / f"overlay-work{i}"
            upper.mkdir()
            workdir.mkdir()
            lines.append(
                f"mount -t overlay overlay -o lowerdir={top},upperdir={upper},workdir={workdir} {shlex.quote(top)}"
            )
        for target, source in self.binds.items():
            make = f"mkdir -p {shlex.quote(target)}"
            if not source.is_dir():
                make = f"mkdir -p {shlex.quote(str(Path(target).parent))} && touch {shlex.quote(target)}"
            lines += [make, f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}"]
        hosts = " ".join(["localhost", *self.hosts])
        lines.append(f"printf '127.0.0.1 {hosts}\\n::1 localhost\\n' > /etc/hosts")
        lines.append(f"exec {sys.executable} {STANDIN} --name main --port {self.main_port}")
        return "\n".join(lines)

    def start(self) -> None:
        log = (self.work / "standin.log").open("wb")
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c", self._setup_script()],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while self.run([sys.executable, "-c", _CONNECT, str(self.main_port)]).returncode != 0:
            if self.holder.poll() is not None:
                raise RuntimeError("the sandbox did not start: " + (self.work / "standin.log").read_text())
            if time.monotonic() > deadline:
                raise TimeoutError("the stand-in main process did not listen in the sandbox")
            time.sleep(0.1)

    def _enter(self) -> list[str]:
        assert self.holder is not None, "start() first"
        return ["nsenter", "-t", str(self.holder.pid), "--net", "--mount", "--"]

    def command(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str = "/",
        unprivileged: bool = False,
        prefix: Sequence[str] = (),
    ) -> list[str]:
        """argv run in the sandbox with exactly `env` (as a container's ENV or a unit's
        Environment= gives it) in `cwd`, after `prefix` (run with every capability, e.g. to set
        a resource limit); the process is argv's own (each wrapper execs)."""
        setenv = ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
        chdir = ["sh", "-c", 'cd "$0" && exec "$@"', cwd]
        return [*self._enter(), *prefix, *(UNPRIVILEGED if unprivileged else []), *chdir, *setenv, *argv]

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"]} if env is None else env
        return subprocess.run(self.command(argv, env), capture_output=True, text=True, timeout=60)

    def popen(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        log: Path,
        unprivileged: bool = True,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start argv in the sandbox, its output to `log`; the Popen's pid is argv's process."""
        with log.open("wb") as out:
            command = self.command(argv, env, cwd, unprivileged, prefix)
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def wait_until(
        self, check: Sequence[str], env: Mapping[str, str], proc: subprocess.Popen[bytes], log: Path, timeout: float
    ) -> None:
        """Run `check` in the sandbox until it exits 0, while `proc` runs, for `timeout` seconds at most."""
        deadline = time.monotonic() + timeout
        while (out := self.run(check, env)).returncode != 0:
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{check} failed for {timeout}s: {out.stderr}\n{log.read_text(errors='replace')}")
            time.sleep(0.2)

    def get(self, url: str) -> tuple[int, str]:
        """(status, body) of a GET from inside the sandbox."""
        out = self.run([sys.executable, "-c", _GET, url])
        assert out.returncode == 0, out.stderr
        status, _, body = out.stdout.partition("\n")
        return int(status), body

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.send_signal(signal.SIGTERM)
            try:
                self.holder.wait(10)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()


_CONNECT = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=1).close()"
_GET = """
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
    status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
print(status)
sys.stdout.write(body.decode("utf-8", "replace"))
"""
