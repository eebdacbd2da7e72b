"""Argument parsing only: ``appliance --serve``, ``appliance serve``, ``appliance doctor|models|logs|lora ...``.

Each command hands off to the module that owns the work; user-facing failures print one clear
line and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance import __version__, logs_cli, lora_cli, ps_cli
from appliance.config import DEFAULT_PORT, ConfigError, Paths, Settings, app_paths, load_settings_with_sources

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away

# The flag of each setting whose flag is not its name with dashes: doctor and the start-up plan
# lines say which flag set a value, so these must match the parser (a test checks they do)
FLAGS = {
    "models": "--model",
    "allowed_hosts": "--allowed-host",
    "allowed_origins": "--allowed-origin",
    "lora_dirs": "--lora-dir",
    "prefix_cache": "--no-prefix-cache",
    "flash_attn": "--no-flash-attn",
    "lora_mixing": "--no-lora-mixing",
    "log_requests": "--no-log",
    "verify_sha256": "--no-verify",
}


def _switch_off(p: argparse.ArgumentParser, flag: str, dest: str, help: str) -> None:
    """A ``--no-...`` flag: None when absent, so lower-precedence sources still apply."""
    p.add_argument(flag, dest=dest, action="store_false", default=None, help=help)


def _plan_args(p: argparse.ArgumentParser) -> None:
    """The flags that shape the hardware plan: ``serve`` and ``doctor`` share them."""
    p.add_argument(
        "--model",
        "-m",
        action="append",
        dest="models",
        metavar="ID",
        help="model id or alias to serve; repeat for several (default: the default model)",
    )
    p.add_argument("--ctx-size", "-c", type=int, help="context length per slot in tokens (default 4096, if it fits)")
    p.add_argument("--parallel", "-np", type=int, help="concurrent sequence slots per model (default: planned)")
    p.add_argument("--threads", "-t", type=int, help="CPU threads (default: the usable physical cores)")
    p.add_argument("--batch-size", "-b", type=int, help="max tokens per decode step (default 512)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "rocm", "metal", "vulkan"],
        help="where models run (default auto: CUDA > ROCm > Metal > Vulkan > CPU, among what the build has)",
    )
    p.add_argument("--gpu-layers", "-ngl", type=int, help="layers offloaded to the GPU, -1 all (default: what fits)")
    p.add_argument("--probe-timeout", type=float, help="seconds a hardware probe may take (default 15)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--socket", type=Path, help="also listen on this Unix socket (created with mode 0600)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (env APPLIANCE_API_KEY)")
    p.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="NAME",
        help="also answer requests addressed to this host name without an API key (repeatable; "
        "loopback names always work)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        dest="allowed_origins",
        metavar="ORIGIN",
        help="let web pages of this origin (https://app.example.com, or *) call the API (repeatable)",
    )
    p.add_argument(
        "--cors-origins",
        action="extend",
        dest="allowed_origins",
        type=lambda value: [o.strip() for o in value.split(",") if o.strip()],
        metavar="ORIGINS",
        help="the same, comma-separated: browser apps on these origins may call the API (CORS; default none)",
    )
    _plan_args(p)
    p.add_argument(
        "--embedding-threads", type=int, help="CPU threads for /v1/embeddings, one request at a time (default 1)"
    )
    p.add_argument("--max-queue", type=int, help="requests that may wait for a slot before 503 (default 64)")
    p.add_argument("--queue-timeout", type=float, help="seconds a request may wait for a slot (default 60)")
    _switch_off(
        p, "--no-prefix-cache", "prefix_cache", "do not reuse KV cache between requests sharing a prompt prefix"
    )
    _switch_off(
        p,
        "--no-flash-attn",
        "flash_attn",
        "disable flash attention (slower batches; solo and batched answers identical at any length)",
    )
    _switch_off(
        p,
        "--no-lora-mixing",
        "lora_mixing",
        "let llama.cpp apply LoRA adapters per decode call instead of per request (one adapter set per call)",
    )
    p.add_argument(
        "--lora-batching",
        action="store_true",
        default=None,
        help="without LoRA mixing: decode requests on the same LoRA adapter together (answers may differ from solo)",
    )
    p.add_argument(
        "--speculative",
        choices=["off", "prompt-lookup", "auto"],
        help="speculative decoding for every model (default: per model, in models.toml)",
    )
    p.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="unload a model idle this long ('5m', '1h', seconds, 'forever'; default: started models stay, "
        "models loaded on demand go after 5m)",
    )
    _switch_off(p, "--no-log", "log_requests", "do not record exchanges in the request log")
    p.add_argument("--log-file", type=Path, help="request log database (default: requests.sqlite in the home)")
    p.add_argument("--log-max-age-days", type=float, help="delete logged exchanges older than this")
    p.add_argument("--log-max-rows", type=int, help="keep at most this many logged exchanges")
    p.add_argument("--log-max-mb", type=float, help="keep the request log under this size")
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 8 MiB)")
    p.add_argument("--max-upload-mb", type=float, help="largest LoRA adapter upload accepted (default 4096)")
    p.add_argument(
        "--lora-dir",
        action="append",
        dest="lora_dirs",
        type=Path,
        metavar="DIR",
        help="a folder from which POST /v1/appliance/loras may add adapters by path (repeatable)",
    )
    p.add_argument("--header-timeout", type=float, help="seconds a client may take to send its headers (default 10)")
    p.add_argument("--body-timeout", type=float, help="seconds a request body may stall before 408 (default 10)")
    p.add_argument(
        "--shutdown-timeout", type=float, help="seconds running generations get to finish on stop (default 10)"
    )
    _switch_off(p, "--no-verify", "verify_sha256", "skip the sha256 check of model files")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="The LLM appliance: a private, OpenAI-compatible endpoint for quantized open models.",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API (also: appliance --serve)")
    _serve_args(serve)
    models = sub.add_parser("models", help="list and import models")
    msub = models.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="list known models")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    imp = msub.add_parser("import", help="import a GGUF file (or a converted ONNX folder) into the model store")
    imp.add_argument("file", type=Path)
    imp.add_argument("--id", dest="model_id", help="model id (default: from the file name)")
    imp.add_argument(
        "--link",
        action="store_true",
        help="record the file where it lies (hashed, never copied or deleted); a folder: every model under it",
    )
    rm = msub.add_parser("remove", help="unregister a model; a file in the store is deleted, a linked one is not")
    rm.add_argument("model", help="the model's id")
    rm.add_argument(
        "--force", action="store_true", help="if a running server has it loaded, unload it first (else: refused)"
    )
    ps_cli.server_args(rm)
    conv = msub.add_parser("convert", help="convert a GGUF model of the store to ONNX, offline, as a new model")
    conv.add_argument("model", help="the GGUF model's id (see `appliance models list`)")
    conv.add_argument("--to", choices=["onnx"], default="onnx", help="the format (default: onnx)")
    conv.add_argument(
        "--precision",
        choices=["int4", "fp32"],
        default="int4",
        help="int4 keeps the GGUF's 4/8-bit blocks as they are (default); fp32 dequantizes them",
    )
    conv.add_argument("--id", dest="model_id", help="the new model's id (default: MODEL-onnx-PRECISION)")
    doctor = sub.add_parser("doctor", help="what hardware is here, and what each model will run on and why")
    doctor.add_argument("--json", action="store_true", help="machine-readable output (as /v1/appliance/hardware)")
    doctor.add_argument(
        "--onnx-model",
        type=Path,
        metavar="FILE",
        help="instead: run this .onnx file once through onnxruntime on inputs of ones, to check the runtime works here",
    )
    _plan_args(doctor)
    where = sub.add_parser("paths", help="where the appliance keeps its state: home, config, models, logs, adapters")
    where.add_argument("--json", action="store_true", help="machine-readable output")
    logs_cli.add_parser(sub)
    lora_cli.add_parser(sub)
    ps_cli.add_parser(sub)
    sub.add_parser(
        "gui", help="the desktop app (also: appliance with no arguments where there is a display)", add_help=False
    )
    return parser


def _fail(message: str) -> int:
    print(f"appliance: error: {message}", file=sys.stderr)
    return 1


def _settings(args: argparse.Namespace, paths: Paths) -> tuple[Settings, dict[str, str]]:
    """The settings, and where each came from (doctor and the plan lines name the source of an override)."""
    # every serve and doctor flag's dest is a Settings field name
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    for name in ("models", "allowed_hosts", "allowed_origins", "lora_dirs"):  # repeatable flags
        if name in overrides:
            overrides[name] = tuple(getattr(args, name)) if getattr(args, name) else None
    return load_settings_with_sources(paths, overrides, FLAGS)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.bootstrap import StartupError
    from appliance.doctor import run_doctor

    if args.onnx_model is not None:
        from appliance.doctor import run_onnx_check

        return run_onnx_check(args.onnx_model, as_json=args.json)
    paths = app_paths()
    settings, sources = _settings(args, paths)
    try:
        return run_doctor(settings, paths, as_json=args.json, chosen=bool(args.models), sources=sources)
    except StartupError as exc:
        return _fail(str(exc))


def _cmd_serve(args: argparse.Namespace) -> int:
    from appliance.bootstrap import StartupError, serve

    paths = app_paths()
    settings, sources = _settings(args, paths)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(settings, paths, sources=sources)
    except StartupError as exc:
        return _fail(str(exc))
    return 0


def _unload_before_remove(args: argparse.Namespace) -> None:
    """A model a running server has loaded is not removed under it: refused, or with --force unloaded first."""
    settings, _ = _settings(argparse.Namespace(), app_paths())
    api_key = args.api_key or settings.api_key
    state = ps_cli.loaded_state(args.url, settings.host, settings.port, api_key, args.model)
    if state in (None, "not_loaded"):
        return
    if not args.force:
        raise ps_cli.PsError(
            f"'{args.model}' is {state} in the server at {args.url or f'port {settings.port}'}: unload it first "
            f"(appliance unload {args.model}), or remove it with --force, which unloads it"
        )
    print(f"unloading {args.model} from the running server (its running requests end first)...", file=sys.stderr)
    ps_cli.change_state(args.url, settings.host, settings.port, api_key, args.model, "unload")


def _import(paths: Paths, args: argparse.Namespace) -> int:
    """``appliance models import``: one file or folder, or with --link every model under a folder."""
    from appliance.modelstore import DuplicateModelError, import_model, link_folder

    source = Path(args.file).expanduser()
    progress = sys.stderr.isatty()
    if args.link and source.is_dir() and not (source / "model.onnx").is_file():
        if args.model_id:
            return _fail("--id names one model; a folder of models is linked with ids from the file names")
        added, skipped = link_folder(paths, source, progress=progress)
        for spec in added:
            print(f"linked {spec.id}: {spec.location()} ({spec.engine}, {spec.quantization})")
        for reason in skipped:
            print(f"skipped: {reason}")
        if not added and not skipped:
            return _fail(f"no GGUF file or converted ONNX folder under {source}")
        return 0
    try:
        spec = import_model(paths, source, args.model_id, link=args.link, progress=progress)
    except DuplicateModelError as exc:
        print(str(exc))
        return 0
    verb = "linked" if args.link else "imported"
    print(
        f"{verb} {spec.id}: {spec.architecture}, {spec.quantization}, context {spec.context_length}, "
        f"sha256 {spec.sha256}"
    )
    if spec.kind == "embedding":
        print(f"an embedding model: servers started from now on answer /v1/embeddings with it as {spec.id}")
    else:
        print(f"serve it with: appliance serve --model {spec.id}")
    return 0


def _cmd_paths(args: argparse.Namespace) -> int:
    """``appliance paths``: every place the appliance reads or writes, and whether it exists yet."""
    paths = app_paths()
    settings, _ = _settings(argparse.Namespace(), paths)
    places = {
        "home": (paths.home, "everything below, unless moved by the settings (APPLIANCE_HOME moves it all)"),
        "config": (paths.config_file, "settings (config.toml); flags and APPLIANCE_* variables win over it"),
        "models_file": (paths.models_file, "your models (models.toml), beside the built-in ones"),
        "models_dir": (paths.models_dir, "the model store: imported and converted models"),
        "loras_dir": (paths.loras_dir, "the LoRA adapter store"),
        "request_log": (settings.log_file or paths.log_file, "every exchange (--no-log turns it off)"),
        "responses": (paths.responses_file, "stored /v1/responses answers (store: true)"),
        "cache": (paths.cache_dir, "recomputable: safe to delete"),
    }
    if args.json:
        rows = {key: {"path": str(path), "exists": path.exists(), "what": what} for key, (path, what) in places.items()}
        print(json.dumps(rows, indent=2))
        return 0
    for key, (path, what) in places.items():
        print(f"{key:<12} {path}{'' if path.exists() else '  (not created yet)'}")
        print(f"{'':<12} {what}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from appliance.modelstore import ModelFileError
    from appliance.registry import RegistryError, load_registry

    paths = app_paths()
    try:
        if args.models_command == "convert":
            from appliance.modelconvert import convert_model

            spec = convert_model(
                paths,
                args.model,
                to=args.to,
                precision=args.precision,
                model_id=args.model_id,
                progress=sys.stderr.isatty(),
            )
            print(
                f"converted {args.model} to {spec.id}: {spec.description}, "
                f"{spec.size_bytes} bytes, sha256 {spec.sha256}"
            )
            print(f"serve it with: appliance serve --model {spec.id}")
            return 0
        if args.models_command == "import":
            return _import(paths, args)
        if args.models_command == "remove":
            from appliance.modelstore import remove_model

            _unload_before_remove(args)
            spec, deleted = remove_model(paths, args.model)
            kept = f"deleted {deleted}" if deleted else f"its file stays where it is ({spec.location()})"
            print(f"removed {spec.id} from {paths.models_file}; {kept}")
            return 0
        registry = load_registry(paths)
    except (ModelFileError, RegistryError) as exc:
        return _fail(str(exc))
    rows = []
    for spec in registry:
        try:
            location = str(spec.resolve_file(paths.models_dir))
        except RegistryError as exc:
            location = f"unavailable: {exc}"
        rows.append(
            {
                "id": spec.id,
                "default": spec.id == registry.default_model,
                "engine": spec.engine,
                "kind": spec.kind,
                "quantization": spec.quantization,
                "context_length": spec.context_length,
                "aliases": list(spec.aliases),
                "source": spec.source,
                "file": location,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = "*" if row["default"] else " "
        aliases = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
        kind = "embedding " if row["kind"] == "embedding" else ""
        print(
            f"{mark} {row['id']}{aliases}\n    {kind}{row['engine']} {row['quantization'] or ''} "
            f"ctx {row['context_length'] or '?'}  [{row['source']}]\n    {row['file']}"
        )
    return 0


def _has_display() -> bool:
    """Whether a window can be shown: always on Windows and macOS, with an X or Wayland display elsewhere."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _cmd_gui(argv: list[str]) -> int:
    """The desktop app; imported only here, so ``--serve`` never loads Qt."""
    try:
        from gui.app import main as gui_main
    except ImportError as exc:
        return _fail(f"the desktop app needs PySide6 ({exc}); install it with: pip install 'llm-appliance[gui]'")
    return gui_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status is returned.

    A reader that goes away early (``appliance logs show ID | head``) ends the command quietly
    with 141, as a shell reports a writer killed by SIGPIPE, instead of a BrokenPipeError
    traceback. The recipe is the Python documentation's (signal module, "Note on SIGPIPE"):
    flush here so the error cannot surface at exit, and point stdout at devnull so the
    interpreter's own final flush has nowhere left to fail.
    """
    try:
        try:
            status = _run(argv)
        finally:  # also when argparse exits after --help or --version
            sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):  # a stand-in stdout (tests) has no descriptor
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_EXIT
    return status


def _run(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--hardware-probe"]:  # the frozen executable running one probe (see hardware.detect)
        from appliance.hardware.probe import main as probe_main

        return probe_main(args_list[1:])
    if "--serve" in args_list:  # `appliance --serve [options]` is `appliance serve [options]`
        args_list.remove("--serve")
        args_list.insert(0, "serve")
    if args_list[:1] == ["gui"] or (not args_list and _has_display()):
        return _cmd_gui(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "models":
            return _cmd_models(args)
        if args.command == "doctor":
            return _cmd_doctor(args)
        if args.command == "paths":
            return _cmd_paths(args)
        if args.command in ("load", "unload"):
            settings, _ = _settings(argparse.Namespace(), app_paths())
            return ps_cli.residency(args, settings.host, settings.port, settings.api_key)
        if args.command == "ps":
            settings, _ = _settings(argparse.Namespace(), app_paths())
            return ps_cli.run(args, settings.host, settings.port, settings.api_key)
        if args.command == "logs":
            return logs_cli.run(args, app_paths())
        if args.command == "lora":
            return lora_cli.run(args, app_paths())
    except (logs_cli.LogsCommandError, lora_cli.LoraCommandError, ps_cli.PsError) as exc:
        return _fail(str(exc))
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 0
