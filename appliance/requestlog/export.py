"""Turning logged exchanges into fine-tuning files: OpenAI chat JSONL, TRL preference pairs, prompt/completion.

The log is only worth keeping if it becomes training data, and training data is only worth having
if every line is valid: one malformed example fails a whole OpenAI fine-tuning job, and a wrong one
silently teaches the model. So examples that would break the documented format are left out and
counted (``ExportResult.skipped``, by reason) rather than written.

Messages are normalised the way ``appliance.api.convert`` turned the request into the model's prompt
("developer" became "system", text parts were joined with a newline), so training sees what
inference saw. Feedback decides what the answer is: a correction replaces the logged answer, and an
answer rated -1 without a correction is never a training target (in ``dpo`` it is the rejected side).

Files are written to a temporary file next to the target and renamed, so an export that fails
leaves no half file; like the log itself they are created readable by the owner only (0600), since
prompts may hold personal data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any, Literal, get_args

from tqdm import tqdm

from appliance.requestlog.store import LogFilter, LogStore

Format = Literal["chat", "dpo", "completions"]
FORMATS: tuple[str, ...] = get_args(Format)
CHAT = "chat.completions"
COMPLETIONS = "completions"
ENDPOINTS: dict[str, tuple[str, ...]] = {"chat": (CHAT,), "completions": (COMPLETIONS,), "dpo": (CHAT, COMPLETIONS)}
ROLES = ("system", "user", "assistant")
PART_SEPARATOR = "\n"  # how appliance.api.convert joins a message's text parts for the model


@dataclass
class ExportResult:
    """What an export wrote and what it left out.

    ``skipped`` counts would-be examples left out because they break the format or the feedback
    rules (one per record, or per prompt of a multi-prompt completion); ``skip_reasons`` says why.
    Records that simply carry nothing for the format (an unrated record in ``dpo``) are not counted.
    """

    files: list[Path] = field(default_factory=list)
    examples: int = 0
    skipped: int = 0
    duplicates: int = 0
    per_file: dict[Path, int] = field(default_factory=dict)
    skip_reasons: dict[str, int] = field(default_factory=dict)


class _SkipError(Exception):
    """This record (or prompt) gives no example; the message is the reason, counted in the result."""


def validate_chat_example(obj: Any) -> list[str]:
    """Problems that make ``obj`` an invalid OpenAI chat fine-tuning example; empty when it is valid.

    The rules are OpenAI's for chat fine-tuning data, narrowed to what this export writes: only
    ``messages``, each with exactly ``role`` (system, user or assistant) and non-blank string
    ``content``, at least one user message, and the assistant speaking last (the trained answer).
    """
    if not isinstance(obj, dict):
        return ["the example is not a JSON object"]
    problems = []
    extra = sorted(set(obj) - {"messages"})
    if extra:
        problems.append(f"unexpected keys {extra}: only 'messages' is written")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return [*problems, "'messages' must be a non-empty list"]
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{i}] is not an object")
            continue
        if set(message) != {"role", "content"}:
            problems.append(f"messages[{i}] must have exactly the keys 'role' and 'content', has {sorted(message)}")
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"messages[{i}] has role {role!r}, not one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"messages[{i}] has empty or non-string content")
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in messages):
        problems.append("there is no user message")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        problems.append("the last message is not from the assistant")
    return problems


def export(
    store: LogStore,
    fmt: Format,
    out: Path,
    filters: LogFilter = LogFilter(status="ok"),  # noqa: B008 - frozen dataclass, safe to share
    *,
    dedupe: bool = False,
    split: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ExportResult:
    """Write the examples ``fmt`` makes of the records ``filters`` select, one JSON object per line.

    Without ``split`` the file is ``out``; with it, a seeded shuffle puts about ``split`` of the
    examples in ``<out>.train.jsonl`` and the rest in ``<out>.valid.jsonl`` (both non-empty once
    there are two examples). Deduplication happens before the split, so no example is in both.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if split is not None and not 0 < split < 1:
        raise ValueError(
            f"split is the share of examples for training and must be between 0 and 1 (exclusive), not {split}"
        )
    out = Path(out)
    _refuse_log_file(store, out, split is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    selections = _selections(fmt, filters)
    result = ExportResult()
    reasons: Counter[str] = Counter()
    with _staging(out.parent) as stage:
        everything = stage(out)
        offsets = _write_all(store, fmt, selections, everything, result, reasons, dedupe=dedupe, progress=progress)
        if split is None:
            targets: dict[Path, list[int]] = {out: list(range(len(offsets)))}
            os.replace(everything, out)
        else:
            order = list(range(len(offsets)))
            random.Random(seed).shuffle(order)
            n_valid = _valid_size(len(order), split)
            train, valid = split_paths(out)
            targets = {train: order[n_valid:], valid: order[:n_valid]}
            staged = {path: stage(path) for path in targets}
            for path, indices in targets.items():
                _write_lines(everything, offsets, indices, staged[path])
            for path, temporary in staged.items():
                os.replace(temporary, path)
    result.examples = len(offsets)
    result.files = list(targets)
    result.per_file = {path: len(indices) for path, indices in targets.items()}
    result.skipped = sum(reasons.values())
    result.skip_reasons = dict(reasons)
    return result


def records_to_read(
    store: LogStore,
    fmt: Format,
    filters: LogFilter = LogFilter(status="ok"),  # noqa: B008 - frozen dataclass, safe to share
) -> int:
    """How many logged records an export of ``fmt`` reads: the measure of its progress.

    Not the number of examples: records without an example for the format are read and skipped,
    and a multi-prompt completion gives several.
    """
    _check_format(fmt)
    return sum(store.count(f) for f in _selections(fmt, filters))


def export_lines(
    store: LogStore,
    fmt: Format,
    filters: LogFilter = LogFilter(status="ok"),  # noqa: B008 - frozen dataclass, safe to share
    *,
    dedupe: bool = False,
    result: ExportResult | None = None,
) -> Iterator[bytes]:
    """The examples ``export`` would write to one file, as newline-terminated JSONL lines, one at a time.

    For a caller that sends the lines on rather than writing a file (the HTTP export route), so no
    file is staged and nothing is held in memory but the current record (and, for ``dpo``, the rated
    answers waiting for their pairs). Once the generator is exhausted, ``result`` (when given) holds
    the counts ``export`` reports: examples, duplicates, skipped and why; ``files`` stays empty.
    """
    _check_format(fmt)
    result = result if result is not None else ExportResult()
    reasons: Counter[str] = Counter()
    for line in _lines(store, fmt, _selections(fmt, filters), result, reasons, dedupe=dedupe, on_record=_ignore):
        result.examples += 1
        yield line
    result.skipped = sum(reasons.values())
    result.skip_reasons = dict(reasons)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _ignore(_: int) -> None:
    return None


def split_paths(out: Path) -> tuple[Path, Path]:
    """``data.jsonl`` gives ``data.train.jsonl`` and ``data.valid.jsonl``."""
    base = out.name.removesuffix(".jsonl")
    return out.with_name(f"{base}.train.jsonl"), out.with_name(f"{base}.valid.jsonl")


def _valid_size(n: int, split: float) -> int:
    """About ``1 - split`` of ``n``, but at least one example on each side once there are two."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * (1 - split))))


LOG_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")  # the database and the files SQLite keeps beside it


def _refuse_log_file(store: LogStore, out: Path, split: bool) -> None:
    """No output may be a directory or one of the log's files, however the path spells it.

    The export renames a finished file onto its target. Renamed onto the database it replaces
    the log; onto the live ``-wal`` file it unlinks every exchange not yet checkpointed, which a
    running server then never gets back (issue 13). Paths are compared resolved (symlinks,
    ``..``, relative names), and existing files also by device and inode (hard links).
    """
    targets = split_paths(out) if split else (out,)
    for target in targets:
        if target.is_dir():
            raise ValueError(f"{target} is a directory: give a file to export to, such as {target / 'export.jsonl'}")
    for row in store.db.execute("PRAGMA database_list").fetchall():
        if not row[2]:
            continue  # an in-memory or temporary database has no files
        database = Path(row[2])
        for suffix in LOG_FILE_SUFFIXES:
            spellings = {Path(f"{database}{suffix}"), Path(f"{database.resolve()}{suffix}")}
            log_file = {p.resolve() for p in spellings}
            inodes = {_inode(p) for p in spellings} - {None}
            for target in targets:
                if target.resolve() in log_file or _inode(target) in inodes:
                    what = "the request log itself" if not suffix else f"the request log's {suffix} file"
                    raise ValueError(f"{target} is {what} ({database}): choose another file to export to")


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _selections(fmt: str, filters: LogFilter) -> list[LogFilter]:
    """One filter per endpoint the format takes; none when the caller asked for another endpoint."""
    wanted = ENDPOINTS[fmt]
    if filters.endpoint is not None:
        return [filters] if filters.endpoint in wanted else []
    # dpo: message pairs and plain-text pairs in one file break trainers; text pairs on request only
    return [replace(filters, endpoint=endpoint) for endpoint in wanted[:1]]


@contextlib.contextmanager
def _staging(folder: Path) -> Iterator[Callable[[Path], Path]]:
    """Hands out temporary files in ``folder``; whatever was not renamed into place is removed."""
    made: list[Path] = []

    def new(target: Path) -> Path:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        made.append(Path(name))
        return made[-1]

    try:
        yield new
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def _write_all(
    store: LogStore,
    fmt: str,
    selections: list[LogFilter],
    path: Path,
    result: ExportResult,
    reasons: Counter[str],
    *,
    dedupe: bool,
    progress: bool,
) -> list[int]:
    """Write every example to ``path``; return each line's byte offset (for the split)."""
    total = sum(store.count(f) for f in selections)
    offsets: list[int] = []
    bar = tqdm(total=total, desc=f"export {fmt}", unit="record", disable=not progress, leave=False)
    with bar, path.open("wb") as fh:
        for line in _lines(store, fmt, selections, result, reasons, dedupe=dedupe, on_record=bar.update):
            offsets.append(fh.tell())
            fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return offsets


def _lines(
    store: LogStore,
    fmt: str,
    selections: list[LogFilter],
    result: ExportResult,
    reasons: Counter[str],
    *,
    dedupe: bool,
    on_record: Callable[[int], object],
) -> Iterator[bytes]:
    """Each example as one newline-terminated line of UTF-8 JSON; duplicates counted in ``result``."""
    records = chain.from_iterable(store.iter_full(f) for f in selections)
    seen: set[bytes] = set()
    examples = {"chat": _chat_examples, "completions": _completion_examples, "dpo": _dpo_examples}[fmt]
    for example in examples(_counted(records, on_record), reasons):
        line = json.dumps(example, ensure_ascii=False).encode("utf-8")
        if dedupe:
            digest = hashlib.blake2b(line, digest_size=16).digest()
            if digest in seen:
                result.duplicates += 1
                continue
            seen.add(digest)
        yield line + b"\n"


def _counted(records: Iterable[dict[str, Any]], on_record: Callable[[int], object]) -> Iterator[dict[str, Any]]:
    for record in records:
        yield record
        on_record(1)


def _write_lines(source: Path, offsets: list[int], indices: Iterable[int], target: Path) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        for i in indices:
            src.seek(offsets[i])
            dst.write(src.readline())
        dst.flush()
        os.fsync(dst.fileno())


# --- reading records -------------------------------------------------------------------------------------


def _correction(record: dict[str, Any]) -> str | None:
    """A blank correction is none: set_feedback keeps None fields, so "" is how one is cleared."""
    correction = record.get("correction")
    return correction if isinstance(correction, str) and correction.strip() else None


def _choice_text(record: dict[str, Any], index: int = 0) -> str | None:
    response = record.get("response")
    choices = response.get("choices") if isinstance(response, dict) else None
    for choice in choices or []:
        if isinstance(choice, dict) and choice.get("index", 0) == index and isinstance(choice.get("text"), str):
            return str(choice["text"])
    return None


def _request(record: dict[str, Any]) -> dict[str, Any]:
    request = record.get("request")
    if not isinstance(request, dict):
        raise _SkipError("the logged request is not a JSON object")
    return request


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return PART_SEPARATOR.join(t for t in texts if isinstance(t, str))
    raise _SkipError("a message's content is neither text nor a list of content parts")


def _prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The request's messages as the model saw them, with only ``role`` and ``content``."""
    messages = _request(record).get("messages")
    if not isinstance(messages, list) or not messages:
        raise _SkipError("the request has no messages")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise _SkipError("a message is not a JSON object")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise _SkipError("tool or function calling is not exported yet")
        out.append(
            {"role": "system" if role == "developer" else str(role), "content": _content_text(message.get("content"))}
        )
    return out


def _prompt_strings(record: dict[str, Any]) -> list[str]:
    """A completions request's text prompts; token-id prompts cannot be exported as text."""
    prompt = _request(record).get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise _SkipError("the prompt is token ids, not text")


def _checked_chat(messages: list[dict[str, str]]) -> dict[str, Any]:
    example = {"messages": messages}
    problems = validate_chat_example(example)
    if problems:
        raise _SkipError("invalid chat example: " + re.sub(r"messages\[\d+\]", "a message", problems[0]))
    return example


# --- the formats -----------------------------------------------------------------------------------------


def _chat_examples(records: Iterable[dict[str, Any]], reasons: Counter[str]) -> Iterator[dict[str, Any]]:
    for record in records:
        try:
            messages = _prompt_messages(record)
            answer = _correction(record)
            if answer is None and record.get("rating") == -1:
                raise _SkipError("rated -1 without a correction")
            answer = answer if answer is not None else _choice_text(record)
            if answer is None:
                raise _SkipError("no answer was logged")
            yield _checked_chat([*messages, {"role": "assistant", "content": answer}])
        except _SkipError as skip:
            reasons[str(skip)] += 1


def _completion_examples(records: Iterable[dict[str, Any]], reasons: Counter[str]) -> Iterator[dict[str, Any]]:
    for record in records:
        try:
            prompts = _prompt_strings(record)
        except _SkipError as skip:
            reasons[str(skip)] += 1
            continue
        correction = _correction(record)
        if correction is not None and len(prompts) > 1:
            # one correction for several answers: which one it replaces is unknown, and the rest are suspect
            reasons["a correction on a multi-prompt request is ambiguous"] += len(prompts)
            continue
        if correction is None and record.get("rating") == -1:
            reasons["rated -1 without a correction"] += len(prompts)
            continue
        for i, prompt in enumerate(prompts):
            completion = correction if correction is not None else _choice_text(record, i)
            if completion is None or not completion.strip():
                reasons["empty completion"] += 1
                continue
            yield {"prompt": prompt, "completion": completion}


@dataclass
class _Preferences:
    """Rated answers per prompt, for the +1 x -1 pairs made once every record has been read."""

    prompts: dict[str, list[dict[str, str]] | str] = field(default_factory=dict)
    good: dict[str, dict[str, None]] = field(default_factory=dict)  # ordered sets of answers
    bad: dict[str, dict[str, None]] = field(default_factory=dict)
    emitted: dict[str, set[bytes]] = field(default_factory=dict)  # pairs already written, per prompt

    def add(self, key: str, prompt: list[dict[str, str]] | str, answer: str, *, good: bool) -> None:
        self.prompts.setdefault(key, prompt)
        (self.good if good else self.bad).setdefault(key, {})[answer] = None

    def first_time(self, key: str, chosen: str, rejected: str) -> bool:
        digest = hashlib.blake2b(json.dumps([chosen, rejected]).encode(), digest_size=16).digest()
        pairs = self.emitted.setdefault(key, set())
        if digest in pairs:
            return False
        pairs.add(digest)
        return True


def _pair(prompt: list[dict[str, str]] | str, chosen: str, rejected: str) -> dict[str, Any]:
    """TRL's preference format: conversational for chat records, plain strings for completions."""
    if chosen.strip() == rejected.strip():
        raise _SkipError("the chosen and rejected answers are the same")
    if isinstance(prompt, str):
        if not chosen.strip() or not rejected.strip():
            raise _SkipError("an answer of the pair is empty")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    sides = []
    for answer in (chosen, rejected):
        sides.append(_checked_chat([*prompt, {"role": "assistant", "content": answer}])["messages"][-1])
    return {"prompt": prompt, "chosen": [sides[0]], "rejected": [sides[1]]}


def _dpo_prompt(record: dict[str, Any]) -> list[dict[str, str]] | str:
    if record.get("endpoint") == CHAT:
        return _prompt_messages(record)
    prompts = _prompt_strings(record)
    if len(prompts) != 1:
        raise _SkipError("feedback on a multi-prompt request is ambiguous")
    return prompts[0]


def _dpo_examples(records: Iterable[dict[str, Any]], reasons: Counter[str]) -> Iterator[dict[str, Any]]:
    """Pairs from corrections as records come, then every +1 x -1 pair of answers to one prompt."""
    prefs = _Preferences()
    for record in records:
        correction, rating = _correction(record), record.get("rating")
        if correction is None and rating not in (1, -1):
            continue  # no feedback: nothing to prefer
        try:
            prompt = _dpo_prompt(record)
            original = _choice_text(record)  # the generated text only: the log leaves out what echo sent
            if original is None:
                raise _SkipError("no answer was logged")
            key = f"{record.get('endpoint')}\x00{json.dumps(prompt, ensure_ascii=False, sort_keys=True)}"
            if rating == 1:
                prefs.add(key, prompt, correction if correction is not None else original, good=True)
            elif rating == -1:
                prefs.add(key, prompt, original, good=False)
            if correction is not None:
                pair = _pair(prompt, correction, original)
                prefs.first_time(key, correction, original)
                yield pair
        except _SkipError as skip:
            reasons[str(skip)] += 1
    for key, good in prefs.good.items():
        for chosen in good:
            for rejected in prefs.bad.get(key, {}):
                if chosen.strip() == rejected.strip() or not prefs.first_time(key, chosen, rejected):
                    continue
                try:
                    yield _pair(prefs.prompts[key], chosen, rejected)
                except _SkipError as skip:
                    reasons[str(skip)] += 1
