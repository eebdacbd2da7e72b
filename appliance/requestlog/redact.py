"""Redaction: secrets and personal data are replaced before anything reaches the disk.

Rules are regular expressions; every match becomes ``[REDACTED:<name>]``. They run on the
record's Python values (every string in the request, the answers, the error), never on
serialised JSON, so a match can never break the stored document.

Redaction runs in the log writer's thread on whatever a client sent (up to the 8 MiB body
limit), and ``re`` holds the GIL for as long as one call runs, so the built-in rules keep two
properties:

* Linear time. ``re`` backtracks, so a rule that can read far from many start positions and
  then fail is quadratic (the old e-mail rule took 11 s on 80,000 letters). Every quantifier
  here is bounded, and possessive wherever giving characters back cannot help, so no attempt
  looks more than ``_REACH`` characters past its start. The attempts that can read far and then
  fail (an address's local part, a JWT header) start only where a run of their characters
  starts (a lookbehind), so each run is read once; the others fail within a few dozen characters
  or match, and a match is never read again. A token longer than a rule's bound is not cut short:
  the rule's ``follow`` pattern extends the match over the rest of it.
* Short GIL holds. Thanks to that bounded reach a long string is searched in windows of
  ``_WINDOW`` characters, each search seeing ``reach`` characters past its window, which finds
  exactly the matches of one search over the whole string; between two searches the interpreter
  can switch threads, so serving waits at most for one window's search (a few milliseconds).

Patterns begin with a literal or a character set wherever they can, so ``re`` skips ahead in C
instead of trying every position. The user's own rules (``extra``) run as written, on the whole
string: their cost is theirs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

# Characters searched per call: a few milliseconds on the worst input for any built-in rule.
_WINDOW = 1 << 16
# The furthest any built-in pattern looks past the start of a match, with room to spare: a JWT's
# header and the start of its payload (3 + 4,096 + 1 + 3); tokens take 4,096 characters at a
# time, an address at most 64 + 1 + 16 * 64 + 63.
_REACH = 1 << 13
# Secrets shorter than this would redact ordinary words.
MIN_SECRET_LENGTH = 4

# Combining marks of the scripts that write vowels and accents with them (Devanagari, Thai,
# decomposed Latin ...): they are not ``\w``, yet they belong to the word in an IDN address.
_MARKS = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed"
    "\u0900-\u0dff\u0e00-\u0eff\u0f71-\u0f84\u1000-\u109f\u1780-\u17ff\u1ab0-\u1aff"
    "\u1dc0-\u1dff\u200c\u200d\u20d0-\u20ff\u3099\u309a\ufe20-\ufe2f"
)
_LOCAL = rf"[\w.%+\-{_MARKS}]"  # the old ASCII set, plus letters and digits of any script
_LABEL = rf"[\w\-{_MARKS}]{{1,63}}+"  # RFC 1035: a label is at most 63 characters
_TLD = rf"(?:xn--[A-Za-z0-9-]{{1,59}}+|(?:[^\W\d_]|[{_MARKS}]){{2,63}}+)"
# RFC 5321: a local part is at most 64 characters; real domains have far fewer than 16 labels.
_ADDRESS = rf"{_LOCAL}{{1,64}}+@(?:{_LABEL}\.){{1,16}}{_TLD}"
_AT_MOST_BEFORE_AT = 64
# An address starts where a run of local-part characters starts, or 64 characters before its
# '@' when the run is longer (text without spaces, such as Chinese prose). ``(?s:.){64}`` skips
# 64 characters in one step, so neither test scans; the first lookahead turns most positions
# away before either is tried.
_EMAIL = rf"(?={_LOCAL})(?:(?<!{_LOCAL})|(?=(?s:.){{64}}@)){_ADDRESS}"

_BASE64URL = r"[A-Za-z0-9_-]"
_BEARER = r"[A-Za-z0-9._~+/=-]"
# ``\b`` before a word, written after its first letter so that the pattern begins with a
# literal or a set, which ``re`` finds without trying every position
_SECRET_WORD = r"[AaPpSsTt](?<!\w[AaPpSsTt])(?i:(?<=a)pi[_-]?key|(?<=s)ecret|(?<=t)oken|(?<=p)assw(?:or)?d)\b"
# Card candidates: 13-19 digits in one run, or a group of four, two or three of 3-6 and maybe a
# last one of 1-4 (4-4-4-4, 4-6-5, 4-4-4-4-3, 4-4-4-1 ...), single spaces or dashes between,
# possibly after one other group (a quantity, another card's end). ``[0-9](?<![0-9]{2})`` is a
# first digit that does not continue a number.
_CARD_TAIL = r"(?:[ -][0-9]{3,6}+(?![0-9])){2,3}+(?:[ -][0-9]{1,4}+(?![0-9]))?"
_CARD = (
    rf"[0-9](?<![0-9]{{2}})(?:[0-9]{{12,18}}+(?![0-9])|[0-9]{{0,5}}+[ -][0-9]{{4}}{_CARD_TAIL}|[0-9]{{3}}{_CARD_TAIL})"
)


@dataclass(frozen=True, slots=True)
class _Rule:
    """A compiled rule and what searching it in windows needs to know."""

    name: str
    pattern: re.Pattern[str]
    reach: int
    # Matched again at the end of a match for as long as it matches: the rest of a token longer
    # than the pattern's bound, or an address written right after the previous one.
    follow: re.Pattern[str] | None = None
    # Decides on a match: the (offset, length) within it to redact, or None for nothing.
    accept: Callable[[str], tuple[int, int] | None] | None = None
    # A literal every match holds at most ``before`` characters after its start: text far from
    # one is skipped with ``str.find``.
    anchor: str | None = None
    before: int = 0

    @property
    def replacement(self) -> str:
        return f"[REDACTED:{self.name}]"


_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")  # Luhn: 2d, less 9 when that has two digits


def _luhn(digits: str) -> bool:
    codes = digits.encode("ascii")  # summing bytes keeps the loop in C; each code is 48 + digit
    return (sum(codes[-1::-2]) + sum(codes[-2::-2].translate(_DOUBLED)) - 48 * len(codes)) % 10 == 0


def _card_span(candidate: str) -> tuple[int, int] | None:
    """The first card number in a candidate: the longest run of whole groups with 13-19 digits
    passing the Luhn check, from the earliest group where there is one.

    Runs of several groups are looked into, so a card followed by its CVV or expiry ("4111 1111
    1111 1111 123") or after another number is still found. A contiguous run is taken whole or
    not at all: nothing inside a longer number is redacted.
    """
    if candidate.isdigit():
        return (0, len(candidate)) if _luhn(candidate) else None
    groups = candidate.replace("-", " ").split(" ")
    digits = "".join(groups)
    ends = [0, *accumulate(map(len, groups))]  # ends[i]: digits before group i
    for first in range(len(groups)):
        begin = ends[first]
        if ends[-1] - begin < 13:
            break
        for last in range(len(groups), first + 1, -1):  # groups first .. last - 1, longest first
            count = ends[last] - begin
            if count < 13:
                break
            if count <= 19 and _luhn(digits[begin : ends[last]]):
                return begin + first, count + last - first - 1  # one separator after each group
    return None


def _builtin(
    name: str,
    pattern: str,
    follow: str | None = None,
    *,
    accept: Callable[[str], tuple[int, int] | None] | None = None,
    anchor: str | None = None,
    before: int = 0,
) -> _Rule:
    compiled_follow = re.compile(follow) if follow is not None else None
    return _Rule(name, re.compile(pattern), _REACH, compiled_follow, accept, anchor, before)


_BUILTIN: tuple[_Rule, ...] = (
    _builtin("email", _EMAIL, follow=_ADDRESS, anchor="@", before=_AT_MOST_BEFORE_AT),
    _builtin("bearer", rf"[Bb](?<!\w[Bb])(?i:earer)\s{{1,64}}+{_BEARER}{{8,4096}}+", follow=rf"{_BEARER}{{1,4096}}+"),
    _builtin("openai_key", r"sk-(?<!\wsk-)[A-Za-z0-9_-]{16,4096}+", follow=r"[A-Za-z0-9_-]{1,4096}+"),
    _builtin("aws_key", r"A(?<!\wA)(?:KIA|SIA)[0-9A-Z]{16}\b"),
    _builtin(
        "github_token",
        r"g(?<!\wg)(?:h[pousr]_[A-Za-z0-9]{30,4096}+|ithub_pat_[A-Za-z0-9_]{22,4096}+)",
        follow=r"[A-Za-z0-9_]{1,4096}+",
    ),
    _builtin("slack_token", r"xox(?<!\wxox)[abprs]-[A-Za-z0-9-]{10,4096}+", follow=r"[A-Za-z0-9-]{1,4096}+"),
    _builtin(
        "secret_assignment",
        rf"{_SECRET_WORD}\s{{0,64}}+[:=]\s{{0,64}}+['\"]?+[^\s'\"]{{8,4096}}+",
        follow=r"[^\s'\"]{1,4096}+",
    ),
    # header '.' payload, base64url JSON ("eyJ" is '{"'); the rest of the payload, the signature
    # and any further segments are taken by ``follow``
    _builtin(
        "jwt",
        rf"eyJ(?<!{_BASE64URL}eyJ){_BASE64URL}{{7,4096}}+\.{_BASE64URL}{{3}}",
        follow=rf"\.?+{_BASE64URL}{{1,4096}}+",
    ),
    _builtin("card_number", _CARD, accept=_card_span),
)

#: The built-in rules by name, as patterns (``Redactor`` also applies their ``follow`` patterns).
BUILTIN_RULES: dict[str, str] = {rule.name: rule.pattern.pattern for rule in _BUILTIN}


def _redact(rule: _Rule, text: str, window: int = _WINDOW) -> str:
    """``rule`` applied to ``text`` window by window, with the same matches as one whole search.

    A search started before ``limit`` never looks past ``limit + reach``, so ending the string
    there changes nothing for the matches that start in the window; those starting later are
    found by the next window's search. Each window's pieces are joined on their own: one join of
    millions of pieces would hold the GIL as long as a search.
    """
    n = len(text)
    chunks: list[str] = []
    copied = 0  # text[:copied] is in chunks
    pos = 0
    while pos < n:
        limit = min(n, pos + window)
        if rule.anchor is not None:
            at = text.find(rule.anchor, pos)
            if at < 0:
                break
            pos = max(pos, at - rule.before)
            # matches starting after the window's last anchor need a later one: next window
            last = text.rfind(rule.anchor, pos, min(n, pos + window))
            limit = last + 1 if last >= 0 else min(n, pos + window)
        resume = limit
        parts: list[str] = []
        for match in rule.pattern.finditer(text, pos, min(n, limit + rule.reach)):
            start, end = match.span()
            if start >= limit:
                break
            if rule.accept is not None:
                span = rule.accept(match.group())
                if span is None:
                    continue
                start, end = start + span[0], start + span[0] + span[1]
            while rule.follow is not None and (more := rule.follow.match(text, end, min(n, end + rule.reach))):
                end = more.end()
            parts.append(text[copied:start])
            parts.append(rule.replacement)
            copied = end
            if end != match.end():
                resume = end  # the search goes on from where the redaction ends
                break
        if parts:
            chunks.append("".join(parts))
        pos = max(resume, copied)
    if not chunks:
        return text
    chunks.append(text[copied:])
    return "".join(chunks)


class RedactionRuleError(ValueError):
    """A configured pattern is not a valid regular expression."""


class Redactor:
    """Applies the server's secrets, the built-in rules (unless turned off) and the configured ones, in that order.

    ``secrets`` are literal strings, such as the server's own API key, replaced wherever they
    occur with ``[REDACTED:api_key]``, whether or not the built-in rules are on.
    """

    def __init__(self, extra: Iterable[str] = (), *, builtin: bool = True, secrets: Iterable[str] = ()) -> None:
        self._rules: list[_Rule] = []
        literals = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        if literals:  # longest first, so a secret that begins another is not replaced inside it
            pattern = re.compile("|".join(map(re.escape, literals)))
            self._rules.append(_Rule("api_key", pattern, len(literals[0])))
        if builtin:
            self._rules.extend(_BUILTIN)
        self._extra: list[tuple[re.Pattern[str], str]] = []
        for i, pattern_text in enumerate(extra, start=1):
            try:
                self._extra.append((re.compile(pattern_text), f"[REDACTED:rule{i}]"))
            except re.error as exc:
                message = f"redaction rule {pattern_text!r} is not a valid regular expression: {exc}"
                raise RedactionRuleError(message) from exc

    def text(self, value: str) -> str:
        for rule in self._rules:
            value = _redact(rule, value)
        for pattern, replacement in self._extra:
            value = pattern.sub(replacement, value)
        return value

    def value(self, value: Any) -> Any:
        """Every string inside dicts and lists redacted; keys and other types kept.

        Returns new containers (a list for a tuple). Iterative, so content nested any depth
        deep cannot exhaust the stack; a container met twice (or through a cycle) is redacted
        once and shared in the result as in the input.
        """
        if isinstance(value, str):
            return self.text(value)
        if not isinstance(value, dict | list | tuple):
            return value
        copies: dict[int, dict[Any, Any] | list[Any]] = {}
        root = _empty_copy(value, copies)
        todo: list[tuple[dict[Any, Any] | list[Any] | tuple[Any, ...], dict[Any, Any] | list[Any]]] = [(value, root)]
        while todo:
            source, target = todo.pop()
            items = source.items() if isinstance(source, dict) else enumerate(source)
            for key, item in items:
                new: Any = item
                if isinstance(item, str):
                    new = self.text(item)
                elif isinstance(item, dict | list | tuple):
                    new = copies.get(id(item))
                    if new is None:
                        new = _empty_copy(item, copies)
                        todo.append((item, new))
                if isinstance(target, dict):
                    target[key] = new
                else:
                    target.append(new)
        return root


def _empty_copy(
    source: dict[Any, Any] | list[Any] | tuple[Any, ...], copies: dict[int, dict[Any, Any] | list[Any]]
) -> dict[Any, Any] | list[Any]:
    """The container ``source``'s redacted items go into, remembered so it is made once."""
    new: dict[Any, Any] | list[Any] = {} if isinstance(source, dict) else []
    copies[id(source)] = new
    return new
