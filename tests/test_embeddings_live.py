"""/v1/embeddings on a real server process, over a socket, with the official ``openai`` client.

One server serves the default chat model and every registered embedding model: the built-in
all-MiniLM-L6-v2 and SmolLM2 registered as a GGUF embedding model (see ``tests/test_embeddings.py``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, LiveServer, _start
from tests.test_embeddings import MINILM, SENTENCES, SMOL, registry_home, vectors
from tests.test_request_log_live import logged


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    home = registry_home(tmp_path_factory.mktemp("embeddings-live"))
    live = _start(home.home, ["--parallel", "2"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_start_up_says_which_embedding_models_are_offered(api: openai.OpenAI, server: LiveServer) -> None:
    assert [m.id for m in api.models.list().data] == [DEFAULT_MODEL]  # /v1/models: the chat models
    log = "".join(server.output)
    assert f"embedding model {MINILM}:" in log and f"embedding model {SMOL}:" in log
    assert "embedding model not-installed is not available" in log and "pip install" in log


@pytest.mark.parametrize("model", [MINILM, SMOL])
def test_float_base64_and_batch_equal_solo(api: openai.OpenAI, model: str) -> None:
    floats = api.embeddings.create(model=model, input=SENTENCES, encoding_format="float")
    default = api.embeddings.create(model=model, input=SENTENCES)  # the client asks for base64 and decodes it
    raw = api.embeddings.with_raw_response.create(model=model, input=SENTENCES[:1], encoding_format="base64")
    b64 = np.frombuffer(base64.b64decode(raw.http_response.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(vectors(floats), vectors(default))
    assert np.array_equal(b64, vectors(floats)[0])
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(SENTENCES)
    for i in (0, 3, len(SENTENCES) - 1):
        solo = api.embeddings.create(model=model, input=SENTENCES[i], encoding_format="float")
        assert np.array_equal(vectors(solo)[0], vectors(floats)[i]), i


def test_a_chat_model_is_refused_by_name(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        api.embeddings.create(model=DEFAULT_MODEL, input="x")
    assert exc.value.code == "model_not_supported" and MINILM in str(exc.value)


def test_the_exchange_is_in_the_request_log(api: openai.OpenAI, server: LiveServer) -> None:
    raw = api.embeddings.with_raw_response.create(model=MINILM, input=["logged input"], encoding_format="float")
    row = logged(server, raw.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["status"], row["engine"]) == ("embeddings", MINILM, "ok", "onnx")
    assert row["request"]["input"] == ["logged input"] and row["prompt_tokens"] == 4
    assert row["response_text"] is None  # vectors are never recorded
    assert len(row["model_sha256"]) == 64


def test_chat_and_embeddings_together(api: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    alone = api.chat.completions.create(model=DEFAULT_MODEL, messages=question, max_tokens=20, temperature=0)
    with ThreadPoolExecutor(4) as pool:
        chat = pool.submit(
            api.chat.completions.create, model=DEFAULT_MODEL, messages=question, max_tokens=20, temperature=0
        )
        embedded = [pool.submit(api.embeddings.create, model=m, input=SENTENCES) for m in (MINILM, SMOL) * 2]
        answer = chat.result(timeout=120)
        assert all(len(f.result(timeout=120).data) == len(SENTENCES) for f in embedded)
    assert answer.choices[0].message.content == alone.choices[0].message.content
