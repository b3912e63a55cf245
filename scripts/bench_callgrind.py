"""Instructions per request through one proxy process (valgrind's callgrind): a figure that does
not move with whatever else the shared machine is doing, unlike CPU time.

    .venv/bin/python scripts/bench_callgrind.py [--requests 1000] [--connections 4]
    .venv/bin/python scripts/bench_callgrind.py --before REF   # this checkout against commit REF

Each variant (bare mitmdump in reverse mode to the workload's stand-in, no addon: what
mitmproxy itself costs; the lean launcher and mitmdump + addon; with `--before REF` also both from a git
worktree of commit REF, as scripts/bench_launcher.py does) runs under
`valgrind --tool=callgrind --instr-atstart=no` against loopback stand-ins, on the workloads of
bench_launcher (versions, sync, longpoll). After a warm-up (identity cache, upstream
connections, imports), `callgrind_control` switches instrumentation on and zeroes the counters,
a fixed number of requests is sent over a fixed number of keep-alive connections (each
connection one request at a time), and the dump's instruction count (Ir) is divided by the
requests. Health checks run once an hour, so background work does not scale with how long
valgrind takes. Figures vary by well under 1% between runs of one variant; they count every
instruction of the process (interpreter, event loop, system call wrappers), not time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h11

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_launcher import COMMON, TOKEN, WORKLOADS, bench_upstreams  # noqa: E402
from tests.harness import MITMDUMP, Fleet, free_port, router_command, wait_for_port  # noqa: E402

# variant -> launcher ("bare": mitmdump in reverse mode straight to the workload's stand-in,
# no addon: what mitmproxy itself costs a request)
VARIANTS = {"mitmdump bare": "bare", "mitmdump + addon": "mitmdump", "lean launcher": "synapse-router"}


async def _client(port: int, path: str, count: int) -> None:
    """`count` requests one after another on one keep-alive connection; each must be a 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", f"127.0.0.1:{port}"), ("Authorization", f"Bearer {TOKEN}")]
    try:
        for _ in range(count):
            writer.write(conn.send(h11.Request(method="GET", target=path, headers=headers)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise RuntimeError("the proxy closed the connection")
            if status != 200:
                raise RuntimeError(f"{path}: status {status}")
            conn.start_next_cycle()
    finally:
        writer.close()


def load(port: int, path: str, requests: int, connections: int) -> None:
    async def run() -> None:
        share = [requests // connections + (i < requests % connections) for i in range(connections)]
        await asyncio.gather(*(_client(port, path, n) for n in share))

    asyncio.run(run())


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def total_ir(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def measure(
    work: Path,
    variant: str,
    launcher: str,
    workload: str,
    fleet: Fleet,
    config: Path,
    args: argparse.Namespace,
    before: Path | None,
) -> float:
    path, pool = WORKLOADS[workload]
    port = free_port()
    if launcher == "bare":
        cmd = [str(MITMDUMP), "--mode", f"reverse:{fleet[pool].url}@127.0.0.1:{port}", *COMMON]
    else:
        cmd = router_command(fleet["main"].url, port, config, COMMON, launcher=launcher)
    env = dict(os.environ)
    if before is not None:
        cmd = [str(before / "addons" / "router.py") if c.endswith("/addons/router.py") else c for c in cmd]
        env["PYTHONPATH"] = str(before / "addons")
    name = f"{workload}-{variant.replace(' ', '_').replace('+', 'and')}{'-before' if before else ''}"
    out = work / f"{name}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    with (work / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen([*valgrind, sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, proc, timeout=600)
        load(port, path, args.warmup, args.connections)
        time.sleep(1.0)
        callgrind_control("--instr=on", str(proc.pid))
        callgrind_control("--zero", str(proc.pid))
        load(port, path, args.requests, args.connections)
        callgrind_control("--dump", str(proc.pid))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    dumps = sorted(work.glob(f"{name}.callgrind.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"{variant}: no callgrind dump (see {work / name}.log)")
    return total_ir(dumps[0]) / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per variant")
    parser.add_argument("--warmup", type=int, default=100, help="requests before the measurement")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive client connections")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--before", metavar="REF", help="compare against commit REF (a git worktree of it)")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps and logs in DIR")
    args = parser.parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    results: dict[tuple[str, str, bool], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        with bench_upstreams(work, Path(tmp), args.before, {"interval": 3600}) as (fleet, config, before):
            for workload in args.workloads:
                for variant in args.variants:
                    # the before tree has no bare mitmdump of its own: the same mitmproxy
                    refs = [before] if before is not None and VARIANTS[variant] != "bare" else []
                    for ref in [*refs, None]:
                        ir = measure(work, variant, VARIANTS[variant], workload, fleet, config, args, ref)
                        results[(workload, variant, ref is not None)] = ir
                        label = f"{variant} ({args.before})" if ref is not None else variant
                        print(f"  {workload} {label}: {ir:,.0f} instructions/request", flush=True)
    print()
    print(f"{'workload':<9} {'proxy':<17} {'before Ir/req':>14} {'after Ir/req':>13} {'change':>7} {'vs bare':>8}")
    for workload in args.workloads:
        for variant in args.variants:
            after = results[(workload, variant, False)]
            was = results.get((workload, variant, True))
            change = f"{(after / was - 1) * 100:+.1f}%" if was else "-"
            was_text = f"{was:,.0f}" if was else "-"
            bare = results.get((workload, "mitmdump bare", False))
            ratio = f"{after / bare:.2f}x" if bare else "-"
            print(f"{workload:<9} {variant:<17} {was_text:>14} {after:>13,.0f} {change:>7} {ratio:>8}")


if __name__ == "__main__":
    main()
