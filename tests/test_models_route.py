"""``/v1/appliance/models``: import a GGUF file by path (same machine only) and list the registry.

The model written here is tiny but sound: the header, metadata and tensor table the import checks,
written with the ``gguf`` package, so no 98 MB copy is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from appliance.api.app import create_app
from appliance.api.models import RegisteredModel, same_machine
from appliance.config import Paths, Settings, app_paths
from appliance.registry import load_registry
from appliance.scheduler import Scheduler
from tests.conftest import DEFAULT_MODEL

MODELS = "/v1/appliance/models"
LOOPBACK = ("127.0.0.1", 50000)


def tiny_gguf(path: Path, name: str = "Tiny Test") -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def client(peer: tuple[str, int] = LOOPBACK, settings: Settings | None = None) -> TestClient:
    app = create_app(Scheduler(), settings or Settings())
    return TestClient(app, base_url="http://localhost", client=peer, raise_server_exceptions=False)


@pytest.fixture
def http() -> Iterator[TestClient]:
    with client() as c:
        yield c


def test_import_registers_the_model(http: TestClient, tmp_path: Path) -> None:
    source = tiny_gguf(tmp_path / "Tiny Model.F32.gguf")
    resp = http.post(MODELS, json={"path": str(source)})
    assert resp.status_code == 201, resp.text
    model = RegisteredModel.model_validate(resp.json())
    assert model.id == "tiny-model.f32"
    assert model.architecture == "llama" and model.context_length == 256 and model.quantization == "ALL_F32"
    assert model.size_bytes == source.stat().st_size and model.sha256 and not model.loaded
    assert "path" not in resp.json()  # the server's own paths are not the client's business
    spec = load_registry(app_paths()).get("tiny-model.f32")
    assert spec.resolve_file(app_paths().models_dir).read_bytes() == source.read_bytes()

    listed = http.get(MODELS).json()["data"]
    by_id = {m["id"]: m for m in listed}
    assert by_id["tiny-model.f32"]["source"].endswith("models.toml")
    assert by_id[DEFAULT_MODEL]["default"] and not by_id[DEFAULT_MODEL]["loaded"]  # an empty scheduler

    again = http.post(MODELS, json={"path": str(source)})
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"]
    named = http.post(MODELS, json={"path": str(source), "id": "tiny-two"})  # the same bytes: not copied again
    assert named.status_code == 409 and named.json()["error"]["code"] == "model_exists"
    assert "already in the store as 'tiny-model.f32'" in named.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"not a model at all", "not a GGUF file"), (b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, "corrupt")],
)
def test_a_bad_file_is_refused_with_the_import_message(
    http: TestClient, tmp_path: Path, content: bytes, expected: str
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    resp = http.post(MODELS, json={"path": str(bad)})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert expected in error["message"] and error["code"] == "invalid_model_file"
    assert not app_paths().models_file.exists()  # nothing registered


def test_a_truncated_file_is_refused(http: TestClient, tmp_path: Path) -> None:
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 40])
    resp = http.post(MODELS, json={"path": str(cut)})
    assert resp.status_code == 400 and "truncated" in resp.json()["error"]["message"]


def test_an_adapter_is_not_a_model(http: TestClient, tmp_path: Path) -> None:
    path = tmp_path / "adapter.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_type("adapter")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    resp = http.post(MODELS, json={"path": str(path)})
    assert resp.status_code == 400 and "LoRA adapter" in resp.json()["error"]["message"]


def test_a_missing_file_is_refused(http: TestClient, tmp_path: Path) -> None:
    resp = http.post(MODELS, json={"path": str(tmp_path / "nope.gguf")})
    assert resp.status_code == 400 and "does not exist" in resp.json()["error"]["message"]


@pytest.mark.parametrize("peer", [("192.168.1.20", 40000), ("testclient", 50000)])
def test_a_path_from_another_machine_is_refused(tmp_path: Path, peer: tuple[str, int]) -> None:
    source = tiny_gguf(tmp_path / "tiny.gguf")
    with client(peer, Settings(api_key="k-123456", allowed_hosts=["*"])) as http:
        resp = http.post(MODELS, json={"path": str(source)}, headers={"Authorization": "Bearer k-123456"})
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["code"] == "path_not_allowed"
    assert not app_paths().models_file.exists()


def test_loopback_in_ipv6_forms_is_the_same_machine(tmp_path: Path) -> None:
    for n, peer in enumerate([("::1", 1), ("::ffff:127.0.0.1", 1)]):
        with client(peer) as http:
            resp = http.post(MODELS, json={"path": str(tiny_gguf(tmp_path / f"t{n}.gguf", f"Tiny {n}"))})
        assert resp.status_code == 201, resp.text


def test_a_relative_path_or_a_bad_body_is_refused(http: TestClient) -> None:
    assert http.post(MODELS, json={"path": "models/tiny.gguf"}).status_code == 403
    bad = http.post(MODELS, json={"file": "/x.gguf"})
    assert bad.status_code == 400 and bad.json()["error"]["param"]


def test_needs_the_api_key_when_one_is_set(tmp_path: Path) -> None:
    with client(settings=Settings(api_key="k-123456")) as http:
        assert http.post(MODELS, json={"path": str(tiny_gguf(tmp_path / "t.gguf"))}).status_code == 401
        assert http.get(MODELS).status_code == 401


@pytest.mark.parametrize(
    ("server", "peer", "local"),
    [
        (("/run/appliance.sock", None), None, True),  # uvicorn on a Unix socket
        (None, None, True),
        (("127.0.0.1", 8484), ("127.0.0.1", 1), True),
        (("0.0.0.0", 8484), ("10.0.0.7", 1), False),
        (("0.0.0.0", 8484), None, False),
    ],
)
def test_same_machine(server: tuple[str, int | None] | None, peer: tuple[str, int] | None, local: bool) -> None:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": MODELS,
        "headers": [],
        "server": server,
        "client": peer,
    }
    assert same_machine(Request(scope)) is local


def test_imports_into_the_home_the_app_was_given(tmp_path: Path) -> None:
    home = Paths(tmp_path / "other-home")
    app = create_app(Scheduler(), Settings(), paths=home)
    with TestClient(app, base_url="http://localhost", client=LOOPBACK) as http:
        resp = http.post(MODELS, json={"path": str(tiny_gguf(tmp_path / "t.gguf"))})
    assert resp.status_code == 201, resp.text
    assert load_registry(home).get("t").source == str(home.models_file)
    assert not app_paths().models_file.exists()
