"""The log export: what each format makes of logged exchanges and their feedback, and how files are written.

A small log is built in a temporary SQLite file with the real schema and store; no model runs.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.requestlog import export as export_module
from appliance.requestlog.export import ExportResult, export, split_paths, validate_chat_example
from appliance.requestlog.record import ExchangeRecord
from appliance.requestlog.schema import connect
from appliance.requestlog.store import LogFilter, LogStore

_clock = itertools.count(1_700_000_000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    log = LogStore(connect(tmp_path / "log.sqlite"))
    yield log
    log.close()


def add(
    store: LogStore,
    rid: str,
    *,
    messages: list[dict[str, Any]] | None = None,
    prompt: Any = None,
    answers: list[str] | None = None,
    model: str = "smollm2",
    status: str = "ok",
    echo: bool = False,
    **feedback: Any,
) -> None:
    """Log one exchange (chat when ``messages`` is given, else completions) and its feedback."""
    now = float(next(_clock))
    request: dict[str, Any]
    if messages is not None:
        endpoint, request = "chat.completions", {"model": model, "messages": messages}
    else:
        endpoint, request = "completions", {"model": model, "prompt": prompt, **({"echo": True} if echo else {})}
    choices = [{"index": i, "text": text, "finish_reason": "stop"} for i, text in enumerate(answers or [])]
    record = ExchangeRecord(
        id=rid,
        created_at=now,
        finished_at=now + 0.5,
        client="local",
        endpoint=endpoint,
        model=model,
        stream=False,
        request=request,
        status=status,  # type: ignore[arg-type]
        choices=choices[::-1],  # the export must go by each choice's index, not its position
    )
    store.db["exchanges"].insert(record.to_row())  # type: ignore[union-attr]
    if feedback:
        store.set_feedback(rid, **feedback)


def user(text: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(store: LogStore, fmt: str, out: Path, **kwargs: Any) -> ExportResult:
    return export(store, fmt, out, progress=False, **kwargs)  # type: ignore[arg-type]


def test_chat_export_applies_feedback_and_leaves_out_invalid_examples(store: LogStore, tmp_path: Path) -> None:
    add(store, "plain", messages=[{"role": "system", "content": "Be brief."}, *user("Hi")], answers=["Hello!"])
    parts = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "text", "text": "this."},
    ]
    add(
        store,
        "parts",
        messages=[{"role": "developer", "content": "Über-précis."}, {"role": "user", "content": parts, "name": "al"}],
        answers=["A cat."],
    )
    add(store, "corrected", messages=user("2+2?"), answers=["5"], rating=-1, correction="4")
    add(store, "bad", messages=user("Capital of France?"), answers=["Berlin"], rating=-1)
    add(store, "good", messages=user("Capital of Italy?"), answers=["Rome"], rating=1)
    add(store, "tool", messages=[*user("Weather?"), {"role": "tool", "content": "sunny"}], answers=["Sunny."])
    add(store, "blank", messages=user("   "), answers=["?"])
    add(store, "no-user", messages=[{"role": "system", "content": "Talk."}], answers=["Hi."])
    add(store, "empty-answer", messages=user("Say nothing"), answers=[""])
    add(store, "failed", messages=user("Boom"), answers=["partial"], status="server_error")
    add(store, "legacy", prompt="Once upon", answers=[" a time"])

    out = tmp_path / "chat.jsonl"
    result = run(store, "chat", out)

    rows = lines(out)
    assert result.files == [out] and result.per_file == {out: 4}
    assert result.examples == 4 and result.skipped == 5 and result.duplicates == 0
    assert rows[0] == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    assert rows[1]["messages"] == [
        {"role": "system", "content": "Über-précis."},
        {"role": "user", "content": "Describe\nthis."},
        {"role": "assistant", "content": "A cat."},
    ]
    assert rows[2]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert rows[3]["messages"][-1] == {"role": "assistant", "content": "Rome"}
    assert all(validate_chat_example(row) == [] for row in rows)
    assert result.skip_reasons["rated -1 without a correction"] == 1
    assert result.skip_reasons["tool or function calling is not exported yet"] == 1
    assert sum(result.skip_reasons.values()) == result.skipped
    assert "Über-précis" in out.read_text(encoding="utf-8")  # UTF-8, not \u escapes


def test_validate_chat_example_names_each_problem() -> None:
    valid = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert validate_chat_example(valid) == []
    assert validate_chat_example([]) != []
    assert validate_chat_example({"messages": []}) != []
    cases = [
        [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
        [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}],
        [{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "y"}],
        [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
        [{"role": "user", "content": "x"}],
        [{"role": "user", "content": "x", "name": "al"}, {"role": "assistant", "content": "y"}],
    ]
    for messages in cases:
        assert validate_chat_example({"messages": messages}), messages
    assert validate_chat_example({**valid, "extra": 1})


def test_dpo_pairs_from_corrections_and_opposite_ratings(store: LogStore, tmp_path: Path) -> None:
    add(store, "fixed", messages=user("2+2?"), answers=["5"], correction="4")
    add(store, "same", messages=user("Say hi"), answers=["hi"], correction="hi ")  # no real preference
    q = [{"role": "developer", "content": "Answer in one word."}, *user("Capital of Italy?")]
    add(store, "up1", messages=q, answers=["Rome"], rating=1)
    add(store, "up2", messages=q, answers=["Rome"], rating=1)  # same answer: no duplicate pair
    add(store, "down1", messages=q, answers=["Milan"], rating=-1)
    add(store, "down2", messages=[{"role": "system", "content": "Answer in one word."}, *user("Capital of Italy?")],
        answers=["Naples"], rating=-1)  # fmt: skip
    add(store, "alone", messages=user("Unpaired?"), answers=["yes"], rating=1)
    add(store, "unrated", messages=user("Anything?"), answers=["no"])
    add(store, "legacy", prompt="The sky is", answers=[" green"], correction=" blue")

    out = tmp_path / "dpo.jsonl"
    result = run(store, "dpo", out)
    rows = lines(out)

    assert rows[0] == {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    # plain-text pairs only when asked for: one file never mixes the two shapes
    assert all(isinstance(r["prompt"], list) for r in rows)
    legacy = run(store, "dpo", tmp_path / "dpo-text.jsonl", filters=LogFilter(status="ok", endpoint="completions"))
    assert legacy.examples == 1
    assert lines(tmp_path / "dpo-text.jsonl") == [{"prompt": "The sky is", "chosen": " blue", "rejected": " green"}]
    prompt = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}]
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows if r["prompt"] == prompt]
    assert sorted(pairs) == [("Rome", "Milan"), ("Rome", "Naples")]
    assert result.examples == len(rows) == 3
    assert result.skip_reasons == {"the chosen and rejected answers are the same": 1}
    for row in rows:
        if isinstance(row["prompt"], list):
            assert validate_chat_example({"messages": row["prompt"] + row["chosen"]}) == []
            assert validate_chat_example({"messages": row["prompt"] + row["rejected"]}) == []


def test_completions_export_maps_each_choice_to_its_prompt(store: LogStore, tmp_path: Path) -> None:
    add(store, "multi", prompt=["One,", "A,"], answers=[" two", " B"])
    add(store, "single", prompt="Roses are", answers=[" blue"], correction=" red")
    add(store, "echoed", prompt="Hello", answers=["Hello again"], echo=True)  # logged without the echo
    add(store, "tokens", prompt=[1, 2, 3], answers=[" x"])
    add(store, "bad", prompt="Bad", answers=[" answer"], rating=-1)
    add(store, "empty", prompt="Nothing", answers=["  "])
    add(store, "multi-corrected", prompt=["a", "b"], answers=["1", "2"], correction="fix")
    add(store, "chat", messages=user("Hi"), answers=["Hello"])

    out = tmp_path / "completions.jsonl"
    result = run(store, "completions", out)

    assert lines(out) == [
        {"prompt": "One,", "completion": " two"},
        {"prompt": "A,", "completion": " B"},
        {"prompt": "Roses are", "completion": " red"},
        {"prompt": "Hello", "completion": "Hello again"},
    ]
    assert result.examples == 4
    assert result.skip_reasons == {
        "the prompt is token ids, not text": 1,
        "rated -1 without a correction": 1,
        "empty completion": 1,
        "a correction on a multi-prompt request is ambiguous": 2,
    }


def test_dedupe_drops_repeated_lines(store: LogStore, tmp_path: Path) -> None:
    for i in range(3):
        add(store, f"r{i}", messages=user("Ping"), answers=["Pong"])
    add(store, "other", messages=user("Ping"), answers=["Pong!"])

    kept = run(store, "chat", tmp_path / "all.jsonl")
    deduped = run(store, "chat", tmp_path / "unique.jsonl", dedupe=True)

    assert (kept.examples, kept.duplicates) == (4, 0)
    assert (deduped.examples, deduped.duplicates) == (2, 2)
    assert len(lines(tmp_path / "unique.jsonl")) == 2


def test_split_is_seeded_and_covers_the_unsplit_export(store: LogStore, tmp_path: Path) -> None:
    for i in range(20):
        add(store, f"r{i}", messages=user(f"Question {i}"), answers=[f"Answer {i}"])
    whole = run(store, "chat", tmp_path / "whole.jsonl")

    first = run(store, "chat", tmp_path / "a" / "data.jsonl", split=0.9, seed=7)
    again = run(store, "chat", tmp_path / "b" / "data.jsonl", split=0.9, seed=7)
    other = run(store, "chat", tmp_path / "c" / "data.jsonl", split=0.9, seed=8)

    train, valid = split_paths(tmp_path / "a" / "data.jsonl")
    assert (train.name, valid.name) == ("data.train.jsonl", "data.valid.jsonl")
    assert first.files == [train, valid] and not (tmp_path / "a" / "data.jsonl").exists()
    assert first.per_file == {train: 18, valid: 2} and first.examples == whole.examples == 20
    assert train.read_bytes() == (tmp_path / "b" / "data.train.jsonl").read_bytes()
    assert valid.read_bytes() == (tmp_path / "b" / "data.valid.jsonl").read_bytes()
    assert again.per_file[split_paths(tmp_path / "b" / "data.jsonl")[1]] == 2
    assert other.examples == 20 and train.read_bytes() != (tmp_path / "c" / "data.train.jsonl").read_bytes()
    train_lines = train.read_text(encoding="utf-8").splitlines()
    valid_lines = valid.read_text(encoding="utf-8").splitlines()
    assert set(train_lines).isdisjoint(valid_lines)
    assert sorted(train_lines + valid_lines) == sorted(
        (tmp_path / "whole.jsonl").read_text(encoding="utf-8").splitlines()
    )


def test_split_keeps_both_files_non_empty(store: LogStore, tmp_path: Path) -> None:
    add(store, "one", messages=user("Only"), answers=["one"])
    single = run(store, "chat", tmp_path / "one.jsonl", split=0.5)
    assert list(single.per_file.values()) == [1, 0]

    add(store, "two", messages=user("Second"), answers=["two"])
    for share in (0.01, 0.99):
        both = run(store, "chat", tmp_path / f"two-{share}.jsonl", split=share)
        assert list(both.per_file.values()) == [1, 1]
        assert all(path.stat().st_size > 0 for path in both.files)


@pytest.mark.parametrize("share", [0, 1, -0.5, 1.5])
def test_split_outside_zero_one_is_refused(store: LogStore, tmp_path: Path, share: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        run(store, "chat", tmp_path / "x.jsonl", split=share)
    assert list(tmp_path.glob("x*")) == []


def test_filters_narrow_the_export(store: LogStore, tmp_path: Path) -> None:
    add(store, "a", messages=user("Hi"), answers=["from a"], model="model-a")
    add(store, "b", messages=user("Hi"), answers=["from b"], model="model-b")
    add(store, "c", messages=user("Hi"), answers=["rated"], model="model-b", rating=1)

    by_model = run(store, "chat", tmp_path / "b.jsonl", filters=LogFilter(status="ok", model="model-b"))
    assert [r["messages"][-1]["content"] for r in lines(tmp_path / "b.jsonl")] == ["from b", "rated"]
    assert by_model.examples == 2
    assert run(store, "chat", tmp_path / "rated.jsonl", filters=LogFilter(rating=1)).examples == 1
    wrong_endpoint = run(store, "chat", tmp_path / "none.jsonl", filters=LogFilter(endpoint="completions"))
    assert wrong_endpoint.examples == 0 and (tmp_path / "none.jsonl").read_bytes() == b""


def test_a_failed_export_leaves_no_file(store: LogStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add(store, "a", messages=user("Hi"), answers=["Hello"])
    add(store, "b", messages=user("Hi again"), answers=["Hello again"])
    real = store.iter_full

    def failing(filters: LogFilter, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield next(real(filters, **kwargs))
        raise OSError("disk went away")

    monkeypatch.setattr(store, "iter_full", failing)
    out_dir = tmp_path / "out"
    with pytest.raises(OSError, match="disk went away"):
        run(store, "chat", out_dir / "data.jsonl", split=0.5)
    assert list(out_dir.iterdir()) == []


def test_the_log_itself_is_never_overwritten(store: LogStore, tmp_path: Path) -> None:
    add(store, "a", messages=user("Hi"), answers=["Hello"])
    with pytest.raises(ValueError, match="request log itself"):
        run(store, "chat", tmp_path / "log.sqlite")
    assert store.count(LogFilter()) == 1


def _aliases(tmp_path: Path, name: str) -> list[Path]:
    """``name`` in ``tmp_path`` spelled four ways: plainly, through ``..``, relative, and through a symlink."""
    (tmp_path / "sub").mkdir(exist_ok=True)
    link = tmp_path / "sub" / f"link-to-{name}"
    link.symlink_to(tmp_path / name)
    return [tmp_path / name, tmp_path / "sub" / ".." / name, Path(os.path.relpath(tmp_path / name)), link]


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-journal"])
def test_no_file_of_the_log_is_an_output(store: LogStore, tmp_path: Path, suffix: str) -> None:
    """Issue 13: an export renamed onto the live -wal file lost every exchange not yet checkpointed."""
    add(store, "a", messages=user("Hi"), answers=["Hello"])
    wal = (tmp_path / "log.sqlite-wal").read_bytes()
    for out in _aliases(tmp_path, f"log.sqlite{suffix}"):
        with pytest.raises(ValueError, match="request log"):
            run(store, "chat", out)
    assert (tmp_path / "log.sqlite-wal").read_bytes() == wal
    assert store.count(LogFilter()) == 1
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob(".*.tmp"))


def test_a_hard_link_to_the_log_is_refused(store: LogStore, tmp_path: Path) -> None:
    add(store, "a", messages=user("Hi"), answers=["Hello"])
    os.link(tmp_path / "log.sqlite-wal", tmp_path / "other-name")
    with pytest.raises(ValueError, match="request log"):
        run(store, "chat", tmp_path / "other-name")


def test_split_outputs_are_checked_too(store: LogStore, tmp_path: Path) -> None:
    """``--split`` writes ``NAME.train.jsonl`` and ``NAME.valid.jsonl``: neither may be a file of the log."""
    add(store, "a", messages=user("Hi"), answers=["Hello"])
    add(store, "b", messages=user("Yo"), answers=["Hey"])
    (tmp_path / "data.valid.jsonl").symlink_to(tmp_path / "log.sqlite-wal")
    wal = (tmp_path / "log.sqlite-wal").read_bytes()
    with pytest.raises(ValueError, match=r"data\.valid\.jsonl is the request log"):
        run(store, "chat", tmp_path / "data.jsonl", split=0.5)
    assert (tmp_path / "log.sqlite-wal").read_bytes() == wal
    assert not (tmp_path / "data.train.jsonl").exists()


def test_a_directory_is_not_an_output(store: LogStore, tmp_path: Path) -> None:
    add(store, "a", messages=user("Hi"), answers=["Hello"])
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        run(store, "chat", tmp_path / "out")
    (tmp_path / "data.train.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"data\.train\.jsonl is a directory"):
        run(store, "chat", tmp_path / "data.jsonl", split=0.5)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("log.sqlite")) == [
        "data.train.jsonl",
        "out",
    ]


def test_progress_bar_runs_over_the_records(
    store: LogStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add(store, "a", messages=user("Hi"), answers=["Hello"])
    export(store, "chat", tmp_path / "p.jsonl", progress=True)
    assert "export chat" in capsys.readouterr().err
    assert export_module.FORMATS == ("chat", "dpo", "completions")


@pytest.mark.parametrize(
    ("fmt", "endpoint", "rows"),
    [("chat", None, 2), ("completions", None, 3), ("dpo", "chat.completions", 2), ("dpo", "completions", 1)],
)
def test_datasets_loads_every_format(
    store: LogStore, tmp_path: Path, fmt: str, endpoint: str | None, rows: int
) -> None:
    """One endpoint per dpo file: conversational and string pairs mixed in one file are a different schema."""
    datasets = pytest.importorskip("datasets")
    add(store, "c1", messages=user("2+2?"), answers=["5"], correction="4")
    add(store, "c2", messages=user("Hi"), answers=["Hello"], rating=1)
    add(store, "c3", messages=user("Hi"), answers=["Go away"], rating=-1)
    add(store, "p1", prompt="The sky is", answers=[" green"], correction=" blue")
    add(store, "p2", prompt=["Roses are", "Violets are"], answers=[" red", " blue"])
    out = tmp_path / f"{fmt}.jsonl"
    result = run(store, fmt, out, filters=LogFilter(status="ok", endpoint=endpoint))
    assert result.examples == rows

    loaded = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == rows
    assert [dict(row) for row in loaded] == lines(out)
