"""The Settings screen: the server's ``config.toml`` as a form, saved through the server itself.

The GUI may be attached to a server on another machine, so the file is never touched here: the
server describes each setting (``GET /v1/appliance/settings``) and validates and writes the changes
(``PUT``), with the same rules and wording as ``appliance --serve`` at start-up. The form shows what
the file says (the value the next start uses), not the running value: the two differ when the file
changed since the start, or when an environment variable or flag overrides it, and then a note says so.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from PySide6.QtCore import Signal

from gui.client import ApiClient
from gui.viewmodels.base import ScreenViewModel

Setting = dict[str, Any]  # one entry of the route's "settings" list (appliance.api.settings.SettingInfo)

# How the form groups the settings; one the server adds later lands in OTHER until it is placed here.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Server", ("host", "port", "socket", "api_key", "allowed_hosts", "allowed_origins", "log_level")),
    (
        "Models and hardware",
        (
            "models",
            "device",
            "ctx_size",
            "parallel",
            "threads",
            "batch_size",
            "gpu_layers",
            "flash_attn",
            "prefix_cache",
            "speculative",
            "lora_batching",
            "lora_dirs",
            "verify_sha256",
            "probe_timeout",
        ),
    ),
    (
        "Requests and limits",
        (
            "max_queue",
            "queue_timeout",
            "max_body_bytes",
            "max_upload_mb",
            "header_timeout",
            "body_timeout",
            "shutdown_timeout",
        ),
    ),
    (
        "Request log",
        (
            "log_requests",
            "log_file",
            "log_redact_builtin",
            "log_redact",
            "log_max_age_days",
            "log_max_rows",
            "log_max_mb",
            "log_buffer",
        ),
    ),
)
OTHER = "Other"
DEFAULT_SOURCE = "default"


def shown(value: Any) -> str:
    """A value in words for a note: lists joined, null as the server's own choice."""
    if value is None:
        return "the default"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class SettingsViewModel(ScreenViewModel):
    title = "Settings"
    reset = Signal()  # the settings were (re)loaded or the edits dropped: views re-read every value

    def __init__(self, client: ApiClient) -> None:
        super().__init__(client)
        self.file = ""
        self.file_error: str | None = None
        self.settings: dict[str, Setting] = {}
        self.edits: dict[str, Any] = {}
        self.banner: str | None = None

    # -- loading -----------------------------------------------------------------------------

    def refresh(self) -> None:
        self.call(self.client.settings, self._got_report, notify_loaded=True)

    def _got_report(self, report: dict[str, Any]) -> None:
        self.file = report["file"]
        self.file_error = report.get("file_error")
        self.settings = {s["name"]: s for s in report["settings"]}
        self.edits.clear()
        self.reset.emit()

    def groups(self) -> list[tuple[str, list[Setting]]]:
        """The settings by group, in the form's order; empty groups left out."""
        placed = {name for _, names in GROUPS for name in names}
        groups = [(title, [self.settings[n] for n in names if n in self.settings]) for title, names in GROUPS]
        groups.append((OTHER, [s for name, s in self.settings.items() if name not in placed]))
        return [(title, settings) for title, settings in groups if settings]

    # -- values ----------------------------------------------------------------------------

    def saved_value(self, name: str) -> Any:
        """What the next server start uses from the file: the file's value, else the default."""
        setting = self.settings[name]
        return setting["file_value"] if setting["in_file"] else setting["default"]

    def value(self, name: str) -> Any:
        return self.edits.get(name, self.saved_value(name))

    def set_value(self, name: str, value: Any) -> None:
        """Record an edit; back at the saved value, it is no edit. An empty secret keeps the saved one."""
        setting = self.settings[name]
        if (setting["secret"] and not value) or (not setting["secret"] and value == self.saved_value(name)):
            self.edits.pop(name, None)
        else:
            self.edits[name] = value
        self.changed.emit()

    @property
    def dirty(self) -> bool:
        return bool(self.edits)

    def note(self, name: str) -> str:
        """Why the running server does not use what the form shows, if it does not."""
        setting = self.settings[name]
        source = setting["source"]
        from_file = source is not None and source.startswith(PurePath(self.file).name + " ")
        if source not in (None, DEFAULT_SOURCE) and not from_file:
            if setting["secret"]:
                return f"Set by {source} when the server started; that wins over config.toml."
            return f"Set by {source} when the server started ({shown(setting['value'])}); that wins over config.toml."
        if not setting["secret"] and setting["value"] != self.saved_value(name):
            return f"The server runs with {shown(setting['value'])} until it restarts."
        return ""

    def secret_hint(self, name: str) -> str:
        """What the field of a secret shows in place of its value, which is never sent."""
        setting = self.settings[name]
        if setting["in_file"]:
            return "saved in config.toml; type a new one to replace it"
        if setting["is_set"]:
            return "set when the server started; type one to save it in config.toml"
        return "not set"

    # -- actions -------------------------------------------------------------------------------

    def revert(self) -> None:
        self.edits.clear()
        self.changed.emit()
        self.reset.emit()

    def save(self) -> None:
        """Send the edits; once saved, reload the description so the form shows the file as it now is."""
        if not self.edits or self.busy:
            return
        values = dict(self.edits)

        def save_and_reload() -> tuple[dict[str, Any], dict[str, Any]]:
            return self.client.save_settings(values), self.client.settings()

        self.call(save_and_reload, self._saved)

    def _saved(self, result: tuple[dict[str, Any], dict[str, Any]]) -> None:
        saved, report = result
        if saved["restart_required"]:
            self.banner = f"Saved to {saved['file']}; restart the server to apply"
        else:
            self.banner = f"{saved['file']} already holds these values"
        self._got_report(report)
