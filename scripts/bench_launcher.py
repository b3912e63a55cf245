"""CPU per request and throughput of the lean launcher against mitmdump, side by side in one run.

    .venv/bin/python scripts/bench_launcher.py [--duration 10] [--connections 16] [--rounds 1]
    .venv/bin/python scripts/bench_launcher.py --before REF   # this checkout against commit REF

With `--before REF`, the variants are the addon and the lean launcher from a worktree of
commit REF and from this checkout, interleaved: a before/after comparison in one run.

Same loopback workload for every proxy, load from `wrk -t1 -cN -dDs --latency` with a bearer
token (Debian's wrk package):
  versions  GET /_matrix/client/versions  -> the client_reader stand-in (mitmproxy forwards it)
  sync      GET /_matrix/client/v3/sync?since=s1&timeout=0 -> the sync stand-in, by user
            (a short sync: mitmproxy forwards it)
  longpoll  GET /_matrix/client/v3/sync?since=s1&timeout=30000 -> the sync stand-in, by user,
            which answers at once: the router sends long-polls itself (so that it can retry
            them on another worker), a costlier path
Proxies, all with the options the router enforces, no per-flow output (`flow_detail=0`) and
the log at `warn` (what `-q` does, except that a worker marked DOWN or a failover during the
run still shows, and is reported under "notes": such a run measured a different path):
  mitmdump bare         reverse mode straight to the stand-in the router would choose
  mitmdump + addon      mitmdump -s addons/router.py
  lean launcher         synapse-router
  lean --processes 2    synapse-router --processes 2 (parent + 2 children)
The variants run one after another, interleaved per round, each from a fresh start with a warm
identity cache. CPU per request is the proxy processes' own utime+stime (/proc/PID/stat, every
process of the variant) over the wrk run divided by the requests wrk completed: the figure to
trust on a shared 2-core machine. Throughput is not the proxy's capacity: wrk, the Python
stand-in upstream and the proxy share the same two cores (the stand-in's CPU per request is
printed too), and other work on the machine takes its share; `--processes 2` cannot show its
second core here.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.procstat import cpu_seconds, process_tree  # noqa: E402
from scripts.wrkstat import parse_wrk  # noqa: E402
from tests.harness import MITMDUMP, Fleet, Standin, free_port, router_command, unpaced, wait_for_port  # noqa: E402

TOKEN = "syt_YmVuY2g_launcher_bench_token_0000"
WORKLOADS = {
    "versions": ("/_matrix/client/versions", "client_reader"),
    "sync": ("/_matrix/client/v3/sync?since=s1&timeout=0", "sync"),
    "longpoll": ("/_matrix/client/v3/sync?since=s1&timeout=30000", "sync"),
}
# What the router enforces, given to every variant so that all run with the same options.
COMMON = [
    "--set", "flow_detail=0",
    "--set", "termlog_verbosity=warn",
    "--set", "connection_strategy=lazy",
    "--set", "keep_host_header=true",
    "--set", "http2=false",
    "--set", "block_global=false",
]  # fmt: skip
VARIANTS = ["mitmdump bare", "mitmdump + addon", "lean launcher", "lean --processes 2"]
BEFORE_VARIANTS = ["mitmdump + addon (before)", "mitmdump + addon", "lean launcher (before)", "lean launcher"]


def add_standin(fleet: Fleet, name: str, whoami: dict[str, str] | None = None) -> Standin:
    return fleet.add(name, whoami=whoami)


@contextmanager
def bench_upstreams(
    work: Path, scratch: Path, before_ref: str | None, health: dict[str, float] | None = None
) -> Iterator[tuple[Fleet, Path, Path | None]]:
    """The stand-ins every variant runs against (main, which knows the bench token,
    client_reader and sync), the router configuration for them, and with `before_ref` a git
    worktree of that commit (in `scratch`); stopped and removed afterwards."""
    fleet = Fleet(work)
    before = scratch / "before" if before_ref else None
    if before is not None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), before_ref], check=True)
    try:
        add_standin(fleet, "main", whoami={TOKEN: "@bench:example.org"})
        add_standin(fleet, "client_reader")
        add_standin(fleet, "sync")
        config = work / "router.yaml"
        workers = {"client_reader": [fleet["client_reader"].url], "sync": [fleet["sync"].url]}
        doc = {"workers": workers} | ({"health": health} if health else {})
        config.write_text(yaml.safe_dump(unpaced(doc, before)))
        yield fleet, config, before
    finally:
        fleet.stop()
        if before is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)


@dataclass
class Result:
    workload: str
    variant: str
    round: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_req: float
    upstream_cpu_ms_per_req: float
    processes: int
    notes: str


def wrk_command(url: str, duration: int, connections: int) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {TOKEN}",
        url,
    ]


def run_wrk(url: str, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(wrk_command(url, duration, connections), capture_output=True, text=True, check=True).stdout
    figures = parse_wrk(out, strict=True)
    errors = figures["non_2xx"] + figures["socket_errors"]
    return {name: figures[name] for name in ("requests", "rps", "p50", "p99")} | {"errors": errors}


def command_for(
    variant: str, main: Standin, upstream: Standin, config: Path, port: int, before: Path | None = None
) -> list[str]:
    if variant.endswith(" (before)"):
        assert before is not None
        launcher = "mitmdump" if variant.startswith("mitmdump") else "synapse-router"
        cmd = router_command(main.url, port, config, COMMON, launcher=launcher)
        return [str(before / "addons" / "router.py") if c.endswith("/addons/router.py") else c for c in cmd]
    if variant == "mitmdump bare":
        return [str(MITMDUMP), "--mode", f"reverse:{upstream.url}@127.0.0.1:{port}", *COMMON]
    if variant == "mitmdump + addon":
        return router_command(main.url, port, config, COMMON)
    if variant == "lean launcher":
        return router_command(main.url, port, config, COMMON, launcher="synapse-router")
    if variant == "lean --processes 2":
        return router_command(main.url, port, config, ["--processes", "2", *COMMON], launcher="synapse-router")
    raise ValueError(variant)


def measure(
    work: Path,
    workload: str,
    variant: str,
    rnd: int,
    fleet: Fleet,
    config: Path,
    duration: int,
    connections: int,
    before: Path | None = None,
) -> Result:
    path, pool = WORKLOADS[workload]
    upstream = fleet[pool]
    port = free_port()
    cmd = command_for(variant, fleet["main"], upstream, config, port, before)
    log = work / f"{workload}-{variant.replace(' ', '_').replace('(', '').replace(')', '')}-{rnd}.log"
    env = dict(os.environ)
    if variant.endswith(" (before)"):
        assert before is not None
        env["PYTHONPATH"] = str(before / "addons")  # the package of commit REF, not this checkout's
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        wait_for_port(port, proc, timeout=60)
        expected = 3 if "processes" in variant else 1
        deadline = time.monotonic() + 60
        while len(pids := process_tree(proc.pid)) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{variant}: {len(pids)} processes")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}{path}"
        for _ in range(16):  # warm every process: identity cache, upstream connections, imports
            with httpx.Client(timeout=30) as client:
                client.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
        time.sleep(1.0)  # the second child of --processes 2 past its start-up
        pids = process_tree(proc.pid)
        assert upstream.proc is not None
        cpu0 = cpu_seconds(*pids)
        up0 = cpu_seconds(upstream.proc.pid)
        wrk = run_wrk(url, duration, connections)
        wrk_end = time.time()
        cpu = cpu_seconds(*pids) - cpu0
        up = cpu_seconds(upstream.proc.pid) - up0
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    n = max(int(wrk["requests"]), 1)
    notes = _events(log.read_text(errors="replace"), wrk_end)
    return Result(
        workload,
        variant,
        rnd,
        int(wrk["requests"]),
        wrk["rps"],
        wrk["p50"],
        wrk["p99"],
        int(wrk["errors"]),
        cpu * 1000 / n,
        up * 1000 / n,
        len(pids),
        notes,
    )


def _events(log: str, wrk_end: float) -> str:
    """Worker DOWN, failover and addon-error lines of a run, split into those logged while wrk
    ran and those at its end (wrk drops its connections with requests in flight: a
    sync request cancelled then is no measurement)."""
    during, at_end, first = 0, 0, ""
    day = time.strftime("%Y-%m-%d ", time.localtime(wrk_end))
    for line in log.splitlines():
        match = re.match(r"\[(\d\d:\d\d:\d\d)\.\d+\]", line)  # a log line of the proxy's
        if match is None or not any(word in line for word in (" is DOWN", "failover", "Addon error")):
            continue
        first = first or line.split("synapse-router: ", 1)[-1][:48]
        logged = time.mktime(time.strptime(day + match.group(1), "%Y-%m-%d %H:%M:%S"))
        if logged >= int(wrk_end) - 1:
            at_end += 1
        else:
            during += 1
    if not first:
        return ""
    return f"events during run {during}, at wrk's end {at_end} ({first})"


def table(results: list[Result]) -> str:
    head = (
        f"{'workload':<9} {'proxy':<25} {'rnd':>3} {'procs':>5} {'requests':>8} {'req/s':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'CPU ms/req':>10} {'vs +addon':>9} {'upstream ms/req':>15}  notes"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        base = [
            x.cpu_ms_per_req for x in results if (x.workload, x.round, x.variant) == (r.workload, r.round, VARIANTS[1])
        ]
        ratio = f"{r.cpu_ms_per_req / base[0]:.2f}x" if base and base[0] else "-"
        lines.append(
            f"{r.workload:<9} {r.variant:<25} {r.round:>3} {r.processes:>5} {r.requests:>8} {r.rps:>7.0f} "
            f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.errors:>6} {r.cpu_ms_per_req:>10.3f} {ratio:>9} "
            f"{r.upstream_cpu_ms_per_req:>15.3f}  {r.notes}"
        )
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    lines = ["median CPU per request, lean / mitmdump + addon (target <= 0.6x):"]
    for workload in dict.fromkeys(r.workload for r in results):

        def med(variant: str, workload: str = workload) -> float:
            values = [r.cpu_ms_per_req for r in results if (r.workload, r.variant) == (workload, variant)]
            return statistics.median(values) if values else float("nan")

        addon = med(VARIANTS[1])
        seen = list(dict.fromkeys(r.variant for r in results))
        parts = [f"{v} {med(v):.3f} ms ({med(v) / addon:.2f}x)" for v in seen]
        lines.append(f"  {workload}: " + ", ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per measurement")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every variant")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--keep-logs", metavar="DIR", help="write the proxies' logs to DIR and keep them")
    parser.add_argument("--before", metavar="REF", help="compare against commit REF (a git worktree of it)")
    args = parser.parse_args()
    variants = BEFORE_VARIANTS if args.before else VARIANTS
    if not (Path(sys.executable).parent / "synapse-router").exists():
        sys.exit("synapse-router is not installed: .venv/bin/pip install -e '.[test]'")

    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-launcher-") as tmp:
        work = Path(args.keep_logs or tmp)
        work.mkdir(parents=True, exist_ok=True)
        with bench_upstreams(work, Path(tmp), args.before) as (fleet, config, before):
            if args.before:
                print(f"before: {args.before} = {_git('rev-parse', '--short', args.before)}, after: this checkout")
            example = {v: command_for(v, fleet["main"], fleet["client_reader"], config, 8080, before) for v in variants}
            print("proxies (port and paths of this run):")
            for variant, cmd in example.items():
                print(f"  {variant:<19} $ {shlex.join(cmd)}")
            load = wrk_command("http://127.0.0.1:PORT/PATH", args.duration, args.connections)
            print(f"load: $ {shlex.join(load)}")
            for workload in args.workloads:
                for rnd in range(1, args.rounds + 1):
                    for variant in variants:
                        result = measure(
                            work, workload, variant, rnd, fleet, config, args.duration, args.connections, before
                        )
                        results.append(result)
                        print(
                            f"  {workload} {variant} round {rnd}: {result.rps:.0f} req/s, "
                            f"{result.cpu_ms_per_req:.3f} CPU ms/req",
                            flush=True,
                        )
    print()
    print(table(results))
    print()
    print(summary(results))
    print(f"load average {os.getloadavg()[0]:.2f} at end")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    main()
