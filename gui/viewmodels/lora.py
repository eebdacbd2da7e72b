"""The LoRA screen's state: the server's adapters, adding one by uploading its file, removing one.

Adding uploads the file (``POST /v1/appliance/loras`` with the raw bytes) rather than naming a
path, so it works the same against a server on this machine or on the LAN, and needs no
``lora_dirs``. The file is streamed from disk, so a large adapter never sits in memory, and the
bytes sent are reported as progress. The server validates the adapter against its base model
(names, shapes, architecture) and its refusal says what is wrong: that text is shown as is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from PySide6.QtCore import Signal

from gui import tasks
from gui.client import ApiClient
from gui.viewmodels.base import ScreenViewModel

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the server's rule for adapter names


def suggest_name(path: str) -> str:
    """An adapter name from its file name: what the server itself suggests for ``appliance lora add``."""
    stem = PurePath(path).name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:64] or "adapter"


class LoraViewModel(ScreenViewModel):
    title = "LoRA"
    try_in_playground = Signal(str)  # the adapter's model id ("base:name"), for the Playground to select

    def __init__(self, client: ApiClient) -> None:
        super().__init__(client)
        self.adapters: list[dict[str, Any]] = []
        self.bases: list[str] = []  # the loaded models, which an adapter can be added to
        self.uploading: str | None = None  # the adapter's name while its file is sent
        self.progress = 0.0  # 0..1 of the file sent
        self.add_error: str | None = None
        self.add_message: str | None = None
        self.removing: str | None = None

    def refresh(self) -> None:
        self.call(self._fetch, self._got, notify_loaded=True)

    def _fetch(self) -> tuple[list[dict[str, Any]], list[str]]:  # runs in a worker thread
        adapters = self.client.loras()
        bases = [card["id"] for card in self.client.models() if not card.get("parent")]
        return adapters, bases

    def _got(self, result: tuple[list[dict[str, Any]], list[str]]) -> None:
        self.adapters, self.bases = result

    def adapter(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.adapters if a.get("name") == name), None)

    # -- add ---------------------------------------------------------------------------------

    def add(self, path: str, base: str, name: str) -> None:
        """Upload the adapter file at ``path`` as ``name`` for the model ``base``."""
        if self.uploading is not None:
            return
        self.add_error = self.add_message = None
        if not base:
            self.add_error = "Choose the model the adapter was trained for."
        elif not NAME_RE.match(name):
            self.add_error = (
                f"'{name}' cannot name an adapter: use up to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit."
            )
        if self.add_error is not None:
            self.changed.emit()
            return
        self.uploading, self.progress = name, 0.0
        self.changed.emit()

        def upload(emit: Callable[[float], None]) -> dict[str, Any]:
            last = -1

            def sent(done: int, total: int) -> None:
                nonlocal last
                percent = done * 100 // total if total else 100
                if percent != last:  # one signal per percent, not one per chunk
                    last = percent
                    emit(percent / 100)

            return self.client.add_lora(path, base, name, on_progress=sent)

        tasks.run(upload, self._added, self._add_failed, on_progress=self._progress)

    def _progress(self, fraction: float) -> None:
        self.progress = fraction
        self.changed.emit()

    def _added(self, card: dict[str, Any]) -> None:
        self.uploading = None
        self.add_message = f"Added {card.get('name')} to {card.get('base')}: ask for it as model {card.get('id')}."
        self.changed.emit()
        self.refresh()

    def _add_failed(self, message: str) -> None:
        # shown beside the add controls; not ``error``, which is about the list
        self.add_error = f"{self.uploading} was not added: {message}"
        self.uploading = None
        self.changed.emit()

    # -- remove ------------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Remove an adapter; the server answers once the requests still using it have ended."""
        if self.removing is not None:
            return
        self.removing = name
        self.changed.emit()

        def done(_: Any) -> None:
            self.removing = None
            self.refresh()

        def failed(message: str) -> None:
            self.removing = None
            self.last_error = message
            self.error.emit(message)
            self.changed.emit()

        tasks.run(lambda: self.client.remove_lora(name), done, failed)

    def try_adapter(self, name: str) -> None:
        card = self.adapter(name)
        if card is not None:
            self.try_in_playground.emit(card.get("id") or f"{card.get('base')}:{name}")
