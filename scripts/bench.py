"""Benchmarks, side by side in one run, printed as a table.

    .venv/bin/python scripts/bench.py [--duration 10] [--connections 16] [--rounds 2]

1. Throughput, p50/p99 latency and CPU per request: bare `mitmdump` in reverse mode vs
   `mitmdump -s addons/router.py` with a warm identity cache, same options, same loopback
   upstream (a stand-in sync worker), load from `wrk` (Debian package), interleaved rounds.
   CPU per request comes from the proxy process's own accounting (/proc/PID/stat), the figure
   to trust on a shared 2-core machine; throughput shares the cores with wrk and the upstream.
2. Routing decision cost at a cache hit, in-process, 16 workers (median of batches).
3. whoami calls made for 1,000 concurrent first requests of one token through the router.
4. Memory per cached token at 100,000 entries (tracemalloc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synapse_router.addons.routing import _balance_key  # noqa: E402
from synapse_router.config import WhoamiConfig, parse_config  # noqa: E402
from synapse_router.identity import tokens  # noqa: E402
from synapse_router.identity.resolver import IdentityResolver  # noqa: E402
from synapse_router.routing.engine import Engine  # noqa: E402

from scripts.procstat import cpu_seconds, rss_kib  # noqa: E402
from scripts.wrkstat import parse_wrk  # noqa: E402
from tests.harness import MITMDUMP, Fleet, free_port, router_command, unpaced, wait_for_port  # noqa: E402

TOKEN = "syt_YmVuY2g_benchmarktoken_000000"
SYNC_PATH = "/_matrix/client/v3/sync?since=s1&timeout=0"
# What the router enforces, given to bare mitmdump too so both run with the same options.
COMMON = [
    "-q",
    "--set", "connection_strategy=lazy",
    "--set", "keep_host_header=true",
    "--set", "http2=false",
    "--set", "block_global=false",
]  # fmt: skip


def run_wrk(url: str, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-H", f"Authorization: Bearer {TOKEN}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = parse_wrk(out, strict=True)
    return {name: figures[name] for name in ("rps", "requests", "p50", "p99")} | {"errors": figures["non_2xx"]}


def start_proxy(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for_port(port, proc)
    return proc


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: mitmdump can miss a SIGTERM right after a burst of
    connections (its log records fill the event loop's self-pipe; synapse_router/launcher/signals.py)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        print(f"note: proxy pid {proc.pid} ignored SIGTERM for 10 s; killed")
        proc.kill()
        proc.wait()


def throughput(work: Path, duration: int, connections: int, rounds: int) -> list[tuple[str, dict[str, float]]]:
    fleet = Fleet(work)
    results: list[tuple[str, dict[str, float]]] = []
    try:
        main = fleet.add("main", whoami={TOKEN: "@bench:example.org"})
        sync = fleet.add("sync1")
        config = work / "bench-router.yaml"
        config.write_text(yaml.safe_dump(unpaced({"workers": {"sync": [sync.url]}})))
        bare_port, router_port = free_port(), free_port()
        bare_cmd = [str(MITMDUMP), "--mode", f"reverse:{sync.url}@127.0.0.1:{bare_port}", *COMMON]
        router_cmd = router_command(main.url, router_port, config, COMMON)
        for rnd in range(rounds):
            for name, cmd, port in (
                ("bare mitmdump", bare_cmd, bare_port),
                ("mitmdump + router", router_cmd, router_port),
            ):
                proc = start_proxy(cmd, port, work / f"{name.replace(' ', '_')}-{rnd}.log")
                try:
                    url = f"http://127.0.0.1:{port}{SYNC_PATH}"
                    httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).raise_for_status()
                    cpu0 = cpu_seconds(proc.pid)
                    result = run_wrk(url, duration, connections)
                    result["cpu_ms_per_req"] = (cpu_seconds(proc.pid) - cpu0) * 1000 / max(result["requests"], 1)
                    result["rss_mib"] = rss_kib(proc.pid) / 1024
                    results.append((f"{name} (round {rnd + 1})", result))
                finally:
                    stop_proxy(proc)
        if main.stats()["whoami_calls"] != rounds:
            print(f"note: whoami calls {main.stats()['whoami_calls']} (one per router start expected)")
    finally:
        fleet.stop()
    return results


def decision_cost(workers: int = 16, iterations: int = 20_000, batches: int = 15) -> float:
    urls = "\n".join(f"    - http://10.0.0.{i}:8008" for i in range(1, workers + 1))
    engine = Engine(parse_config(f"workers:\n  sync:\n{urls}\n"))
    resolver = IdentityResolver(WhoamiConfig(), None)  # type: ignore[arg-type]
    resolver.users[tokens.token_key(TOKEN)] = "@bench:example.org"
    authorizations = [f"Bearer {TOKEN}"]
    unusable: frozenset[str] = frozenset()
    in_flight: dict[str, int] = {}
    per_call: list[float] = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            match = engine.match("GET", SYNC_PATH)
            found = tokens.find_token(authorizations, match.query, match.path)
            assert found is not None
            resolution = resolver.cached(found.key)
            key, kind = _balance_key(match, found, "127.0.0.1", resolution)
            engine.select(match.route, key, kind, unusable, in_flight)
        per_call.append((time.perf_counter_ns() - start) / iterations / 1000)
    return statistics.median(per_call)


def coalescing(work: Path, concurrent: int = 1000) -> tuple[int, int]:
    fleet = Fleet(work)
    try:
        main = fleet.add("main", whoami={TOKEN: "@bench:example.org"}, whoami_delay=0.3)
        sync = fleet.add("sync1")
        config = work / "coalesce-router.yaml"
        config.write_text(yaml.safe_dump(unpaced({"workers": {"sync": [sync.url]}})))
        port = free_port()
        proc = start_proxy(router_command(main.url, port, config, ["-q"]), port, work / "coalesce.log")
        try:

            async def burst() -> int:
                limits = httpx.Limits(max_connections=concurrent, max_keepalive_connections=0)
                async with httpx.AsyncClient(limits=limits, timeout=60) as client:
                    responses = await asyncio.gather(
                        *(
                            client.get(
                                f"http://127.0.0.1:{port}{SYNC_PATH}", headers={"Authorization": f"Bearer {TOKEN}"}
                            )
                            for _ in range(concurrent)
                        ),
                        return_exceptions=True,
                    )
                return sum(1 for r in responses if isinstance(r, httpx.Response) and r.status_code == 200)

            ok = asyncio.run(burst())
            return main.stats()["whoami_calls"], ok
        finally:
            stop_proxy(proc)
    finally:
        fleet.stop()


def cache_memory(entries: int = 100_000, tokens_per_user: int = 5) -> tuple[float, float]:
    """Bytes per cached token: realistic (several tokens per user) and worst case (one each)."""
    figures = []
    for per_user in (tokens_per_user, 1):
        users = [f"@user{i:06d}:matrix.example.org" for i in range(entries // per_user)]
        keys = [tokens.token_key(f"syt_{i:08d}_abcdefghijklmnopqrst_{i:06x}") for i in range(entries)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        resolver = IdentityResolver(WhoamiConfig(cache_size=entries), None)  # type: ignore[arg-type]
        for i, key in enumerate(keys):
            # user ids arrive as fresh strings from JSON; the resolver interns them
            resolver.users[key] = sys.intern("".join(users[i // per_user]))
        # the digests are counted: the cache owns them
        del keys
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        figures.append((after - before) / entries)
        del resolver
    return figures[0], figures[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="synapse-router-bench-"))
    print(f"# synapse-router benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores)")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")

    print(f"## 1. Throughput: wrk -t1 -c{args.connections} -d{args.duration}s, GET {SYNC_PATH}, warm cache")
    rows = throughput(work, args.duration, args.connections, args.rounds)
    print(f"{'proxy':<32} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11} {'RSS MiB':>8} {'non-2xx':>8}")
    for name, r in rows:
        print(
            f"{name:<32} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
            f"{r['cpu_ms_per_req']:>11.3f} {r['rss_mib']:>8.1f} {r['errors']:>8.0f}"
        )
    bare = [r for n, r in rows if n.startswith("bare")]
    routed = [r for n, r in rows if n.startswith("mitmdump + router")]
    rps_ratio = statistics.mean(r["rps"] for r in routed) / statistics.mean(r["rps"] for r in bare)
    cpu_ratio = statistics.mean(r["cpu_ms_per_req"] for r in bare) / statistics.mean(
        r["cpu_ms_per_req"] for r in routed
    )
    print(f"router/bare throughput ratio: {rps_ratio:.2f} (target >= 0.90)")
    print(f"router/bare efficiency (bare CPU per request / router CPU per request): {cpu_ratio:.2f}\n")

    median_us = decision_cost()
    print(f"## 2. Routing decision at a cache hit, 16 workers: {median_us:.1f} us median (target <= 20 us)\n")

    calls, ok = coalescing(work)
    print(f"## 3. 1,000 concurrent first requests of one token: {calls} whoami call(s), {ok} answered 200 (target 1)\n")

    realistic, worst = cache_memory()
    print(
        f"## 4. Identity cache at 100,000 tokens: {realistic:.0f} bytes/token with 5 tokens per user, "
        f"{worst:.0f} bytes/token with one token per user (target <= 400)"
    )


if __name__ == "__main__":
    main()
