"""``appliance lora add|list|show|remove``: the LoRA adapter store from the shell.

It changes the store in the app's home; a server running on the same home notices within a
second (it polls the store's manifest), loads an added adapter without a restart and frees a
removed one once the requests using it end.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config import Paths
from appliance.lora.store import AdapterRecord, AdapterStore, AdapterStoreError
from appliance.registry import RegistryError


class LoraCommandError(Exception):
    """A user mistake or a refused adapter; the message is printed as one line."""


def add_parser(sub: Any) -> None:
    lora = sub.add_parser("lora", help="add, list and remove LoRA adapters")
    lsub = lora.add_subparsers(dest="lora_command", required=True)
    add = lsub.add_parser("add", help="validate a GGUF LoRA adapter and add it to the store")
    add.add_argument("file", type=Path)
    add.add_argument("--base", required=True, metavar="MODEL", help="the model it was trained on (id or alias)")
    add.add_argument("--name", help="its name (default: from the file name); requests use MODEL:NAME")
    ls = lsub.add_parser("list", help="list stored adapters")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = lsub.add_parser("show", help="everything recorded about one adapter")
    show.add_argument("name")
    rm = lsub.add_parser("remove", help="remove an adapter (a running server drops it after its requests)")
    rm.add_argument("name")


def _describe(record: AdapterRecord) -> str:
    created = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d %H:%M")
    alpha = f"{record.alpha:g}" if record.alpha is not None else "-"
    return (
        f"{record.model_id}\n    rank {record.rank}, alpha {alpha}, {len(record.targets)} tensors, "
        f"{record.size / (1 << 20):.1f} MiB, added {created} UTC\n    sha256 {record.sha256}"
    )


def run(args: argparse.Namespace, paths: Paths) -> int:
    store = AdapterStore(paths)
    try:
        if args.lora_command == "add":
            from appliance.bootstrap import base_resolver

            base_id, base_file = base_resolver(paths)(args.base)
            record = store.add(
                args.file, base=base_id, base_file=base_file, name=args.name, progress=sys.stderr.isatty()
            )
            print(f"added {_describe(record)}")
            print(f'use it with model \'{record.model_id}\', or "lora": [{{"name": "{record.name}"}}]')
        elif args.lora_command == "list":
            records = store.records()
            if args.json:
                print(json.dumps([{"id": r.model_id, **r.model_dump(mode="json")} for r in records], indent=2))
            elif not records:
                print("no adapters; add one with: appliance lora add FILE --base MODEL")
            for record in [] if args.json else records:
                print(_describe(record))
        elif args.lora_command == "show":
            record = store.get(args.name)
            print(json.dumps({"id": record.model_id, **record.model_dump(mode="json")}, indent=2))
        elif args.lora_command == "remove":
            record = store.remove(args.name)
            print(f"removed {record.model_id}")
    except (AdapterStoreError, RegistryError) as exc:
        raise LoraCommandError(str(exc)) from exc
    return 0
