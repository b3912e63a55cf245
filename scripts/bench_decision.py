"""The routing decision at an identity-cache hit, in process, piece by piece (issue 23's goal:
<= 10 us with 16 workers): route match, token extraction, cache lookup, balance key, worker pick;
and the other pure per-request work: an access-log line (logfmt, JSON) and the request metrics.

    .venv/bin/python scripts/bench_decision.py [--workers 16] [--iterations 20000] [--batches 15]
    .venv/bin/python scripts/bench_decision.py --callgrind [--iterations 2000]

Each piece runs `--iterations` times per batch; printed: the fastest batch's microseconds per
call (the least disturbed by other work on a shared machine) and the median batch's. With
`--callgrind` the script runs itself under valgrind's callgrind and prints instructions per call
of each piece instead (counters zeroed and dumped around each piece's loop with
callgrind_control): a figure that does not move with the machine's load. The same
request as scripts/bench.py: `GET /_matrix/client/v3/sync?since=s1&timeout=0` with a bearer token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addons"))

from mitmproxy import http  # noqa: E402
from synapse_router.addons.routing import _balance_key  # noqa: E402
from synapse_router.config import WhoamiConfig, parse_config  # noqa: E402
from synapse_router.identity import tokens  # noqa: E402
from synapse_router.identity.resolver import IdentityResolver  # noqa: E402
from synapse_router.observability.accesslog import AccessLogFormatter, AccessRecord  # noqa: E402
from synapse_router.observability.metrics import RouterMetrics  # noqa: E402
from synapse_router.routing.engine import Engine  # noqa: E402

TOKEN = "syt_YmVuY2g_benchmarktoken_000000"
SYNC_PATH = "/_matrix/client/v3/sync?since=s1&timeout=0"


def timed(fn: Callable[[], object], iterations: int, batches: int) -> tuple[float, float]:
    per_call = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        per_call.append((time.perf_counter_ns() - start) / iterations / 1000)
    return min(per_call), statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--callgrind", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--under-callgrind", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    urls = "\n".join(f"    - http://10.0.0.{i}:8008" for i in range(1, args.workers + 1))
    engine = Engine(parse_config(f"workers:\n  sync:\n{urls}\n"))
    resolver = IdentityResolver(WhoamiConfig(), None)  # type: ignore[arg-type]
    resolver.users[tokens.token_key(TOKEN)] = "@bench:example.org"
    authorizations = [f"Bearer {TOKEN}"]
    unusable: frozenset[str] = frozenset()
    in_flight: dict[str, int] = {}
    match = engine.match("GET", SYNC_PATH)
    found = tokens.find_token(authorizations, match.query, match.path)
    assert found is not None
    resolution = resolver.cached(found.key)
    key, kind = _balance_key(match, found, "127.0.0.1", resolution)

    def whole() -> None:
        m = engine.match("GET", SYNC_PATH)
        f = tokens.find_token(authorizations, m.query, m.path)
        assert f is not None
        r = resolver.cached(f.key)
        k, kk = _balance_key(m, f, "127.0.0.1", r)
        engine.select(m.route, k, kk, unusable, in_flight)

    record = AccessRecord(time=1765000000.123, client_ip="127.0.0.1", method="GET", path=match.path, status=200)
    record.bytes_sent, record.upstream_ms, record.total_ms, record.token_hash = 1234, 1.234, 2.345, "abcdef12"
    record.set_decision(engine.select(match.route, key, kind, unusable, in_flight))
    logfmt, json_lines = AccessLogFormatter("logfmt", False), AccessLogFormatter("json", False)
    metrics = RouterMetrics()
    fields = ((b"Host", b"matrix.example.org"), (b"Authorization", f"Bearer {TOKEN}".encode()), (b"Accept", b"*/*"))

    def request() -> http.Request:  # as mitmproxy's http1.read_request_head makes one
        return http.Request(
            "", 0, b"GET", b"", b"", SYNC_PATH.encode(), b"HTTP/1.1", http.Headers(fields), None, None, 1.0, None
        )

    def response() -> http.Response:  # as http1.read_response_head
        head = http.Headers(((b"Content-Type", b"application/json"), (b"Content-Length", b"2")))
        return http.Response(b"HTTP/1.1", 200, b"OK", head, None, None, 1.0, None)

    pieces: list[tuple[str, Callable[[], object]]] = [
        ("route match (routes.py)", lambda: engine.match("GET", SYNC_PATH)),
        ("token extraction (tokens.find_token)", lambda: tokens.find_token(authorizations, match.query, match.path)),
        ("identity cache lookup (resolver.cached)", lambda: resolver.cached(found.key)),
        ("balance key", lambda: _balance_key(match, found, "127.0.0.1", resolution)),
        (
            f"worker pick, {args.workers} workers (engine.select)",
            lambda: engine.select(match.route, key, kind, unusable, in_flight),
        ),
        ("whole decision", whole),
        ("access log line, logfmt", lambda: logfmt.format(record)),
        ("access log line, json", lambda: json_lines.format(record)),
        ("metrics: observe_request", lambda: metrics.observe_request("sync", "sync", "w", "GET", 200, 0.001)),
        ("mitmproxy Request + Response objects", lambda: (request(), response())),
    ]
    if args.under_callgrind:
        for _name, fn in pieces:
            for _ in range(100):
                fn()
            subprocess.run(["callgrind_control", "--zero", str(os.getpid())], check=True, capture_output=True)
            for _ in range(args.iterations):
                fn()
            subprocess.run(["callgrind_control", "--dump", str(os.getpid())], check=True, capture_output=True)
        return
    print("$ " + " ".join(["python", "scripts/bench_decision.py", *sys.argv[1:]]))
    if args.callgrind:
        with tempfile.TemporaryDirectory(prefix="bench-decision-") as tmp:
            out = Path(tmp) / "decision.callgrind"
            valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            optimize = [] if __debug__ else ["-O"]  # `python -O scripts/bench_decision.py`: the same, optimised
            command = [*valgrind, sys.executable, *optimize, __file__, "--under-callgrind", *sys.argv[1:]]
            subprocess.run(command, check=True, capture_output=True)
            dumps = sorted(Path(tmp).glob("decision.callgrind.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
            print(f"{'piece':<48} {'instructions per call':>22}")
            for (name, _), dump in zip(pieces, dumps, strict=True):
                print(f"{name:<48} {total_ir(dump) / args.iterations:>22,.0f}")
        return
    print(f"{'piece':<48} {'fastest us':>10} {'median us':>10}")
    for name, fn in pieces:
        fastest, median = timed(fn, args.iterations, args.batches)
        print(f"{name:<48} {fastest:>10.2f} {median:>10.2f}")


def total_ir(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


if __name__ == "__main__":
    main()
