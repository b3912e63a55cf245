"""`synapse-router`: a lean launcher that embeds mitmproxy with only what a reverse router needs.

    synapse-router --mode reverse:http://MAIN:8008@8080 --set router_config=config/router.yaml
    synapse-router --processes 4 --mode reverse:http://MAIN:8008@8080 --set router_config=...
    synapse-router routes audit --synapse-python SYNAPSE_VENV/bin/python
    synapse-router config from-synapse homeserver.yaml worker1.yaml ... > router.yaml
    synapse-router config check router.yaml --synapse homeserver.yaml worker1.yaml ...

It takes mitmdump's command line (mitmproxy's own `cmdline.mitmdump` parser, so `--mode`/`-m`,
`--set NAME=VALUE`, `-q`, `-v`, `--listen-host`, `-p`, `--options`, a trailing flow filter, ...
mean what they mean to mitmdump) minus `-s`: the router is built in. Exits 1 with the message on a
bad option or `router_config`, prints each flow unless `-q`, and on SIGINT/SIGTERM drains (lets
every request in flight finish, up to `shutdown.grace`) and exits 0. `--replace PID`: once this
router serves, it sends SIGTERM to PID, the router on the same port it replaces (a rolling restart).

This module is the entry point only (`main`, and `python -m synapse_router.launcher.main`, which is
how a `--processes` parent starts its children). The rest, by concern:

    lean.py            the lean Master (nine addons, hook dispatch cached per event) and `serve`,
                       which runs one router process; why, and the mitmproxy internals it uses
    commandline.py     mitmdump's command line minus `-s` plus `--processes`; applying options
    supervisor.py      `--processes N`: the parent that starts, signals, reaps and restarts the
                       children
    applied.py         the configuration the parent applied, which every child reads
    childprocess.py    what a child does differently: its slot, the shared port (SO_REUSEPORT),
                       its own metrics port, dying with the parent, telling it "serving"
    processmetrics.py  the parent's metrics endpoint: the children's metrics merged
    ../tools/          `routes audit` and `config from-synapse|check` (subcommands.py): a first
                       word that is not an option is a subcommand
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..tools.subcommands import is_subcommand
from ..tools.subcommands import main as subcommand_main
from .applied import CONFIG_FLAG
from .childprocess import CHILD_FLAG, ChildSlot
from .commandline import PROG, without_processes
from .lean import LeanMaster, serve
from .supervisor import Supervisor

__all__ = ["LeanMaster", "main"]  # LeanMaster: also where tests/unit/test_limits.py imports it from


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `synapse-router`."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if is_subcommand(arguments):  # `routes audit`, `config ...`; any other word: exit 2, no proxy
        return subcommand_main(arguments)
    pre = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    pre.add_argument("--processes", type=int, default=1)
    pre.add_argument("--replace", type=int, default=None)
    pre.add_argument(CHILD_FLAG, type=ChildSlot.parse, default=None)
    pre.add_argument(CONFIG_FLAG, default=None)  # a child: the configuration its parent applied
    known, _ = pre.parse_known_args(arguments)
    if known.launcher_child is not None:
        child_argv = [a for a in arguments if not a.startswith((CHILD_FLAG, CONFIG_FLAG))]
        return serve(child_argv, known.launcher_child, known.launcher_config)
    if known.processes < 1:
        print(f"{PROG}: --processes must be at least 1", file=sys.stderr)
        return 2
    if known.processes == 1:
        return serve(arguments)
    if not sys.platform.startswith("linux"):
        print(f"{PROG}: --processes needs Linux (SO_REUSEPORT load balancing)", file=sys.stderr)
        return 2
    rest = without_processes(arguments)
    quiet = "-q" in rest or "--quiet" in rest
    return Supervisor(rest, known.processes, quiet, known.replace).run()


if __name__ == "__main__":
    sys.exit(main())
