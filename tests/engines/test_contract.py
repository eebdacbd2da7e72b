"""The engine contract, run against every engine: GGUF on the real default model as shipped, the
same model converted to ONNX (int4) by ``appliance models convert``'s converter, and the small
deterministic fake engine of the fast test tier (tests/engines/fake.py).

What the scheduler relies on: text survives tokenization, chats render alike, greedy decoding is
deterministic and the same alone or batched with other slots, a prompt fed in chunks gives what
it gives in one piece, a slot rewound and fed again gives what it gave, seeds repeat, slots do
not see each other, and bad files fail with ``ModelLoadError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines import formats
from engines.base import BatchItem, ChatMessage, Engine, LoadedModel, LoadOptions, ModelLoadError, SamplingParams
from tests.engines.fake import FakeEngine, write_model

OPTIONS = LoadOptions(n_ctx_per_slot=512, n_slots=4, n_threads=2, n_threads_batch=2)
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colours.",
    "Write a haiku about rain.",
    "Say hello.",
]


ENGINES = [*formats.FORMATS, "fake"]


def engine(name: str) -> Engine:
    return FakeEngine() if name == "fake" else formats.engine_class(name)()


@pytest.fixture(scope="module", params=ENGINES)
def model(
    request: pytest.FixtureRequest, default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoadedModel]:
    if request.param == "fake":
        path = write_model(tmp_path_factory.mktemp("fake") / "fake.json")
    else:
        path = default_model_path if request.param == "gguf" else request.getfixturevalue("onnx_model_dir")
    # the fake engine's tokens are bytes: its prompts are longer
    options = replace(OPTIONS, n_ctx_per_slot=4096) if request.param == "fake" else OPTIONS
    loaded = engine(request.param).load(path, options)
    yield loaded
    loaded.close()


def prompt(model: LoadedModel, question: str) -> list[int]:
    return model.tokenize(model.render_chat([ChatMessage("user", question)]), add_special=True)


def generate(
    model: LoadedModel, slots: Sequence[int], prompts: Sequence[list[int]], n: int, params: SamplingParams | None = None
) -> list[list[int]]:
    """Prefill each prompt on its slot, then decode ``n`` tokens for all of them in one batch per step."""
    samplers = [model.new_sampler(params or SamplingParams(temperature=0.0)) for _ in slots]
    outs: list[list[int]] = [[] for _ in slots]
    for slot in slots:
        model.truncate_slot(slot, 0)
    index = model.decode([BatchItem(s, p, 0, 1) for s, p in zip(slots, prompts, strict=True)])
    tokens = [sampler.sample(i[0]) for sampler, i in zip(samplers, index, strict=True)]
    pos = [len(p) for p in prompts]
    for _ in range(n):
        for out, tok in zip(outs, tokens, strict=True):
            out.append(tok)
        index = model.decode([BatchItem(s, [t], q, 1) for s, t, q in zip(slots, tokens, pos, strict=True)])
        pos = [q + 1 for q in pos]
        tokens = [sampler.sample(i[0]) for sampler, i in zip(samplers, index, strict=True)]
    for sampler in samplers:
        sampler.close()
    return outs


def text(model: LoadedModel, tokens: Sequence[int]) -> str:
    return b"".join(model.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


def test_tokenize_round_trip(model: LoadedModel) -> None:
    sample = "Héllo, wörld! 3.14159 — 日本語 and emoji 🎉\n  indented"
    assert text(model, model.tokenize(sample, add_special=False)) == sample


def test_chat_renders_with_the_models_template(model: LoadedModel) -> None:
    rendered = model.render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert model.facts.has_chat_template


def test_greedy_is_deterministic_and_answers(model: LoadedModel) -> None:
    first = generate(model, [0], [prompt(model, QUESTIONS[0])], 12)[0]
    again = generate(model, [0], [prompt(model, QUESTIONS[0])], 12)[0]
    assert first == again
    assert "Paris" in text(model, first)


def test_the_same_answer_alone_and_among_others(model: LoadedModel) -> None:
    prompts = [prompt(model, q) for q in QUESTIONS]
    alone = [generate(model, [slot], [p], 16)[0] for slot, p in zip(range(4), prompts, strict=True)]
    together = generate(model, [0, 1, 2, 3], prompts, 16)
    assert together == alone
    # a slot's answer does not depend on which slot serves it
    assert generate(model, [3], [prompts[0]], 16)[0] == alone[0]


def last_logits(model: LoadedModel, chunks: Sequence[Sequence[int]], slot: int = 0, start: int = 0) -> np.ndarray:
    """Feed ``chunks`` one decode each; the greedy pick's logit row after the last (via a logprobs sampler)."""
    pos = start
    index: list[list[int]] = []
    for i, chunk in enumerate(chunks):
        index = model.decode([BatchItem(slot, chunk, pos, 1 if i == len(chunks) - 1 else 0)])
        pos += len(chunk)
    sampler = model.new_sampler(SamplingParams(temperature=0.0, logprobs=5))
    sampler.sample(index[0][0])
    top = sampler.last_logprob
    sampler.close()
    assert top is not None
    return np.array([lp for _, lp in top.top])


def test_chunked_prefill_equals_one_shot(model: LoadedModel) -> None:
    """Bit for bit, for chunks of at least ``facts.exact_chunk`` tokens (the scheduler's prefix cache needs it)."""
    tokens = prompt(model, "Summarise: " + " ".join(f"item {i} is on shelf {i % 7}." for i in range(30)))
    size = max(model.facts.exact_chunk, 17)
    assert len(tokens) >= 3 * size + 9
    model.truncate_slot(0, 0)
    whole = last_logits(model, [tokens])
    model.truncate_slot(0, 0)
    chunked = last_logits(model, [tokens[:size], tokens[size : 2 * size + 9], tokens[2 * size + 9 :]])
    np.testing.assert_array_equal(chunked, whole)


def test_rewind_then_refeed(model: LoadedModel) -> None:
    tokens = prompt(model, QUESTIONS[2])
    model.truncate_slot(1, 0)
    whole = last_logits(model, [tokens], slot=1)
    model.truncate_slot(1, 10)  # keep the first 10 positions, forget the rest
    again = last_logits(model, [tokens[10:]], slot=1, start=10)
    np.testing.assert_allclose(again, whole, atol=2e-3)
    # copying a slot copies what it holds
    model.copy_slot(1, 2)
    model.truncate_slot(2, 10)
    copied = last_logits(model, [tokens[10:]], slot=2, start=10)
    np.testing.assert_allclose(copied, whole, atol=2e-3)


def test_seeded_sampling_repeats(model: LoadedModel) -> None:
    p = [prompt(model, "Tell me a story about a dragon.")]
    params = SamplingParams(temperature=1.0, seed=1234)
    first = generate(model, [0], p, 24, params)[0]
    assert generate(model, [0], p, 24, params)[0] == first
    assert generate(model, [0], p, 24, SamplingParams(temperature=1.0, seed=99))[0] != first


def test_slots_are_isolated(model: LoadedModel) -> None:
    base = generate(model, [0], [prompt(model, QUESTIONS[0])], 10)[0]
    # fill the other slots with unrelated text, then continue slot 0 from scratch: same answer
    generate(model, [1, 2, 3], [prompt(model, q) for q in QUESTIONS[1:]], 10)
    assert generate(model, [0], [prompt(model, QUESTIONS[0])], 10)[0] == base


@pytest.mark.parametrize("name", ENGINES)
def test_missing_and_corrupt_files_fail_clearly(name: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine(name).load(tmp_path / "nothing-here", OPTIONS)
    bad = tmp_path / "bad"
    if name == "onnx":
        bad.mkdir()
        (bad / "model.onnx").write_bytes(b"not a model")
    else:
        bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        engine(name).load(bad, OPTIONS)


def test_close_twice(default_model_path: Path, onnx_model_dir: Path, tmp_path: Path) -> None:
    fake = write_model(tmp_path / "fake.json")
    for name, path in (("gguf", default_model_path), ("onnx", onnx_model_dir), ("fake", fake)):
        loaded = engine(name).load(path, LoadOptions(n_ctx_per_slot=256, n_slots=1))
        loaded.close()
        loaded.close()
