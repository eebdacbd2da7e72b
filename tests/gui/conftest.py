"""GUI tests run offscreen (no display needed); any Qt warning fails them (``qt_log_level_fail``)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
