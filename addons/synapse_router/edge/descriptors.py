"""The process's open-files limit: raised to its hard limit at start-up, so that
`limits.max_connections` client connections and their upstream connections fit."""

from __future__ import annotations

import resource


def raise_nofile_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force
    (None where it cannot be read)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # e.g. an infinite hard limit above the kernel's nr_open
            pass
    return None if soft == resource.RLIM_INFINITY else soft
