"""Every client mistake gets OpenAI's error shape and the right status; the server stays up.

The app runs in-process (FastAPI's TestClient) around a real scheduler with the real default
model, with a small context and body limit so the limits are cheap to hit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.scheduler import Scheduler
from tests.conftest import DEFAULT_MODEL

CTX = 256
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    settings = Settings(ctx_size=CTX, parallel=2, threads=2, max_body_bytes=BODY_LIMIT)
    sched = build_scheduler(settings, Paths(tmp_path_factory.mktemp("home")))
    yield sched
    sched.stop()


@pytest.fixture(scope="module")
def http(scheduler: Scheduler) -> Iterator[TestClient]:
    app = create_app(scheduler, Settings(ctx_size=CTX, max_body_bytes=BODY_LIMIT))
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client


def chat(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    body.update(overrides)
    return body


def assert_error(resp, status: int, *, param: str | None = None, code: str | None = None) -> dict:  # type: ignore[no-untyped-def, type-arg]
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert resp.headers["x-request-id"]
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"", b"null"])
def test_malformed_json_is_400(http: TestClient, raw: bytes) -> None:
    resp = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = assert_error(resp, 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": ""}, "model"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"n": 100}, "n"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_parameters_are_400(http: TestClient, overrides: dict[str, object], param: str) -> None:
    assert_error(http.post("/v1/chat/completions", json=chat(**overrides)), 400, param=param)


def test_missing_model_field(http: TestClient) -> None:
    body = chat()
    del body["model"]
    err = assert_error(http.post("/v1/chat/completions", json=body), 400, param="model")
    assert "model" in err["message"]


def test_unknown_model_is_404(http: TestClient) -> None:
    assert_error(
        http.post("/v1/chat/completions", json=chat(model="gpt-17")), 404, param="model", code="model_not_found"
    )
    assert_error(http.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"}), 404, code="model_not_found")
    assert_error(http.get("/v1/models/gpt-17"), 404, code="model_not_found")


def test_prompt_longer_than_context_is_400(http: TestClient) -> None:
    long_text = "hello " * (CTX * 2)
    err = assert_error(
        http.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": long_text}])),
        400,
        code="context_length_exceeded",
    )
    assert str(CTX) in err["message"]
    assert_error(
        http.post("/v1/completions", json={"model": DEFAULT_MODEL, "prompt": long_text}),
        400,
        code="context_length_exceeded",
    )
    # prompt fits, but prompt + max_tokens does not
    assert_error(http.post("/v1/chat/completions", json=chat(max_tokens=CTX)), 400, code="context_length_exceeded")


def test_body_too_large_is_413(http: TestClient) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * (BODY_LIMIT * 2)}])
    assert_error(http.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "' + DEFAULT_MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 512 + 2):
            yield b"y" * 512
        yield b'"}]}'

    resp = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413, code="request_too_large")


def test_more_prompts_than_the_server_holds_is_400_not_503(http: TestClient, scheduler: Scheduler) -> None:
    """Issue 13: 100 prompts on an idle server got 503 with Retry-After, though no retry could succeed."""
    capacity = scheduler.capacity(DEFAULT_MODEL)
    body = {"model": DEFAULT_MODEL, "prompt": ["Hi"] * (capacity + 1), "max_tokens": 1}
    err = assert_error(http.post("/v1/completions", json=body), 400, param="prompt", code="too_many_prompts")
    assert str(capacity) in err["message"]
    ok = http.post("/v1/completions", json={**body, "prompt": ["Hi"] * 3})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 3


def test_invalid_unicode_reaching_the_tokenizer_is_400(http: TestClient) -> None:
    """Issue 13: a lone surrogate in content or prompt gave a 500 (UnicodeEncodeError in tokenize)."""
    raw = r'{"model": "%s", "messages": [{"role": "user", "content": "a \udfff"}], "max_tokens": 2}'
    resp = http.post("/v1/chat/completions", content=raw % DEFAULT_MODEL, headers={"content-type": "application/json"})
    assert_error(resp, 400, param="messages.0.content", code="invalid_unicode")
    raw = r'{"model": "%s", "prompt": "\ud800", "max_tokens": 2}'
    resp = http.post("/v1/completions", content=raw % DEFAULT_MODEL, headers={"content-type": "application/json"})
    assert_error(resp, 400, param="prompt", code="invalid_unicode")


def test_unsupported_completion_features(http: TestClient) -> None:
    base = {"model": DEFAULT_MODEL, "prompt": "Hello", "max_tokens": 2}
    assert_error(http.post("/v1/completions", json={**base, "prompt": []}), 400, param="prompt")
    assert_error(http.post("/v1/completions", json={**base, "prompt": [10**9]}), 400)
    assert_error(http.post("/v1/completions", json={**base, "suffix": "x"}), 400, param="suffix")
    assert_error(http.post("/v1/completions", json={**base, "logprobs": 6}), 400, param="logprobs")
    assert_error(http.post("/v1/completions", json={**base, "logprobs": True}), 400, param="logprobs")
    assert_error(http.post("/v1/completions", json={**base, "prompt": [1, 2], "echo": True}), 400, param="echo")


def test_unknown_route_and_method(http: TestClient) -> None:
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


def test_server_still_serves_after_errors(http: TestClient) -> None:
    assert http.get("/health").json()["status"] == "ok"
    resp = http.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"]
    assert resp.headers["x-request-id"] == resp.json()["id"]


def test_api_key_enforced(scheduler: Scheduler) -> None:
    app = create_app(scheduler, Settings(api_key="s3cret-key-1"))
    with TestClient(app, base_url="http://localhost") as client:
        assert_error(client.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(
            client.get("/v1/models", headers={"Authorization": "Bearer wrong-key-1"}), 401, code="invalid_api_key"
        )
        assert_error(client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Basic abc"}), 401)
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret-key-1"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # liveness stays public


# -- parameters that are not honoured are refused by name (issue 16) --------------------------------


@pytest.mark.parametrize(
    ("overrides", "param", "code"),
    [
        ({"frobnicate": True}, "frobnicate", "unknown_parameter"),
        ({"reasoning_effort": "high"}, "reasoning_effort", "unknown_parameter"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        ({"top_logprobs": 3}, "top_logprobs", None),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", None),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
            "unsupported_parameter",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0.content", None),
        (
            {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}]},
            "messages.0.content",
            None,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                    {"role": "user", "content": "and?"},
                ]
            },
            "messages.1.tool_calls.0.function",
            None,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{x"}}],
                    },
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
            None,
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]},
            "messages.1.tool_call_id",
            None,
        ),
        ({"messages": [{"role": "user", "content": "x", "weight": 2}]}, "messages.0.weight", "unknown_parameter"),
    ],
)
def test_parameters_not_honoured_are_refused_by_name(
    http: TestClient, overrides: dict[str, object], param: str, code: str | None
) -> None:
    err = assert_error(http.post("/v1/chat/completions", json=chat(**overrides)), 400, param=param, code=code)
    assert param.split(".")[-1] in err["message"] or code != "unknown_parameter"


@pytest.mark.parametrize(
    "overrides",
    [
        {"metadata": {"team": "a"}, "store": False, "service_tier": "auto"},
        {"modalities": ["text"], "prompt_cache_key": "k", "safety_identifier": "u1", "user": "u1"},
        {"logprobs": False, "n": 1},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "refusal": None}]},
    ],
)
def test_fields_that_change_nothing_here_are_accepted(http: TestClient, overrides: dict[str, object]) -> None:
    assert http.post("/v1/chat/completions", json=chat(**overrides)).status_code == 200


def test_completions_errors_name_the_prompt(http: TestClient) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": "word " * (CTX * 2), "max_tokens": 4}
    assert_error(http.post("/v1/completions", json=body), 400, param="prompt", code="context_length_exceeded")
    assert_error(http.post("/v1/completions", json={**body, "prompt": "x", "bogus": 1}), 400, param="bogus")


def test_system_fingerprint_names_the_model_file_and_build(http: TestClient, scheduler: Scheduler) -> None:
    from appliance import __version__

    sha = scheduler.resolve(DEFAULT_MODEL).provenance["model_sha256"]
    assert sha
    expected = f"fp_{sha[:10]}_{__version__}"
    assert http.post("/v1/chat/completions", json=chat()).json()["system_fingerprint"] == expected
    completion = http.post("/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2})
    assert completion.json()["system_fingerprint"] == expected
    with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as resp:
        chunks = [line for line in resp.iter_lines() if line.startswith("data: {")]
    assert chunks and all(f'"system_fingerprint":"{expected}"' in c.replace(" ", "") for c in chunks)


# -- logit_bias ---------------------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(http: TestClient, scheduler: Scheduler) -> None:
    model = scheduler.resolve(DEFAULT_MODEL).model
    body = {"model": DEFAULT_MODEL, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    first = model.tokenize(plain, add_special=False)[0]
    banned = http.post("/v1/completions", json={**body, "logit_bias": {str(first): -100}}).json()
    assert model.tokenize(banned["choices"][0]["text"], add_special=False)[0] != first
    forced_token = model.tokenize(" banana", add_special=False)[0]
    forced = http.post("/v1/completions", json={**body, "logit_bias": {str(forced_token): 100}}).json()
    assert model.tokenize(forced["choices"][0]["text"], add_special=False) == [forced_token] * 3
    chat_forced = http.post("/v1/chat/completions", json=chat(max_tokens=2, logit_bias={str(forced_token): 100}))
    assert chat_forced.json()["choices"][0]["message"]["content"] == " banana banana"


@pytest.mark.parametrize(
    "bias", [{"abc": 1}, {"12": 101}, {"12": -100.5}, {"999999999": 5}, {str(i): 1 for i in range(301)}]
)
def test_invalid_logit_bias_is_400(http: TestClient, bias: dict[str, float]) -> None:
    assert_error(http.post("/v1/chat/completions", json=chat(logit_bias=bias)), 400, param="logit_bias")
