"""Does prompt-lookup drafting pay? Copy-heavy tasks and open chat, one request at a time: off, always, auto.

    python benchmarks/speculative.py [--threads 2] [--max-tokens 96] [--rounds 3]   # after pip install .

Runs the scheduler in-process on the default model (no HTTP, so only decoding is compared). In
each round every task runs in every mode (``off``; ``prompt-lookup``: draft whenever the n-gram
index guesses; ``auto``: draft only while drafts pay, see ``ModelRunner._draft``), so machine drift
hits the modes alike. Prints, per task and mode, the median completion tokens/s and its ratio to
``off``, the draft tokens verified and accepted, and whether the temperature-0 text is the same as
without drafting.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.generation import GenerationRequest
from engines.base import ChatMessage

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "the members agreed to move the opening date to the first week of March, to hire two more staff, "
    "and to keep the reading room open until nine in the evening on weekdays. The mayor thanked the "
    "volunteers who had collected books from the neighbourhood and asked the committee to publish the "
    "final plan on the town website before the end of the month."
)
SYSTEM = "You are a friendly assistant for a small town. " + " ".join(
    f"Fact {i}: the {name} opens at {8 + i % 4} and closes at {17 + i % 5}."
    for i, name in enumerate(["library", "museum", "pool", "bakery", "market", "post office", "park", "cinema"])
)
TASKS: dict[str, str | tuple[ChatMessage, ...]] = {
    "copy": f"Text: {TEXT}\nThe same text, copied exactly:",
    "edit": f"Text: {TEXT}\nThe same text with 'library' replaced by 'museum':",
    "summarise": f"Text: {TEXT}\nA summary of the text in two sentences:",
    # open chat: the answer is new text, so few n-gram guesses hold
    "chat": (ChatMessage("system", SYSTEM), ChatMessage("user", "Write a short story about a lighthouse keeper.")),
}
MODES = ("off", "prompt-lookup", "auto")


async def run_task(
    settings: Settings, prompt: str | tuple[ChatMessage, ...], max_tokens: int
) -> tuple[str, float, int, int]:
    scheduler = build_scheduler(settings, Paths(Path(tempfile.mkdtemp())))
    try:
        runner = scheduler.resolve("smollm2")
        warm = GenerationRequest("smollm2", {"temperature": 0}, prompt="Hello", max_tokens=4)
        await (await scheduler.submit(warm)).collect()
        if isinstance(prompt, str):
            request = GenerationRequest("smollm2", {"temperature": 0}, prompt=prompt, max_tokens=max_tokens)
        else:
            request = GenerationRequest("smollm2", {"temperature": 0}, messages=prompt, max_tokens=max_tokens)
        start = time.perf_counter()
        text, finish = await (await scheduler.submit(request)).collect()
        elapsed = time.perf_counter() - start
        stats = runner.stats()
        return text, finish.completion_tokens / elapsed, stats.draft_tokens_total, stats.draft_accepted_total
    finally:
        scheduler.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[tuple[str, str], list[float]] = {}
    drafts: dict[tuple[str, str], tuple[int, int]] = {}
    texts: dict[tuple[str, str], str] = {}
    for round_ in range(args.rounds):
        for name, prompt in TASKS.items():
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                settings = Settings(
                    ctx_size=2048, parallel=1, threads=args.threads, speculative=mode, prefix_cache=False
                )  # type: ignore[arg-type]
                text, rate, drafted, accepted = await run_task(settings, prompt, args.max_tokens)
                rates.setdefault((name, mode), []).append(rate)
                drafts[(name, mode)], texts[(name, mode)] = (drafted, accepted), text
                print(f"round {round_ + 1} {name:10s} {mode:14s} {rate:6.1f} tok/s", flush=True)
    print("\ntask       mode            tok/s (median)  vs off  drafts accepted/verified  same text as off")
    for name in TASKS:
        off = statistics.median(rates[(name, "off")])
        for mode in MODES:
            rate = statistics.median(rates[(name, mode)])
            drafted, accepted = drafts[(name, mode)]
            same = texts[(name, mode)] == texts[(name, "off")]
            print(f"{name:10s} {mode:14s} {rate:8.1f}  {rate / off:10.2f}x  {accepted:8d}/{drafted:<8d}  {same}")


if __name__ == "__main__":
    asyncio.run(main())
