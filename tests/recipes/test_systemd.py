"""config/synapse-router@.service: `systemd-analyze verify` and `security` find nothing to
fix, its settings agree with the router's defaults (shutdown grace, open files per
max_connections), and its ExecStart, ExecReload and KillSignal run as systemd would run them
(no systemd as PID 1 here: the commands run in a private namespace with the unit's paths,
environment, open-files limit and no capability)."""

from __future__ import annotations

import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from synapse_router.edge.limits import FD_MARGIN, LimitsConfig
from synapse_router.edge.shutdown import DEFAULT_GRACE

from tests.recipes.recipe_files import UNIT, unit_settings, unit_value
from tests.recipes.sandbox import Sandbox

VENV = Path(sys.executable).parent.parent
INSTALLED = "/opt/synapse-router"  # where the unit's header installs the virtualenv
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a system service's PATH
INSTANCE = "synapse-router@a.service"  # what systemd-analyze checks: the template, instantiated


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    assert binary, "systemd-analyze is missing: Debian's systemd package has it"
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def unit_here(tmp_path: Path) -> Path:
    """The unit with its ExecStart binary at this checkout's virtualenv (verify checks that the
    binary exists); every other line as shipped."""
    text = UNIT.read_text()
    assert text.count(f"{INSTALLED}/bin/synapse-router") == len(re.findall("^ExecStart=", text, re.M)) == 1
    here = tmp_path / UNIT.name
    here.write_text(text.replace(f"{INSTALLED}/bin/synapse-router", str(VENV / "bin" / "synapse-router")))
    return here


def unit_environment() -> dict[str, str]:
    assignments = [a for line in unit_settings()["Service"]["Environment"] for a in shlex.split(line)]
    return dict(a.split("=", 1) for a in assignments)


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    unit = unit_here(tmp_path)
    run = systemd_analyze("verify", f"./{INSTANCE}", cwd=unit.parent)  # warnings exit 0: none allowed
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_systemd_analyze_verify_does_report_mistakes(tmp_path: Path) -> None:
    unit = unit_here(tmp_path)
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMod=mixed"))
    assert "Unknown key" in systemd_analyze("verify", f"./{INSTANCE}", cwd=unit.parent).stderr


def test_exposure_stays_low(tmp_path: Path) -> None:
    """systemd's own hardening score (0 best, 10 worst); 1.4 when written."""
    unit = unit_here(tmp_path)
    run = systemd_analyze("security", "--offline=true", "--threshold=20", f"./{INSTANCE}", cwd=unit.parent)
    assert run.returncode == 0, run.stdout[-600:]


def test_settings_match_the_router() -> None:
    assert unit_value("KillSignal") == "SIGTERM"  # graceful stop
    assert unit_value("KillMode") == "mixed"  # SIGTERM to the parent only; it drains its children
    stop_timeout = float(unit_value("TimeoutStopSec"))
    assert DEFAULT_GRACE < stop_timeout <= DEFAULT_GRACE + 10  # a little longer than the grace
    assert shlex.split(unit_value("ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]  # config reload
    assert int(unit_value("LimitNOFILE")) >= 2 * LimitsConfig().max_connections + FD_MARGIN
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "ProtectHome": "yes",
        "RestrictSUIDSGID": "yes",
    }
    assert {key: unit_value(key) for key in hardening} == hardening
    service = unit_settings()["Service"]
    assert service["CapabilityBoundingSet"] == [] and service["AmbientCapabilities"] == []
    assert unit_environment()["HOME"] == f"/var/lib/{unit_value('StateDirectory')}"
    assert unit_environment()["PYTHONUNBUFFERED"] == "1"  # else the journal gets lines a buffer-full late


@dataclass
class Instance:
    """One instance of the template unit, started as systemd starts a Type=notify service."""

    proc: subprocess.Popen[bytes]
    log: Path
    notify: socket.socket

    def wait_ready(self) -> None:
        """systemd's `start` returns on READY=1; fails if the router exits first."""
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                continue

    def stop(self) -> int:
        self.proc.send_signal(getattr(signal, unit_value("KillSignal")))
        code = self.proc.wait(float(unit_value("TimeoutStopSec")))  # else systemd would SIGKILL it
        self.notify.close()
        return code


def test_instances_start_reload_switch_and_stop_as_systemd_runs_them(tmp_path: Path) -> None:
    """`systemctl start @a`, `reload @a`, then the rolling restart of the unit's header:
    `start @b && stop @a`, with the unit's own command line, environment and limits."""
    assert unit_value("Type") == "notify"
    argv = shlex.split(unit_value("ExecStart"))
    config_path = next(a.split("=", 1)[1] for a in argv if a.startswith("router_config="))
    mode = argv[argv.index("--mode") + 1]
    main_port = int(mode.split("@")[0].rsplit(":", 1)[1])
    listen_port = int(mode.split("@")[1])
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"workers": {}, "metrics": {"listen": "127.0.0.1:9105"}}))
    home = tmp_path / "state"
    home.mkdir()
    env = {"PATH": SYSTEMD_PATH, **unit_environment()}
    sandbox = Sandbox(
        tmp_path, {INSTALLED: VENV, config_path: config, env["HOME"]: home}, hosts=[], main_port=main_port
    )
    # LimitNOFILE as systemd sets it (as root, before the capabilities go), within this
    # machine's hard limit (20000 here, and no CAP_SYS_RESOURCE to raise it)
    nofile = min(int(unit_value("LimitNOFILE")), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    limit = ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
    instances: list[Instance] = []

    def start(name: str) -> Instance:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / f"notify-{name}"))
        notify.settimeout(1.0)
        log = tmp_path / f"router-{name}.log"
        proc = sandbox.popen(argv, {**env, "NOTIFY_SOCKET": str(tmp_path / f"notify-{name}")}, "/", log, prefix=limit)
        instances.append(Instance(proc, log, notify))
        return instances[-1]

    health = [sys.executable, "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9105/health')"]
    versions = f"http://127.0.0.1:{listen_port}/_matrix/client/versions"
    sandbox.start()
    try:
        a = start("a")
        a.wait_ready()
        sandbox.wait_until(health, env, a.proc, a.log, timeout=30)
        status, body = sandbox.get(versions)
        assert status == 200 and '"server": "main"' in body, body
        needed = 2 * LimitsConfig().max_connections + FD_MARGIN
        log_text = a.log.read_text()
        assert "file descriptors" not in log_text  # the default max_connections is derived to fit: no warning
        assert ("what fits in the open-files limit" in log_text) == (needed > nofile)  # said when lowered

        config.write_text(
            yaml.safe_dump({"workers": {"sync": ["http://127.0.0.1:18081"]}, "metrics": {"listen": "127.0.0.1:9105"}})
        )
        reload = shlex.split(unit_value("ExecReload").replace("$MAINPID", str(a.proc.pid)))
        assert subprocess.run(reload, timeout=10).returncode == 0
        reloaded = [
            sys.executable,
            "-c",
            "import sys; sys.exit('pools sync' not in open(sys.argv[1]).read())",
            str(a.log),
        ]
        sandbox.wait_until(reloaded, env, a.proc, a.log, timeout=30)

        b = start("b")  # the same port, beside @a
        b.wait_ready()
        assert a.stop() == 0
        sandbox.wait_until(health, env, b.proc, b.log, timeout=30)  # @b's own endpoint, @a has gone
        assert sandbox.get(versions)[0] == 200
        assert b.stop() == 0
        for instance in (a, b):
            text = instance.log.read_text()
            assert "stopped gracefully" in text and "Traceback" not in text, text
            assert "cannot serve metrics" not in text, text
    finally:
        for instance in instances:
            if instance.proc.poll() is None:
                instance.proc.kill()
                instance.proc.wait()
            instance.notify.close()
        sandbox.stop()
