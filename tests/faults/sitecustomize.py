"""Fault injection for tests/integration/test_isolation.py and test_exchange.py: put this
directory on PYTHONPATH and name a part's hook in SYNAPSE_ROUTER_TEST_FAULT (e.g.
"ConnectionLimits.response"; "A.x|A.y": the first of them the part has); every process of the
router then raises RuntimeError from that hook, whichever launcher starts it (Python imports
sitecustomize at start-up, before the router is built). The hook's own work is done first,
unless SYNAPSE_ROUTER_TEST_FAULT_WHEN is "before": then it raises before doing anything."""

import importlib
import os

_PARTS = {
    "ConnectionLimits": "synapse_router.addons.connection_limits",
    "Routing": "synapse_router.addons.routing",
    "WhoamiIdentity": "synapse_router.addons.whoami",
    "Observation": "synapse_router.addons.observation",
}

_fault = os.environ.get("SYNAPSE_ROUTER_TEST_FAULT")
if _fault:
    _before = os.environ.get("SYNAPSE_ROUTER_TEST_FAULT_WHEN") == "before"
    for _candidate in _fault.split("|"):
        _part, _hook = _candidate.split(".")
        _cls = getattr(importlib.import_module(_PARTS[_part]), _part)
        if hasattr(_cls, _hook):
            break
    _original = getattr(_cls, _hook)

    def _raising(self, *args, **kwargs):
        if not _before:
            _original(self, *args, **kwargs)
        raise RuntimeError("injected fault: Bearer syt_injected_SECRET")

    setattr(_cls, _hook, _raising)
