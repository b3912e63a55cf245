"""wrk's output, parsed into the figures the benchmark scripts report.

from scripts.wrkstat import parse_wrk  # after putting the repo root on sys.path
"""

from __future__ import annotations

import re

MS_PER_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
REQUIRED = ("requests", "rps", "p50", "p99")


def ms(value: str) -> float:
    """A wrk duration ("812.00us", "1.20ms", "2.00s", "1.00m") in milliseconds."""
    match = re.match(r"([\d.]+)(\w*)", value)
    assert match is not None, value
    return float(match.group(1)) * MS_PER_UNIT.get(match.group(2), 1.0)


def parse_wrk(out: str, strict: bool = False) -> dict[str, float]:
    """`requests`, `rps` and the `p50`/`p99` latencies (ms, from `--latency`) where wrk printed
    them (`strict`: ValueError if one is missing); `non_2xx` and `socket_errors`, 0 if none."""
    figures: dict[str, float] = {}
    if m := re.search(r"(\d+) requests in", out):
        figures["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s*([\d.]+)", out):
        figures["rps"] = float(m.group(1))
    for pct in ("50", "99"):  # the Latency Distribution lines
        if m := re.search(rf"^\s*{pct}(?:\.000)?%\s+(\S+)", out, re.M):
            figures[f"p{pct}"] = ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    figures["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["socket_errors"] = sum(int(n) for n in m.groups()) if m else 0
    missing = [name for name in REQUIRED if name not in figures]
    if strict and missing:
        raise ValueError(f"{', '.join(missing)} not in wrk output:\n{out}")
    return figures
