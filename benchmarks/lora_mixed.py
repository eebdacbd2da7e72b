"""LoRA adapters under load, in one run against one server:

    python benchmarks/lora_mixed.py                 # 8 clients, 3 rounds, 50 adapters
    python benchmarks/lora_mixed.py --rounds 5 --max-tokens 128

1. Hot add: the time from POST /v1/appliance/loras to the first streamed token of a request
   using the new adapter, on a server that is already serving.
2. Mixed traffic: 8 concurrent clients, half on the base model and a quarter on each of two
   adapters, against 8 clients all on the base model; rounds alternate, medians compared. Every
   mixed answer is checked to equal the answer the same request gets alone (temperature 0).
3. Memory: the server's resident memory with the base model alone, then with 50 adapters
   loaded, against the adapters' file sizes.

Adapters are random rank-8 LoRAs on attn_q and attn_v of every layer (PEFT's default targets),
in f32 as llama.cpp's convert_lora_to_gguf.py writes by default.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_llama_server import MODEL_ID, default_model_file, free_port  # noqa: E402

from tests.loras import targets, write_lora  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle gear works.",
    "Describe a busy market in the morning.",
    "Give advice to a new gardener.",
    "Tell me about the history of bread.",
    "Describe the life of a honeybee.",
    "Explain why the sky is blue.",
    "Write a letter to a friend about a trip to the mountains.",
]


def write_bench_lora(path: Path, seed: int) -> Path:
    """A random rank-8 f32 adapter on attn_q and attn_v of every layer of the default model."""
    return write_lora(path, default_model_file(), seed=seed, rank=8, tensors=targets(30, ("attn_q", "attn_v")))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def chat(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]


def together(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> tuple[list[str], float]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: chat(url, job[0], job[1], max_tokens), jobs))
    elapsed = time.perf_counter() - start
    return [text for text, _ in results], sum(n for _, n in results) / elapsed


def first_token_after_add(url: str, path: Path, name: str) -> tuple[float, float]:
    start = time.perf_counter()
    made = httpx.post(f"{url}/v1/appliance/loras", json={"path": str(path), "base": MODEL_ID, "name": name}, timeout=60)
    made.raise_for_status()
    added = time.perf_counter() - start
    body = {"model": f"{MODEL_ID}:{name}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content":"' in line:
                break
    return added, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra server flag, e.g. --no-flash-attn")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    files = [write_bench_lora(work / f"a{i:02d}.gguf", seed=i) for i in range(args.adapters)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--threads", str(args.threads),
           "--parallel", "8", "--ctx-size", "1024", "--no-log", "--log-level", "warning", "--lora-dir", str(work),
           *args.serve_arg]  # fmt: skip
    env = {**os.environ, "APPLIANCE_HOME": str(work / "home")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.2)
        chat(url, MODEL_ID, "Hi", 4)
        rss_base = rss_mib(proc.pid)

        added, first = first_token_after_add(url, files[0], "a00")
        print(f"hot add: POST answered in {added * 1000:.0f} ms, first token of its first request at "
              f"{first * 1000:.0f} ms")  # fmt: skip
        first_token_after_add(url, files[1], "a01")

        base_jobs = [(MODEL_ID, p) for p in PROMPTS]
        models = [MODEL_ID, f"{MODEL_ID}:a00", MODEL_ID, f"{MODEL_ID}:a01"] * 2
        mixed_jobs = list(zip(models, PROMPTS, strict=True))
        alone = [chat(url, m, p, args.max_tokens)[0] for m, p in mixed_jobs]
        rates: dict[str, list[float]] = {"all base": [], "mixed": []}
        for r in range(args.rounds):
            _, base_rate = together(url, base_jobs, args.max_tokens)
            answers, mixed_rate = together(url, mixed_jobs, args.max_tokens)
            same = sum(a == b for a, b in zip(answers, alone, strict=True))
            differ = [mixed_jobs[i][0] for i, (a, b) in enumerate(zip(answers, alone, strict=True)) if a != b]
            rates["all base"].append(base_rate)
            rates["mixed"].append(mixed_rate)
            print(f"round {r + 1}: all base {base_rate:6.1f} tok/s   mixed {mixed_rate:6.1f} tok/s   "
                  f"mixed answers equal to solo: {same}/{len(answers)} {differ or ''}", flush=True)  # fmt: skip
        b, m = statistics.median(rates["all base"]), statistics.median(rates["mixed"])
        print(f"median: all base {b:.1f} tok/s, mixed {m:.1f} tok/s; mixed / base = {m / b:.2f}")

        for i, path in enumerate(files[2:], start=2):
            httpx.post(f"{url}/v1/appliance/loras", json={"path": str(path), "base": MODEL_ID, "name": f"a{i:02d}"},
                       timeout=60).raise_for_status()  # fmt: skip
        loaded = [m for m in httpx.get(f"{url}/v1/models").json()["data"] if m.get("parent")]
        chat(url, f"{MODEL_ID}:a{args.adapters - 1:02d}", "Hi", 4)
        rss_all = rss_mib(proc.pid)
        size = sum(f.stat().st_size for f in files) / (1 << 20)
        print(f"memory: base alone {rss_base:.0f} MiB; with {len(loaded)} adapters {rss_all:.0f} MiB "
              f"(+{rss_all - rss_base:.0f} MiB; the adapter files total {size:.0f} MiB; "
              f"{len(loaded)} x base would be {len(loaded) * rss_base / 1024:.1f} GiB)")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
