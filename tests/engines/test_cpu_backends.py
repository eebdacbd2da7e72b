"""Choosing ggml's CPU variant: the best this CPU can run, or the forced one, with clear errors.

The variant libraries here are real shared libraries compiled for the test, each exporting
``ggml_backend_score`` as ggml's do; only ggml's backend registry is stood in for (it would
register real backends into the process). The real variants are loaded by the single
executable's tests (tests/packaging/test_executable.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engines.cpu_backends import BUILT_IN, CpuBackendError, find_variants, load_backends

SCORES = {"low": 10, "high": 50, "future": 0}  # "future": needs instructions this CPU lacks


def _library(directory: Path, stem: str, score: int) -> None:
    source = directory / f"{stem}.c"
    source.write_text(f"int ggml_backend_score(void) {{ return {score}; }}\n")
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(directory / f"lib{stem}.so"), str(source)], check=True, timeout=60
    )
    source.unlink()


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the stand-in variant libraries")
    directory = tmp_path_factory.mktemp("lib")
    for name, score in SCORES.items():
        _library(directory, f"ggml-cpu-{name}", score)
    _library(directory, "ggml-base", 99)  # not a variant: never scored or loaded
    _library(directory, "ggml-cuda", 1)  # a GPU backend module: loaded beside the CPU variant
    return directory


class Registry:
    """ggml's backend registry, as far as load_backends uses it."""

    def __init__(self, registered: int = 0, refuse: tuple[str, ...] = ()) -> None:
        self.registered = registered
        self.refuse = refuse
        self.loaded: list[str] = []

        def reg_count() -> int:
            return self.registered

        def load(path: bytes) -> int:
            name = Path(path.decode()).name
            if name in self.refuse:
                return 0
            self.loaded.append(name)
            self.registered += 1
            return 1

        self.ggml_backend_reg_count: Any = reg_count
        self.ggml_backend_load: Any = load


def test_variants_are_ranked_by_their_own_score(lib_dir: Path) -> None:
    assert [(v.name, v.score) for v in find_variants(lib_dir)] == [("high", 50), ("low", 10), ("future", 0)]


def test_the_best_variant_and_the_gpu_modules_are_loaded(lib_dir: Path) -> None:
    ggml = Registry()
    chosen = load_backends(ggml, lib_dir, forced=None)
    assert chosen.cpu_variant == "high" and not chosen.forced
    assert chosen.usable == ("high", "low")
    assert ggml.loaded == ["libggml-cpu-high.so", "libggml-cuda.so"]
    assert chosen.others == ("libggml-cuda.so",)


def test_a_forced_lower_variant_is_loaded(lib_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_CPU_VARIANT", "low")
    ggml = Registry()
    chosen = load_backends(ggml, lib_dir)
    assert chosen.cpu_variant == "low" and chosen.forced
    assert ggml.loaded[0] == "libggml-cpu-low.so"


@pytest.mark.parametrize(
    ("forced", "message"),
    [
        ("pentium", "APPLIANCE_CPU_VARIANT=pentium: no such CPU variant; the build has high, low, future"),
        ("future", "APPLIANCE_CPU_VARIANT=future: this CPU cannot run it"),
    ],
)
def test_a_forced_variant_that_cannot_run_is_refused(lib_dir: Path, forced: str, message: str) -> None:
    ggml = Registry()
    with pytest.raises(CpuBackendError, match=message):
        load_backends(ggml, lib_dir, forced=forced)
    assert ggml.loaded == []


def test_a_cpu_below_every_variant_is_told_what_it_needs(tmp_path: Path, lib_dir: Path) -> None:
    shutil.copy(lib_dir / "libggml-cpu-future.so", tmp_path)
    with pytest.raises(CpuBackendError, match="needs an x86-64 CPU with AVX2"):
        load_backends(Registry(), tmp_path, forced=None)


def test_a_build_without_variants_says_so(tmp_path: Path) -> None:
    with pytest.raises(CpuBackendError, match="no CPU backend library"):
        load_backends(Registry(), tmp_path, forced=None)


def test_a_variant_ggml_cannot_load_is_an_error(lib_dir: Path) -> None:
    with pytest.raises(CpuBackendError, match=r"could not load libggml-cpu-high\.so"):
        load_backends(Registry(refuse=("libggml-cpu-high.so",)), lib_dir, forced=None)


def test_a_build_with_the_cpu_linked_in_loads_nothing(lib_dir: Path) -> None:
    ggml = Registry(registered=1)  # pip's native build: the CPU backend registered itself
    assert load_backends(ggml, lib_dir, forced="low").cpu_variant == BUILT_IN
    assert ggml.loaded == []


def test_the_pip_build_reports_its_cpu_code_as_built_in() -> None:
    from engines import gguf

    caps = gguf.capabilities()
    assert caps.installed and caps.cpu_variant == BUILT_IN
