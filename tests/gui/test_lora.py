"""The LoRA screen against a fake client (list, upload with progress, refusal, remove, try), and the
client's upload itself: streamed from disk with its length, progress, and the server's message."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from PySide6.QtWidgets import QTreeWidgetItem
from pytestqt.qtbot import QtBot

from gui.client import ApiClient, ApiError
from gui.viewmodels.lora import LoraViewModel, suggest_name
from gui.views.lora import LoraView

MODEL = "smollm2-135m-instruct"
SHA = "3f" * 32
REFUSAL = (
    "cannot use adapter 'wrong' (uploaded): tensor blk.0.attn_q.weight: lora_a [640, 8] and lora_b [8, 576] do not "
    "fit the base weight [576, 576] (expected a [576, rank], b [rank, 576]); was it made for another model?"
)


def card(name: str, **extra: Any) -> dict[str, Any]:
    """An adapter as GET /v1/appliance/loras lists it."""
    return {
        "id": f"{MODEL}:{name}",
        "object": "lora",
        "name": name,
        "base": MODEL,
        "file": f"{name}.gguf",
        "sha256": SHA,
        "rank": 8,
        "alpha": 16.0,
        "targets": [f"blk.{i}.attn_q.weight" for i in range(30)],
        "size": 3_538_944,
        "created": 1_700_000_000,
        "loaded": True,
        "in_use": 0,
        "error": None,
    } | extra


class FakeClient:
    base_url = "http://127.0.0.1:9999"

    def __init__(self) -> None:
        self.adapters = [card("pirate"), card("formal", in_use=2)]
        self.uploads: list[tuple[str, str, str]] = []
        self.removed: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def loras(self) -> list[dict[str, Any]]:
        return list(self.adapters)

    def models(self) -> list[dict[str, Any]]:
        return [{"id": MODEL}, {"id": f"{MODEL}:pirate", "parent": MODEL}, {"id": "qwen-tiny"}]

    def add_lora(self, path: str, base: str, name: str, on_progress: Any = None) -> dict[str, Any]:
        self.uploads.append((path, base, name))
        data = Path(path).read_bytes()
        for sent in range(0, len(data), 1024):
            if sent >= len(data) // 2:
                self.gate.wait(5)  # half-way: the test looks at the progress
            on_progress(min(sent + 1024, len(data)), len(data))
        if name == "wrong":
            raise ApiError(REFUSAL, status=400, code="invalid_lora")
        self.adapters.append(card(name, base=base, id=f"{base}:{name}"))
        return self.adapters[-1]

    def remove_lora(self, name: str) -> dict[str, Any]:
        self.gate.wait(5)
        self.removed.append(name)
        self.adapters = [a for a in self.adapters if a["name"] != name]
        return {"id": name, "object": "lora", "deleted": True}


@pytest.fixture
def adapter_file(tmp_path: Path) -> Path:
    path = tmp_path / "My Pirate LoRA.gguf"
    path.write_bytes(b"GGUF" + bytes(10_236))
    return path


def row(view: LoraView, index: int) -> QTreeWidgetItem:
    item = view.table.topLevelItem(index)
    assert item is not None
    return item


def shown(qtbot: QtBot, client: FakeClient) -> LoraView:
    vm = LoraViewModel(client)  # type: ignore[arg-type]
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    view = LoraView(vm)
    qtbot.addWidget(view)
    view.show()
    return view


def test_lists_adapters_and_the_models_they_can_be_added_to(qtbot: QtBot) -> None:
    view = shown(qtbot, FakeClient())
    assert view.vm.title == "LoRA"
    rows = [[row(view, i).text(c) for c in range(7)] for i in range(view.table.topLevelItemCount())]
    assert rows == [
        ["pirate", MODEL, "8", "16", "30", "3.4 MB", "loaded"],
        ["formal", MODEL, "8", "16", "30", "3.4 MB", "in use by 2 request(s)"],
    ]
    assert [view.base.itemText(i) for i in range(view.base.count())] == [MODEL, "qwen-tiny"]  # no adapters
    assert not view.remove_button.isEnabled() and not view.add_button.isEnabled()  # nothing chosen yet


def test_upload_shows_progress_then_the_new_adapter(qtbot: QtBot, adapter_file: Path) -> None:
    client = FakeClient()
    view = shown(qtbot, client)
    view.choose_file = lambda: str(adapter_file)  # type: ignore[method-assign]
    view.choose_button.click()
    assert view.name.text() == "My-Pirate-LoRA" == suggest_name(str(adapter_file))
    view.name.setText("pirate2")
    client.gate.clear()
    view.add_button.click()
    qtbot.waitUntil(lambda: view.vm.progress >= 0.5)
    assert view.progress.isVisible() and 500 <= view.progress.value() < 1000
    assert view.add_status.text().startswith("Uploading pirate2: 50%")
    assert not view.add_button.isEnabled()
    with qtbot.waitSignal(view.vm.loaded):  # the list reloads after a good upload
        client.gate.set()
    assert client.uploads == [(str(adapter_file), MODEL, "pirate2")]
    assert f"ask for it as model {MODEL}:pirate2" in view.add_status.text()
    assert not view.progress.isVisible() and view.table.topLevelItemCount() == 3


def test_a_refused_adapter_shows_the_servers_reason(qtbot: QtBot, adapter_file: Path) -> None:
    client = FakeClient()
    view = shown(qtbot, client)
    view.choose_file = lambda: str(adapter_file)  # type: ignore[method-assign]
    view.choose_button.click()
    view.name.setText("wrong")
    view.add_button.click()
    qtbot.waitUntil(lambda: view.vm.add_error is not None)
    assert view.add_status.text() == f"wrong was not added: {REFUSAL}"
    assert view.add_button.isEnabled() and view.table.topLevelItemCount() == 2


def test_a_bad_name_is_refused_before_uploading(qtbot: QtBot, adapter_file: Path) -> None:
    client = FakeClient()
    view = shown(qtbot, client)
    view.choose_file = lambda: str(adapter_file)  # type: ignore[method-assign]
    view.choose_button.click()
    view.name.setText("base:name")
    view.add_button.click()
    assert "cannot name an adapter" in view.add_status.text() and client.uploads == []


def test_remove_asks_first_then_removes(qtbot: QtBot) -> None:
    client = FakeClient()
    view = shown(qtbot, client)
    view.table.setCurrentItem(row(view, 1))
    answers = iter([False, True])
    view.confirm_remove = lambda name: next(answers)  # type: ignore[method-assign]
    view.remove_button.click()
    assert view.vm.removing is None and client.removed == []  # said no
    client.gate.clear()
    view.remove_button.click()
    assert view.vm.removing == "formal" and not view.remove_button.isEnabled()
    with qtbot.waitSignal(view.vm.loaded):
        client.gate.set()
    assert client.removed == ["formal"] and view.table.topLevelItemCount() == 1


def test_try_in_playground_names_the_adapters_model(qtbot: QtBot) -> None:
    view = shown(qtbot, FakeClient())
    view.table.setCurrentItem(row(view, 0))
    with qtbot.waitSignal(view.vm.try_in_playground) as tried:
        view.try_button.click()
    assert tried.args == [f"{MODEL}:pirate"]


def test_a_server_without_adapters_says_so(qtbot: QtBot) -> None:
    client = FakeClient()

    def unavailable() -> list[dict[str, Any]]:
        raise ApiError("LoRA adapters are not available on this server.", status=503)

    client.loras = unavailable  # type: ignore[method-assign]
    view = shown(qtbot, client)
    assert view.status.text() == "LoRA adapters are not available on this server." and view.status.isVisible()
    assert view.reload_button.isEnabled()


# -- the client's upload, against a stand-in server ----------------------------------------------------


def test_client_streams_the_file_with_its_length_and_reports_progress(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    path.write_bytes(bytes(range(256)) * 10_000)  # 2.4 MB: three chunks
    seen: dict[str, Any] = {}

    def server(request: httpx.Request) -> httpx.Response:
        seen.update(headers=request.headers, params=dict(request.url.params), path=request.url.path)
        seen["body"] = request.read()
        return httpx.Response(201, json=card("a"))

    client = ApiClient("http://127.0.0.1:1", "key-1", transport=httpx.MockTransport(server))
    progress: list[tuple[int, int]] = []
    assert client.add_lora(str(path), MODEL, "a", on_progress=lambda s, t: progress.append((s, t)))["name"] == "a"
    assert seen["path"] == "/v1/appliance/loras" and seen["params"] == {"base": MODEL, "name": "a"}
    assert seen["headers"]["content-type"] == "application/octet-stream"
    assert seen["headers"]["content-length"] == str(path.stat().st_size)
    assert seen["headers"]["authorization"] == "Bearer key-1"
    assert seen["body"] == path.read_bytes()
    total = path.stat().st_size
    assert [s for s, _ in progress] == [1 << 20, 2 << 20, total] and {t for _, t in progress} == {total}


def test_client_turns_a_refusal_and_a_missing_file_into_api_errors(tmp_path: Path) -> None:
    def server(request: httpx.Request) -> httpx.Response:
        request.read()
        error = {"message": REFUSAL, "type": "invalid_request_error", "param": None, "code": "invalid_lora"}
        return httpx.Response(400, content=json.dumps({"error": error}))

    client = ApiClient("http://127.0.0.1:1", transport=httpx.MockTransport(server))
    path = tmp_path / "wrong.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ApiError) as refused:
        client.add_lora(str(path), MODEL, "wrong")
    assert str(refused.value) == REFUSAL and refused.value.status == 400 and refused.value.code == "invalid_lora"
    with pytest.raises(ApiError, match=r"Cannot read .*gone\.gguf"):
        client.add_lora(str(tmp_path / "gone.gguf"), MODEL, "gone")
