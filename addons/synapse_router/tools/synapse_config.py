"""Synapse's configuration as the router's source: `config from-synapse` and `config check`.

Pure logic (no mitmproxy import). `read_deployment` reads homeserver.yaml and the worker
configurations (`worker_app`, `worker_name`, `worker_listeners`, and from homeserver.yaml
`stream_writers`, `instance_map`); `router_pools` names the router's pools from them, as
config/router.yaml names them:

- every stream of `stream_writers` but `events` is a pool of its own with exactly the writers
  Synapse names (their `client` listener; `media` for quarantined_media_changes);
- a worker with a `media` listener (or `synapse.app.media_repository`) is in `media`;
- any other worker with a `client` or `federation` listener is in the pool its name or legacy
  `worker_app` says (`sync1`, `synchrotron2` -> sync; `initial_sync1`; `client_reader1`;
  `room1`; `user_dir1`; `federation_reader1`; `generic_worker1` -> generic), else by its listener
  (client -> generic, federation only -> federation_reader). A stream writer is in no other pool
  unless its name says so; a worker without such a listener (event persister, pusher,
  federation sender) is in none;
- then a built-in route whose pools are all still empty gets, in the last pool of its chain
  they can serve, the generic workers able to serve it (`_fill_uncovered_routes`), so no route
  falls back to main while a generic worker could serve it.

`check` reports every disagreement between a router configuration and Synapse's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import RouterConfig
from ..routing.routes import BUILTIN_ROUTES

MEDIA_APP = "synapse.app.media_repository"
WILDCARD = frozenset({"0.0.0.0", "::", ""})
# Pool names a worker's name (without its trailing number) or legacy worker_app may give.
NAMED_POOLS: Mapping[str, str] = {
    "sync": "sync",
    "synchrotron": "sync",
    "initial_sync": "initial_sync",
    "client_reader": "client_reader",
    "room": "room",
    "user_dir": "user_dir",
    "federation_reader": "federation_reader",
    "generic": "generic",
    "generic_worker": "generic",
    "media": "media",
    "media_repository": "media",
}
# The listener resource each pool's requests need.
NEEDS: Mapping[str, tuple[str, ...]] = {
    "federation_reader": ("federation",),
    "generic": ("client", "federation"),
    "media": ("media",),
    "quarantined_media_changes": ("media",),
}
DEFAULT_NEEDS = ("client",)


class SynapseConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Listener:
    url: str  # http://host:port
    resources: frozenset[str]


@dataclass(frozen=True, slots=True)
class SynapseWorker:
    name: str
    app: str
    listeners: tuple[Listener, ...]

    def url_with(self, resource: str) -> str | None:
        for listener in self.listeners:
            if resource in listener.resources:
                return listener.url
        return None

    @property
    def resources(self) -> frozenset[str]:
        return frozenset(r for listener in self.listeners for r in listener.resources)


@dataclass(frozen=True, slots=True)
class SynapseDeployment:
    workers: tuple[SynapseWorker, ...]
    stream_writers: Mapping[str, tuple[str, ...]]


def _load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SynapseConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SynapseConfigError(f"{path}: not YAML: {e}") from None
    if not isinstance(data, dict):
        raise SynapseConfigError(f"{path}: expected a mapping at the top level")
    return data


def read_deployment(homeserver: str | Path, workers: Sequence[str | Path]) -> SynapseDeployment:
    """Raises SynapseConfigError naming the file and key."""
    shared = _load_yaml(homeserver)
    instance_map = shared.get("instance_map") or {}
    if not isinstance(instance_map, dict):
        raise SynapseConfigError(f"{homeserver}: instance_map: expected a mapping")
    writers_raw = shared.get("stream_writers") or {}
    if not isinstance(writers_raw, dict):
        raise SynapseConfigError(f"{homeserver}: stream_writers: expected a mapping")
    stream_writers: dict[str, tuple[str, ...]] = {}
    for stream, names in writers_raw.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SynapseConfigError(f"{homeserver}: stream_writers.{stream}: expected a list of worker names")
        stream_writers[str(stream)] = tuple(names)
    out: list[SynapseWorker] = []
    for path in workers:
        data = {**shared, **_load_yaml(path)}
        name = data.get("worker_name")
        app = data.get("worker_app")
        if not isinstance(name, str) or not name:
            raise SynapseConfigError(f"{path}: worker_name: expected the worker's name")
        if not isinstance(app, str) or not app:
            raise SynapseConfigError(f"{path}: worker_app: expected e.g. synapse.app.generic_worker")
        listeners = _listeners(path, data.get("worker_listeners") or [], instance_map.get(name))
        if any(w.name == name for w in out):
            raise SynapseConfigError(f"{path}: worker_name: {name} is given by two worker files")
        out.append(SynapseWorker(name, app, listeners))
    return SynapseDeployment(tuple(out), stream_writers)


def _listeners(path: str | Path, raw: Any, instance: Any) -> tuple[Listener, ...]:
    if not isinstance(raw, list):
        raise SynapseConfigError(f"{path}: worker_listeners: expected a list")
    out: list[Listener] = []
    for i, listener in enumerate(raw):
        where = f"{path}: worker_listeners[{i}]"
        if not isinstance(listener, dict):
            raise SynapseConfigError(f"{where}: expected a mapping")
        if listener.get("type", "http") != "http" or "port" not in listener:
            continue  # metrics, manhole, unix sockets: not for the router
        names: set[str] = set()
        resources = listener.get("resources") or []
        if not isinstance(resources, list):
            raise SynapseConfigError(f"{where}.resources: expected a list")
        for j, resource in enumerate(resources):
            listed = resource.get("names") if isinstance(resource, dict) else None
            if not isinstance(listed, list):
                raise SynapseConfigError(f"{where}.resources[{j}].names: expected a list of resource names")
            names.update(str(n) for n in listed)
        names.discard("replication")
        if not names:
            continue
        port = listener["port"]
        if isinstance(port, bool) or not isinstance(port, int):
            raise SynapseConfigError(f"{where}.port: expected a port number")
        binds = listener.get("bind_addresses") or [listener.get("bind_address", "")]
        if not isinstance(binds, list):
            raise SynapseConfigError(f"{where}.bind_addresses: expected a list of addresses")
        host = str(binds[0]) if binds else ""
        if host in WILDCARD:
            host = str(instance.get("host")) if isinstance(instance, dict) and instance.get("host") else "localhost"
        scheme = "https" if listener.get("tls") else "http"
        out.append(Listener(f"{scheme}://{_url_host(host)}:{port}", frozenset(names)))
    return tuple(out)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _named_pool(worker: SynapseWorker) -> str | None:
    base = re.sub(r"[-_.]?\d+$", "", worker.name)
    if base in NAMED_POOLS:
        return NAMED_POOLS[base]
    legacy = worker.app.removeprefix("synapse.app.")
    return NAMED_POOLS.get(legacy) if legacy != "generic_worker" else None


def router_pools(dep: SynapseDeployment) -> dict[str, list[str]]:
    """pool -> worker URLs, in the order of the worker files."""
    pools: dict[str, list[str]] = {}
    by_name = {w.name: w for w in dep.workers}
    writers = {name for stream, names in dep.stream_writers.items() if stream != "events" for name in names}
    for worker in dep.workers:
        pool = _named_pool(worker)
        if worker.app == MEDIA_APP or "media" in worker.resources:
            pool = "media"
        elif pool is None and worker.name not in writers:
            if "client" in worker.resources:
                pool = "generic"
            elif "federation" in worker.resources:
                pool = "federation_reader"
        url = worker.url_with(NEEDS.get(pool, DEFAULT_NEEDS)[0]) if pool else None
        if pool and url:
            pools.setdefault(pool, []).append(url)
    for stream, names in dep.stream_writers.items():
        if stream == "events":
            continue
        resource = NEEDS.get(stream, DEFAULT_NEEDS)[0]
        urls = [u for n in names if n in by_name and (u := by_name[n].url_with(resource))]
        if urls:
            pools[stream] = urls
    _fill_uncovered_routes(dep, pools, writers)
    return pools


def _fill_uncovered_routes(dep: SynapseDeployment, pools: dict[str, list[str]], writers: set[str]) -> None:
    """Any generic worker serves every client and federation endpoint of Synapse's worker
    documentation; so a route whose pools are all empty (it would fall back to main) gets, in
    the last pool of its chain they can serve, the generic workers that can: those of the
    general-purpose pools (`client_reader`, `generic`, or no pool of their name) if one can,
    else every other (sync, room, ...). Never a stream pool or `media`: writers stay exactly as
    `stream_writers` says, and a stream writer, a media worker never joins another pool."""
    helpers: list[tuple[SynapseWorker, bool]] = []  # (worker, general-purpose)
    for worker in dep.workers:
        if worker.app == MEDIA_APP or "media" in worker.resources or worker.name in writers:
            continue
        if worker.app != "synapse.app.generic_worker" and _named_pool(worker) is None:
            continue  # a legacy app with no pool of its own (pusher, federation sender, ...)
        named = _named_pool(worker)
        helpers.append((worker, named in (None, "client_reader", "generic")))
    for route in BUILTIN_ROUTES:
        if route.writer or not route.pools or any(pool in pools for pool in route.pools):
            continue
        for pool in reversed(route.pools):
            if pool in STREAM_POOLS or NEEDS.get(pool) == ("media",):
                continue
            needs = NEEDS.get(pool, DEFAULT_NEEDS)
            able = [(w, general) for w, general in helpers if all(w.url_with(r) for r in needs)]
            chosen = [w for w, general in able if general] or [w for w, _ in able]
            if chosen:
                pools[pool] = [url for w in chosen if (url := w.url_with(needs[0]))]
                break


def router_yaml(dep: SynapseDeployment, sources: Sequence[str]) -> str:
    lines = [
        "# synapse-router configuration written by `synapse-router config from-synapse` from",
        *(f"#   {s}" for s in sources),
        "# Check it against Synapse's after any change: synapse-router config check THIS --synapse ...",
        "workers:",
    ]
    for pool, urls in router_pools(dep).items():
        lines.append(f"  {pool}:")
        lines += [f"    - {url}" for url in urls]
    return "\n".join(lines) + "\n"


def check(router: RouterConfig, dep: SynapseDeployment) -> list[str]:
    """Every disagreement between the router's pools and Synapse's configuration."""
    problems: list[str] = []
    worker_of: dict[str, SynapseWorker] = {}
    resources_of: dict[str, frozenset[str]] = {}
    for w in dep.workers:
        for listener in w.listeners:
            worker_of[listener.url] = w
            resources_of[listener.url] = listener.resources
    routed: set[str] = set()
    for pool, members in router.pools.items():
        needs = NEEDS.get(pool, DEFAULT_NEEDS)
        for member in members:
            worker = worker_of.get(member.url)
            if worker is None:
                problems.append(f"workers.{pool}: {member.url} is no listener of any Synapse worker given")
                continue
            routed.add(worker.name)
            missing = [r for r in needs if r not in resources_of[member.url]]
            if missing:
                problems.append(
                    f"workers.{pool}: {member.url} ({worker.name}) listener lacks the {' and '.join(missing)} "
                    f"resource{'s' if len(missing) > 1 else ''}"
                )
            if pool in dep.stream_writers and worker.name not in dep.stream_writers[pool]:
                problems.append(
                    f"workers.{pool}: {member.url} ({worker.name}) is not a {pool} stream writer "
                    f"(stream_writers.{pool}: {', '.join(dep.stream_writers[pool])})"
                )
    for stream, names in dep.stream_writers.items():
        if stream not in STREAM_POOLS or names == ("main",):
            continue  # events (no endpoint), streams the route table has no pool for, or main
        if stream not in router.pools:
            problems.append(
                f"stream_writers.{stream}: {', '.join(names)}, but the router has no {stream} pool "
                f"({stream} writes go to main)"
            )
        else:
            pooled = {worker_of[m.url].name for m in router.pools[stream] if m.url in worker_of}
            for name in names:
                if name not in pooled and name != "main":
                    problems.append(f"stream_writers.{stream}: {name} is not in the router's {stream} pool")
    for w in dep.workers:
        if w.name not in routed and w.resources & {"client", "federation", "media"}:
            problems.append(f"worker {w.name} ({', '.join(sorted(w.resources))} listener) is in no pool")
    return problems


# The streams whose writers the router has a pool for: the pools of routes.py's writer routes.
STREAM_POOLS = frozenset(pool for route in BUILTIN_ROUTES if route.writer for pool in route.pools)
