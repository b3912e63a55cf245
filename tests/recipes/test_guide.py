"""docs/deployment.md: its configuration snippets parse and agree with the router (QR-login
rendezvous paths, health endpoint, grace, keep-alive timeout) and with the container image
(paths, ports, user, command line)."""

from __future__ import annotations

import re
from typing import Any

import yaml
from synapse_router.config import parse_config
from synapse_router.edge.limits import LimitsConfig
from synapse_router.edge.shutdown import DEFAULT_GRACE
from synapse_router.routing.routes import RENDEZVOUS_PATTERNS, RouteTable

from tests.recipes.recipe_files import code_blocks, dockerfile_stages

RENDEZVOUS_SAMPLES = [
    "/_matrix/client/unstable/org.matrix.msc4108/rendezvous",
    "/_matrix/client/unstable/org.matrix.msc4108/rendezvous/0a1b2c",
    "/_matrix/client/v1/org.matrix.msc4108/rendezvous/0a1b2c",
    "/_matrix/client/v1/rendezvous",
    "/_matrix/client/v1/rendezvous/0a1b2c",
    "/_synapse/client/rendezvous/0a1b2c",
    "/_matrix/client/unstable/io.element.msc4388/rendezvous",
    "/_matrix/client/unstable/io.element.msc4388/rendezvous/0a1b2c",
]
OTHER_SAMPLES = [
    "/_matrix/client/v3/sync",
    "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/1",
    "/_synapse/client/pick_idp",
    "/_matrix/client/v1/login/get_token",
]


def snippets() -> list[Any]:
    return [yaml.safe_load(block) for block in code_blocks("yaml")]


def snippet_with(key: str) -> Any:
    [found] = [s for s in snippets() if isinstance(s, dict) and key in s]
    return found


def final_stage_port(name: str) -> int:
    final = dockerfile_stages()[-1]
    ports = {int(p) for p in final.last("EXPOSE").split()}
    port = {"http": 8080, "metrics": 9105}[name]
    assert port in ports
    return port


def test_every_yaml_snippet_parses() -> None:
    assert len(snippets()) == 5


def test_trusted_proxies_snippet_is_a_valid_router_configuration() -> None:
    assert [str(n) for n in parse_config(yaml.safe_dump(snippet_with("trusted_proxies"))).trusted_proxies] == [
        "172.18.0.0/16"
    ]


def test_compose_service_matches_the_image() -> None:
    service = snippet_with("services")["services"]["synapse-router"]
    final = dockerfile_stages()[-1]
    cmd = final.exec_form("CMD")
    config_path = next(a.split("=", 1)[1] for a in cmd if a.startswith("router_config="))
    assert any(v.split(":")[1] == config_path for v in service["volumes"])
    assert [t.split(":")[0] for t in service["tmpfs"]] == [final.env()["HOME"]]
    uid, gid = final.last("USER").split(":")
    assert f"uid={uid},gid={gid}" in service["tmpfs"][0]
    assert DEFAULT_GRACE < float(service["stop_grace_period"].removesuffix("s")) <= DEFAULT_GRACE + 10


def _rule_matches(rule: str, path: str) -> bool:
    """A Traefik v3 rule of Host(...) && (PathPrefix(...) || PathRegexp(...) ...) for a path."""
    prefixes = re.findall(r"PathPrefix\(`([^`]*)`\)", rule)
    regexps = re.findall(r"PathRegexp\(`([^`]*)`\)", rule)
    return any(path.startswith(p) for p in prefixes) or any(re.search(r, path) for r in regexps)


def test_traefik_keeps_qr_login_rendezvous_uncompressed() -> None:
    http = snippet_with("http")["http"]
    matrix, rendezvous = http["routers"]["matrix"], http["routers"]["matrix-rendezvous"]
    assert http["middlewares"][matrix["middlewares"][0]] == {"compress": {}}
    assert "middlewares" not in rendezvous and rendezvous["priority"] > matrix.get("priority", 0)
    table = RouteTable()
    for pattern in RENDEZVOUS_PATTERNS:  # every rendezvous route of the router has a sample here
        assert any(re.search(pattern, path) for path in RENDEZVOUS_SAMPLES), pattern
    for path in RENDEZVOUS_SAMPLES:
        route = table.match("PUT", path).route
        assert route is not None and route.name == "rendezvous" and route.strip_accept_encoding
        assert _rule_matches(rendezvous["rule"], path), path
        assert _rule_matches(matrix["rule"], path), path  # compressed, were it not for the priority
    for path in OTHER_SAMPLES:
        assert not _rule_matches(rendezvous["rule"], path), path
        assert _rule_matches(matrix["rule"], path), path


def test_traefik_checks_health_and_forwards_to_the_router() -> None:
    balancer = snippet_with("http")["http"]["services"]["synapse-router"]["loadBalancer"]
    assert balancer["servers"] == [{"url": f"http://synapse-router:{final_stage_port('http')}"}]
    assert balancer["healthCheck"]["path"] == "/ready"  # readiness: 503 once a stop begins
    assert balancer["healthCheck"]["port"] == final_stage_port("metrics")


def _seconds(value: str) -> float:
    assert value.endswith("s")
    return float(value[:-1])


def test_traefik_drops_idle_connections_before_the_router_does() -> None:
    timeouts = snippet_with("serversTransport")["serversTransport"]["forwardingTimeouts"]
    assert _seconds(timeouts["idleConnTimeout"]) < LimitsConfig().keepalive_timeout
    assert _seconds(timeouts["responseHeaderTimeout"]) == 0


def test_kubernetes_deployment_matches_the_image_and_the_grace() -> None:
    deployment = snippet_with("kind")
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    final = dockerfile_stages()[-1]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + DEFAULT_GRACE
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": final_stage_port("http"), "metrics": final_stage_port("metrics")}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    image_cmd = final.exec_form("CMD")
    assert [a for a in container["args"] if not a.startswith("reverse:")] == [
        a for a in image_cmd if not a.startswith("reverse:")
    ]
    assert container["args"][container["args"].index("--mode") + 1].endswith(f"@{ports['http']}")
    assert str(pod["securityContext"]["runAsUser"]) == final.last("USER").split(":")[0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == final.env()["HOME"]
    config_path = next(a.split("=", 1)[1] for a in image_cmd if a.startswith("router_config="))
    assert config_path.startswith(mounts["config"] + "/")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
