"""The one map from a model's format to the engine that serves it.

``models.toml`` names a model's ``engine`` ("gguf" or "onnx"); everything outside ``engines/``
asks this module for the engine class, the sizes the hardware planner needs, and whether a path
holds a model of that format, so no other layer knows how a format is laid out on disk. The
runtimes themselves (llama_cpp, onnxruntime) are imported only when a model loads.
"""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine, ModelLoadError, ModelShape

FORMATS = ("gguf", "onnx")
RUNTIMES = {"gguf": "llama.cpp", "onnx": "onnxruntime"}  # what the request log records as a model's backend


def engine_class(name: str) -> type[Engine]:
    """The engine that loads models of format ``name``; ``KeyError`` for an unknown one."""
    if name == "gguf":
        from engines.gguf import GgufEngine

        return GgufEngine
    if name == "onnx":
        from engines.onnx.model import OnnxEngine

        return OnnxEngine
    raise KeyError(f"no engine '{name}'; known: {', '.join(FORMATS)}")


def detect_format(path: Path) -> str:
    """A model path's format: a converted ONNX folder, or else a GGUF file (checked when read)."""
    return "onnx" if path.is_dir() else "gguf"


def check_model(path: Path, name: str) -> None:
    """Fail with ``ModelLoadError`` unless ``path`` holds a model of format ``name`` (cheap: headers only)."""
    if name == "onnx":
        from engines.onnx.model import check_onnx_folder

        check_onnx_folder(path)
    else:
        from engines.gguf import check_gguf_file

        check_gguf_file(path)


def model_shape(path: Path, name: str) -> ModelShape:
    """What the planner sizes memory by, from the model's header or config (no load)."""
    if name == "onnx":
        from engines.onnx.model import onnx_model_shape

        return onnx_model_shape(path)
    from engines.ggufmeta import model_shape as gguf_shape

    if path.is_dir():
        raise ModelLoadError(path, 'a folder is not a GGUF file (an ONNX model? set engine = "onnx")')
    return gguf_shape(path)


def folder_files(path: Path) -> list[Path]:
    """The files a model folder is made of, by name (a stray ``.DS_Store`` is not part of the model)."""
    from engines.onnx.convert import MODEL_FILES

    return [path / name for name in sorted(MODEL_FILES) if (path / name).is_file()]
