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
