"""The versions compat/ is written for, and which test runs each internal it uses.

pyproject.toml pins `mitmproxy==12.3.*` and `h11==0.16.*` (the h11 mitmproxy 12.3 brings). A
version check alone proves nothing: the behavioural tests named in COVERED run every internal
against the installed versions and fail when one behaves differently. This test fails when the
installed versions are not the pinned ones, or when a compat module has no named test."""

from __future__ import annotations

import ast
import importlib.metadata
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
COMPAT = ROOT / "addons" / "synapse_router" / "compat"
UNIT = ROOT / "tests" / "unit"

# compat module -> (internal it relies on, the tests that run it)
COVERED: dict[str, list[tuple[str, str]]] = {
    "connections": [
        ("Proxyserver.connections, ConnectionHandler.transports / ConnectionIO", "test_compat_connections.py"),
        ("Http1Server.buf and read_headers state (HeadGuard)", "test_compat_connections.py"),
        ("StreamReader._buffer / _paused, the selector transport's max_size (hold)", "test_compat_connections.py"),
    ],
    "listening": [
        ("AsyncioServerInstance._servers, ServerInstance.handle_stream", "test_compat_connections.py"),
        ("asyncio _accept_connection / _add_reader / Server._sockets", "test_listen_backlog.py"),
        ("asyncio _accept_connection taking each connection with sock.accept()", "test_address_limits.py"),
        ("asyncio's _start_serving retry on a closed listener", "test_compat_connections.py"),
    ],
    "addonmanager": [
        ("AddonManager._iter_hooks, _configure_all; Master._legacy_log_events", "test_compat_addonmanager.py"),
        ("the lean manager's exception semantics against mitmproxy's safecall", "test_mitmproxy_internals.py"),
    ],
    "h11parts": [("h11 _receivebuffer, _readers, _writers, Request(_parsed=True)", "test_compat_h11parts.py")],
    "http1": [("mitmproxy's layers.http._http1.Http1Server and h11 ChunkedReader", "test_compat_http1.py")],
    "printing": [("mitmproxy Dumper.echo_flow", "test_compat.py")],
    "regex": [("re._parser", "test_compat.py")],
}


def pins() -> dict[str, SpecifierSet]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for requirement in project["dependencies"]:
        name, _, spec = requirement.partition("==")
        if spec:
            out[name.strip()] = SpecifierSet("==" + spec.strip())
    return out


def test_mitmproxy_and_h11_are_pinned_and_installed_at_the_pinned_versions() -> None:
    pinned = pins()
    assert str(pinned["mitmproxy"]) == "==12.3.*" and str(pinned["h11"]) == "==0.16.*"
    for name, spec in pinned.items():
        assert importlib.metadata.version(name) in spec, f"{name} {importlib.metadata.version(name)} is not {spec}"


def test_the_pinned_h11_is_the_one_mitmproxy_requires() -> None:
    requires = importlib.metadata.requires("mitmproxy") or []
    h11 = next(r for r in requires if r.startswith("h11"))
    assert importlib.metadata.version("h11") in SpecifierSet(h11.removeprefix("h11").split(";")[0])
    assert importlib.metadata.version("h11") in pins()["h11"]


def test_every_compat_module_has_a_behavioural_test() -> None:
    modules = {path.stem for path in COMPAT.glob("*.py") if path.stem != "__init__"}
    assert modules == set(COVERED)
    for module, uses in COVERED.items():
        for _, test_file in uses:
            tree = ast.parse((UNIT / test_file).read_text())
            names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
            assert any(name.startswith("test_") for name in names), test_file
            assert module in (UNIT / test_file).read_text(), (module, test_file)  # it names what it runs
