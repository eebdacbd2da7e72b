"""The traffic internal apps send, against llama.cpp's own llama-server, in one run (issue 19).

    python benchmarks/workloads.py                        # every workload, 3 rounds
    python benchmarks/workloads.py --workloads shared-prompt --rounds 5

Both servers get the same model file, threads (2), slots (8), per-slot context and batch size, and are
up at once; in each round they take turns at each workload, so drift of a shared machine hits them
alike. The median round per server counts, and the ratio ours / llama-server is printed.

Workloads:
- ``shared-prompt``: 32 requests, 16 at a time, all with one system prompt of about 900 tokens (new in
  every run, so no cache from an earlier run helps) and a question of their own, 64 tokens each,
  temperature 0. Requests per second and time to first token p95.
- ``mixed-lora``: 16 requests, 8 at a time: half on the base model, a quarter on each of two LoRA
  adapters (random rank-8 on attn_q and attn_v, as ``lora_mixed.py`` writes them), 64 tokens each.
  Tokens per second and time to first token p95. llama-server loads both adapters at start with
  ``--lora-init-without-apply`` and gets each request's choice in its ``lora`` field; ours gets
  them over ``POST /v1/appliance/loras`` and each request names ``MODEL:adapter``.

- ``chat-16``: 16 clients at once, each one short chat prompt, 128 tokens, temperature 0. Tokens per second.
  With ``--out-of-the-box`` both servers start with nothing set but the model and port (ours:
  ``appliance serve``, whose planner picks threads, slots and context; llama-server: ``-m MODEL``, whose
  defaults are 4 slots on a unified KV cache): what a user gets who sets nothing.

llama-server is built as ``vs_llama_server.py`` builds it (from the llama.cpp vendored in the installed
llama-cpp-python's sdist; once, into ``--cache-dir``), or give ``--llama-server PATH``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrent_streams import measure, one_stream
from lora_mixed import PROMPTS as LORA_PROMPTS
from lora_mixed import write_bench_lora
from vs_llama_server import (
    MODEL_ID,
    SYSTEM_RULES,
    build_llama_server,
    default_model_file,
    free_port,
    running,
    server_commands,
)

T = TypeVar("T")
Asked = tuple[float, int, bool]  # one request's time to first token, tokens, and whether it ended whole


def together(ask: Callable[[T], Asked], inputs: Iterable[T], concurrency: int) -> tuple[list[Asked], float]:
    """``ask`` for every input, ``concurrency`` at a time, and the seconds it all took."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, inputs))
    return results, time.perf_counter() - start


def latency(results: list[Asked]) -> dict[str, float]:
    ttfts = sorted(t for t, _, _ in results)
    return {
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[int(0.95 * (len(ttfts) - 1))],
        "errors": sum(1 for _, _, ok in results if not ok),
    }


def shared_prompt(
    client: OpenAI, server: str, requests: int = 32, concurrency: int = 16, tokens: int = 64
) -> dict[str, float]:
    rules = SYSTEM_RULES[: len(SYSTEM_RULES) * 3 // 5]  # about 900 tokens with the header
    system = f"Session {uuid.uuid4().hex[:8]}. You are the shop assistant. {rules}"
    questions = [f"Customer {i}: how much is item {i % 48} and when does it ship?" for i in range(requests)]

    def ask(question: str) -> Asked:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        result = one_stream(client, MODEL_ID, messages, tokens)
        return result.ttft, result.tokens, result.whole and not result.error

    results, elapsed = together(ask, questions, concurrency)
    return {"req/s": requests / elapsed, **latency(results)}


LORA_NAMES = ("a", "b")


def mixed_lora(
    client: OpenAI, server: str, requests: int = 16, concurrency: int = 8, tokens: int = 64
) -> dict[str, float]:
    choices = [None, LORA_NAMES[0], None, LORA_NAMES[1]]  # half base, a quarter on each adapter

    def ask(i: int) -> Asked:
        adapter = choices[i % len(choices)]
        messages = [{"role": "user", "content": LORA_PROMPTS[i % len(LORA_PROMPTS)]}]
        if server == "ours":
            model, extra = (f"{MODEL_ID}:{adapter}" if adapter else MODEL_ID), None
        else:
            model = MODEL_ID
            extra = {"lora": [{"id": k, "scale": 1.0 if name == adapter else 0.0} for k, name in enumerate(LORA_NAMES)]}
        result = one_stream(client, model, messages, tokens, extra)
        return result.ttft, result.tokens, result.whole and not result.error

    results, elapsed = together(ask, range(requests), concurrency)
    return {"tok/s": sum(n for _, n, _ in results) / elapsed, **latency(results)}


def write_adapters(directory: Path) -> list[Path]:
    """The two adapters of ``mixed-lora``, for both servers."""
    return [write_bench_lora(directory / f"{name}.gguf", seed=k + 1) for k, name in enumerate(LORA_NAMES)]


def chat_16(client: OpenAI, server: str, clients: int = 16, tokens: int = 128) -> dict[str, float]:
    summary = measure(client, MODEL_ID, clients, tokens)
    return {"tok/s": summary.tokens_per_s, "ttft_p95": summary.ttft_p95_ms / 1000, "errors": summary.errors}


WORKLOADS = {"shared-prompt": shared_prompt, "mixed-lora": mixed_lora, "chat-16": chat_16}
HIGHER_IS_BETTER = {"req/s", "tok/s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "appliance-bench")
    parser.add_argument("--ours-args", nargs="*", default=[])
    parser.add_argument("--llama-server-args", nargs="*", default=[])
    parser.add_argument("--out-of-the-box", action="store_true", help="start both servers with their defaults")
    args = parser.parse_args()
    args.llama_server = args.llama_server or build_llama_server(args.cache_dir)
    model = default_model_file()
    adapters = write_adapters(Path(tempfile.mkdtemp(prefix="bench-lora-"))) if "mixed-lora" in args.workloads else []
    for path in adapters:
        args.llama_server_args += ["--lora", str(path)]
    if adapters:
        args.llama_server_args.append("--lora-init-without-apply")
        args.ours_args += ["--lora-dir", str(adapters[0].parent)]  # POST by path: only from a named folder
    servers = ("ours", "llama-server")
    ports = {name: free_port() for name in servers}
    commands = {name: server_commands(args, model, ports[name])[name] for name in servers}
    if args.out_of_the_box:
        home = commands["ours"][1]
        commands["ours"] = ([sys.executable, "-m", "appliance", "serve", "--port", str(ports["ours"]),
                             "--log-level", "warning", *args.ours_args], home)  # fmt: skip
        commands["llama-server"] = ([str(args.llama_server), "-m", str(model), "--port", str(ports["llama-server"]),
                                     "-a", MODEL_ID, *args.llama_server_args], {})  # fmt: skip
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    ours_cmd, ours_env = commands["ours"]
    llama_cmd, llama_env = commands["llama-server"]
    with (
        running("ours", ours_cmd, ports["ours"], ours_env) as ours_url,
        running("llama-server", llama_cmd, ports["llama-server"], llama_env) as llama_url,
    ):
        clients = {
            "ours": OpenAI(base_url=ours_url, api_key="bench", max_retries=0, timeout=600),
            "llama-server": OpenAI(base_url=llama_url, api_key="bench", max_retries=0, timeout=600),
        }
        for path, name in zip(adapters, LORA_NAMES[: len(adapters)], strict=True):
            made = httpx.post(f"{ours_url.removesuffix('/v1')}/v1/appliance/loras",
                              json={"path": str(path), "base": MODEL_ID, "name": name}, timeout=60)  # fmt: skip
            made.raise_for_status()
        for name in servers:  # warm both: the first request of a server pays one-time costs
            one_stream(clients[name], MODEL_ID, [{"role": "user", "content": "Hello"}], 8)
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for workload in args.workloads:
                for name in order:
                    figures = WORKLOADS[workload](clients[name], name)
                    results.setdefault((workload, name), []).append(figures)
                    shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
                    print(f"round {round_ + 1} {workload:<14} {name:<12} {shown}", flush=True)
    print("\nmedian round per server, and ours / llama-server:")
    for workload in args.workloads:
        ours = results[(workload, "ours")]
        theirs = results[(workload, "llama-server")]
        for key in ours[0]:
            a, b = statistics.median(r[key] for r in ours), statistics.median(r[key] for r in theirs)
            ratio = f"{a / b:.2f}x" if b else "-"
            print(f"{workload:<14} {key:<9} ours {a:8.3f}  llama-server {b:8.3f}  ratio {ratio}")


if __name__ == "__main__":
    main()
