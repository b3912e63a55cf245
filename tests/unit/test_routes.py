"""Real Synapse request paths -> the pool that must serve them."""

from __future__ import annotations

import pytest
from synapse_router.config import parse_config
from synapse_router.routing.engine import Engine
from synapse_router.routing.routes import Balance, RouteTable, room_from_path

ALL_POOLS = [
    "sync",
    "initial_sync",
    "generic",
    "client_reader",
    "federation_reader",
    "room",
    "media",
    "user_dir",
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
    "push_rules",
    "device_lists",
    "thread_subscriptions",
    "quarantined_media_changes",
]


def engine_with(pools: list[str], extra: str = "") -> Engine:
    lines = ["workers:"] + [f"  {p}: [http://127.0.0.1:{20000 + i}]" for i, p in enumerate(pools)]
    return Engine(parse_config("\n".join(lines) + "\n" + extra))


FULL = engine_with(ALL_POOLS)


def pool_for(engine: Engine, method: str, path: str) -> str:
    match = engine.match(method, path)
    decision = engine.select(match.route, "key", "user", frozenset(), {})
    return decision.pool


# (method, path with query, expected pool when every pool exists)
CASES = [
    # sync: every sync endpoint, incremental vs initial
    ("GET", "/_matrix/client/v3/sync?since=s72594_4483_1934&timeout=30000", "sync"),
    ("GET", "/_matrix/client/r0/sync?since=s1&full_state=false", "sync"),
    ("GET", "/_matrix/client/v3/sync?timeout=0", "initial_sync"),
    ("GET", "/_matrix/client/v3/sync", "initial_sync"),
    ("GET", "/_matrix/client/v3/sync?since=", "initial_sync"),
    ("GET", "/_matrix/client/v3/sync?since=s1&full_state=true", "initial_sync"),
    ("GET", "/_matrix/client/v3/events?from=s1&timeout=30000", "sync"),
    ("GET", "/_matrix/client/api/v1/events", "sync"),
    ("GET", "/_matrix/client/v3/initialSync?limit=1", "initial_sync"),
    ("GET", "/_matrix/client/r0/rooms/!abc:example.org/initialSync", "initial_sync"),
    ("GET", "/_matrix/client/v3/rooms/%21abc%3Aexample.org/initialSync", "initial_sync"),
    ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=12&timeout=30000", "sync"),
    ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", "initial_sync"),
    # stream writers
    ("PUT", "/_matrix/client/v3/rooms/!r:example.org/typing/@alice:example.org", "typing"),
    ("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/txn1", "to_device"),
    ("PUT", "/_matrix/client/v3/user/@alice:example.org/account_data/m.direct", "account_data"),
    ("GET", "/_matrix/client/v3/user/@alice:example.org/account_data/m.direct", "account_data"),
    ("PUT", "/_matrix/client/v3/user/@alice:example.org/rooms/!r:example.org/tags/m.favourite", "account_data"),
    ("GET", "/_matrix/client/r0/user/@alice:example.org/rooms/!r:example.org/tags", "account_data"),
    ("PUT", "/_matrix/client/v3/user/@a:x/rooms/!r:x/account_data/m.fully_read", "account_data"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/receipt/m.read/$ev", "receipts"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/read_markers", "receipts"),
    ("PUT", "/_matrix/client/v3/presence/@alice:example.org/status", "presence"),
    ("GET", "/_matrix/client/v3/presence/@alice:example.org/status", "presence"),
    ("GET", "/_matrix/client/v3/pushrules/", "push_rules"),
    ("PUT", "/_matrix/client/v3/pushrules/global/override/rule1", "push_rules"),
    ("POST", "/_matrix/client/v3/delete_devices", "device_lists"),
    # Synapse registers DeleteDevicesRestServlet on `(r0|v3|unstable)` (found by `routes audit`)
    ("POST", "/_matrix/client/unstable/delete_devices", "device_lists"),
    ("GET", "/_matrix/client/v3/devices", "device_lists"),
    ("PUT", "/_matrix/client/v3/devices/ABCDEF", "device_lists"),
    ("POST", "/_matrix/client/v3/keys/upload", "device_lists"),
    ("POST", "/_matrix/client/v3/keys/device_signing/upload", "device_lists"),
    ("POST", "/_matrix/client/v3/keys/signatures/upload", "device_lists"),
    ("PUT", "/_matrix/client/v1/rooms/!r:x/thread/$ev/subscription", "thread_subscriptions"),
    ("PUT", "/_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/$ev/subscription", "thread_subscriptions"),
    ("GET", "/_matrix/client/unstable/io.element.msc4308/thread_subscriptions", "thread_subscriptions"),
    # room-scoped
    ("PUT", "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/txn42", "room"),
    ("PUT", "/_matrix/client/v3/rooms/!r:example.org/state/m.room.name/", "room"),
    ("GET", "/_matrix/client/v3/rooms/!r:example.org/state", "room"),
    ("PUT", "/_matrix/client/v3/rooms/!r:example.org/redact/$ev/txn", "room"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/join", "room"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/invite", "room"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/leave", "room"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/kick", "room"),
    ("POST", "/_matrix/client/v3/join/%23room:example.org?server_name=example.org", "room"),
    ("POST", "/_matrix/client/v3/knock/!r:example.org", "room"),
    ("GET", "/_matrix/client/v3/rooms/!r:example.org/messages?dir=b&from=t1", "room"),
    ("GET", "/_matrix/client/v3/rooms/!r:example.org/members", "room"),
    ("GET", "/_matrix/client/v3/rooms/!r:example.org/joined_members", "room"),
    ("GET", "/_matrix/client/v3/rooms/!r:example.org/context/$ev?limit=10", "room"),
    ("GET", "/_matrix/client/v3/rooms/!r:example.org/event/$ev", "room"),
    ("GET", "/_matrix/client/v1/rooms/!r:example.org/relations/$ev/m.thread", "room"),
    ("GET", "/_matrix/client/v1/rooms/!r:example.org/threads", "room"),
    ("GET", "/_matrix/client/v1/rooms/!r:example.org/hierarchy", "room"),
    ("GET", "/_matrix/client/v1/rooms/!r:example.org/timestamp_to_event?ts=1&dir=f", "room"),
    ("GET", "/_matrix/client/v3/rooms/!r:example.org/aliases", "room"),
    # media
    ("GET", "/_matrix/media/v3/download/example.org/abc", "media"),
    ("POST", "/_matrix/media/v3/upload?filename=a.png", "media"),
    ("GET", "/_matrix/client/v1/media/thumbnail/example.org/abc?width=32&height=32", "media"),
    ("GET", "/_matrix/federation/v1/media/download/abc", "media"),
    ("POST", "/_synapse/admin/v1/purge_media_cache?before_ts=1", "media"),
    ("GET", "/_synapse/admin/v1/room/!r:x/media", "media"),
    ("GET", "/_synapse/admin/v1/users/@a:x/media", "media"),
    ("GET", "/_synapse/admin/v1/media/example.org/abc", "media"),
    ("GET", "/_synapse/admin/v1/media/quarantine_changes", "media"),
    # quarantining writes a stream: its writer, never any media worker
    ("POST", "/_synapse/admin/v1/quarantine_media/!r:x", "quarantined_media_changes"),
    ("POST", "/_synapse/admin/v1/room/!r:x/media/quarantine", "quarantined_media_changes"),
    ("POST", "/_synapse/admin/v1/user/@a:x/media/quarantine", "quarantined_media_changes"),
    ("POST", "/_synapse/admin/v1/media/quarantine/example.org/abc", "quarantined_media_changes"),
    ("POST", "/_synapse/admin/v1/media/unquarantine/example.org/abc", "quarantined_media_changes"),
    # user directory
    ("POST", "/_matrix/client/v3/user_directory/search", "user_dir"),
    # federation
    ("PUT", "/_matrix/federation/v1/send/1699999999", "federation_reader"),
    ("GET", "/_matrix/federation/v1/version", "federation_reader"),
    ("GET", "/_matrix/federation/v1/event/$ev", "federation_reader"),
    ("GET", "/_matrix/federation/v1/state_ids/!r:x?event_id=$e", "federation_reader"),
    ("GET", "/_matrix/federation/v1/make_join/!r:x/@a:y", "federation_reader"),
    ("PUT", "/_matrix/federation/v2/send_join/!r:x/$e", "federation_reader"),
    ("PUT", "/_matrix/federation/v2/invite/!r:x/$e", "federation_reader"),
    ("GET", "/_matrix/federation/v1/query/profile?user_id=@a:x", "federation_reader"),
    ("POST", "/_matrix/federation/v1/user/devices/@a:x", "federation_reader"),
    ("POST", "/_matrix/key/v2/query", "federation_reader"),
    ("GET", "/_matrix/federation/v1/hierarchy/!r:x", "federation_reader"),
    # client readers
    ("GET", "/_matrix/client/versions", "client_reader"),
    ("POST", "/_matrix/client/v3/createRoom", "client_reader"),
    ("GET", "/_matrix/client/v3/publicRooms", "client_reader"),
    ("GET", "/_matrix/client/v3/joined_rooms", "client_reader"),
    ("POST", "/_matrix/client/v3/search", "client_reader"),
    ("GET", "/_matrix/client/v3/account/whoami", "client_reader"),
    ("GET", "/_matrix/client/v3/account/3pid", "client_reader"),
    ("POST", "/_matrix/client/v3/account/deactivate", "client_reader"),
    ("GET", "/_matrix/client/v3/capabilities", "client_reader"),
    ("GET", "/_matrix/client/v3/notifications", "client_reader"),
    ("POST", "/_matrix/client/v3/keys/query", "client_reader"),
    ("GET", "/_matrix/client/v3/keys/changes?from=a&to=b", "client_reader"),
    ("POST", "/_matrix/client/v3/keys/claim", "client_reader"),
    ("GET", "/_matrix/client/v3/room_keys/version", "client_reader"),
    ("POST", "/_matrix/client/v3/login", "client_reader"),
    ("GET", "/_matrix/client/v3/login", "client_reader"),
    ("POST", "/_matrix/client/v3/register", "client_reader"),
    ("GET", "/_matrix/client/v3/register/available?username=a", "client_reader"),
    ("GET", "/_matrix/client/v1/register/m.login.registration_token/validity?token=x", "client_reader"),
    ("GET", "/_matrix/client/v3/password_policy", "client_reader"),
    ("GET", "/_matrix/client/v3/profile/@alice:example.org", "client_reader"),
    ("POST", "/_matrix/client/v3/user/@alice:example.org/filter", "client_reader"),
    ("GET", "/_matrix/client/v3/user/@alice:example.org/filter/1", "client_reader"),
    ("GET", "/_matrix/client/v3/directory/room/%23alias:example.org", "client_reader"),
    ("GET", "/_matrix/client/v3/voip/turnServer", "client_reader"),
    ("GET", "/_synapse/admin/v1/rooms/!r:example.org", "client_reader"),
    ("GET", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events", "client_reader"),
    # main-only overrides, and everything no route claims
    ("POST", "/_matrix/client/unstable/org.matrix.msc4108/rendezvous", "main"),
    ("PUT", "/_synapse/client/rendezvous/abcdef", "main"),
    ("GET", "/_synapse/client/rendezvous/abcdef", "main"),
    ("POST", "/_matrix/client/unstable/io.element.msc4388/rendezvous", "main"),
    ("DELETE", "/_matrix/client/unstable/io.element.msc4388/rendezvous/abc", "main"),
    ("GET", "/_matrix/client/v3/login/sso/redirect?redirectUrl=x", "main"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/forget", "main"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/upgrade", "main"),
    ("POST", "/_matrix/client/v3/rooms/!r:example.org/report/$ev", "main"),
    ("POST", "/_matrix/client/v3/account/3pid/add", "main"),
    ("PUT", "/_matrix/client/v3/directory/list/room/!r:example.org", "main"),
    ("GET", "/_matrix/federation/v1/openid/userinfo?access_token=x", "main"),
    ("POST", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc", "main"),
    ("POST", "/_matrix/client/v3/logout", "main"),
    ("POST", "/_matrix/client/v3/logout/all", "main"),
    ("GET", "/_synapse/admin/v2/users/@a:x", "main"),
    ("GET", "/health", "main"),
    ("GET", "/", "main"),
    ("GET", "/_matrix/client/v3/sync/", "main"),
    ("GET", "/_matrix/client/V3/sync", "main"),
    ("GET", "", "main"),
]


@pytest.mark.parametrize(("method", "path", "pool"), CASES)
def test_every_pool_deployed(method: str, path: str, pool: str) -> None:
    assert pool_for(FULL, method, path) == pool


# Only a generic pool: everything a generic worker serves goes there, writers stay on main.
GENERIC_ONLY = engine_with(["generic"])
GENERIC_CASES = [
    ("GET", "/_matrix/client/v3/sync?since=s1", "generic"),
    ("GET", "/_matrix/client/v3/sync", "generic"),
    ("GET", "/_matrix/client/v3/rooms/!r:x/initialSync", "generic"),
    ("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/1", "generic"),
    ("GET", "/_matrix/client/v3/rooms/!r:x/messages", "generic"),
    ("GET", "/_matrix/client/versions", "generic"),
    ("PUT", "/_matrix/federation/v1/send/1", "generic"),
    ("GET", "/_matrix/client/v3/devices", "generic"),
    ("GET", "/_matrix/client/v3/pushrules/", "generic"),
    ("GET", "/_matrix/client/v3/user/@a:x/account_data/m.direct", "generic"),
    ("GET", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events", "generic"),
    # writes of single-writer streams: the writer is main when no writer pool exists
    ("PUT", "/_matrix/client/v3/pushrules/global/override/r", "main"),
    ("PUT", "/_matrix/client/v3/user/@a:x/account_data/m.direct", "main"),
    ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@a:x", "main"),
    ("PUT", "/_matrix/client/v3/sendToDevice/t/1", "main"),
    ("PUT", "/_matrix/client/v3/presence/@a:x/status", "main"),
    # presence reads as well: a non-presence worker cannot read another user's status
    ("GET", "/_matrix/client/v3/presence/@b:x/status", "main"),
    # ... and so are those of multi-writer streams: only configured writers may write them
    ("POST", "/_matrix/client/v3/rooms/!r:x/receipt/m.read/$e", "main"),
    ("POST", "/_matrix/client/v3/rooms/!r:x/read_markers", "main"),
    ("POST", "/_matrix/client/v3/keys/upload", "main"),
    ("POST", "/_matrix/client/v3/keys/device_signing/upload", "main"),
    ("POST", "/_matrix/client/v3/keys/signatures/upload", "main"),
    ("POST", "/_matrix/client/v3/delete_devices", "main"),
    ("PUT", "/_matrix/client/v3/devices/ABC", "main"),
    ("DELETE", "/_matrix/client/v3/devices/ABC", "main"),
    ("GET", "/_matrix/media/v3/download/x/y", "main"),
    ("POST", "/_matrix/client/unstable/org.matrix.msc4108/rendezvous", "main"),
]


def test_cases_cover_every_pool() -> None:
    assert {pool for _, _, pool in CASES + GENERIC_CASES} == {*ALL_POOLS, "main"}


@pytest.mark.parametrize(("method", "path", "pool"), GENERIC_CASES)
def test_generic_only(method: str, path: str, pool: str) -> None:
    assert pool_for(GENERIC_ONLY, method, path) == pool


# The README's example deployment: readers but no writer pools. A write of a stream reaches
# main (its writer when no worker is one), never a reader: a generic worker that is not a
# configured stream writer answers 500 (`AssertionError: self._can_write_to_receipts`).
READERS_ONLY = engine_with(["sync", "client_reader", "federation_reader", "generic"])
WRITER_ROUTES = ("typing", "to_device", "account_data", "receipts", "presence", "push_rules", "device_lists")
STREAM_OF_ROUTE = {name: name for name in (*WRITER_ROUTES, "thread_subscriptions")} | {
    "quarantined_media": "quarantined_media_changes"
}
WRITES = [
    ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@a:x"),
    ("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/1"),
    ("PUT", "/_matrix/client/v3/user/@a:x/account_data/m.direct"),
    ("PUT", "/_matrix/client/v3/user/@a:x/rooms/!r:x/tags/m.favourite"),
    ("DELETE", "/_matrix/client/v3/user/@a:x/rooms/!r:x/tags/m.favourite"),
    ("POST", "/_matrix/client/v3/rooms/!r:x/receipt/m.read/$e"),
    ("POST", "/_matrix/client/r0/rooms/!r:x/receipt/m.fully_read/$e"),
    ("POST", "/_matrix/client/v3/rooms/!r:x/read_markers"),
    ("PUT", "/_matrix/client/v3/presence/@a:x/status"),
    ("PUT", "/_matrix/client/v3/pushrules/global/override/r"),
    ("DELETE", "/_matrix/client/v3/pushrules/global/override/r"),
    ("POST", "/_matrix/client/v3/delete_devices"),
    ("POST", "/_matrix/client/unstable/delete_devices"),
    ("PUT", "/_matrix/client/v3/devices/ABC"),
    ("DELETE", "/_matrix/client/v3/devices/ABC"),
    ("POST", "/_matrix/client/v3/keys/upload"),
    ("POST", "/_matrix/client/v3/keys/device_signing/upload"),
    ("POST", "/_matrix/client/v3/keys/signatures/upload"),
]


@pytest.mark.parametrize(("method", "path"), WRITES)
def test_stream_writes_never_reach_readers(method: str, path: str) -> None:
    match = READERS_ONLY.match(method, path)
    assert match.route is not None and match.route.name in WRITER_ROUTES
    assert len(match.route.pools) == 1 and match.route.pools[0] == match.route.name
    assert pool_for(READERS_ONLY, method, path) == "main"


def test_writer_routes_chain_only_their_writer() -> None:
    for route in RouteTable().routes:
        if route.name in STREAM_OF_ROUTE:
            assert route.pools == (STREAM_OF_ROUTE[route.name],), route


def test_quarantine_reaches_its_writer_not_the_media_worker() -> None:
    # docs/workers.md: quarantine_media "should be routed directly to one of the workers
    # configured as stream writer for the quarantined_media_changes stream"; a media worker
    # that is not one fails the write.
    engine = engine_with(["media"])
    assert pool_for(engine, "POST", "/_synapse/admin/v1/media/quarantine/x/abc") == "main"
    assert pool_for(engine, "GET", "/_synapse/admin/v1/media/x/abc") == "media"


def test_sync_pool_beats_generic() -> None:
    engine = engine_with(["generic", "sync"])
    assert pool_for(engine, "GET", "/_matrix/client/v3/sync?since=x") == "sync"
    assert pool_for(engine, "GET", "/_matrix/client/v3/sync") == "sync"  # no initial_sync pool
    assert pool_for(engine, "GET", "/_matrix/client/v3/rooms/!r:x/initialSync") == "sync"


def test_no_workers_everything_main() -> None:
    engine = engine_with([])
    for method, path, _ in CASES:
        assert pool_for(engine, method, path) == "main"


def test_custom_route_precedes_builtin_even_unanchored() -> None:
    engine = engine_with(
        ["room", "generic"],
        "routes:\n  - name: bots\n    paths: ['/rooms/[^/]+/send/m\\.bridge']\n    pool: generic\n    balance: room\n",
    )
    match = engine.match("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.bridge.event/1")
    assert match.route is not None and match.route.name == "bots"
    assert pool_for(engine, "PUT", "/_matrix/client/v3/rooms/!r:x/send/m.bridge.event/1") == "generic"
    assert pool_for(engine, "PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/1") == "room"


def test_custom_route_method_filter_falls_through() -> None:
    engine = engine_with(
        ["generic", "client_reader"],
        "routes:\n  - {name: ro, paths: ['^/_matrix/client/versions$'], pool: generic, methods: [post]}\n",
    )
    assert pool_for(engine, "POST", "/_matrix/client/versions") == "generic"
    assert pool_for(engine, "GET", "/_matrix/client/versions") == "client_reader"


def test_room_from_path() -> None:
    assert room_from_path("/_matrix/client/v3/rooms/%21abc%3Ax.org/send/m.room.message/1") == "!abc:x.org"
    assert room_from_path("/_matrix/client/v3/join/%23alias:x.org") == "#alias:x.org"
    assert room_from_path("/_matrix/client/versions") is None


def test_room_balance_same_room_same_worker() -> None:
    engine = Engine(parse_config("workers:\n  room: [http://127.0.0.1:1, http://127.0.0.1:2, http://127.0.0.1:3]\n"))
    match = engine.match("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/1")
    assert match.route is not None
    picks = {engine.select(match.route, "!r:x", "room", frozenset(), {}).worker for _ in range(20)}
    assert len(picks) == 1


@pytest.mark.parametrize(
    "path",
    [
        "/_synapse/client/%72endezvous/abc",
        "/_synapse/client/rendezvous%2Fabc",
        "/_synapse/%63lient/rendezvous/abc",
        "/_synapse/client/%72%65ndezvous",
        "/%5Fsynapse/client/rendezvous/abc",  # Twisted decodes the first segment too
    ],
)
def test_rendezvous_is_matched_as_twisted_decodes_synapse_paths(path: str) -> None:
    # Twisted unescapes /_synapse/ resource paths: these reach the rendezvous resource, so the
    # Accept-Encoding rule must apply to them too.
    match = RouteTable().match("GET", path)
    assert match.route is not None and match.route.name == "rendezvous" and match.route.strip_accept_encoding
    assert match.path == path  # forwarded as sent


@pytest.mark.parametrize(
    "path",
    [
        "/_matrix/client/v3/user/@a:x/account_data/m.direct",
        "/_matrix/client/v3/pushrules/",
        "/_matrix/client/v3/devices",
    ],
)
def test_stream_reads_on_readers_are_keyed_by_user(path: str) -> None:
    """Reads of a stream that readers may serve stay on one process per user: with writes on
    main and reads spread round robin, a user saw an older value after a newer one."""
    match = READERS_ONLY.match("GET", path)
    assert match.route is not None and match.route.name.endswith("_read")
    assert match.route.balance is Balance.USER


@pytest.mark.parametrize(
    ("method", "path", "writer_pool"),
    [
        ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@a:x", "typing"),
        ("PUT", "/_matrix/client/v3/sendToDevice/m.x/t1", "to_device"),
        ("POST", "/_matrix/client/v3/rooms/!r:x/receipt/m.read/$e", "receipts"),
        ("PUT", "/_matrix/client/v3/user/@a:x/account_data/m.x", "account_data"),
        ("POST", "/_matrix/client/v3/keys/upload", "device_lists"),
        ("PUT", "/_matrix/client/v3/presence/@a:x/status", "presence"),
    ],
)
def test_a_write_with_its_writer_pool_down_is_not_sent_to_main(method: str, path: str, writer_pool: str) -> None:
    engine = Engine(parse_config(f"workers:\n  {writer_pool}: [http://127.0.0.1:1]\n"))
    decision = engine.select(engine.match(method, path).route, "k", "user", {"http://127.0.0.1:1"}, {})
    assert decision.writer_down and decision.upstream is None
    assert decision.pool == "router" and decision.worker == "router"
    assert "no usable writer" in decision.summary()
    up = engine.select(engine.match(method, path).route, "k", "user", set(), {})
    assert not up.writer_down and up.upstream is not None and up.pool == writer_pool
    # no writer pool configured: main is the writer
    plain = Engine(parse_config("workers: {}\n"))
    assert not plain.select(plain.match(method, path).route, "k", "user", set(), {}).writer_down


def test_reads_of_a_writer_stream_fall_back_when_the_writer_is_down() -> None:
    engine = Engine(
        parse_config("workers:\n  account_data: [http://127.0.0.1:1]\n  client_reader: [http://127.0.0.1:2]\n")
    )
    route = engine.match("GET", "/_matrix/client/v3/user/@a:x/account_data/m.x").route
    decision = engine.select(route, "k", "user", {"http://127.0.0.1:1"}, {})
    assert not decision.writer_down and decision.upstream is not None and decision.pool == "client_reader"


def test_explain_ends_a_writer_chain_with_the_routers_503_not_main() -> None:
    """router.explain printed `typing -> main` although a typing write never falls back to main."""
    path = "/_matrix/client/v3/rooms/!r:x/typing/@a:x"
    engine = Engine(parse_config("workers:\n  typing: [http://127.0.0.1:1]\n"))
    lines = engine.explain("PUT", path, "k", "user", {"http://127.0.0.1:1"})
    assert "pool chain: typing -> 503 from the router" in lines
    assert lines[-1] == "decision: typing -> no usable writer (typing:no usable worker): 503 from the router"
    assert engine.chain(engine.match("PUT", path).route) == ["typing", "503 from the router"]
    # no writer pool configured: main is the writer, and the chain says so
    plain = Engine(parse_config("workers:\n  client_reader: [http://127.0.0.1:2]\n"))
    assert "pool chain: (typing: not configured) -> main" in plain.explain("PUT", path, "k", "user", set())
