"""Structured output: what a constraint costs in tokens/s, and how many answers are valid.

    python benchmarks/structured.py [--samples 2000] [--rounds 3] [--tokens 64]

1. Throughput: 1 and 8 concurrent streams, each round running the same prompts plain, with a JSON
   schema, and plain again beside constrained ones (so "no cost to requests without a constraint"
   is measured too); ratios come from one run, interleaved, medians of ``--rounds``.
2. Validity: ``--samples`` answers at temperature 1 over varied schemas (nested objects, arrays,
   enums, numbers, strings with escapes, anyOf), 8 at a time; every answer that ended by itself
   must parse and validate (``jsonschema``); answers cut by ``max_tokens`` are counted apart.

Runs the scheduler in-process with the default model (no HTTP), 8 slots, 2 threads (``--threads``: on a
machine other work keeps busy, llama.cpp's spinning thread barrier makes 2 threads erratic; use 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema

from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.constraints import json_schema
from appliance.generation import GenerationRequest
from appliance.scheduler import Scheduler
from engines.base import ChatMessage

MODEL = "smollm2-135m-instruct"
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "age", "email"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "enum": ["France", "Spain", "Italy", "Japan"]},
            "population": {"type": "number", "minimum": 0, "maximum": 1e9},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "country", "population", "capital"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 12},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
                "maxItems": 3,
            },
            "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
        },
        "required": ["items", "note"],
    },
    {
        "type": "object",
        "properties": {
            "quote": {"type": "string", "maxLength": 60},  # prompts ask for quotes, backslashes, newlines
            "author": {"type": "string", "maxLength": 30},
        },
        "required": ["quote", "author"],
    },
    {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "maximum": 100}},
                        "required": ["kind", "r"],
                    },
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "rect"},
                            "w": {"type": "integer", "maximum": 100},
                            "h": {"type": "integer", "maximum": 100},
                        },
                        "required": ["kind", "w", "h"],
                    },
                ]
            },
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        },
        "required": ["shape", "tags"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "maximum": 10**6},
                    "address": {
                        "type": "object",
                        "properties": {
                            "street": {"type": "string", "maxLength": 30},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["street", "zip"],
                    },
                },
                "required": ["id", "address"],
            },
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["user", "score"],
    },
]
# for throughput: answers that cannot end before max_tokens, plain or constrained, so both modes
# decode the same number of tokens with the same batch
LONG = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string", "minLength": 2000}},
    "required": ["title", "story"],
}
LONG_PROMPTS = [
    "Write a long story about the sea, as JSON.",
    "Tell a long tale of a dragon, in JSON.",
    "A long story about a robot, as JSON.",
    "Write a long fable, as JSON.",
]
PROMPTS = [
    "Describe a person as JSON.",
    "Give me a city as JSON.",
    "An order, in JSON.",
    'A quote with "quotes", a back\\slash and a line break, as JSON.',
    "Describe a shape and its colours in JSON.",
    "A user record with an address, as JSON.",
]


# sampled with a repeat penalty: plain answers must not stop before max_tokens either (checked)
SAMPLING: dict[str, Any] = {"temperature": 1.0, "repeat_penalty": 1.1}


def request(prompt: str, schema: dict[str, Any] | None, max_tokens: int, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL,
        messages=(ChatMessage("user", prompt),),
        max_tokens=max_tokens,
        sampling=sampling,
        grammar=json_schema(schema) if schema is not None else None,
    )


async def run(scheduler: Scheduler, requests: list[GenerationRequest]) -> tuple[float, int, list[tuple[str, str]]]:
    """Run all at once: seconds, completion tokens, and (text, finish reason) each."""
    started = time.perf_counter()
    gens = [await scheduler.submit(r) for r in requests]
    results = [await g.collect() for g in gens]
    seconds = time.perf_counter() - started
    return seconds, sum(f.completion_tokens for _, f in results), [(t, f.finish_reason) for t, f in results]


async def throughput(scheduler: Scheduler, rounds: int, tokens: int) -> None:
    print(f"\n## tokens/s, {tokens} tokens per answer, median of {rounds} interleaved rounds")
    print("| streams | plain | constrained | constrained / plain | plain beside constrained / plain |")
    print("|---:|---:|---:|---:|---:|")
    for streams in (1, 8):
        rates: dict[str, list[float]] = {"plain": [], "constrained": [], "beside": []}
        for r in range(rounds):
            plain = [request(LONG_PROMPTS[i % 4], None, tokens, **SAMPLING, seed=r * 100 + i) for i in range(streams)]
            constrained = [
                request(LONG_PROMPTS[i % 4], LONG, tokens, **SAMPLING, seed=r * 100 + i) for i in range(streams)
            ]
            seconds, n, _ = await run(scheduler, plain)
            if n != streams * tokens:
                print(f"(round {r}: a plain answer ended early: {n} of {streams * tokens} tokens)")
            rates["plain"].append(n / seconds)
            seconds, n, _ = await run(scheduler, constrained)
            rates["constrained"].append(n / seconds)
            if streams > 1:  # half plain, half constrained: the plain ones' rate
                half = streams // 2
                started = time.perf_counter()
                gens = [await scheduler.submit(x) for x in plain[:half] + constrained[half:]]
                done = [await g.collect() for g in gens]
                seconds = time.perf_counter() - started
                rates["beside"].append(sum(f.completion_tokens for _, f in done) / seconds)
        med = {k: statistics.median(v) if v else float("nan") for k, v in rates.items()}
        beside = f"{med['beside'] / med['plain']:.2f}x" if streams > 1 else "-"
        print(
            f"| {streams} | {med['plain']:.1f} | {med['constrained']:.1f} | "
            f"{med['constrained'] / med['plain']:.2f}x | {beside} |"
        )


async def validity(scheduler: Scheduler, samples: int, tokens: int) -> None:
    print(f"\n## validity: {samples} answers at temperature 1, {tokens} tokens max, 8 at a time")
    counts = {"valid": 0, "invalid": 0, "cut": 0}
    per_schema = [[0, 0] for _ in SCHEMAS]  # ended by itself, valid
    started = time.perf_counter()
    for first in range(0, samples, 8):
        batch = [(i % len(SCHEMAS), i) for i in range(first, min(samples, first + 8))]
        reqs = [request(PROMPTS[k], SCHEMAS[k], tokens, temperature=1.0, seed=i) for k, i in batch]
        _, _, results = await run(scheduler, reqs)
        for (k, _), (text, finish) in zip(batch, results, strict=True):
            if finish != "stop":
                counts["cut"] += 1
                continue
            per_schema[k][0] += 1
            try:
                jsonschema.validate(json.loads(text), SCHEMAS[k])
            except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                counts["invalid"] += 1
                print("INVALID", k, repr(text), exc)
                continue
            counts["valid"] += 1
            per_schema[k][1] += 1
        done = min(samples, first + 8)
        if done % 200 == 0:  # a long run says how far it is
            print(f"  {done}/{samples}: {counts} ({time.perf_counter() - started:.0f} s)", flush=True)
    ended = counts["valid"] + counts["invalid"]
    print(
        f"ended by themselves: {ended}, valid: {counts['valid']} ({100 * counts['valid'] / max(1, ended):.1f} %), "
        f"cut by max_tokens: {counts['cut']}; {time.perf_counter() - started:.0f} s"
    )
    for k, (n_ended, n_valid) in enumerate(per_schema):
        print(f"  schema {k}: {n_valid}/{n_ended} valid")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (1 on a busy machine)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    scheduler = build_scheduler(Settings(ctx_size=1024, parallel=8, threads=args.threads), Paths(home))
    try:
        await run(scheduler, [request(PROMPTS[0], SCHEMAS[0], 8)])  # warm-up (llguidance's tokenizer)
        await throughput(scheduler, args.rounds, args.tokens)
        if args.samples:
            await validity(scheduler, args.samples, 160)
    finally:
        scheduler.stop()


if __name__ == "__main__":
    asyncio.run(main())
