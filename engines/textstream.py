"""Turn a stream of token bytes into safe text deltas, honouring stop strings.

Two things make naive streaming wrong: a UTF-8 character can be split across tokens (emitting
each token's bytes alone yields U+FFFD garbage), and a stop string can span several tokens (text
must be held back while it could still be the start of a stop string, or the client sees part of
the stop sequence). ``TextStream`` solves both and is engine-agnostic, so it is unit-tested alone.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class TextDelta:
    """Text that may be shown now, and whether a stop string ended the output."""

    text: str
    stopped: bool = False


class TextStream:
    """Incremental decoder: feed token bytes, get text that is final."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._pending = ""  # decoded text not yet released (could start a stop string)
        self._emitted: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._emitted)

    def feed(self, data: bytes) -> TextDelta:
        """Add one token's bytes; return what can be released now."""
        if self.stopped:
            return TextDelta("", stopped=True)
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> TextDelta:
        """End of generation: flush incomplete bytes and any held-back text."""
        if self.stopped:
            return TextDelta("", stopped=True)
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> TextDelta:
        cut = self._first_stop(self._pending)
        if cut is not None:
            out = self._pending[:cut]
            self._pending = ""
            self.stopped = True
            self._emitted.append(out)
            return TextDelta(out, stopped=True)
        keep = 0 if final else self._held_suffix(self._pending)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        self._emitted.append(out)
        return TextDelta(out)

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
