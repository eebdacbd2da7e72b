"""The Hardware screen's widgets: the live load on top, the server's report with its reasons below.

The live panel polls every 2 s only while the screen is visible (a hidden screen costs nothing,
which keeps the GUI's idle CPU near zero), through the viewmodel, which keeps one poll in flight
at most.
"""

from __future__ import annotations

import html

from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtGui import QBrush, QColor, QGuiApplication, QHideEvent, QPainter, QPaintEvent, QShowEvent
from PySide6.QtWidgets import (
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.hardware import HardwareViewModel, LiveSample, Section, human_size

POLL_MS = 2000
LEVEL_COLORS = {"error": "#b00020", "warning": "#a15c00"}


def bar(name: str) -> QProgressBar:
    widget = QProgressBar()
    widget.setRange(0, 1000)  # tenths of a percent: smooth enough, and integer
    widget.setAccessibleName(name)
    widget.setTextVisible(True)
    return widget


class CoreBars(QWidget):
    """One thin vertical bar per CPU core: stays readable from 2 cores to 256, unlike a bar widget each."""

    def __init__(self) -> None:
        super().__init__()
        self.values: tuple[float, ...] = ()
        self.setMinimumSize(160, 90)
        self.setAccessibleName("CPU load per core")

    def set_values(self, values: tuple[float, ...]) -> None:
        self.values = values
        self.setToolTip(", ".join(f"core {i}: {v:.0f} %" for i, v in enumerate(values)))
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().base())
        if not self.values:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no sample yet")
            return
        width = self.width() / len(self.values)
        gap = 1.0 if width > 3 else 0.0
        brush = QBrush(QColor("#3b7dd8"))
        for i, value in enumerate(self.values):
            height = self.height() * max(0.0, min(value, 100.0)) / 100.0
            painter.fillRect(QRectF(i * width + gap, self.height() - height, width - 2 * gap, height), brush)
        painter.end()


class LivePanel(QGroupBox):
    """CPU, RAM and the server's memory now, per-core bars, and the last minutes as a chart."""

    def __init__(self) -> None:
        super().__init__("Live load")
        import pyqtgraph as pg  # imported with the screen, not at start-up: it is the heaviest import here

        self.cpu = bar("CPU load")
        self.ram = bar("Memory in use")
        self.process = QLabel("server process: –")
        self.process.setAccessibleName("Server process memory")
        self.gpu = QLabel("GPU: –")
        self.gpu.setAccessibleName("GPU load")
        self.gpu.setWordWrap(True)
        self.status = QLabel()
        self.status.setAccessibleName("Live load status")
        self.status.setWordWrap(True)
        self.status.setStyleSheet(f"color: {LEVEL_COLORS['error']}")
        self.cores = CoreBars()
        self.chart = pg.PlotWidget()
        self.chart.setAccessibleName("CPU and memory over the last minutes")
        self.chart.setBackground(None)
        self.chart.setYRange(0, 100)
        self.chart.setMouseEnabled(x=False, y=False)
        self.chart.hideButtons()
        self.chart.setMenuEnabled(False)
        self.chart.addLegend(offset=(8, 4))
        self.chart.setLabel("left", "%")
        self.chart.setLabel("bottom", "seconds ago")
        self.cpu_curve = self.chart.plot(pen=pg.mkPen("#3b7dd8", width=2), name="CPU")
        self.ram_curve = self.chart.plot(pen=pg.mkPen("#2e9d5b", width=2), name="RAM")

        numbers = QGridLayout()
        numbers.addWidget(QLabel("CPU"), 0, 0)
        numbers.addWidget(self.cpu, 0, 1)
        numbers.addWidget(QLabel("RAM"), 1, 0)
        numbers.addWidget(self.ram, 1, 1)
        numbers.addWidget(self.process, 2, 0, 1, 2)
        numbers.addWidget(self.gpu, 3, 0, 1, 2)
        numbers.addWidget(self.status, 4, 0, 1, 2)
        numbers.setRowStretch(5, 1)
        left = QWidget()
        left.setLayout(numbers)
        left.setFixedWidth(360)
        cores = QVBoxLayout()
        cores.addWidget(QLabel("Per core"))
        cores.addWidget(self.cores, 1)
        layout = QHBoxLayout(self)
        layout.addWidget(left)
        layout.addLayout(cores, 1)
        layout.addWidget(self.chart, 2)
        self.setFixedHeight(210)

    def show_sample(self, sample: LiveSample | None, history: list[LiveSample], error: str | None) -> None:
        self.status.setText(f"Live load unavailable: {error}" if error else "")
        if sample is None:
            return
        self.cpu.setValue(round(sample.cpu_percent * 10))
        self.cpu.setFormat(f"{sample.cpu_percent:.0f} % of {len(sample.cpu_per_core)} cores")
        self.ram.setValue(round(sample.ram_percent * 10))
        self.ram.setFormat(f"{human_size(sample.ram_used)} of {human_size(sample.ram_total)}")
        self.process.setText(f"Server process: {human_size(sample.process_rss)} resident")
        if sample.gpus is None:
            self.gpu.setText("GPU load: not measured by this server (see the GPUs section below).")
        elif not sample.gpus:
            self.gpu.setText("GPU load: no GPU.")
        else:
            self.gpu.setText("; ".join(_gpu_load(g) for g in sample.gpus))
        self.cores.set_values(sample.cpu_per_core)
        ages = [s.time - sample.time for s in history]
        self.chart.setXRange(min(-60.0, *ages), 0)  # a minute at least, growing to the whole history
        self.cpu_curve.setData(ages, [s.cpu_percent for s in history])
        self.ram_curve.setData(ages, [s.ram_percent for s in history])


def _gpu_load(gpu: dict[str, object]) -> str:
    used, total = gpu.get("vram_used"), gpu.get("vram_total")
    vram = (
        f", VRAM {human_size(used)} of {human_size(total)}" if isinstance(used, int) and isinstance(total, int) else ""
    )
    util = gpu.get("utilization_percent")
    load = f"{util:.0f} %" if isinstance(util, int | float) else "?"
    return f"GPU {gpu.get('index', '?')} {gpu.get('name', '')}: {load}{vram}"


WIDTHS = ("19%", "29%", "39%", "13%")  # the same in every table, so the sections line up
WIDTHS_PLAIN = ("19%", "81%")  # a section of plain label/value rows: the value takes the rest


def _row(texts: tuple[str, ...], widths: tuple[str, ...], level: str = "", tag: str = "td") -> str:
    color = LEVEL_COLORS.get(level)
    cells = []
    for i, (text, width) in enumerate(zip(texts, widths, strict=True)):
        body = html.escape(text)
        if i == 0 and tag == "td":
            body = f"<b>{body}</b>"
        if color is not None and i < 3:
            body = f"<span style='color:{color}'>{body}</span>"
        cells.append(f"<{tag} width='{width}'>{body}</{tag}>")
    return "<tr>" + "".join(cells) + "</tr>"


def sections_html(sections: list[Section]) -> str:
    """The report as tables, one per section: rich text wraps long reasons, which a tree's cells cannot."""
    parts = [
        "<style>th { text-align: left; color: #555; } td { padding: 2px 10px 2px 0; vertical-align: top; }</style>"
    ]
    for section in sections:
        parts.append(f"<h3>{html.escape(section.title)}</h3><table width='100%' cellspacing='0'>")
        if not section.decisions and not any(f.reason or f.source for f in section.facts):
            parts.extend(_row((f.label, f.value), WIDTHS_PLAIN, f.level) for f in section.facts)
        else:
            if section.decisions:
                parts.append(_row(("", "Value", "Why", "Decided by"), WIDTHS, tag="th"))
            parts.extend(_row((f.label, f.value, f.reason, f.source), WIDTHS, f.level) for f in section.facts)
        parts.append("</table>")
    return "".join(parts)


def sections_text(sections: list[Section]) -> str:
    """The report as plain text, for the clipboard (a support request, an issue)."""
    lines = []
    for section in sections:
        lines.append(section.title)
        for f in section.facts:
            why = f" ({f.reason})" if f.reason else ""
            source = f" [{f.source}]" if f.source else ""
            lines.append(f"  {f.label}: {f.value}{why}{source}")
    return "\n".join(lines)


class HardwareView(QWidget):
    def __init__(self, vm: HardwareViewModel) -> None:
        super().__init__()
        self.vm = vm
        self.live = LivePanel()
        self.report = QTextBrowser()
        self.report.setAccessibleName("Hardware report")
        self.report.setOpenLinks(False)
        self.reload_button = QPushButton("Reload report")
        self.reload_button.setAccessibleName("Reload the hardware report")
        self.copy_button = QPushButton("Copy as text")
        self.copy_button.setAccessibleName("Copy the hardware report as text")
        self.status = QLabel()
        self.status.setAccessibleName("Hardware report status")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(QLabel("What the server found at start-up, and the plan it chose for each model, with why"))
        buttons.addStretch()
        buttons.addWidget(self.reload_button)
        buttons.addWidget(self.copy_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.live)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.report, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(vm.poll_live)
        self.reload_button.clicked.connect(vm.refresh)
        self.copy_button.clicked.connect(self._copy)
        vm.changed.connect(self._sync)
        vm.live_changed.connect(self._sync_live)
        self._shown_sections: list[Section] | None = None
        self._sync()

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self.vm.poll_live()
        self.timer.start()

    def hideEvent(self, event: QHideEvent) -> None:  # noqa: N802 (Qt's name)
        self.timer.stop()
        super().hideEvent(event)

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(sections_text(self.vm.sections))
        self.status.setText("The report is on the clipboard.")

    def _sync(self) -> None:
        vm = self.vm
        self.reload_button.setEnabled(not vm.busy)
        self.copy_button.setEnabled(bool(vm.sections))
        if vm.last_error:
            self.status.setText(f"The hardware report could not be loaded: {vm.last_error}")
            self.status.setStyleSheet(f"color: {LEVEL_COLORS['error']}")
        else:
            self.status.setText("Loading the report…" if vm.busy and not vm.sections else "")
            self.status.setStyleSheet("")
        self.status.setVisible(bool(self.status.text()))
        if vm.sections is not self._shown_sections:
            self._shown_sections = vm.sections
            self._fill(vm.sections)

    def _fill(self, sections: list[Section]) -> None:
        self.report.setHtml(sections_html(sections))

    def _sync_live(self) -> None:
        self.live.show_sample(self.vm.live, list(self.vm.history), self.vm.live_error)
