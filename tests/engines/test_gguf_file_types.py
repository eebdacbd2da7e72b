"""The file-type names the engine knows by heart (to skip importing ``gguf`` at start-up) are gguf's own."""

from __future__ import annotations

from gguf import LlamaFileType

from engines.gguf import _FILE_TYPES, _quantization


def test_every_known_file_type_is_named_as_gguf_names_it() -> None:
    for member in LlamaFileType:
        assert _quantization(str(int(member))) == member.name.removeprefix("MOSTLY_")
    assert set(_FILE_TYPES) <= {int(m) for m in LlamaFileType}


def test_an_unknown_file_type_is_shown_by_number() -> None:
    assert _quantization("999") == "type 999"
    assert _quantization(None) is None and _quantization("x") is None
