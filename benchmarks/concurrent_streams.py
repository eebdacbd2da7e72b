"""Aggregate streaming throughput and time-to-first-token of N concurrent chat clients.

Usage (against any OpenAI-compatible server already running):

    python benchmarks/concurrent_streams.py --base-url http://127.0.0.1:8484/v1 --clients 1 4 8

Prints, per N: aggregate completion tokens/s, TTFT p50/p95, errors, and whether every stream
arrived whole (it ended with a finish_reason, without error). Temperature 0, fixed prompts, max_tokens 128.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from openai import OpenAI

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle for a child.",
    "List ten ideas for a weekend trip and explain each.",
    "Write a letter to a friend about learning to cook.",
    "Explain what a computer network is.",
    "Describe a busy market in the morning.",
    "Give advice to someone starting to run.",
]


@dataclass
class Result:
    ttft: float
    tokens: int
    whole: bool
    error: str | None = None


@dataclass
class Summary:
    clients: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    errors: int
    all_whole: bool
    tokens: int
    elapsed_s: float
    first_error: str | None = None

    def line(self) -> str:
        return (
            f"N={self.clients:3d}  {self.tokens_per_s:7.1f} tok/s  TTFT p50 {self.ttft_p50_ms:6.0f} ms  "
            f"p95 {self.ttft_p95_ms:6.0f} ms  errors {self.errors}  all whole: {self.all_whole}  "
            f"({self.tokens} tokens in {self.elapsed_s:.1f} s)"
        )


def one_stream(
    client: OpenAI,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    extra_body: dict[str, Any] | None = None,
) -> Result:
    """One streaming chat request; a stream is whole if it ended with a finish_reason and no error.

    Completion tokens come from the usage chunk; a server that sends none (llama-cpp-python's)
    is credited one token per content chunk, which is how such servers stream.
    """
    start = time.perf_counter()
    ttft, finish, usage, chunks = 0.0, None, None, 0
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra_body,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if not ttft:
                    ttft = time.perf_counter() - start
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
        tokens = usage.completion_tokens if usage else chunks
        return Result(ttft, tokens, whole=finish is not None)
    except Exception as exc:  # a benchmark reports failures instead of stopping
        return Result(0.0, 0, False, f"{type(exc).__name__}: {exc}")


def measure(client: OpenAI, model: str, n: int, max_tokens: int) -> Summary:
    """N clients at once, each sending one of the fixed prompts."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(
            pool.map(lambda p: one_stream(client, model, [{"role": "user", "content": p}], max_tokens), prompts)
        )
    elapsed = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    ttfts = sorted(r.ttft for r in ok) or [0.0]
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
    total = sum(r.tokens for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return Summary(
        clients=n,
        tokens_per_s=total / elapsed,
        ttft_p50_ms=statistics.median(ttfts) * 1000,
        ttft_p95_ms=p95 * 1000,
        errors=len(errors),
        all_whole=all(r.whole for r in results),
        tokens=total,
        elapsed_s=elapsed,
        first_error=errors[0] if errors else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8484/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="bench", max_retries=0, timeout=600)
    one_stream(client, args.model, [{"role": "user", "content": "Hi"}], 4)  # warm-up
    for n in args.clients:
        print(measure(client, args.model, n, args.max_tokens).line())


if __name__ == "__main__":
    main()
