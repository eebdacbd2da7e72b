"""A small deterministic engine: the fast tier of the scheduler and API tests, and a third engine for
the contract suite (tests/engines/test_contract.py), so the contract is not shaped by one runtime.

Its "model" is a JSON file ``{"answer": "..."}``. Tokens are bytes (ids 0-255) plus three control
tokens; the chat template is ChatML. After the assistant marker it answers with the file's text,
byte by byte, then ``<|im_end|>``; elsewhere it continues with a letter that depends on the last
few tokens. The logits depend only on what a slot holds, so batching, chunking and rewinding
cannot change them, which is exactly what the contract demands of a real engine.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import (
    AdapterLoadError,
    AdapterSet,
    BatchItem,
    ChatMessage,
    DecodeError,
    LoadOptions,
    ModelFacts,
    ModelLoadError,
    SamplingParams,
    TokenLogprob,
    TokenMask,
)

START, END, ASSISTANT = 256, 257, 258  # <|im_start|>, <|im_end|>, the "assistant\n" after <|im_start|>
N_VOCAB = 259
SPECIALS = {"<|im_start|>assistant\n": ASSISTANT, "<|im_start|>": START, "<|im_end|>": END}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


class FakeSampler:
    """Greedy, or a seeded draw from softmax(logits / temperature); honours a token mask."""

    def __init__(self, model: FakeModel, params: SamplingParams) -> None:
        self._model = model
        self._params = params
        self._rng = np.random.default_rng(params.seed)
        self.last_logprob: TokenLogprob | None = None

    def sample(self, output_index: int, allowed: TokenMask | None = None) -> int:
        logits = self._model.outputs[output_index].astype(np.float64)
        if allowed is not None:
            bits = np.unpackbits(allowed.view(np.uint8), bitorder="little", count=N_VOCAB).view(bool)
            logits = np.where(bits, logits, -np.inf)
        for token, bias in self._params.logit_bias:
            logits[token] += bias
        logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        if self._params.greedy:
            token = int(np.argmax(logits))
        else:
            p = np.exp(logprobs / self._params.temperature)
            token = int(self._rng.choice(N_VOCAB, p=p / p.sum()))
        if self._params.logprobs is not None:
            order = np.argsort(-logprobs, kind="stable")[: self._params.logprobs]
            top = tuple((int(t), float(logprobs[t])) for t in order)
            self.last_logprob = TokenLogprob(token, float(logprobs[token]), top)
        return token

    def close(self) -> None:
        pass


class FakeModel:
    def __init__(self, path: Path, options: LoadOptions) -> None:
        if not path.exists():
            raise ModelLoadError(path, "the file does not exist")
        try:
            self._answer = json.loads(path.read_text("utf-8"))["answer"].encode()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(path, f"not a fake model file ({exc})") from exc
        self._slots: list[list[int]] = [[] for _ in range(options.n_slots)]
        self._n_ctx = options.n_ctx_per_slot
        self.outputs: list[np.ndarray] = []
        self.facts = ModelFacts(
            n_ctx_per_slot=options.n_ctx_per_slot,
            n_slots=options.n_slots,
            n_ctx_train=1 << 16,
            n_vocab=N_VOCAB,
            description="the fake engine",
            has_chat_template=True,
            exact_chunk=1,
            quantization="none",
        )

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data, tokens, i = text.encode(), [], 0
        while i < len(data):
            special = next((s for s in SPECIALS if data.startswith(s.encode(), i)), None) if parse_special else None
            if special is not None:
                tokens.append(SPECIALS[special])
                i += len(special.encode())
            else:
                tokens.append(data[i])
                i += 1
        return tokens

    def vocabulary(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b"\xff" + s.encode() for s in SPECIALS]

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def is_end_of_generation(self, token: int) -> bool:
        return token == END

    def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = ()) -> str:
        turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    @property
    def chat_template(self) -> str:
        return TEMPLATE

    def new_sampler(self, params: SamplingParams) -> FakeSampler:
        return FakeSampler(self, params)

    def _logits(self, history: Sequence[int]) -> np.ndarray:
        """What follows ``history``: the answer after the assistant marker, else a letter."""
        seed = zlib.crc32(bytes(t % 256 for t in history[-4:]) + bytes([len(history) % 251]))
        logits = np.random.default_rng(seed).normal(0.0, 1.0, N_VOCAB).astype(np.float32)
        if ASSISTANT in history:
            k = len(history) - 1 - max(i for i, t in enumerate(history) if t == ASSISTANT)
            logits[self._answer[k] if k < len(self._answer) else END] += 8.0
        else:
            logits[ord("a") + seed % 26] += 8.0
        return logits

    def decode(self, items: Sequence[BatchItem], adapters: AdapterSet = ()) -> list[list[int]]:
        if adapters:
            raise DecodeError("the fake engine has no adapters")
        outputs: list[np.ndarray] = []
        indices: list[list[int]] = []
        for item in items:
            slot = self._slots[item.slot]
            if item.start_pos + len(item.tokens) > self._n_ctx or item.start_pos > len(slot):
                raise DecodeError(f"slot {item.slot}: position {item.start_pos} out of range", no_space=True)
            del slot[item.start_pos :]
            slot.extend(item.tokens)
            first = len(slot) - item.n_outputs
            indices.append(list(range(len(outputs), len(outputs) + item.n_outputs)))
            outputs.extend(self._logits(slot[: first + j + 1]) for j in range(item.n_outputs))
        self.outputs = outputs
        return indices

    def load_adapter(self, path: Path, name: str) -> Any:
        raise AdapterLoadError(path, "the fake engine has no adapters")

    def truncate_slot(self, slot: int, n_keep: int) -> None:
        del self._slots[slot][max(0, n_keep) :]

    def copy_slot(self, src: int, dst: int) -> None:
        self._slots[dst] = list(self._slots[src])

    def close(self) -> None:
        self._slots = []


class FakeEngine:
    name = "fake"

    def prepare(self) -> None:
        pass

    def load(self, path: Path, options: LoadOptions) -> FakeModel:
        return FakeModel(path, options)


def write_model(path: Path, answer: str = "Paris is the capital of France.") -> Path:
    path.write_text(json.dumps({"answer": answer}), "utf-8")
    return path
