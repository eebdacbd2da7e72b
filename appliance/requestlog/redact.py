"""Redaction: secrets and personal data are replaced before anything reaches the disk.

Rules are regular expressions; every match becomes ``[REDACTED:<name>]``. They run on the
record's Python values (every string in the request, the answers, the error), never on
serialised JSON, so a match can never break the stored document.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

BUILTIN_RULES: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "bearer": r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}",
    "openai_key": r"\bsk-[A-Za-z0-9_-]{16,}",
    "aws_key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "github_token": r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    "slack_token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "secret_assignment": r"(?i)\b(?:api[_-]?key|secret|token|password|passwd)\b\s*[:=]\s*['\"]?[^\s'\"]{8,}",
}


class RedactionRuleError(ValueError):
    """A configured pattern is not a valid regular expression."""


class Redactor:
    """Applies the built-in rules (unless turned off) and the configured ones, in that order."""

    def __init__(self, extra: Iterable[str] = (), *, builtin: bool = True) -> None:
        rules = dict(BUILTIN_RULES) if builtin else {}
        for i, pattern in enumerate(extra, start=1):
            rules[f"rule{i}"] = pattern
        self._rules: list[tuple[re.Pattern[str], str]] = []
        for name, pattern in rules.items():
            try:
                self._rules.append((re.compile(pattern), f"[REDACTED:{name}]"))
            except re.error as exc:
                message = f"redaction rule {pattern!r} is not a valid regular expression: {exc}"
                raise RedactionRuleError(message) from exc

    def text(self, value: str) -> str:
        for pattern, replacement in self._rules:
            value = pattern.sub(replacement, value)
        return value

    def value(self, value: Any) -> Any:
        """Every string inside dicts and lists redacted; keys and other types kept."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value
