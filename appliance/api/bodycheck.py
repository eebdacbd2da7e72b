"""Checks on a raw JSON body before anything parses it: nesting depth and lone surrogates.

Both break things far from the edge when let through: a body nested hundreds of levels deep makes
pydantic's serialiser and the JSON encoder give up (a 500, and a request log record that cannot be
written), and a ``\\udfff`` escape decodes to a lone surrogate that no UTF-8 consumer (the tokenizer,
SQLite) accepts. Refusing them here, in one place, gives the client a 400 that says what is wrong.

The depth is counted on the bytes (strings blanked out by one linear regex, brackets summed with
numpy), so an 8 MiB body costs milliseconds and no recursion.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64

# a JSON string, linear (possessive: no backtracking); an unterminated one is left to the parser
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
# a \uD800-\uDFFF escape: the only way a lone surrogate gets into parsed JSON (raw UTF-8 cannot hold one)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests arrays and objects more than ``limit`` levels deep."""
    if body.count(b"[") + body.count(b"{") <= limit:  # the common case: not even that many brackets
        return False
    blanked = _STRING.sub(b'""', body)
    steps = _OPEN[np.frombuffer(blanked, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0)) > limit


def lone_surrogate(body: bytes) -> str | None:
    """Where the parsed body holds a lone surrogate (``messages.0.content``), or None.

    Only a body with a surrogate escape is parsed here; a correct pair (an emoji sent as
    ``\\ud83d\\ude00``) decodes to one character and passes.
    """
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the parser's 400 says so
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                path = f"{where}.{key}" if where else str(key)
                if not _encodable(key):
                    return where or "body"
                stack.append((child, path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}" if where else str(i)) for i, child in enumerate(item))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
