"""Does prompt-lookup drafting pay? Input-heavy tasks, one request at a time, drafting off vs on.

    python benchmarks/speculative.py [--threads 2] [--max-tokens 96]   # after pip install . (or PYTHONPATH=.)

Runs the scheduler in-process on the default model (no HTTP, so only decoding is compared) and
prints, per task and mode, completion tokens/s, draft tokens verified and accepted, and whether
the temperature-0 text is the same with and without drafting.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.generation import GenerationRequest

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "the members agreed to move the opening date to the first week of March, to hire two more staff, "
    "and to keep the reading room open until nine in the evening on weekdays. The mayor thanked the "
    "volunteers who had collected books from the neighbourhood and asked the committee to publish the "
    "final plan on the town website before the end of the month."
)
TASKS = {
    "copy": f"Text: {TEXT}\nThe same text, copied exactly:",
    "edit": f"Text: {TEXT}\nThe same text with 'library' replaced by 'museum':",
    "summarise": f"Text: {TEXT}\nA summary of the text in two sentences:",
}


async def run_task(settings: Settings, prompt: str, max_tokens: int) -> tuple[str, float, int, int]:
    scheduler = build_scheduler(settings, Paths(Path(tempfile.mkdtemp())))
    try:
        runner = scheduler.resolve("smollm2")
        warm = GenerationRequest("smollm2", {"temperature": 0}, prompt="Hello", max_tokens=4)
        await (await scheduler.submit(warm)).collect()
        request = GenerationRequest("smollm2", {"temperature": 0}, prompt=prompt, max_tokens=max_tokens)
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
    args = parser.parse_args()
    for name, prompt in TASKS.items():
        texts = {}
        for mode in ("off", "prompt-lookup"):
            settings = Settings(ctx_size=2048, parallel=1, threads=args.threads, speculative=mode, prefix_cache=False)
            text, rate, drafted, accepted = await run_task(settings, prompt, args.max_tokens)
            texts[mode] = text
            print(f"{name:10s} {mode:14s} {rate:6.1f} tok/s  drafts {drafted:4d}  accepted {accepted:4d}", flush=True)
        print(f"{name:10s} same text with and without drafting: {texts['off'] == texts['prompt-lookup']}")


if __name__ == "__main__":
    asyncio.run(main())
