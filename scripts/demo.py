"""Demo: the router in front of a Synapse with workers, showing where each request went.

    scripts/demo              real Synapse (main + 3 generic workers, PostgreSQL, Redis)
    scripts/demo --standins   loopback stand-ins that report what they received (seconds)

The router is a real `mitmdump -s addons/router.py`; its output goes to the demo's work dir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import Fleet, free_port, router_command, wait_for_port  # noqa: E402


def start_router(main_url: str, config: dict[str, Any], work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    config_path = work / "router.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = work / "router.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            router_command(main_url, port, config_path, []), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}", log_path


def standin_demo(work: Path) -> None:
    users = {f"token-{u}-{d}": f"@{u}:demo.local" for u in ("alice", "bob", "carol") for d in (1, 2, 3)}
    fleet = Fleet(work)
    try:
        fleet.add("main", whoami=users)
        for name in ("sync1", "sync2", "sync3", "reader1", "room1", "room2", "media1"):
            fleet.add(name)
        config = {
            "workers": {
                "sync": [fleet["sync1"].url, fleet["sync2"].url, fleet["sync3"].url],
                "client_reader": [fleet["reader1"].url],
                "room": [fleet["room1"].url, fleet["room2"].url],
                "media": [fleet["media1"].url],
            }
        }
        proc, url, log_path = start_router(fleet["main"].url, config, work)
        try:
            requests: list[tuple[str, str, str | None]] = []
            for user in ("alice", "bob", "carol"):
                for device in (1, 2, 3):
                    requests.append(("GET", "/_matrix/client/v3/sync?since=s1&timeout=0", f"token-{user}-{device}"))
            requests += [
                ("GET", "/_matrix/client/v3/rooms/!kitchen:demo.local/initialSync", "token-alice-1"),
                ("PUT", "/_matrix/client/v3/rooms/!kitchen:demo.local/send/m.room.message/t1", "token-alice-1"),
                ("PUT", "/_matrix/client/v3/rooms/!garden:demo.local/send/m.room.message/t2", "token-bob-1"),
                ("GET", "/_matrix/client/v3/rooms/!kitchen:demo.local/messages?dir=b", "token-carol-2"),
                ("GET", "/_matrix/client/versions", None),
                ("GET", "/_matrix/media/v3/download/demo.local/abc", None),
                ("POST", "/_matrix/client/unstable/org.matrix.msc4108/rendezvous", None),
                ("PUT", "/_matrix/client/v3/rooms/!kitchen:demo.local/typing/@alice:demo.local", "token-alice-1"),
            ]
            print(f"router {url} -> main {fleet['main'].url}\n")
            print(f"{'request':<78} {'token':<15} served by")
            with httpx.Client(base_url=url, timeout=10) as client:
                for method, path, token in requests:
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    response = client.request(method, path, headers=headers, content=b"{}" if method != "GET" else None)
                    server = response.json().get("server", f"HTTP {response.status_code}")
                    print(f"{method + ' ' + path:<78} {token or '-':<15} {server}")
            print(f"\nwhoami calls made by the router: {fleet['main'].stats()['whoami_calls']} for 9 tokens")
            print(f"router output: {log_path}")
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        fleet.stop()


def synapse_demo(work: Path) -> None:
    deploy = ROOT / "scripts" / "synapse_deploy.py"
    up = subprocess.run([sys.executable, str(deploy), "up"], check=True, stdout=subprocess.PIPE, text=True)
    info = json.loads(up.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from matrix_helpers import login, register_user, served_by  # type: ignore[import-not-found]

    workers = list(info["workers"].values())
    config = {"workers": {"sync": workers, "client_reader": workers[:1]}}
    proc, url, log_path = start_router(info["main"], config, work)
    try:
        users = [f"demo{int(time.time())}_{i}" for i in range(4)]
        for name in users:
            register_user(info["main"], info["registration_shared_secret"], name, "demo-password-1")
        print(f"router {url} -> main {info['main']}; sync workers {', '.join(info['workers'])}\n")
        with httpx.Client(base_url=url, timeout=30) as client:
            for name in users:
                for _device in range(2):
                    token, _ = login(url, name, "demo-password-1")
                    r = client.get("/_matrix/client/v3/sync?timeout=0", headers={"Authorization": f"Bearer {token}"})
                    r.raise_for_status()
        time.sleep(1)  # let Synapse flush its access logs
        print(f"{'user':<40} syncs served per process (from Synapse's own access logs)")
        for name in users:
            counts = served_by(info["logs"], f"@{name}:{info['server_name']}", "/sync")
            print(f"{'@' + name + ':' + info['server_name']:<40} {json.dumps({k: v for k, v in counts.items() if v})}")
        print(f"\nrouter output: {log_path}\nstop Synapse with: {sys.executable} {deploy} down")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--standins", action="store_true", help="use loopback stand-ins instead of real Synapse")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="synapse-router-demo-"))
    if args.standins or not (ROOT / "scripts" / "synapse_deploy.py").exists():
        standin_demo(work)
    else:
        synapse_demo(work)


if __name__ == "__main__":
    main()
