"""engines/wordpiece.py gives the ids that the reference tokenizer (``tokenizers``, as all-MiniLM-L6-v2's
tokenizer.json configures it) gives, on ordinary text and on generated text from the scripts people write.

The two disagree only on characters that Unicode assigned after the reference's tables were made
(U+061D, added in Unicode 14, is one): Python's tables know them, the reference's do not. Such
characters are left out of the generated text.
"""

from __future__ import annotations

import importlib.resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.onnx_embed import BERT_VOCAB
from engines.wordpiece import WordPieceTokenizer

tokenizers = pytest.importorskip("tokenizers")

VOCAB = importlib.resources.files("engines").joinpath(BERT_VOCAB).read_text("utf-8").splitlines()
MINE = WordPieceTokenizer(VOCAB)
REFERENCE = tokenizers.BertWordPieceTokenizer({t: i for i, t in enumerate(VOCAB)}, lowercase=True)

TEXTS = [
    "A man is eating food.",
    "Héllo Wörld!  naïve café, Ångström",
    "ΟΔΟΣ ΣΑΣ: final sigma",
    "中文字符 and 日本語のテキスト, 한국어 텍스트",
    "emoji 🤖👍 and symbols $5+3=8 ^_^ | `code` ~tilde~",
    "[CLS] special [SEP] tokens written out [MASK]",
    "tab\tnew\nline\x00nul \u200b zero-width \u00a0 nbsp \u2028 line separator",
    "x" * 150,
    "İstanbul ǅ ß ẞ ﬁ ｆｕｌｌｗｉｄｔｈ",
    "don't stop-believing's e-mail@example.com 12,345.678",
    "",
    "   ",
]

# scripts and symbols people write, minus the characters the two Unicode tables disagree on
BLOCKS = [(0x20, 0x250), (0x370, 0x530), (0x590, 0x700), (0x900, 0x980), (0xE00, 0xE80), (0x1E00, 0x2070),
          (0x2070, 0x2C00), (0x3000, 0x3100), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFF0),
          (0x1F300, 0x1FA00), (0x0, 0x20)]  # fmt: skip
NEWER_IN_PYTHON = {0x061D}
CHARACTERS = (
    st.one_of(*(st.integers(lo, hi - 1) for lo, hi in BLOCKS)).filter(lambda cp: cp not in NEWER_IN_PYTHON).map(chr)
)


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_the_reference(text: str) -> None:
    assert MINE.encode(text) == REFERENCE.encode(text).ids


@settings(max_examples=2000, deadline=None)
@given(st.text(CHARACTERS, max_size=60))
def test_same_ids_on_generated_text(text: str) -> None:
    assert MINE.encode(text) == REFERENCE.encode(text).ids


def test_a_vocabulary_without_berts_special_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks"):
        WordPieceTokenizer(["a", "b"])
