"""Other clients' requests while one address churns connections (issue 20).

    .venv/bin/python scripts/bench_churn.py [--seconds 20] [--churners 20] [--samples 20]
        [--launchers mitmdump,synapse-router] [--variants off,defaults]

Upstreams: stand-ins (tests/standin.py, real processes on loopback), main and one sync worker.
Per launcher and per variant, a router process runs with its default configuration
(`defaults`: the per-address bounds at their defaults) or with the per-address bounds made
too large to matter (`off`: as before they existed). A churn process (this script with
`--churn`) runs `--churners` tasks, each opening a connection from 127.0.0.2 and closing it at
once, as fast as it can, for `--seconds`; meanwhile, every `--seconds / --samples` seconds, a
separate `curl` process from 127.0.0.1 fetches `/_matrix/client/versions` on a new connection.

Printed per variant: curl's total time (median, 90th percentile, max; `timeout` = over 30 s),
the connections the churn opened per second and how many of them the router answered with a
reset at accept, the router's CPU seconds over the churn, and
`synapse_router_client_connections_closed_total` by reason from its metrics endpoint.
Every process this script starts is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import Fleet, free_port, router_command, wait_for_port  # noqa: E402

CHURN_SOURCE = "127.0.0.2"
OFF = {
    "max_connections_per_address": 1_000_000,
    "connection_rate_per_address": 1e9,
    "connection_burst_per_address": 1_000_000,
}


# --- the churn (runs in its own process) ----------------------------------------------------


async def churner(port: int, counts: list[int]) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(CHURN_SOURCE, 0))
        except OSError:
            counts[1] += 1
            await asyncio.sleep(0)
            continue
        counts[0] += 1
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def churn(port: int, tasks: int) -> None:
    counts = [0, 0]  # connections made, refused or reset at connect
    started = time.monotonic()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    running = [asyncio.create_task(churner(port, counts)) for _ in range(tasks)]
    await stop.wait()
    for task in running:
        task.cancel()
    print(json.dumps({"made": counts[0], "failed": counts[1], "seconds": time.monotonic() - started}), flush=True)


# --- the measurement ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def curl(port: int) -> float:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "30",
            "-w",
            "%{http_code} %{time_total}",
            f"http://127.0.0.1:{port}/_matrix/client/versions",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return float(out[1]) if out and out[0] == "200" else float("inf")


def closes(metrics_port: int) -> dict[str, int]:
    try:  # the router may still be working off the churn's backlog
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=120).text
    except httpx.HTTPError as e:
        return {"metrics unread": type(e).__name__}  # type: ignore[dict-item]
    out = {}
    for line in text.splitlines():
        if line.startswith("synapse_router_client_connections_closed_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            if (value := int(float(line.rsplit(" ", 1)[1]))) > 0:
                out[reason] = value
    return out


def measure(launcher: str, variant: str, args: argparse.Namespace, work: Path) -> str:
    fleet = Fleet(work)
    router_proc = churn_proc = None
    try:
        main = fleet.add("main")
        sync = fleet.add("sync")
        metrics_port = free_port()
        config = work / "router.yaml"
        doc: dict[str, object] = {"workers": {"sync": [sync.url]}, "metrics": {"listen": f"127.0.0.1:{metrics_port}"}}
        if variant == "off":
            doc["limits"] = OFF
        config.write_text(json.dumps(doc))
        port = free_port()
        cmd = router_command(main.url, port, config, ["--set", "flow_detail=0", "-q"], launcher=launcher)
        with (work / "router.log").open("wb") as out:
            router_proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for_port(port, router_proc, timeout=120)
        wait_for_port(metrics_port, router_proc, timeout=60)
        quiet = [curl(port) for _ in range(5)]
        cpu0 = cpu_seconds(router_proc.pid)
        churn_proc = subprocess.Popen(
            [sys.executable, __file__, "--churn", str(port), str(args.churners)], stdout=subprocess.PIPE, text=True
        )
        time.sleep(1)
        gap = args.seconds / args.samples
        times = []
        for _ in range(args.samples):
            times.append(curl(port))
            time.sleep(gap)
        churn_proc.send_signal(signal.SIGTERM)
        churn_out, _ = churn_proc.communicate(timeout=60)
        cpu = cpu_seconds(router_proc.pid) - cpu0
        stats = json.loads(churn_out.strip().splitlines()[-1])
        closed = closes(metrics_port)
        refused = closed.get("address_rate", 0) + closed.get("address_connections", 0)
        finite = sorted(times)
        p90 = finite[int(0.9 * (len(finite) - 1))]

        def fmt(value: float) -> str:
            return "timeout" if value == float("inf") else f"{value:.3f}"

        return (
            f"{launcher:15} {variant:9} quiet {statistics.median(quiet):.3f}  under churn: median "
            f"{fmt(statistics.median(finite))} p90 {fmt(p90)} max {fmt(finite[-1])} s; churn "
            f"{stats['made'] / stats['seconds']:.0f} conn/s ({stats['failed']} failed connects), "
            f"{refused} reset at accept; router CPU {cpu:.1f} s over {stats['seconds']:.0f} s; closed {closed}"
        )
    finally:
        for proc in (churn_proc, router_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        fleet.stop()


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--churn":
        asyncio.run(churn(int(sys.argv[2]), int(sys.argv[3])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--churners", type=int, default=20)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--launchers", default="mitmdump,synapse-router")
    parser.add_argument("--variants", default="off,defaults")
    args = parser.parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; churn from {CHURN_SOURCE}, curl from 127.0.0.1"
    )
    with tempfile.TemporaryDirectory(prefix="bench-churn-") as tmp:
        for launcher in args.launchers.split(","):
            for variant in args.variants.split(","):
                work = Path(tmp) / f"{launcher}-{variant}"
                work.mkdir()
                print(measure(launcher, variant, args, work), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
