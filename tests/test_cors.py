"""CORS: browser apps on an allowed origin can call the API; every other origin is refused as before.

In-process, around an empty scheduler (a request that gets through reaches its route: 404 for an
unknown model). The preflight is what a browser sends before a JSON POST with an Authorization
header, as the official SDK's browser build does.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.cli import build_parser
from appliance.config import Settings
from appliance.scheduler import Scheduler

APP = "https://chat.example.com"
CHAT = {"model": "nothing-loaded", "messages": [{"role": "user", "content": "Hi"}]}
PREFLIGHT = {
    "origin": APP,
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type, x-stainless-os",
}


def client(*origins: str, api_key: str | None = None) -> TestClient:
    app = create_app(Scheduler(), Settings(allowed_origins=origins, api_key=api_key))
    return TestClient(app, base_url="http://127.0.0.1:8484", raise_server_exceptions=False)


def test_a_preflight_from_an_allowed_origin_is_answered() -> None:
    with client(APP) as http:
        resp = http.options("/v1/chat/completions", headers=PREFLIGHT)
    assert resp.status_code == 204
    assert resp.headers["access-control-allow-origin"] == APP
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert resp.headers["access-control-allow-headers"] == PREFLIGHT["access-control-request-headers"]
    assert resp.headers["vary"] == "Origin"
    assert "access-control-allow-credentials" not in resp.headers  # never cookies: the key is a header


def test_an_allowed_origin_can_read_answers_and_errors() -> None:
    with client(APP) as http:
        ok = http.get("/v1/models", headers={"origin": APP})
        err = http.post("/v1/chat/completions", json=CHAT, headers={"origin": APP})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
    assert err.status_code == 404 and err.headers["access-control-allow-origin"] == APP
    assert "x-request-id" in err.headers["access-control-expose-headers"]


def test_the_api_key_still_applies_to_an_allowed_origin() -> None:
    key = "k" * 16
    with client(APP, api_key=key) as http:
        assert http.options("/v1/chat/completions", headers=PREFLIGHT).status_code == 204  # no key in a preflight
        assert http.post("/v1/chat/completions", json=CHAT, headers={"origin": APP}).status_code == 401
        auth = {"origin": APP, "authorization": f"Bearer {key}"}
        assert http.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 404


@pytest.mark.parametrize("origins", [(), ("https://other.example",)])
def test_other_origins_get_no_cors_and_are_refused(origins: tuple[str, ...]) -> None:
    with client(*origins) as http:
        pre = http.options("/v1/chat/completions", headers=PREFLIGHT)
        get = http.get("/v1/models", headers={"origin": APP})
    for resp in (pre, get):
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden_origin"
        assert "access-control-allow-origin" not in resp.headers


def test_a_wildcard_allows_any_origin() -> None:
    with client("*") as http:
        resp = http.get("/v1/models", headers={"origin": "https://any.example"})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "*"


def test_requests_without_an_origin_are_unchanged() -> None:
    with client(APP) as http:
        resp = http.get("/v1/models")
        assert http.options("/v1/models").status_code == 405  # not a preflight: the routes' own answer
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers


def test_cors_origins_flag_is_the_allowed_origins_setting() -> None:
    args = build_parser().parse_args(
        ["serve", "--cors-origins", "https://a.example, https://b.example", "--allowed-origin", "https://c.example"]
    )
    assert args.allowed_origins == ["https://a.example", "https://b.example", "https://c.example"]
