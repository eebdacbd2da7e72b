"""The engines probe's answer, remembered between starts where nothing it reports can change.

The engines probe imports llama.cpp and onnxruntime and initialises their backends in a
subprocess: about a second of a two-core machine's start-up, for an answer that changes only when
the program, its native libraries, their environment variables or the machine change. So on a
machine with no GPU driver its answer is kept in a small JSON file, keyed by all of those (the
boot id stands for the machine: hardware is not swapped without a reboot). Where a GPU driver is
present the probe always runs, because what it reports there (devices, their free memory) is live;
``appliance doctor`` always probes afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import __version__

log = logging.getLogger(__name__)

# what changes the engines' answer besides their files: the forced CPU variant, a moved llama.cpp,
# the GPUs a runtime may see
ENV = (
    "APPLIANCE_CPU_VARIANT",
    "LLAMA_CPP_LIB_PATH",
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "GGML_BACKEND_PATH",
)
RUNTIMES = ("llama_cpp", "onnxruntime", "engines")  # engines: what the probe runs, and the shape it answers in


def _files(package: str) -> list[tuple[str, int, int]]:
    """Name, size and mtime of each file in a package's top folder and its native-library folders,
    found without importing it (importing is what the cache saves)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    found = []
    for folder in (root, root / "lib", root / "capi"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if entry.is_file():
                    st = entry.stat()
                    found.append((f"{folder.name}/{entry.name}", st.st_size, st.st_mtime_ns))
    return sorted(found)


def _machine() -> str:
    """The boot id where there is one (Linux): new after every reboot, so after any hardware change."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{platform.node()} {platform.platform()}"


def fingerprint() -> str:
    executable = Path(sys.executable).resolve()
    st = executable.stat()
    parts: dict[str, Any] = {
        "appliance": __version__,
        "executable": [str(executable), st.st_size, st.st_mtime_ns],
        "runtimes": {name: _files(name) for name in RUNTIMES},
        "env": {name: os.environ.get(name) for name in ENV},
        "machine": _machine(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load(path: Path, key: str) -> tuple[Any, str] | None:
    """The remembered answer and when it was probed, if ``path`` holds one for ``key``."""
    try:
        saved = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or "data" not in saved:
        return None
    return saved["data"], str(saved.get("probed_at", "?"))


def save(path: Path, key: str, data: Any) -> None:
    """Remember an answer; a cache that cannot be written only costs the next start its second."""
    record = {"key": key, "probed_at": datetime.now(UTC).isoformat(timespec="seconds"), "data": data}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(record, tmp)
        os.replace(tmp.name, path)
    except OSError as exc:
        log.debug("cannot remember the engines probe in %s: %s", path, exc)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp.name)
