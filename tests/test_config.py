"""Settings precedence (defaults < file < env < flags) and bounds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.config import (
    DEFAULT_PORT,
    NON_SETTING_ENV,
    ConfigError,
    Paths,
    Settings,
    app_paths,
    load_settings,
    load_settings_with_sources,
)


def test_home_follows_env(app_home: Path) -> None:
    assert app_paths().home == app_home


def test_precedence(app_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app_home.mkdir(parents=True)
    (app_home / "config.toml").write_text("[server]\nport = 9001\nparallel = 2\nctx_size = 2048\n")
    paths = Paths(app_home)
    assert load_settings(paths).port == 9001
    monkeypatch.setenv("APPLIANCE_PORT", "9002")
    monkeypatch.setenv("APPLIANCE_MODELS", "a, b")
    settings = load_settings(paths, {"parallel": 3, "host": None})
    assert (settings.port, settings.parallel, settings.ctx_size) == (9002, 3, 2048)
    assert settings.models == ("a", "b")
    assert settings.host == "127.0.0.1"


def test_invalid_values_name_the_setting(app_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PARALLEL", "0")
    with pytest.raises(ConfigError, match="APPLIANCE_PARALLEL"):
        load_settings(Paths(app_home))
    monkeypatch.delenv("APPLIANCE_PARALLEL")
    with pytest.raises(ConfigError, match="no_such_option"):
        load_settings(Paths(app_home), {"no_such_option": 1})


def test_loopback_detection() -> None:
    assert Settings().is_loopback
    assert Settings(host="127.0.0.2").is_loopback
    assert not Settings(host="0.0.0.0").is_loopback


# --- issue 13: typos fail or warn, and every message says where the value was written -------------------


def _error(paths: Paths, overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(paths, overrides)
    return str(err.value)


def _config(app_home: Path, text: str) -> Paths:
    app_home.mkdir(parents=True, exist_ok=True)
    (app_home / "config.toml").write_text(text)
    return Paths(app_home)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[sever]\nport = 9001\n", "unknown table [sever] (did you mean [server]?)"),
        ("port = 9001\n[server]\n", "port is outside the [server] table (did you mean [server].port?)"),
        ("[server]\nprot = 9001\n", "unknown setting [server].prot (did you mean port?)"),
        ("[server]\nctx-size = 2048\n", "unknown setting [server].ctx-size (did you mean ctx_size?)"),
        ("[server]\nzzzz = 1\n", "unknown setting [server].zzzz (the settings are listed in docs/configuration.md"),
        ("server = 1\n", "server must be a table"),
    ],
)
def test_config_file_typos_fail_with_the_file_and_a_suggestion(app_home: Path, text: str, expected: str) -> None:
    paths = _config(app_home, text)
    with pytest.raises(ConfigError) as err:
        load_settings(paths)
    message = str(err.value)
    assert message.startswith(f"{paths.config_file}: ") and expected in message
    assert "\n" not in message


def test_every_unknown_key_is_reported_at_once(app_home: Path) -> None:
    paths = _config(app_home, "[server]\nprot = 1\nthread = 2\n[logs]\n")
    message = _error(paths)
    assert "[server].prot" in message and "[server].thread (did you mean threads?)" in message
    assert "[logs]" in message


def test_unknown_environment_variables_warn(
    app_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("APPLIANCE_PORTT", "9001")
    monkeypatch.setenv("APPLIANCE_NOTHING_LIKE_IT", "1")
    with caplog.at_level(logging.WARNING, logger="appliance.config"):
        settings = load_settings(Paths(app_home))
    assert settings.port == DEFAULT_PORT
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert warnings == [
        "APPLIANCE_NOTHING_LIKE_IT is not a setting and is ignored",
        "APPLIANCE_PORTT is not a setting and is ignored (did you mean APPLIANCE_PORT?)",
    ]
    caplog.clear()
    assert "APPLIANCE_HOME" in NON_SETTING_ENV
    monkeypatch.delenv("APPLIANCE_PORTT")
    monkeypatch.delenv("APPLIANCE_NOTHING_LIKE_IT")
    with caplog.at_level(logging.WARNING, logger="appliance.config"):
        load_settings(Paths(app_home))  # APPLIANCE_HOME is set by the fixture: not a setting, not warned about
    assert caplog.records == []


def test_a_bad_value_names_where_it_was_written(app_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _config(app_home, "[server]\nparallel = 0\n")
    message = _error(paths)
    assert message == f"{paths.config_file}: [server].parallel = 0: must be at least 1"
    monkeypatch.setenv("APPLIANCE_PARALLEL", "300")
    message = _error(paths)
    assert message == "APPLIANCE_PARALLEL=300: must be at most 256"
    message = _error(paths, {"parallel": -1})
    assert message == "--parallel -1: must be at least 1"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ('device = "gpu"', {}, "[server].device = \"gpu\": must be 'auto', 'cpu', 'cuda', 'rocm', 'metal' or 'vulkan'"),
        ('log_level = "loud"', {}, '[server].log_level = "loud": must be debug or info or warning or error'),
        ('port = "eighty"', {}, '[server].port = "eighty": must be a whole number'),
        ('models = "a"', {}, '[server].models = "a": must be a list'),
        ('log_redact = ["("]', {}, "[server].log_redact = [\"(\"]: '(' is not a valid regular expression"),
        ("", {"APPLIANCE_FLASH_ATTN": "maybe"}, "APPLIANCE_FLASH_ATTN=maybe: must be true or false"),
        ("", {"APPLIANCE_API_KEY": "short"}, "APPLIANCE_API_KEY=***: must be at least 8 characters long"),
        ("", {"APPLIANCE_LOG_REDACT": "a b\n("}, "APPLIANCE_LOG_REDACT='a b\\n(': '(' is not a valid"),
    ],
)
def test_bad_values_read_well(
    app_home: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], expected: str
) -> None:
    paths = _config(app_home, f"[server]\n{text}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    message = _error(paths)
    assert expected in message and "\n" not in message
    assert "short" not in message  # an API key is never repeated


def test_a_rule_across_settings_names_both_sources(app_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _config(app_home, "[server]\nparallel = 200\n")
    monkeypatch.setenv("APPLIANCE_BATCH_SIZE", "128")
    message = _error(paths)
    assert message.startswith("batch_size (128) must be at least parallel (200) (from ")
    assert "APPLIANCE_BATCH_SIZE=128" in message and "[server].parallel = 200" in message


def test_sources_say_where_each_value_came_from(app_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _config(app_home, "[server]\nthreads = 2\nport = 9001\nctx_size = 2048\n")
    monkeypatch.setenv("APPLIANCE_PORT", "9002")
    monkeypatch.setenv("APPLIANCE_PREFIX_CACHE", "off")
    settings, sources = load_settings_with_sources(
        paths, {"ctx_size": 1024, "log_requests": False, "host": None}, {"log_requests": "--no-log"}
    )
    assert (settings.threads, settings.port, settings.ctx_size, settings.prefix_cache) == (2, 9002, 1024, False)
    assert sources == {
        "threads": "config.toml server.threads",
        "port": "APPLIANCE_PORT",
        "prefix_cache": "APPLIANCE_PREFIX_CACHE",
        "ctx_size": "--ctx-size",
        "log_requests": "--no-log",
    }
    assert settings == load_settings(paths, {"ctx_size": 1024, "log_requests": False})  # Settings carry no sources


def test_every_setting_is_documented() -> None:
    """docs/configuration.md's table names every setting (its config key), so a new one cannot go unlisted."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert [name for name in Settings.model_fields if f"`{name}`" not in doc] == []
