"""The linters the project holds itself to, run as tests so CI keeps them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_ruff_is_clean() -> None:
    run = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_mypy_strict_is_clean_on_the_package() -> None:
    run = subprocess.run([str(BIN / "mypy"), "addons"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
