"""The Settings screen against a fake client: the form follows the description, saves only the edits.

The fake keeps a ``config.toml`` table of its own and answers like ``/v1/appliance/settings``:
a save changes what the next description says, as on a real server.
"""

from __future__ import annotations

from typing import Any

import pytest
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QPlainTextEdit, QSpinBox, QWidget
from pytestqt.qtbot import QtBot

from gui.client import ApiClient, ApiError
from gui.viewmodels.settings import OTHER, SettingsViewModel
from gui.views.settings import SettingsView

FILE = "/home/ada/.local/share/appliance/config.toml"


def _setting(name: str, type: str, default: Any, **facts: Any) -> dict[str, Any]:
    base = {
        "name": name,
        "description": f"What {name} does.",
        "type": type,
        "items": "string" if type == "array" else None,
        "format": None,
        "nullable": default is None,
        "choices": None,
        "minimum": None,
        "maximum": None,
        "exclusive_minimum": None,
        "exclusive_maximum": None,
        "min_length": None,
        "pattern": None,
        "secret": False,
        "default": default,
        "source": "default",
    }
    return {**base, **facts}


SETTINGS = [
    _setting("host", "string", "127.0.0.1"),
    _setting("port", "integer", 8484, minimum=0, maximum=65535),
    _setting("api_key", "string", None, secret=True, min_length=8),
    _setting("log_level", "string", "info", choices=["debug", "info", "warning", "error"]),
    _setting("models", "array", []),
    _setting("device", "string", "auto", choices=["auto", "cpu", "cuda"]),
    _setting("ctx_size", "integer", None, minimum=128, maximum=1 << 20),
    _setting("threads", "integer", None, minimum=1, maximum=1024, source="APPLIANCE_THREADS"),
    _setting("speculative", "string", None, choices=["off", "prompt-lookup"]),
    _setting("flash_attn", "boolean", True),
    _setting("probe_timeout", "number", 15.0, exclusive_minimum=0, maximum=600),
    _setting("log_max_mb", "number", None, exclusive_minimum=0),
    _setting("log_file", "string", None, format="path"),
    _setting("brand_new", "boolean", False),
]
RUNNING = {"threads": 6}


class FakeClient:
    """The two settings routes, over an in-memory config.toml table."""

    def __init__(self, table: dict[str, Any] | None = None) -> None:
        self.table: dict[str, Any] = dict(table or {})
        self.saves: list[dict[str, Any]] = []
        self.fail_save: str | None = None

    def settings(self) -> dict[str, Any]:
        described = []
        for setting in SETTINGS:
            name = setting["name"]
            secret = setting["secret"]
            value = RUNNING.get(name, setting["default"])
            described.append(
                {
                    **setting,
                    "value": None if secret else value,
                    "is_set": value is not None,
                    "in_file": name in self.table,
                    "file_value": None if secret else self.table.get(name),
                }
            )
        return {"file": FILE, "file_error": None, "settings": described}

    def save_settings(self, values: dict[str, Any]) -> dict[str, Any]:
        self.saves.append(values)
        if self.fail_save:
            raise ApiError(self.fail_save, status=400, code="invalid_setting")
        changed = [n for n, v in values.items() if self.table.get(n) != v]
        for name, value in values.items():
            if value is None:
                self.table.pop(name, None)
            else:
                self.table[name] = value
        return {"file": FILE, "changed": changed, "restart_required": bool(changed), "restart_settings": changed}


def _loaded(qtbot: QtBot, client: FakeClient) -> tuple[SettingsViewModel, SettingsView]:
    vm = SettingsViewModel(client)  # type: ignore[arg-type]
    view = SettingsView(vm)
    qtbot.addWidget(view)
    with qtbot.waitSignal(vm.loaded, timeout=5000):
        vm.refresh()
    return vm, view


def _save(qtbot: QtBot, vm: SettingsViewModel, view: SettingsView) -> None:
    with qtbot.waitSignal(vm.changed, timeout=5000, check_params_cb=lambda *_: not vm.busy):
        view.save_button.click()


def test_the_form_follows_the_description(qtbot: QtBot) -> None:
    vm, view = _loaded(qtbot, FakeClient({"port": 9000}))
    assert vm.title == "Settings"
    assert [title for title, _ in vm.groups()] == ["Server", "Models and hardware", "Request log", OTHER]
    assert set(view.editors) == {s["name"] for s in SETTINGS}
    port = view.editors["port"].widget
    assert isinstance(port, QSpinBox) and (port.minimum(), port.maximum(), port.value()) == (0, 65535, 9000)
    ctx = view.editors["ctx_size"].widget
    assert isinstance(ctx, QSpinBox) and ctx.minimum() == 127 and ctx.text() == "default"
    probe = view.editors["probe_timeout"].widget
    assert isinstance(probe, QDoubleSpinBox) and probe.minimum() > 0 and probe.maximum() == 600
    device = view.editors["device"].widget
    assert isinstance(device, QComboBox) and device.currentText() == "auto"
    speculative = view.editors["speculative"].widget
    assert isinstance(speculative, QComboBox) and speculative.currentData() is None
    assert isinstance(view.editors["flash_attn"].widget, QCheckBox)
    assert isinstance(view.editors["models"].widget, QPlainTextEdit)
    assert view.editors["port"].widget.toolTip() == "What port does."
    assert not view.save_button.isEnabled() and not view.banner.isVisibleTo(view)
    assert FILE in view.where.text()


def test_every_control_is_named_and_reachable_by_keyboard(qtbot: QtBot) -> None:
    _, view = _loaded(qtbot, FakeClient())
    controls = [w for w in view.findChildren(QWidget) if w.focusPolicy() != w.focusPolicy().NoFocus]
    unnamed = [type(w).__name__ for w in controls if not w.accessibleName() and w.isVisibleTo(view)]
    unnamed = [n for n in unnamed if n not in ("QScrollBar", "QLineEdit")]  # a spin box's inner line edit
    assert unnamed == []
    for editor in view.editors.values():
        assert editor.widget.focusPolicy() & editor.widget.focusPolicy().TabFocus


def test_save_sends_only_the_edits_and_says_to_restart(qtbot: QtBot) -> None:
    client = FakeClient({"port": 9000})
    vm, view = _loaded(qtbot, client)
    port = view.editors["port"].widget
    assert isinstance(port, QSpinBox)
    port.setValue(9100)
    models = view.editors["models"].widget
    assert isinstance(models, QPlainTextEdit)
    models.setPlainText("qwen\n\nsmollm\n")
    device = view.editors["device"].widget
    assert isinstance(device, QComboBox)
    device.setCurrentIndex(device.findData("cpu"))
    assert vm.dirty and view.save_button.isEnabled() and view.labels["port"].font().bold()
    _save(qtbot, vm, view)
    assert client.saves == [{"port": 9100, "models": ["qwen", "smollm"], "device": "cpu"}]
    assert view.banner.isVisibleTo(view) and view.banner.text() == f"Saved to {FILE}; restart the server to apply"
    assert not vm.dirty and not view.save_button.isEnabled()
    assert port.value() == 9100 and vm.saved_value("port") == 9100  # the form now shows the file


def test_back_to_default_removes_the_setting(qtbot: QtBot) -> None:
    client = FakeClient({"ctx_size": 8192, "log_max_mb": 500.0, "log_file": "/var/log/requests.sqlite"})
    vm, view = _loaded(qtbot, client)
    ctx = view.editors["ctx_size"].widget
    mb = view.editors["log_max_mb"].widget
    log_file = view.editors["log_file"].widget
    assert isinstance(ctx, QSpinBox) and isinstance(mb, QDoubleSpinBox) and isinstance(log_file, QLineEdit)
    assert ctx.value() == 8192
    ctx.setValue(ctx.minimum())
    mb.setValue(mb.minimum())
    log_file.clear()
    _save(qtbot, vm, view)
    assert client.saves == [{"ctx_size": None, "log_max_mb": None, "log_file": None}]
    assert client.table == {}


def test_revert_restores_the_saved_values(qtbot: QtBot) -> None:
    vm, view = _loaded(qtbot, FakeClient({"flash_attn": False}))
    flash = view.editors["flash_attn"].widget
    host = view.editors["host"].widget
    assert isinstance(flash, QCheckBox) and isinstance(host, QLineEdit)
    flash.setChecked(True)
    host.setText("0.0.0.0")
    assert len(vm.edits) == 2 and view.state.text() == "2 unsaved changes"
    view.revert_button.click()
    assert not vm.dirty and not flash.isChecked() and host.text() == "127.0.0.1"
    assert not view.revert_button.isEnabled()


def test_a_refused_value_is_shown_and_the_edits_stay(qtbot: QtBot) -> None:
    client = FakeClient()
    client.fail_save = "threads = 0: must be at least 1"
    vm, view = _loaded(qtbot, client)
    threads = view.editors["threads"].widget
    assert isinstance(threads, QSpinBox)
    threads.setValue(12)
    _save(qtbot, vm, view)
    assert view.message.isVisibleTo(view) and view.message.text() == "threads = 0: must be at least 1"
    assert vm.edits == {"threads": 12} and view.save_button.isEnabled()  # fix it and save again
    client.fail_save = None
    _save(qtbot, vm, view)
    assert not view.message.isVisibleTo(view) and client.table == {"threads": 12}


def test_the_api_key_is_replaced_only_when_typed(qtbot: QtBot) -> None:
    client = FakeClient({"api_key": "old-secret-1"})
    vm, view = _loaded(qtbot, client)
    key = view.editors["api_key"].widget
    assert isinstance(key, QLineEdit)
    assert key.echoMode() == QLineEdit.EchoMode.Password and key.text() == ""
    assert "saved in config.toml" in key.placeholderText()
    view.editors["port"].widget.setFocus()
    port = view.editors["port"].widget
    assert isinstance(port, QSpinBox)
    port.setValue(9001)
    _save(qtbot, vm, view)
    assert client.saves[-1] == {"port": 9001}  # an empty key field keeps the saved key
    key.setText("new-secret-2")
    _save(qtbot, vm, view)
    assert client.saves[-1] == {"api_key": "new-secret-2"} and key.text() == ""


def test_an_override_and_a_pending_restart_are_noted(qtbot: QtBot) -> None:
    vm, view = _loaded(qtbot, FakeClient({"threads": 4, "port": 9000}))
    assert "APPLIANCE_THREADS" in view.notes["threads"].text() and view.notes["threads"].isVisibleTo(view)
    assert vm.note("port") == "The server runs with 8484 until it restarts."
    assert vm.note("host") == "" and not view.notes["host"].isVisibleTo(view)


@pytest.mark.parametrize("status", [None, 503])
def test_a_load_failure_is_shown(qtbot: QtBot, status: int | None) -> None:
    class Gone(FakeClient):
        def settings(self) -> dict[str, Any]:
            raise ApiError("The server at http://127.0.0.1:1 cannot be reached (ConnectError).", status=status)

    vm = SettingsViewModel(Gone())  # type: ignore[arg-type]
    view = SettingsView(vm)
    qtbot.addWidget(view)
    with qtbot.waitSignal(vm.loaded, timeout=5000):
        vm.refresh()
    assert view.message.isVisibleTo(view) and "cannot be reached" in view.message.text()
    assert view.editors == {} and not view.save_button.isEnabled()


def test_the_fake_matches_the_client() -> None:
    for name in ("settings", "save_settings"):
        assert callable(getattr(ApiClient, name))
