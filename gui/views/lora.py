"""The LoRA screen's widgets: the adapters on the server, a form to upload one, remove and try buttons."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.hardware import human_size
from gui.viewmodels.lora import LoraViewModel, suggest_name
from gui.views.hardware import LEVEL_COLORS
from gui.views.models import OK_COLOR

COLUMNS = ("Adapter", "Base model", "Rank", "Alpha", "Tensors", "Size", "State")


def state_text(card: dict[str, Any]) -> str:
    if card.get("error"):
        return f"failed to load: {card['error']}"
    if card.get("in_use"):
        return f"in use by {card['in_use']} request(s)"
    return "loaded" if card.get("loaded") else "stored"


class LoraView(QWidget):
    def __init__(self, vm: LoraViewModel) -> None:
        super().__init__()
        self.vm = vm
        self.path = ""
        self.table = QTreeWidget()
        self.table.setAccessibleName("LoRA adapters")
        self.table.setRootIsDecorated(False)
        self.table.setColumnCount(len(COLUMNS))
        self.table.setHeaderLabels(list(COLUMNS))
        header = self.table.header()
        header.setStretchLastSection(True)
        for column in range(len(COLUMNS) - 1):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setAccessibleName("Remove the chosen adapter")
        self.try_button = QPushButton("Try in Playground")
        self.try_button.setAccessibleName("Try the chosen adapter in the Playground")
        self.reload_button = QPushButton("Reload")
        self.reload_button.setAccessibleName("Reload the adapters")
        self.status = QLabel()
        self.status.setAccessibleName("LoRA status")
        self.status.setWordWrap(True)
        self.status.setStyleSheet(f"color: {LEVEL_COLORS['error']}")

        self.choose_button = QPushButton("Choose file…")
        self.choose_button.setAccessibleName("Choose the adapter file")
        self.file_label = QLabel("no file chosen")
        self.file_label.setAccessibleName("Chosen adapter file")
        self.base = QComboBox()
        self.base.setAccessibleName("Base model of the adapter")
        self.base.setMinimumWidth(260)
        self.base.setMaximumWidth(480)
        self.name = QLineEdit()
        self.name.setAccessibleName("Adapter name")
        self.name.setPlaceholderText("letters, digits, '.', '_', '-'")
        self.name.setMaximumWidth(480)
        self.add_button = QPushButton("Upload and add")
        self.add_button.setAccessibleName("Upload and add the adapter")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setAccessibleName("Upload progress")
        self.add_status = QLabel()
        self.add_status.setAccessibleName("Add adapter status")
        self.add_status.setWordWrap(True)
        self.add_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        file_row = QHBoxLayout()
        file_row.addWidget(self.choose_button)
        file_row.addWidget(self.file_label, 1)
        form_box = QGroupBox("Add an adapter (a GGUF LoRA file, uploaded to the server)")
        form = QFormLayout(form_box)
        form.addRow("File", file_row)
        form.addRow("Base model", self.base)
        form.addRow("Name", self.name)
        add_row = QHBoxLayout()
        add_row.addWidget(self.add_button)
        add_row.addWidget(self.progress, 1)
        add_row.addStretch()  # keeps the button its own size while no progress bar shows
        form.addRow(add_row)
        form.addRow(self.add_status)

        buttons = QHBoxLayout()
        buttons.addWidget(QLabel("Adapters on the server"))
        buttons.addStretch()
        for button in (self.try_button, self.remove_button, self.reload_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)
        layout.addWidget(form_box)

        self.choose_button.clicked.connect(self._choose)
        self.add_button.clicked.connect(self._add)
        self.remove_button.clicked.connect(self._remove)
        self.try_button.clicked.connect(self._try)
        self.reload_button.clicked.connect(vm.refresh)
        self.table.currentItemChanged.connect(lambda *_: self._sync_buttons())
        vm.changed.connect(self._sync)
        self._shown: list[dict[str, Any]] | None = None
        self._sync()

    # -- what tests replace: the dialogs -------------------------------------------------------

    def choose_file(self) -> str:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a LoRA adapter", "", "GGUF adapters (*.gguf);;All files (*)"
        )
        return path

    def confirm_remove(self, name: str) -> bool:
        answer = QMessageBox.question(
            self, "Remove adapter", f"Remove the adapter {name} from the server? Its file is deleted there."
        )
        return answer == QMessageBox.StandardButton.Yes

    # -- actions -----------------------------------------------------------------------------

    def chosen(self) -> str | None:
        item = self.table.currentItem()
        return (item.text(0) or None) if item is not None else None

    def _choose(self) -> None:
        path = self.choose_file()
        if path:
            self.path = path
            self.file_label.setText(path)
            self.file_label.setToolTip(path)
            self.name.setText(suggest_name(path))
            self._sync_buttons()

    def _add(self) -> None:
        self.vm.add(self.path, self.base.currentText(), self.name.text().strip())

    def _remove(self) -> None:
        name = self.chosen()
        if name is not None and self.confirm_remove(name):
            self.vm.remove(name)

    def _try(self) -> None:
        name = self.chosen()
        if name is not None:
            self.vm.try_adapter(name)

    # -- binding -----------------------------------------------------------------------------

    def _sync(self) -> None:
        vm = self.vm
        self.status.setText(vm.last_error or "")
        self.status.setVisible(bool(vm.last_error))
        if [self.base.itemText(i) for i in range(self.base.count())] != vm.bases:
            current = self.base.currentText()
            self.base.clear()
            self.base.addItems(vm.bases)
            if current in vm.bases:
                self.base.setCurrentText(current)
        self.progress.setVisible(vm.uploading is not None)
        self.progress.setValue(round(vm.progress * 1000))
        if vm.uploading is not None:
            self._say(f"Uploading {vm.uploading}: {vm.progress:.0%}; the server checks it once it has the file…")
        elif vm.add_error:
            self._say(vm.add_error, LEVEL_COLORS["error"])
        elif vm.add_message:
            self._say(vm.add_message, OK_COLOR)
        else:
            self._say("")
        if vm.adapters is not self._shown:
            self._shown = vm.adapters
            self._fill(vm.adapters)
        self._sync_buttons()

    def _say(self, text: str, color: str = "") -> None:
        self.add_status.setText(text)
        self.add_status.setStyleSheet(f"color: {color}" if color else "")
        self.add_status.setVisible(bool(text))

    def _sync_buttons(self) -> None:
        vm, chosen = self.vm, self.chosen()
        self.remove_button.setEnabled(chosen is not None and vm.removing is None)
        self.try_button.setEnabled(chosen is not None)
        self.reload_button.setEnabled(not vm.busy)
        idle = vm.uploading is None
        self.choose_button.setEnabled(idle)
        self.add_button.setEnabled(idle and bool(self.path) and bool(vm.bases))

    def _fill(self, adapters: list[dict[str, Any]]) -> None:
        chosen = self.chosen()
        self.table.clear()
        for card in adapters:
            targets = card.get("targets") or ()
            alpha = card.get("alpha")
            item = QTreeWidgetItem(
                [
                    str(card.get("name", "")),
                    str(card.get("base", "")),
                    str(card.get("rank", "")),
                    f"{alpha:g}" if isinstance(alpha, int | float) else "",
                    str(len(targets)),
                    human_size(card.get("size")),
                    state_text(card),
                ]
            )
            item.setToolTip(4, "\n".join(targets[:40]) + ("\n…" if len(targets) > 40 else ""))
            item.setToolTip(0, f"model id {card.get('id')}; sha256 {card.get('sha256', '?')}")
            if card.get("error"):
                item.setForeground(6, Qt.GlobalColor.red)
            self.table.addTopLevelItem(item)
            if card.get("name") == chosen:
                self.table.setCurrentItem(item)
        if not adapters:
            placeholder = QTreeWidgetItem(["", "", "", "", "", "", "no adapter yet: add one below"])
            placeholder.setFlags(Qt.ItemFlag.NoItemFlags)
            self.table.addTopLevelItem(placeholder)
