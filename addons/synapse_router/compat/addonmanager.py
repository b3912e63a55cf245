"""mitmproxy 12.3's Master and AddonManager internals the lean launcher relies on
(launcher/lean.py), each run by tests/unit/test_compat_addonmanager.py against the installed
version:

 - `AddonManager._iter_hooks(addon, event)` yields (addon, hook function) for an addon and its
   sub-addons (`addons` attribute), depth first, in the order `trigger_event` calls them;
 - an AddonManager connects its `_configure_all` to `options.changed` when it is made, and
   holds the chain in `chain` (list) and `lookup` (name -> addon);
 - Master's `_legacy_log_events` (the deprecated `add_log` hook) has `uninstall()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, hooks, master


def hook_functions(manager: addonmanager.AddonManager, event: hooks.Hook) -> list[Callable[..., Any]]:
    """Every function the chain of `manager` has for `event`, in the order mitmproxy calls them."""
    return [func for addon in manager.chain for _, func in manager._iter_hooks(addon, event)]


def swap_addon_manager(owner: master.Master, manager: addonmanager.AddonManager) -> None:
    """Make `manager` (made for `owner`) the addon manager of `owner`, keeping the addons its
    own holds (Master's TermLog): the old one no longer hears option changes."""
    plain = owner.addons
    owner.options.changed.disconnect(plain._configure_all)
    manager.chain, manager.lookup = plain.chain, plain.lookup
    owner.addons = manager


def drop_legacy_log_events(owner: master.Master) -> None:
    """Stop the deprecated `add_log` hook: per log record it costs a hook dispatch and a byte
    in the event loop's self-pipe, for third-party scripts a lean Master does not load."""
    owner._legacy_log_events.uninstall()
