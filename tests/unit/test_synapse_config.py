"""`config from-synapse` and `config check` (synapse_config.py) on the Synapse configuration
files scripts/synapse_deploy.py writes for its full topology (written here, nothing started)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from synapse_router.config import parse_config
from synapse_router.routing.routes import BUILTIN_ROUTES
from synapse_router.tools.subcommands import main
from synapse_router.tools.synapse_config import SynapseConfigError, check, read_deployment, router_pools

from scripts.synapse_deploy import (
    DEFAULT_TOPOLOGY,
    FULL_TOPOLOGY,
    Layout,
    Ports,
    Secrets,
    Topology,
    write_synapse_configs,
)

BASE = 18000


@pytest.fixture
def full(tmp_path: Path) -> list[str]:
    """homeserver.yaml, then every worker's file, of the full topology."""
    layout = Layout(tmp_path, FULL_TOPOLOGY)
    write_synapse_configs(layout, Ports.from_base(BASE, FULL_TOPOLOGY), Secrets("a", "b", "c", "d", "e"))
    return [str(layout.homeserver_yaml), *(str(layout.worker_yaml(n)) for n in FULL_TOPOLOGY.worker_names)]


def url(name: str) -> str:
    return f"http://127.0.0.1:{Ports.from_base(BASE, FULL_TOPOLOGY).worker(name)}"


def test_from_synapse_pools(full: list[str]) -> None:
    pools = router_pools(read_deployment(full[0], full[1:]))
    writers = {s: [url("writer1")] for s, names in FULL_TOPOLOGY.stream_writers if names == ("writer1",)}
    assert pools == {
        "media": [url("media1")],
        "initial_sync": [url("initial_sync1")],
        "sync": [url("sync1")],
        "client_reader": [url("client_reader1")],
        "federation_reader": [url("federation_reader1")],
        **writers,  # exactly stream_writers; the event persister has no HTTP listener: no pool
        "quarantined_media_changes": [url("media1")],
        # room events (room, generic) had no pool: the generic worker client_reader1 serves them
        "generic": [url("client_reader1")],
    }


def test_from_synapse_writes_a_router_config_that_checks_clean(full: list[str], tmp_path: Path) -> None:
    out = tmp_path / "router.yaml"
    assert main(["config", "from-synapse", *full, "-o", str(out)]) == 0
    config = parse_config(out.read_text())  # a valid router configuration
    assert set(config.pools) >= {"sync", "typing", "media"}
    assert check(config, read_deployment(full[0], full[1:])) == []
    assert main(["config", "check", str(out), "--synapse", *full]) == 0


def synapse_files(tmp_path: Path, topology: Topology) -> list[str]:
    layout = Layout(tmp_path, topology)
    write_synapse_configs(layout, Ports.from_base(BASE, topology), Secrets("a", "b", "c", "d", "e"))
    return [str(layout.homeserver_yaml), *(str(layout.worker_yaml(n)) for n in topology.worker_names)]


@pytest.mark.parametrize("topology", [FULL_TOPOLOGY, DEFAULT_TOPOLOGY], ids=lambda t: t.name)
def test_from_synapse_leaves_no_route_on_main_a_generic_worker_serves(topology: Topology, tmp_path: Path) -> None:
    """Every route of the built-in table a generic worker serves (all but the main-only ones,
    stream writes and media) reaches a worker: on both of synapse_deploy's topologies (the
    operator's trial: room sends stayed on main with only client_reader1)."""
    files = synapse_files(tmp_path, topology)
    pools = router_pools(read_deployment(files[0], files[1:]))
    uncovered = [
        route.name
        for route in BUILTIN_ROUTES
        if route.pools and not route.writer and route.pools != ("media",) and not any(p in pools for p in route.pools)
    ]
    assert uncovered == []
    out = tmp_path / "router.yaml"
    assert main(["config", "from-synapse", *files, "-o", str(out)]) == 0
    assert check(parse_config(out.read_text()), read_deployment(files[0], files[1:])) == []
    assert main(["config", "check", str(out), "--synapse", *files]) == 0


def test_from_synapse_fills_an_uncovered_pool_with_workers_that_can_serve_it(tmp_path: Path) -> None:
    """Client-only generic workers (no federation listener) cannot be `generic` (federation
    routes fall back to it): room events go to `room` instead; the general-purpose worker is
    preferred over the sync worker; federation stays on main (nobody listens for it); a stream
    writer joins no other pool."""
    hs = tmp_path / "hs.yaml"
    hs.write_text("stream_writers: {typing: [writer1]}\n")
    files = []
    for name, port in (("sync1", 8081), ("client_reader1", 8082), ("writer1", 8083)):
        path = tmp_path / f"{name}.yaml"
        listener = {"type": "http", "port": port, "bind_addresses": ["10.0.0.1"], "resources": [{"names": ["client"]}]}
        path.write_text(
            yaml.safe_dump(
                {"worker_app": "synapse.app.generic_worker", "worker_name": name, "worker_listeners": [listener]}
            )
        )
        files.append(str(path))
    assert router_pools(read_deployment(hs, files)) == {
        "sync": ["http://10.0.0.1:8081"],
        "client_reader": ["http://10.0.0.1:8082"],
        "typing": ["http://10.0.0.1:8083"],
        "room": ["http://10.0.0.1:8082"],
    }
    # only a sync worker: it takes what no other worker can
    assert router_pools(read_deployment(hs, files[:1])) == {
        "sync": ["http://10.0.0.1:8081"],
        "client_reader": ["http://10.0.0.1:8081"],
        "room": ["http://10.0.0.1:8081"],
    }


def pools_yaml(pools: dict[str, list[str]]) -> str:
    return yaml.safe_dump({"workers": pools})


def test_check_reports_every_disagreement(full: list[str]) -> None:
    dep = read_deployment(full[0], full[1:])
    router = parse_config(
        pools_yaml(
            {
                "typing": [url("sync1")],  # not the typing writer
                "sync": [url("federation_reader1"), url("sync1")],  # no client resource
                "generic": [url("initial_sync1")],  # generic workers also take federation
                "client_reader": ["http://127.0.0.1:1"],  # nobody listens there
                "federation_reader": [url("federation_reader1")],
                "media": [url("media1")],
            }
        )
    )
    problems = check(router, dep)
    fed, sync, initial = url("federation_reader1"), url("sync1"), url("initial_sync1")
    assert f"workers.typing: {sync} (sync1) is not a typing stream writer (stream_writers.typing: writer1)" in problems
    assert f"workers.sync: {fed} (federation_reader1) listener lacks the client resource" in problems
    assert f"workers.generic: {initial} (initial_sync1) listener lacks the federation resource" in problems
    assert "workers.client_reader: http://127.0.0.1:1 is no listener of any Synapse worker given" in problems
    assert "stream_writers.to_device: writer1, but the router has no to_device pool (to_device writes go to main)" in (
        problems
    )
    assert "stream_writers.typing: writer1 is not in the router's typing pool" in problems
    assert "worker writer1 (client listener) is in no pool" in problems
    assert "worker client_reader1 (client, federation listener) is in no pool" in problems
    assert not any("persister1" in p for p in problems)  # no client/federation/media listener


def test_check_of_synapse_deploys_own_router_config(full: list[str]) -> None:
    """scripts/synapse_deploy.py router-config for the full topology agrees with its Synapse
    configuration (its `generic` pool, client_reader1, has the federation listener that
    federation routes falling back to `generic` need)."""
    pools = {pool: [url(n) for n in names] for pool, names in FULL_TOPOLOGY.router_pools().items()}
    problems = check(parse_config(pools_yaml(pools)), read_deployment(full[0], full[1:]))
    assert problems == []


def test_bad_synapse_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hs = tmp_path / "homeserver.yaml"
    hs.write_text("stream_writers: [typing]\n")
    with pytest.raises(SynapseConfigError, match="stream_writers: expected a mapping"):
        read_deployment(hs, [])
    hs.write_text("{}\n")
    worker = tmp_path / "w.yaml"
    worker.write_text("worker_app: synapse.app.generic_worker\n")
    with pytest.raises(SynapseConfigError, match="w.yaml: worker_name"):
        read_deployment(hs, [worker])
    assert main(["config", "from-synapse", str(hs), str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_worker_names_and_listeners_choose_pools(tmp_path: Path) -> None:
    hs = tmp_path / "hs.yaml"
    hs.write_text("instance_map: {generic7: {host: 10.0.0.7, port: 9093}}\n")
    files = []
    for name, resources, bind in (
        ("synchrotron2", ["client"], "10.0.0.2"),
        ("generic7", ["client", "federation"], "0.0.0.0"),  # wildcard: instance_map's host
        ("fedonly", ["federation"], "10.0.0.8"),
    ):
        path = tmp_path / f"{name}.yaml"
        listener = {"type": "http", "port": 8083, "bind_addresses": [bind], "resources": [{"names": resources}]}
        path.write_text(
            yaml.safe_dump(
                {"worker_app": "synapse.app.generic_worker", "worker_name": name, "worker_listeners": [listener]}
            )
        )
        files.append(str(path))
    assert router_pools(read_deployment(hs, files)) == {
        "sync": ["http://10.0.0.2:8083"],
        "generic": ["http://10.0.0.7:8083"],
        "federation_reader": ["http://10.0.0.8:8083"],
    }


@pytest.mark.parametrize(
    ("listener", "key"),
    [
        ({"type": "http", "port": 1, "resources": "client"}, "worker_listeners[0].resources: expected a list"),
        ({"type": "http", "port": 1, "resources": [{"names": "client"}]}, "resources[0].names: expected a list"),
        ({"type": "http", "port": "x", "resources": [{"names": ["client"]}]}, "worker_listeners[0].port"),
        (
            {"type": "http", "port": 1, "bind_addresses": "::", "resources": [{"names": ["client"]}]},
            "worker_listeners[0].bind_addresses",
        ),
    ],
)
def test_malformed_listeners_are_named(tmp_path: Path, listener: dict[str, object], key: str) -> None:
    hs = tmp_path / "hs.yaml"
    hs.write_text("{}\n")
    worker = tmp_path / "w.yaml"
    worker.write_text(
        yaml.safe_dump(
            {"worker_app": "synapse.app.generic_worker", "worker_name": "w1", "worker_listeners": [listener]}
        )
    )
    with pytest.raises(SynapseConfigError, match=re.escape(key)):
        read_deployment(hs, [worker])
