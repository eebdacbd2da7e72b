"""Continuous batching, prefix caching and speculative drafting with the real default model.

The invariants that make them safe: at temperature 0 a request gets the same text alone, among
eight concurrent ones, with its prompt prefix served from the cache, or with prompt-lookup
drafting; and a request that cannot fit fails on its own without touching the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.generation import ContextLengthError, FinishEvent, GenerationRequest
from appliance.scheduler import Scheduler
from engines.base import ChatMessage
from tests.conftest import DEFAULT_MODEL

CTX = 1024
GREEDY = {"temperature": 0.0}
PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a CPU does in two sentences.",
    "List three fruits.",
    "What is the capital of France?",
    "Describe a cat.",
    "Give one tip for sleeping well.",
    "Translate 'good morning' into French.",
    # a long prompt: while the others decode it is prefilled in chunks over several steps
    "Summarise this: " + " ".join(f"Step {i}: the robot moves the box {i} meters north." for i in range(12)),
]
# With flash attention, ggml decodes a lone sequence holding more than 256 tokens (its KV span, padded to
# 256, reaches 512) on a split-KV kernel
# that rounds differently from the batched one (see LoadOptions.flash_attn); without it, long
# prompts are batch-invariant too.
LONG = "Summarise this: " + " ".join(f"Step {i}: the robot moves the box {i} meters north." for i in range(45))
SYSTEM = "You are a support agent for a bicycle shop. " + " ".join(
    f"Policy {i}: item {i} costs {i * 3 + 5} euros and is in aisle {i % 9}." for i in range(25)
)


def start(tmp: Path, **settings: object) -> Scheduler:
    return build_scheduler(Settings(ctx_size=CTX, threads=2, **settings), Paths(tmp))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    sched = start(tmp_path_factory.mktemp("home"), parallel=8, prefix_cache=False)
    yield sched
    sched.stop()


def chat(user: str, *, system: str | None = None, max_tokens: int = 24, **sampling: object) -> GenerationRequest:
    messages = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", user),)
    return GenerationRequest(DEFAULT_MODEL, {**GREEDY, **sampling}, messages=messages, max_tokens=max_tokens)


async def answer(sched: Scheduler, request: GenerationRequest) -> tuple[str, FinishEvent]:
    return await (await sched.submit(request)).collect()


def same_alone_and_together(sched: Scheduler, prompts: list[str]) -> None:
    async def scenario() -> None:
        solo = [await answer(sched, chat(p)) for p in prompts]
        together = await asyncio.gather(*(answer(sched, chat(p)) for p in prompts))
        assert [text for text, _ in together] == [text for text, _ in solo]
        assert all(f.completion_tokens > 0 for _, f in together)

    asyncio.run(scenario())


def test_eight_concurrent_equal_solo(eight: Scheduler) -> None:
    same_alone_and_together(eight, PROMPTS)


def test_long_prompts_batch_invariant_without_flash_attn(tmp_path: Path) -> None:
    sched = start(tmp_path, parallel=8, prefix_cache=False, flash_attn=False)
    try:
        same_alone_and_together(sched, [*PROMPTS[:7], LONG])
    finally:
        sched.stop()


def test_request_too_large_fails_alone(eight: Scheduler) -> None:
    async def scenario() -> None:
        reference, ref_finish = await answer(eight, chat(PROMPTS[0], max_tokens=40))
        running = await eight.submit(chat(PROMPTS[0], max_tokens=40))
        with pytest.raises(ContextLengthError, match=f"maximum context length is {CTX}"):
            await eight.submit(chat("word " * (CTX + 50)))
        with pytest.raises(ContextLengthError):
            await eight.submit(chat("Hi", max_tokens=CTX))
        text, finish = await running.collect()
        assert (text, finish.completion_tokens) == (reference, ref_finish.completion_tokens)

    asyncio.run(scenario())


def test_prefix_cache_reports_cached_tokens_and_keeps_answers(tmp_path: Path) -> None:
    cached, uncached = start(tmp_path, parallel=2), start(tmp_path, parallel=2, prefix_cache=False)
    try:

        async def scenario() -> None:
            _, first = await answer(cached, chat("How much is item 3?", system=SYSTEM))
            assert first.cached_tokens == 0
            text, finish = await answer(cached, chat("Where is item 12?", system=SYSTEM))
            reference, ref_finish = await answer(uncached, chat("Where is item 12?", system=SYSTEM))
            assert ref_finish.cached_tokens == 0
            assert finish.prompt_tokens == ref_finish.prompt_tokens
            assert 0.8 * finish.prompt_tokens < finish.cached_tokens < finish.prompt_tokens
            assert text == reference
            # the same request again: all but one exact chunk of the prompt come from the cache
            again_text, again = await answer(cached, chat("Where is item 12?", system=SYSTEM))
            exact = cached.resolve(DEFAULT_MODEL).model.facts.exact_chunk
            assert again.cached_tokens == again.prompt_tokens - exact and again_text == reference
            # a chat continuation reuses the earlier turns
            turns = (
                ChatMessage("system", SYSTEM),
                ChatMessage("user", "Where is item 12?"),
                ChatMessage("assistant", reference),
                ChatMessage("user", "And item 13?"),
            )
            follow = GenerationRequest(DEFAULT_MODEL, GREEDY, messages=turns, max_tokens=24)
            follow_text, follow_finish = await answer(cached, follow)
            assert follow_finish.cached_tokens >= finish.cached_tokens
            assert follow_text == (await answer(uncached, follow))[0]
            stats = cached.stats()[0]
            assert stats.cache_hits_total == 3 and stats.cached_prompt_tokens_total > 3 * finish.cached_tokens - 50

        asyncio.run(scenario())
    finally:
        cached.stop()
        uncached.stop()


def test_prefix_cache_of_short_prompts_keeps_answers(tmp_path: Path) -> None:
    """Prompts shorter than one exact chunk are computed on the short kernel path, cached or not."""
    cached, uncached = start(tmp_path, parallel=2), start(tmp_path, parallel=2, prefix_cache=False)
    try:

        async def scenario() -> None:
            variants = [PROMPTS[0], PROMPTS[0], PROMPTS[0] + " Be brief.", PROMPTS[1], "Now: " + PROMPTS[1]]
            for prompt in variants:
                text, finish = await answer(cached, chat(prompt, max_tokens=32))
                assert finish.prompt_tokens < cached.resolve(DEFAULT_MODEL).model.facts.exact_chunk
                assert text == (await answer(uncached, chat(prompt, max_tokens=32)))[0], prompt
            # the repeat reuses all but the last token; the others share at least the template header
            assert cached.stats()[0].cache_hits_total == len(variants) - 1

        asyncio.run(scenario())
    finally:
        cached.stop()
        uncached.stop()


def test_prompt_lookup_drafting_keeps_greedy_answer(tmp_path: Path) -> None:
    text_to_edit = (
        "The quick brown fox jumps over the lazy dog. The dog sleeps under the old oak tree, "
        "and the fox runs back into the forest before the farmer wakes up."
    )
    prompt = f"Text: {text_to_edit}\nThe same text, copied exactly:"
    request = GenerationRequest(DEFAULT_MODEL, GREEDY, prompt=prompt, max_tokens=48)
    spec, plain = start(tmp_path, parallel=2, speculative="prompt-lookup"), start(tmp_path, parallel=2)
    try:

        async def scenario() -> None:
            drafted, _ = await answer(spec, request)
            reference, _ = await answer(plain, request)
            assert drafted == reference
            stats = spec.stats()[0]
            assert stats.draft_accepted_total >= 10 and stats.draft_tokens_total >= stats.draft_accepted_total
            assert plain.stats()[0].draft_tokens_total == 0

        asyncio.run(scenario())
    finally:
        spec.stop()
        plain.stop()


def test_requests_arriving_together_compute_a_shared_system_prompt_once(tmp_path: Path) -> None:
    """Four requests with one system prompt, sent at once to four empty slots: one computes the shared
    rows, the others wait for them and take a copy; every answer equals the one computed from scratch."""
    # without flash attention: with it, a cached prompt over 256 tokens among running requests can end
    # differently at a near tie, shared or not (docs/batching.md, Determinism)
    shared = start(tmp_path, parallel=4, flash_attn=False)
    fresh = start(tmp_path, parallel=4, prefix_cache=False, flash_attn=False)
    questions = ["How much is item 3?", "Where is item 12?", "Is item 7 in stock?", "What does item 20 cost?"]
    try:

        async def scenario() -> None:
            reference = [await answer(fresh, chat(q, system=SYSTEM)) for q in questions]
            together = await asyncio.gather(*(answer(shared, chat(q, system=SYSTEM)) for q in questions))
            assert [text for text, _ in together] == [text for text, _ in reference]
            cached = sorted(f.cached_tokens for _, f in together)
            prompt = together[0][1].prompt_tokens
            assert cached[0] == 0 and all(c > 0.9 * prompt for c in cached[1:]), (cached, prompt)
            stats = shared.stats()[0]
            assert stats.cache_hits_total == 3

        asyncio.run(scenario())
    finally:
        shared.stop()
        fresh.stop()
