"""`synapse-router routes audit`, `config from-synapse`, `config check`: real subcommands with
their own --help; an unknown first word is an error (exit 2), never a proxy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from synapse_router.launcher.main import main

SAVED = Path(__file__).parent / "data" / "synapse-1.163.2-servlets.json"
LAUNCHER = Path(sys.executable).parent / "synapse-router"


@pytest.mark.parametrize(
    "argv",
    [
        ["routes", "audit", "--help"],
        ["routes", "--help"],
        ["config", "--help"],
        ["config", "from-synapse", "--help"],
        ["config", "check", "--help"],
    ],
)
def test_subcommand_help_prints_and_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert f"usage: synapse-router {' '.join(a for a in argv if a != '--help')}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bogus"], ["routes"], ["routes", "bogus"], ["config", "bogus"], ["~u", "/sync"]])
def test_an_unknown_word_exits_2_with_an_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_installed_command_answers_without_starting_a_proxy() -> None:
    """The console script: help and errors come back at once (a proxy would keep running)."""
    done = subprocess.run([LAUNCHER, "routes", "audit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: synapse-router routes audit" in done.stdout
    done = subprocess.run([LAUNCHER, "routes", "audit", "bogus"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unrecognized arguments: bogus" in done.stderr
    done = subprocess.run([LAUNCHER, "bogus"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'bogus'" in done.stderr
    assert "listening" not in done.stdout + done.stderr


@pytest.mark.parametrize("words", [["-q", "routes", "audit"], ["--set", "listen_port=0", "config", "check"]])
def test_a_subcommand_after_an_option_is_refused_not_a_flow_filter(words: list[str]) -> None:
    """mitmdump's command line takes trailing words as a flow filter: `synapse-router -q routes
    audit` started a proxy filtering flows by "routes audit"."""
    done = subprocess.run([LAUNCHER, *words], capture_output=True, text=True, timeout=120)
    word = next(w for w in words if w in ("routes", "config"))
    assert done.returncode == 1
    assert f"`{word}` is a subcommand: it comes first" in done.stderr
    assert "listening" not in done.stdout + done.stderr


def test_the_router_help_names_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "`routes audit`" in capsys.readouterr().out.replace("\n", " ")


def test_routes_audit_of_saved_servlets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routes", "audit", "--servlets", str(SAVED)]) == 0
    out = capsys.readouterr().out
    assert (
        "Synapse 1.163.2" in out
        and "misrouted: 0" in out
        and "uncovered (no route, and main does not serve it): 0" in out
    )


def test_routes_audit_with_a_custom_route_that_misroutes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(
        "workers: {federation_reader: [http://127.0.0.1:9]}\n"
        "routes: [{name: typing_elsewhere, paths: ['/typing/'], pool: federation_reader}]\n"
    )
    assert main(["routes", "audit", "--servlets", str(SAVED), "--router-config", str(config), "--json"]) == 1
    out = capsys.readouterr().out
    assert "route typing_elsewhere" in out and "a typing write must go to the typing writer pool only" in out


def test_routes_audit_needs_a_source(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SYNAPSE_PYTHON", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["routes", "audit"])
    assert exit_.value.code == 2 and "--synapse-python" in capsys.readouterr().err


def test_routes_audit_reports_an_interpreter_without_synapse(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routes", "audit", "--synapse-python", sys.executable]) == 2  # the router's: no Synapse
    assert "synapse_introspect.py failed" in capsys.readouterr().err
