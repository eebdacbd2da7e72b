"""ggml's CPU code chosen for this CPU, for llama.cpp builds whose backends are separate libraries.

A pip install compiles llama.cpp for the CPU it is built on, with the CPU backend linked in: it
dies with "illegal instruction" on an older CPU. The single executable must run on any x86-64 CPU
with AVX2 and still use AVX-512 or AMX where they are, so it is built with ``GGML_BACKEND_DL``: one
CPU library per instruction-set level (``libggml-cpu-haswell.so`` ... ``-sapphirerapids.so``) beside
libllama, and none linked in.

ggml can pick one itself (``ggml_backend_load_all``), but it looks in the executable's folder and
the current directory, neither of which is where the bundle keeps its libraries, and a library
planted in the current directory would be loaded. So this module scores each variant in
llama-cpp-python's own library folder (each exports ``ggml_backend_score``: 0 when this CPU lacks
an instruction it needs), loads the best, or the one ``APPLIANCE_CPU_VARIANT`` names, and says
which, so ``appliance doctor`` can name it and a test can force a lower one.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import EngineError, ModelLoadError

CPU_VARIANT_ENV = "APPLIANCE_CPU_VARIANT"  # e.g. "haswell": load that CPU variant instead of the best
BUILT_IN = "built in"  # a build with the CPU backend linked in (pip's native build): nothing to choose


class CpuBackendError(ModelLoadError):
    """No CPU code in the build can run here, or the forced variant cannot: no model can load."""

    def __init__(self, lib_dir: Path, reason: str) -> None:
        EngineError.__init__(self, f"llama.cpp's CPU code in {lib_dir}: {reason}")
        self.path = str(lib_dir)
        self.reason = reason


@dataclass(frozen=True)
class CpuVariant:
    name: str  # the tag after "ggml-cpu-": haswell, skylakex, sapphirerapids...
    path: Path
    score: int  # ggml's own ranking; 0: this CPU cannot run it


@dataclass(frozen=True)
class BackendSelection:
    """What was loaded, for the hardware report."""

    cpu_variant: str  # a variant's name, or BUILT_IN
    usable: tuple[str, ...] = ()  # every variant this CPU can run, best first
    forced: bool = False
    others: tuple[str, ...] = ()  # other backends loaded from the folder (cuda, vulkan...)


# how ggml names a backend library: ggml-cpu-haswell.dll, else libggml-cpu-haswell.so (macOS too)
_PREFIX, _SUFFIX = ("", ".dll") if sys.platform == "win32" else ("lib", ".so")


def _library_name(stem: str) -> str:
    return f"{_PREFIX}{stem}{_SUFFIX}"


def find_variants(lib_dir: Path) -> list[CpuVariant]:
    """Every CPU variant in ``lib_dir`` with its score, best first; loading one only to call its score
    function is safe on any CPU (ggml compiles that function for the baseline, and does the same)."""
    found = []
    for path in sorted(lib_dir.glob(_library_name("ggml-cpu-*"))):
        name = path.name.removeprefix(_PREFIX + "ggml-cpu-").removesuffix(_SUFFIX)
        try:
            score = int(ctypes.CDLL(str(path)).ggml_backend_score())
        except (OSError, AttributeError):  # unloadable, or not a ggml backend: never chosen
            score = 0
        found.append(CpuVariant(name, path, score))
    return sorted(found, key=lambda v: -v.score)


def _other_backends(lib_dir: Path) -> list[Path]:
    """GPU backends built as modules (``libggml-cuda.so``): everything ``ggml-*`` but the CPU, ggml
    itself and its base library."""
    skip = (_library_name("ggml-base"), _library_name("ggml"))
    return [p for p in sorted(lib_dir.glob(_library_name("ggml-*"))) if "ggml-cpu" not in p.name and p.name not in skip]


def load_backends(ggml: Any, lib_dir: Path, forced: str | None = None) -> BackendSelection:
    """Register the CPU variant (and any GPU backend modules) of a ``GGML_BACKEND_DL`` build.

    ``ggml`` is libggml through ctypes. Call before ``llama_backend_init``: once a backend is
    registered, llama.cpp no longer searches the executable's folder and the working directory.
    A build with backends linked in has them registered already: nothing is loaded then.
    """
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load.argtypes, ggml.ggml_backend_load.restype = [ctypes.c_char_p], ctypes.c_void_p
    if ggml.ggml_backend_reg_count() > 0:
        return BackendSelection(cpu_variant=BUILT_IN)
    forced = forced if forced is not None else os.environ.get(CPU_VARIANT_ENV) or None
    variants = find_variants(lib_dir)
    usable = [v for v in variants if v.score > 0]
    if not variants:
        raise CpuBackendError(lib_dir, "this llama.cpp build has no CPU backend library (libggml-cpu-*) beside it")
    if forced:
        chosen = next((v for v in variants if v.name == forced), None)
        if chosen is None:
            raise CpuBackendError(
                lib_dir, f"{CPU_VARIANT_ENV}={forced}: no such CPU variant; the build has {_names(variants)}"
            )
        if chosen.score == 0:
            raise CpuBackendError(
                lib_dir,
                f"{CPU_VARIANT_ENV}={forced}: this CPU cannot run it (it lacks an instruction the variant "
                f"needs); usable here: {_names(usable) or 'none'}",
            )
    elif usable:
        chosen = usable[0]
    else:
        raise CpuBackendError(
            lib_dir,
            f"this CPU cannot run any CPU variant of the build ({_names(variants)}); the single "
            "executable needs an x86-64 CPU with AVX2 (Intel Haswell, AMD Excavator or newer): "
            "install from source with pip instead, which compiles for this CPU",
        )
    if not ggml.ggml_backend_load(str(chosen.path).encode()):
        raise CpuBackendError(lib_dir, f"ggml could not load {chosen.path.name}")
    others = tuple(p.name for p in _other_backends(lib_dir) if ggml.ggml_backend_load(str(p).encode()))
    return BackendSelection(
        cpu_variant=chosen.name, usable=tuple(v.name for v in usable), forced=bool(forced), others=others
    )


def _names(variants: list[CpuVariant]) -> str:
    return ", ".join(v.name for v in variants)
