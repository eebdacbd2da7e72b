"""The Logs screen's widgets: filters on top, the paged table, the selected exchange with its feedback, export.

Layout and binding only: every action goes to ``LogsViewModel``, every state shown comes from it.
Keyboard: each labelled control has a mnemonic (Alt+letter), Ctrl+F goes to the text filter, F5
reloads, Ctrl+S saves the correction, Ctrl+Up/Down rate the selected answer.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QItemSelectionModel, QModelIndex, Qt, QTimer
from PySide6.QtGui import QFontDatabase, QFontMetrics, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.logs import (
    FORMATS,
    RATINGS,
    STATUSES,
    TIME_RANGES,
    LogsViewModel,
    answer_text,
    facts,
    prompt_messages,
)
from gui.views.tables import row_table

TYPING_PAUSE_MS = 350  # the text filters apply once typing pauses, not on every key
COLUMN_WIDTHS = {"Time": 140, "Model": 160, "Adapter": 100, "Status": 90, "Rating": 55, "Tokens": 80, "Latency": 75}
EXPORT_HINT = "Exports what the filters select; only answered exchanges (status ok) unless a status is chosen."
FORMAT_HELP = (
    "Chat messages: OpenAI chat fine-tuning JSONL. DPO preference pairs: chosen/rejected answers (TRL), from "
    "corrections and from 👍/👎 answers to the same prompt. Prompt/completion: plain-text completions."
)
NOTHING_SELECTED = "<p style='color:#666'>Select an exchange to read it, rate its answer and correct it.</p>"


def exchange_html(record: dict[str, object]) -> str:
    """The request's messages, the answer and any correction, each under its role."""

    def block(title: str, text: str, colour: str = "#555") -> str:
        body = html.escape(text) if text.strip() else "<i>(empty)</i>"
        return (
            f"<p style='margin:8px 0 2px 0'><b style='color:{colour}'>{html.escape(title)}</b></p>"
            f"<div style='white-space:pre-wrap'>{body}</div>"
        )

    parts = [block(role, text) for role, text in prompt_messages(record)]
    parts.append(block("answer", answer_text(record), "#1b5e20"))
    correction = record.get("correction")
    if isinstance(correction, str) and correction.strip():
        parts.append(block("corrected answer", correction, "#0d47a1"))
    return "".join(parts)


def facts_html(record: dict[str, object]) -> str:
    rows = "".join(
        f"<tr><td style='color:#666;padding-right:10px'>{html.escape(name)}</td><td>{html.escape(value)}</td></tr>"
        for name, value in facts(record)
    )
    return f"<table>{rows}</table>"


def rating_marks() -> dict[int, str]:
    """👍/👎 where a font draws them; elsewhere (a bare Linux box, CI screenshots) ✓/✗, never empty boxes."""
    has_emoji = any("emoji" in family.lower() for family in QFontDatabase.families())
    if has_emoji or QFontMetrics(QApplication.font()).inFontUcs4(ord(RATINGS[1])):
        return dict(RATINGS)
    return {1: "✓", -1: "✗"}


def _labelled(text: str, widget: QWidget) -> QLabel:
    label = QLabel(text)
    label.setBuddy(widget)
    return label


def _placeholder(box: QComboBox, text: str) -> None:
    edit = box.lineEdit()
    if edit is not None:  # an editable box always has one
        edit.setPlaceholderText(text)


class LogsView(QWidget):
    def __init__(self, vm: LogsViewModel) -> None:
        super().__init__()
        self.vm = vm
        self.marks = vm.table.marks = rating_marks()
        self._shown_id: object = None  # the exchange whose correction the box holds
        self.ask_path: Callable[[], Path | None] = self._ask_path  # tests put their own here
        self._typing = QTimer(self)
        self._typing.setSingleShot(True)
        self._typing.setInterval(TYPING_PAUSE_MS)
        self._typing.timeout.connect(self._apply_text_filters)

        layout = QVBoxLayout(self)
        layout.addLayout(self._filters_row())
        self.error_label = QLabel()
        self.error_label.setAccessibleName("Error message")
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color:#b00020")
        self.error_label.hide()
        layout.addWidget(self.error_label)
        split = QSplitter(Qt.Orientation.Vertical)
        split.setChildrenCollapsible(False)
        split.addWidget(self._table_pane())
        split.addWidget(self._detail_pane())
        split.setSizes([320, 380])
        layout.addWidget(split, 1)
        layout.addLayout(self._export_row())
        self._tab_order()
        self._shortcuts()

        vm.changed.connect(self._sync)
        vm.error.connect(self._show_error)
        vm.detail_changed.connect(self._show_detail)
        vm.export_progress.connect(self._export_progress)
        vm.export_state.connect(self._export_state)
        vm.table.modelReset.connect(self._reselect)
        self._sync()
        self._show_detail()
        self._export_state()

    # -- building --------------------------------------------------------------------------

    def _filters_row(self) -> QHBoxLayout:
        self.model_box = QComboBox()
        self.model_box.setEditable(True)
        self.model_box.setAccessibleName("Filter by model")
        _placeholder(self.model_box, "any")
        self.model_box.setMinimumWidth(130)
        self.adapter_box = QComboBox()
        self.adapter_box.setEditable(True)
        self.adapter_box.setAccessibleName("Filter by adapter")
        _placeholder(self.adapter_box, "any")
        self.adapter_box.setMinimumWidth(90)
        self.status_box = QComboBox()
        self.status_box.setAccessibleName("Filter by status")
        self.status_box.addItem("Any status", "")
        for status in STATUSES:
            self.status_box.addItem(status, status)
        self.rating_box = QComboBox()
        self.rating_box.setAccessibleName("Filter by rating")
        self.rating_box.addItem("Any rating", None)
        self.rating_box.addItem(f"{self.marks[1]} good", 1)
        self.rating_box.addItem(f"{self.marks[-1]} bad", -1)
        self.time_box = QComboBox()
        self.time_box.setAccessibleName("Filter by time")
        for name, seconds in TIME_RANGES.items():
            self.time_box.addItem(name, seconds)
        self.search = QLineEdit()
        self.search.setAccessibleName("Filter by text in the prompt or the answer")
        self.search.setPlaceholderText("in the prompt or answer (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.search.setMinimumWidth(120)
        self.refresh_button = QPushButton("&Refresh")
        self.refresh_button.setAccessibleName("Reload the log")
        self.refresh_button.setToolTip("Reload the log with these filters (F5)")

        for box in (self.model_box, self.adapter_box):
            box.currentTextChanged.connect(lambda _: self._typing.start())
            box.activated.connect(lambda _: self._apply_text_filters())
        self.search.textChanged.connect(lambda _: self._typing.start())
        self.search.returnPressed.connect(self._apply_text_filters)
        self.status_box.currentIndexChanged.connect(lambda _: self.vm.set_filters(status=self.status_box.currentData()))
        self.rating_box.currentIndexChanged.connect(lambda _: self.vm.set_filters(rating=self.rating_box.currentData()))
        self.time_box.currentIndexChanged.connect(lambda _: self.vm.set_filters(within_s=self.time_box.currentData()))
        self.refresh_button.clicked.connect(self.vm.refresh)

        row = QHBoxLayout()
        for text, widget in (
            ("&Model", self.model_box),
            ("&Adapter", self.adapter_box),
            ("&Status", self.status_box),
            ("Ra&ting", self.rating_box),
            ("T&ime", self.time_box),
            ("Te&xt", self.search),
        ):
            row.addWidget(_labelled(text, widget))
            row.addWidget(widget, 1 if widget is self.search else 0)
        row.addWidget(self.refresh_button)
        return row

    def _table_pane(self) -> QWidget:
        self.table = row_table(self.vm.table, "Logged exchanges")
        self.table.verticalHeader().setDefaultSectionSize(24)
        header = self.table.horizontalHeader()
        header.setHighlightSections(False)
        for column in range(self.vm.table.columnCount()):
            name = self.vm.table.headerData(column, Qt.Orientation.Horizontal)
            if name in COLUMN_WIDTHS:
                self.table.setColumnWidth(column, COLUMN_WIDTHS[name])
            else:  # the texts share what the others leave
                header.setSectionResizeMode(column, QHeaderView.ResizeMode.Stretch)
        self.table.selectionModel().currentRowChanged.connect(self._row_chosen)

        self.count_label = QLabel()
        self.count_label.setAccessibleName("How many exchanges are shown")
        self.more_button = QPushButton("Load m&ore")
        self.more_button.setAccessibleName("Load the next page of exchanges")
        self.more_button.clicked.connect(self.vm.load_more)

        pane = QWidget()
        layout = QVBoxLayout(pane)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table, 1)
        footer = QHBoxLayout()
        footer.addWidget(self.count_label, 1)
        footer.addWidget(self.more_button)
        layout.addLayout(footer)
        return pane

    def _detail_pane(self) -> QWidget:
        self.exchange = QTextBrowser()
        self.exchange.setAccessibleName("The selected exchange: request and answer")
        self.exchange.setOpenLinks(False)
        self.facts = QLabel()
        self.facts.setAccessibleName("Status, tokens and timings of the selected exchange")
        self.facts.setTextFormat(Qt.TextFormat.RichText)
        self.facts.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.facts.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.facts.setWordWrap(True)
        self.good_button = QPushButton(f"{self.marks[1]} &Good")
        self.good_button.setAccessibleName("Rate the answer good")
        self.good_button.setToolTip("A good answer: exports train on it (Ctrl+Up)")
        self.bad_button = QPushButton(f"{self.marks[-1]} &Bad")
        self.bad_button.setAccessibleName("Rate the answer bad")
        self.bad_button.setToolTip("A bad answer: never a training target, the rejected side of DPO pairs (Ctrl+Down)")
        for button in (self.good_button, self.bad_button):
            button.setCheckable(True)
        self.good_button.clicked.connect(lambda: self._rate(1))
        self.bad_button.clicked.connect(lambda: self._rate(-1))
        self.correction = QPlainTextEdit()
        self.correction.setAccessibleName("Corrected answer")
        self.correction.setPlaceholderText(
            "The answer it should have given; exports train on it instead (Ctrl+S saves)"
        )
        self.correction.setTabChangesFocus(True)
        self.save_button = QPushButton("Sa&ve correction")
        self.save_button.setAccessibleName("Save the corrected answer")
        self.save_button.clicked.connect(lambda: self.vm.save_correction(self.correction.toPlainText()))
        self.notice = QLabel()
        self.notice.setAccessibleName("What the last action did")

        side = QWidget()
        column = QVBoxLayout(side)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.facts)
        rating = QHBoxLayout()
        rating.addWidget(self.good_button)
        rating.addWidget(self.bad_button)
        rating.addStretch(1)
        column.addLayout(rating)
        column.addWidget(_labelled("&Corrected answer", self.correction))
        column.addWidget(self.correction, 1)
        save = QHBoxLayout()
        save.addWidget(self.notice, 1)
        save.addWidget(self.save_button)
        column.addLayout(save)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.setChildrenCollapsible(False)
        split.addWidget(self.exchange)
        split.addWidget(side)
        split.setSizes([700, 480])
        return split

    def _export_row(self) -> QHBoxLayout:
        self.format_box = QComboBox()
        self.format_box.setAccessibleName("Export format")
        for fmt, name in FORMATS.items():
            self.format_box.addItem(name, fmt)
        self.format_box.setToolTip(FORMAT_HELP)
        self.format_box.currentIndexChanged.connect(self._format_chosen)
        self.dedupe_box = QCheckBox("&Drop duplicates")
        self.dedupe_box.setAccessibleName("Drop identical examples from the export")
        self.dedupe_box.toggled.connect(self._dedupe_chosen)
        self.export_button = QPushButton("&Export…")
        self.export_button.setAccessibleName("Export the filtered exchanges to a file")
        self.export_button.setToolTip(EXPORT_HINT)
        self.export_button.clicked.connect(self._export_clicked)
        self.progress = QProgressBar()
        self.progress.setAccessibleName("Export progress")
        self.progress.setFormat("%v of %m records")
        self.progress.setMinimumWidth(170)
        self.progress.setMaximumWidth(260)
        self.export_label = QLabel()
        self.export_label.setAccessibleName("Export result")
        self.export_label.setWordWrap(True)

        row = QHBoxLayout()
        row.addWidget(_labelled("Export &format", self.format_box))
        row.addWidget(self.format_box)
        row.addWidget(self.dedupe_box)
        row.addWidget(self.export_button)
        row.addWidget(self.progress)
        row.addWidget(self.export_label, 1)
        return row

    def _tab_order(self) -> None:
        chain = [
            self.model_box,
            self.adapter_box,
            self.status_box,
            self.rating_box,
            self.time_box,
            self.search,
            self.refresh_button,
            self.table,
            self.more_button,
            self.exchange,
            self.good_button,
            self.bad_button,
            self.correction,
            self.save_button,
            self.format_box,
            self.dedupe_box,
            self.export_button,
        ]
        for first, second in itertools.pairwise(chain):
            QWidget.setTabOrder(first, second)

    def _shortcuts(self) -> None:
        context = Qt.ShortcutContext.WidgetWithChildrenShortcut
        for keys, action in (
            (QKeySequence.StandardKey.Find, self._focus_search),
            (QKeySequence.StandardKey.Refresh, self.vm.refresh),
            (QKeySequence.StandardKey.Save, self.save_button.click),
            (QKeySequence("Ctrl+Up"), self.good_button.click),
            (QKeySequence("Ctrl+Down"), self.bad_button.click),
        ):
            shortcut = QShortcut(QKeySequence(keys), self)
            shortcut.setContext(context)
            shortcut.activated.connect(action)

    # -- from the user ---------------------------------------------------------------------

    def _apply_text_filters(self) -> None:
        self._typing.stop()
        model, adapter = self.model_box.currentText(), self.adapter_box.currentText()
        text = self.search.text()
        f = self.vm.filters
        if (f.model, f.adapter, f.text) != (model, adapter, text):
            self.vm.set_filters(model=model, adapter=adapter, text=text)

    def _focus_search(self) -> None:
        self.search.setFocus()
        self.search.selectAll()

    def _row_chosen(self, current: QModelIndex, _: QModelIndex) -> None:
        if current.isValid():  # a reset clears the current row; the selection is restored in _reselect
            self.vm.select(self.vm.table.record_id(current.row()))

    def _rate(self, rating: int) -> None:
        if self.vm.detail is not None:
            self.vm.rate(rating)
        self._show_detail()  # a checkable button toggles itself: the record says what is checked

    def _format_chosen(self) -> None:
        self.vm.export_format = str(self.format_box.currentData())

    def _dedupe_chosen(self, on: bool) -> None:
        self.vm.export_dedupe = on

    def _export_clicked(self) -> None:
        if self.vm.exporting:
            self.vm.cancel_export()
            return
        path = self.ask_path()
        if path is not None:
            self.vm.start_export(path)

    def _ask_path(self) -> Path | None:
        folder = self.vm.export_path.parent if self.vm.export_path is not None else Path.home()
        suggested = folder / f"appliance-{self.vm.export_format}.jsonl"
        name, _ = QFileDialog.getSaveFileName(self, "Export the log", str(suggested), "JSON Lines (*.jsonl)")
        return Path(name) if name else None

    # -- from the viewmodel ----------------------------------------------------------------

    def _sync(self) -> None:
        vm = self.vm
        shown = len(vm.rows)
        if vm.total == 0:
            self.count_label.setText("Loading…" if vm.busy else "No exchanges match the filters.")
        else:
            self.count_label.setText(f"{shown} of {vm.total} exchanges shown")
        self.more_button.setEnabled(vm.has_more)
        self._fill(self.model_box, vm.models)
        self._fill(self.adapter_box, vm.adapters)
        if vm.last_error is None:
            self.error_label.hide()

    def _fill(self, box: QComboBox, names: list[str]) -> None:
        current = [box.itemText(i) for i in range(box.count())]
        if current == ["", *names]:
            return
        text = box.currentText()
        box.blockSignals(True)
        box.clear()
        box.addItems(["", *names])
        box.setEditText(text)
        box.blockSignals(False)

    def _show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.show()

    def _show_detail(self) -> None:
        record = self.vm.detail
        for widget in (self.good_button, self.bad_button, self.correction, self.save_button):
            widget.setEnabled(record is not None)
        self.good_button.setChecked(record is not None and record.get("rating") == 1)
        self.bad_button.setChecked(record is not None and record.get("rating") == -1)
        self.notice.setText(self.vm.notice)
        if record is None:
            loading = self.vm.selected_id is not None
            self.exchange.setHtml("<p style='color:#666'>Loading…</p>" if loading else NOTHING_SELECTED)
            self.facts.setText("")
            self.correction.setPlainText("")
            self._shown_id = None
            return
        self.exchange.setHtml(exchange_html(record))
        self.facts.setText(facts_html(record))
        if record.get("id") != self._shown_id:  # another exchange; a rating must not wipe a draft correction
            self._shown_id = record.get("id")
            self.correction.setPlainText(str(record.get("correction") or ""))

    def _reselect(self) -> None:
        for row, record in enumerate(self.vm.rows):
            if record.get("id") == self.vm.selected_id:
                index = self.vm.table.index(row, 0)
                flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
                self.table.selectionModel().setCurrentIndex(index, flags)
                return

    def _export_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(min(done, max(total, 1)) if total else 1)

    def _export_state(self) -> None:
        vm = self.vm
        self.export_button.setText("Cancel &export" if vm.exporting else "&Export…")
        self.format_box.setEnabled(not vm.exporting)
        self.dedupe_box.setEnabled(not vm.exporting)
        self.progress.setVisible(vm.exporting or vm.exported is not None)
        if vm.exporting:
            self.progress.setRange(0, 0)  # busy until the server says how many records it reads
            self.export_label.setText(f"Exporting to {vm.export_path}…")
            self.export_label.setStyleSheet("")
        elif vm.notice.startswith("Export"):
            self.export_label.setText(vm.notice)
            self.export_label.setStyleSheet("")
        else:
            self.export_label.setText(EXPORT_HINT)
            self.export_label.setStyleSheet("color:#666")
