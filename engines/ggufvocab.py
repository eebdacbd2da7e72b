"""A GGUF model's tokenizer and chat template, through llama.cpp's vocabulary functions.

Shared by every engine that serves a model whose tokenizer is in GGUF form: llama.cpp's own
(``engines.gguf``, on the vocabulary of the loaded model) and the ONNX engine (``engines.onnx``,
on a vocabulary-only GGUF written beside a converted model), so both tokenize, detokenize and
render chats byte for byte alike and llguidance sees the same vocabulary.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.base import ChatMessage, ModelLoadError
from engines.chat_template import ChatTemplate
from engines.gguf import check_gguf_file, device_list, load_llama


def read_metadata(lib: Any, model: Any) -> dict[str, str]:
    """Every metadata key of a loaded llama.cpp model, as text."""
    out = {}
    size = 8192
    buf = ctypes.create_string_buffer(size)
    for i in range(int(lib.llama_model_meta_count(model))):
        n = lib.llama_model_meta_key_by_index(model, i, buf, size)
        key = buf.value.decode("utf-8", "replace") if n >= 0 else ""
        n = lib.llama_model_meta_val_str_by_index(model, i, buf, size)
        if n >= size:  # a long value (chat templates are often > 8 KiB): retry with room
            big = ctypes.create_string_buffer(n + 1)
            lib.llama_model_meta_val_str_by_index(model, i, big, n + 1)
            out[key] = big.value.decode("utf-8", "replace")
        elif n >= 0:
            out[key] = buf.value.decode("utf-8", "replace")
    return out


class GgufVocabulary:
    """Tokenizer, detokenizer, end-of-generation test and chat template of one llama.cpp model.

    ``model`` is a ``llama_model`` pointer that the caller keeps alive (and frees) for as long as
    this is used; ``open`` loads a vocabulary-only one that ``close`` frees.
    """

    def __init__(self, lib: Any, model: Any, *, chat_template_override: str | None = None) -> None:
        self._lib = lib
        self.lib = lib  # for the sampler chain of an engine that has no llama.cpp context
        self._model: Any = model
        self._owned = False
        self._vocab = lib.llama_model_get_vocab(model)
        self._pieces: dict[int, bytes] = {}
        self.metadata = read_metadata(lib, model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._bos_text = self._token_text(lib.llama_vocab_bos(self._vocab))
        template = chat_template_override or self.metadata.get("tokenizer.chat_template")
        self.has_chat_template = template is not None
        self._template = ChatTemplate(
            template, bos_token=self._bos_text, eos_token=self._token_text(lib.llama_vocab_eos(self._vocab))
        )

    @classmethod
    def open(cls, path: Path, *, chat_template_override: str | None = None) -> GgufVocabulary:
        """The vocabulary of a GGUF file, loaded without its weights (a tokenizer-only file works)."""
        check_gguf_file(path)
        lib = load_llama()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        devices = device_list((), path)  # no GPU backend is touched for a vocabulary
        params.devices = ctypes.cast(devices, ctypes.c_void_p)
        model = lib.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            raise ModelLoadError(path, "llama.cpp could not read its vocabulary (corrupt or unsupported)")
        try:
            vocab = cls(lib, model, chat_template_override=chat_template_override)
        except BaseException:
            lib.llama_model_free(model)
            raise
        vocab._owned = True
        return vocab

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", "replace")

    def _piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        if add_special and self._bos_text and text.startswith(self._bos_text):
            add_special = False  # the chat template already wrote BOS: never double it
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._piece(token, special=False)
            self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = ()) -> str:
        return self._template.render(messages, tools=tools)

    @property
    def chat_template(self) -> str:
        return self._template.source

    def vocabulary(self) -> list[bytes]:
        lib, out = self._lib, []
        control = lib.LLAMA_TOKEN_ATTR_CONTROL
        user_defined = lib.LLAMA_TOKEN_ATTR_USER_DEFINED
        for token in range(self.n_vocab):
            piece = self._piece(token, special=True)
            attr = lib.llama_vocab_get_attr(self._vocab, token)
            # as llguidance's own llama.cpp reader marks them: control tokens, and added ones like <tool_call>
            if attr & control or (attr & user_defined and piece.startswith(b"<") and piece.endswith(b">")):
                piece = b"\xff" + piece
            out.append(piece)
        return out

    def close(self) -> None:
        """Free the vocabulary-only model ``open`` loaded (a borrowed model is its owner's to free)."""
        if self._owned and self._model is not None:
            self._lib.llama_model_free(self._model)
        self._model = None
