"""BERT's uncased WordPiece tokenizer in plain Python: what the default embedding model reads.

The ``tokenizers`` package would do it, but it depends on ``huggingface_hub`` (and through it
``hf-xet``, ``fsspec``, ``pyyaml``...), which an offline appliance has no use for. The algorithm is
small and fixed; this is the same pipeline as the ``tokenizer.json`` that all-MiniLM-L6-v2 ships
(BertNormalizer with lowercase and accent stripping, BertPreTokenizer, WordPiece, then
``[CLS] ... [SEP]``), step for step, and ``tests/engines/test_wordpiece.py`` checks it gives the
same ids as ``tokenizers`` on ordinary and generated text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")
_MAX_WORD_CHARS = 100  # a longer word is one [UNK], as in BERT
# the CJK blocks BERT puts spaces around, so each ideograph is a word of its own (as the Rust tokenizers
# has them: 0x2B920, where Google's Python had 0x2B820)
_CJK = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _is_control(ch: str) -> bool:
    # Cn (unassigned) is not dropped: the reference keeps such a character, and its word becomes [UNK]
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:  # every ASCII symbol counts
        return True
    return unicodedata.category(ch).startswith("P")


def normalise(text: str) -> str:
    """Drop control characters, turn whitespace into spaces, space out CJK, strip accents, lowercase."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if ch.isspace():
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    decomposed = unicodedata.normalize("NFD", "".join(out))
    # character by character, as the reference does: no context rules (a final capital sigma gives σ, not ς)
    return "".join(ch.lower() for ch in decomposed if unicodedata.category(ch) != "Mn")


def words(text: str) -> list[str]:
    """Split on whitespace, and every punctuation character on its own."""
    result: list[str] = []
    for chunk in text.split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if i > start:
                    result.append(chunk[start:i])
                result.append(ch)
                start = i + 1
        if start < len(chunk):
            result.append(chunk[start:])
    return result


class WordPieceTokenizer:
    """Text -> token ids, with ``[CLS]`` first and ``[SEP]`` last; nothing is cut."""

    def __init__(self, vocab: Iterable[str]) -> None:
        self.vocab = {token: i for i, token in enumerate(vocab)}
        missing = [s for s in SPECIAL if s not in self.vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks {', '.join(missing)}: not a BERT WordPiece vocabulary")
        self._unk = self.vocab["[UNK]"]
        self._cls = self.vocab["[CLS]"]
        self._sep = self.vocab["[SEP]"]
        self._cache: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.vocab)

    def _word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if len(word) > _MAX_WORD_CHARS:
            return [self._unk]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:  # the longest piece in the vocabulary, "##" marking a continuation
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:  # no piece fits: the whole word is unknown
                ids = [self._unk]
                break
            start = end
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self._cls]
        for i, part in enumerate(_SPECIAL_RE.split(text)):
            if i % 2:  # a special token written out in the text is that token, as the reference tokenizer has it
                ids.append(self.vocab[part])
                continue
            for word in words(normalise(part)):
                ids.extend(self._word(word))
        ids.append(self._sep)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]
