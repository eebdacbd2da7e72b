"""The Requests screen's widgets: the load charts on top, the table of requests below, and Cancel.

The table keeps the row the user selected across the polls, even when its request moves from
running to finished; the charts keep their curves and only get new arrays each second, which
costs well under a millisecond, so the window stays responsive while streams run at full speed.
The viewmodel polls only while this screen is shown.
"""

from __future__ import annotations

import time
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QItemSelectionModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtGui import QColor, QHideEvent, QKeySequence, QShortcut, QShowEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.requests import HISTORY_S, RequestRow, RequestsViewModel
from gui.views.tables import row_table

COLUMNS = (
    "Queued at",
    "Request",
    "Client",
    "Model / adapter",
    "Status",
    "Prompt",
    "Completion",
    "TTFT",
    "Tokens/s",
    "Time",
)
NUMERIC = frozenset({5, 6, 7, 8, 9})
WIDTHS = (80, 200, 90, 230, 100, 70, 90, 80, 80, 70)  # the stretched Model / adapter keeps what is left
STATUS_COLORS = {"cancelled": "#a15c00", "error": "#b00020", "timeout": "#b00020", "shutdown": "#b00020"}
RUNNING_COLOR = "#1f5fbf"
ERROR_COLOR = "#b00020"
Index = QModelIndex | QPersistentModelIndex


def _cell(row: RequestRow, column: int) -> str:
    match column:
        case 0:
            return time.strftime("%H:%M:%S", time.localtime(row.enqueued_at)) if row.enqueued_at else "–"
        case 1:
            return row.id
        case 2:
            return row.client
        case 3:
            return row.model
        case 4:
            return row.status
        case 5:
            return str(row.prompt_tokens)
        case 6:
            return str(row.completion_tokens)
        case 7:
            return f"{row.ttft_ms:.0f} ms" if row.ttft_ms is not None else "–"
        case 8:
            return f"{row.tokens_per_second:.1f}" if row.tokens_per_second is not None else "–"
        case 9:
            return f"{row.duration_s:.1f} s" if row.duration_s is not None else "–"
    return ""


class RequestTableModel(QAbstractTableModel):
    """The viewmodel's rows as a Qt table; same requests in the same order only repaint their cells."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[RequestRow] = []

    def set_rows(self, rows: list[RequestRow]) -> None:
        if [r.id for r in rows] == [r.id for r in self.rows]:
            self.rows = rows
            if rows:
                self.dataChanged.emit(self.index(0, 0), self.index(len(rows) - 1, len(COLUMNS) - 1))
            return
        self.beginResetModel()
        self.rows = rows
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008, N802 (Qt's signature)
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008, N802 (Qt's signature)
        return 0 if parent.isValid() else len(COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self.rows):
            return None
        row, column = self.rows[index.row()], index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return _cell(row, column)
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{row.id}\n{row.error}" if row.error else row.id
        if role == Qt.ItemDataRole.TextAlignmentRole and column in NUMERIC:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and column == 4:
            color = RUNNING_COLOR if row.running else STATUS_COLORS.get(row.status)
            return QColor(color) if color else None
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None


class LoadCharts(QWidget):
    """Throughput, and queue depth with busy slots, over the last two minutes: items made once, data set each poll."""

    def __init__(self) -> None:
        super().__init__()
        import pyqtgraph as pg  # imported with the screen, not at start-up: it is the heaviest import here

        self.throughput = self._plot(pg, "Throughput over the last 2 minutes", "tokens/s")
        self.load = self._plot(pg, "Queue depth and busy slots over the last 2 minutes", "requests")
        self.tps_curve = self.throughput.plot(pen=pg.mkPen("#3b7dd8", width=2), name="tokens/s")
        self.active_curve = self.load.plot(pen=pg.mkPen("#2e9d5b", width=2), name="busy slots")
        self.queued_curve = self.load.plot(pen=pg.mkPen("#d17a00", width=2), name="queued")
        self.slots_curve = self.load.plot(pen=pg.mkPen("#888888", width=1, style=Qt.PenStyle.DashLine), name="slots")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.throughput)
        layout.addWidget(self.load)
        self.setFixedHeight(220)

    @staticmethod
    def _plot(pg: Any, name: str, unit: str) -> Any:
        plot = pg.PlotWidget()
        plot.setAccessibleName(name)
        plot.setBackground(None)
        plot.setMouseEnabled(x=False, y=False)
        plot.hideButtons()
        plot.setMenuEnabled(False)
        plot.addLegend(offset=(8, 2), colCount=3)  # one row, in the headroom ``_top`` leaves
        plot.setLabel("left", unit)
        plot.setLabel("bottom", "seconds ago")
        plot.setXRange(-HISTORY_S, 0, padding=0)
        plot.setYRange(0, _top([]), padding=0)
        return plot

    def show_series(self, series: tuple[list[float], list[float], list[float], list[float], list[float]]) -> None:
        ages, tps, queued, active, slots = series
        self.tps_curve.setData(ages, tps)
        self.active_curve.setData(ages, active)
        self.queued_curve.setData(ages, queued)
        self.slots_curve.setData(ages, slots)
        self.throughput.setYRange(0, _top(tps), padding=0)
        self.load.setYRange(0, _top(slots + queued + active), padding=0)


def _top(values: list[float]) -> float:
    """The y range's top: from zero, with room above the data for the legend."""
    return max([1.0, *values]) * 1.3


class RequestsView(QWidget):
    def __init__(self, vm: RequestsViewModel) -> None:
        super().__init__()
        self.vm = vm
        self.summary = QLabel()
        self.summary.setAccessibleName("Load of each model")
        self.charts = LoadCharts()
        self.model = RequestTableModel()
        self.table = row_table(self.model, "Requests: queued and running first, then finished")
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        header = self.table.horizontalHeader()
        header.setAccessibleName("Request columns")
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        for column, width in enumerate(WIDTHS):
            self.table.setColumnWidth(column, width)
        self.counts = QLabel()
        self.counts.setAccessibleName("Number of running and finished requests")
        self.status = QLabel()
        self.status.setAccessibleName("Requests screen status")
        self.status.setWordWrap(True)
        self.cancel_button = QPushButton("&Cancel request")
        self.cancel_button.setAccessibleName("Cancel the selected request")
        self.cancel_button.setToolTip("Ends the selected queued or running request, as if its client went away (Del)")
        cancel_key = QShortcut(QKeySequence(Qt.Key.Key_Delete), self.table)
        cancel_key.setContext(Qt.ShortcutContext.WidgetShortcut)

        bar = QHBoxLayout()
        bar.addWidget(self.counts)
        bar.addWidget(self.status, 1)
        bar.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.charts)
        layout.addLayout(bar)
        layout.addWidget(self.table, 1)

        self.cancel_button.clicked.connect(vm.cancel_selected)
        cancel_key.activated.connect(vm.cancel_selected)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        vm.changed.connect(self._sync)
        self._rebuilding = False
        self._sync()

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self.vm.set_visible(True)

    def hideEvent(self, event: QHideEvent) -> None:  # noqa: N802 (Qt's name)
        self.vm.set_visible(False)
        super().hideEvent(event)

    def _selection_changed(self) -> None:
        if self._rebuilding:  # Qt clears the selection on a reset; the viewmodel keeps the choice
            return
        rows = self.table.selectionModel().selectedRows()
        self.vm.select(self.model.rows[rows[0].row()].id if rows else None)

    def _sync(self) -> None:
        vm = self.vm
        if vm.rows is not self.model.rows:
            self._rebuilding = True
            try:
                self.model.set_rows(vm.rows)
                self._restore_selection()
            finally:
                self._rebuilding = False
        running = sum(r.running for r in vm.rows)
        self.counts.setText(f"{running} queued or running, {len(vm.rows) - running} finished")
        self.summary.setText(vm.summary)
        self.charts.show_series(vm.series())
        self.cancel_button.setEnabled(vm.can_cancel)
        if vm.last_error:
            self.status.setText(f"The server did not answer: {vm.last_error}")
            self.status.setStyleSheet(f"color: {ERROR_COLOR}")
        else:
            self.status.setText(vm.notice or "")
            self.status.setStyleSheet(f"color: {ERROR_COLOR}" if vm.notice_failed else "")

    def _restore_selection(self) -> None:
        """Select the viewmodel's request again after the table was rebuilt (its row may have moved)."""
        ids = [r.id for r in self.model.rows]
        selection = self.table.selectionModel()
        current = selection.selectedRows()
        if self.vm.selected_id not in ids:
            return
        row = ids.index(self.vm.selected_id)
        if current and current[0].row() == row:
            return
        flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
        selection.setCurrentIndex(self.model.index(row, 0), flags)
