"""`synapse-router`'s command line: mitmdump's, minus `-s`, plus `--processes N` and `--replace PID`.

The parser is mitmproxy's own `cmdline.mitmdump` over the options the lean addons define
(lean.py), so `--mode`/`-m`, `--set NAME=VALUE`, `-q`, `-v`, `--listen-host`, `-p`, `--options`,
a trailing flow filter, ... mean what they mean to mitmdump, and an option of an addon the
launcher does not load has no flag. `apply_options` applies `--set`, `~/.mitmproxy/config.yaml`
and the flags in mitmdump's order: an option of a left-out addon is an error on the command line
("Unknown option(s)"), never silently ignored, except the value the router would set anyway
(`--set block_global=false`, `anticache=false`, `anticomp=false`, as in a mitmdump command
line); in `~/.mitmproxy/config.yaml`, which mitmdump also reads, a warning.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from mitmproxy import exceptions, options, optmanager
from mitmproxy.tools import cmdline
from mitmproxy.tools import main as mitmproxy_main

from ..addon import REQUIRED_OPTIONS
from ..config import ConfigError, load_config
from ..tools.subcommands import SUBCOMMANDS

log = logging.getLogger(__name__)

PROG = "synapse-router"


def make_parser(opts: options.Options) -> argparse.ArgumentParser:
    """mitmdump's parser over the options the lean addons define (absent ones have no flag)."""
    parser = cmdline.mitmdump(opts)  # type: ignore[no-untyped-call]
    parser.prog = PROG
    parser.usage = "%(prog)s [--processes N] [--replace PID] [options] [filter]"
    parser.epilog = (
        "Subcommands (each with its own --help): `routes audit` checks the route table against the installed "
        "Synapse; `config from-synapse` and `config check` derive and check the router configuration from "
        "Synapse's. A first word that is not an option is a subcommand, never a flow filter."
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="Serve the listen port from N router processes (Linux SO_REUSEPORT). Default 1.",
    )
    parser.add_argument(
        "--replace",
        type=int,
        default=None,
        metavar="PID",
        help="Once this router serves, send SIGTERM to PID, the router on the same port it replaces, "
        "which drains (a rolling restart: no connection refused).",
    )
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def apply_options(opts: options.Options, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--set, ~/.mitmproxy/config.yaml and the flags, in mitmdump's order. Raises OptionsError."""
    _check_router_config(args.setoptions)
    # -q/-v before --set: mitmdump loads the router script after the flags have quietened the log.
    if args.quiet or args.verbose:
        opts.update(termlog_verbosity="debug" if args.verbose else "error")  # type: ignore[no-untyped-call]
    opts.set(*args.setoptions, defer=True)
    given = {spec.split("=", 1)[0] for spec in args.setoptions}
    for name in sorted(given & set(opts.deferred) & set(REQUIRED_OPTIONS)):
        value = str(REQUIRED_OPTIONS[name][0]).lower()
        if last_value(args.setoptions, name).lower() == value:
            # What the router would set anyway; without the addon that defines it, it is already so.
            del opts.deferred[name]
            log.info(f"{PROG}: {name}={value} holds without the addon that defines it; not loaded")
    unknown = sorted(given & set(opts.deferred))
    if unknown:
        raise exceptions.OptionsError(  # type: ignore[no-untyped-call]
            f"Unknown option(s): {', '.join(unknown)} ({PROG} loads only the addons a reverse router needs; "
            f"`{PROG} --options` lists its options)"
        )
    optmanager.load_paths(opts, os.path.join(opts.confdir, "config.yaml"), os.path.join(opts.confdir, "config.yml"))
    if opts.deferred:
        log.warning(f"{PROG}: ignoring option(s) of addons it does not load: {', '.join(sorted(opts.deferred))}")
        opts.deferred.clear()
    mitmproxy_main.process_options(parser, opts, args)  # type: ignore[no-untyped-call]
    if args.filter_args and args.filter_args[0] in SUBCOMMANDS:
        word = args.filter_args[0]
        raise exceptions.OptionsError(  # type: ignore[no-untyped-call]
            f"`{word}` is a subcommand: it comes first, before any option ({PROG} {word} --help); "
            f"as a flow filter, write it as '~u {word}'"
        )
    if args.filter_args:
        log.info(f'Only processing flows that match "{" & ".join(args.filter_args)}"')
        opts.update(dumper_filter=" ".join(args.filter_args))  # type: ignore[no-untyped-call]


def last_value(specs: Sequence[str], name: str) -> str:
    """The value the last `--set name[=value]` gives (a bare boolean name means true)."""
    value = ""
    for spec in specs:
        key, sep, text = spec.partition("=")
        if key == name:
            value = text if sep else "true"
    return value


def _check_router_config(specs: Sequence[str]) -> None:
    """Report a bad router_config before it is applied: the router's own OptionsError would be
    the same, but mitmproxy's rollback re-configures the router first, which logs misleading
    lines ("no router_config set", "loaded None")."""
    paths = [spec.split("=", 1)[1] for spec in specs if spec.startswith("router_config=")]
    if paths and paths[-1]:
        try:
            load_config(paths[-1])
        except ConfigError as e:
            raise exceptions.OptionsError(f"router_config {paths[-1]}: {e}") from e  # type: ignore[no-untyped-call]


def metrics_listen(argv: Sequence[str]) -> str | None:
    """`metrics.listen` of the router_config that `--set` gives on a command line, if any (a
    bad file is the children's to report)."""
    try:
        return configured_metrics_listen(argv)
    except ConfigError:
        return None


def configured_metrics_listen(argv: Sequence[str]) -> str | None:
    """`metrics.listen` of the router_config that `--set` gives on a command line (None: no
    file, or no metrics); raises ConfigError if the file cannot be read or is invalid."""
    specs = []
    arguments = iter(argv)
    for arg in arguments:
        if arg == "--set":
            specs.append(next(arguments, ""))
        elif arg.startswith("--set="):
            specs.append(arg.removeprefix("--set="))
    path = last_value(specs, "router_config")
    return load_config(path).metrics_listen if path else None


def without_processes(arguments: Sequence[str]) -> list[str]:
    """The command line without `--processes N` and `--replace PID` (what each child of the
    parent is given: the parent does both)."""
    out: list[str] = []
    skip = False
    for arg in arguments:
        if skip:
            skip = False
        elif arg in ("--processes", "--replace"):
            skip = True
        elif not arg.startswith(("--processes=", "--replace=")):
            out.append(arg)
    return out
