"""The house rules, checked in CI: ruff, ruff format, strict mypy, import-linter layer contracts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "cmd",
    [
        (sys.executable, "-m", "ruff", "check", "appliance", "engines", "tests"),
        (sys.executable, "-m", "ruff", "format", "--check", "appliance", "engines", "tests"),
        (sys.executable, "-m", "mypy"),
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_clean(cmd: tuple[str, ...]) -> None:
    result = run(*cmd)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layer_contracts() -> None:
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency"
    result = run(exe)
    assert result.returncode == 0, result.stdout + result.stderr
