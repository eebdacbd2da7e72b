"""UTF-8 split across tokens and stop strings split across tokens."""

from __future__ import annotations

from engines.textstream import TextStream


def run(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    stream = TextStream(stop)
    out = []
    for piece in pieces:
        delta = stream.feed(piece)
        out.append(delta.text)
        if delta.stopped:
            return out, True
    out.append(stream.finish().text)
    return out, stream.stopped


def test_multibyte_character_split_across_tokens() -> None:
    data = "é🙂".encode()
    out, _ = run([data[:1], data[1:3], data[3:]])
    assert "".join(out) == "é🙂"
    assert "\ufffd" not in "".join(out)
    assert out[0] == ""  # nothing released until the character is complete


def test_stop_string_across_tokens_is_never_shown() -> None:
    out, stopped = run([b"Hello <", b"|en", b"d|> more"], stop=("<|end|>",))
    assert stopped
    assert "".join(out) == "Hello "
    assert "<" not in "".join(out)


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    out, stopped = run([b"a <", b"b"], stop=("<|end|>",))
    assert not stopped
    assert out == ["a ", "<b", ""]


def test_earliest_stop_wins_and_text_after_is_dropped() -> None:
    out, stopped = run([b"one two three"], stop=("three", "two"))
    assert stopped and "".join(out) == "one "


def test_invalid_utf8_at_end_is_replaced_not_raised() -> None:
    out, _ = run([b"ok", b"\xf0\x9f"])
    assert "".join(out) == "ok\ufffd"
