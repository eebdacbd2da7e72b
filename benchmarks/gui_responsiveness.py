"""The desktop app's figures: time to the first painted window, event-loop stalls under load, idle CPU, RSS.

    python benchmarks/gui_responsiveness.py            # the figures in BENCHMARKS.md
    python benchmarks/gui_responsiveness.py --streams 2 --seconds 5   # a dry run

One server (``--parallel 8``) in a fresh home, the GUI attached to it with ``--connect`` (so the
server's own start is not counted). First paint: a fresh ``python`` process builds the window and
reports the time from its own start to the window's first paint event (median of 5). Stalls: in
this process, with the Requests screen shown (its table and live chart polling every second), 8
clients stream answers at full speed from other threads while a 10 ms timer measures how late the
event loop serves it (p99 and max). Idle CPU: the same window, no traffic, over 10 s. RSS: this
process at the end. Runs offscreen (``QT_QPA_PLATFORM=offscreen``) unless a display is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from soak import median, percentile, start_server

FIRST_PAINT = r"""
import os, sys, time
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
import psutil
born = psutil.Process().create_time()
from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication
from gui.app import MainWindow
from gui.client import ApiClient
app = QApplication([])
window = MainWindow(ApiClient(sys.argv[1]))
class Painted(QObject):
    def eventFilter(self, obj, event):
        if event.type() == QEvent.Type.Paint:
            print(f"{time.time() - born:.4f}", flush=True)
            QTimer.singleShot(0, app.quit)
            obj.removeEventFilter(self)
        return False
painted = Painted()
window.installEventFilter(painted)
window.show()
app.exec()
"""


LOAD = r"""
import sys, threading, time
import httpx
url, streams, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 200, "temperature": 0.8,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
pieces = [0]
deadline = time.monotonic() + seconds
def client():
    with httpx.Client(base_url=url, timeout=120, headers={"X-Appliance-Log": "off"}) as http:
        while time.monotonic() < deadline:
            with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                for line in resp.iter_lines():
                    pieces[0] += line.startswith("data: {")
                    if time.monotonic() > deadline:
                        break
threads = [threading.Thread(target=client) for _ in range(streams)]
for t in threads: t.start()
for t in threads: t.join()
print(pieces[0])
"""


def run_for(app: Any, seconds: float) -> None:
    """Serve the event loop for ``seconds`` (a local loop: the application's own may be told to quit once only)."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def first_paint(url: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_PAINT, url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).parent.parent,
        )
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()

    from PySide6.QtCore import QElapsedTimer, QTimer
    from PySide6.QtWidgets import QApplication

    from gui.app import MainWindow
    from gui.client import ApiClient

    with tempfile.TemporaryDirectory(prefix="gui-bench-") as tmp:
        server = start_server(Path(tmp) / "home", "--parallel", "8")
        try:
            url = server.base_url
            paints = first_paint(url, 5)
            app = QApplication.instance() or QApplication([])
            window = MainWindow(ApiClient(url))
            window.resize(1280, 800)
            window.show()
            keys = window.keys
            shown = "requests" if "requests" in keys else "server"
            window.nav.setCurrentRow(keys.index(shown))

            lateness: list[float] = []
            clock = QElapsedTimer()
            clock.start()
            last = [clock.elapsed()]

            def tick() -> None:
                now = clock.elapsed()
                lateness.append(max(0.0, now - last[0] - 10))
                last[0] = now

            timer = QTimer()
            timer.setInterval(10)
            timer.timeout.connect(tick)

            # the load comes from another process, as other apps' requests do: its threads must not
            # share this process's GIL with the GUI thread being measured
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD, url, str(args.streams), str(args.seconds + 4)],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(3)  # the streams are running
            last[0] = clock.elapsed()
            timer.start()
            run_for(app, args.seconds)
            timer.stop()
            out, _ = load.communicate(timeout=180)
            tokens = [int(out.strip().splitlines()[-1])]
            busy = list(lateness)

            me = psutil.Process()
            time.sleep(3)
            idle: dict[str, float] = {}
            for key in ("server", shown):  # the screen the app opens on, and the live one
                window.nav.setCurrentRow(keys.index(key))
                run_for(app, 2.0)
                before, started = me.cpu_times(), time.monotonic()
                run_for(app, 10.0)
                after = me.cpu_times()
                spent = after.user + after.system - before.user - before.system
                idle[key] = round(spent / (time.monotonic() - started) * 100, 2)
            rss = me.memory_info().rss / (1 << 20)
            window.quit()
        finally:
            server.stop()

    figures = {
        "first_paint_s": {"median": round(median(paints), 3), "all": [round(p, 3) for p in paints]},
        "screen_under_load": shown,
        "streams": args.streams,
        "streamed_pieces": tokens[0],
        "ticks": len(busy),
        "stall_ms": {
            "p50": round(median(busy), 1),
            "p99": round(percentile(busy, 0.99), 1),
            "max": round(max(busy), 1),
        },
        "idle_cpu_percent_of_a_core": idle,
        "rss_mib": round(rss, 1),
    }
    print(f"first paint: median {figures['first_paint_s']['median']} s over 5 starts")
    print(
        f"event-loop lateness with {args.streams} streams and the {shown} screen: "
        f"p50 {figures['stall_ms']['p50']} ms, p99 {figures['stall_ms']['p99']} ms, max {figures['stall_ms']['max']} ms"
    )
    print(f"idle CPU (% of a core) by screen shown: {idle}; RSS {figures['rss_mib']} MiB")
    print(json.dumps(figures), flush=True)
    sys.stdout.flush()
    # PySide6 and pyqtgraph can crash while the interpreter tears their objects down ("bool_dealloc");
    # the figures are out, so leave without that teardown
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
