"""``GET /v1/appliance/hardware/live``: a typed sample of the machine's load, behind the API key."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api.hardware import HardwareLive
from appliance.config import Settings
from appliance.scheduler import Scheduler

LIVE = "/v1/appliance/hardware/live"


@pytest.fixture
def http() -> Iterator[TestClient]:
    with TestClient(create_app(Scheduler(), Settings()), base_url="http://localhost") as client:
        yield client


def test_sample_has_cpu_ram_and_the_server_process(http: TestClient) -> None:
    resp = http.get(LIVE)
    assert resp.status_code == 200, resp.text
    sample = HardwareLive.model_validate(resp.json())
    assert len(sample.cpu_per_core) == psutil.cpu_count()
    assert all(0.0 <= p <= 100.0 for p in sample.cpu_per_core)
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert 0 < sample.ram_used <= sample.ram_total == psutil.virtual_memory().total
    assert 0 < sample.process_rss < sample.ram_total
    assert sample.gpus is None  # not measured yet: null, not "no GPU"


def test_successive_samples_advance(http: TestClient) -> None:
    first = HardwareLive.model_validate(http.get(LIVE).json())
    second = HardwareLive.model_validate(http.get(LIVE).json())
    assert second.time >= first.time


def test_needs_the_api_key_when_one_is_set() -> None:
    app = create_app(Scheduler(), Settings(api_key="live-key-1234"))
    with TestClient(app, base_url="http://localhost") as http:
        assert http.get(LIVE).status_code == 401
        ok = http.get(LIVE, headers={"Authorization": "Bearer live-key-1234"})
        assert ok.status_code == 200 and "cpu_percent" in ok.json()
