"""The one composition root: settings -> registry -> hardware plan -> engines -> scheduler -> API -> server.

Everything is built here and handed down; nothing below reaches back up for configuration.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import Paths, Settings, parse_duration
from appliance.generation import ModelUnavailableError
from appliance.hardware.detect import detect
from appliance.hardware.facts import HardwareFacts
from appliance.hardware.planner import (
    NOT_ENOUGH_MEMORY,
    ModelPlan,
    ModelRequest,
    Overrides,
    plan_addition,
    plan_models,
)
from appliance.hardware.report import HardwareReport, build_report, hardware_summary
from appliance.memory import limit_malloc_arenas
from appliance.modelstore import ModelFileError
from appliance.registry import ModelSpec, Registry, RegistryError, load_registry
from engines import formats
from engines.base import Engine, LoadOptions, ModelLoadError, SamplingParams

if TYPE_CHECKING:
    from appliance.embedding import EmbedderLoader, EmbeddingModels
    from appliance.lora.sync import AdapterSync
    from appliance.requestlog.writer import DisabledLog, LogWriter
    from appliance.residency import Loader, Lookup, Residency, Resident
    from appliance.responses_store import ResponseStore
    from appliance.scheduler import ModelRunner, Scheduler
    from engines.embeddings import Embedder

# What only serving needs (the scheduler, the engines' runtimes, the request log, the HTTP stack)
# is imported by the function that builds it: start-up then plans and starts loading the model
# sooner, and the rest is imported while the model loads (see serve).

log = logging.getLogger("appliance")


def prepare_engines(settings: Settings) -> None:
    """Import the scheduler and initialise the GGUF runtime, ahead of the plan that needs neither.

    A runtime that fails here fails again when its model loads, which reports why.
    """
    import appliance.scheduler  # noqa: F401 (imported now rather than on the loading path)

    with contextlib.suppress(ImportError, OSError, AttributeError, ModelLoadError):
        engine_class("gguf")().prepare()


def engine_class(name: str) -> type[Engine]:
    """The engine that loads models of this format (models.toml's ``engine``)."""
    try:
        return formats.engine_class(name)
    except KeyError as exc:
        raise StartupError(str(exc.args[0])) from exc


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


def check_exposure(settings: Settings) -> None:
    if not settings.is_loopback and not settings.api_key:
        raise StartupError(
            f"refusing to listen on {settings.host} without an API key: anyone on the network could use it. "
            "Set one with --api-key or APPLIANCE_API_KEY, or listen on 127.0.0.1."
        )


def sampling_defaults(spec: ModelSpec) -> SamplingParams:
    return SamplingParams(**spec.sampling.model_dump(exclude_none=True))


def load_runner(
    spec: ModelSpec,
    settings: Settings,
    paths: Paths,
    plan: ModelPlan,
    *,
    background: bool = False,
    path: Path | None = None,
) -> ModelRunner:
    """Load one model as its plan says (``background``: beside models that are serving; ``path``: its
    file, already checked against models.toml)."""
    from appliance.modelstore import verify_model_file
    from appliance.scheduler import ModelRunner, RunnerConfig

    if path is None:
        path = verify_model_file(paths, spec, check_sha256=settings.verify_sha256, progress=sys.stderr.isatty())
    options = LoadOptions(
        n_ctx_per_slot=plan.ctx_size.value,
        n_slots=plan.slots.value,
        n_threads=plan.threads.value,
        n_threads_batch=plan.threads.value,
        n_batch=plan.batch_size.value,
        n_gpu_layers=plan.gpu_layers.value,
        gpu_devices=plan.gpu_devices,
        tensor_split=plan.tensor_split,
        main_gpu=plan.main_gpu,
        chat_template_override=spec.chat_template,
        flash_attn=settings.flash_attn,
        background=background,
        mix_adapters=settings.lora_mixing,
    )
    model = engine_class(spec.engine)().load(path, options)
    config = RunnerConfig(
        n_batch=plan.batch_size.value,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
        prefix_cache=settings.prefix_cache,
        exact_adapters=not settings.lora_batching,
        speculative=(settings.speculative or spec.speculative) in ("prompt-lookup", "auto"),
        draft_policy="adaptive" if (settings.speculative or spec.speculative) == "auto" else "always",
        draft_max=spec.draft_max,
    )
    provenance = {
        "model_sha256": spec.sha256,
        "quantization": model.facts.quantization or spec.quantization,
        "engine": spec.engine,
        "backend": formats.RUNTIMES.get(spec.engine, spec.engine),
        "device": model.facts.backend,
    }
    return ModelRunner(spec.id, model, config, sampling_defaults=sampling_defaults(spec), provenance=provenance)


# Settings the planner takes as overrides: its name -> (the Settings field, the flag that sets it)
_OVERRIDES = {
    "device": ("device", "--device"),
    "gpu_layers": ("gpu_layers", "--gpu-layers"),
    "threads": ("threads", "--threads"),
    "slots": ("parallel", "--parallel"),
    "batch_size": ("batch_size", "--batch-size"),
    "ctx_size": ("ctx_size", "--ctx-size"),
}


def model_request(
    spec: ModelSpec, settings: Settings, paths: Paths, sources: Mapping[str, str] | None = None
) -> ModelRequest:
    """What the planner needs of a model: its sizes from the file's header, and the user's overrides.

    A per-model value in models.toml wins over the server-wide setting. ``sources`` says where
    each setting came from (``config.load_settings_with_sources``), so the report names
    config.toml or the variable rather than a flag nobody gave; without it the flag is named.
    """
    values: dict[str, Any] = {name: getattr(settings, field) for name, (field, _) in _OVERRIDES.items()}
    where = {name: (sources or {}).get(field, flag) for name, (field, flag) in _OVERRIDES.items()}
    for name in ("device", "gpu_layers", "threads"):
        value = getattr(spec, name)
        if value is not None:
            values[name] = value
            where[name] = f"models.toml ({spec.id}.{name})"
    overrides = Overrides(**values, sources=where)
    try:
        shape = formats.model_shape(spec.resolve_file(paths.models_dir), spec.engine)
    except (RegistryError, ModelLoadError) as exc:
        return ModelRequest(spec.id, spec.engine, None, overrides, problem=str(exc))
    return ModelRequest(spec.id, spec.engine, shape, overrides)


def plan_serving(
    settings: Settings,
    paths: Paths,
    registry: Registry,
    hardware: HardwareFacts,
    sources: Mapping[str, str] | None = None,
) -> list[tuple[ModelSpec, ModelPlan]]:
    """The models to serve, each with its plan; they share the machine, so they are planned together."""
    names = settings.models or ((registry.default_model,) if registry.default_model else ())
    if not names:
        raise StartupError("no model to serve: models.toml lists none")
    try:
        specs = [registry.get(name) for name in names]
    except RegistryError as exc:
        raise StartupError(str(exc)) from exc
    for spec in specs:
        if spec.kind == "embedding":
            raise StartupError(
                f"'{spec.id}' is an embedding model: every server answers /v1/embeddings with each registered "
                "embedding model, loaded on first use; --model chooses the chat models"
            )
    plans = plan_models(hardware, [model_request(spec, settings, paths, sources) for spec in specs])
    return list(zip(specs, plans, strict=True))


def hide_gpus_if_engine_hung(hardware: HardwareFacts) -> None:
    """When the engine probe hung or crashed, keep llama.cpp in this process away from the GPU drivers.

    The plan is then CPU-only anyway; hiding the devices stops the backend's own initialisation
    from hanging the server on the same driver.
    """
    probe = hardware.probe("engines")
    if probe is not None and probe.status in ("timeout", "failed"):
        for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
            os.environ[var] = ""
        log.warning("the engine probe %s: GPUs are hidden from llama.cpp so start-up cannot hang", probe.status)


def build_scheduler(
    settings: Settings,
    paths: Paths,
    registry: Registry | None = None,
    planned: list[tuple[ModelSpec, ModelPlan]] | None = None,
) -> Scheduler:
    """Load every planned model (detecting the hardware and planning first if not done)."""
    if planned is None:
        planned = plan_serving(settings, paths, registry or load_registry(paths), detect(settings.probe_timeout))
    from appliance.scheduler import Scheduler

    scheduler = Scheduler()
    try:
        for spec, plan in planned:
            if plan.error:
                raise StartupError(f"{spec.id}: {plan.error}")
            runner = load_runner(spec, settings, paths, plan)
            scheduler.add(runner, aliases=spec.aliases)
    except (RegistryError, ModelFileError, ModelLoadError) as exc:
        scheduler.stop()
        raise StartupError(str(exc)) from exc
    except StartupError:
        scheduler.stop()
        raise
    return scheduler


def detect_and_plan(
    settings: Settings, paths: Paths, sources: Mapping[str, str] | None = None
) -> tuple[list[tuple[ModelSpec, ModelPlan]], HardwareReport]:
    """Probe the machine, plan the models, and say so in the log: one line each, and every warning."""
    hardware = detect(settings.probe_timeout, cache_file=paths.cache_dir / "engines-probe.json")
    hide_gpus_if_engine_hung(hardware)
    try:
        registry = load_registry(paths)
    except RegistryError as exc:
        raise StartupError(str(exc)) from exc
    planned = plan_serving(settings, paths, registry, hardware, sources)
    report = build_report(hardware, [plan for _, plan in planned])
    log.info("hardware: %s", hardware_summary(hardware))
    for advice in [*report.advice, *(a for p in report.plans for a in p.advice)]:
        emit = log.warning if advice.level != "info" else log.info
        emit("%s%s", advice.message, f" (fix: {advice.fix})" if advice.fix else "")
    for plan in report.plans:
        log.info("plan: %s", plan.summary())
    return planned, report


def keep_alive_for(spec: ModelSpec, settings: Settings, *, on_demand: bool) -> float | None:
    """Seconds idle before the model is unloaded (None: never): models.toml's, else --keep-alive's,
    else a model started with the server stays and one loaded by a request goes after 5 minutes."""
    from appliance.residency import DEFAULT_ON_DEMAND_KEEP_ALIVE

    for value in (spec.keep_alive, settings.keep_alive):
        if value is not None:
            return parse_duration(value)
    return DEFAULT_ON_DEMAND_KEEP_ALIVE if on_demand else None


def chat_lookup(paths: Paths) -> Lookup:
    """A request's model name -> a registered chat model's id, from models.toml as it is now."""

    def lookup(name: str) -> str | None:
        try:
            spec = load_registry(paths).get(name)
        except RegistryError:
            return None
        return spec.id if spec.kind == "chat" else None

    return lookup


def on_demand_loader(
    settings: Settings, paths: Paths, hardware: HardwareFacts, sources: Mapping[str, str] | None = None
) -> Loader:
    """How a request loads a registered model: planned beside the loaded ones, refused if it would not fit."""
    from appliance.hardware.cpu import probe_cpu
    from appliance.residency import Resident

    def load(model_id: str, loaded: Sequence[ModelPlan]) -> Resident:
        from appliance.modelstore import verify_model_file

        try:
            spec = load_registry(paths).get(model_id)
            # first: a moved or changed file is reported as such (with how to relink it), not as a plan error
            path = verify_model_file(paths, spec, check_sha256=settings.verify_sha256, progress=False)
        except (RegistryError, ModelFileError) as exc:
            raise ModelUnavailableError(model_id, str(exc)) from exc
        request = model_request(spec, settings, paths, sources)
        plan = plan_addition(hardware, loaded, request, ram_now=probe_cpu().ram_available)
        if plan.error:
            code = "insufficient_memory" if plan.error.startswith(NOT_ENOUGH_MEMORY) else "model_unavailable"
            raise ModelUnavailableError(model_id, f"{spec.id}: {plan.error}", code=code)
        log.info("plan: %s", plan.summary())
        try:
            runner = load_runner(spec, settings, paths, plan, background=True, path=path)
        except (RegistryError, ModelFileError, ModelLoadError) as exc:
            raise ModelUnavailableError(model_id, str(exc)) from exc
        return Resident(runner, plan, spec.aliases, keep_alive_for(spec, settings, on_demand=True))

    return load


def build_residency(
    scheduler: Scheduler,
    planned: list[tuple[ModelSpec, ModelPlan]],
    settings: Settings,
    paths: Paths,
    hardware: HardwareFacts,
    *,
    sources: Mapping[str, str] | None = None,
    on_loaded: Callable[[str], object] | None = None,
) -> Residency:
    """The started models as residents, and how any other registered model is loaded when asked for."""
    from appliance.residency import Residency, Resident

    residency = Residency(
        scheduler, chat_lookup(paths), on_demand_loader(settings, paths, hardware, sources), on_loaded=on_loaded
    )
    for spec, plan in planned:
        keep_alive = keep_alive_for(spec, settings, on_demand=False)
        residency.adopt(Resident(scheduler.resolve(spec.id), plan, spec.aliases, keep_alive))
    return residency


def build_request_log(settings: Settings, paths: Paths) -> LogWriter | DisabledLog:
    """The request log writer, or its stand-in with --no-log; says at start-up which it is."""
    from appliance.requestlog.redact import Redactor
    from appliance.requestlog.schema import LogDatabaseError, connect
    from appliance.requestlog.writer import DisabledLog, LogWriter, Retention

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
    secrets = (settings.api_key,) if settings.api_key else ()  # the server's own key never reaches the disk
    redactor = Redactor(settings.log_redact, builtin=settings.log_redact_builtin, secrets=secrets)
    log.info("request log: on, every exchange is recorded in %s (--no-log turns it off)", path)
    return LogWriter(path, redactor, max_pending=settings.log_buffer, retention=retention)


def build_response_store(paths: Paths) -> ResponseStore:
    """Where ``/v1/responses`` keeps stored responses; a file that cannot be used falls back to memory."""
    from appliance.responses_store import ResponseStore, ResponseStoreError

    try:
        return ResponseStore(paths.responses_file)
    except ResponseStoreError as exc:
        log.error("%s; stored responses are kept in memory until the server stops", exc)
        return ResponseStore(None)


def base_resolver(paths: Paths) -> Callable[[str], tuple[str, Path]]:
    """Model id or alias -> (id, file), from models.toml as it is now (a model imported later counts)."""

    def resolve(name: str) -> tuple[str, Path]:
        spec = load_registry(paths).get(name)
        return spec.id, spec.resolve_file(paths.models_dir)

    return resolve


def build_adapters(scheduler: Scheduler, paths: Paths) -> AdapterSync:
    """The stored LoRA adapters, loaded on the models being served, and kept in step with the store."""
    from appliance.lora.store import AdapterStore
    from appliance.lora.sync import AdapterSync

    sync = AdapterSync(AdapterStore(paths), scheduler, base_resolver(paths))
    sync.start()
    loaded = [m for m, _, _ in scheduler.adapter_models()]
    if loaded:
        log.info("LoRA adapters: %s", ", ".join(loaded))
    return sync


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is already in use: pick another with --port") from exc
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


class UnixListener:
    """A listening Unix socket only its owner can use (mode 0600), and the file it made.

    A stale file (no server answers on it) is replaced; a live one is left alone. On close the
    file is removed only if it is still the one this server bound: a second server that fails to
    start must never delete the first one's socket.
    """

    def __init__(self, path: Path) -> None:
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
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {path}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(2048)
        self.path = path
        self.sock = sock
        info = path.lstat()
        self._identity = (info.st_dev, info.st_ino)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._identity:
                self.path.unlink()


def embedder_loader(settings: Settings, paths: Paths) -> EmbedderLoader:
    """How an embedding model is loaded: its file checked against models.toml, then its engine."""

    def load(spec: ModelSpec, path: Path) -> Embedder:
        from appliance.modelstore import verify_model_file

        try:
            path = verify_model_file(paths, spec, check_sha256=settings.verify_sha256, progress=False)
        except ModelFileError as exc:
            raise ModelLoadError(path, str(exc)) from exc
        threads = settings.embedding_threads
        if spec.engine == "onnx":
            from engines.onnx_embed import OnnxEmbedder

            return OnnxEmbedder(
                path, max_tokens=spec.context_length or 512, threads=threads, pooling=spec.pooling or "mean"
            )
        from engines.gguf_embed import GgufEmbedder

        return GgufEmbedder(path, threads=threads, pooling=spec.pooling, max_tokens=spec.context_length)

    return load


def build_embeddings(settings: Settings, paths: Paths, registry: Registry | None = None) -> EmbeddingModels:
    """Every registered embedding model, none loaded yet (the first request naming one loads it).

    A model whose file is missing (the built-in one's package is not installed, as in the single
    executable) is kept with the reason, which /v1/embeddings gives to a request naming it.
    """
    from appliance.embedding import EmbeddingEntry, EmbeddingModels

    registry = registry or load_registry(paths)
    entries = []
    for spec in registry:
        if spec.kind != "embedding":
            continue
        try:
            path: Path | None = spec.resolve_file(paths.models_dir)
            problem = None if path is not None and path.is_file() else f"its file {path} does not exist"
        except RegistryError as exc:
            path, problem = None, str(exc)
        entries.append(EmbeddingEntry(spec, path if problem is None else None, problem))
        if problem is None:
            log.info("embedding model %s: %s (loaded on first use)", spec.id, path)
        else:
            log.info("embedding model %s is not available: %s", spec.id, problem)
    return EmbeddingModels(entries, embedder_loader(settings, paths), max_queue=settings.max_queue)


def serve(settings: Settings, paths: Paths, sources: Mapping[str, str] | None = None) -> None:
    """Listen, load the models, serve until SIGINT/SIGTERM, then drain and shut down cleanly.

    The addresses are taken first, so a port in use fails in a second rather than after the
    model has loaded; what this call did not create it never removes. ``sources`` (where each
    setting came from) only changes how the plan lines name an override.
    """
    check_exposure(settings)
    limit_malloc_arenas()  # before the threads: an unloaded model's memory goes back (appliance.memory)
    sockets = [tcp_socket(settings.host, settings.port)]
    unix: UnixListener | None = None
    scheduler: Scheduler | None = None
    adapters: AdapterSync | None = None
    request_log: LogWriter | DisabledLog | None = None
    responses: ResponseStore | None = None
    embeddings: EmbeddingModels | None = None
    residency: Residency | None = None
    served = False

    def stop_work() -> None:  # idempotent: the drain calls it, and the cleanup below again
        if residency is not None:
            residency.close()
        if adapters is not None:
            adapters.stop()
        if scheduler is not None:
            scheduler.stop()
        if embeddings is not None:
            embeddings.close()

    try:
        if settings.socket:
            unix = UnixListener(settings.socket)
            sockets.append(unix.sock)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
            # Start-up overlaps its parts: the engine runtime is imported and initialised while
            # the hardware is probed and the models planned, then the models load (native code:
            # the GIL is released) while this thread imports the HTTP stack and opens the request
            # log. On two cores the start then takes about the longest part, not their sum.
            pool.submit(prepare_engines, settings)
            planned, hardware = detect_and_plan(settings, paths, sources)
            loading = pool.submit(build_scheduler, settings, paths, planned=planned)
            try:
                from appliance.api.app import create_app
                from appliance.httpserver import make_server

                request_log = build_request_log(settings, paths)
                responses = build_response_store(paths)
            finally:
                scheduler = loading.result()  # a load error wins: it is the one to report
        adapters = build_adapters(scheduler, paths)
        residency = build_residency(
            scheduler, planned, settings, paths, hardware.hardware, sources=sources, on_loaded=lambda _: adapters.sync()
        )
        residency.start()
        embeddings = build_embeddings(settings, paths)
        app = create_app(
            scheduler,
            settings,
            request_log,
            adapters,
            hardware,
            paths=paths,
            sources=sources,
            responses=responses,
            embeddings=embeddings,
            residency=residency,
        )
        server = make_server(
            app,
            scheduler,
            log_level=settings.log_level,
            header_timeout=settings.header_timeout,
            drain_timeout=settings.shutdown_timeout,
            stop_work=stop_work,
        )
        host, port = sockets[0].getsockname()[:2]
        where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        if settings.socket:
            where += f" and unix:{settings.socket}"
        log.info("serving %s on %s", ", ".join(scheduler.model_ids), where)
        if settings.api_key:
            log.info("API key required on /v1 routes")
        served = True
        server.run(sockets=sockets)
    finally:
        stop_work()
        if request_log is not None:
            request_log.close()  # after the scheduler: the last exchanges' records are in by then
        if responses is not None:
            responses.close()
        for sock in sockets:
            sock.close()
        if unix is not None:
            unix.close()
        if served:
            log.info("stopped")
