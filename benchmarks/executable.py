"""The single executable's figures: size, first and second start, disk used by unpacking, decode speed vs pip.

    python packaging/build.py                      # builds dist/appliance-<version>-<os>-<arch>
    python benchmarks/executable.py --runs 5       # the BENCHMARKS.md figures
    python benchmarks/executable.py --file F --runs 1

Start-up: the file runs under an empty environment with a fresh HOME. A *first start* unpacks into
an empty unpack folder (``APPLIANCE_UNPACK_DIR``); a *second start* reuses it. Each is timed from
the exec to ``/health`` answering 200 and to the first streamed token of a chat request sent as
soon as the server is healthy. The file is read once before timing, so both are measured with it
in the page cache, as after a download or a copy.

Decode speed: the file's server and a pip install's server (``python -m appliance serve``, the
same flags: ``--threads 2``, default model, one slot busy) are both up; requests alternate between
them, one at a time, so drift hits both alike. tokens/s is counted between the first and the last
streamed token of a 128-token answer. Printed: medians, the ratio file / pip, and the last line
holds every figure as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import MODEL_ID, NO_LOG, median, start_server

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper and the sea, in many sentences."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_times(base_url: str, max_tokens: int) -> tuple[float, float, int]:
    """Seconds to the first content delta and to the last, and the number of content deltas."""
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    with httpx.stream(
        "POST", base_url + "/v1/chat/completions", json=body, headers=NO_LOG, timeout=120, trust_env=False
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                last = time.perf_counter() - start
                first = first or last
                count += 1
    return first, last, count


def timed_start(file: Path, home: Path, unpack: Path) -> dict[str, float]:
    """One start of the file: seconds to /health 200 and to the first streamed token."""
    port = free_port()
    env = {"HOME": str(home), "APPLIANCE_UNPACK_DIR": str(unpack)}
    start = time.perf_counter()
    process = subprocess.Popen(
        [str(file), "--serve", "--port", str(port), "--threads", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the file exited with status {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            time.sleep(0.02)
        health = time.perf_counter() - start
        first_token, _, _ = stream_times(base, 4)
        return {"health_s": health, "first_token_s": health + first_token}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def startup(file: Path, runs: int, work: Path) -> dict[str, Any]:
    file.read_bytes()  # in the page cache, as after a download
    first: list[dict[str, float]] = []
    second: list[dict[str, float]] = []
    unpacked = 0
    for i in range(runs):
        home, unpack = work / f"home{i}", work / f"unpack{i}"
        home.mkdir()
        first.append(timed_start(file, home, unpack))
        unpacked = du(unpack)
        second.append(timed_start(file, home, unpack))
        shutil.rmtree(unpack)
        print(f"  run {i + 1}: first {first[-1]}, second {second[-1]}", flush=True)
    pick = lambda rows, key: round(median([r[key] for r in rows]), 3)  # noqa: E731
    return {
        "first_start_health_s": pick(first, "health_s"),
        "first_start_first_token_s": pick(first, "first_token_s"),
        "second_start_health_s": pick(second, "health_s"),
        "second_start_first_token_s": pick(second, "first_token_s"),
        "unpacked_bytes": unpacked,
    }


def decode_speed(file: Path, runs: int, work: Path) -> dict[str, Any]:
    home = work / "speed-home"
    home.mkdir()
    port = free_port()
    frozen = subprocess.Popen(
        [str(file), "--serve", "--port", str(port), "--threads", "2"],
        env={"HOME": str(home), "APPLIANCE_UNPACK_DIR": str(work / "speed-unpack")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    frozen_url = f"http://127.0.0.1:{port}"
    pip = start_server(work / "pip-home")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(frozen_url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            time.sleep(0.1)
        speeds: dict[str, list[float]] = {"file": [], "pip": []}
        for url in (frozen_url, pip.base_url):  # warm-up
            stream_times(url, 16)
        for _ in range(runs):
            for name, url in (("file", frozen_url), ("pip", pip.base_url)):
                first, last, count = stream_times(url, 128)
                speeds[name].append((count - 1) / (last - first))
        file_tps, pip_tps = median(speeds["file"]), median(speeds["pip"])
        print(f"  decode tokens/s: file {file_tps:.1f}, pip {pip_tps:.1f}", flush=True)
        return {
            "file_tokens_per_s": round(file_tps, 1),
            "pip_tokens_per_s": round(pip_tps, 1),
            "file_over_pip": round(file_tps / pip_tps, 3),
        }
    finally:
        frozen.send_signal(signal.SIGINT)
        pip.stop(30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            frozen.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, help="the built file (default: the newest in dist/)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    file = args.file or max(
        (p for p in (REPO / "dist").glob("appliance-*") if p.is_file() and not p.name.endswith(".json")),
        key=lambda p: p.stat().st_mtime,
    )
    figures: dict[str, Any] = {"file": file.name, "size_bytes": file.stat().st_size}
    built = file.with_name(file.name + ".build.json")
    if built.exists():
        figures["build"] = json.loads(built.read_text())
    print(f"{file.name}: {file.stat().st_size / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("start-up (median of runs):", flush=True)
        figures["startup"] = startup(file, args.runs, work)
        print(f"  {figures['startup']}")
        print("decode speed, the file vs the pip install, alternating:", flush=True)
        figures["decode"] = decode_speed(file, max(args.runs, 3), work)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    os.environ.pop("APPLIANCE_HOME", None)
    raise SystemExit(main())
