"""ONNX models through onnxruntime: what the installed onnxruntime can run on, a check that it runs
a given model, and CPU sessions for the ONNX embedding engine (``engines.onnx_embed``).

This package is the only one that imports ``onnxruntime``. The hardware report lists its execution
providers (CUDA, ROCm/MIGraphX, DirectML, CPU) so a user sees whether the GPU build
(``onnxruntime-gpu``) is the one installed; ``check_model`` runs one inference so a user (and the
single executable's tests) can see that the runtime really works here, not only that it imports.
The generative engine is ``engines.onnx.model``, on folders written by ``engines.onnx.convert``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import EngineCapabilities, ModelLoadError

# execution provider -> the kind of device it drives, in the order onnxruntime prefers them
GPU_PROVIDERS = {
    "TensorrtExecutionProvider": "cuda",
    "CUDAExecutionProvider": "cuda",
    "MIGraphXExecutionProvider": "rocm",
    "ROCMExecutionProvider": "rocm",
    "DmlExecutionProvider": "directml",
    "CoreMLExecutionProvider": "metal",
}


def capabilities() -> EngineCapabilities:
    try:
        import onnxruntime
    except ImportError as exc:
        return EngineCapabilities(
            "onnx", "onnxruntime", installed=False, detail=f"onnxruntime is not installed ({exc})"
        )
    providers = tuple(onnxruntime.get_available_providers())
    return EngineCapabilities(
        engine="onnx",
        runtime=f"onnxruntime {onnxruntime.__version__}",
        installed=True,
        gpu_offload=any(p in GPU_PROVIDERS for p in providers),
        providers=providers,
        build_info=str(onnxruntime.get_device()),
    )


def cpu_session(path: Path, threads: int, *, spinning: bool = True) -> Any:
    """An onnxruntime session of ``path`` on the CPU with ``threads`` threads, run one call at a time.

    The thread count is a bound, not a hint: other work (chat decoding) shares the cores. Without
    ``spinning`` idle threads sleep instead of busy-waiting for the next call.
    ``ModelLoadError`` says why the file cannot be loaded.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelLoadError(path, f"onnxruntime is not installed ({exc})") from exc
    if not path.is_file():
        raise ModelLoadError(path, "the file does not exist")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise ModelLoadError(path, f"onnxruntime cannot load it: {exc}") from exc


@dataclass(frozen=True)
class OnnxTensor:
    name: str
    type: str  # onnxruntime's type name, e.g. "tensor(float)"
    shape: tuple[int, ...]  # as fed or as produced; a symbolic input dimension is fed as 1


@dataclass(frozen=True)
class OnnxCheck:
    """One inference of a model on inputs of ones: what ran where, and how long it took."""

    path: str
    provider: str  # the execution provider the session put first
    inputs: tuple[OnnxTensor, ...]
    outputs: tuple[OnnxTensor, ...]
    first_values: tuple[float, ...]  # the start of the first numeric output, to compare by eye
    load_ms: float
    run_ms: float


_NUMPY_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def check_model(path: Path, providers: Sequence[str] | None = None) -> OnnxCheck:
    """Load ``path`` and run it once on ones; raise ``ModelLoadError`` saying why it cannot."""
    import numpy as np

    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelLoadError(path, f"onnxruntime is not installed ({exc})") from exc
    if not path.is_file():
        raise ModelLoadError(path, "the file does not exist")
    # the Azure provider calls a remote endpoint: never for a local check
    chosen = list(providers or (p for p in onnxruntime.get_available_providers() if p != "AzureExecutionProvider"))
    start = time.perf_counter()
    try:
        session = onnxruntime.InferenceSession(str(path), providers=chosen)
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise ModelLoadError(path, f"onnxruntime cannot load it: {exc}") from exc
    loaded = time.perf_counter()
    feeds: dict[str, Any] = {}
    inputs = []
    for arg in session.get_inputs():
        dtype = _NUMPY_TYPES.get(arg.type)
        if dtype is None:
            raise ModelLoadError(path, f"input {arg.name} is {arg.type}; this check feeds numeric tensors only")
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in arg.shape)
        feeds[arg.name] = np.ones(shape, dtype=dtype)
        inputs.append(OnnxTensor(arg.name, arg.type, shape))
    try:
        results = session.run(None, feeds)
    except Exception as exc:
        raise ModelLoadError(path, f"onnxruntime failed to run it: {exc}") from exc
    ran = time.perf_counter()
    outputs = []
    first: tuple[float, ...] = ()
    for arg, value in zip(session.get_outputs(), results, strict=True):
        array = np.asarray(value) if isinstance(value, np.ndarray) else None
        outputs.append(OnnxTensor(arg.name, arg.type, tuple(array.shape) if array is not None else ()))
        if array is not None and not first and array.dtype.kind in "fiub":
            first = tuple(float(x) for x in array.reshape(-1)[:4])
    return OnnxCheck(
        path=str(path),
        provider=session.get_providers()[0],
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        first_values=first,
        load_ms=round((loaded - start) * 1000, 2),
        run_ms=round((ran - loaded) * 1000, 2),
    )
