"""What only the ONNX engine has: steps split around idle slots with long caches, its load-time
checks, and its refusals (adapters, a bad batch item)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.base import AdapterLoadError, BatchItem, ChatMessage, DecodeError, LoadOptions
from engines.onnx.model import OnnxEngine, OnnxModel
from tests.engines.test_contract import generate


@pytest.fixture(scope="module")
def model(onnx_model_dir: Path) -> OnnxModel:
    return OnnxEngine().load(onnx_model_dir, LoadOptions(n_ctx_per_slot=2048, n_slots=4, n_threads=2))


def test_steps_skip_idle_slots_whose_caches_cost_more_than_another_call(model: OnnxModel) -> None:
    question = model.tokenize(model.render_chat([ChatMessage("user", "Name a colour.")]), add_special=True)
    alone = generate(model, [3], [question], 8)[0]
    long = model.tokenize("The quick brown fox jumps over the lazy dog. " * 150, add_special=False)[:1600]
    for slot in (1, 2):
        model.truncate_slot(slot, 0)
        model.decode([BatchItem(slot, long, 0, 0)])
    model.truncate_slot(0, 0)
    # slots 1 and 2 hold 3,200 cells of K and V: more bytes than the weights, so 0 and 3 step apart
    assert model._runs([0, 3]) == [[0], [3]]
    assert model._runs([0, 1, 3]) == [[0, 1, 2, 3]]  # one idle slot of 1,600 cells: cheaper than a call
    assert generate(model, [0, 3], [question, question], 8) == [alone, alone]
    model.truncate_slot(1, 0)
    model.truncate_slot(2, 0)
    assert model._runs([0, 3]) == [[0, 1, 2, 3]]  # empty slots between: one call


def test_bad_items_and_adapters_are_refused(model: OnnxModel, tmp_path: Path) -> None:
    model.truncate_slot(0, 0)
    with pytest.raises(DecodeError, match="holds 0 positions"):
        model.decode([BatchItem(0, [1], 5, 1)])  # a gap in the cache
    with pytest.raises(DecodeError, match="bad batch item"):
        model.decode([BatchItem(9, [1], 0, 1)])
    with pytest.raises(DecodeError, match="holds 2048 tokens"):
        model.decode([BatchItem(0, [1] * 2049, 0, 1)])
    with pytest.raises(AdapterLoadError, match="serve the model as GGUF"):
        model.load_adapter(tmp_path / "a.gguf", "a")
