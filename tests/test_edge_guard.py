"""The edge, in-process and without a model: who may ask (Host, Origin, content type), body size,
pace and shape. Each case here is a defect of issue 13 reproduced first.

The app runs around an empty scheduler: a request the edge lets through reaches its route and gets
that route's own answer (404 for an unknown model), which is how "let through" is told apart.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api.bodycheck import MAX_DEPTH, lone_surrogate, too_deep
from appliance.config import Settings
from appliance.scheduler import Scheduler

LOCAL = "http://127.0.0.1:8484"
CHAT = {"model": "nothing-loaded", "messages": [{"role": "user", "content": "Hi"}]}


def make_client(settings: Settings | None = None, base_url: str = LOCAL) -> TestClient:
    app = create_app(Scheduler(), settings or Settings())
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


@pytest.fixture
def http() -> Iterator[TestClient]:
    with make_client() as client:
        yield client


def code(resp: httpx.Response) -> str | None:
    return resp.json()["error"]["code"]  # type: ignore[no-any-return]


# -- Host: DNS rebinding ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["rebind.attacker.example", "rebind.attacker.example:8484", "192.168.1.20:8484"])
def test_foreign_host_is_refused_without_an_api_key(http: TestClient, host: str) -> None:
    for method, path in [("GET", "/v1/appliance/logs"), ("GET", "/v1/models"), ("GET", "/health")]:
        resp = http.request(method, path, headers={"host": host})
        assert resp.status_code == 403, (path, resp.text)
        assert code(resp) == "forbidden_host"
        assert resp.headers["x-request-id"]


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8484", "127.0.0.1:8484", "127.1.2.3", "[::1]:8484", "app.localhost", "LOCALHOST."]
)
def test_loopback_hosts_are_served(http: TestClient, host: str) -> None:
    assert http.get("/v1/models", headers={"host": host}).status_code == 200


def test_configured_hosts_and_api_key() -> None:
    with make_client(Settings(allowed_hosts=("gpu-box.lan",))) as client:
        assert client.get("/v1/models", headers={"host": "gpu-box.lan:8484"}).status_code == 200
        assert client.get("/v1/models", headers={"host": "other.lan"}).status_code == 403
    # with an API key the key is the guard: any Host (a LAN name, an IP) is fine, the key still required
    with make_client(Settings(api_key="k" * 12)) as client:
        assert client.get("/v1/models", headers={"host": "10.0.0.5:8484"}).status_code == 401
        ok = client.get("/v1/models", headers={"host": "10.0.0.5:8484", "authorization": "Bearer " + "k" * 12})
        assert ok.status_code == 200


# -- Origin and content type: cross-site requests ------------------------------------------------


def test_cross_origin_requests_are_refused(http: TestClient) -> None:
    # the "simple" request a page can send with no preflight: text/plain
    resp = http.post(
        "/v1/appliance/loras",
        content=json.dumps({"path": "/tmp/x.gguf", "base": "m"}),
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
    )
    assert resp.status_code == 403 and code(resp) == "forbidden_origin"
    resp = http.get("/v1/appliance/logs", headers={"origin": "http://localhost:3000"})
    assert resp.status_code == 403 and code(resp) == "forbidden_origin"
    assert http.get("/health", headers={"origin": "null"}).status_code == 403


def test_same_and_configured_origins_are_allowed() -> None:
    with make_client() as client:
        assert client.get("/v1/models", headers={"origin": "http://127.0.0.1:8484"}).status_code == 200
    with make_client(Settings(allowed_origins=("https://chat.example.com",))) as client:
        resp = client.post("/v1/chat/completions", json=CHAT, headers={"origin": "https://chat.example.com:443"})
        assert resp.status_code == 404 and code(resp) == "model_not_found"  # through the edge, to the route
        assert client.get("/v1/models", headers={"origin": "https://other.example.com"}).status_code == 403
    with make_client(Settings(allowed_origins=("*",))) as client:
        assert client.get("/v1/models", headers={"origin": "https://any.example"}).status_code == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_state_changing_requests_need_json(http: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/appliance/loras", "/v1/appliance/logs/x/feedback"):
        resp = http.post(path, content=json.dumps(CHAT).encode(), headers=headers)
        assert resp.status_code == 415, (path, content_type, resp.text)
        assert code(resp) == "unsupported_media_type"
    resp = http.post("/v1/chat/completions", json=CHAT, headers={"content-type": "application/json; charset=utf-8"})
    assert resp.status_code == 404  # JSON goes through


def test_upload_route_alone_takes_octet_stream(http: TestClient) -> None:
    resp = http.post("/v1/chat/completions", content=b"{}", headers={"content-type": "application/octet-stream"})
    assert resp.status_code == 415
    resp = http.post("/v1/appliance/loras", content=b"GGUF", headers={"content-type": "application/octet-stream"})
    assert resp.status_code != 415  # the route answers (no LoRA manager in this app: 503)


def test_adding_a_lora_by_path_does_not_reveal_files(tmp_path: Path) -> None:
    """The path form must not tell whether a path outside ``lora_dirs`` exists."""
    allowed = tmp_path / "adapters"
    allowed.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    settings = Settings(lora_dirs=(allowed,))
    app = create_app(Scheduler(), settings, loras=object())  # type: ignore[arg-type]
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        answers = []
        for path in (secret, tmp_path / "missing.gguf", "/etc/passwd", allowed / ".." / "secret.txt", "relative.gguf"):
            resp = client.post("/v1/appliance/loras", json={"path": str(path), "base": "m"})
            assert resp.status_code == 403 and code(resp) == "path_not_allowed"
            answers.append(resp.json()["error"]["message"])
        assert len(set(answers)) == 1


# -- body size, pace and shape ------------------------------------------------------------


def test_too_deep_and_lone_surrogates_are_400(http: TestClient) -> None:
    deep: object = "x"
    for _ in range(300):
        deep = {"k": [deep]}
    resp = http.post("/v1/chat/completions", json={**CHAT, "unknown_field": deep})
    assert resp.status_code == 400 and code(resp) == "invalid_json_depth"
    for body in (
        '{"model": "m", "messages": [{"role": "user", "content": "a\\udfff"}]}',
        '{"model": "m", "prompt": "\\ud800x"}',
        '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "\\udfff"}',
    ):
        resp = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and code(resp) == "invalid_unicode", body
    emoji = '{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    resp = http.post("/v1/chat/completions", content=emoji, headers={"content-type": "application/json"})
    assert resp.status_code == 404  # a proper pair is a character: through the edge


def test_body_checks_on_raw_bytes() -> None:
    assert not too_deep(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert too_deep(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert not too_deep(b'{"a": "' + b"[{" * 1000 + b'"}')  # brackets inside a string do not nest
    assert not too_deep(b'{"a": "\\"' + b"[" * 1000 + b'"}')
    assert lone_surrogate(b'{"a": ["\\\\udfff"]}') is None  # an escaped backslash, not an escape
    assert lone_surrogate(b'{"a": [1, {"b": "\\udc00"}]}') == "a.1.b"


def test_over_limit_bodies_get_413_with_its_code() -> None:
    with make_client(Settings(max_body_bytes=4096)) as client:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
        resp = client.post("/v1/chat/completions", json=big)
        assert resp.status_code == 413 and code(resp) == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"y" * 512
            yield b'"}]}'

        resp = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413 and code(resp) == "request_too_large"


def test_a_stalled_body_gets_408() -> None:
    """A body shorter than its Content-Length: the edge stops waiting after body_timeout."""
    app = create_app(Scheduler(), Settings(body_timeout=0.3))
    sent: list[dict[str, object]] = []
    messages = [{"type": "http.request", "body": b'{"model": "m", ', "more_body": True}]

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client sends nothing more
        raise AssertionError

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), (b"content-length", b"500")],
        "server": ("127.0.0.1", 8484),
        "client": ("127.0.0.1", 5000),
        "scheme": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))  # type: ignore[arg-type]
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]  # type: ignore[operator]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"  # type: ignore[arg-type]


def test_refusals_are_counted_in_metrics(http: TestClient) -> None:
    http.get("/health", headers={"host": "evil.example"})
    http.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})
    text = http.get("/metrics").text
    assert 'appliance_requests_refused_total{code="forbidden_host"} 1.0' in text
    assert 'appliance_requests_refused_total{code="unsupported_media_type"} 1.0' in text
