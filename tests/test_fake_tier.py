"""The fast tier: the real scheduler and API over the deterministic fake engine (tests/engines/fake.py),
called in-process with the official ``openai`` client. Seconds, no model file; the same scheduler
code paths as the real-model tests, which stay the judge of behaviour with real logits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.config import Settings
from engines.base import LoadOptions
from tests.engines.fake import FakeEngine, write_model

ANSWER = "Paris is the capital of France."


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from appliance.api.app import create_app
    from appliance.scheduler import ModelRunner, RunnerConfig, Scheduler

    path = write_model(tmp_path_factory.mktemp("fake") / "fake.json", ANSWER)
    model = FakeEngine().load(path, LoadOptions(n_ctx_per_slot=2048, n_slots=4))
    scheduler = Scheduler()
    scheduler.add(ModelRunner("fake", model, RunnerConfig(n_batch=64)))
    try:
        with TestClient(create_app(scheduler, Settings()), base_url="http://localhost") as http:
            yield OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http, max_retries=0)
    finally:
        scheduler.stop()


def chat(client: Any, content: str = "Where is Paris?", **kw: Any) -> Any:
    return client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": content}], **{"temperature": 0, **kw}
    )


def test_chat_and_usage(client: Any) -> None:
    answer = chat(client)
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == len(ANSWER.encode())  # one token a byte; the end is not counted
    cut = chat(client, max_tokens=5)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("Paris", "length")


def test_stream_and_stop(client: Any) -> None:
    chunks = list(chat(client, stream=True, stop=[" capital"]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Paris is the"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_many_at_once_each_get_their_answer(client: Any) -> None:
    answers: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        text = chat(client, f"question {i} " * (i * 7 + 1)).choices[0].message.content  # prompts of many lengths
        with lock:
            answers.append(text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]  # more than the 4 slots: some queue
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [ANSWER] * 12


def test_seeded_sampling_and_logprobs(client: Any) -> None:
    first = chat(client, temperature=1.0, seed=7, max_tokens=20, logprobs=True, top_logprobs=3)
    again = chat(client, temperature=1.0, seed=7, max_tokens=20)
    assert first.choices[0].message.content == again.choices[0].message.content
    content = first.choices[0].logprobs.content
    assert len(content) == first.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)


def test_bad_requests_get_openai_errors(client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        chat(client, "x" * 5000)  # longer than the 2048-token context
    assert chat(client).choices[0].message.content == ANSWER  # and the server goes on


def test_a_prompt_shared_by_requests_arriving_together_is_computed_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Eight requests with one long system prompt, admitted at once to eight empty slots: the shared rows
    are computed by one of them and copied to the others, who compute only their own question."""
    import asyncio

    from appliance.generation import GenerationRequest
    from appliance.scheduler import ModelRunner, RunnerConfig, Scheduler
    from engines.base import ChatMessage

    class Counting(FakeEngine):
        computed = 0

        def load(self, path: Any, options: LoadOptions) -> Any:
            model = super().load(path, options)
            decode = model.decode

            def counted(items: Any, adapters: Any = ()) -> Any:
                Counting.computed += sum(len(item.tokens) for item in items)  # prompt chunks and decode tokens
                return decode(items, adapters)

            model.decode = counted  # type: ignore[method-assign]
            return model

    system = "You answer questions about the shop. " * 20  # 740 bytes, one token each
    path = write_model(tmp_path_factory.mktemp("fake") / "fake.json", ANSWER)

    def run(prefix_cache: bool) -> tuple[list[str], list[int], int]:
        Counting.computed = 0
        model = Counting().load(path, LoadOptions(n_ctx_per_slot=2048, n_slots=8))
        scheduler = Scheduler()
        scheduler.add(ModelRunner("fake", model, RunnerConfig(n_batch=256, prefix_cache=prefix_cache)))

        async def together() -> list[tuple[str, Any]]:
            requests = [
                GenerationRequest(
                    "fake", {"temperature": 0.0}, messages=(ChatMessage("system", system), ChatMessage("user", f"q{i}"))
                )
                for i in range(8)
            ]
            gens = [await scheduler.submit(r) for r in requests]
            return [await g.collect() for g in gens]

        try:
            results = asyncio.run(together())
        finally:
            scheduler.stop()
        return [t for t, _ in results], [f.cached_tokens for _, f in results], Counting.computed

    texts, cached, computed = run(prefix_cache=True)
    fresh_texts, fresh_cached, fresh_computed = run(prefix_cache=False)
    assert texts == fresh_texts == [ANSWER] * 8
    assert fresh_cached == [0] * 8
    assert sorted(cached)[0] == 0 and all(c > len(system) for c in sorted(cached)[1:]), cached
    # one prompt computed instead of eight (the answers' own tokens are the same in both runs)
    assert computed < fresh_computed / 3, (computed, fresh_computed)


def test_adaptive_drafting_backs_off_when_drafts_fail_and_keeps_them_when_they_hold(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``speculative = "auto"``: drafts that keep failing stop being verified; drafts that hold go on."""
    import asyncio

    from appliance.generation import GenerationRequest
    from appliance.scheduler import ModelRunner, RunnerConfig, Scheduler
    from engines.base import ChatMessage

    answer = "the quick brown fox jumps over a lazy dog near the river bank"
    path = write_model(tmp_path_factory.mktemp("fake") / "fake.json", answer)
    # every 3 letters of the answer, followed by a wrong one: each guess from the prompt fails at once
    misleading = " ".join(answer[i : i + 3] + "#" for i in range(len(answer) - 2))

    def run(policy: str, prompt: str) -> tuple[str, int, int]:
        model = FakeEngine().load(path, LoadOptions(n_ctx_per_slot=4096, n_slots=1))
        config = RunnerConfig(n_batch=256, speculative=True, draft_policy=policy)  # type: ignore[arg-type]
        scheduler = Scheduler()
        scheduler.add(ModelRunner("fake", model, config))
        request = GenerationRequest("fake", {"temperature": 0.0}, messages=(ChatMessage("user", prompt),))
        try:

            async def go() -> str:
                text, _ = await (await scheduler.submit(request)).collect()
                return text

            text = asyncio.run(go())
            stats = scheduler.stats()[0]
            return text, stats.draft_tokens_total, stats.draft_accepted_total
        finally:
            scheduler.stop()

    text, always, _ = run("always", misleading)
    adaptive_text, adaptive, _ = run("adaptive", misleading)
    assert text == adaptive_text == answer
    assert adaptive < always / 3, (adaptive, always)  # verified drafts that fail are mostly avoided
    _, copied, kept = run("adaptive", f"Repeat after me: {answer}")
    assert kept > 0.6 * copied and kept > len(answer) / 2  # drafts that hold: kept going
