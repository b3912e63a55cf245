"""The one configuration source of `synapse-router --processes N`: the configuration applied.

The parent reads the operator's file (`--set router_config=PATH`) at start and on each SIGHUP,
the way every process reads a file (config.read_config: a byte that is not UTF-8 is a
configuration error like a YAML typo). Only a file that reads and parses whole is applied: its
exact bytes are written to a private file (a directory of the parent's own, mode 0700, replaced
atomically), and every child reads that file, never the operator's path: at its start (a
process restarted after it died included) and on each reload the parent forwards to it. So:

- a process restarted after an edit that was not reloaded runs what its siblings run, not the
  edited file alone, and a file that does not parse cannot make it crash-loop;
- a reload with a bad file is refused once, by the parent, which keeps the last good
  configuration and does not signal the children (they keep it too);
- the parent and its children never disagree on a file edited between their reads.

A child is told where the applied file is by a hidden `--launcher-config=FILE` flag; it still
names the operator's path in its log lines (`loaded config/router.yaml`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

from ..config import RouterConfig, load_config, read_config

CONFIG_FLAG = "--launcher-config"


class AppliedConfig:
    """The parent's view: the operator's `path`, and the private `file` its children read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._directory = tempfile.mkdtemp(prefix="synapse-router-")  # mode 0700
        self.file = os.path.join(self._directory, "router.yaml")
        self.config: RouterConfig | None = None  # the configuration applied (None: none yet)

    def refresh(self) -> RouterConfig:
        """Read the operator's file and, if it is a valid configuration, make it the applied
        one; raises ConfigError (and keeps the applied one) if it is not."""
        raw, config = read_config(self.path)
        partial = self.file + ".new"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        os.replace(partial, self.file)  # a child starting now reads the old file or the new, whole
        self.config = config
        return config

    def flag(self) -> str:
        return f"{CONFIG_FLAG}={self.file}"

    def close(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)


def applied_loader(operator_path: str, applied_file: str) -> Callable[[str], RouterConfig]:
    """What a child loads a configuration path with: the operator's path means the applied
    file (any other path, set at run time, is read as it is)."""

    def load(path: str) -> RouterConfig:
        return load_config(applied_file if path == operator_path else path)

    return load
