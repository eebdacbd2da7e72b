"""Per-row LoRA updates (engines/ggufmixer.py) on the real default model.

The update is LoRA's (a prompt's logits match llama.cpp's own adapter path), each row gets only its
own adapters, and a row's logits are bit-identical alone and in a batch with other adapters;
plus the micro-batch rule the row mapping relies on, and the ggml_tensor layout check.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.base import BatchItem, LoadOptions
from engines.gguf import GgufModel, load_llama
from engines.ggufmixer import MicroBatch, check_layout, micro_batches
from tests.loras import write_lora

PROMPT = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"


def test_micro_batches_follow_llama_cpp_split_rule() -> None:
    one = [BatchItem(s, [7], 10, 1) for s in (0, 1, 2)]
    assert micro_batches(one, 512) == [MicroBatch((0, 1, 2), (0, 1, 2))]
    gap = [BatchItem(s, [7], 10, 1) for s in (0, 2, 3)]  # separate KV streams: consecutive ids only
    assert micro_batches(gap, 512) == [MicroBatch((0,), (0,)), MicroBatch((1, 2), (1, 2))]
    draft = [BatchItem(0, [7, 8, 9], 10, 3), BatchItem(1, [7], 10, 1)]  # equal tokens per sequence
    assert micro_batches(draft, 512) == [MicroBatch((0, 3), (0, 3)), MicroBatch((1, 2), (1, 2))]
    prompt = [BatchItem(3, list(range(5)), 0, 1)]
    assert micro_batches(prompt, 512) == [MicroBatch((0, 1, 2, 3, 4), (4,))]


def test_the_tensor_layout_reads_back_right() -> None:
    load_llama()
    from engines import gguf

    mul_mat, get_rows = check_layout(gguf._libggml)
    assert mul_mat != get_rows and mul_mat > 0 and get_rows > 0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[dict[str, Any]]:
    src = tmp_path_factory.mktemp("loras")
    files = [write_lora(src / f"a{seed}.gguf", default_model_path, seed=seed) for seed in (1, 2)]
    options = LoadOptions(n_ctx_per_slot=512, n_slots=4, n_threads=2, n_threads_batch=2)
    # as served (flash attention on), and both ways without flash attention: its CPU kernel rounds
    # Q to f16, which turns a last-bit difference in Q into visible logit differences
    mixed = GgufModel(default_model_path, options)
    plain = LoadOptions(**{**options.__dict__, "flash_attn": False})
    mixed_plain = GgufModel(default_model_path, plain)
    native = GgufModel(default_model_path, LoadOptions(**{**plain.__dict__, "mix_adapters": False}))
    assert mixed.facts.mixes_adapters and not native.facts.mixes_adapters
    loaded = {
        "mixed": mixed,
        "mixed_plain": mixed_plain,
        "native": native,
        "mixed_adapters": [mixed.load_adapter(f, f.stem) for f in files],
        "mixed_plain_adapters": [mixed_plain.load_adapter(f, f.stem) for f in files],
        "native_adapters": [native.load_adapter(f, f.stem) for f in files],
    }
    assert all(a.mixable for a in loaded["mixed_adapters"]) and not any(a.mixable for a in loaded["native_adapters"])
    yield loaded
    for model in (mixed, mixed_plain, native):
        model.close()


def logits(model: GgufModel, index: int) -> np.ndarray:
    pointer = model._lib.llama_get_logits_ith(model._ctx, index)
    return np.ctypeslib.as_array(pointer, (model.facts.n_vocab,)).copy()


def test_the_update_is_llama_cpp_lora(models: dict[str, Any]) -> None:
    mixed, native = models["mixed_plain"], models["native"]
    tokens = mixed.tokenize(PROMPT, add_special=False)
    a_mixed, a_native = models["mixed_plain_adapters"][0], models["native_adapters"][0]
    mixed.truncate_slot(0, 0)
    native.truncate_slot(0, 0)
    (ours,) = mixed.decode([BatchItem(0, tokens, 0, 1, ((a_mixed, 0.7),))])
    (theirs,) = native.decode([BatchItem(0, tokens, 0, 1)], ((a_native, 0.7),))
    ours_logits, theirs_logits = logits(mixed, ours[0]), logits(native, theirs[0])
    native.truncate_slot(0, 0)
    (plain,) = native.decode([BatchItem(0, tokens, 0, 1)])
    base_logits = logits(native, plain[0])
    assert np.abs(theirs_logits - base_logits).max() > 0.5  # the adapter matters
    assert np.allclose(ours_logits, theirs_logits, atol=1e-3)  # and we apply the same update


def run(model: GgufModel, slots: list[int], choices: list[tuple[Any, ...]], steps: int) -> list[list[np.ndarray]]:
    """Greedy decoding of one prompt per slot (each prompt in its own call, as the scheduler does),
    then ``steps`` steps with every slot in one call; the logits of each step, per slot."""
    tokens = model.tokenize(PROMPT, add_special=False)
    seen: list[list[np.ndarray]] = []
    for slot, chosen in zip(slots, choices, strict=True):
        model.truncate_slot(slot, 0)
        (indices,) = model.decode([BatchItem(slot, tokens, 0, 1, chosen)])
        seen.append([logits(model, indices[0])])  # now: the next call overwrites them
    for step in range(steps):
        items = [
            BatchItem(slot, [int(seen[k][-1].argmax())], len(tokens) + step, 1, choices[k])
            for k, slot in enumerate(slots)
        ]
        outputs = model.decode(items)
        for k, indices in enumerate(outputs):
            seen[k].append(logits(model, indices[0]))
    return seen


def test_each_row_gets_its_own_adapters_alone_or_batched(models: dict[str, Any]) -> None:
    model = models["mixed"]
    a, b = models["mixed_adapters"]
    choices: list[tuple[Any, ...]] = [(), ((a, 1.0),), ((b, 1.0),), ((a, 0.5), (b, 0.5))]
    together = run(model, [0, 1, 2, 3], choices, steps=6)
    for k, chosen in enumerate(choices):
        alone = run(model, [0], [chosen], steps=6)[0]
        assert all(np.array_equal(x, y) for x, y in zip(alone, together[k], strict=True)), f"row {k} {chosen}"
    assert not np.array_equal(together[0][0], together[1][0])  # and the adapters do differ
    assert not np.array_equal(together[1][0], together[2][0])
    gap = run(model, [0, 2], [choices[1], choices[2]], steps=3)  # two micro-batches
    assert all(np.array_equal(x, y) for x, y in zip(gap[1], together[2][:4], strict=True))
