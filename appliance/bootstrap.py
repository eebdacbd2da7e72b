"""The one composition root: settings -> registry -> engines -> scheduler -> API -> server.

Everything is built here and handed down; nothing below reaches back up for configuration.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from appliance.api.app import create_app
from appliance.config import Paths, Settings
from appliance.lora.store import AdapterStore
from appliance.lora.sync import AdapterSync
from appliance.modelstore import ModelFileError, verify_model_file
from appliance.registry import ModelSpec, Registry, RegistryError, load_registry
from appliance.requestlog.redact import Redactor
from appliance.requestlog.schema import LogDatabaseError, connect
from appliance.requestlog.writer import DisabledLog, LogWriter, Retention
from appliance.scheduler import ModelRunner, RunnerConfig, Scheduler
from engines.base import Engine, LoadOptions, ModelLoadError, SamplingParams
from engines.gguf import GgufEngine

log = logging.getLogger("appliance")

ENGINES: dict[str, type[Engine]] = {"gguf": GgufEngine}


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


class ApplianceServer(uvicorn.Server):
    """uvicorn's server, telling the scheduler to refuse new work as soon as a stop signal comes."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self._scheduler = scheduler

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Not super(): uvicorn re-raises the signal after its shutdown, which would kill the
        # process before our own cleanup (scheduler, socket file) runs. A second Ctrl-C forces.
        self._scheduler.begin_shutdown()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def check_exposure(settings: Settings) -> None:
    if not settings.is_loopback and not settings.api_key:
        raise StartupError(
            f"refusing to listen on {settings.host} without an API key: anyone on the network could use it. "
            "Set one with --api-key or APPLIANCE_API_KEY, or listen on 127.0.0.1."
        )


def sampling_defaults(spec: ModelSpec) -> SamplingParams:
    return SamplingParams(**spec.sampling.model_dump(exclude_none=True))


def load_runner(spec: ModelSpec, settings: Settings, paths: Paths, *, progress: bool = True) -> ModelRunner:
    path = verify_model_file(paths, spec, check_sha256=settings.verify_sha256, progress=progress)
    n_ctx = settings.ctx_size
    if spec.context_length and n_ctx > spec.context_length:
        log.warning("%s: --ctx-size %d exceeds its trained context; using %d", spec.id, n_ctx, spec.context_length)
        n_ctx = spec.context_length
    options = LoadOptions(
        n_ctx_per_slot=n_ctx,
        n_slots=settings.parallel,
        n_threads=settings.threads,
        n_threads_batch=settings.threads,
        n_batch=settings.batch_size,
        chat_template_override=spec.chat_template,
        flash_attn=settings.flash_attn,
    )
    model = ENGINES[spec.engine]().load(path, options)
    config = RunnerConfig(
        n_batch=settings.batch_size,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
        prefix_cache=settings.prefix_cache,
        exact_adapters=not settings.lora_batching,
        speculative=(settings.speculative or spec.speculative) == "prompt-lookup",
        draft_max=spec.draft_max,
    )
    provenance = {
        "model_sha256": spec.sha256,
        "quantization": model.facts.quantization or spec.quantization,
        "engine": spec.engine,
        "backend": "llama.cpp" if spec.engine == "gguf" else spec.engine,
        "device": model.facts.backend,
    }
    return ModelRunner(spec.id, model, config, sampling_defaults=sampling_defaults(spec), provenance=provenance)


def build_request_log(settings: Settings, paths: Paths) -> LogWriter | DisabledLog:
    """The request log writer, or its stand-in with --no-log; says at start-up which it is."""
    if not settings.log_requests:
        log.info("request log: off (--no-log)")
        return DisabledLog()
    path = settings.log_file or paths.log_file
    try:
        connect(path).conn.close()  # surface a bad path or a newer schema now, in plain words
    except LogDatabaseError as exc:
        log.error("%s; records are kept in memory until it can be written", exc)
    retention = Retention(
        max_age_days=settings.log_max_age_days,
        max_rows=settings.log_max_rows,
        max_bytes=int(settings.log_max_mb * (1 << 20)) if settings.log_max_mb else None,
    )
    redactor = Redactor(settings.log_redact, builtin=settings.log_redact_builtin)
    log.info("request log: on, every exchange is recorded in %s (--no-log turns it off)", path)
    return LogWriter(path, redactor, max_pending=settings.log_buffer, retention=retention)


def base_resolver(paths: Paths) -> Callable[[str], tuple[str, Path]]:
    """Model id or alias -> (id, file), from models.toml as it is now (a model imported later counts)."""

    def resolve(name: str) -> tuple[str, Path]:
        spec = load_registry(paths).get(name)
        return spec.id, spec.resolve_file(paths.models_dir)

    return resolve


def build_adapters(scheduler: Scheduler, paths: Paths) -> AdapterSync:
    """The stored LoRA adapters, loaded on the models being served, and kept in step with the store."""
    sync = AdapterSync(AdapterStore(paths), scheduler, base_resolver(paths))
    sync.start()
    loaded = [m for m, _, _ in scheduler.adapter_models()]
    if loaded:
        log.info("LoRA adapters: %s", ", ".join(loaded))
    return sync


def build_scheduler(settings: Settings, paths: Paths, registry: Registry | None = None) -> Scheduler:
    registry = registry or load_registry(paths)
    names = settings.models or ((registry.default_model,) if registry.default_model else ())
    if not names:
        raise StartupError("no model to serve: models.toml lists none")
    scheduler = Scheduler()
    try:
        for name in names:
            spec = registry.get(name)
            runner = load_runner(spec, settings, paths, progress=sys.stderr.isatty())
            scheduler.add(runner, aliases=spec.aliases)
    except (RegistryError, ModelFileError, ModelLoadError) as exc:
        scheduler.stop()
        raise StartupError(str(exc)) from exc
    return scheduler


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is already in use: pick another with --port") from exc
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket only its owner can use (mode 0600); a stale file is replaced."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise StartupError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.closing(probe):
            if probe.connect_ex(str(path)) == 0:
                raise StartupError(f"another server is already listening on {path}")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(2048)
    return sock


def serve(settings: Settings, paths: Paths) -> None:
    """Load the models, listen, serve until SIGINT/SIGTERM, then shut down cleanly."""
    check_exposure(settings)
    scheduler = build_scheduler(settings, paths)
    adapters = build_adapters(scheduler, paths)
    request_log = build_request_log(settings, paths)
    sockets: list[socket.socket] = []
    try:
        sockets.append(tcp_socket(settings.host, settings.port))
        if settings.socket:
            sockets.append(unix_socket(settings.socket))
        app = create_app(scheduler, settings, request_log, adapters)
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level=settings.log_level,
            timeout_graceful_shutdown=int(settings.shutdown_timeout),
            lifespan="off",
        )
        server = ApplianceServer(config, scheduler)
        host, port = sockets[0].getsockname()[:2]
        where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        if settings.socket:
            where += f" and unix:{settings.socket}"
        log.info("serving %s on %s", ", ".join(scheduler.model_ids), where)
        if settings.api_key:
            log.info("API key required on /v1 routes")
        server.run(sockets=sockets)
    finally:
        adapters.stop()
        scheduler.stop()
        request_log.close()  # after the scheduler: the last exchanges' records are in by then
        for sock in sockets:
            sock.close()
        if settings.socket:
            with contextlib.suppress(FileNotFoundError):
                settings.socket.unlink()
        log.info("stopped")
