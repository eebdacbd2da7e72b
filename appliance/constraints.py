"""Constrained decoding (structured output, forced tool calls) with llguidance token masks.

Why llguidance (``benchmarks/constraints.py`` measured the choices on this engine): llama.cpp's
grammar sampler checks every candidate token against the grammar inside the sampler chain, +9.7 ms
per token at 8 streams here (2.4x slower decoding); llguidance computes a sequence's allowed-token
bitmask in ~0.1 ms from a lexer/parser built for tokenizers, batched over a step's sequences on a
small thread pool. xgrammar needs torch; outlines-core compiles each schema into an index up front
(slow for large schemas). The mask is written into the logits as -inf before the model's unchanged
sampler chain, so a constrained request samples exactly as an unconstrained one among the allowed
tokens, and requests without a constraint pay nothing.

llguidance is imported here only, lazily: a server that never sees a constraint never loads it.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from appliance.generation import InvalidParameterError
from engines.base import LoadedModel, TokenMask

log = logging.getLogger(__name__)


# JSON as the constraint writes it: no whitespace between tokens. A free whitespace rule lets a
# small model emit newlines forever inside an object; compact JSON parses the same.
def json_options(strict: bool) -> dict[str, Any]:
    """llguidance's JSON options: compact, and lenient (unknown keywords ignored) unless strict."""
    return {"whitespace_flexible": False, "lenient": not strict}


MASK_THREADS = 2


@dataclass(frozen=True)
class Grammar:
    """A constraint as a request asks for it.

    ``json_schema``: ``source`` is a JSON schema as text; ``strict`` refuses schema keywords the
    constraint cannot enforce (a strict schema is a guarantee), non-strict ignores them.
    ``lark``: ``source`` is a grammar in llguidance's Lark dialect (tool calls use it).
    ``param`` is the request field errors name.
    """

    kind: Literal["json_schema", "lark"]
    source: str
    strict: bool = True
    param: str = "response_format"


def json_schema(schema: dict[str, Any], *, strict: bool = True, param: str = "response_format") -> Grammar:
    """A JSON-schema constraint, its objects closed (see ``closed``) strict or not: without it a small
    model adds keys, even the same key twice, where the client expects exactly its own."""
    return Grammar("json_schema", json.dumps(closed(schema)), strict, param)


_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties and
    says nothing else: OpenAI's strict mode means exactly the listed keys (it requires the flag; we
    assume it), and an open object lets a small model add keys until ``max_tokens``."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=256)
def _llg_grammar(grammar: Grammar) -> str:
    """The llguidance grammar text of a constraint (pure: cached across models)."""
    import llguidance

    if grammar.kind == "lark":
        return str(llguidance.LLMatcher.grammar_from_lark(grammar.source))
    options = json_options(grammar.strict)
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(grammar.source, defaults=options))  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidParameterError(grammar.param, f"Invalid JSON schema: {exc}") from exc


class _Vocabulary:
    """The model's tokenizer as llguidance's ``TokenizerWrapper`` reads it."""

    def __init__(self, model: LoadedModel, eog: list[int]) -> None:
        self.tokens = model.vocabulary()
        self.eos_token_id = eog[0]
        self.bos_token_id = None
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        self._model = weakref.proxy(model)  # the per-model cache must not keep its model alive

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return list(self._model.tokenize(text, add_special=False, parse_special=False))


class ModelConstraints:
    """One model's llguidance tokenizer, compiled grammars and the step's mask buffer."""

    def __init__(self, model: LoadedModel) -> None:
        import llguidance

        self._llg = llguidance
        self._model = weakref.proxy(model)
        n_vocab = model.facts.n_vocab
        eog = [t for t in range(n_vocab) if model.is_end_of_generation(t)]
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(model, eog)), eos_token=eog)
        self._executor = llguidance.LLExecutor(num_threads=MASK_THREADS)
        self._words = (n_vocab + 31) // 32
        self._masks = np.zeros((model.facts.n_slots, self._words), dtype=np.int32)
        self._checked: dict[Grammar, str] = {}
        self._lock = threading.Lock()

    def compile(self, grammar: Grammar) -> str:
        """The grammar checked against this tokenizer, ready for ``matcher``; a bad one is a 400."""
        with self._lock:
            known = self._checked.get(grammar)
        if known is not None:
            return known
        text = _llg_grammar(grammar)
        probe = self._llg.LLMatcher(self.tokenizer, text, log_level=0)
        if probe.is_error():
            what = "JSON schema" if grammar.kind == "json_schema" else "grammar"
            raise InvalidParameterError(grammar.param, f"The {what} cannot be enforced: {probe.get_error()}")
        with self._lock:
            if len(self._checked) > 512:
                self._checked.clear()
            self._checked[grammar] = text
        return text

    def special_tokens(self, texts: tuple[str, ...]) -> dict[str, int]:
        """Which of ``texts`` are one special token of this model, with its id."""
        found = {}
        for text in texts:
            ids = list(self._model.tokenize(text, add_special=False, parse_special=True))
            if len(ids) == 1 and self.tokenizer.is_special_token(ids[0]):
                found[text] = ids[0]
        return found

    def matcher(self, compiled: str) -> Any:
        return self._llg.LLMatcher(self.tokenizer, compiled, log_level=0)

    def masks(self, matchers: list[Any]) -> list[TokenMask]:
        """The allowed-token masks of several sequences at once (one parallel call per step)."""
        if len(matchers) > len(self._masks):
            self._masks = np.zeros((len(matchers), self._words), dtype=np.int32)
        from llguidance.numpy import fill_next_token_bitmask_par

        rows = self._masks[: len(matchers)]
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], rows)
        return list(rows)


_per_model: weakref.WeakKeyDictionary[Any, ModelConstraints] = weakref.WeakKeyDictionary()
_per_model_lock = threading.Lock()


def for_model(model: LoadedModel) -> ModelConstraints:
    """The model's constraint state, built on first use (~1 s: llguidance reads the whole vocabulary)."""
    with _per_model_lock:
        state = _per_model.get(model)
        if state is None:
            state = ModelConstraints(model)
            _per_model[model] = state
            log.info("structured output ready for %s", model.facts.description)
        return state
