"""The router's YAML configuration, parsed into typed, validated, immutable objects.

Every error names the offending key as a dotted path and, where YAML gives one, its line:
`workers.sync[1].url (line 4): ...`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .edge.client_address import IPNetwork
from .edge.limits import LimitsConfig, LimitsConfigError, parse_limits
from .edge.shutdown import ShutdownConfig, ShutdownConfigError, parse_shutdown
from .observability.accesslog import AccessLogConfig, AccessLogConfigError, parse_access_log_config
from .routing.availability import HealthConfig
from .routing.routes import BUILTIN_ROUTES, MAIN, Balance, Route, RouteTable
from .routing.upstream import Upstream, parse_listen, parse_upstream_url

KeyPath = tuple[str | int, ...]

_POOL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ConfigError(ValueError):
    def __init__(self, key: KeyPath, message: str, line: int | None = None) -> None:
        self.key = format_key(key)
        self.line = line
        where = self.key or "(top level)"
        if line is not None:
            where += f" (line {line})"
        super().__init__(f"{where}: {message}")


def format_key(key: KeyPath) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True, slots=True)
class WhoamiConfig:
    url: Upstream | None = None  # None: the reverse-mode target (the main process)
    cache_ttl: float = 3600.0
    cache_size: int = 100_000
    negative_ttl: float = 10.0
    timeout: float = 2.0  # the longest a request waits for its user, queueing included
    redis: str | None = None  # redis:// URL of a cache shared by every router process; None: off
    max_in_flight: int = 16  # whoami calls at once, per process
    max_in_flight_per_client: int = 4  # of those, at most this many for one client address
    # Calls for tokens the cache does not know: a token bucket for the whole process and one
    # per client address; beyond them a request is routed by its token's hash, without a call.
    new_token_rate: float = 100.0
    new_token_burst: int = 2000
    new_token_rate_per_client: float = 10.0
    new_token_burst_per_client: int = 100


@dataclass(frozen=True, slots=True)
class RouterConfig:
    pools: Mapping[str, tuple[Upstream, ...]] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    whoami: WhoamiConfig = WhoamiConfig()
    health: HealthConfig = HealthConfig()
    metrics_listen: str | None = None  # host:port of the Prometheus endpoint; None: off
    access_log: AccessLogConfig = AccessLogConfig()
    debug_headers: bool = False  # X-Synapse-Router-* response headers naming route and worker
    limits: LimitsConfig = LimitsConfig()  # client connection timeouts and caps
    shutdown: ShutdownConfig = ShutdownConfig()  # graceful stop: the grace period
    # The compiled route table (custom routes, then the built-in ones): compiled once, when the
    # configuration is parsed, since compiling is also what validates the patterns together.
    table: RouteTable = field(default_factory=RouteTable, compare=False, repr=False)

    def worker_urls(self) -> set[str]:
        return {w.url for workers in self.pools.values() for w in workers}

    def drained_urls(self) -> set[str]:
        return {w.url for workers in self.pools.values() for w in workers if w.drained}


class _Doc:
    """A parsed YAML document that remembers the line of every key."""

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError((), f"invalid YAML: {e}", mark.line + 1 if mark else None) from e
        self._constructor = yaml.constructor.SafeConstructor()
        self.value: Any = {} if node is None else self._build(node, ())

    def _build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise ConfigError(path, f"keys must be strings, got {key!r}", key_node.start_mark.line + 1)
                if key in out:
                    raise ConfigError((*path, key), "duplicate key", key_node.start_mark.line + 1)
                out[key] = self._build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(v, (*path, i)) for i, v in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)

    def error(self, path: KeyPath, message: str) -> ConfigError:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        return ConfigError(path, message, self.lines.get(probe))


def _mapping(doc: _Doc, value: Any, path: KeyPath, allowed: frozenset[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(path, f"expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise doc.error((*path, key), f"unknown key; expected one of {', '.join(sorted(allowed))}")
    return value


def _number(doc: _Doc, value: Any, path: KeyPath, *, minimum: float, integer: bool = False) -> Any:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise doc.error(path, f"expected {kind} >= {minimum}, got {value!r}")
    return value


def _flag(doc: _Doc, value: Any, path: KeyPath) -> bool:
    if not isinstance(value, bool):
        raise doc.error(path, f"expected true or false, got {value!r}")
    return value


def _parse_pools(doc: _Doc, raw: Any) -> dict[str, tuple[Upstream, ...]]:
    pools: dict[str, tuple[Upstream, ...]] = {}
    if raw is None:
        return pools
    if not isinstance(raw, dict):
        raise doc.error(("workers",), "expected a mapping of pool name to a list of worker URLs")
    for name, members in raw.items():
        path: KeyPath = ("workers", name)
        if not _POOL_NAME.match(name) or name == MAIN:
            raise doc.error(path, "pool names are lower-case identifiers; 'main' is the reverse-mode target")
        if not isinstance(members, list) or not members:
            raise doc.error(path, "expected a non-empty list of worker URLs")
        workers: list[Upstream] = []
        for i, member in enumerate(members):
            weight: Any = 1.0
            drained: Any = False
            url: Any = member
            if isinstance(member, dict):
                entry = _mapping(doc, member, (*path, i), frozenset({"url", "weight", "drained"}))
                if "url" not in entry:
                    raise doc.error((*path, i), "missing key 'url'")
                url = entry["url"]
                weight = _number(doc, entry.get("weight", 1.0), (*path, i, "weight"), minimum=0.001)
                drained = entry.get("drained", False)
                if not isinstance(drained, bool):
                    raise doc.error((*path, i, "drained"), f"expected true or false, got {drained!r}")
            url_path = (*path, i, "url") if isinstance(member, dict) else (*path, i)
            try:
                upstream = parse_upstream_url(url)
            except ValueError as e:
                raise doc.error(url_path, str(e)) from None
            if any(w.url == upstream.url for w in workers):
                raise doc.error(url_path, f"{upstream.url} is listed twice in this pool")
            workers.append(
                Upstream(upstream.url, upstream.scheme, upstream.host, upstream.port, float(weight), drained)
            )
        pools[name] = tuple(workers)
    return pools


_ROUTE_KEYS = frozenset({"name", "paths", "pool", "balance", "methods"})


def _parse_routes(doc: _Doc, raw: Any, pools: Mapping[str, tuple[Upstream, ...]]) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise doc.error(("routes",), "expected a list of routes")
    routes: list[Route] = []
    for i, item in enumerate(raw):
        path: KeyPath = ("routes", i)
        entry = _mapping(doc, item, path, _ROUTE_KEYS)
        for required in ("name", "paths", "pool"):
            if required not in entry:
                raise doc.error(path, f"missing key '{required}'")
        name = entry["name"]
        if not isinstance(name, str) or not name:
            raise doc.error((*path, "name"), "expected a non-empty string")
        paths = entry["paths"]
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths:
            raise doc.error((*path, "paths"), "expected a list of regular expressions")
        for j, pattern in enumerate(paths):
            try:
                compiled = re.compile(pattern) if isinstance(pattern, str) else None
            except re.error as e:
                raise doc.error((*path, "paths", j), f"invalid regular expression {pattern!r}: {e}") from None
            if compiled is None:
                raise doc.error((*path, "paths", j), "expected a regular expression string")
            if compiled.groupindex or re.search(r"\\[1-9]|\(\?P=", pattern):
                raise doc.error((*path, "paths", j), "named groups and backreferences are not supported")
        chain = entry["pool"]
        if isinstance(chain, str):
            chain = [chain]
        if not isinstance(chain, list) or not chain or not all(isinstance(p, str) for p in chain):
            raise doc.error((*path, "pool"), "expected a pool name or a list of pool names")
        for p in chain:
            if p != MAIN and p not in pools:
                known = ", ".join(sorted([*pools, MAIN]))
                raise doc.error((*path, "pool"), f"unknown pool {p!r}; configured pools: {known}")
        try:
            balance = Balance(entry.get("balance", Balance.ROUND_ROBIN.value))
        except ValueError:
            choices = ", ".join(b.value for b in Balance)
            raise doc.error((*path, "balance"), f"expected one of {choices}") from None
        methods = entry.get("methods")
        if methods is not None:
            if not isinstance(methods, list) or not all(isinstance(m, str) and m for m in methods):
                raise doc.error((*path, "methods"), "expected a list of HTTP methods")
            methods = frozenset(m.upper() for m in methods)
        routes.append(
            Route(
                name=name,
                patterns=tuple(paths),
                pools=tuple(p for p in chain if p != MAIN),
                balance=balance,
                methods=methods,
                builtin=False,
            )
        )
    return tuple(routes)


def _parse_trusted(doc: _Doc, raw: Any) -> tuple[IPNetwork, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise doc.error(("trusted_proxies",), "expected a list of addresses or CIDR networks")
    nets: list[IPNetwork] = []
    for i, item in enumerate(raw):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError as e:
            raise doc.error(("trusted_proxies", i), str(e)) from None
    return tuple(nets)


_WHOAMI_KEYS = frozenset(
    {
        "url",
        "cache_ttl",
        "cache_size",
        "negative_ttl",
        "timeout",
        "redis",
        "max_in_flight",
        "max_in_flight_per_client",
        "new_tokens",
    }
)
_NEW_TOKENS_KEYS = frozenset({"rate", "burst", "per_client_rate", "per_client_burst"})


def _parse_whoami(doc: _Doc, raw: Any) -> WhoamiConfig:
    entry = _mapping(doc, raw, ("whoami",), _WHOAMI_KEYS)
    defaults = WhoamiConfig()
    url = None
    if entry.get("url") is not None:
        try:
            url = parse_upstream_url(entry["url"])
        except ValueError as e:
            raise doc.error(("whoami", "url"), str(e)) from None
    redis_url = entry.get("redis")
    if redis_url is not None and (
        not isinstance(redis_url, str) or urlsplit(redis_url).scheme not in ("redis", "rediss", "unix")
    ):
        raise doc.error(("whoami", "redis"), f"expected a redis://host:port/db URL, got {redis_url!r}")
    limits = _mapping(doc, entry.get("new_tokens"), ("whoami", "new_tokens"), _NEW_TOKENS_KEYS)

    def limit(key: str, default: float, integer: bool) -> Any:
        value = limits.get(key, default)
        return _number(doc, value, ("whoami", "new_tokens", key), minimum=0 if not integer else 1, integer=integer)

    max_in_flight = _number(
        doc, entry.get("max_in_flight", defaults.max_in_flight), ("whoami", "max_in_flight"), minimum=1, integer=True
    )
    per_client = _number(
        doc,
        entry.get("max_in_flight_per_client", min(defaults.max_in_flight_per_client, max_in_flight)),
        ("whoami", "max_in_flight_per_client"),
        minimum=1,
        integer=True,
    )
    if per_client > max_in_flight:
        raise doc.error(
            ("whoami", "max_in_flight_per_client"),
            f"{per_client} is more than whoami.max_in_flight ({max_in_flight}): one address could hold every call",
        )
    return WhoamiConfig(
        url=url,
        redis=redis_url,
        max_in_flight=max_in_flight,
        max_in_flight_per_client=per_client,
        new_token_rate=float(limit("rate", defaults.new_token_rate, False)),
        new_token_burst=limit("burst", defaults.new_token_burst, True),
        new_token_rate_per_client=float(limit("per_client_rate", defaults.new_token_rate_per_client, False)),
        new_token_burst_per_client=limit("per_client_burst", defaults.new_token_burst_per_client, True),
        cache_ttl=float(_number(doc, entry.get("cache_ttl", defaults.cache_ttl), ("whoami", "cache_ttl"), minimum=1)),
        cache_size=_number(
            doc, entry.get("cache_size", defaults.cache_size), ("whoami", "cache_size"), minimum=1, integer=True
        ),
        negative_ttl=float(
            _number(doc, entry.get("negative_ttl", defaults.negative_ttl), ("whoami", "negative_ttl"), minimum=0)
        ),
        timeout=float(_number(doc, entry.get("timeout", defaults.timeout), ("whoami", "timeout"), minimum=0.01)),
    )


_HEALTH_KEYS = frozenset({"path", "interval", "timeout", "fall", "rise", "connect_timeout", "read_timeout"})


def _parse_health(doc: _Doc, raw: Any) -> HealthConfig:
    entry = _mapping(doc, raw, ("health",), _HEALTH_KEYS)
    d = HealthConfig()
    path = entry.get("path", d.path)
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " ?#"):
        raise doc.error(("health", "path"), f"expected an absolute path like /health, got {path!r}")

    def seconds(key: str, default: float) -> float:
        return float(_number(doc, entry.get(key, default), ("health", key), minimum=0.01))

    def count(key: str, default: int) -> int:
        return int(_number(doc, entry.get(key, default), ("health", key), minimum=1, integer=True))

    return HealthConfig(
        path=path,
        interval=seconds("interval", d.interval),
        timeout=seconds("timeout", d.timeout),
        fall=count("fall", d.fall),
        rise=count("rise", d.rise),
        connect_timeout=seconds("connect_timeout", d.connect_timeout),
        read_timeout=seconds("read_timeout", d.read_timeout),
    )


def _parse_metrics(doc: _Doc, raw: Any) -> str | None:
    entry = _mapping(doc, raw, ("metrics",), frozenset({"listen"}))
    listen = entry.get("listen")
    if listen is None:
        return None
    try:
        parse_listen(listen)
    except ValueError as e:
        raise doc.error(("metrics", "listen"), str(e)) from None
    return str(listen)


def _parse_access_log(doc: _Doc, raw: Any) -> AccessLogConfig:
    try:
        return parse_access_log_config(raw)
    except AccessLogConfigError as e:
        raise _section_error(doc, "access_log", e.key, e.reason) from None


def _parse_limits(doc: _Doc, raw: Any) -> LimitsConfig:
    try:
        return parse_limits(raw)
    except LimitsConfigError as e:
        raise _section_error(doc, "limits", e.key, e.reason) from None


def _parse_shutdown(doc: _Doc, raw: Any) -> ShutdownConfig:
    try:
        return parse_shutdown(raw)
    except ShutdownConfigError as e:
        raise _section_error(doc, "shutdown", e.key, e.reason) from None


def _section_error(doc: _Doc, section: str, key: str | None, reason: str) -> ConfigError:
    """An error a section's own parser reported, placed at its key and line."""
    return doc.error((section, key) if key else (section,), reason)


_TOP_KEYS = frozenset(
    {
        "workers",
        "routes",
        "trusted_proxies",
        "whoami",
        "health",
        "metrics",
        "access_log",
        "debug_headers",
        "limits",
        "shutdown",
    }
)


def _check_every_pool_is_used(doc: _Doc, pools: Mapping[str, tuple[Upstream, ...]], table: RouteTable) -> None:
    """A pool no route sends to is a misspelt name (`meida:`): its workers would get nothing and
    the traffic meant for them would go to main, silently."""
    used = {pool for route in table.routes for pool in route.pools}
    for name in pools:
        if name not in used:
            builtin = ", ".join(sorted({pool for route in BUILTIN_ROUTES for pool in route.pools}))
            raise doc.error(
                ("workers", name),
                f"no route sends to pool {name!r}: the built-in routes use {builtin}; "
                "a pool of your own needs a route in `routes` that names it",
            )


def parse_config(text: str) -> RouterConfig:
    """Parse and validate a YAML configuration; raise ConfigError naming the bad key."""
    doc = _Doc(text)
    top = _mapping(doc, doc.value, (), _TOP_KEYS)
    pools = _parse_pools(doc, top.get("workers"))
    routes = _parse_routes(doc, top.get("routes"), pools)
    try:
        table = RouteTable(routes)
    except re.error as e:  # a pattern that compiles alone but not beside the others
        raise doc.error(("routes",), f"the route patterns cannot be combined: {e}") from None
    _check_every_pool_is_used(doc, pools, table)
    return RouterConfig(
        pools=pools,
        routes=routes,
        trusted_proxies=_parse_trusted(doc, top.get("trusted_proxies")),
        whoami=_parse_whoami(doc, top.get("whoami")),
        health=_parse_health(doc, top.get("health")),
        metrics_listen=_parse_metrics(doc, top.get("metrics")),
        access_log=_parse_access_log(doc, top.get("access_log")),
        debug_headers=_flag(doc, top.get("debug_headers", False), ("debug_headers",)),
        limits=_parse_limits(doc, top.get("limits")),
        shutdown=_parse_shutdown(doc, top.get("shutdown")),
        table=table,
    )


def load_config(path: str | Path) -> RouterConfig:
    """Read, decode and parse a configuration file; every failure is a ConfigError."""
    return read_config(path)[1]


def read_config(path: str | Path) -> tuple[bytes, RouterConfig]:
    """The file's bytes and the configuration they give; ConfigError if it cannot be read, is
    not UTF-8 or is not a valid configuration (the one way every process reads a file)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError((), f"cannot read {path}: {e.strerror or e}") from None
    return raw, parse_config_bytes(raw, path)


def parse_config_bytes(raw: bytes, path: str | Path) -> RouterConfig:
    """parse_config for a file's bytes: a byte that is not UTF-8 is a ConfigError too, and so is
    a file with no YAML document at all (empty, or comments only): that is a file read while it
    was being written (an editor or a tool that truncates, then writes), and applying it would
    send every request to main and drop every worker's series."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError((), f"{path} is not UTF-8 text (byte {raw[e.start]:#04x})", line) from None
    if _no_document(text):
        raise ConfigError((), f"{path} is empty (no YAML document); a configuration without workers is `workers: {{}}`")
    return parse_config(text)


def _no_document(text: str) -> bool:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader) is None
    except yaml.YAMLError:
        return False  # parse_config says what is wrong with it
