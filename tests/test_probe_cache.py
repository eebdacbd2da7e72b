"""Start-up detection: what cannot hang runs in-process, and the engines' answer is remembered only
where it cannot change (no GPU driver), keyed by what it depends on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from appliance.hardware import detect as detect_module
from appliance.hardware import probecache
from appliance.hardware.detect import detect
from appliance.hardware.probe import MARKER


def test_the_engines_answer_is_remembered_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "engines-probe.json"
    first = detect(timeout=60, cache_file=cache)
    engines = next(p for p in first.probes if p.name == "engines")
    assert engines.status == "ok" and "as probed" not in engines.detail
    assert json.loads(cache.read_text())["key"] == probecache.fingerprint()

    again = detect(timeout=60, cache_file=cache)
    remembered = next(p for p in again.probes if p.name == "engines")
    assert remembered.status == "ok" and "as probed" in remembered.detail
    assert again.engines == first.engines  # the same answer, as the planner and the report see it


def test_a_changed_environment_probes_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "engines-probe.json"
    detect(timeout=60, cache_file=cache)
    key = probecache.fingerprint()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert probecache.fingerprint() != key
    hw = detect(timeout=60, cache_file=cache)
    assert "as probed" not in next(p for p in hw.probes if p.name == "engines").detail
    assert json.loads(cache.read_text())["key"] == probecache.fingerprint()


@pytest.mark.parametrize("content", ["", "not json", '{"key": "other", "data": []}', "[1, 2]"])
def test_a_damaged_or_foreign_cache_is_ignored(tmp_path: Path, content: str) -> None:
    cache = tmp_path / "engines-probe.json"
    cache.write_text(content)
    hw = detect(timeout=60, cache_file=cache)
    assert next(p for p in hw.probes if p.name == "engines").status == "ok"
    assert json.loads(cache.read_text())["key"] == probecache.fingerprint()


def test_an_unwritable_cache_costs_nothing_but_the_probe(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    hw = detect(timeout=60, cache_file=blocked / "engines-probe.json")
    assert next(p for p in hw.probes if p.name == "engines").status == "ok"


def test_with_a_gpu_driver_the_engines_probe_runs_in_its_own_process_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a GPU driver is, initialising a GPU backend can hang: never in the server's process,
    and its answer (devices, free memory) is live, so never remembered."""
    ran: list[str] = []
    answer = {"status": "ok", "detail": "fake engines", "data": []}
    quick = [sys.executable, "-c", f"print({MARKER + json.dumps(answer)!r})"]
    gpu = {"status": "absent", "detail": "no GPU here", "data": None}

    def command(name: str) -> list[str]:
        ran.append(name)
        if name == "nvidia":
            return [sys.executable, "-c", f"print({MARKER + json.dumps(gpu)!r})"]
        return quick

    monkeypatch.setattr(
        detect_module, "skip_reason", lambda name: None if name in ("cpu", "nvidia", "engines") else "no"
    )
    monkeypatch.setattr(detect_module, "probe_command", command)
    cache = tmp_path / "engines-probe.json"
    hw = detect(timeout=60, cache_file=cache)
    assert "engines" in ran and "nvidia" in ran
    assert next(p for p in hw.probes if p.name == "engines").detail == "fake engines"
    assert not cache.exists()
