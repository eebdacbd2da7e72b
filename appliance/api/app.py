"""The FastAPI application factory: routes, error mapping and the edge middleware, nothing else.

The app receives its collaborators (scheduler, settings, request log) ready-made from ``bootstrap``; it never
loads a model or reads configuration itself, so tests can build it around any scheduler.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping

from fastapi import FastAPI

from appliance import __version__
from appliance.api.edge import EdgeMiddleware, EdgePolicy
from appliance.api.embeddings import router as embeddings_router
from appliance.api.errors import install_error_handlers
from appliance.api.hardware import router as hardware_router
from appliance.api.logs import router as logs_router
from appliance.api.loras import router as loras_router
from appliance.api.metrics import metrics_registry
from appliance.api.models import router as models_router
from appliance.api.openapi import install_openapi
from appliance.api.recording import record_invalid
from appliance.api.requests import install as install_requests
from appliance.api.responses import router as responses_router
from appliance.api.routes import router, v1
from appliance.api.settings import router as settings_router
from appliance.config import Paths, Settings
from appliance.embedding import EmbeddingModels
from appliance.hardware.report import HardwareReport
from appliance.lora.sync import AdapterSync
from appliance.requestlog.writer import DisabledLog, RequestLog
from appliance.residency import Residency
from appliance.responses_store import ResponseStore
from appliance.scheduler import Scheduler


def create_app(
    scheduler: Scheduler,
    settings: Settings,
    request_log: RequestLog | None = None,
    loras: AdapterSync | None = None,
    hardware: HardwareReport | None = None,
    paths: Paths | None = None,
    sources: Mapping[str, str] | None = None,
    responses: ResponseStore | None = None,
    embeddings: EmbeddingModels | None = None,
    residency: Residency | None = None,
) -> FastAPI:
    app = FastAPI(
        title="LLM appliance",
        version=__version__,
        summary="A private, OpenAI-compatible endpoint for quantized open models.",
    )
    app.state.scheduler = scheduler
    app.state.settings = settings
    app.state.request_log = request_log or DisabledLog()
    app.state.loras = loras
    app.state.hardware = hardware
    app.state.paths = paths  # the home, whose config.toml the settings route reads and writes
    app.state.responses = responses or ResponseStore(None)  # /v1/responses' store; in memory without a home
    app.state.sources = sources  # where each setting came from (config.load_settings_with_sources), if known
    app.state.started = int(time.time())
    app.state.residency = residency  # loads and unloads chat models at runtime; without it, only those loaded serve
    app.state.embeddings = embeddings  # /v1/embeddings: the registered embedding models, each loaded on first use
    app.state.refusals = Counter()  # edge refusals by code, for /metrics
    app.state.metrics = metrics_registry(scheduler, app.state.request_log, app.state.refusals)
    app.include_router(router)
    app.include_router(v1)
    app.include_router(responses_router)
    app.include_router(embeddings_router)
    app.include_router(logs_router)
    app.include_router(loras_router)
    app.include_router(hardware_router)
    # routers of the desktop app's screens
    install_requests(app)  # its router, and the middleware that tags each request with its client
    app.include_router(settings_router)
    app.include_router(models_router)
    install_error_handlers(app, on_invalid=record_invalid)
    policy = EdgePolicy(
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        api_key=settings.api_key is not None,
        allowed_hosts=frozenset(h.strip().lower().rstrip(".") for h in settings.allowed_hosts),
        allowed_origins=frozenset(settings.allowed_origins),
        uploads={"/v1/appliance/loras": int(settings.max_upload_mb * (1 << 20))},
    )
    app.add_middleware(EdgeMiddleware, policy=policy, refusals=app.state.refusals)
    install_openapi(app)
    return app
