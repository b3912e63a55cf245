"""Configuration: the `router_config` option, its YAML file, and reloading it (`router.reload`,
SIGHUP). A configuration is applied whole or not at all: every addon that holds part of it
prepares its part first (anything that can fail, such as opening the access log file, happens
then), and only when all are prepared are the parts swapped in, one after another, in one go."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mitmproxy import command, ctx, exceptions
from mitmproxy.addons.errorcheck import ErrorCheckHandler
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from ..config import ConfigError, RouterConfig, load_config
from ..launcher.signals import on_signal
from ..routing.upstream import Upstream, parse_upstream_url
from .state import RouterState

log = logging.getLogger("synapse_router")


class Applier(Protocol):
    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        """Get ready to use `config`, raising ConfigError if it cannot be used;
        return what switches to it (which must not fail)."""
        ...


class Configuration:
    def __init__(self, state: RouterState, appliers: Sequence[Applier]) -> None:
        self.state = state
        self.appliers = appliers
        # How a path is read: the file itself; in a `--processes` child, the configuration its
        # parent applied (launcher/applied.py) when the path is the operator's.
        self.load_file: Callable[[str], RouterConfig] = load_config

    def load(self, loader: Any) -> None:
        loader.add_option(
            "router_config",
            str | None,
            None,
            "Path of the synapse-router YAML configuration (pools of workers, custom routes).",
        )

    def configure(self, updated: set[str]) -> None:
        if "router_config" in updated:
            path = ctx.options.router_config
            try:
                self.apply(read(path, self.load_file), path)
            except ConfigError as e:
                raise exceptions.OptionsError(f"router_config {path}: {e}") from e  # type: ignore[no-untyped-call]
        if "mode" in updated:
            target = reverse_target(ctx.options.mode)
            if target is not None:
                self.state.main = target

    def running(self) -> None:
        # `kill -HUP` reloads the configuration, as nginx does: mitmdump has no console.
        try:
            on_signal(signal.SIGHUP, self.reload_when_started)
        except (RuntimeError, ValueError):
            log.info("synapse-router: SIGHUP reload unavailable here; use the router.reload command")

    def reload_when_started(self) -> None:
        """SIGHUP: reload, but not while mitmproxy still watches its start-up (it exits 1 on an
        error logged then, so a bad file sent with an early SIGHUP would stop the router)."""
        if _starting_up():
            asyncio.get_running_loop().call_later(0.1, self.reload_when_started)
            return
        self.reload()

    @command.command("router.reload")
    def reload(self) -> None:
        """Reload the router configuration file; in-flight requests are not affected. A bad
        file (or an access log file that cannot be opened) is reported in the log and the
        running configuration kept, whole."""
        path = self.state.config_path or ctx.options.router_config
        try:
            self.apply(read(path, self.load_file), path)
        except ConfigError as e:
            log.error(f"synapse-router: reload of {path} failed, keeping the running configuration: {e}")

    def apply(self, config: RouterConfig, path: str | None) -> None:
        """Switch to a configuration, whole, or raise and keep the running one. In-flight flows
        keep the decision they were given."""
        switches = [applier.prepare(config) for applier in self.appliers]
        for switch in switches:
            switch()
        self.state.config_path = path
        pools = ", ".join(f"{name}={len(ws)}" for name, ws in config.pools.items()) or "none"
        log.info(f"synapse-router: loaded {path}: pools {pools}, {len(config.routes)} custom route(s)")


def read(path: str | None, load: Callable[[str], RouterConfig] = load_config) -> RouterConfig:
    if not path:
        log.warning("synapse-router: no router_config set: every request goes to the main process")
        return RouterConfig()
    return load(path)


def reverse_target(modes: Sequence[str]) -> Upstream | None:
    for spec in modes:
        mode = ProxyMode.parse(spec)
        if isinstance(mode, ReverseMode):
            host, port = mode.address
            shown = f"[{host}]" if ":" in host else host
            scheme = mode.scheme if mode.scheme in ("http", "https") else "http"
            return parse_upstream_url(f"{scheme}://{shown}:{port}")
    return None


def _starting_up() -> bool:
    """mitmproxy's ErrorCheck (`Error logged during startup, exiting...`) still listening."""
    return any(isinstance(handler, ErrorCheckHandler) for handler in logging.getLogger().handlers)
