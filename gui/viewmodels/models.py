"""The Models screen's state: every registered model, whether the server serves it, its plan and adapters.

Three routes make one list: the registry (``/v1/appliance/models``: every model, loaded or not),
the loaded models and adapters (``/v1/models``, where an adapter is a model with a ``parent``)
and the hardware report (each loaded model's plan, with the reason for each choice). A server
without the registry route (an older one) still gives the loaded models, and one without a report
still gives the list: only the parts that answered are shown.

Importing a GGUF file asks the server to copy and hash it, which takes minutes for a big file and
reports no progress: the screen shows it as busy, with the file's name, and the import's own
validation message if the file is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from gui import tasks
from gui.client import ApiClient, ApiError
from gui.viewmodels.base import ScreenViewModel
from gui.viewmodels.hardware import Fact, human_size, plan_facts


@dataclass
class ModelRow:
    id: str
    loaded: bool
    default: bool = False
    quantization: str | None = None
    architecture: str | None = None
    context_length: int | None = None
    size_bytes: int | None = None
    description: str | None = None
    source: str = ""
    sha256: str | None = None
    adapters: list[str] = field(default_factory=list)  # adapter names, loaded on this model
    plan: tuple[Fact, ...] = ()  # empty when the server has no plan for it (not loaded, or no report)

    @property
    def status(self) -> str:
        state = "serving" if self.loaded else "registered, not loaded"
        return f"{state} (default)" if self.default else state

    @property
    def details(self) -> list[tuple[str, str]]:
        """What the registry says about the model, as label/value pairs for the details panel."""
        rows = [
            ("Status", self.status),
            ("Description", self.description or ""),
            ("Architecture", self.architecture or ""),
            ("Quantization", self.quantization or ""),
            ("Context length", f"{self.context_length} tokens" if self.context_length else ""),
            ("File size", human_size(self.size_bytes) if self.size_bytes is not None else ""),
            ("sha256", self.sha256 or ""),
            ("Registered in", self.source),
            ("Adapters", ", ".join(self.adapters)),
        ]
        return [(label, value) for label, value in rows if value]


@dataclass(frozen=True)
class Snapshot:
    """What the three routes answered, fetched together in one worker call."""

    registered: list[dict[str, Any]] | None  # None: the server has no registry route
    served: list[dict[str, Any]]
    report: dict[str, Any] | None  # None: the server has no hardware report


def build_rows(snapshot: Snapshot) -> list[ModelRow]:
    """One row per model: the registry's order, then any loaded model the registry did not list."""
    rows: dict[str, ModelRow] = {}
    # /v1/models lists every chat model a request may name; ``state`` says which are loaded (a server
    # older than on-demand loading lists only loaded ones, without a state)
    served_ids = [
        card["id"] for card in snapshot.served if not card.get("parent") and card.get("state", "loaded") == "loaded"
    ]
    for entry in snapshot.registered or ():
        rows[entry["id"]] = ModelRow(
            id=entry["id"],
            loaded=bool(entry.get("loaded")) or entry["id"] in served_ids,
            default=bool(entry.get("default")),
            quantization=entry.get("quantization"),
            architecture=entry.get("architecture"),
            context_length=entry.get("context_length"),
            size_bytes=entry.get("size_bytes"),
            description=entry.get("description"),
            source=entry.get("source", ""),
            sha256=entry.get("sha256"),
        )
    for model_id in served_ids:
        rows.setdefault(model_id, ModelRow(id=model_id, loaded=True))
    for card in snapshot.served:
        parent = card.get("parent")
        if parent:
            name = card["id"].removeprefix(f"{parent}:")
            rows.setdefault(parent, ModelRow(id=parent, loaded=True)).adapters.append(name)
    for plan in (snapshot.report or {}).get("plans", ()):
        if plan.get("model") in rows:
            rows[plan["model"]].plan = plan_facts(plan)
    return list(rows.values())


class ModelsViewModel(ScreenViewModel):
    title = "Models"

    def __init__(self, client: ApiClient) -> None:
        super().__init__(client)
        self.rows: list[ModelRow] = []
        self.importing: str | None = None  # the file name while an import runs
        self.import_error: str | None = None
        self.import_message: str | None = None  # what the last good import registered

    def refresh(self) -> None:
        self.call(self._fetch, self._got, notify_loaded=True)

    def _fetch(self) -> Snapshot:  # runs in a worker thread
        served = self.client.models()
        try:
            registered: list[dict[str, Any]] | None = self.client.registered_models()
        except ApiError as exc:
            if exc.status != 404:
                raise
            registered = None
        try:
            report: dict[str, Any] | None = self.client.hardware()
        except ApiError as exc:
            if exc.status != 404:
                raise
            report = None
        return Snapshot(registered, served, report)

    def _got(self, snapshot: Snapshot) -> None:
        self.rows = build_rows(snapshot)

    def row(self, model_id: str) -> ModelRow | None:
        return next((r for r in self.rows if r.id == model_id), None)

    # -- import ----------------------------------------------------------------------------

    def import_file(self, path: str, model_id: str | None = None) -> None:
        """Ask the server to import ``path`` (a file on the server's machine) under ``model_id``."""
        if self.importing is not None:
            return
        self.importing = PurePath(path).name
        self.import_error = self.import_message = None
        self.changed.emit()
        tasks.run(lambda: self.client.import_model(path, model_id or None), self._imported, self._import_failed)

    def _imported(self, model: dict[str, Any]) -> None:
        self.importing = None
        self.import_message = (
            f"Imported {model['id']} ({model.get('architecture') or '?'}, {model.get('quantization') or '?'}). "
            "The server serves it after a restart with it among its models."
        )
        self.changed.emit()
        self.refresh()

    def _import_failed(self, message: str) -> None:
        # shown under the import controls, with the file's name; not ``error``, which is about the list
        self.import_error = f"{self.importing} was not imported: {message}"
        self.importing = None
        self.changed.emit()
