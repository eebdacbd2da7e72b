"""GGUF models through llama.cpp's low-level C API (via llama-cpp-python's ctypes bindings).

This is the only module that imports ``llama_cpp``. We use the low-level functions rather than
the high-level ``Llama`` class because ``Llama`` serves one sequence at a time and keeps global
per-instance state; here one context holds ``n_slots`` independent sequences (a separate KV
stream each, ``kv_unified = false``) so the scheduler can decode many requests in one batch and
give every sequence its own sampler chain.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from engines.base import (
    AdapterLoadError,
    AdapterSet,
    BackendDevice,
    BatchItem,
    DecodeError,
    EngineCapabilities,
    LoadOptions,
    ModelFacts,
    ModelLoadError,
    SamplingParams,
)
from engines.cpu_backends import BUILT_IN, BackendSelection, CpuBackendError, load_backends
from engines.ggufmixer import AdapterFactors, AdapterMixer, LayoutError
from engines.ggufsampler import GgufSampler
from engines.vocabdelegate import VocabularyMethods

T = TypeVar("T")

log = logging.getLogger(__name__)
native_log = logging.getLogger("engines.llama_cpp.native")

GGUF_MAGIC = b"GGUF"
_backend_lock = threading.Lock()
_backend_ready = False
_log_callback: Any = None  # the ctypes callback must outlive every native call
_backends: BackendSelection | None = None  # what was loaded, for the hardware report
_libggml: Any = None


def check_gguf_file(path: Path) -> None:
    """Fail with a clear message unless ``path`` is a readable GGUF file."""
    if not path.exists():
        raise ModelLoadError(path, "the file does not exist")
    if not path.is_file():
        raise ModelLoadError(path, "not a regular file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read it ({exc.strerror})") from exc
    if magic != GGUF_MAGIC:
        raise ModelLoadError(path, "not a GGUF file (bad magic bytes)")


def at_low_priority(call: Callable[[], T]) -> T:
    """Run a long native call on a thread of its own at the lowest CPU priority, and wait for it.

    llama.cpp's model load is ~0.7 s of one core per 250 MB (it repacks the weights), with the GIL
    released. Beside models that are decoding on every core, a load at normal priority takes a
    core from their threads, which wait for each other at every step: tokens stalled 150 ms here
    (2 cores). At the lowest priority the load takes what they leave. The thread ends with the
    call, so nothing started later inherits its priority. Linux only: elsewhere a thread's
    priority is not set this way, and the call runs as it is.
    """
    if not sys.platform.startswith("linux"):
        return call()
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            result.append(call())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="load-native", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def load_llama() -> Any:
    """Import llama_cpp once, initialise the backend and route its logging to ``logging``."""
    global _backend_ready, _log_callback, _backends, _libggml
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    with _backend_lock:
        if not _backend_ready:
            levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level; INFO is chatty: DEBUG

            @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
            def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                message = text.decode("utf-8", "replace").rstrip()
                if message.strip(". "):
                    native_log.log(levels.get(level, logging.DEBUG), "%s", message)

            _log_callback = _on_log
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            # the libggml beside the libllama in use (LLAMA_CPP_LIB_PATH moves both; llama_cpp._ggml
            # would open the package's own), and its backends before backend init, which would
            # search the working directory for them itself
            lib_dir = Path(llama_cpp.llama_cpp._base_path)
            _libggml = load_shared_library("ggml", lib_dir)
            _backends = load_backends(_libggml, lib_dir)
            if _backends.cpu_variant != BUILT_IN:
                log.info("llama.cpp CPU code: %s (usable here: %s)", _backends.cpu_variant, ", ".join(_backends.usable))
            llama_cpp.llama_backend_init()
            # after backend init: initialising the backend installs its own default logger
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            _backend_ready = True
    return llama_cpp


_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_ggml_lib: Any = None


class _DeviceProps(ctypes.Structure):
    """``struct ggml_backend_dev_props``; the padding leaves room for capability flags added later."""

    _fields_ = (
        ("name", ctypes.c_char_p),
        ("description", ctypes.c_char_p),
        ("memory_free", ctypes.c_size_t),
        ("memory_total", ctypes.c_size_t),
        ("type", ctypes.c_int),
        ("device_id", ctypes.c_char_p),
        ("caps", ctypes.c_bool * 32),
    )


def _ggml() -> Any:
    """libggml with the device-registry functions that llama-cpp-python does not bind."""
    global _ggml_lib
    load_llama()
    if _ggml_lib is None:
        lib = _libggml
        p = ctypes.c_void_p
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [ctypes.c_size_t], p
        lib.ggml_backend_dev_by_name.argtypes, lib.ggml_backend_dev_by_name.restype = [ctypes.c_char_p], p
        lib.ggml_backend_dev_get_props.argtypes = [p, ctypes.POINTER(_DeviceProps)]
        lib.ggml_backend_dev_get_props.restype = None
        lib.ggml_backend_dev_backend_reg.argtypes, lib.ggml_backend_dev_backend_reg.restype = [p], p
        lib.ggml_backend_reg_name.argtypes, lib.ggml_backend_reg_name.restype = [p], ctypes.c_char_p
        lib.ggml_backend_reg_count.restype = ctypes.c_size_t
        lib.ggml_backend_reg_get.argtypes, lib.ggml_backend_reg_get.restype = [ctypes.c_size_t], p
        _ggml_lib = lib
    return _ggml_lib


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace")


def capabilities() -> EngineCapabilities:
    """What this llama.cpp build can run on here: its backends' devices, as ggml's registry lists them.

    Initialising a GPU backend talks to its driver, so the appliance calls this in a
    short-lived subprocess (see ``appliance.hardware``).
    """
    try:
        lib = load_llama()
        ggml = _ggml()
    except (ImportError, OSError, AttributeError, CpuBackendError) as exc:
        return EngineCapabilities("gguf", "llama-cpp-python", installed=False, detail=f"{type(exc).__name__}: {exc}")
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        props = _DeviceProps()
        ggml.ggml_backend_dev_get_props(dev, ctypes.byref(props))
        devices.append(
            BackendDevice(
                name=_text(props.name),
                backend=_text(ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev))),
                kind=_DEVICE_KINDS.get(props.type, str(props.type)),
                description=_text(props.description).strip(),
                memory_free=int(props.memory_free) or None,
                memory_total=int(props.memory_total) or None,
                pci_bus_id=_text(props.device_id) or None,
            )
        )
    backends = (
        _text(ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i))) for i in range(ggml.ggml_backend_reg_count())
    )
    return EngineCapabilities(
        engine="gguf",
        runtime=f"llama-cpp-python {getattr(lib, '__version__', '?')}",
        installed=True,
        gpu_offload=bool(lib.llama_supports_gpu_offload()),
        backends=tuple(backends),
        devices=tuple(devices),
        build_info=_text(lib.llama_print_system_info()).strip(" |"),
        cpu_variant=_backends.cpu_variant if _backends else "",
    )


def device_list(names: Sequence[str], path: Path) -> Any:
    """A NULL-terminated ``ggml_backend_dev_t`` array of these devices (empty: CPU only)."""
    ggml = _ggml()
    found = []
    for name in names:
        dev = ggml.ggml_backend_dev_by_name(name.encode())
        if not dev:
            raise ModelLoadError(path, f"this llama.cpp build has no device {name}")
        found.append(dev)
    return (ctypes.c_void_p * (len(found) + 1))(*found, None)


def _exact_chunk(flash_attn: bool) -> int:
    """The smallest per-sequence prompt chunk whose rows llama.cpp's CPU kernels compute the same
    way whatever the chunk's size.

    With flash attention, ggml's CPU kernel switches to a tiled algorithm for >= 64 queries
    (GGML_FA_TILE_Q); without it, the attention matmuls take another path for a single query.
    Rows computed on one path are the same however they are grouped; across paths they differ in
    the last bits, enough to change a temperature-0 answer. Measured: tests/test_batching.py.
    """
    return 64 if flash_attn else 2


# llama.cpp's file types (``general.file_type``), as the gguf package names them: looked up here
# because importing that package costs 0.1 s of every start; it is asked only for a newer type
_FILE_TYPES = {
    0: "ALL_F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip


def _quantization(file_type: str | None) -> str | None:
    """The name of llama.cpp's ``general.file_type`` (e.g. ``MOSTLY_Q4_1`` -> ``Q4_1``)."""
    if file_type is None or not file_type.isdigit():
        return None
    if int(file_type) in _FILE_TYPES:
        return _FILE_TYPES[int(file_type)]
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {file_type}"


class GgufAdapter:
    """A LoRA adapter llama.cpp loaded for one model; its tensors live beside the shared weights."""

    def __init__(self, model: GgufModel, name: str, pointer: Any, factors: AdapterFactors | None = None) -> None:
        self._model = model
        self._name = name
        self.pointer: Any = pointer  # llama.cpp's adapter, or None where the mixer applies it
        self.factors = factors

    @property
    def name(self) -> str:
        return self._name

    @property
    def mixable(self) -> bool:
        return self.factors is not None

    def close(self) -> None:
        self._model._free_adapter(self)


class GgufModel(VocabularyMethods):
    """A loaded GGUF model with one llama.cpp context of ``n_slots`` sequences.

    LoRA adapters: on a CPU model, the ``AdapterMixer`` applies each item's own adapters to its
    rows, so one call serves the base and any adapters. Otherwise (GPU layers, or an adapter of
    the token embeddings) llama.cpp applies them to the whole context: each ``decode`` call sets
    the adapter set of the items it holds (llama.cpp does nothing when the set is unchanged) and
    the scheduler groups sequences by adapter set. One lock orders decoding against loading and
    freeing adapters, which the API does from other threads.
    """

    def __init__(self, path: Path, options: LoadOptions) -> None:
        check_gguf_file(path)
        lib = load_llama()
        self._lib = lib
        self._options = options
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers if options.gpu_devices else 0
        # Always an explicit device list: a GPU build would otherwise use every GPU it sees, and
        # with none listed (a CPU plan) it keeps everything, prompt batches too, on the CPU.
        self._device_array = device_list(options.gpu_devices, path)
        mparams.devices = ctypes.cast(self._device_array, ctypes.c_void_p)
        mparams.main_gpu = options.main_gpu
        mparams.use_extra_bufts = use_extra_buffers(lib, options.extra_buffers)
        if options.tensor_split:
            self._split_array = (ctypes.c_float * int(lib.llama_max_devices()))(*options.tensor_split)
            mparams.tensor_split = self._split_array
        load = functools.partial(lib.llama_model_load_from_file, str(path).encode("utf-8"), mparams)
        model = at_low_priority(load) if options.background else load()
        if not model:
            raise ModelLoadError(path, "llama.cpp could not load it (corrupt, truncated or unsupported)")
        self._model: Any = model
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = options.n_ctx_per_slot * options.n_slots
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_batch
        cparams.n_seq_max = options.n_slots
        cparams.n_threads = options.n_threads
        cparams.n_threads_batch = options.n_threads_batch
        cparams.kv_unified = False
        cparams.flash_attn_type = 1 if options.flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED/DISABLED
        cparams.no_perf = True
        cparams.op_offload = bool(options.gpu_devices)
        self._mixer = _mixer(options)
        if self._mixer is not None:
            cparams.cb_eval = self._mixer.callback
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise ModelLoadError(path, "llama.cpp could not create a context (out of memory?)")
        self._ctx: Any = ctx
        self._lock = threading.RLock()
        self._adapters: set[GgufAdapter] = set()
        self._applied: tuple[tuple[Any, float], ...] = ()
        self._memory = lib.llama_get_memory(ctx)
        self._batch: Any = lib.llama_batch_init(options.n_batch, 0, 1)
        from engines.ggufvocab import GgufVocabulary  # here: ggufvocab imports this module's loader

        self._vocabulary = vocab = GgufVocabulary(lib, model, chat_template_override=options.chat_template_override)
        metadata = vocab.metadata
        n_vocab = vocab.n_vocab
        self._n_vocab = n_vocab
        # not llama_model_desc: it guesses the size from the layer count ("llama 256M" for SmolLM2-135M)
        from engines.ggufmeta import model_size  # here, not at the top: ggufmeta imports this module

        quantization = _quantization(metadata.get("general.file_type"))
        self._facts = ModelFacts(
            n_ctx_per_slot=int(lib.llama_n_ctx(ctx)) // options.n_slots,
            n_slots=options.n_slots,
            n_ctx_train=int(lib.llama_model_n_ctx_train(model)),
            n_vocab=n_vocab,
            description=f"{model_size(path)} {quantization or ''}".rstrip(),
            has_chat_template=vocab.has_chat_template,
            metadata=metadata,
            exact_chunk=_exact_chunk(options.flash_attn),
            quantization=quantization,
            backend="+".join(options.gpu_devices) if options.gpu_devices and options.n_gpu_layers else "cpu",
            n_gpu_layers=mparams.n_gpu_layers,
            mixes_adapters=self._mixer is not None,
        )
        log.info(
            "loaded %s: %s, %d slots x %d tokens",
            path.name,
            self._facts.description,
            options.n_slots,
            self._facts.n_ctx_per_slot,
        )

    @property
    def facts(self) -> ModelFacts:
        return self._facts

    def new_sampler(self, params: SamplingParams) -> GgufSampler:
        return GgufSampler(self._lib, self._ctx, self._n_vocab, params)

    def load_adapter(self, path: Path, name: str) -> GgufAdapter:
        factors = AdapterFactors.read(path) if self._mixer is not None else None
        with self._lock:
            pointer = None
            if factors is None:
                pointer = self._lib.llama_adapter_lora_init(self._model, str(path).encode("utf-8"))
                if not pointer:
                    raise AdapterLoadError(path, "llama.cpp refused it (its log above says why)")
            adapter = GgufAdapter(self, name, pointer, factors)
            self._adapters.add(adapter)
        return adapter

    def _free_adapter(self, adapter: GgufAdapter) -> None:
        with self._lock:
            if adapter not in self._adapters:
                return
            if adapter.pointer is not None:
                if any(pointer == adapter.pointer for pointer, _ in self._applied):
                    self._apply(())  # the context must not keep a pointer to freed tensors
                self._lib.llama_adapter_lora_free(adapter.pointer)
            self._adapters.discard(adapter)
            adapter.pointer = adapter.factors = None

    def _apply(self, wanted: tuple[tuple[Any, float], ...]) -> None:
        if wanted == self._applied:
            return
        lib, n = self._lib, len(wanted)
        pointers = (lib.llama_adapter_lora_p_ctypes * max(1, n))(*(p for p, _ in wanted))
        scales = (ctypes.c_float * max(1, n))(*(s for _, s in wanted))
        rc = lib.llama_set_adapters_lora(self._ctx, pointers, n, scales)
        if rc != 0:
            raise DecodeError(f"llama_set_adapters_lora returned {rc}")
        self._applied = wanted

    def decode(self, items: Sequence[BatchItem], adapters: AdapterSet = ()) -> list[list[int]]:
        with self._lock:
            if any(item.adapters for item in items):
                return self._decode_mixed(items, adapters)
            wanted = []
            for adapter, scale in adapters:
                assert isinstance(adapter, GgufAdapter) and adapter.pointer is not None, "adapter freed or foreign"
                wanted.append((adapter.pointer, scale))
            self._apply(tuple(wanted))
            return self._decode(items)

    def _decode_mixed(self, items: Sequence[BatchItem], adapters: AdapterSet) -> list[list[int]]:
        mixer = self._mixer
        if mixer is None or adapters:
            raise DecodeError("per-item adapters need a CPU model that mixes them, and no adapters for the whole call")
        factors = []
        for item in items:
            chosen = []
            for adapter, scale in item.adapters:
                assert isinstance(adapter, GgufAdapter) and adapter.factors is not None, "adapter freed or not mixable"
                chosen.append((adapter.factors, scale))
            factors.append(tuple(chosen))
        self._apply(())
        mixer.begin(items, factors, self._options.n_batch)
        try:
            outputs = self._decode(items)
        finally:
            mixer.end()
        return outputs

    def _decode(self, items: Sequence[BatchItem]) -> list[list[int]]:
        batch = self._batch
        total = sum(len(item.tokens) for item in items)
        if total > self._options.n_batch:
            raise DecodeError(f"batch of {total} tokens exceeds n_batch={self._options.n_batch}")
        outputs: list[list[int]] = []
        i = 0
        for item in items:
            first_output = len(item.tokens) - item.n_outputs
            indices: list[int] = []
            for j, token in enumerate(item.tokens):
                batch.token[i] = token
                batch.pos[i] = item.start_pos + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = item.slot
                wants = j >= first_output
                batch.logits[i] = 1 if wants else 0
                if wants:
                    indices.append(i)
                i += 1
            outputs.append(indices)
        batch.n_tokens = i
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}", no_space=rc == 1)
        return outputs

    def truncate_slot(self, slot: int, n_keep: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, slot, n_keep if n_keep > 0 else -1, -1)

    def copy_slot(self, src: int, dst: int) -> None:
        # Slots are separate KV streams (kv_unified off): llama.cpp copies a whole stream, and does
        # the copy at the start of the next llama_decode, before that batch writes anything.
        self._lib.llama_memory_seq_cp(self._memory, src, dst, -1, -1)

    def close(self) -> None:
        lib = self._lib
        for adapter in list(self._adapters):
            adapter.close()
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None


def _mixer(options: LoadOptions) -> AdapterMixer | None:
    """The per-row adapter mixer for a model loaded with these options, where it can work."""
    if not options.mix_adapters or options.gpu_devices:
        return None  # activations of offloaded layers are not in host memory
    try:
        return AdapterMixer(_libggml)
    except LayoutError as exc:
        log.warning("LoRA adapters will be applied per decode call, not per request: %s", exc)
        return None


def use_extra_buffers(lib: Any, asked: bool | None) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types.

    On a CPU with AMX, llama.cpp puts Q4_0/Q4_1/Q8_0 weights in an AMX buffer, and its AMX matmul
    segfaults in the first decodes on Sapphire Rapids machines (llama.cpp issue #20824, still
    open; seen here with the default model: the process dies in ``llama_decode``). Repacking is
    only a speed-up, so it is off there unless asked for.
    """
    if asked is not None:
        return asked
    amx = "AMX_INT8 = 1" in _text(lib.llama_print_system_info())
    if amx:
        log.info("this CPU has AMX: llama.cpp's AMX weight repacking is off (it crashes; llama.cpp #20824)")
    return not amx


class GgufEngine:
    """The ``gguf`` engine: loads GGUF files with llama.cpp."""

    name = "gguf"

    def prepare(self) -> None:
        load_llama()

    def load(self, path: Path, options: LoadOptions) -> GgufModel:
        return GgufModel(path, options)
