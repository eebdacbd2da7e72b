"""The engine contract: small protocols and plain data shared by every engine.

The scheduler in ``appliance/`` drives engines only through these types, so an engine can be
swapped (GGUF today, ONNX later) or faked in a test without touching the serving code. Nothing
here imports a heavy runtime; ``engines/gguf.py`` is the only place llama_cpp is imported.

The contract is a *batched step* API rather than "generate(prompt) -> iterator": the scheduler
owns the decode loop so that many requests share one ``decode`` call (continuous batching),
while the engine owns everything model-specific (tokenizer, chat template, sampler chain).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt


class EngineError(Exception):
    """Base of every error an engine raises on purpose."""


class ModelLoadError(EngineError):
    """The model file could not be loaded (missing, corrupt, unsupported architecture...)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot load model file {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class AdapterLoadError(EngineError):
    """A LoRA adapter file is wrong for its base model or cannot be loaded; the reason says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot use adapter {Path(path).name}: {reason}")
        self.path = str(path)
        self.reason = reason


class ChatTemplateError(EngineError):
    """The conversation cannot be rendered with the model's chat template."""


class DecodeError(EngineError):
    """llama_decode (or equivalent) failed for a batch."""

    def __init__(self, message: str, *, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; every sequence in a batch has its own."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling)
    # None: no log-probabilities; 0: the sampled token's; k: also the k most likely alternatives
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class LoadOptions:
    """How to load one model: sizes are per engine instance, decided by the caller."""

    n_ctx_per_slot: int = 4096
    n_slots: int = 4
    n_threads: int = 2
    n_threads_batch: int = 2
    n_batch: int = 512
    # Offload: layers on the GPU (counting the output layer, so n_layer + 1 is "all"), the
    # engine's devices to use by name (e.g. "CUDA0"; empty: CPU only, even in a GPU build), the
    # share of layers per device, and the device holding the scratch buffers.
    n_gpu_layers: int = 0
    gpu_devices: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    main_gpu: int = 0
    chat_template_override: str | None = None
    # On, as llama-server's "auto" does on CPU: it decodes batches ~25% faster here. Its CPU
    # kernel decodes a lone sequence whose padded KV span (cells rounded up to 256) reaches 512, i.e. more
    # than 256 tokens, by splitting the cells across threads,
    # which rounds differently from the batched kernel: a temperature-0 answer alone can then
    # differ (near-ties only) from the same request among others. Off, they are always identical.
    flash_attn: bool = True
    # llama.cpp's "extra" weight buffers (repacked layouts: AMX, CPU_REPACK). None: the engine
    # decides (off where the CPU has AMX, whose kernels crash here; see GgufModel).
    extra_buffers: bool | None = None
    # Loaded while other models serve (on demand): the engine keeps its long load work at a low
    # CPU priority where it can, so their streams keep their pace on a machine with few cores.
    background: bool = False
    # Apply LoRA adapters row by row inside one batch, so requests on different adapters and on
    # the base decode together (engines/ggufmixer.py; CPU models). Off: per decode call.
    mix_adapters: bool = True


@dataclass(frozen=True)
class ModelFacts:
    """What the serving layer needs to know about a loaded model."""

    n_ctx_per_slot: int
    n_slots: int
    n_ctx_train: int
    n_vocab: int
    description: str
    has_chat_template: bool
    metadata: dict[str, str] = field(default_factory=dict)
    # Prompt chunks of at least this many tokens of one sequence are computed bit-identically
    # however a prompt is cut into them; the scheduler's exact prefix caching relies on it.
    exact_chunk: int = 2
    quantization: str | None = None  # e.g. "Q4_1", from the file's metadata
    backend: str = "cpu"  # where the weights run: "cpu", or the GPU devices, e.g. "CUDA0"
    n_gpu_layers: int = 0
    # Items of one ``decode`` may carry different adapters (``BatchItem.adapters``), applied to
    # their own rows only; answers are the same alone and batched.
    mixes_adapters: bool = False


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes as its file states them: what the hardware planner needs to fit it.

    Byte counts are of the weights as stored (quantised); the KV cache figure is per token of
    context for each repeating layer, at llama.cpp's default f16 cache type.
    """

    architecture: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int | None
    layer_bytes: tuple[int, ...]  # weights of each repeating layer
    output_bytes: int  # the output layer (offloaded last, with "all" layers)
    tied_output: bool  # the output layer reuses the token embeddings (a copy of them on a GPU)
    input_bytes: int  # token embeddings and the rest, which stay in host memory
    kv_bytes_per_token: tuple[int, ...]  # per repeating layer
    file_bytes: int


@dataclass(frozen=True)
class BackendDevice:
    """One device an engine's build can run on, as the engine itself sees it."""

    name: str  # e.g. "CPU", "CUDA0", "ROCm1", "MTL0", "Vulkan0"
    backend: str  # the backend that provides it: "CPU", "CUDA", "ROCm", "Metal", "Vulkan", ...
    kind: str  # "cpu", "gpu" (own memory), "igpu" (host memory), "accel"
    description: str
    memory_free: int | None = None
    memory_total: int | None = None
    pci_bus_id: str | None = None


@dataclass(frozen=True)
class EngineCapabilities:
    """What an installed engine runtime can use on this machine; ``installed`` False: not there."""

    engine: str  # "gguf", "onnx"
    runtime: str  # e.g. "llama-cpp-python 0.3.36"
    installed: bool
    gpu_offload: bool = False
    backends: tuple[str, ...] = ()  # registered backends, also those that found no device
    devices: tuple[BackendDevice, ...] = ()
    providers: tuple[str, ...] = ()  # onnxruntime execution providers
    build_info: str = ""  # e.g. llama.cpp's system info line (CPU features it was built for)
    cpu_variant: str = ""  # llama.cpp's CPU code: "built in" (pip's native build) or the variant loaded
    detail: str = ""  # why it is not installed or not usable


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, its content already reduced to plain text.

    ``tool_calls`` (an assistant's calls, OpenAI's shape with ``arguments`` parsed into a dict, as
    chat templates expect them) and ``tool_call_id``/``name`` (a tool's result) are only set in
    conversations with tool calling; a template that knows tools renders them its own way.
    """

    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


# Allowed tokens as a packed bitmask: bit ``t % 32`` of word ``t // 32`` set means token ``t`` may be
# sampled (llguidance's layout, so its masks are used as they come).
TokenMask = npt.NDArray[np.int32]


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability, with the most likely alternatives (token, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class BatchItem:
    """Tokens of one sequence to evaluate in the next ``decode`` call.

    ``n_outputs`` asks for the distributions after the last ``n_outputs`` tokens: 1 to sample the
    next token, more to verify speculative draft tokens, 0 for a prompt chunk that is not the last.
    """

    slot: int
    tokens: Sequence[int]
    start_pos: int
    n_outputs: int
    # This item's own adapters (models with ``ModelFacts.mixes_adapters`` and mixable adapters)
    adapters: AdapterSet = ()


class Sampler(Protocol):
    """A per-sequence sampler: holds its RNG and penalty history."""

    def sample(self, output_index: int, allowed: TokenMask | None = None) -> int:
        """Pick the next token from the logits at ``output_index`` of the last decode, among the
        ``allowed`` tokens only when a mask is given (structured output)."""
        ...

    @property
    def last_logprob(self) -> TokenLogprob | None:
        """The last sampled token's log-probability, when the params asked for them."""
        ...

    def close(self) -> None: ...


class LoadedAdapter(Protocol):
    """A LoRA adapter loaded on top of one model's weights (which it shares with every other)."""

    @property
    def name(self) -> str: ...

    @property
    def mixable(self) -> bool:
        """Whether it can go in ``BatchItem.adapters`` (else only in a whole call's ``adapters``)."""
        ...

    def close(self) -> None:
        """Free it; the caller guarantees no decode uses it any more."""
        ...


# The adapters a decode applies, with their scales; empty: the base model alone.
AdapterSet = tuple[tuple[LoadedAdapter, float], ...]


class LoadedModel(Protocol):
    """A model loaded with ``n_slots`` independent sequence slots sharing its weights."""

    @property
    def facts(self) -> ModelFacts: ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Text to token ids; special-token text such as ``<|im_end|>`` is parsed as such unless
        ``parse_special`` is False."""
        ...

    def vocabulary(self) -> list[bytes]:
        """Every token's bytes by id; control tokens as their text behind a 0xFF byte (the
        convention of llguidance, which builds its token trie from this)."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token contributes to the output (control tokens give b"")."""
        ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = ()) -> str:
        """The prompt text for a conversation, ending where the assistant's turn starts; ``tools``
        (OpenAI's function definitions) go to a template that renders them."""
        ...

    @property
    def chat_template(self) -> str:
        """The chat template's source (the fallback's when the model has none)."""
        ...

    def new_sampler(self, params: SamplingParams) -> Sampler: ...

    def decode(self, items: Sequence[BatchItem], adapters: AdapterSet = ()) -> list[list[int]]:
        """Evaluate one batch with these adapters applied to every item of it (and each item's
        own ``adapters`` to its rows; then ``adapters`` must be empty).

        Returns, per item, the output indices of the logits it asked for.
        """
        ...

    def load_adapter(self, path: Path, name: str) -> LoadedAdapter:
        """Load a LoRA adapter for this model; safe to call while another thread decodes."""
        ...

    def truncate_slot(self, slot: int, n_keep: int) -> None:
        """Keep the KV of a slot's first ``n_keep`` positions and forget the rest (0 clears it)."""
        ...

    def copy_slot(self, src: int, dst: int) -> None:
        """Make slot ``dst`` hold what slot ``src`` holds (its KV as of the next ``decode``)."""
        ...

    def close(self) -> None: ...


class Engine(Protocol):
    """Loads model files of one format (``gguf``, later ``onnx``)."""

    name: str

    def prepare(self) -> None:
        """Import and initialise the runtime (no model yet): start-up does it while it plans."""
        ...

    def load(self, path: Path, options: LoadOptions) -> LoadedModel: ...
