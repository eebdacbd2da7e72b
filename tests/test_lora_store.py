"""Adding adapters to the store: real adapter files for the default model are accepted, and each
kind of wrong file is refused with a message saying what is wrong, leaving the store untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import Paths
from appliance.lora.store import AdapterExistsError, AdapterNotFoundError, AdapterStore, AdapterStoreError
from tests.loras import targets, truncate, write_lora


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    base = default_model_path
    good = write_lora(d / "support-bot.gguf", base, seed=1)
    return {
        "good": good,
        "f16": write_lora(d / "half.gguf", base, seed=2, dtype=np.float16, tensors=targets(4)),
        "arch": write_lora(d / "other-arch.gguf", base, arch="qwen2", tensors=targets(2)),
        "shape": write_lora(d / "wrong-shape.gguf", base, tensors=targets(2), wrong_shape="blk.1.attn_v.weight"),
        "model": base,
        "not-lora": write_lora(d / "not-adapter.gguf", base, general_type="model", tensors=targets(1)),
        "truncated": truncate(good, d / "truncated.gguf"),
        "text": _text(d / "notes.gguf"),
    }


def _text(path: Path) -> Path:
    path.write_text("not a gguf file at all\n")
    return path


@pytest.fixture
def store(app_home: Path) -> AdapterStore:
    return AdapterStore(Paths(app_home))


def test_a_good_adapter_is_copied_hashed_and_recorded(store: AdapterStore, files: dict[str, Path]) -> None:
    record = store.add(files["good"], base="smollm2-135m-instruct", base_file=files["model"])
    assert record.name == "support-bot" and record.model_id == "smollm2-135m-instruct:support-bot"
    assert record.rank == 8 and record.alpha == 16.0 and len(record.targets) == 90
    assert store.path(record).read_bytes() == files["good"].read_bytes()
    import hashlib

    assert record.sha256 == hashlib.sha256(files["good"].read_bytes()).hexdigest()
    assert [r.name for r in AdapterStore(Paths(store.dir.parent)).records()] == ["support-bot"]  # on disk
    half = store.add(files["f16"], base="smollm2-135m-instruct", base_file=files["model"], name="half-16")
    assert half.name == "half-16" and len(half.targets) == 12


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("arch", "made for architecture 'qwen2', the base model is 'llama'"),
        (
            "shape",
            "tensor blk.1.attn_v.weight: lora_a [640, 8] and lora_b [8, 192] do not fit the base weight [576, 192]",
        ),
        ("model", "not a LoRA adapter: general.type is 'model'"),
        ("not-lora", "not a LoRA adapter: general.type is 'model'"),
        ("truncated", "truncated"),
        ("text", "not a GGUF file"),
    ],
)
def test_a_wrong_file_is_refused_and_nothing_changes(
    store: AdapterStore, files: dict[str, Path], kind: str, message: str
) -> None:
    store.add(files["good"], base="smollm2-135m-instruct", base_file=files["model"])
    before = sorted(p.name for p in store.dir.iterdir())
    with pytest.raises(AdapterStoreError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        store.add(files[kind], base="smollm2-135m-instruct", base_file=files["model"], name="x")
    assert files[kind].name in str(err.value)
    assert sorted(p.name for p in store.dir.iterdir()) == before
    assert [r.name for r in store.records()] == ["support-bot"]


def test_names_are_unique_and_remove_deletes_the_file(store: AdapterStore, files: dict[str, Path]) -> None:
    record = store.add(files["good"], base="m", base_file=files["model"])
    with pytest.raises(AdapterExistsError, match="already exists"):
        store.add(files["good"], base="m", base_file=files["model"])
    with pytest.raises(AdapterStoreError, match="invalid adapter name"):
        store.add(files["good"], base="m", base_file=files["model"], name="a:b")
    version = store.version()
    store.remove(record.name)
    assert not store.path(record).exists() and store.records() == []
    assert store.version() != version
    with pytest.raises(AdapterNotFoundError):
        store.remove(record.name)
