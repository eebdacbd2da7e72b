"""The Models screen against a fake client: registry, loaded models and adapters, plans, and import."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pytestqt.qtbot import QtBot

from appliance.api.app import create_app
from appliance.config import Settings
from appliance.scheduler import Scheduler
from gui.client import ApiClient, ApiError
from gui.viewmodels.models import ModelsViewModel
from gui.views.models import ModelsView
from tests.gui.test_hardware import REPORT
from tests.test_models_route import tiny_gguf

MODEL = "smollm2-135m-instruct"
BAD_FILE_MESSAGE = "/home/u/bad.gguf: not a GGUF file (bad magic bytes)"


def registered(model_id: str, *, loaded: bool, default: bool = False) -> dict[str, Any]:
    """An entry as GET /v1/appliance/models answers it."""
    return {
        "id": model_id,
        "object": "model",
        "engine": "gguf",
        "quantization": "Q4_1",
        "architecture": "llama",
        "context_length": 8192,
        "size_bytes": 98_362_432,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "description": "SmolLM2 135M Instruct",
        "aliases": [],
        "source": "built-in",
        "default": default,
        "loaded": loaded,
    }


class FakeClient:
    base_url = "http://127.0.0.1:9999"

    def __init__(self) -> None:
        self.registry = [registered(MODEL, loaded=True, default=True), registered("qwen-tiny", loaded=False)]
        self.registry[1].update(source="/home/u/.local/share/appliance/models.toml", quantization="Q8_0")
        # /v1/models: every chat model a request may name, with its state (not loaded ones load on demand)
        self.served = [
            {"id": MODEL, "object": "model", "created": 1, "owned_by": "appliance", "parent": None, "state": "loaded"},
            {"id": "qwen-tiny", "object": "model", "created": 1, "owned_by": "appliance", "state": "not_loaded"},
            {"id": f"{MODEL}:pirate", "object": "model", "created": 2, "parent": MODEL, "state": "loaded"},
        ]
        self.report: dict[str, Any] | None = copy.deepcopy(REPORT)
        self.has_registry_route = True
        self.imports: list[tuple[str, str | None]] = []
        self.import_gate = threading.Event()
        self.import_gate.set()

    def models(self) -> list[dict[str, Any]]:
        return self.served

    def registered_models(self) -> list[dict[str, Any]]:
        if not self.has_registry_route:
            raise ApiError("Not Found", status=404, code="not_found")
        return self.registry

    def hardware(self) -> dict[str, Any]:
        if self.report is None:
            raise ApiError("this server was started without a hardware report", status=404, code="not_found")
        return self.report

    def import_model(self, path: str, model_id: str | None = None) -> dict[str, Any]:
        self.imports.append((path, model_id))
        self.import_gate.wait(5)
        if path.endswith("bad.gguf"):
            raise ApiError(BAD_FILE_MESSAGE, status=400, code="invalid_model_file")
        entry = registered(model_id or "my-model.q4_1", loaded=False) | {"source": "models.toml"}
        self.registry.append(entry)
        return entry


def loaded_vm(qtbot: QtBot, client: FakeClient) -> ModelsViewModel:
    vm = ModelsViewModel(client)  # type: ignore[arg-type]
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    return vm


def test_rows_join_registry_adapters_and_plans(qtbot: QtBot) -> None:
    vm = loaded_vm(qtbot, FakeClient())
    assert vm.title == "Models" and vm.last_error is None
    assert [r.id for r in vm.rows] == [MODEL, "qwen-tiny"]
    smol, qwen = vm.rows
    assert smol.status == "serving (default)" and smol.adapters == ["pirate"]
    plan = {f.label: f for f in smol.plan}
    assert (plan["Device"].value, plan["Device"].reason) == ("cpu", "no GPU found")
    assert qwen.status == "registered, not loaded" and qwen.plan == () and qwen.adapters == []
    assert ("Registered in", "/home/u/.local/share/appliance/models.toml") in qwen.details


def test_an_older_server_without_registry_or_report_still_lists_loaded_models(qtbot: QtBot) -> None:
    client = FakeClient()
    client.has_registry_route, client.report = False, None
    client.served.append({"id": "other", "object": "model", "parent": None})
    vm = loaded_vm(qtbot, client)
    assert vm.last_error is None
    rows = [(r.id, r.loaded, r.adapters, r.plan) for r in vm.rows]
    assert rows == [(MODEL, True, ["pirate"], ()), ("other", True, [], ())]
    view = ModelsView(vm)
    qtbot.addWidget(view)
    assert "no hardware report" in view.details.toPlainText()


def test_view_lists_models_with_adapters_under_them_and_shows_the_plan(qtbot: QtBot) -> None:
    vm = loaded_vm(qtbot, FakeClient())
    view = ModelsView(vm)
    qtbot.addWidget(view)
    tree = view.tree
    assert tree.topLevelItemCount() == 2
    smol, qwen = tree.topLevelItem(0), tree.topLevelItem(1)
    assert smol is not None and qwen is not None
    assert [smol.text(c) for c in range(5)] == [MODEL, "serving (default)", "Q4_1", "8,192", "93.8 MB"]
    adapter = smol.child(0)
    assert smol.childCount() == 1 and adapter is not None and adapter.text(0) == "pirate"
    assert tree.currentItem() is smol
    text = view.details.toPlainText()
    assert "Plan on this machine" in text and "no GPU found" in text and "2 per thread" in text
    tree.setCurrentItem(qwen)
    assert "not loaded" in view.details.toPlainText() and "Q8_0" in view.details.toPlainText()


def test_import_shows_busy_then_the_new_model(qtbot: QtBot) -> None:
    client = FakeClient()
    vm = loaded_vm(qtbot, client)
    view = ModelsView(vm)
    qtbot.addWidget(view)
    view.show()
    client.import_gate.clear()
    view.choose_file = lambda: "/home/u/Downloads/My Model.Q4_1.gguf"  # type: ignore[method-assign]
    view.model_id.setText("my-model")
    view.import_button.click()
    qtbot.waitUntil(lambda: client.imports == [("/home/u/Downloads/My Model.Q4_1.gguf", "my-model")])
    assert view.busy.isVisible() and view.busy.maximum() == 0  # indeterminate
    assert "Importing My Model.Q4_1.gguf" in view.import_status.text()
    assert not view.import_button.isEnabled()
    with qtbot.waitSignal(vm.loaded):  # the list reloads after a good import
        client.import_gate.set()
    assert not view.busy.isVisible() and view.import_button.isEnabled()
    assert "Imported my-model (llama, Q4_1)" in view.import_status.text()
    assert [r.id for r in vm.rows][-1] == "my-model"
    assert view.tree.topLevelItemCount() == 3


def test_a_refused_file_shows_the_import_message_and_the_screen_stays_usable(qtbot: QtBot) -> None:
    client = FakeClient()
    vm = loaded_vm(qtbot, client)
    view = ModelsView(vm)
    qtbot.addWidget(view)
    view.show()
    view.choose_file = lambda: "/home/u/bad.gguf"  # type: ignore[method-assign]
    errors: list[str] = []
    vm.error.connect(errors.append)
    view.import_button.click()
    qtbot.waitUntil(lambda: vm.importing is None and vm.import_error is not None)
    assert view.import_status.text() == f"bad.gguf was not imported: {BAD_FILE_MESSAGE}"
    assert view.import_button.isEnabled() and not view.busy.isVisible() and not errors
    assert view.tree.topLevelItemCount() == 2  # the list is untouched


def test_cancelling_the_file_dialog_imports_nothing(qtbot: QtBot) -> None:
    client = FakeClient()
    view = ModelsView(loaded_vm(qtbot, client))
    qtbot.addWidget(view)
    view.choose_file = lambda: ""  # type: ignore[method-assign]
    view.import_button.click()
    assert client.imports == [] and view.vm.importing is None


def test_a_server_gone_away_is_said(qtbot: QtBot) -> None:
    client = FakeClient()

    def gone() -> list[dict[str, Any]]:
        raise ApiError("The server at http://127.0.0.1:9999 cannot be reached (ConnectError).")

    client.models = gone  # type: ignore[method-assign]
    vm = ModelsViewModel(client)  # type: ignore[arg-type]
    view = ModelsView(vm)
    qtbot.addWidget(view)
    view.show()
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    assert "cannot be reached" in view.status.text() and view.status.isVisible()
    assert view.reload_button.isEnabled() and view.import_button.isEnabled()


class InProcess(httpx.BaseTransport):
    """The in-process app as the client's server: no socket, as the route tests."""

    def __init__(self, http: TestClient) -> None:
        self.http = http

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        answer = self.http.request(request.method, str(request.url), headers=dict(request.headers), content=body)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def test_the_client_speaks_the_real_routes(tmp_path: Path) -> None:
    """The fake's shapes are the server's: the client's new calls against the real app, in-process."""
    app = create_app(Scheduler(), Settings())
    with TestClient(app, base_url="http://localhost", client=("127.0.0.1", 1)) as http:
        client = ApiClient("http://localhost", transport=InProcess(http))
        imported = client.import_model(str(tiny_gguf(tmp_path / "tiny.gguf")), "tiny")
        assert imported["id"] == "tiny" and imported["loaded"] is False
        assert {m["id"] for m in client.registered_models()} >= {MODEL, "tiny"}
        (tmp_path / "bad.gguf").write_bytes(b"not a model at all")
        with pytest.raises(ApiError, match="not a GGUF file") as refused:
            client.import_model(str(tmp_path / "bad.gguf"))
        assert refused.value.status == 400
        live = client.hardware_live()
        assert live["ram_total"] > 0 and len(live["cpu_per_core"]) >= 1 and live["gpus"] is None
