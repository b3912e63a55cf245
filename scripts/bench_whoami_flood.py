"""A legitimate user's first sync while clients flood the router with made-up tokens (issue 20).

    .venv/bin/python scripts/bench_whoami_flood.py [--runs 6] [--clients 400] [--sources 1]
        [--whoami-delay 1] [--timeout 2] [--warmup 4] [--gap 2] [--launchers mitmdump,synapse-router]
        [--before REF]    # also the router of commit REF (a git worktree of it), before each launcher
        [--processes N]   # the lean launcher with `--processes N` (mitmdump runs one process)
        [--per-address N] # limits.max_connections_per_address: N (default: the router's default)
        [--pacing R,...]  # this checkout once per limits.request_rate_per_address R (0: off)
        [--burst B]       # limits.request_burst_per_address: B (default: the router's default)

Upstreams (tests/standin.py, real processes on loopback): main, whose whoami answers every
request after `--whoami-delay` seconds (401 M_UNKNOWN_TOKEN for made-up tokens, the user for
the legitimate ones), and one sync worker. The router runs with `whoami.timeout: --timeout`,
its default limits and a JSON access log.

Per launcher: a flood process (this script with `--flood`) keeps `--clients` keep-alive
connections busy, each sending `GET /_matrix/client/v3/sync` with a new random token as soon as
its previous answer came, from `--sources` loopback addresses (127.1.x.y; one by default, as
from one machine: past its per-client new-token burst most requests are routed without a
call, so the flood runs as fast as the router can answer; `--sources 400`: one per client, so
only the process-wide limit stops their calls and whoami's slots stay full).
After `--warmup` seconds, `--runs` times (every `--gap` seconds) a separate `curl` process
sends a legitimate user's first sync (a token the router has never seen) from 127.0.0.1, an
address of its own: `whoami.max_in_flight_per_client` makes an address's first requests wait
for that address's own calls, so a legitimate user on the flood's address would measure that
queue, not the bound. With `--per-address N` the router holds the flood's address to N open
connections (the rest are reset at accept and the flood's clients reconnect).

Printed per run: curl's time to connect and total time (outside the router's process), the
router's own `total_ms` and `upstream_ms` for that request from its access log (from the
request head's first byte to the response's end; the worker's part), their difference
(`without`: the router's own part, the whoami wait included) and its identity source;
then the flood's rate and the router's CPU seconds over the flood (with `--processes N`, the
parent's and its children's together). Every process this script starts is stopped by pid at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h11

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addons.synapse_router.identity.tokens import short_hash, token_key  # noqa: E402
from tests.harness import Fleet, free_port, router_command, wait_for_port  # noqa: E402

SYNC = "/_matrix/client/v3/sync"


# --- the flood (runs in its own process) ---------------------------------------------------


async def flood_client(port: int, source: str, counts: list[int]) -> None:
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError:
            counts[1] += 1
            await asyncio.sleep(0.1)
            continue
        conn = h11.Connection(h11.CLIENT)
        try:
            while True:
                token = "flood_" + secrets.token_hex(8)
                headers = [("Host", "router"), ("Authorization", f"Bearer {token}")]
                writer.write(conn.send(h11.Request(method="GET", target=SYNC, headers=headers)))
                writer.write(conn.send(h11.EndOfMessage()))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data:
                            raise ConnectionError("closed")
                    elif isinstance(event, h11.EndOfMessage):
                        break
                counts[0] += 1
                conn.start_next_cycle()
        except (OSError, ConnectionError, h11.ProtocolError):
            counts[1] += 1
        finally:
            writer.close()


async def flood(port: int, clients: int, sources: int) -> None:
    counts = [0, 0]  # answers, connection errors
    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    addresses = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(sources)]
    tasks = [asyncio.create_task(flood_client(port, addresses[i % sources], counts)) for i in range(clients)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    elapsed = time.monotonic() - started
    print(json.dumps({"answers": counts[0], "errors": counts[1], "seconds": elapsed}), flush=True)


# --- the measurement ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live children (a --processes parent's workers)."""
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def curl_sync(port: int, token: str) -> tuple[str, float, float]:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "60",
            "-w",
            "%{http_code} %{time_connect} %{time_total}",
            "-H",
            f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{SYNC}",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return out[0], float(out[1]), float(out[2])


def access_lines(path: Path) -> dict[str, dict[str, Any]]:
    lines = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "token_hash" in record:
                lines[record["token_hash"]] = record
    return lines


def measure(
    launcher: str, args: argparse.Namespace, work: Path, before: Path | None, pacing: float | None = None
) -> list[str]:
    """The runs of one launcher, of this checkout or (with `before`) of that worktree's code;
    `pacing`: limits.request_rate_per_address (None: the router's default)."""
    processes = args.processes if launcher == "synapse-router" else 1
    name = launcher + (f" x{processes}" if processes > 1 else "") + (" (before)" if before else "")
    name += f" pacing {pacing:g}" if pacing is not None else ""
    limits: dict[str, float] = {"max_connections_per_address": args.per_address} if args.per_address else {}
    if args.burst:
        limits["request_burst_per_address"] = args.burst
    if pacing is not None:
        limits["request_rate_per_address"] = pacing
    tokens = {f"legit_{i}_{secrets.token_hex(4)}": f"@legit{i}:example.org" for i in range(args.runs)}
    fleet = Fleet(work)
    router_proc = flood_proc = None
    rows = []
    try:
        main = fleet.add("main", whoami=tokens, whoami_delay=args.whoami_delay)
        sync = fleet.add("sync")
        log = work / "access.log"
        config = work / "router.yaml"
        config.write_text(
            json.dumps(
                {
                    "workers": {"sync": [sync.url]},
                    "whoami": {"timeout": args.timeout},
                    "access_log": {"enabled": True, "format": "json", "path": str(log)},
                    **({"limits": limits} if limits else {}),
                }
            )
        )
        port = free_port()
        extra = ["--set", "flow_detail=0"] + (["--processes", str(processes)] if processes > 1 else [])
        cmd = router_command(main.url, port, config, extra, launcher=launcher)
        env = dict(os.environ)
        if before is not None:  # the package and entry script of commit REF, not this checkout's
            cmd = [str(before / "addons" / "router.py") if c.endswith("/addons/router.py") else c for c in cmd]
            env["PYTHONPATH"] = str(before / "addons")
        with (work / "router.log").open("wb") as out:
            router_proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wait_for_port(port, router_proc, timeout=120)  # a loaded machine starts N processes slowly
        if processes > 1:
            time.sleep(3)  # every process listening, not only the first
        cpu0 = cpu_seconds(router_proc.pid)
        flood_proc = subprocess.Popen(
            [sys.executable, __file__, "--flood", str(port), str(args.clients), str(args.sources)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(args.warmup)
        results = []
        for token in tokens:
            results.append((token, *curl_sync(port, token)))
            time.sleep(args.gap)
        flood_proc.send_signal(signal.SIGTERM)
        flood_out, _ = flood_proc.communicate(timeout=30)
        cpu = cpu_seconds(router_proc.pid) - cpu0
        stats = json.loads(flood_out.strip().splitlines()[-1])
        time.sleep(0.5)
        logged = access_lines(log)
        for i, (token, status, connect, total) in enumerate(results, 1):
            record = logged.get(short_hash(token_key(token)), {})
            router_total = record.get("total_ms", float("nan")) / 1000
            upstream = record.get("upstream_ms", float("nan")) / 1000
            rows.append(
                f"{name:34} {i:3}  {status:>6} {connect:8.3f} {total:8.3f}"
                f"  {router_total:12.3f} {upstream:9.3f} {router_total - upstream:8.3f}"
                f"  {record.get('identity', '-'):10}"
            )
        rate, share = stats["answers"] / stats["seconds"], 100 * cpu / stats["seconds"]
        # This checkout logs each pause of whoami (main failing 3 calls in a row) and its cause.
        pauses = (work / "router.log").read_text(errors="replace").splitlines()
        pauses = [line for line in pauses if "whoami paused" in line]
        paused = "" if before is not None else f"; whoami paused {len(pauses)} times"
        rows.append(
            f"{name:34} flood: {stats['answers']} answers in {stats['seconds']:.1f} s ({rate:.0f}/s), "
            f"{stats['errors']} connection errors; router CPU {cpu:.1f} s ({share:.0f}% of a core){paused}"
        )
        rows.extend(f"{name:34}   {line.split('synapse-router: ', 1)[-1][:150]}" for line in pauses[:3])
    finally:
        for proc in (flood_proc, router_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        fleet.stop()
    return rows


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--flood":
        asyncio.run(flood(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--sources", type=int, default=1)
    parser.add_argument("--whoami-delay", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--gap", type=float, default=2.0)
    parser.add_argument("--launchers", default="mitmdump,synapse-router")
    parser.add_argument("--before", metavar="REF", help="also measure commit REF's router (a git worktree of it)")
    parser.add_argument("--processes", type=int, default=1, help="the lean launcher's --processes")
    parser.add_argument("--per-address", type=int, default=0, help="limits.max_connections_per_address")
    parser.add_argument("--pacing", default="", help="comma-separated limits.request_rate_per_address values")
    parser.add_argument("--burst", type=int, default=0, help="limits.request_burst_per_address")
    args = parser.parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; whoami answers in {args.whoami_delay} s, "
        f"whoami.timeout {args.timeout} s, {args.clients} flooding clients from {args.sources} addresses"
        + (f", synapse-router --processes {args.processes}" if args.processes > 1 else "")
        + (f", limits.max_connections_per_address {args.per_address}" if args.per_address else "")
        + (f", limits.request_burst_per_address {args.burst}" if args.burst else "")
    )
    with tempfile.TemporaryDirectory(prefix="bench-whoami-flood-") as tmp:
        before = Path(tmp) / "before" if args.before else None
        if before is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True
            )
            revision = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.before], capture_output=True, text=True
            ).stdout.strip()
            print(f"before: {args.before} = {revision}, after: this checkout")
        print(f"{'launcher':34} run  status  connect    total  router_total  upstream  without  identity")
        try:
            for launcher in args.launchers.split(","):
                pacings: list[float | None] = [float(r) for r in args.pacing.split(",")] if args.pacing else [None]
                variants = ([(before, None)] if before else []) + [(None, r) for r in pacings]
                for i, (tree, pacing) in enumerate(variants):
                    work = Path(tmp) / f"{launcher}-{i}"
                    work.mkdir()
                    for row in measure(launcher, args, work, tree, pacing):
                        print(row, flush=True)
        finally:
            if before is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
