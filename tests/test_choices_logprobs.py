"""``n`` choices that share the prompt's KV, and log-probabilities in chat's and completions' formats.

Real default model, official client. A request's choices are each what the same request with
its own seed would answer alone (the shared prompt KV is a copy, bit-identical), and the prompt is
computed once however many choices there are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from appliance.scheduler import Scheduler
from tests.conftest import DEFAULT_MODEL, scheduler_and_client

STORY = [{"role": "user", "content": "Tell me a short story about a cat who learns to sail. " * 8}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Scheduler, OpenAI]]:
    # no prefix cache: every prompt token counted below was computed, or copied from a sibling
    with scheduler_and_client(tmp_path_factory.mktemp("home"), prefix_cache=False) as pair:
        yield pair


@pytest.fixture(scope="module")
def scheduler(served: tuple[Scheduler, OpenAI]) -> Scheduler:
    return served[0]


@pytest.fixture(scope="module")
def client(served: tuple[Scheduler, OpenAI]) -> OpenAI:
    return served[1]


def computed_prompt_tokens(scheduler: Scheduler) -> int:
    (stats,) = scheduler.stats()
    return stats.prompt_tokens_total - stats.cached_prompt_tokens_total


def test_choices_equal_their_solo_answers_and_share_one_prefill(client: OpenAI, scheduler: Scheduler) -> None:
    params: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": STORY, "max_tokens": 16, "temperature": 0.9}
    solo = [client.chat.completions.create(**params, seed=40 + i).choices[0].message.content for i in range(3)]
    before = computed_prompt_tokens(scheduler)
    answer = client.chat.completions.create(**params, seed=40, n=3)
    computed = computed_prompt_tokens(scheduler) - before
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.message.content for c in answer.choices] == solo
    assert answer.usage is not None
    assert computed == answer.usage.prompt_tokens  # once, not three times


def test_streamed_choices_are_each_complete(client: OpenAI) -> None:
    params: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": STORY, "max_tokens": 12, "temperature": 0.9}
    whole = client.chat.completions.create(**params, seed=5, n=2)
    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    for chunk in client.chat.completions.create(**params, seed=5, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]


def test_more_choices_than_slots_still_answer(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=6, temperature=0
    )
    assert len({c.message.content for c in answer.choices}) == 1 and len(answer.choices) == 6


def test_chat_logprobs(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes or []).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy: the sampled token is the likeliest
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6


def test_chat_logprobs_stream_like_the_whole_answer(client: OpenAI) -> None:
    params: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 1,
    }
    whole = client.chat.completions.create(**params).choices[0].logprobs
    streamed = []
    for chunk in client.chat.completions.create(**params, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content or []
    assert whole is not None
    assert [(e.token, round(e.logprob, 6)) for e in streamed] == [
        (e.token, round(e.logprob, 6)) for e in whole.content or []
    ]


def test_no_logprobs_unless_asked(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert answer.choices[0].logprobs is None


def test_completion_logprobs_legacy_format(client: OpenAI) -> None:
    answer = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=5, logprobs=2, temperature=0, echo=True
    )
    choice = answer.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert choice.text == "The capital of France is" + "".join(lp.tokens)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token
    assert all(len(top) <= 2 and token in top for token, top in zip(lp.tokens, lp.top_logprobs, strict=True))


def test_completions_n_per_prompt(client: OpenAI) -> None:
    answer = client.completions.create(
        model=DEFAULT_MODEL, prompt=["Once upon", "A cat"], n=2, max_tokens=4, temperature=0
    )
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    assert answer.usage is not None and answer.usage.prompt_tokens == 4  # each prompt once
