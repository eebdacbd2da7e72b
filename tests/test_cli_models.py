"""`appliance models list|import` with real GGUF files, and a corrupt one rejected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import app_paths
from appliance.registry import load_registry
from tests.conftest import DEFAULT_MODEL


def test_list_shows_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"* {DEFAULT_MODEL}" in out
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    default = next(r for r in rows if r["id"] == DEFAULT_MODEL)
    assert default["default"] and default["file"].endswith(".gguf") and Path(default["file"]).is_file()


def test_import_copies_hashes_and_registers(
    tmp_path: Path, default_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "My Model.Q4_1.gguf"
    shutil.copyfile(default_model_path, source)
    assert main(["models", "import", str(source)]) == 0
    out = capsys.readouterr().out
    assert "imported my-model.q4_1" in out
    spec = load_registry(app_paths()).get("my-model.q4_1")
    stored = spec.resolve_file(app_paths().models_dir)
    assert stored.is_file() and stored.parent == app_paths().models_dir
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert spec.architecture == "llama" and spec.quantization == "Q4_1" and spec.context_length == 8192
    assert main(["models", "list"]) == 0
    assert "my-model.q4_1" in capsys.readouterr().out
    # the same id twice is refused
    assert main(["models", "import", str(source), "--id", "my-model.q4_1"]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a model at all", "not a GGUF file"),
        (None, "truncated"),  # the real model cut in half
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, "corrupt"),
    ],
)
def test_import_rejects_bad_files(
    tmp_path: Path, default_model_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, expected: str
) -> None:
    bad = tmp_path / "bad.gguf"
    if content is None:
        data = default_model_path.read_bytes()
        content = data[: len(data) // 2]
    bad.write_bytes(content)
    assert main(["models", "import", str(bad), "--id", "bad"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err
    assert "Traceback" not in err
    assert not app_paths().models_file.exists()
    assert not any(app_paths().models_dir.glob("*")) if app_paths().models_dir.exists() else True


def test_import_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["models", "import", str(tmp_path / "nope.gguf")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_imported_model_serves(start_server, tmp_path: Path, default_model_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os

    import openai

    os.environ["APPLIANCE_HOME"] = str(tmp_path / "server-home")
    assert main(["models", "import", str(default_model_path), "--id", "mine"]) == 0
    server = start_server("--model", "mine", "--parallel", "1", "--ctx-size", "512")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    listed = {m.id: m.model_extra["state"] for m in client.models.list().data}
    assert listed == {"mine": "loaded", "smollm2-135m-instruct": "not_loaded"}  # the built-in loads on demand
    resp = client.completions.create(model="mine", prompt="Hello", max_tokens=3)
    assert resp.usage is not None and resp.usage.completion_tokens == 3
