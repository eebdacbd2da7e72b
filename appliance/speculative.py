"""Prompt-lookup (n-gram) drafting for speculative decoding.

When a model copies from its input (summaries, edits, code changes, quoting), the tokens after
the current n-gram's last earlier occurrence are a good guess of what comes next. The scheduler
verifies such a draft in one decode step: it samples every draft position with the sequence's own
sampler and keeps the drafts up to the first one the sampler disagrees with. Because each kept
token is the sampler's own choice, the output distribution (and, for a fixed seed, the sampler's
random stream) is unchanged; only the number of decode steps shrinks.

The index maps every n-gram of the context to the position just after its latest occurrence, and
is updated as tokens are appended, so a lookup costs O(ngram) rather than a scan of the context.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramIndex:
    """The tokens of one sequence (prompt + output) with an n-gram -> continuation index."""

    def __init__(self, tokens: Iterable[int], ngram_sizes: tuple[int, ...] = (3, 2)) -> None:
        self.tokens: list[int] = []
        self._sizes = tuple(sorted(ngram_sizes, reverse=True))
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._sizes}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        # index the n-grams ending at the previous token: their continuation is the new token
        end = len(self.tokens)
        self.tokens.append(token)
        for n in self._sizes:
            if end >= n:
                self._index[n][tuple(self.tokens[end - n : end])] = end

    def draft(self, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the current suffix."""
        if max_tokens <= 0:
            return []
        tokens = self.tokens
        for n in self._sizes:
            if len(tokens) <= n:
                continue
            start = self._index[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + max_tokens]
        return []
