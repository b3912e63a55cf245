#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs the project with its test dependencies.
# Idempotent: a second run only re-checks. Sourced by scripts/test and scripts/demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

find_python() {
    local candidate
    for candidate in python3.12 python3.13; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
            command -v "$candidate"; return
        fi
    done
    for candidate in /root/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
        if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
    echo "synapse-router needs Python >= 3.12 (mitmproxy 12); none found" >&2
    exit 1
}

if [ ! -x "$root/.venv/bin/python" ] || ! "$root/.venv/bin/python" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
    rm -rf "$root/.venv"
    "$(find_python)" -m venv "$root/.venv"
fi
stamp="$root/.venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$root/.venv/bin/pip" install -q --upgrade pip
    "$root/.venv/bin/pip" install -q -e "$root[test]"
    touch "$stamp"
fi
