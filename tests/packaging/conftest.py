"""Fixtures for the single-file launcher: the real packer, the real launcher built once, tiny trees to pack.

``packaging/payload.py`` is loaded from its path under a private module name: ``packaging`` is not a Python package
(PyPI's ``packaging`` owns that name), so it is never imported as ``packaging.payload``.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

PAYLOAD_PY = Path(__file__).resolve().parents[2] / "packaging" / "payload.py"

# The packed program: prints what the launcher handed it, one fact a line, so tests can read them back.
PROGRAM = """#!/bin/sh
for a in "$@"; do printf 'arg=%s\\n' "$a"; done
printf 'zero=%s\\n' "$0"
printf 'pid=%s\\n' "$$"
printf 'exe=%s\\n' "$APPLIANCE_EXECUTABLE"
printf 'unpacked=%s\\n' "$APPLIANCE_UNPACKED"
printf 'umask=%s\\n' "$(umask)"
case "$1" in
  --stdin) read -r line; printf 'stdin=%s\\n' "$line" ;;
  --exit) exit "$2" ;;
esac
"""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="session")
def payload() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_appliance_payload", PAYLOAD_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def launcher(payload: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _compiler() is None:
        pytest.skip("no C compiler (cc, gcc or $CC) to build the launcher with")
    out: Path = payload.compile_launcher(tmp_path_factory.mktemp("launcher") / "launcher")
    return out


@pytest.fixture
def cc() -> str:
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    return compiler


def make_tree(root: Path, marker: str = "") -> Path:
    """A tiny onedir-like tree: the program, a nested folder, a symlink, an executable bit, an empty file."""
    app = root / "app"
    (app / "lib" / "nested" / "deep").mkdir(parents=True)
    (app / "prog").write_text(PROGRAM)
    (app / "prog").chmod(0o755)
    (app / "lib" / "data.txt").write_text("compressible line of text\n" * 2000 + marker)
    (app / "lib" / "blob.bin").write_bytes(random.Random(marker).randbytes(4096))  # same tree, same build id
    (app / "lib" / "tool").write_text("#!/bin/sh\n")
    (app / "lib" / "tool").chmod(0o750)
    (app / "lib" / "nested" / "deep" / "empty").touch()
    (app / "lib" / "weights.gguf").write_bytes(b"\0" * 10000)
    (app / "link").symlink_to("lib/data.txt")
    return root


@dataclass
class Packed:
    """A packed file and where the tests' runs of it unpack."""

    file: Path
    build_id: str
    unpack_root: Path
    home: Path
    tmpdir: Path

    @property
    def build_dir(self) -> Path:
        return self.unpack_root / self.build_id

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "TMPDIR": str(self.tmpdir),
            "APPLIANCE_UNPACK_DIR": str(self.unpack_root),
            "APPLIANCE_LAUNCHER_VERBOSE": "1",
        }
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None, umask: int = 0o022) -> Run:
        done = subprocess.run(
            [str(self.file), *args],
            env=self.env() if env is None else env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            umask=umask,
        )
        return Run(done.returncode, done.stdout, done.stderr)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def facts(self, key: str) -> list[str]:
        """The values of the program's ``key=value`` lines."""
        return [line.split("=", 1)[1] for line in self.stdout.splitlines() if line.startswith(key + "=")]

    def fact(self, key: str) -> str:
        (value,) = self.facts(key)
        return value


@pytest.fixture
def pack_tree(payload: ModuleType, launcher: Path, tmp_path: Path) -> Callable[..., Packed]:
    """Pack a tree (a fresh tiny one unless given) into tmp_path; runs unpack under tmp_path too."""
    counter = iter(range(1000))

    def pack(tree: Path | None = None, program: str = "app/prog", marker: str = "") -> Packed:
        n = next(counter)
        if tree is None:
            tree = make_tree(tmp_path / f"tree{n}", marker)
        report = payload.pack(tree, program, launcher, tmp_path / f"appliance{n}", jobs=2)
        return Packed(report.out, report.build_id, tmp_path / "unpack", tmp_path / "home", tmp_path / "tmp")

    return pack
