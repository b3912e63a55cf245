"""Peak memory of the proxy process with many concurrent large answers, side by side in one run.

    .venv/bin/python scripts/bench_memory.py [--clients 50] [--mib 60] [--before REF --before-clients 12]

For each proxy (`synapse-router`, `mitmdump -s addons/router.py`, nginx `proxy_pass` with a
private config and prefix in a temp dir; with `--before REF` also mitmdump with that commit's
addon, from a git worktree), N clients at once each fetch an M MiB answer through it from a
loopback stand-in worker (`tests/standin.py`, chunked as Synapse answers JSON), first N GETs of
`/rooms/{id}/messages` (a request the router sends itself, resent on failure), then N POSTs to
`/rooms/{id}/send/...` (sent once). nginx keeps its default proxy_buffers (8 x 4 KiB) and
`proxy_max_temp_file_size 0`, so it holds answers in memory only, as the router does. Every
body is read to its end and its length checked.
Printed per proxy and method: the process's RSS before the load (after one warm-up request),
its peak RSS (VmHWM; for nginx the sum over master and worker), the peak growth divided by the
number of exchanges, and the wall time. The router runs with its default limits
(`limits.response_buffer` 256 KiB, `limits.buffer_budget` 64 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_e2e import ensure_nginx  # noqa: E402

from tests.harness import BIN, MITMDUMP, Fleet, free_port, wait_for_port  # noqa: E402

ROOM = "!room:bench.local"
MIB = 1024 * 1024


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


async def fetch(port: int, method: str, path: str, body: bytes) -> int:
    """One request on its own connection; the body's length (read to its end, dropped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode() + body)
    raw_head = await reader.readuntil(b"\r\n\r\n")
    fields = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(b":") for line in raw_head.split(b"\r\n")[1:] if line)
    }
    status = int(raw_head.split(b" ", 2)[1])
    size = 0
    if fields.get(b"transfer-encoding") == b"chunked":
        while True:
            length = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if length == 0:
                await reader.readuntil(b"\r\n")
                break
            remaining = length
            while remaining:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    raise ConnectionError("cut mid-chunk")
                remaining -= len(data)
            size += length
            await reader.readexactly(2)
    else:
        remaining = int(fields.get(b"content-length", b"0"))
        while remaining:
            data = await reader.read(min(remaining, 1 << 20))
            if not data:
                raise ConnectionError("cut mid-body")
            remaining -= len(data)
            size += len(data)
    writer.close()
    if status != 200:
        raise RuntimeError(f"status {status}")
    return size


async def load(port: int, clients: int, method: str, size: int) -> list[int | BaseException]:
    if method == "GET":
        path, body = f"/_matrix/client/v3/rooms/{ROOM}/messages?standin_bytes={size}&standin_chunked=1", b""
    else:
        path = f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message?standin_bytes={size}&standin_chunked=1"
        body = b'{"msgtype": "m.text", "body": "x"}'
    return await asyncio.gather(*(fetch(port, method, path, body) for _ in range(clients)), return_exceptions=True)


@contextmanager
def proxy(
    kind: str, before: Path | None, fleet: Fleet, work: Path, limits: dict[str, int]
) -> Iterator[tuple[int, int]]:
    """Start one proxy in front of the stand-in; yields (its port, its pid)."""
    port = free_port()
    config = work / "router.yaml"
    config.write_text(yaml.safe_dump({"workers": {"room": [fleet["w1"].url]}} | ({"limits": limits} if limits else {})))
    log = (work / f"{kind}.log").open("wb")
    main = fleet["main"].url
    if kind == "nginx":
        binary = ensure_nginx()
        if binary is None:
            raise RuntimeError("nginx is missing (apt-get install nginx-light)")
        prefix = work / "nginx"
        prefix.mkdir(exist_ok=True)
        worker = fleet["w1"].url.removeprefix("http://")
        (prefix / "nginx.conf").write_text(
            f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream worker {{ server {worker}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;  # buffered in memory only (proxy_buffers), no temp files
        }}
    }}
}}
"""
        )
        command = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    else:
        addon = (before or ROOT) / "addons" / "router.py"
        launcher = [str(BIN / "synapse-router")] if kind == "synapse-router" else [str(MITMDUMP), "-s", str(addon)]
        command = [*launcher, "-q", "--mode", f"reverse:{main}@127.0.0.1:{port}", "--set", f"router_config={config}"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        wait_for_port(port, proc)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM if kind != "nginx" else signal.SIGQUIT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def peak_kib(kind: str, pid: int) -> int:
    pids = [pid, *children(pid)] if kind == "nginx" else [pid]
    return sum(vm_hwm_kib(p) for p in pids)


def rss_kib(kind: str, pid: int) -> int:
    pids = [pid, *children(pid)] if kind == "nginx" else [pid]
    return sum(vm_rss_kib(p) for p in pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--mib", type=int, default=60)
    parser.add_argument("--before", help="also run mitmdump with this commit's addon (e.g. main)")
    parser.add_argument("--before-clients", type=int, default=12, help="clients for --before (it holds each answer)")
    parser.add_argument("--only", nargs="*", help="proxies to run: synapse-router mitmdump nginx before")
    parser.add_argument("--response-buffer", type=int, help="the router's limits.response_buffer (bytes)")
    parser.add_argument("--buffer-budget", type=int, help="the router's limits.buffer_budget (bytes)")
    args = parser.parse_args()
    limits = {
        key: value
        for key, value in (("response_buffer", args.response_buffer), ("buffer_budget", args.buffer_budget))
        if value is not None
    }
    size = args.mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        work = Path(scratch)
        before = None
        if args.before:
            before = work / "before"
            add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before]
            subprocess.run(add, check=True)
        fleet = Fleet(work)
        try:
            fleet.add("main")
            fleet.add("w1")
            kinds = ["synapse-router", "mitmdump", "nginx"] + (["before"] if before else [])
            kinds = [kind for kind in kinds if not args.only or kind in args.only]
            print(f"{args.clients} concurrent {args.mib} MiB answers per method, each on its own connection")
            if limits:
                print(f"router limits: {limits}")
            columns = ("proxy", "method", "clients", "RSS before MiB", "peak RSS MiB", "peak growth per exchange MiB")
            print("| " + " | ".join(columns) + " | seconds |")
            print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
            for kind in kinds:
                clients = args.before_clients if kind == "before" else args.clients
                for method in ("GET", "POST"):
                    variant = ("mitmdump", before) if kind == "before" else (kind, None)
                    with proxy(*variant, fleet, work, limits) as (port, pid):
                        name = "nginx" if kind == "nginx" else kind
                        asyncio.run(load(port, 1, method, 1024))  # warm up: routes, connections
                        start_rss = rss_kib(name, pid)
                        started = time.monotonic()
                        results = asyncio.run(load(port, clients, method, size))
                        elapsed = time.monotonic() - started
                        peak = peak_kib(name, pid)
                    failed = [r for r in results if not isinstance(r, int) or r != size]
                    label = f"mitmdump + addon at {args.before}" if kind == "before" else kind
                    if kind == "mitmdump":
                        label = "mitmdump + addon"
                    print(
                        f"| {label} | {method} | {clients} | {start_rss / 1024:.0f} | {peak / 1024:.0f} | "
                        f"{(peak - start_rss) / 1024 / clients:.2f} | {elapsed:.1f} |"
                        + (f" {len(failed)} failed: {failed[:2]!r}" if failed else ""),
                        flush=True,
                    )
        finally:
            fleet.stop()
            if before is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a SIGTERM still stops what it started
    main()
