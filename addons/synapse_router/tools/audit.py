"""`synapse-router routes audit`: the route table checked against the servlets Synapse registers.

Pure logic (no mitmproxy import). Synapse's side comes from `synapse_introspect.py`, run by
Synapse's own interpreter (`introspect`), as JSON: for each kind of process (`main`, `client`,
`federation`, `media`, `writer`) every (method, regex) its HTTP resources register. For every
servlet, `sample_paths` makes concrete paths its regex matches (each alternative of a version
group, each optional part with and without, named groups filled with a plausible value: a room
id `!r:x`, a user id `@u:x`, an event id `$e`, ...). Each (method, path) goes through the
router's `RouteTable`; `audit` then reports:

- misrouted: a pool of the route's chain is a kind of process that does not register the
  method and path (it would answer 404 or 405), or a write to a stream-writer servlet
  (`WRITER_SERVLETS`) is sent anywhere but its stream's writer pool;
- uncovered: no route claims the path and the main process does not register it.

Deliberate exceptions are in `ALLOWED`, each with its reason.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compat.regex import parse_regex
from ..routing.routes import RouteTable

INTROSPECT_SCRIPT = Path(__file__).with_name("synapse_introspect.py")
MAX_SAMPLES = 64  # per servlet regex: every combination of alternatives, up to this many

# Plausible values for Synapse's named groups (any other name: "x").
GROUP_VALUES: Mapping[str, str] = {
    "room_id": "!r:x",
    "room_identifier": "!r:x",
    "room_id_or_alias": "!r:x",
    "room_alias": "#a:x",
    "user_id": "@u:x",
    "target_user_id": "@u:x",
    "event_id": "$e",
    "parent_id": "$e",
    "server_name": "x",
    "origin": "x",
    "media_id": "m",
    "txn_id": "1",
    "transaction_id": "1",
}

# Servlets (Synapse class names, under the client API unless said otherwise) whose writes only a
# stream's configured writer may make: the router must send their non-GET requests to that
# stream's writer pool (the pool is named after the stream), falling back to main only. A name
# Synapse no longer has is reported (`stale`).
CLIENT_MOUNT = "/_matrix/client"
ADMIN_MOUNT = "/_synapse/admin"
WRITER_MOUNTS: Mapping[str, str] = {"quarantined_media_changes": ADMIN_MOUNT}
WRITER_SERVLETS: Mapping[str, frozenset[str]] = {
    "typing": frozenset({"RoomTypingRestServlet"}),
    "to_device": frozenset({"SendToDeviceRestServlet"}),
    "account_data": frozenset({"AccountDataServlet", "RoomAccountDataServlet", "TagServlet"}),
    "receipts": frozenset({"ReceiptRestServlet", "ReadMarkerRestServlet"}),
    "presence": frozenset({"PresenceStatusRestServlet"}),
    "push_rules": frozenset({"PushRuleRestServlet"}),
    "device_lists": frozenset(
        {
            "DeleteDevicesRestServlet",
            "DeviceRestServlet",
            "KeyUploadServlet",
            "SigningKeyUploadServlet",
            "SignaturesUploadServlet",
        }
    ),
    "thread_subscriptions": frozenset({"ThreadSubscriptionsRestServlet"}),
    "quarantined_media_changes": frozenset({"QuarantineMediaByID", "UnquarantineMediaByID"}),
}
READS = frozenset({"GET", "HEAD", "OPTIONS"})

# The kinds of Synapse process each of the router's conventional pools is (config/router.yaml):
# a request sent to the pool must be registered by one of them.
POOL_KINDS: Mapping[str, tuple[str, ...]] = {
    "federation_reader": ("federation",),
    "generic": ("client", "federation"),  # generic workers serve both APIs
    "media": ("media",),
    "quarantined_media_changes": ("media",),  # the quarantine admin API is on media workers
    **{stream: ("writer",) for stream in WRITER_SERVLETS if stream != "quarantined_media_changes"},
}
DEFAULT_KINDS = ("client",)  # sync, initial_sync, client_reader, room, user_dir, custom pools

# Deliberate differences: (method, servlet) -> reason. None yet.
ALLOWED: Mapping[tuple[str, str], str] = {}


@dataclass(frozen=True, slots=True)
class Servlet:
    kind: str
    method: str  # "*": a plain Twisted resource, any method
    pattern: str  # a regex matched against the path; "" for a plain resource (see mount)
    servlet: str  # Synapse's class name
    mount: str  # where its resource is in the tree

    def matches(self, method: str, path: str) -> bool:
        if self.method != "*" and self.method != ("GET" if method == "HEAD" else method):
            return False
        if not self.pattern:
            return path == self.mount or path.startswith(self.mount.rstrip("/") + "/")
        return re.match(self.pattern, path) is not None


@dataclass(frozen=True, slots=True)
class Finding:
    method: str
    path: str
    servlet: str
    route: str  # "main" when no route claims the path
    chain: tuple[str, ...]
    problem: str

    def line(self) -> str:
        chain = " -> ".join((*self.chain, "main"))
        return f"{self.method} {self.path} [{self.servlet}] route {self.route} ({chain}): {self.problem}"


@dataclass(slots=True)
class Report:
    synapse_version: str
    servlets: int = 0
    requests: int = 0
    misrouted: list[Finding] = field(default_factory=list)
    uncovered: list[Finding] = field(default_factory=list)
    allowed: list[tuple[Finding, str]] = field(default_factory=list)
    unsampled: list[str] = field(default_factory=list)  # regexes no path could be made for
    stale: list[str] = field(default_factory=list)  # WRITER_SERVLETS names Synapse does not have

    @property
    def ok(self) -> bool:
        return not (self.misrouted or self.uncovered or self.unsampled or self.stale)

    def lines(self) -> list[str]:
        out = [
            f"Synapse {self.synapse_version}: {self.servlets} servlet registrations, "
            f"{self.requests} sample requests through the route table",
            f"misrouted: {len(self.misrouted)}",
            *(f"  {f.line()}" for f in self.misrouted),
            f"uncovered (no route, and main does not serve it): {len(self.uncovered)}",
            *(f"  {f.line()}" for f in self.uncovered),
        ]
        if self.allowed:
            out.append(f"allowed (ALLOWED in audit.py): {len(self.allowed)}")
            out += [f"  {f.line()} -- {reason}" for f, reason in self.allowed]
        if self.unsampled:
            out.append(f"regexes no sample path could be made for: {len(self.unsampled)}")
            out += [f"  {p}" for p in self.unsampled]
        if self.stale:
            out.append(f"writer servlets Synapse no longer registers (update WRITER_SERVLETS): {', '.join(self.stale)}")
        return out


def parse_servlets(data: Mapping[str, Any]) -> tuple[str, list[Servlet]]:
    """The introspection JSON -> (Synapse version, servlets). Raises ValueError if malformed."""
    try:
        version = str(data["synapse_version"])
        servlets = [
            Servlet(kind, str(s["method"]), str(s["pattern"]), str(s["servlet"]), str(s["mount"]))
            for kind, items in data["processes"].items()
            for s in items
        ]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not the output of synapse_introspect.py: {e!r}") from None
    for s in servlets:
        try:
            re.compile(s.pattern)
        except re.error as e:
            raise ValueError(f"servlet {s.servlet}: invalid regular expression {s.pattern!r}: {e}") from None
    return version, servlets


def introspect(python: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run synapse_introspect.py with Synapse's interpreter; its JSON. Raises ValueError."""
    try:
        done = subprocess.run(
            [python, str(INTROSPECT_SCRIPT)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"cannot run {python}: {e}") from None
    if done.returncode != 0:
        raise ValueError(f"{python} {INTROSPECT_SCRIPT.name} failed:\n{done.stderr[-3000:]}")
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise ValueError(f"{INTROSPECT_SCRIPT.name} printed no JSON: {e}") from None
    return result


# --- sample paths ---------------------------------------------------------------------------


def sample_paths(pattern: str) -> list[str]:
    """Concrete paths `pattern` matches (re.match, as Synapse's JsonResource does): every
    alternative, each optional part absent and present (up to MAX_SAMPLES), a `*` repeat once,
    named groups with GROUP_VALUES where the value fits. Raises ValueError if none can be made."""
    tree, names = parse_regex(pattern)
    compiled = re.compile(pattern)
    out: list[str] = []
    for plausible in (True, False):
        for sample in _expand(tree, names, plausible):
            if compiled.match(sample) and sample not in out:
                out.append(sample)
        if out:
            return out
    raise ValueError(f"no path matches {pattern!r}")


def _expand(tree: Sequence[tuple[str, Any]], names: Mapping[int, str], plausible: bool) -> list[str]:
    results = [""]
    for op, av in tree:
        parts = _node(op, av, names, plausible)
        results = [a + b for a, b in itertools.islice(itertools.product(results, parts), MAX_SAMPLES)]
    return results


def _node(op: str, av: Any, names: Mapping[int, str], plausible: bool) -> list[str]:
    if op == "LITERAL":
        return [chr(av)]
    if op in ("AT", "ASSERT", "ASSERT_NOT"):
        return [""]
    if op in ("ANY", "NOT_LITERAL", "IN", "CATEGORY"):
        return [_one_char(op, av)]
    if op == "SUBPATTERN":
        group, body = av
        name = names.get(group) if group is not None else None
        generic = _expand(body, names, plausible)
        if plausible and name is not None:
            return [GROUP_VALUES.get(name, "x"), *generic]  # the caller keeps the samples that match
        return generic
    if op == "BRANCH":
        return [s for branch in av for s in _expand(branch, names, plausible)][:MAX_SAMPLES]
    if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        low, high, body = av
        once = _expand(body, names, plausible)
        if low == 0 and high == 1:
            return ["", *once]
        count = max(low, 1)  # `[^/]*` as one character: an empty path segment is not a sample
        return ["".join(parts) for parts in itertools.islice(itertools.product(once, repeat=count), MAX_SAMPLES)]
    raise ValueError(f"unsupported regular expression construct {op}")


_CANDIDATES = "xyz0-_."


def _one_char(op: str, av: Any) -> str:
    if op == "ANY":
        return "."  # an unescaped dot in Synapse's regexes stands for a dot (`io.element.msc4306`)
    if op == "NOT_LITERAL":
        return "x" if av != ord("x") else "y"
    if op == "CATEGORY":
        return "0" if "DIGIT" in av and "NOT" not in av else "x"
    items = list(av)
    negate = bool(items) and items[0][0] == "NEGATE"
    if negate:
        for c in _CANDIDATES:
            if not any(_in_item(c, item_op, item_av) for item_op, item_av in items[1:]):
                return c
        raise ValueError("no character fits a negated set")
    for item_op, item_av in items:
        if item_op == "LITERAL":
            return chr(item_av)
        if item_op == "RANGE":
            return chr(item_av[0])
        if item_op == "CATEGORY":
            return "0" if "DIGIT" in item_av else "x"
    raise ValueError("empty character set")


def _in_item(c: str, op: str, av: Any) -> bool:
    if op == "LITERAL":
        return bool(ord(c) == av)
    if op == "RANGE":
        low: int = av[0]
        high: int = av[1]
        return low <= ord(c) <= high
    if op == "CATEGORY":
        return (
            re.fullmatch(
                {"CATEGORY_DIGIT": r"\d", "CATEGORY_WORD": r"\w", "CATEGORY_SPACE": r"\s"}.get(
                    av.replace("_NOT", ""), r"\w"
                ),
                c,
            )
            is not None
        )
    return False


# --- the comparison -------------------------------------------------------------------------


def pool_kinds(pool: str) -> tuple[str, ...]:
    return POOL_KINDS.get(pool, DEFAULT_KINDS)


def writer_stream(servlet: Servlet) -> str | None:
    for stream, names in WRITER_SERVLETS.items():
        if servlet.servlet in names and servlet.mount == WRITER_MOUNTS.get(stream, CLIENT_MOUNT):
            return stream
    return None


def audit(
    version: str,
    servlets: Sequence[Servlet],
    table: RouteTable | None = None,
    allowed: Mapping[tuple[str, str], str] = ALLOWED,
) -> Report:
    """Every servlet's sample requests through `table` (the built-in one by default)."""
    table = table or RouteTable()
    report = Report(version, servlets=len(servlets))
    by_kind: dict[str, list[Servlet]] = {}
    for s in servlets:
        by_kind.setdefault(s.kind, []).append(s)
    known = {s.servlet for s in servlets}
    report.stale = sorted(name for names in WRITER_SERVLETS.values() for name in names if name not in known)
    seen: set[tuple[str, str]] = set()
    for s in servlets:
        method = "GET" if s.method == "*" else s.method
        if s.pattern:
            try:
                paths = sample_paths(s.pattern)
            except ValueError:
                if s.pattern not in report.unsampled:
                    report.unsampled.append(s.pattern)
                continue
        else:
            paths = [s.mount, s.mount.rstrip("/") + "/x"]
        for path in paths:
            if (method, path) in seen:
                continue
            seen.add((method, path))
            report.requests += 1
            for finding in _check(method, path, s, by_kind, table):
                reason = allowed.get((method, s.servlet))
                if reason is not None:
                    report.allowed.append((finding, reason))
                elif finding.route == "main" and not finding.chain and "main does not" in finding.problem:
                    report.uncovered.append(finding)
                else:
                    report.misrouted.append(finding)
    return report


def _registers(kind_servlets: Iterable[Servlet], method: str, path: str) -> bool:
    return any(s.matches(method, path) for s in kind_servlets)


def _check(
    method: str, path: str, servlet: Servlet, by_kind: Mapping[str, Sequence[Servlet]], table: RouteTable
) -> list[Finding]:
    match = table.match(method, path)
    route = match.route
    name = route.name if route else "main"
    chain = route.pools if route else ()
    found: list[Finding] = []

    def finding(problem: str) -> None:
        found.append(Finding(method, path, servlet.servlet, name, chain, problem))

    for pool in chain:
        kinds = pool_kinds(pool)
        if not any(_registers(by_kind.get(kind, ()), method, path) for kind in kinds):
            finding(f"pool {pool} is a {'/'.join(kinds)} process, which does not register it (404/405)")
    if not chain and not _registers(by_kind.get("main", ()), method, path):
        finding("no route claims it and main does not register it")
    stream = writer_stream(servlet)
    if stream is not None and method not in READS and servlet.matches(method, path):
        wrong = [pool for pool in chain if pool != stream]
        if not chain or wrong:
            finding(f"a {stream} write must go to the {stream} writer pool only, not {', '.join(wrong) or 'main'}")
    return found
