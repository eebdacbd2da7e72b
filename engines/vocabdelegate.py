"""The text half of ``LoadedModel`` for engines that tokenize with a ``GgufVocabulary``.

The GGUF engine (on its loaded model's vocabulary) and the ONNX engine (on the vocabulary-only
``tokenizer.gguf`` beside a converted model) answer these the same way; they inherit them from
here instead of each forwarding every method. A module of its own: ``engines.gguf`` and
``engines.ggufvocab`` import each other, and this one imports neither at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engines.base import ChatMessage

if TYPE_CHECKING:
    from engines.ggufvocab import GgufVocabulary


class VocabularyMethods:
    """Tokenize, detokenize, end-of-generation and chat rendering through ``self._vocabulary``."""

    _vocabulary: GgufVocabulary

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        return self._vocabulary.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self._vocabulary.token_bytes(token)

    def is_end_of_generation(self, token: int) -> bool:
        return self._vocabulary.is_end_of_generation(token)

    def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = ()) -> str:
        return self._vocabulary.render_chat(messages, tools)

    @property
    def chat_template(self) -> str:
        return self._vocabulary.chat_template

    def vocabulary(self) -> list[bytes]:
        return self._vocabulary.vocabulary()
