"""The lean launcher's command-line helpers and the parent/child handshake, without processes
(the processes themselves: tests/integration/test_launcher.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from synapse_router.launcher.childprocess import ChildSlot
from synapse_router.launcher.commandline import last_value, metrics_listen, without_processes
from synapse_router.launcher.supervisor import exit_description, restart_delay


def test_child_slot_round_trips_through_its_flag() -> None:
    slot = ChildSlot(1, 4, 1234, 7)
    flag = slot.flag()
    assert flag.startswith("--launcher-child=")
    assert ChildSlot.parse(flag.split("=", 1)[1]) == slot
    assert slot.label == "process 2/4"
    with pytest.raises(argparse.ArgumentTypeError):
        ChildSlot.parse("1/4/x")


def test_last_value_of_a_set_option() -> None:
    specs = ["block_global=true", "flow_detail=1", "block_global=false", "http2"]
    assert last_value(specs, "block_global") == "false"
    assert last_value(specs, "http2") == "true"  # a bare boolean name
    assert last_value(specs, "absent") == ""


def test_without_processes() -> None:
    argv = ["--processes", "3", "-q", "--processes=2", "--mode", "reverse:http://x:1@8080"]
    assert without_processes(argv) == ["-q", "--mode", "reverse:http://x:1@8080"]
    argv = ["--replace", "123", "-q", "--replace=456", "--processes", "2"]
    assert without_processes(argv) == ["-q"]  # the parent replaces, not each child


def test_restart_back_off() -> None:
    assert [restart_delay(n) for n in range(1, 9)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_exit_description() -> None:
    assert exit_description(0) == "status 0"
    assert exit_description(3) == "status 3"
    assert exit_description(-9) == "signal SIGKILL"
    assert exit_description(-15) == "signal SIGTERM"


def test_metrics_listen_from_the_router_config_on_a_command_line(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("workers: {}\nmetrics:\n  listen: 127.0.0.1:9300\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n  sync:\n    - htp://x:1\n")
    assert metrics_listen(["-q", "--set", f"router_config={good}"]) == "127.0.0.1:9300"
    assert metrics_listen([f"--set=router_config={good}"]) == "127.0.0.1:9300"
    assert metrics_listen(["--set", f"router_config={good}", "--set", f"router_config={bad}"]) is None
    assert metrics_listen(["-q"]) is None
