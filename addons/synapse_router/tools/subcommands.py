"""`synapse-router`'s subcommands: `routes audit`, `config from-synapse`, `config check`.

A command line whose first word is not an option is a subcommand: one of `SUBCOMMANDS`, each
with its own `--help`; any other word is an error (exit 2), never a proxy. Every other command
line (`synapse-router [mitmdump options] [filter]`) runs the router as before (launcher.py).
Exit status: 0 nothing to report, 1 findings (misroutes, disagreements), 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..config import ConfigError, RouterConfig, load_config
from ..routing.routes import RouteTable
from .audit import audit, introspect, parse_servlets
from .synapse_config import SynapseConfigError, check, read_deployment, router_yaml

PROG = "synapse-router"
SUBCOMMANDS = ("routes", "config")


def is_subcommand(arguments: Sequence[str]) -> bool:
    """A first word that is not an option: a subcommand (known or not)."""
    return bool(arguments) and not arguments[0].startswith("-")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Without a subcommand, synapse-router runs the router (synapse-router --help).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{routes,config}")
    routes = commands.add_parser("routes", help="the route table").add_subparsers(
        dest="action", required=True, metavar="{audit}"
    )
    audit_parser = routes.add_parser(
        "audit",
        help="check the route table against the servlets the installed Synapse registers",
        description="Enumerate the servlets each kind of Synapse process registers (main, client, federation, "
        "media and stream-writer workers), run by Synapse's own interpreter, and check every one against the "
        "route table: each path must go to a kind of process that registers it for that method, stream-writer "
        "writes to their writer pool. Prints the misrouted paths and the servlets no route or main covers; "
        "exits 1 if there are any.",
    )
    source = audit_parser.add_mutually_exclusive_group()
    source.add_argument(
        "--synapse-python",
        metavar="PYTHON",
        default=os.environ.get("SYNAPSE_PYTHON"),
        help="the Python interpreter Synapse is installed in (default: $SYNAPSE_PYTHON)",
    )
    source.add_argument("--servlets", metavar="JSON", type=Path, help="servlets saved earlier (--save-servlets)")
    audit_parser.add_argument("--save-servlets", metavar="JSON", type=Path, help="also write Synapse's servlets here")
    audit_parser.add_argument(
        "--router-config", metavar="YAML", help="audit with this configuration's custom routes (tried first)"
    )
    audit_parser.add_argument("--json", action="store_true", help="print the findings as JSON")

    config = commands.add_parser("config", help="the router's configuration and Synapse's").add_subparsers(
        dest="action", required=True, metavar="{from-synapse,check}"
    )
    from_synapse = config.add_parser(
        "from-synapse",
        help="write a router configuration from Synapse's configuration files",
        description="Write a router YAML whose pools come from Synapse's configuration: stream writers exactly as "
        "stream_writers says, the other workers by name or listener (docs/synapse-tools.md).",
    )
    from_synapse.add_argument("homeserver", help="homeserver.yaml")
    from_synapse.add_argument("workers", nargs="*", help="the worker configuration files")
    from_synapse.add_argument("-o", "--output", type=Path, help="write here instead of standard output")
    checker = config.add_parser(
        "check",
        help="report every disagreement between a router configuration and Synapse's files",
        description="Report every disagreement: a writer pool that is not the stream writer, a pool worker whose "
        "listener lacks the resource its pool needs (client, federation, media), a router URL no worker listens "
        "on, a worker with no pool. Exits 1 if there is any.",
    )
    checker.add_argument("router_config", help="the router's YAML")
    checker.add_argument(
        "--synapse", nargs="+", required=True, metavar="YAML", help="homeserver.yaml, then the worker configurations"
    )
    return parser


def main(arguments: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = make_parser()
    args = parser.parse_args(arguments)  # exits 2 on an unknown word, 0 after --help
    try:
        if args.command == "routes":
            return _audit(parser, args, out)
        if args.action == "from-synapse":
            text = router_yaml(read_deployment(args.homeserver, args.workers), [args.homeserver, *args.workers])
            if args.output:
                args.output.write_text(text, encoding="utf-8")
            else:
                out.write(text)
            return 0
        problems = check(_router_config(args.router_config), read_deployment(args.synapse[0], args.synapse[1:]))
        for problem in problems:
            out.write(f"{problem}\n")
        out.write(f"{len(problems)} disagreement(s) between {args.router_config} and Synapse's configuration\n")
        return 1 if problems else 0
    except (ValueError, OSError) as e:  # ConfigError, SynapseConfigError, bad JSON: the message names it
        err.write(f"{PROG}: {e}\n")
        return 2


def _router_config(path: str) -> RouterConfig:
    """The router's configuration; its errors name the file (several files are read here)."""
    try:
        return load_config(path)
    except ConfigError as e:
        raise ValueError(f"{path}: {e}") from None


def _audit(parser: argparse.ArgumentParser, args: argparse.Namespace, out: TextIO) -> int:
    if args.servlets:
        data = json.loads(args.servlets.read_text(encoding="utf-8"))
    elif args.synapse_python:
        data = introspect(args.synapse_python)
    else:
        parser.error("routes audit: give --synapse-python (or $SYNAPSE_PYTHON) or --servlets")
    if args.save_servlets:
        args.save_servlets.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    version, servlets = parse_servlets(data)
    table = RouteTable(_router_config(args.router_config).routes) if args.router_config else RouteTable()
    report = audit(version, servlets, table)
    if args.json:
        findings = {
            "synapse_version": report.synapse_version,
            "misrouted": [f.line() for f in report.misrouted],
            "uncovered": [f.line() for f in report.uncovered],
            "unsampled": report.unsampled,
            "stale": report.stale,
        }
        out.write(json.dumps(findings, indent=1) + "\n")
    else:
        out.write("\n".join(report.lines()) + "\n")
    return 0 if report.ok else 1


__all__ = ["ConfigError", "SynapseConfigError", "is_subcommand", "main"]
