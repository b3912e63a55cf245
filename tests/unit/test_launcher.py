"""The lean launcher's command-line helpers and the parent/child handshake, without processes
(the processes themselves: tests/integration/test_launcher.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from synapse_router.config import ConfigError
from synapse_router.launcher.applied import AppliedConfig, applied_loader
from synapse_router.launcher.childprocess import ChildSlot
from synapse_router.launcher.commandline import last_value, metrics_listen, router_config_path, without_processes
from synapse_router.launcher.supervisor import exit_description, restart_delay


def test_child_slot_round_trips_through_its_flag() -> None:
    slot = ChildSlot(1, 4, 1234, 7, 9)
    flag = slot.flag()
    assert flag.startswith("--launcher-child=")
    assert ChildSlot.parse(flag.split("=", 1)[1]) == slot
    assert slot.label == "process 2/4"
    with pytest.raises(argparse.ArgumentTypeError):
        ChildSlot.parse("1/4/x")
    with pytest.raises(argparse.ArgumentTypeError):
        ChildSlot.parse("1/4/1234/7")  # no channel: a parent of another version


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


def test_the_applied_configuration_is_the_last_good_file(tmp_path: Path) -> None:
    """AppliedConfig (launcher/applied.py): the parent's one source. A valid file's exact bytes
    become the file the children read (mode 0600, in a private directory); a YAML error, a
    byte that is not UTF-8, an empty file or a missing file is a ConfigError and leaves the
    applied one."""
    operator = tmp_path / "router.yaml"
    good = b"workers: {}\nmetrics:\n  listen: 127.0.0.1:9300\n"
    operator.write_bytes(good)
    applied = AppliedConfig(str(operator))
    try:
        assert applied.refresh().metrics_listen == "127.0.0.1:9300"
        assert Path(applied.file).read_bytes() == good
        assert Path(applied.file).stat().st_mode & 0o777 == 0o600
        assert Path(applied.file).parent.stat().st_mode & 0o777 == 0o700
        for bad, words in (
            (b"# caf\xe9\nworkers: {}\n", "not UTF-8"),
            (b"workers: {\n", "invalid YAML"),
            (b"workers:\n  sync:\n    - htp://x:1\n", "workers.sync[0]"),
            # read while a tool truncated it to write it anew: would send everything to main
            (b"", "is empty (no YAML document)"),
            (b"\n# only a comment\n", "is empty (no YAML document)"),
        ):
            operator.write_bytes(bad)
            with pytest.raises(ConfigError, match=re.escape(words)):
                applied.refresh()
            assert Path(applied.file).read_bytes() == good
            assert applied.config is not None and applied.config.metrics_listen == "127.0.0.1:9300"
        operator.unlink()
        with pytest.raises(ConfigError, match="cannot read"):
            applied.refresh()
        load = applied_loader(str(operator), applied.file)
        assert load(str(operator)).metrics_listen == "127.0.0.1:9300"  # the operator's path: the applied file
        other = tmp_path / "other.yaml"
        other.write_text("workers: {}\n")
        assert load(str(other)).metrics_listen is None  # any other path: read as it is
    finally:
        applied.close()
    assert not Path(applied.file).parent.exists()


def test_router_config_path_of_a_command_line() -> None:
    assert router_config_path(["-q", "--set", "router_config=/a.yaml", "--set=router_config=/b.yaml"]) == "/b.yaml"
    assert router_config_path(["--set", "flow_detail=1"]) == ""
