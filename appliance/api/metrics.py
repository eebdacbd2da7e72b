"""Prometheus ``/metrics``: the scheduler's counters, read at scrape time.

A custom collector reads ``Scheduler.stats()`` when Prometheus scrapes, so the decode loop pays
nothing per token for metrics and each app instance has its own registry (no global state).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from appliance.requestlog.writer import RequestLog
from appliance.scheduler import RunnerStats, Scheduler

# (stats field, metric name without the appliance_ prefix, help); counters get _total from the client
COUNTERS = (
    ("requests_total", "requests", "Requests accepted into the wait queue."),
    ("rejected_total", "requests_rejected", "Requests refused with 503 because the wait queue was full."),
    ("timeouts_total", "queue_timeouts", "Requests that waited longer than the queue timeout."),
    ("prompt_tokens_total", "prompt_tokens", "Prompt tokens of finished requests."),
    ("cached_prompt_tokens_total", "prompt_tokens_cached", "Prompt tokens served from the prefix cache."),
    ("cache_hits_total", "prefix_cache_hits", "Requests that reused a cached prompt prefix."),
    ("completion_tokens_total", "completion_tokens", "Generated tokens of finished requests."),
    ("draft_tokens_total", "draft_tokens", "Speculative draft tokens verified."),
    ("draft_accepted_total", "draft_tokens_accepted", "Speculative draft tokens accepted."),
)
GAUGES = (
    ("slots", "slots", "Sequence slots of the model."),
    ("active", "slots_active", "Slots generating or prefilling now."),
    ("queued", "queue_depth", "Requests waiting for a slot."),
    ("tokens_per_second", "tokens_per_second", "Generated tokens per second over the last 10 s."),
)


LOG_COUNTERS = (
    ("written", "log_records_written", "Request log records committed to the database."),
    ("dropped", "log_records_dropped", "Request log records dropped because the buffer was full."),
    ("failed", "log_records_failed", "Request log records that could not be written in any form."),
    ("refusals_not_logged", "log_refusals_not_logged", "Refused requests beyond the log's rate, counted only."),
)


class SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler, request_log: RequestLog, refusals: Counter[str] | None = None) -> None:
        self._scheduler = scheduler
        self._log = request_log
        self._refusals = refusals if refusals is not None else Counter()

    def collect(self) -> Iterator[Metric]:
        stats: list[RunnerStats] = self._scheduler.stats()
        for field, name, doc in COUNTERS:
            counter = CounterMetricFamily(f"appliance_{name}", doc, labels=["model"])
            for s in stats:
                counter.add_metric([s.model], float(getattr(s, field)))
            yield counter
        for field, name, doc in GAUGES:
            gauge = GaugeMetricFamily(f"appliance_{name}", doc, labels=["model"])
            for s in stats:
                gauge.add_metric([s.model], float(getattr(s, field)))
            yield gauge
        refused = CounterMetricFamily(
            "appliance_requests_refused",
            "Requests refused at the edge (host, origin, content type, size, pace, body shape), by code.",
            labels=["code"],
        )
        for code, n in sorted(self._refusals.items()):
            refused.add_metric([code], float(n))
        yield refused
        status = self._log.status()
        if status["enabled"]:
            for field, name, doc in LOG_COUNTERS:
                yield CounterMetricFamily(f"appliance_{name}", doc, value=float(status[field]))
            yield GaugeMetricFamily(
                "appliance_log_records_pending", "Request log records not yet committed.", value=status["pending"]
            )
            yield GaugeMetricFamily(
                "appliance_log_healthy",
                "1 when the request log is writable and its writer runs.",
                value=float(status["error"] is None),
            )


def metrics_registry(
    scheduler: Scheduler, request_log: RequestLog, refusals: Counter[str] | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(scheduler, request_log, refusals))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
