"""A part of the router that raises in a hook: both launchers log it (without the exception's
message, which may quote a secret) and run the later parts, so the request is still answered,
counted, logged and redacted, and the in-flight count goes back to zero. Under mitmdump the
rest of the router used to be skipped for that event."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, Fleet, RouterStarter, free_port, wait_for_port

from .conftest import served

pytestmark = pytest.mark.integration

TOKEN = "syt_alice_isolation_SECRET"


def _in_flight(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "synapse_router_worker_in_flight"
        for sample in family.samples
    }


@pytest.mark.parametrize("fault", ["ConnectionLimits.response", "WhoamiIdentity.response"])
def test_a_part_that_raises_does_not_skip_the_later_ones(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("SYNAPSE_ROUTER_TEST_FAULT", fault)
    fleet.add("main", whoami={TOKEN: "@alice:test"})
    fleet.add("reader1")
    metrics_port = free_port()
    access = tmp_path / "access.log"
    config = {
        "workers": {"client_reader": [fleet["reader1"].url]},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "access_log": {"enabled": True, "format": "logfmt", "path": str(access)},
    }
    starter = RouterStarter(tmp_path)
    try:
        router = starter(fleet["main"].url, config, ["--set", "termlog_verbosity=debug", "--set", "flow_detail=2"])
        wait_for_port(metrics_port, router.proc)
        reader1 = fleet["reader1"].url
        with httpx.Client(base_url=router.url, timeout=10) as client:
            for i in range(3):
                response = client.get(
                    f"/_matrix/client/v3/rooms/!r:x/messages?n={i}", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                assert served(response)["server"] == "reader1"
        deadline = time.monotonic() + 10
        while access.read_text().count("route=") < 3:
            assert time.monotonic() < deadline, access.read_text()
            time.sleep(0.1)
        assert _in_flight(metrics_port) == {reader1: 0.0}
        log = router.log()
        assert f"{fault} failed with RuntimeError" in log, log[-3000:]
        assert "injected fault" not in log and "SECRET" not in log
        assert "Addon error" not in log
    finally:
        starter.stop_all()
