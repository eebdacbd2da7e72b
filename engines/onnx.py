"""ONNX models through onnxruntime: for now, what the installed onnxruntime can run on.

This is the only module that imports ``onnxruntime``. The hardware report lists its execution
providers (CUDA, ROCm/MIGraphX, DirectML, CPU) so a user sees whether the GPU build
(``onnxruntime-gpu``) is the one installed; the ONNX engine itself is not built yet.
"""

from __future__ import annotations

from engines.base import EngineCapabilities

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
