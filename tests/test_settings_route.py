"""``/v1/appliance/settings`` reads and writes config.toml the way ``--serve`` reads it.

In-process, around an empty scheduler: no model is needed to read or save settings. Each test
checks the file through ``load_settings``, the same function the server starts with, so a value
the route accepts is one the next start accepts.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.config import Paths, Settings, load_settings, load_settings_with_sources
from appliance.scheduler import Scheduler

URL = "/v1/appliance/settings"
API_KEY = "secret-key-1234"


@pytest.fixture
def paths(app_home: Path) -> Paths:
    return Paths(app_home)


def _client(paths: Paths, settings: Settings | None = None, sources: dict[str, str] | None = None) -> TestClient:
    app = create_app(Scheduler(), settings or Settings(), paths=paths, sources=sources)
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


@pytest.fixture
def http(paths: Paths) -> Iterator[TestClient]:
    with _client(paths) as client:
        yield client


def _by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in body["settings"]}


def test_describes_every_setting_with_schema_facts(http: TestClient, paths: Paths) -> None:
    resp = http.get(URL)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["file"] == str(paths.config_file)
    assert body["file_error"] is None
    settings = _by_name(body)
    assert list(settings) == list(Settings.model_fields)
    port = settings["port"]
    assert (port["type"], port["minimum"], port["maximum"], port["value"], port["default"]) == (
        "integer",
        0,
        65535,
        8484,
        8484,
    )
    assert port["description"] == Settings.model_fields["port"].description
    assert settings["ctx_size"]["nullable"] and settings["ctx_size"]["minimum"] == 128
    assert settings["device"]["choices"] == ["auto", "cpu", "cuda", "rocm", "metal", "vulkan"]
    assert settings["log_level"]["choices"] == ["debug", "info", "warning", "error"]  # from its pattern
    assert settings["speculative"]["choices"] == ["off", "prompt-lookup", "auto"]
    assert settings["speculative"]["nullable"]
    assert settings["probe_timeout"]["exclusive_minimum"] == 0 and settings["probe_timeout"]["type"] == "number"
    assert (settings["lora_dirs"]["type"], settings["lora_dirs"]["items"], settings["lora_dirs"]["format"]) == (
        "array",
        "string",
        "path",
    )
    assert settings["flash_attn"]["type"] == "boolean"
    assert all(s["source"] is None and not s["in_file"] for s in settings.values())  # no sources given: unknown


def test_reports_sources_and_file_values(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    paths.home.mkdir(parents=True)
    paths.config_file.write_text("[server]\nthreads = 3\nmax_queue = 9\n")
    monkeypatch.setenv("APPLIANCE_MAX_QUEUE", "12")
    settings, sources = load_settings_with_sources(paths)
    with _client(paths, settings, sources) as client:
        info = _by_name(client.get(URL).json())
    assert (info["threads"]["value"], info["threads"]["file_value"], info["threads"]["source"]) == (
        3,
        3,
        "config.toml server.threads",
    )
    assert (info["max_queue"]["value"], info["max_queue"]["file_value"], info["max_queue"]["source"]) == (
        12,
        9,
        "APPLIANCE_MAX_QUEUE",
    )
    assert info["port"]["source"] == "default" and not info["port"]["in_file"]


def test_write_lands_in_the_file_and_in_a_fresh_load(http: TestClient, paths: Paths) -> None:
    resp = http.put(URL, json={"values": {"threads": 4, "device": "cpu", "allowed_hosts": ["box.lan"]}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["values"] == {"threads": 4, "device": "cpu", "allowed_hosts": ["box.lan"]}
    assert body["restart_required"] is True
    assert set(body["changed"]) == set(body["restart_settings"]) == {"threads", "device", "allowed_hosts"}
    assert tomllib.loads(paths.config_file.read_text())["server"]["threads"] == 4
    fresh = load_settings(paths)
    assert (fresh.threads, fresh.device, fresh.allowed_hosts) == (4, "cpu", ("box.lan",))
    info = _by_name(http.get(URL).json())
    assert info["threads"]["in_file"] and info["threads"]["file_value"] == 4
    assert info["threads"]["value"] is None  # the running value changes only with a restart


def test_null_removes_a_setting_and_nothing_changed_writes_nothing(http: TestClient, paths: Paths) -> None:
    http.put(URL, json={"values": {"threads": 4, "port": 9000}})
    resp = http.put(URL, json={"values": {"threads": None}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["values"] == {"port": 9000} and resp.json()["changed"] == ["threads"]
    assert load_settings(paths).threads is None
    before = paths.config_file.stat().st_mtime_ns
    again = http.put(URL, json={"values": {"port": 9000}}).json()
    assert again["changed"] == [] and again["restart_required"] is False
    assert paths.config_file.stat().st_mtime_ns == before


def test_a_bad_value_is_a_400_naming_the_setting(http: TestClient, paths: Paths) -> None:
    resp = http.put(URL, json={"values": {"threads": 0}})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "threads" and error["code"] == "invalid_setting"
    assert error["message"] == "threads = 0: must be at least 1"
    assert not paths.config_file.exists()


def test_a_rule_across_settings_names_the_file_value(http: TestClient, paths: Paths) -> None:
    http.put(URL, json={"values": {"parallel": 200}})
    resp = http.put(URL, json={"values": {"batch_size": 128}})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "batch_size (128) must be at least parallel (200)" in message
    assert f"{paths.config_file}: [server].parallel = 200" in message  # the wording of a server start
    assert load_settings(paths).batch_size is None


def test_unknown_setting_suggests_the_close_one(http: TestClient) -> None:
    resp = http.put(URL, json={"values": {"thread": 4}})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["message"] == "unknown setting 'thread' (did you mean threads?)"
    assert (error["param"], error["code"]) == ("thread", "unknown_setting")


def test_a_broken_file_is_reported_not_overwritten(http: TestClient, paths: Paths) -> None:
    paths.home.mkdir(parents=True)
    paths.config_file.write_text("[server]\nthredas = 4\n")
    report = http.get(URL).json()
    assert "did you mean threads?" in report["file_error"]
    resp = http.put(URL, json={"values": {"port": 9000}})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_config_file"
    assert paths.config_file.read_text() == "[server]\nthredas = 4\n"


def test_the_api_key_is_written_never_returned(paths: Paths) -> None:
    settings = Settings(api_key=API_KEY)
    with _client(paths, settings, {"api_key": "--api-key"}) as client:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert client.get(URL).status_code == 401
        report = client.get(URL, headers=auth)
        assert API_KEY not in report.text
        key = _by_name(report.json())["api_key"]
        assert key["secret"] and key["is_set"] and key["value"] is None
        new_key = "another-key-5678"
        saved = client.put(URL, json={"values": {"api_key": new_key}}, headers=auth)
        assert saved.status_code == 200, saved.text
        assert new_key not in saved.text and API_KEY not in saved.text
        assert saved.json()["secrets_set"] == ["api_key"] and saved.json()["overridden"] == {"api_key": "--api-key"}
        again = client.get(URL, headers=auth)
        assert new_key not in again.text and _by_name(again.json())["api_key"]["in_file"]
        short = client.put(URL, json={"values": {"api_key": "short"}}, headers=auth)
        assert short.status_code == 400 and "short" not in short.json()["error"]["message"]
    assert load_settings(paths).api_key == new_key
    assert stat.S_IMODE(os.stat(paths.config_file).st_mode) & 0o077 == 0  # a file holding a key is private


def test_other_keys_of_the_file_survive(http: TestClient, paths: Paths) -> None:
    paths.home.mkdir(parents=True)
    paths.config_file.write_text('[server]\nlog_level = "debug"\nmodels = ["a", "b"]\n')
    resp = http.put(URL, json={"values": {"port": 9001}})
    assert resp.status_code == 200, resp.text
    table = tomllib.loads(paths.config_file.read_text())["server"]
    assert table == {"log_level": "debug", "models": ["a", "b"], "port": 9001}
    assert list(paths.home.iterdir()) == [paths.config_file]  # no temporary file left behind


def test_without_a_home_the_route_says_so() -> None:
    with TestClient(create_app(Scheduler(), Settings()), base_url="http://localhost") as client:
        resp = client.get(URL)
    assert resp.status_code == 404 and "home" in resp.json()["error"]["message"]
