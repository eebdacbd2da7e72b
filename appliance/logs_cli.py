"""``appliance logs list|show|stats|export|purge|feedback``: the request log from the shell.

Works next to a running server: the database is in WAL mode, so reading and curating here never
blocks serving for more than a commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.config import Paths, load_settings
from appliance.requestlog.schema import LogDatabaseError
from appliance.requestlog.store import STATUSES, LogFilter, LogStore, RecordNotFoundError, parse_time


class LogsCommandError(Exception):
    """A user mistake or an unusable log; the message is printed as one line."""


def timestamp(value: str) -> float:
    """Unix seconds, an ISO 8601 date/time, or an age like 7d, 12h, 30m."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if value and value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        return parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give unix seconds, an ISO date, or an age like 7d") from None


def rating(value: str) -> int:
    if value in ("1", "+1", "up", "good"):
        return 1
    if value in ("-1", "down", "bad"):
        return -1
    raise argparse.ArgumentTypeError(f"{value!r}: a rating is +1 or -1")


def add_filter_args(p: argparse.ArgumentParser, *, status_default: str | None = None) -> None:
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--since", type=timestamp, help="unix seconds, ISO date, or an age like 7d")
    p.add_argument("--until", type=timestamp)
    p.add_argument("--status", choices=STATUSES, default=status_default)
    p.add_argument("--rating", type=rating)
    p.add_argument("--tag")
    p.add_argument("--search", "-q", dest="text", help="text in the prompt or the answer")


def add_parser(sub: Any) -> None:
    logs = sub.add_parser("logs", help="browse, curate and export the request log")
    logs.add_argument("--log-file", type=Path, help="the log database (default: the server's)")
    # --log-file also after the subcommand (`logs list --log-file PATH`); SUPPRESS keeps a
    # subcommand that was not given it from resetting the value given before the subcommand
    log_file = argparse.ArgumentParser(add_help=False)
    log_file.add_argument("--log-file", type=Path, default=argparse.SUPPRESS, help="the log database")
    lsub = logs.add_subparsers(dest="logs_command", required=True)
    ls = lsub.add_parser("list", help="recent exchanges, newest first", parents=[log_file])
    add_filter_args(ls)
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--json", action="store_true")
    show = lsub.add_parser("show", help="one exchange in full", parents=[log_file])
    show.add_argument("id")
    stats = lsub.add_parser(
        "stats", help="requests, tokens, latency and errors per model and adapter", parents=[log_file]
    )
    add_filter_args(stats)
    stats.add_argument("--json", action="store_true")
    export = lsub.add_parser("export", help="fine-tuning JSONL: chat, dpo or completions", parents=[log_file])
    export.add_argument("--format", choices=["chat", "dpo", "completions"], default="chat")
    export.add_argument("--output", "-o", type=Path, required=True, help="file.jsonl (with --split: .train/.valid)")
    export.add_argument("--dedupe", action="store_true", help="drop identical examples")
    export.add_argument("--split", type=float, help="share for training, e.g. 0.9; the rest is validation")
    export.add_argument("--seed", type=int, default=0, help="shuffle seed of --split")
    export.add_argument(
        "--endpoint",
        choices=["chat.completions", "completions"],
        help="dpo: pairs from this endpoint (default chat.completions; completions gives plain-text pairs)",
    )
    add_filter_args(export, status_default="ok")
    purge = lsub.add_parser("purge", help="delete exchanges (all matching the filters)", parents=[log_file])
    add_filter_args(purge)
    purge.add_argument("--older-than", type=timestamp, dest="older", metavar="AGE", help="e.g. 30d")
    purge.add_argument("--all", action="store_true", help="allow purging without any filter")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask")
    feedback = lsub.add_parser("feedback", help="rate, correct, tag or annotate an exchange", parents=[log_file])
    feedback.add_argument("id")
    feedback.add_argument("--rating", type=rating, help="+1 or -1")
    feedback.add_argument("--correction", help="the answer it should have given")
    feedback.add_argument("--tag", action="append", dest="tags", help="repeat for several")
    feedback.add_argument("--note")


def _filters(args: argparse.Namespace) -> LogFilter:
    until = args.until
    if getattr(args, "older", None) is not None:
        until = args.older if until is None else min(until, args.older)
    return LogFilter(
        model=args.model,
        adapter=args.adapter,
        since=args.since,
        until=until,
        status=args.status,
        rating=args.rating,
        tag=args.tag,
        text=args.text,
    )


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _open(args: argparse.Namespace, paths: Paths) -> LogStore:
    path = args.log_file or load_settings(paths).log_file or paths.log_file
    if not path.exists():
        raise LogsCommandError(f"no request log at {path} yet: it is created when the server first serves")
    try:
        return LogStore.open(path)
    except LogDatabaseError as exc:
        raise LogsCommandError(str(exc)) from exc


def run(args: argparse.Namespace, paths: Paths) -> int:
    store = _open(args, paths)
    try:
        return COMMANDS[args.logs_command](store, args)
    except RecordNotFoundError as exc:
        raise LogsCommandError(str(exc)) from exc
    finally:
        store.close()


def _list(store: LogStore, args: argparse.Namespace) -> int:
    rows = store.page(_filters(args), limit=args.limit, offset=args.offset)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for r in rows:
        rated = {1: " +1", -1: " -1"}.get(r["rating"] or 0, "")
        answer = (r["response_preview"] or r["error"] or "").replace("\n", " ")[:80]
        print(
            f"{r['id']}  {_when(r['created_at'])}  {r['model']}  {r['status']}{rated}  "
            f"{r['prompt_tokens'] or 0}+{r['completion_tokens'] or 0} tok  {r['latency_ms'] or 0:.0f} ms\n    {answer}"
        )
    total = store.count(_filters(args))
    print(f"{len(rows)} of {total} shown", file=sys.stderr)
    return 0


def _show(store: LogStore, args: argparse.Namespace) -> int:
    print(json.dumps(store.get(args.id), indent=2, ensure_ascii=False))
    return 0


def _stats(store: LogStore, args: argparse.Namespace) -> int:
    rows = store.stats(_filters(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'model':28} {'adapters':16} {'requests':>8} {'prompt':>9} {'completion':>10} {'p50 ms':>8} "
    print(header + f"{'p95 ms':>8} {'client err':>10} {'server err':>10} {'cancelled':>9}")
    for r in rows:
        p50 = f"{r['latency_p50_ms']:.0f}" if r["latency_p50_ms"] is not None else "-"
        p95 = f"{r['latency_p95_ms']:.0f}" if r["latency_p95_ms"] is not None else "-"
        print(
            f"{r['model']:28} {r['adapters']:16} {r['requests']:>8} {r['prompt_tokens']:>9} "
            f"{r['completion_tokens']:>10} {p50:>8} {p95:>8} {r['client_error']:>10} {r['server_error']:>10} "
            f"{r['cancelled']:>9}"
        )
    return 0


def _export(store: LogStore, args: argparse.Namespace) -> int:
    from appliance.requestlog.export import export

    try:
        result = export(
            store,
            args.format,
            args.output,
            replace(_filters(args), endpoint=args.endpoint),
            dedupe=args.dedupe,
            split=args.split,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    except ValueError as exc:
        raise LogsCommandError(str(exc)) from exc
    except OSError as exc:  # a read-only folder, a full disk, a file where a folder should be
        where = exc.filename or args.output
        raise LogsCommandError(f"cannot write {where}: {exc.strerror or exc}") from exc
    print(
        f"{result.examples} examples ({result.skipped} records skipped, {result.duplicates} duplicates dropped) "
        f"-> {', '.join(str(f) for f in result.files)}"
    )
    return 0


def _purge(store: LogStore, args: argparse.Namespace) -> int:
    filters = _filters(args)
    if filters == LogFilter() and not args.all:
        raise LogsCommandError("purge without a filter deletes everything: add --all to mean it")
    n = store.count(filters)
    if n and not args.yes:
        if not sys.stdin.isatty():
            raise LogsCommandError(f"{n} exchanges would be deleted: add --yes to confirm")
        if input(f"delete {n} exchanges? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    removed = store.purge(filters)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"deleted {removed} exchanges")
    return 0


def _feedback(store: LogStore, args: argparse.Namespace) -> int:
    if args.rating is None and args.correction is None and args.tags is None and args.note is None:
        raise LogsCommandError("give at least one of --rating, --correction, --tag, --note")
    record = store.set_feedback(args.id, rating=args.rating, correction=args.correction, tags=args.tags, note=args.note)
    print(f"{record['id']}: rating {record['rating']}, tags {record['tags']}")
    return 0


COMMANDS = {
    "list": _list,
    "show": _show,
    "stats": _stats,
    "export": _export,
    "purge": _purge,
    "feedback": _feedback,
}
