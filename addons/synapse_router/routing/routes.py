"""The route table: which Synapse endpoints go to which pools, balanced by what.

Routes are tried in order and the first that applies wins, so precedence is the order of
BUILTIN_ROUTES: main-only overrides, then sync (so room routes never see
`/rooms/<id>/initialSync`), then stream writers, then room-scoped, media, user directory,
federation and the client-reader family. Whatever no route claims goes to the main process.

Paths are matched raw (percent-encoded, query string removed), exactly as Synapse's own
servlet regexes see them, so a path is routed where Synapse would handle it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import unquote

from .query import query_param

MAIN = "main"
INITIAL_SYNC_ROUTE = "initial_sync"


class Balance(StrEnum):
    USER = "user"  # the Matrix user behind the access token (sync stickiness)
    ROOM = "room"  # the room id or alias in the path
    IP = "ip"  # the client address (federation: the sending server)
    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"


QueryPredicate = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    patterns: tuple[str, ...]
    pools: tuple[str, ...]  # tried in order; the main process is always the last resort
    balance: Balance
    methods: frozenset[str] | None = None  # None: every method
    when: QueryPredicate | None = None  # an extra condition on the query string
    strip_accept_encoding: bool = False
    stream_bodies: bool = False
    builtin: bool = True
    # A stream writer's writes: when its pool is configured and has no usable worker, no other
    # process can take them (main is not the writer then), so the router answers 503.
    writer: bool = False
    regex: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile("|".join(f"(?:{p})" for p in self.patterns)))

    def applies(self, method: str, query: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.when is None or self.when(query)


def is_initial_sync(query: str) -> bool:
    """`/sync` without `since`, or with `full_state=true`: the expensive kind."""
    return not query_param(query, "since") or query_param(query, "full_state") == "true"


def is_initial_sliding_sync(query: str) -> bool:
    return not query_param(query, "pos")


_V_ALL = r"(?:api/v1|r0|v3|unstable)"
_V_R0 = r"(?:r0|v3|unstable)"
_C = r"^/_matrix/client/"
_ROOM = r"[^/]+"
_GET = frozenset({"GET", "HEAD"})

_SYNC_POOLS = ("sync", "generic")
_INITIAL_SYNC_POOLS = ("initial_sync", "sync", "generic")
_CLIENT_POOLS = ("client_reader", "generic")

RENDEZVOUS_PATTERNS = (
    rf"{_C}(?:unstable|v1)/org\.matrix\.msc4108/rendezvous(?:/|$)",
    rf"{_C}v1/rendezvous(?:/|$)",
    r"^/_synapse/client/rendezvous(?:/|$)",
    rf"{_C}unstable/io\.element\.msc4388/rendezvous(?:/|$)",
)


def _writer(name: str, pool: str, patterns: Sequence[str], *, workers_read: bool) -> list[Route]:
    """A stream writer's endpoints: its writer pool, else main (the writer when no worker is
    configured as one). Never a reader or generic worker for a write: even Synapse's
    multi-writer streams (receipts, device_lists) accept writes only on *configured*
    `stream_writers` (a generic worker asserts `_can_write_to_receipts`). `workers_read`: Synapse
    lets any worker serve the GETs (docs/workers.md lists them for the generic worker)."""
    writes = Route(name, tuple(patterns), (pool,), Balance.ROUND_ROBIN, writer=True)
    if not workers_read:
        return [writes]
    # Keyed by user: one user's reads stay on one process, so a value once read never goes
    # back to an older one while replication catches up with a write.
    reads = Route(f"{name}_read", tuple(patterns), (pool, *_CLIENT_POOLS), Balance.USER, methods=_GET)
    return [reads, writes]


BUILTIN_ROUTES: tuple[Route, ...] = (
    # --- main-only: state lives only in the main process, or workers cannot serve these ---
    Route(
        "rendezvous",
        RENDEZVOUS_PATTERNS,
        (),
        Balance.ROUND_ROBIN,
        strip_accept_encoding=True,
    ),
    Route(
        "main_only",
        (
            rf"{_C}{_V_ALL}/login/sso/redirect",
            rf"{_C}{_V_ALL}/login/cas/ticket$",
            rf"{_C}{_V_ALL}/rooms/{_ROOM}/(?:forget|upgrade|report)(?:/|$)",
            rf"{_C}{_V_R0}/account/3pid/",
            rf"{_C}{_V_ALL}/directory/list/room/",
            r"^/_matrix/federation/v1/openid/userinfo$",
        ),
        (),
        Balance.ROUND_ROBIN,
    ),
    # --- sync: one user's syncs on one worker; initial syncs optionally on their own pool ---
    Route(
        INITIAL_SYNC_ROUTE,
        (rf"{_C}{_V_ALL}/sync$",),
        _INITIAL_SYNC_POOLS,
        Balance.USER,
        when=is_initial_sync,
    ),
    Route(
        INITIAL_SYNC_ROUTE,
        (rf"{_C}{_V_ALL}/initialSync$", rf"{_C}{_V_ALL}/rooms/{_ROOM}/initialSync$"),
        _INITIAL_SYNC_POOLS,
        Balance.USER,
    ),
    Route(
        INITIAL_SYNC_ROUTE,
        (rf"{_C}unstable/org\.matrix\.simplified_msc3575/sync$",),
        _INITIAL_SYNC_POOLS,
        Balance.USER,
        when=is_initial_sliding_sync,
    ),
    Route(
        "sync",
        (
            rf"{_C}{_V_ALL}/sync$",
            rf"{_C}{_V_ALL}/events$",
            rf"{_C}unstable/org\.matrix\.simplified_msc3575/sync$",
        ),
        _SYNC_POOLS,
        Balance.USER,
    ),
    # --- stream writers ---
    *_writer("typing", "typing", (rf"{_C}{_V_ALL}/rooms/{_ROOM}/typing",), workers_read=False),
    *_writer("to_device", "to_device", (rf"{_C}{_V_R0}/sendToDevice/",), workers_read=False),
    *_writer(
        "account_data",
        "account_data",
        (rf"{_C}{_V_R0}/user/[^/]+/(?:rooms/{_ROOM}/)?(?:account_data|tags)(?:/|$)",),
        workers_read=True,
    ),
    *_writer(
        "receipts",
        "receipts",
        (rf"{_C}{_V_R0}/rooms/{_ROOM}/(?:receipt|read_markers)(?:/|$)",),
        workers_read=False,  # POST only
    ),
    # Presence reads too: a worker that is not the presence writer answers another user's
    # status with 500 (`WorkerPresenceHandler.is_visible` raises NotImplementedError), although
    # docs/workers.md lists `presence/` GETs for the generic worker.
    *_writer("presence", "presence", (rf"{_C}{_V_ALL}/presence/",), workers_read=False),
    *_writer("push_rules", "push_rules", (rf"{_C}{_V_ALL}/pushrules/",), workers_read=True),
    *_writer(
        "device_lists",
        "device_lists",
        (
            rf"{_C}{_V_R0}/delete_devices$",
            rf"{_C}{_V_ALL}/devices(?:/|$)",
            rf"{_C}{_V_R0}/keys/upload",
            rf"{_C}{_V_ALL}/keys/device_signing/upload$",
            rf"{_C}{_V_ALL}/keys/signatures/upload$",
        ),
        workers_read=True,  # GET /devices[/<id>]
    ),
    Route(
        "thread_subscriptions",
        (
            rf"{_C}(?:v1|unstable/io\.element\.msc4306)/rooms/{_ROOM}/thread/[^/]+/subscription$",
            rf"{_C}unstable/io\.element\.msc4308/thread_subscriptions$",
        ),
        ("thread_subscriptions",),
        Balance.ROUND_ROBIN,
        writer=True,
    ),
    # --- room-scoped: all requests of a room on one worker (pagination requires it) ---
    Route(
        "room_event",
        (
            rf"{_C}{_V_ALL}/rooms/{_ROOM}/(?:send|redact)(?:/|$)",
            rf"{_C}{_V_ALL}/rooms/{_ROOM}/state(?:/|$)",
            rf"{_C}{_V_ALL}/rooms/{_ROOM}/(?:join|invite|leave|ban|unban|kick)$",
            rf"{_C}{_V_ALL}/(?:join|knock)/",
        ),
        ("room", "generic"),
        Balance.ROOM,
    ),
    Route(
        "room_read",
        (
            rf"{_C}{_V_ALL}/rooms/{_ROOM}/(?:messages|members|joined_members)$",
            rf"{_C}{_V_ALL}/rooms/{_ROOM}/(?:context|event)/",
            rf"{_C}(?:v1|unstable)/rooms/{_ROOM}/relations/",
            rf"{_C}v1/rooms/{_ROOM}/(?:threads|hierarchy|timestamp_to_event)$",
            rf"{_C}(?:api/v1|r0|v3|unstable/[^/]+)/rooms/{_ROOM}/aliases",
        ),
        ("room", *_CLIENT_POOLS),
        Balance.ROOM,
    ),
    # --- media repository ---
    # Quarantining writes the quarantined_media_changes stream: only its configured writers may
    # (the store asserts `_can_write_quarantined_media_changes`), whatever process has media.
    Route(
        "quarantined_media",
        (
            r"^/_synapse/admin/v1/quarantine_media/",
            r"^/_synapse/admin/v1/(?:room|user)/[^/]+/media/quarantine$",
            r"^/_synapse/admin/v1/media/(?:un)?quarantine/",
        ),
        ("quarantined_media_changes",),
        Balance.ROUND_ROBIN,
        writer=True,
    ),
    Route(
        "media",
        (
            r"^/_matrix/media/",
            r"^/_matrix/client/v1/media/",
            r"^/_matrix/federation/v1/media/",
            r"^/_synapse/admin/v1/purge_media_cache$",
            r"^/_synapse/admin/v1/(?:room|user)/[^/]+/media",
            r"^/_synapse/admin/v1/media/",
            r"^/_synapse/admin/v1/quarantine_media/",
            r"^/_synapse/admin/v1/users/[^/]+/media$",
        ),
        ("media",),
        Balance.LEAST_CONN,
        stream_bodies=True,
    ),
    # --- user directory ---
    Route(
        "user_directory",
        (rf"{_C}{_V_R0}/user_directory/search$",),
        ("user_dir", *_CLIENT_POOLS),
        Balance.ROUND_ROBIN,
    ),
    # --- federation: a sending server's transactions stay on one worker ---
    Route(
        "federation_send",
        (r"^/_matrix/federation/v1/send/",),
        ("federation_reader", "generic"),
        Balance.IP,
    ),
    Route(
        "federation",
        (
            r"^/_matrix/federation/v1/(?:version$|event/|state/|state_ids/|backfill/|get_missing_events/)",
            r"^/_matrix/federation/v1/(?:publicRooms|query/|make_join/|make_leave/|make_knock/|send_knock/)",
            r"^/_matrix/federation/(?:v1|v2)/(?:send_join|send_leave|invite)/",
            r"^/_matrix/federation/v1/(?:event_auth/|timestamp_to_event/|exchange_third_party_invite/)",
            r"^/_matrix/federation/v1/(?:user/devices/|hierarchy/)",
            r"^/_matrix/key/v2/query",
        ),
        ("federation_reader", "generic"),
        Balance.ROUND_ROBIN,
    ),
    # --- everything else a generic worker serves ---
    Route(
        "delayed_events_read",
        (rf"{_C}unstable/org\.matrix\.msc4140/delayed_events",),
        _CLIENT_POOLS,
        Balance.ROUND_ROBIN,
        methods=_GET,
    ),
    Route(
        "client",
        (
            rf"{_C}{_V_ALL}/(?:createRoom|publicRooms|joined_rooms|search)$",
            rf"{_C}{_V_ALL}/voip/turnServer$",
            rf"{_C}unstable/im\.nheko\.summary/summary/",
            rf"{_C}{_V_R0}/account/(?:3pid|whoami|deactivate)$",
            rf"{_C}versions$",
            rf"{_C}{_V_R0}/user/[^/]+/filter(?:/|$)",
            rf"{_C}{_V_ALL}/directory/room/",
            rf"{_C}{_V_R0}/(?:capabilities|notifications|password_policy)$",
            r"^/_synapse/admin/v1/rooms/[^/]+$",
            rf"{_C}{_V_R0}/keys/(?:query|changes|claim)$",
            rf"{_C}{_V_R0}/room_keys/",
            rf"{_C}{_V_ALL}/login$",
            rf"{_C}{_V_R0}/register(?:/available)?$",
            rf"{_C}v1/register/m\.login\.registration_token/validity$",
            rf"{_C}{_V_ALL}/profile/",
        ),
        _CLIENT_POOLS,
        Balance.ROUND_ROBIN,
    ),
)

ROUTE_GROUPS: frozenset[str] = frozenset(r.name for r in BUILTIN_ROUTES) | {"main", "custom"}

_ROOM_IN_PATH = re.compile(r"/(?:rooms|join|knock)/([^/]+)")


def room_from_path(path: str) -> str | None:
    m = _ROOM_IN_PATH.search(path)
    return unquote(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class Match:
    route: Route | None  # None: no route claimed the request; it goes to the main process
    path: str
    query: str


class RouteTable:
    """Custom routes first (in config order), then the built-in table."""

    def __init__(self, custom: Sequence[Route] = ()) -> None:
        self.routes: tuple[Route, ...] = (*custom, *BUILTIN_ROUTES)
        # One alternation over every route, each branch closed by an empty group whose
        # index names the route: the common case is a single C-level regex match.
        branches = []
        self._route_of_group: dict[int, int] = {}
        group = 0
        for i, route in enumerate(self.routes):
            group += route.regex.groups + 1
            self._route_of_group[group] = i
            # Anchored at 0 so the earliest route wins even when a later one would match
            # further left; an unanchored pattern keeps its search semantics via `.*?`.
            alternatives = "|".join(p if p.startswith("^") else f".*?(?:{p})" for p in route.patterns)
            branches.append(f"(?:{alternatives})()")
        self._combined = re.compile("|".join(branches))

    def match(self, method: str, path_and_query: str) -> Match:
        path, _, query = path_and_query.partition("?")
        # Synapse's `/_synapse/` resources are found by Twisted, which percent-decodes the
        # path first (`/_synapse/client/%72endezvous` is the rendezvous resource); `/_matrix`
        # servlets match the raw path. Route each the way Synapse will see it; forward it raw.
        seen = path
        if "%" in path and (decoded := unquote(path)).startswith("/_synapse/"):
            seen = decoded
        m = self._combined.match(seen)
        if m is None:
            return Match(None, path, query)
        first = self._route_of_group[m.lastindex or 0]
        routes = self.routes
        if routes[first].applies(method, query):
            return Match(routes[first], path, query)
        # The first route whose path matches does not apply (method or query): keep looking.
        for i in range(first + 1, len(routes)):
            route = routes[i]
            if route.regex.search(seen) and route.applies(method, query):
                return Match(route, path, query)
        return Match(None, path, query)
