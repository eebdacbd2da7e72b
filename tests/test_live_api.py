"""The OpenAI API against a real server process with the real default model, via the official client."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, LiveServer

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [DEFAULT_MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    assert client.models.retrieve("smollm2").id == DEFAULT_MODEL  # alias
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_non_stream(client: openai.OpenAI, live_server: LiveServer) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=40, temperature=0
    )
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-")
    assert raw.headers["x-request-id"] == resp.id
    assert resp.model == DEFAULT_MODEL
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert 0 < resp.usage.completion_tokens <= 40


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    assert text == whole.choices[0].message.content
    assert finishes[0] == whole.choices[0].finish_reason
    assert whole.usage is not None
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_content_as_text_parts(client: openai.OpenAI) -> None:
    parts = client.chat.completions.create(
        model=DEFAULT_MODEL,
        temperature=0,
        max_tokens=20,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": QUESTION[0]["content"]}],
            }
        ],
    )
    plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5,
        temperature=0,
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


def test_natural_stop_gives_stop(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Say only the word: yes"}],
        max_tokens=200,
        temperature=0,
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens < 200


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
    full = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=60, temperature=0)
    text = full.choices[0].message.content or ""
    assert "5" in text
    expected = text[: text.index("5")]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=DEFAULT_MODEL, messages=messages, max_tokens=60, temperature=0, stop=["5", "never"], stream=True
            )
        )
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        resp = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=60, temperature=0, stop="5"
        )
        got, reason = resp.choices[0].message.content or "", resp.choices[0].finish_reason
    assert got == expected
    assert reason == "stop"


def test_seed_reproducible_at_temperature(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        resp = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Invent a name for a cat."}],
            max_tokens=24,
            temperature=1.0,
            top_p=1.0,
            seed=seed,
        )
        return resp.choices[0].message.content or ""

    first = run(1234)
    assert run(1234) == first
    assert len({first, run(1), run(2), run(3)}) > 1  # the seed really drives the sampling


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    assert resp.choices[0].text
    assert resp.usage is not None and resp.usage.completion_tokens <= 8
    default = client.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time", temperature=0)
    assert default.usage is not None and default.usage.completion_tokens == 16  # OpenAI's default max_tokens
    assert default.choices[0].finish_reason == "length"


def test_completions_list_of_prompts_and_stream(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    resp = client.completions.create(model=DEFAULT_MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    singles = [
        client.completions.create(model=DEFAULT_MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in prompts
    ]
    assert [c.text for c in resp.choices] == singles
    stream = client.completions.create(model=DEFAULT_MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == singles
    echo = client.completions.create(model=DEFAULT_MODEL, prompt=prompts[0], max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == prompts[0] + singles[0]


def test_four_concurrent_streams_equal_solo_answers(client: openai.OpenAI) -> None:
    prompts = [
        "Write a haiku about the sea.",
        "Name three primary colors.",
        "Explain what a CPU does in one sentence.",
        "Give me a tip for learning Python.",
    ]

    def ask(prompt: str) -> tuple[str, str | None]:
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=48,
            temperature=0,
            stream=True,
        )
        text, reason = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert all(reason in ("stop", "length") for _, reason in together)
    assert together == solo


def test_client_disconnect_cancels_generation(live_server: LiveServer) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 3000, "temperature": 0, "stream": True}
    before = live_server.model_stats()["completion_tokens_total"]
    with (
        httpx.Client(base_url=live_server.base_url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        for n, _ in enumerate(resp.iter_lines()):
            if n > 20:
                break
    deadline = time.monotonic() + 5
    while live_server.model_stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = live_server.model_stats()
    assert stats["active"] == 0, "the cancelled stream still holds a slot"
    time.sleep(0.5)
    after = live_server.model_stats()["completion_tokens_total"]
    assert after == stats["completion_tokens_total"], "generation went on after the disconnect"
    assert after - before < 300  # stopped promptly, far short of max_tokens


def test_unix_socket(live_server: LiveServer) -> None:
    assert live_server.socket is not None
    assert (live_server.socket.stat().st_mode & 0o777) == 0o600
    transport = httpx.HTTPTransport(uds=str(live_server.socket))
    with httpx.Client(transport=transport, base_url="http://appliance", timeout=60) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL
        resp = http.post(
            "/v1/chat/completions",
            json={"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0},
        )
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"]
    sock_client = openai.OpenAI(
        base_url="http://appliance/v1",
        api_key="x",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(live_server.socket))),
    )
    assert sock_client.models.list().data[0].id == DEFAULT_MODEL
