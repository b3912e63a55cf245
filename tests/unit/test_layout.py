"""The package's shape: pure modules stay pure, and no import cycle, not even for type checking."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "addons" / "synapse_router"
PURE = (
    "config",
    "routing.routes",
    "routing.engine",
    "routing.hrw",
    "routing.pools",
    "identity.tokens",
    "edge.wellformed",
    "routing.query",
    "routing.upstream",
    "edge.limits",
    "routing.availability",
    "edge.shutdown",
    "edge.connect",
    "observability.logsafety",
    "edge.clienterrors",
    "observability.loopfilters",
    "launcher.listener",
    "edge.accept_queue",
    "edge.port_sharing",
)
_IMPORT = re.compile(r"^\s*from (\.+)([\w.]*) import ([\w, ()\n]+?)(?:\)|$)", re.M)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module's imports of the package's own modules, TYPE_CHECKING ones included."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for match in _IMPORT.finditer(path.read_text()):
            base = package.split(".")[: len(package.split(".")) - (len(match.group(1)) - 1)]
            target = ".".join([*base, match.group(2)] if match.group(2) else base)
            names = [target] if match.group(2) else [f"{target}.{n}" for n in re.findall(r"\w+", match.group(3))]
            found.update(n for n in names if n in modules)
        graph[name] = found
    return graph


def test_no_import_cycle() -> None:
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# Layers whose every module is pure, present and future.
PURE_PACKAGES = ("routing",)


def _pure_modules() -> list[str]:
    whole = [f"{p}.{f.stem}" for p in PURE_PACKAGES for f in sorted((PACKAGE / p).glob("*.py")) if f.stem != "__init__"]
    return sorted({*PURE, *whole})


def test_pure_modules_import_no_proxy_or_http_library() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        + "".join(f"import synapse_router.{m};" for m in _pure_modules())
        + "print(sorted({m.split('.')[0] for m in sys.modules} & {'mitmproxy', 'httpx', 'prometheus_client'}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(PACKAGE.parent)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
