"""The model store as Ollama and LM Studio users expect it: `appliance paths`, models linked where they lie
(files and whole folders), a file already in the store never copied twice, `models remove`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.config import app_paths
from appliance.modelstore import ModelFileError, verify_model_file
from appliance.registry import load_registry
from tests.conftest import DEFAULT_MODEL
from tests.test_models_route import tiny_gguf


def test_paths_names_every_place(app_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["paths", "--json"]) == 0
    places = json.loads(capsys.readouterr().out)
    assert places["home"]["path"] == str(app_home)
    assert places["models_dir"]["path"] == str(app_home / "models")
    assert places["request_log"]["path"] == str(app_home / "requests.sqlite")
    assert set(places) >= {"config", "models_file", "loras_dir", "responses", "cache"}
    assert main(["paths"]) == 0
    assert "(not created yet)" in capsys.readouterr().out


def test_a_linked_file_stays_where_it_lies(
    tmp_path: Path, default_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    source = shelf / "smol.gguf"
    shutil.copyfile(default_model_path, source)
    assert main(["models", "import", str(source), "--link", "--id", "smol"]) == 0
    assert "linked smol" in capsys.readouterr().out
    paths = app_paths()
    spec = load_registry(paths).get("smol")
    assert spec.path == str(source) and spec.sha256 and not paths.models_dir.exists()
    assert verify_model_file(paths, spec, progress=False) == source
    # the same bytes again, to copy this time: not copied, the existing model is named
    assert main(["models", "import", str(source), "--id", "smol-copy"]) == 0
    assert "already in the store as 'smol'" in capsys.readouterr().out
    assert "smol-copy" not in load_registry(paths) and not paths.models_dir.exists()
    # moved away: a clear message, with how to link it again
    source.rename(shelf / "moved.gguf")
    with pytest.raises(ModelFileError, match=r"linked to .* which is gone .* --link --id smol"):
        verify_model_file(paths, spec, progress=False)
    (shelf / "moved.gguf").rename(source)
    with source.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelFileError, match="truncated or was replaced; if it moved"):
        verify_model_file(paths, spec, progress=False)
    # removed: the entry goes, the file stays
    assert main(["models", "remove", "smol"]) == 0
    assert "its file stays where it is" in capsys.readouterr().out
    assert source.is_file() and "smol" not in load_registry(paths)


def test_linking_a_folder_takes_every_model_under_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shelf = tmp_path / "models"
    (shelf / "sub").mkdir(parents=True)
    tiny_gguf(shelf / "one.gguf")
    tiny_gguf(shelf / "sub" / "two.gguf")  # the same bytes: linked once
    (shelf / "notes.txt").write_text("not a model")
    (shelf / "broken.gguf").write_bytes(b"not a gguf")
    assert main(["models", "import", str(shelf), "--link"]) == 0
    out = capsys.readouterr().out
    assert "linked one:" in out
    assert "skipped: " in out and "already in the store as 'one'" in out and "broken.gguf" in out
    assert load_registry(app_paths()).get("one").path == str(shelf / "one.gguf")
    assert main(["models", "import", str(tmp_path / "empty-dir-missing"), "--link"]) == 1


def test_remove_deletes_store_copies_and_refuses_built_in_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "import", str(tiny_gguf(tmp_path / "tiny.gguf")), "--id", "tiny"]) == 0
    stored = app_paths().models_dir / "tiny.gguf"
    assert stored.is_file()
    assert main(["models", "remove", "tiny"]) == 0
    assert f"deleted {stored}" in capsys.readouterr().out
    assert not stored.exists() and "tiny" not in load_registry(app_paths())
    assert main(["models", "remove", "smollm2"]) == 1
    assert "cannot be removed" in capsys.readouterr().err
    assert main(["models", "remove", "nope"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_ps_shows_what_a_running_server_has_loaded(live_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import httpx

    httpx.post(
        live_server.base_url + "/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert main(["ps", "--url", live_server.base_url, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["model"], row["engine"], row["device"], row["slots"]) == (DEFAULT_MODEL, "gguf", "cpu", 4)
    assert row["memory_bytes"] > 90 << 20 and row["active"] == 0 and row["idle_seconds"] >= 0
    assert main(["ps", "--url", live_server.base_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MODEL") and DEFAULT_MODEL in out and "idle" in out
    assert main(["ps", "--url", "http://127.0.0.1:9"]) == 1
    assert "no server answers at http://127.0.0.1:9" in capsys.readouterr().err
