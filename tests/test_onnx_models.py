"""ONNX model folders in the store: imported, hashed, verified before serving, refused with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.config import Paths
from appliance.modelconvert import convert_model
from appliance.modelstore import ModelFileError, import_model, verify_model_file
from appliance.registry import load_registry


def test_a_converted_folder_imports_and_verifies(onnx_model_dir: Path, app_home: Path) -> None:
    paths = Paths(app_home)
    spec = import_model(paths, onnx_model_dir, "my-onnx", progress=False)
    assert (spec.engine, spec.quantization, spec.context_length) == ("onnx", "onnx-int4", 8192)
    assert load_registry(paths).get("my-onnx").sha256 == spec.sha256
    folder = verify_model_file(paths, spec, progress=False)
    assert (folder / "model.onnx").is_file()
    # a changed byte in the weights is caught before serving, as for a GGUF file
    data = folder / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="corrupt or was replaced"):
        verify_model_file(paths, spec, progress=False)
    (folder / "tokenizer.gguf").unlink()
    with pytest.raises(ModelFileError, match=r"no tokenizer\.gguf"):
        verify_model_file(paths, spec, progress=False)


def test_folders_that_are_not_converted_models_are_refused(tmp_path: Path, app_home: Path) -> None:
    paths = Paths(app_home)
    genai = tmp_path / "phi-genai"
    genai.mkdir()
    (genai / "genai_config.json").write_text("{}")
    (genai / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match="onnxruntime-genai model folder"):
        import_model(paths, genai, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match=r"no model\.onnx"):
        import_model(paths, empty, progress=False)


def test_convert_refuses_what_it_cannot_convert(app_home: Path, onnx_model_dir: Path) -> None:
    paths = Paths(app_home)
    with pytest.raises(ModelFileError, match="unknown model"):
        convert_model(paths, "no-such-model", progress=False)
    with pytest.raises(ModelFileError, match="not a GGUF chat model"):
        convert_model(paths, "all-minilm-l6-v2", progress=False)
    with pytest.raises(ModelFileError, match="unknown precision"):
        convert_model(paths, "smollm2", precision="int2", progress=False)
    import_model(paths, onnx_model_dir, "taken", progress=False)
    with pytest.raises(ModelFileError, match="already exists"):
        convert_model(paths, "smollm2", model_id="taken", progress=False)
    assert not any(p.name.endswith(".partial") for p in paths.models_dir.iterdir())


def test_a_non_llama_gguf_is_refused_with_the_engine_to_use(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from engines.onnx.convert import ConversionError, convert

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match=r"'gpt2' model.*serve it with the GGUF engine"):
        convert(path, tmp_path / "out")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
