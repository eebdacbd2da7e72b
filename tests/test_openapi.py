"""The published schema documents the statuses the server sends, and the server sends only those.

The app runs in-process around an empty scheduler: none of the checks here needs a model, since
every real error provoked is refused before a generation would start.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from appliance import __version__
from appliance.api.app import create_app
from appliance.api.openapi import install_openapi
from appliance.api.protocol import ErrorResponse
from appliance.config import Settings
from appliance.scheduler import Scheduler

LOCAL = "http://127.0.0.1:8484"  # the edge answers only requests addressed to this machine
BODY_LIMIT = 4096
API_KEY = "test-key-1234"
UNIVERSAL = {"403", "404", "405", "408", "413", "500"}
LORAS = "/v1/appliance/loras"

# The statuses each operation must document, written out from the server's behaviour (not from the
# module's table), so a change to either shows here.
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("get", "/health"): {"200", "503"},
    ("get", "/metrics"): {"200", "401"},
    ("get", "/v1/models"): {"200", "401"},
    ("get", "/v1/models/{model_id}"): {"200", "401"},
    ("post", "/v1/chat/completions"): {"200", "400", "401", "415", "503"},
    ("post", "/v1/completions"): {"200", "400", "401", "415", "503"},
    ("post", "/v1/responses"): {"200", "400", "401", "415", "503"},
    ("get", "/v1/responses/{response_id}"): {"200", "400", "401"},
    ("delete", "/v1/responses/{response_id}"): {"200", "401", "415"},
    ("get", "/v1/responses/{response_id}/input_items"): {"200", "400", "401"},
    ("post", "/v1/embeddings"): {"200", "400", "401", "415", "503"},
    ("get", "/v1/appliance/logs"): {"200", "400", "401"},
    ("get", "/v1/appliance/logs/{record_id}"): {"200", "401"},
    ("post", "/v1/appliance/logs/{record_id}/feedback"): {"200", "400", "401", "415"},
    ("get", LORAS): {"200", "401", "503"},
    ("get", LORAS + "/{name}"): {"200", "401", "503"},
    ("post", LORAS): {"201", "400", "401", "409", "415", "503"},
    ("delete", LORAS + "/{name}"): {"200", "401", "415", "503"},
    ("get", "/v1/appliance/hardware"): {"200", "401"},
    ("post", "/v1/appliance/models/{model_id}/load"): {"200", "401", "415", "503"},
    ("post", "/v1/appliance/models/{model_id}/unload"): {"200", "401", "415"},
    ("get", "/v1/appliance/models/{model_id}/state"): {"200", "401"},
}


def _app(settings: Settings) -> FastAPI:
    app = create_app(Scheduler(), settings)
    install_openapi(app)
    return app


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    app = _app(Settings(max_body_bytes=BODY_LIMIT))
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with TestClient(_app(Settings(api_key=API_KEY)), base_url=LOCAL, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def schema(http: TestClient) -> dict[str, Any]:
    resp = http.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in {"get", "put", "post", "delete", "patch"}:
                yield method, path, operation


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/components/...``) to what it names."""
    while "$ref" in node:
        target: Any = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def documented(schema: dict[str, Any], method: str, path: str) -> set[str]:
    return set(schema["paths"][path][method]["responses"])


def test_keeps_the_apps_identity(schema: dict[str, Any]) -> None:
    assert schema["openapi"].startswith("3.1")
    assert schema["info"]["title"] == "LLM appliance"
    assert schema["info"]["version"] == __version__
    assert schema["info"]["summary"]


def test_schema_is_built_once(http: TestClient) -> None:
    app: FastAPI = http.app  # type: ignore[assignment]
    assert app.openapi() is app.openapi()


def test_installing_twice_is_harmless() -> None:
    app = create_app(Scheduler(), Settings())  # create_app installs it
    assert "422" not in str(app.openapi())
    install_openapi(app)
    install_openapi(app)  # harmless twice (create_app installs it; so may a test)
    assert "422" not in str(app.openapi())


def test_no_422_anywhere(schema: dict[str, Any]) -> None:
    for method, path, operation in operations(schema):
        assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "ValidationError" not in schema["components"]["schemas"]


def test_every_operation_documents_what_the_server_sends(schema: dict[str, Any]) -> None:
    seen = {(method, path): set(op["responses"]) for method, path, op in operations(schema)}
    for key, extra in EXPECTED.items():
        assert key in seen, f"{key} is not in the schema"
        assert seen[key] == UNIVERSAL | extra, key
    for key, statuses in seen.items():  # a route added since this test was written: at least the universal ones
        assert statuses >= UNIVERSAL, key


def test_error_responses_are_openai_error_bodies(schema: dict[str, Any]) -> None:
    assert "ErrorResponse" in schema["components"]["schemas"]
    for method, path, operation in operations(schema):
        for status, response in operation["responses"].items():
            response = resolve(schema, response)
            assert response["description"], (method, path, status)
            if status.startswith(("4", "5")) and path != "/health":
                media = response["content"]["application/json"]
                assert media["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
                for example in media.get("examples", {}).values():
                    ErrorResponse.model_validate(example["value"])


def test_generation_routes(schema: dict[str, Any]) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        responses = schema["paths"][path]["post"]["responses"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        overloaded = resolve(schema, responses["503"])
        assert "Retry-After" in overloaded["headers"]
        codes = {e["value"]["error"]["code"] for e in overloaded["content"]["application/json"]["examples"].values()}
        assert codes >= {"server_overloaded", "queue_timeout", "shutting_down"}


def test_health_503_is_the_health_body(schema: dict[str, Any]) -> None:
    responses = schema["paths"]["/health"]["get"]["responses"]
    assert responses["503"]["content"] == responses["200"]["content"]
    assert responses["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}


def test_metrics_documents_the_content_type_it_sends(http: TestClient, schema: dict[str, Any]) -> None:
    resp = http.get("/metrics")
    assert resp.status_code == 200
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {resp.headers["content-type"]}


def test_lora_upload_takes_json_or_the_file(schema: dict[str, Any]) -> None:
    operation = schema["paths"][LORAS]["post"]
    content = operation["requestBody"]["content"]
    assert set(content) == {"application/json", "application/octet-stream"}
    add = resolve(schema, content["application/json"]["schema"])
    assert set(add["required"]) == {"path", "base"}
    assert set(add["properties"]) == {"path", "base", "name"}
    query = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    assert query == {"base", "name"}
    assert operation["responses"]["409"]["content"]["application/json"]["examples"]


def test_validates_as_openapi_3_1(schema: dict[str, Any]) -> None:
    validator = pytest.importorskip(
        "openapi_spec_validator", reason="openapi-spec-validator is not installed; the structure is checked above"
    )
    validator.validate(schema)


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "operation"),
    [
        # no route matches: every operation documents 404 for it (OpenAPI has no place for unrouted URLs)
        ("GET", "/v1/no-such-thing", {}, 404, None),
        ("GET", "/v1/models/gpt-17", {}, 404, ("get", "/v1/models/{model_id}")),
        ("GET", "/v1/chat/completions", {}, 405, ("post", "/v1/chat/completions")),
        (
            "POST",
            "/v1/chat/completions",
            {"content": b"{bad json", "headers": {"content-type": "application/json"}},
            400,
            ("post", "/v1/chat/completions"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"json": {"model": "gpt-17", "messages": [{"role": "user", "content": "Hi"}]}},
            404,
            ("post", "/v1/chat/completions"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"content": b"x" * (BODY_LIMIT + 1), "headers": {"content-type": "application/json"}},
            413,
            ("post", "/v1/chat/completions"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"content": b"Hi", "headers": {"content-type": "text/plain"}},
            415,
            ("post", "/v1/chat/completions"),
        ),
        ("GET", "/v1/models", {"headers": {"host": "evil.example"}}, 403, ("get", "/v1/models")),
        (
            "POST",
            "/v1/chat/completions",
            {"json": {"model": "x", "messages": []}, "headers": {"origin": "https://evil.example"}},
            403,
            ("post", "/v1/chat/completions"),
        ),
        (
            "POST",
            LORAS,
            {"json": {"path": "/nowhere.gguf", "base": "gpt-17"}},
            503,
            ("post", LORAS),
        ),
        ("GET", "/v1/appliance/logs", {"params": {"limit": 0}}, 400, ("get", "/v1/appliance/logs")),
        ("GET", "/v1/appliance/hardware", {}, 404, ("get", "/v1/appliance/hardware")),
    ],
)
def test_real_errors_are_documented(
    http: TestClient,
    schema: dict[str, Any],
    method: str,
    url: str,
    kwargs: dict[str, Any],
    status: int,
    operation: tuple[str, str] | None,
) -> None:
    resp = http.request(method, url, **kwargs)
    assert resp.status_code == status, resp.text
    ErrorResponse.model_validate(resp.json())
    targets = [operation] if operation else [(m, p) for m, p, _ in operations(schema)]
    for target in targets:
        assert str(status) in documented(schema, *target), target
    if status == 405:
        documented_headers = resolve(schema, schema["paths"]["/v1/chat/completions"]["post"]["responses"]["405"])
        assert "Allow" in documented_headers["headers"]
        assert "POST" in resp.headers["allow"]


def test_missing_api_key_is_documented(keyed: TestClient, schema: dict[str, Any]) -> None:
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics")]:
        resp = keyed.request(method, path)
        assert resp.status_code == 401, resp.text
        ErrorResponse.model_validate(resp.json())
        assert "401" in documented(schema, method.lower(), path)
        assert (
            "WWW-Authenticate" in resolve(schema, schema["paths"][path][method.lower()]["responses"]["401"])["headers"]
        )
    assert keyed.get("/health").status_code == 200
    assert "401" not in documented(schema, "get", "/health")
