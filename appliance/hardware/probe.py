"""One probe, run in its own short-lived process: ``python -m appliance.hardware.probe NAME``.

A driver that hangs or crashes takes this process down, not the server: ``detect`` kills it at
its timeout and reports what happened. The result is one JSON line on stdout after a marker, so
whatever a native library prints there cannot be mistaken for it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from appliance.hardware.facts import PlatformAbsentError

MARKER = "APPLIANCE-PROBE-RESULT "
NAMES = ("cpu", "nvidia", "rocm", "metal", "engines")


def _gather(name: str) -> tuple[Any, str]:
    if name == "cpu":
        from appliance.hardware.cpu import probe_cpu

        facts = probe_cpu()
        return facts.model_dump(), facts.source
    if name == "engines":
        from engines import gguf, onnx

        found = [gguf.capabilities(), onnx.capabilities()]
        return [dataclasses.asdict(c) for c in found], ", ".join(c.runtime for c in found if c.installed)
    if name == "nvidia":
        from appliance.hardware.nvidia import probe_nvidia as probe
    elif name == "rocm":
        from appliance.hardware.rocm import probe_rocm as probe
    elif name == "metal":
        from appliance.hardware.metal import probe_metal as probe
    else:
        raise ValueError(f"unknown probe {name!r}; known: {', '.join(NAMES)}")
    gpus, how = probe()
    return [g.model_dump() for g in gpus], how


def run(name: str) -> dict[str, Any]:
    """The probe's result as plain data; never raises."""
    try:
        data, detail = _gather(name)
    except PlatformAbsentError as exc:
        return {"status": "absent", "detail": str(exc), "data": None}
    except Exception as exc:  # a probe reports every failure rather than dying with a traceback
        return {"status": "failed", "detail": f"{type(exc).__name__}: {exc}", "data": None}
    return {"status": "ok", "detail": detail, "data": data}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: probe {{{'|'.join(NAMES)}}}", file=sys.stderr)
        return 2
    result = run(argv[0])
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
