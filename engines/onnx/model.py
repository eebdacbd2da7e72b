"""The ONNX engine: a converted model (``engines.onnx.convert``) run by plain onnxruntime, batched.

Why not onnxruntime-genai's ``Engine``: on a CPU it batches only static cohorts of 4 that run to
completion before the next is admitted (shared/notes/onnx-route.md), so requests arriving while
others run wait. Here the appliance's scheduler does the continuous batching, as it does for
llama.cpp, and this module owns the KV cache:

- One KV buffer per layer and kind, ``[n_slots, kv_heads, n_ctx_per_slot + 1, head_dim]``, bound
  to ``GroupQueryAttention`` as both past and present, so onnxruntime writes each new token's
  keys and values in place (its shared-buffer mode) and nothing is copied per step.
- A step of one-token items (the decode of every running stream) is one call over the rows
  ``[0, highest slot + 1)``. A row with nothing to do is fed a dummy token at its slot's next free
  position (or the spare last cell of a full slot), where it overwrites nothing that is kept.
- A prompt chunk runs alone on its slot's row (batch of one), its logits only where asked.
- Tokenizer, chat template and sampler chain are llama.cpp's (``ggufvocab``, ``ggufsampler``),
  read from the ``tokenizer.gguf`` the converter wrote, so text and seeds mean what they mean
  on the GGUF engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import (
    AdapterLoadError,
    AdapterSet,
    BatchItem,
    DecodeError,
    LoadOptions,
    ModelFacts,
    ModelLoadError,
    ModelShape,
    SamplingParams,
)
from engines.ggufsampler import ArraySampler
from engines.ggufvocab import GgufVocabulary
from engines.onnx import cpu_session
from engines.onnx.convert import CONFIG_FILE, FORMAT, MODEL_FILE, TOKENIZER_FILE, OnnxModelConfig, weight_bytes
from engines.vocabdelegate import VocabularyMethods

log = logging.getLogger(__name__)

MIN_ONNXRUNTIME = (1, 23)  # GroupQueryAttention's continued prompts, GatherBlockQuantized's 8 bits


def check_onnx_folder(path: Path) -> OnnxModelConfig:
    """Fail with a clear message unless ``path`` is a folder the converter wrote."""
    if not path.exists():
        raise ModelLoadError(path, "the folder does not exist")
    if not path.is_dir():
        raise ModelLoadError(
            path,
            "an ONNX chat model is a folder (model.onnx, tokenizer.gguf, appliance-onnx.json) written by "
            '`appliance models convert`; a single .onnx file is served as an embedding model (kind = "embedding")',
        )
    for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise ModelLoadError(path, f"it has no {name} (convert a GGUF with `appliance models convert`)")
    try:
        config = OnnxModelConfig.read(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(path, f"its {CONFIG_FILE} is not valid ({exc})") from exc
    if config.format != FORMAT:
        raise ModelLoadError(path, f"it is in the format '{config.format}'; this version reads '{FORMAT}'")
    return config


def onnx_model_shape(path: Path) -> ModelShape:
    """The planner's sizes for a converted folder: weights from the files, KV cache as this engine keeps it."""
    config = check_onnx_folder(path)
    weights = weight_bytes(path)
    per_layer = weights // max(1, config.n_layer + 1)  # the embeddings and head ~ one layer's worth
    return ModelShape(
        architecture=config.architecture,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_vocab=config.n_vocab,
        n_ctx_train=config.n_ctx_train,
        layer_bytes=(per_layer,) * config.n_layer,
        output_bytes=0,
        tied_output=True,
        input_bytes=weights - per_layer * config.n_layer,
        kv_bytes_per_token=(2 * config.n_head_kv * config.head_dim * 4,) * config.n_layer,  # f32 K and V
        file_bytes=weights,
    )


class OnnxModel(VocabularyMethods):
    """A converted model in one onnxruntime session with ``n_slots`` sequence slots."""

    def __init__(self, path: Path, options: LoadOptions) -> None:
        config = check_onnx_folder(path)
        try:
            import onnxruntime
        except ImportError as exc:
            raise ModelLoadError(path, f"onnxruntime is not installed ({exc})") from exc
        version = tuple(int(x) for x in onnxruntime.__version__.split(".")[:2] if x.isdigit())
        if version < MIN_ONNXRUNTIME:
            raise ModelLoadError(
                path, f"onnxruntime {onnxruntime.__version__} is too old: pip install 'onnxruntime>=1.23'"
            )
        self._config = config
        self._vocabulary = GgufVocabulary.open(
            path / TOKENIZER_FILE, chat_template_override=options.chat_template_override
        )
        try:
            # spinning threads would take the cores from the HTTP server and the other engines' work
            self._session = cpu_session(path / MODEL_FILE, options.n_threads, spinning=False)
        except ModelLoadError:
            self._vocabulary.close()
            raise
        n_ctx = min(options.n_ctx_per_slot, config.n_ctx_train)
        self._n_ctx = n_ctx
        shape = (options.n_slots, config.n_head_kv, n_ctx + 1, config.head_dim)  # + the spare cell
        self._kv = {
            f"{i}.{kind}": np.zeros(shape, dtype=np.float32) for i in range(config.n_layer) for kind in ("key", "value")
        }
        self._length = [0] * options.n_slots  # positions written per slot (what a dummy row skips)
        self._bindings: dict[tuple[int, int], Any] = {}
        self._outputs: list[np.ndarray] = []
        self._lock = threading.Lock()
        kv_bytes = sum(a.nbytes for a in self._kv.values())
        self._facts = ModelFacts(
            n_ctx_per_slot=n_ctx,
            n_slots=options.n_slots,
            n_ctx_train=config.n_ctx_train,
            n_vocab=config.n_vocab,
            description=f"{config.source} as ONNX {config.precision}",
            has_chat_template=self._vocabulary.has_chat_template,
            metadata=self._vocabulary.metadata,
            exact_chunk=2,
            quantization=config.precision,
            backend="cpu",
        )
        # a dummy row costs reading its slot's cached K and V; a separate call costs reading the weights again
        self._weight_bytes = weight_bytes(path)
        self._kv_bytes_per_cell = 2 * config.n_layer * config.n_head_kv * config.head_dim * 4
        self._warm_up(path)
        log.info(
            "loaded %s (ONNX %s): %d slots x %d tokens, KV cache %.0f MiB",
            path.name,
            config.precision,
            options.n_slots,
            n_ctx,
            kv_bytes / 2**20,
        )

    def _warm_up(self, path: Path) -> None:
        """A first prompt, a continued prompt and a step on slot 0: a graph this onnxruntime cannot run
        fails the load, not the first request (with every other request of its batch)."""
        try:
            self.decode([BatchItem(0, [1, 2], 0, 0)])
            self.decode([BatchItem(0, [3, 4], 2, 1)])
            self.decode([BatchItem(0, [5], 4, 1)])
        except DecodeError as exc:
            self.close()
            raise ModelLoadError(path, f"onnxruntime cannot run it here: {exc}") from exc
        self.truncate_slot(0, 0)

    @property
    def facts(self) -> ModelFacts:
        return self._facts

    # -- text: llama.cpp's vocabulary functions on the tokenizer.gguf (VocabularyMethods)

    def new_sampler(self, params: SamplingParams) -> Any:
        return ArraySampler(self._vocabulary.lib, self._config.n_vocab, params, self._row)

    def _row(self, output_index: int) -> np.ndarray:
        return self._outputs[output_index]

    # -- adapters: not in this engine yet

    def load_adapter(self, path: Path, name: str) -> Any:
        raise AdapterLoadError(path, "the ONNX engine does not apply LoRA adapters; serve the model as GGUF for them")

    # -- the KV cache

    def truncate_slot(self, slot: int, n_keep: int) -> None:
        # cells past a row's length are never read: forgetting is only lowering the length
        with self._lock:
            self._length[slot] = min(self._length[slot], max(0, n_keep))

    def copy_slot(self, src: int, dst: int) -> None:
        with self._lock:
            n = self._length[src]
            for buffer in self._kv.values():
                buffer[dst, :, :n] = buffer[src, :, :n]
            self._length[dst] = n

    # -- evaluation

    def decode(self, items: Sequence[BatchItem], adapters: AdapterSet = ()) -> list[list[int]]:
        if adapters:
            raise DecodeError("the ONNX engine does not apply LoRA adapters")
        with self._lock:
            if self._session is None:
                raise DecodeError("the model is closed")
            outputs: list[np.ndarray] = []
            indices: list[list[int]] = [[] for _ in items]
            for item in items:
                self._check(item)
            steps = [i for i, item in enumerate(items) if len(item.tokens) == 1 and item.n_outputs <= 1]
            for run in self._runs(sorted(items[i].slot for i in steps)):
                in_run = [i for i in steps if items[i].slot in run]
                logits = self._step([items[i] for i in in_run], run[0], run[-1] + 1)
                for i in in_run:
                    if items[i].n_outputs:
                        indices[i].append(len(outputs))
                        outputs.append(logits[items[i].slot - run[0]])
            for i, item in enumerate(items):
                if i in steps:
                    continue
                rows = self._prompt(item)
                for row in rows:
                    indices[i].append(len(outputs))
                    outputs.append(row)
            self._outputs = outputs
            return indices

    def _check(self, item: BatchItem) -> None:
        if not 0 <= item.slot < len(self._length) or not item.tokens or item.n_outputs > len(item.tokens):
            raise DecodeError(f"bad batch item: slot {item.slot}, {len(item.tokens)} tokens, {item.n_outputs} outputs")
        if not 0 <= item.start_pos <= self._length[item.slot]:
            raise DecodeError(f"slot {item.slot} holds {self._length[item.slot]} positions; {item.start_pos} asked")
        if item.start_pos + len(item.tokens) > self._n_ctx:
            raise DecodeError(
                f"slot {item.slot} holds {self._n_ctx} tokens; {item.start_pos + len(item.tokens)} asked",
                no_space=True,
            )

    def _runs(self, slots: Sequence[int]) -> list[list[int]]:
        """Rows to step together: consecutive busy slots, and idle ones between them while their dummy
        rows (which read their slot's cached cells) cost less than one more call (which reads the weights)."""
        runs: list[list[int]] = []
        for slot in slots:
            if runs:
                gap = range(runs[-1][-1] + 1, slot)
                if sum(self._length[r] + 1 for r in gap) * self._kv_bytes_per_cell < self._weight_bytes:
                    runs[-1].extend([*gap, slot])
                    continue
            runs.append([slot])
        return runs

    def _binding(self, first: int, stop: int) -> Any:
        """An IOBinding of the rows [first, stop) of every KV buffer, as past and present alike."""
        binding = self._bindings.get((first, stop))
        if binding is None:
            binding = self._session.io_binding()
            for name, buffer in self._kv.items():
                rows = buffer[first:stop]
                layer, kind = name.split(".")
                binding.bind_input(
                    f"past_key_values.{layer}.{kind}", "cpu", 0, np.float32, rows.shape, rows.ctypes.data
                )
                binding.bind_output(f"present.{layer}.{kind}", "cpu", 0, np.float32, rows.shape, rows.ctypes.data)
            self._bindings[(first, stop)] = binding
        return binding

    def _run(self, binding: Any, ids: np.ndarray, lengths: np.ndarray, keep: int) -> np.ndarray:
        mask = (np.arange(int(lengths.max()))[None, :] < lengths[:, None]).astype(np.int64)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        binding.bind_output("logits")
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's errors are untyped
            raise DecodeError(f"onnxruntime failed: {exc}") from exc
        logits: np.ndarray = binding.get_outputs()[-1].numpy()
        return logits

    def _step(self, items: Sequence[BatchItem], first: int, stop: int) -> np.ndarray:
        """One token for each item, the rows [first, stop) in one call; logits per row."""
        ids = np.zeros((stop - first, 1), dtype=np.int64)
        # a row with no item writes its dummy token at its next free cell: nothing kept is touched
        lengths = np.array([min(n, self._n_ctx) + 1 for n in self._length[first:stop]], dtype=np.int64)
        for item in items:
            ids[item.slot - first, 0] = item.tokens[0]
            lengths[item.slot - first] = item.start_pos + 1
        logits = self._run(self._binding(first, stop), ids, lengths, 1)
        for item in items:
            self._length[item.slot] = item.start_pos + 1
        return logits[:, 0, :]

    def _prompt(self, item: BatchItem) -> list[np.ndarray]:
        """A chunk of one sequence alone on its row; the logits of its last ``n_outputs`` tokens."""
        ids = np.asarray(item.tokens, dtype=np.int64)[None, :]
        end = item.start_pos + len(item.tokens)
        keep = max(1, item.n_outputs)
        logits = self._run(self._binding(item.slot, item.slot + 1), ids, np.array([end]), keep)
        self._length[item.slot] = end
        return list(logits[0, keep - item.n_outputs :]) if item.n_outputs else []

    def close(self) -> None:
        with self._lock:
            self._bindings.clear()
            self._session = None
            self._kv.clear()
            self._vocabulary.close()


class OnnxEngine:
    """The ``onnx`` engine: loads model folders written by ``engines.onnx.convert``."""

    name = "onnx"

    def prepare(self) -> None:
        import onnxruntime  # noqa: F401  (import cost paid at start-up, while planning)

    def load(self, path: Path, options: LoadOptions) -> OnnxModel:
        return OnnxModel(path, options)
