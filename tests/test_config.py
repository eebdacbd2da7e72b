"""Settings precedence (defaults < file < env < flags) and bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ConfigError, Paths, Settings, app_paths, load_settings


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
    with pytest.raises(ConfigError, match="parallel"):
        load_settings(Paths(app_home))
    monkeypatch.delenv("APPLIANCE_PARALLEL")
    with pytest.raises(ConfigError, match="no_such_option"):
        load_settings(Paths(app_home), {"no_such_option": 1})


def test_loopback_detection() -> None:
    assert Settings().is_loopback
    assert Settings(host="127.0.0.2").is_loopback
    assert not Settings(host="0.0.0.0").is_loopback
