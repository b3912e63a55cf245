"""Fault injection for tests/integration/test_isolation.py: put this directory on PYTHONPATH and
name a part's hook in SYNAPSE_ROUTER_TEST_FAULT (e.g. "ConnectionLimits.response"); every
process of the router then raises RuntimeError from that hook, whichever launcher starts it
(Python imports sitecustomize at start-up, before the router is built)."""

import importlib
import os

_PARTS = {
    "ConnectionLimits": "synapse_router.addons.connection_limits",
    "Routing": "synapse_router.addons.routing",
    "WhoamiIdentity": "synapse_router.addons.whoami",
}

_fault = os.environ.get("SYNAPSE_ROUTER_TEST_FAULT")
if _fault:
    _part, _hook = _fault.split(".")
    _cls = getattr(importlib.import_module(_PARTS[_part]), _part)
    _original = getattr(_cls, _hook)

    def _raising(self, *args, **kwargs):
        _original(self, *args, **kwargs)
        raise RuntimeError("injected fault: Bearer syt_injected_SECRET")

    setattr(_cls, _hook, _raising)
