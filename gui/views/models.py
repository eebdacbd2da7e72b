"""The Models screen's widgets: the model list with adapters under their model, the chosen one's plan, and import."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTextBrowser,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.hardware import Fact, Section, human_size
from gui.viewmodels.models import ModelRow, ModelsViewModel
from gui.views.hardware import LEVEL_COLORS, sections_html

COLUMNS = ("Model", "Status", "Quantization", "Context", "Size")
OK_COLOR = "#1e7b34"


def details_html(row: ModelRow) -> str:
    sections = [Section(row.id, tuple(Fact(label, value) for label, value in row.details))]
    if row.plan:
        sections.append(Section("Plan on this machine", row.plan, decisions=True))
    elif row.loaded:
        sections.append(Section("Plan on this machine", (Fact("Plan", "the server has no hardware report"),)))
    else:
        why = "the plan is made when the server loads the model"
        sections.append(Section("Plan on this machine", (Fact("Plan", "not loaded", why),)))
    return sections_html(sections)


class ModelsView(QWidget):
    def __init__(self, vm: ModelsViewModel) -> None:
        super().__init__()
        self.vm = vm
        self.tree = QTreeWidget()
        self.tree.setAccessibleName("Models and their adapters")
        self.tree.setColumnCount(len(COLUMNS))
        self.tree.setHeaderLabels(list(COLUMNS))
        self.tree.setRootIsDecorated(True)
        header = self.tree.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for column in (2, 3, 4):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        self.details = QTextBrowser()
        self.details.setAccessibleName("The chosen model's details and plan")
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.tree)
        split.addWidget(self.details)
        split.setSizes([600, 600])

        self.model_id = QLineEdit()
        self.model_id.setPlaceholderText("id (optional: from the file name)")
        self.model_id.setAccessibleName("Id for the imported model")
        self.model_id.setMaximumWidth(260)
        self.import_button = QPushButton("Import GGUF file…")
        self.import_button.setAccessibleName("Import a GGUF model file")
        self.reload_button = QPushButton("Reload")
        self.reload_button.setAccessibleName("Reload the models")
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)  # indeterminate: the server reports no progress while it copies and hashes
        self.busy.setAccessibleName("Import in progress")
        self.busy.setMaximumWidth(200)
        self.import_status = QLabel()
        self.import_status.setAccessibleName("Import status")
        self.import_status.setWordWrap(True)
        self.import_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status = QLabel()
        self.status.setAccessibleName("Models status")
        self.status.setWordWrap(True)
        self.status.setStyleSheet(f"color: {LEVEL_COLORS['error']}")

        bar = QHBoxLayout()
        bar.addWidget(QLabel("Import a model file (on the server's machine):"))
        bar.addWidget(self.model_id)
        bar.addWidget(self.import_button)
        bar.addWidget(self.busy)
        bar.addStretch()
        bar.addWidget(self.reload_button)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(self.import_status)
        layout.addWidget(self.status)
        layout.addWidget(split, 1)

        self.import_button.clicked.connect(self._import)
        self.reload_button.clicked.connect(vm.refresh)
        self.tree.currentItemChanged.connect(lambda *_: self._show_details())
        vm.changed.connect(self._sync)
        self._shown_rows: list[ModelRow] | None = None
        self._sync()

    def choose_file(self) -> str:
        """The GGUF file to import, or "" when the user cancels (tests replace this)."""
        path, _ = QFileDialog.getOpenFileName(self, "Import a GGUF model", "", "GGUF models (*.gguf);;All files (*)")
        return path

    def _import(self) -> None:
        path = self.choose_file()
        if path:
            self.vm.import_file(path, self.model_id.text().strip() or None)

    def _sync(self) -> None:
        vm = self.vm
        self.import_button.setEnabled(vm.importing is None)
        self.reload_button.setEnabled(not vm.busy)
        self.busy.setVisible(vm.importing is not None)
        if vm.importing is not None:
            self._say(f"Importing {vm.importing}: checking, copying and hashing it on the server…", "")
        elif vm.import_error:
            self._say(vm.import_error, LEVEL_COLORS["error"])
        elif vm.import_message:
            self._say(vm.import_message, OK_COLOR)
        else:
            self._say("", "")
        self.status.setText(f"The models could not be loaded: {vm.last_error}" if vm.last_error else "")
        self.status.setVisible(bool(vm.last_error))
        if vm.rows is not self._shown_rows:
            self._shown_rows = vm.rows
            self._fill(vm.rows)

    def _say(self, text: str, color: str) -> None:
        self.import_status.setText(text)
        self.import_status.setStyleSheet(f"color: {color}" if color else "")
        self.import_status.setVisible(bool(text))

    def _fill(self, rows: list[ModelRow]) -> None:
        current = self.tree.currentItem()
        chosen = current.data(0, Qt.ItemDataRole.UserRole) if current is not None else None
        self.tree.clear()
        for row in rows:
            context = f"{row.context_length:,}" if row.context_length else ""
            size = human_size(row.size_bytes) if row.size_bytes is not None else ""
            item = QTreeWidgetItem([row.id, row.status, row.quantization or "", context, size])
            item.setData(0, Qt.ItemDataRole.UserRole, row.id)
            item.setToolTip(0, row.description or row.id)
            self.tree.addTopLevelItem(item)
            for name in row.adapters:
                child = QTreeWidgetItem([name, "LoRA adapter, loaded"])
                child.setData(0, Qt.ItemDataRole.UserRole, row.id)
                child.setToolTip(0, f"ask for it as model {row.id}:{name}")
                item.addChild(child)
            item.setExpanded(True)
            if row.id == chosen or (chosen is None and self.tree.currentItem() is None):
                self.tree.setCurrentItem(item)
        self._show_details()

    def _show_details(self) -> None:
        item = self.tree.currentItem()
        row = self.vm.row(item.data(0, Qt.ItemDataRole.UserRole)) if item is not None else None
        if row is None:
            empty = "No model yet." if not self.vm.busy else "Loading…"
            self.details.setHtml(f"<p style='color:#777'>{empty}</p>")
            return
        self.details.setHtml(details_html(row))
