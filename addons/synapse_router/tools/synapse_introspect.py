"""Run by *Synapse's* interpreter (not the router's): print, as JSON, every servlet each kind of
Synapse process registers, from the installed `synapse` package.

    SYNAPSE_VENV/bin/python synapse_introspect.py > servlets.json

Synapse is not a dependency of the router, so `synapse-router routes audit` runs this file with
the interpreter given (`--synapse-python`) and compares in its own process (audit.py). Standard
library plus Synapse only; no import of the router.

Each process kind is a real Synapse application (`synapse.app.homeserver`,
`synapse.app.generic_worker`) built from a real configuration (a throw-away one, written to a
temporary directory) whose HTTP listeners are set up exactly as Synapse sets them up at start
(`_listener_http` / `_listen_http`), except that nothing listens: `listen_http` is replaced by a
function that keeps the resource tree, and the database by a stand-in object (no servlet reads
the database when it is registered). The tree is then walked: every `JsonResource`'s
`(method, regex)` pairs (the regexes Synapse matches the request path against), and every other
leaf resource as a path prefix (method `*`).

The kinds (`PROCESSES`): `main` (client + federation listener; `enable_media_repo: false` since a
media worker exists), `client` (generic worker, client listener), `federation` (generic worker,
federation listener), `media` (media repository worker, media listener) and `writer` (generic worker,
client listener, the configured `stream_writers` of every stream in `STREAMS`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any
from unittest import mock

STREAMS = (
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
    "push_rules",
    "device_lists",
    "thread_subscriptions",
    "quarantined_media_changes",
)

# kind -> (worker_app or None for main, listener resources)
PROCESSES: dict[str, tuple[str | None, list[str]]] = {
    "main": (None, ["client", "federation"]),
    "client": ("synapse.app.generic_worker", ["client"]),
    "federation": ("synapse.app.generic_worker", ["federation"]),
    "media": ("synapse.app.media_repository", ["media"]),
    "writer": ("synapse.app.generic_worker", ["client"]),
}


def base_config(tmp: str, experimental: dict[str, Any]) -> dict[str, Any]:
    from signedjson.key import generate_signing_key, write_signing_keys

    key = os.path.join(tmp, "signing.key")
    with open(key, "w") as f:
        write_signing_keys(f, [generate_signing_key("audit")])
    return {
        "server_name": "audit.invalid",
        "signing_key_path": key,
        "report_stats": False,
        "database": {"name": "sqlite3", "args": {"database": ":memory:"}},
        "media_store_path": os.path.join(tmp, "media"),
        "instance_map": {"main": {"host": "127.0.0.1", "port": 9}, "writer": {"host": "127.0.0.1", "port": 9}},
        "stream_writers": {stream: ["writer"] for stream in STREAMS},
        "redis": {"enabled": True},
        "enable_media_repo": False,
        "media_instance_running_background_jobs": "media",
        "experimental_features": experimental,
        "listeners": [http_listener(8008, PROCESSES["main"][1])],
    }


def http_listener(port: int, names: list[str]) -> dict[str, Any]:
    return {"type": "http", "port": port, "bind_addresses": ["127.0.0.1"], "resources": [{"names": names}]}


def resource_tree(kind: str, tmp: str, experimental: dict[str, Any]) -> Any:
    import yaml
    from synapse.config.homeserver import HomeServerConfig

    app, names = PROCESSES[kind]
    config = base_config(tmp, experimental)
    if app is not None:
        config |= {
            "worker_app": app,
            "worker_name": kind,
            "worker_listeners": [http_listener(8081, names)],
        }
    path = os.path.join(tmp, f"{kind}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    hs_config = HomeServerConfig.load_config("synapse-router routes audit", ["-c", path])
    trees: list[Any] = []

    def keep_tree(hs: Any, listener: Any, root: Any, *args: Any, **kwargs: Any) -> list[Any]:
        trees.append(root)
        return []

    database = mock.patch("synapse.server.HomeServer.get_datastores", lambda self: mock.MagicMock())
    if app is None:
        from synapse.app import homeserver

        hs = homeserver.create_homeserver(hs_config)
        with database, mock.patch.object(homeserver, "listen_http", keep_tree):
            hs._listener_http(hs_config, hs_config.server.listeners[0])
    else:
        from synapse.app import _base, generic_worker

        hs = generic_worker.create_homeserver(hs_config)
        with database, mock.patch.object(_base, "listen_http", keep_tree):
            hs._listen_http(hs_config.worker.worker_listeners[0])
    return trees[0]


def walk(resource: Any, prefix: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    routes = getattr(resource, "_routes", None)
    if isinstance(routes, dict):
        for pattern, methods in routes.items():
            for method, entry in methods.items():
                out.append(
                    {
                        "method": method.decode("ascii"),
                        "pattern": pattern.pattern,
                        "servlet": str(entry.servlet_classname),
                        "mount": prefix,
                    }
                )
    elif not resource.children and prefix:
        out.append({"method": "*", "pattern": "", "servlet": type(resource).__name__, "mount": prefix})
    for segment, child in sorted(resource.children.items()):
        out += walk(child, f"{prefix}/{segment.decode('utf-8')}")
    return out


def main(argv: list[str]) -> int:
    """No argument: every kind, each in a process of its own (Synapse keeps registrations in
    module globals: `SERVLET_GROUPS["media"]` once a process could load the media repository).
    `--kind K`: the servlets of kind K, as a JSON list."""
    import logging
    import subprocess
    from importlib.metadata import version

    logging.disable(logging.CRITICAL)
    # Experimental endpoints the router routes (thread subscriptions) are switched on, so the
    # audit sees them; what an operator does not enable registers nothing anywhere.
    experimental = {"msc4306_enabled": True}
    if argv[:1] == ["--kind"] and len(argv) == 2:
        with tempfile.TemporaryDirectory() as tmp:
            json.dump(walk(resource_tree(argv[1], tmp, experimental), ""), sys.stdout)
        return 0
    result: dict[str, Any] = {"synapse_version": version("matrix-synapse"), "streams": list(STREAMS), "processes": {}}
    for kind in PROCESSES:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--kind", kind], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            sys.stderr.write(f"introspecting the {kind} process failed:\n{done.stderr[-4000:]}")
            return 1
        result["processes"][kind] = json.loads(done.stdout)
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
