"""whoami calls per token with `synapse-router --processes 2`, without and with the shared
identity cache in Redis (`whoami.redis`), side by side in one run.

    .venv/bin/python scripts/bench_shared_cache.py [--tokens 200] [--requests-per-token 6]
        [--schedule rounds|at-once|both]

Every request opens a new connection, so the kernel spreads each token's requests over both
processes (SO_REUSEPORT). Two schedules (both by default):
- rounds: each round sends every token once, as clients sync one request after another;
- at-once: all the requests of a token are sent at the same moment, so both processes miss
  the token at the same instant (the case the shared cache's claim on a token is for).
Upstreams are loopback stand-ins; Redis is a private redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis as redis_sync

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import Fleet, RouterStarter, free_port, unpaced, wait_for_port  # noqa: E402


async def load(url: str, tokens: list[str], per_token: int, at_once: bool) -> int:
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)  # a new connection each
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        sem = asyncio.Semaphore(50)

        async def one(token: str) -> bool:
            async with sem:
                r = await client.get(
                    "/_matrix/client/v3/sync?since=s1&timeout=0", headers={"Authorization": f"Bearer {token}"}
                )
                return r.status_code == 200

        if at_once:  # a token's requests leave together: both processes miss it at the same instant
            results = await asyncio.gather(*(one(t) for t in tokens for _ in range(per_token)))
            return sum(results)
        ok = 0
        for _ in range(per_token):  # a token's requests follow each other, as a client's syncs do
            ok += sum(await asyncio.gather(*(one(t) for t in tokens)))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--requests-per-token", type=int, default=6)
    parser.add_argument("--schedule", choices=("rounds", "at-once", "both"), default="both")
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server is needed: scripts/synapse_deploy.py install")
    work = Path(tempfile.mkdtemp(prefix="synapse-router-shared-"))
    tokens = {f"syt_shared_{i:05d}": f"@user{i}:test.local" for i in range(args.tokens)}
    redis_port = free_port()
    redis = subprocess.Popen(
        [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(redis_port, redis)
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])} ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"{'schedule':<9} {'variant':<40} {'requests ok':>12} {'whoami calls':>13} {'calls/token':>12}")
    schedules = ("rounds", "at-once") if args.schedule == "both" else (args.schedule,)
    variants = (("--processes 2, in-process caches only", False), ("--processes 2, shared Redis", True))
    try:
        for schedule, (label, shared) in ((s, v) for s in schedules for v in variants):
            fleet = Fleet(work)
            starter = RouterStarter(work)
            try:
                main_upstream = fleet.add(f"main-{schedule}-{int(shared)}", whoami=tokens)
                sync = fleet.add(f"sync-{schedule}-{int(shared)}")
                whoami = {"timeout": 10, **({"redis": f"redis://127.0.0.1:{redis_port}/0"} if shared else {})}
                router = starter(
                    main_upstream.url,
                    unpaced({"workers": {"sync": [sync.url]}, "whoami": whoami}),
                    ["-q", "--processes", "2"],
                    launcher="synapse-router",
                    wait_timeout=60,
                )
                time.sleep(2)  # the second process starts once the first serves
                if shared:  # each variant starts from an empty shared cache
                    with redis_sync.Redis(port=redis_port) as r:
                        r.flushall()
                ok = asyncio.run(load(router.url, list(tokens), args.requests_per_token, schedule == "at-once"))
                calls = main_upstream.stats()["whoami_calls"]
                print(f"{schedule:<9} {label:<40} {ok:>12} {calls:>13} {calls / len(tokens):>12.2f}", flush=True)
            finally:
                starter.stop_all()
                fleet.stop()
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
