"""The chaos soak in CI (issue 21): a short `scripts/soak` run, both launchers, that must exit 0.

The soak brings up its own Synapse deployment (`.soak-deploy/`, base port 18600, so it does not
disturb the session's deployment the other e2e tests share) and takes it down again if it
started it. It runs three phases of about a third of SOAK_DURATION each (`synapse-router`,
`synapse-router --processes 2`, `mitmdump -s addons/router.py`) with traffic from many users,
faults (workers, main and Redis killed or stopped, SIGHUP storms, `--replace`, SIGKILL of a
`--processes` child), hostile clients, and checks its invariants (scripts/soak.py's
docstring). A violated invariant makes it exit 1 and name it; its summary is printed here
either way. SOAK_DURATION (seconds, default 150) and SOAK_SEED (default 1) change the run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import ROOT

# In the default run (`scripts/test`, CI); SYNAPSE_ROUTER_SOAK=0 leaves it out of a quick run.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("SYNAPSE_ROUTER_SOAK") == "0", reason="SYNAPSE_ROUTER_SOAK=0 skips it"),
]


def test_chaos_soak_violates_no_invariant() -> None:
    duration = os.environ.get("SOAK_DURATION", "150")
    seed = os.environ.get("SOAK_SEED", "1")
    command = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--duration", duration, "--seed", seed]
    # Set-up (a first `up` installs Synapse), three phases with their rest checks, the
    # router start-ups on a busy machine: generous, the soak bounds its own waits.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=float(duration) * 4 + 1500)
    print(result.stdout)
    print(result.stderr[-6000:], file=sys.stderr)
    assert result.returncode == 0, f"soak exited {result.returncode}:\n{result.stdout[-8000:]}"
    assert "PASSED: no invariant violated" in result.stdout
