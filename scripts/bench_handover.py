"""Connections lost when a listener hands its shared port over (`--replace`, a metrics move).

    .venv/bin/python scripts/bench_handover.py [--handovers 300] [--clients 8]

A metrics endpoint ("new") serves a loopback port with SO_REUSEPORT for the whole run; another
("old") is started on the same port and stopped, `--handovers` times, while `--clients` threads
open connections in a tight loop, each sending `GET /health` and reading until the server
closes. Each connection ends `ok` (answered 200), `unanswered` (closed with no answer), `reset`
or `refused`. Two variants in one run: the router's stop (compat.listening.close_listener) and
the same stop closing the listener as asyncio's `Server.close()` alone does, which drops a
connection the loop accepted in the turn before it. `net.ipv4.tcp_migrate_req` (Linux 5.14 and
later) is printed: at 1 the kernel moves what a closing listener still queues to the other.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addons"))
sys.path.insert(0, str(ROOT))

from synapse_router.compat import listening  # noqa: E402
from synapse_router.observability import metrics_server  # noqa: E402
from synapse_router.observability.metrics_server import MetricsServer  # noqa: E402

from tests.harness import free_port  # noqa: E402

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def connect_loop(port: int, outcomes: Counter[str], lock: threading.Lock, stop: threading.Event) -> None:
    while not stop.is_set():
        outcome = one_connection(port)
        with lock:
            outcomes[outcome] += 1


def one_connection(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return type(e).__name__
    if not received:
        return "unanswered"
    return "ok" if received.startswith(b"HTTP/1.1 200 ") else "other"


async def plain_close(server: asyncio.Server) -> list[socket.socket]:
    """What the stop did before close_listener: take the queue, then Server.close() at once."""
    sockets = [sock for sock in server.sockets if sock.type == socket.SOCK_STREAM]
    waiting = [conn for sock in sockets for conn in listening.accept_waiting(sock.fileno())]
    server.close()
    return waiting


@contextmanager
def variant(name: str) -> Iterator[None]:
    if name == "close_listener":
        yield
        return
    with mock.patch.object(metrics_server, "close_listener", plain_close):
        yield


async def run(variant_name: str, handovers: int, clients: int) -> tuple[Counter[str], float]:
    port = free_port()
    new = MetricsServer(lambda: b"", f"127.0.0.1:{port}")
    await new.start()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=connect_loop, args=(port, outcomes, lock, stop)) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        with variant(variant_name):
            for _ in range(handovers):
                old = MetricsServer(lambda: b"", f"127.0.0.1:{port}")
                await old.start()
                await asyncio.sleep(0.02)
                await old.stop()
    finally:
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        await new.stop()
    return outcomes, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--handovers", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    migrate = MIGRATE_REQ.read_text().strip() if MIGRATE_REQ.exists() else "absent"
    print(f"net.ipv4.tcp_migrate_req = {migrate}; {args.handovers} hand-overs, {args.clients} clients")
    print(f"{'stop':<16} {'connections':>11} {'ok':>7} {'unanswered':>10} {'reset':>6} {'refused':>7} {'seconds':>7}")
    for name in ("close_listener", "plain_close"):
        outcomes, seconds = asyncio.run(run(name, args.handovers, args.clients))
        total = sum(outcomes.values())
        others = {k: v for k, v in outcomes.items() if k not in ("ok", "unanswered", "reset", "refused")}
        print(
            f"{name:<16} {total:>11,} {outcomes['ok']:>7,} {outcomes['unanswered']:>10,} {outcomes['reset']:>6,} "
            f"{outcomes['refused']:>7,} {seconds:>7.1f}" + (f"  {others}" if others else "")
        )


if __name__ == "__main__":
    main()
