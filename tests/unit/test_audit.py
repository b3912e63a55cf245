"""`routes audit`'s pure part (audit.py): sample paths from Synapse's servlet regexes, and the
comparison with the route table, on synthetic servlets and on the servlets Synapse 1.163.2
registers (saved with `synapse-router routes audit --save-servlets`; the e2e test runs the
real introspection against the installed Synapse)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from synapse_router.routing.routes import Balance, Route, RouteTable
from synapse_router.tools.audit import Servlet, audit, parse_servlets, sample_paths

SAVED = Path(__file__).parent / "data" / "synapse-1.163.2-servlets.json"


def test_sample_paths_cover_every_version_and_fill_groups_plausibly() -> None:
    pattern = "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/(?P<room_id>[^/]*)/typing/(?P<user_id>[^/]*)$"
    samples = sample_paths(pattern)
    for version in ("api/v1", "r0", "v3", "unstable"):
        assert f"/_matrix/client/{version}/rooms/!r:x/typing/@u:x" in samples
    assert all(re.match(pattern, s) for s in samples)


def test_sample_paths_optional_parts_absent_and_present() -> None:
    pattern = "^/_matrix/client/(r0|v3|unstable)/room_keys/keys(/(?P<room_id>[^/]+))?(/(?P<session_id>[^/]+))?$"
    samples = sample_paths(pattern)
    assert "/_matrix/client/v3/room_keys/keys" in samples
    assert "/_matrix/client/v3/room_keys/keys/!r:x" in samples
    assert "/_matrix/client/v3/room_keys/keys/!r:x/x" in samples


def test_sample_paths_keep_an_unescaped_dot_a_dot_and_no_empty_segment() -> None:
    pattern = "^/_matrix/client/unstable/io.element.msc4306/rooms/(?P<room_id>[^/]*)/thread/(?P<thread>[^/]*)$"
    assert "/_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/x" in sample_paths(pattern)
    assert not any("//" in s for s in sample_paths(pattern))


def test_sample_paths_fall_back_when_a_plausible_value_does_not_fit() -> None:
    # `path` must start with `pushrules/`: the plausible "x" does not fit, the generic one does
    samples = sample_paths("^/_matrix/client/(api/v1|r0|v3|unstable)/(?P<path>pushrules/.*)$")
    assert "/_matrix/client/v3/pushrules/." in samples


def test_sample_paths_refuse_what_they_cannot_make() -> None:
    with pytest.raises(ValueError):
        sample_paths(r"^/(?P<a>x)(?P=a)$")


def servlet(kind: str, method: str, pattern: str, name: str = "S", mount: str = "/_matrix/client") -> Servlet:
    return Servlet(kind, method, pattern, name, mount)


def test_a_path_sent_to_a_process_that_does_not_register_it_is_misrouted() -> None:
    servlets = [
        servlet("main", "GET", "^/_matrix/client/v3/thing$"),
        servlet("federation", "GET", "^/_matrix/client/v3/thing$"),  # not on client workers
    ]
    table = RouteTable(
        [Route("things", ("^/_matrix/client/v3/thing$",), ("client_reader",), Balance.ROUND_ROBIN, frozenset({"GET"}))]
    )
    report = audit("x", servlets, table)
    assert [f.path for f in report.misrouted] == ["/_matrix/client/v3/thing"]
    assert "client_reader" in report.misrouted[0].problem and not report.ok
    # The method counts: a client worker with the path for PUT only would answer the GET 405
    servlets = [
        servlet("main", "GET", "^/_matrix/client/v3/thing$"),
        servlet("client", "PUT", "^/_matrix/client/v3/thing$"),
    ]
    assert [(f.method, f.route) for f in audit("x", servlets, table).misrouted] == [("GET", "things")]


def test_a_writer_servlets_write_must_reach_its_writer_pool_only() -> None:
    typing = "^/_matrix/client/v3/rooms/(?P<room_id>[^/]*)/typing/(?P<user_id>[^/]*)$"
    servlets = [servlet(k, "PUT", typing, "RoomTypingRestServlet") for k in ("main", "client", "writer")]
    assert audit("x", servlets).misrouted == []  # the built-in table: the typing pool
    wrong = RouteTable([Route("t", ("/typing/",), ("client_reader",), Balance.ROUND_ROBIN)])
    problems = [f.problem for f in audit("x", servlets, wrong).misrouted]
    assert set(problems) == {"a typing write must go to the typing writer pool only, not client_reader"}


def test_a_servlet_only_workers_register_and_no_route_claims_is_uncovered() -> None:
    servlets = [servlet("client", "GET", "^/_matrix/client/v3/only_on_workers$")]
    report = audit("x", servlets)
    assert [f.path for f in report.uncovered] == ["/_matrix/client/v3/only_on_workers"]
    assert report.misrouted == [] and not report.ok


def test_allowed_findings_are_listed_with_their_reason_not_counted() -> None:
    servlets = [servlet("client", "GET", "^/_matrix/client/v3/only_on_workers$", "OnlyOnWorkers")]
    report = audit("x", servlets, allowed={("GET", "OnlyOnWorkers"): "because"})
    assert report.uncovered == [] and [reason for _, reason in report.allowed] == ["because"]


def test_plain_resources_are_prefixes() -> None:
    servlets = [servlet("main", "*", "", "HealthResource", "/_synapse/client/pick_idp")]
    report = audit("x", servlets)
    assert report.misrouted == report.uncovered == [] and report.requests == 2


def test_a_writer_class_synapse_no_longer_has_is_reported() -> None:
    report = audit("x", [servlet("main", "GET", "^/x$")])
    assert "RoomTypingRestServlet" in report.stale and not report.ok


def test_the_builtin_table_against_synapse_1_163_2() -> None:
    """Every servlet of every kind of process, through the built-in table: no misroute."""
    version, servlets = parse_servlets(json.loads(SAVED.read_text()))
    report = audit(version, servlets)
    assert report.requests > 1000
    assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize(
    "data",
    [
        {"processes": []},
        {"synapse_version": "1", "processes": []},
        {"synapse_version": "1", "processes": {"main": ["x"]}},
        {
            "synapse_version": "1",
            "processes": {"main": [{"method": "GET", "pattern": "(", "servlet": "S", "mount": ""}]},
        },
    ],
)
def test_parse_servlets_refuses_other_json(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_servlets(data)
