"""Router memory per upload waiting for its address's turn (request pacing), per launcher.

    .venv/bin/python scripts/bench_waiting_uploads.py [--uploads 400] [--size 1000000]
        [--launchers synapse-router,mitmdump]

For each launcher: stand-in main and sync workers, a router paced at 0.1 request per second per
address (burst 1, no refusal), one request to spend the burst, then `--uploads` PUTs of `--size`
bytes from the same address, each on its own connection, each sending as much of its body as
the kernel takes without blocking. Every one of them waits for its turn, which is minutes
away. The router's RSS is read from /proc before, with the uploads waiting (2 s after the last
is sent), and 3 s after their clients closed; the figure is the growth per upload still
waiting (an upload whose turn is beyond `request_delay_max`, the 361st on, is answered 429 at
once and its connection closed: those are counted and left out).
"""

from __future__ import annotations

import argparse
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import Fleet, RouterStarter, read_response  # noqa: E402

LIMITS = {
    "request_rate_per_address": 0.1,
    "request_burst_per_address": 1,
    "request_delay_max": 3600,
    "max_connections_per_address": 100_000,
    "connection_burst_per_address": 100_000,
}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def upload(port: int, index: int, size: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"PUT /_matrix/client/v3/rooms/!r:x/send/m.room.message/t{index} HTTP/1.1\r\nHost: m\r\n"
    sock.sendall(f"{head}Content-Length: {size}\r\n\r\n".encode())
    sock.setblocking(False)
    chunk, sent = b"x" * 65536, 0
    try:
        while sent < size:
            sent += sock.send(chunk[: size - sent])
    except BlockingIOError:
        pass
    return sock


def answered(sock: socket.socket) -> bool:
    """Whether the router answered (a 429: the upload's turn was beyond request_delay_max)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(16).startswith(b"HTTP/1.1 429")
    except OSError:
        return False


def run(launcher: str, uploads: int, size: int) -> tuple[float, float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fleet = Fleet(work)
        starter = RouterStarter(work)
        try:
            fleet.add("main")
            fleet.add("sync")
            config = {"workers": {"sync": [fleet["sync"].url]}, "limits": LIMITS}
            router = starter(fleet["main"].url, config, launcher=launcher)
            with socket.create_connection(("127.0.0.1", router.port)) as sock:  # the burst
                sock.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: m\r\n\r\n")
                read_response(sock)
            time.sleep(1)
            before = rss_mib(router.proc.pid)
            socks = [upload(router.port, i, size) for i in range(uploads)]
            time.sleep(2)
            waiting = rss_mib(router.proc.pid)
            refused = sum(answered(sock) for sock in socks)
            for sock in socks:
                sock.close()
            time.sleep(3)
            return before, waiting, rss_mib(router.proc.pid), uploads - refused
        finally:
            starter.stop_all()
            fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=400)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--launchers", default="synapse-router,mitmdump")
    args = parser.parse_args()
    print(f"{args.uploads} waiting uploads of {args.size:,} bytes each, one address")
    print("| launcher | RSS before | with them waiting | per waiting upload | 3 s after they left |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for launcher in args.launchers.split(","):
        before, waiting, after, held = run(launcher, args.uploads, args.size)
        per = (waiting - before) * 1024 / max(1, held)
        print(
            f"| {launcher} ({held} waiting) | {before:.0f} MiB | {waiting:.0f} MiB | {per:.0f} KiB | {after:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
