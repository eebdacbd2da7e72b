"""Loading and unloading at runtime with real models: the default model serves and streams while a
second GGUF (Gemma 3 270M, registered by reference) is loaded on demand, used, unloaded and removed.

Figures (time to first token cold and warm, memory after unload, gaps in the other stream) come from
``benchmarks/on_demand.py``; these tests hold the behaviour, with bounds loose enough for a busy box.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from appliance.cli import main
from tests.conftest import DEFAULT_MODEL

GEMMA = "gemma3-270m"


def states(base_url: str) -> dict[str, str]:
    return {m["id"]: m["state"] for m in httpx.get(base_url + "/v1/models", timeout=10).json()["data"]}


def rss(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss)


def test_a_second_model_loads_on_demand_and_unloads_while_the_first_streams(
    start_server: Any, gemma_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import openai

    os.environ["APPLIANCE_HOME"] = str(tmp_path / "server-home")
    assert main(["models", "import", str(gemma_model_path), "--link", "--id", GEMMA]) == 0
    server = start_server("--parallel", "2", "--ctx-size", "1024")
    url = server.base_url
    api = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    assert states(url) == {DEFAULT_MODEL: "loaded", GEMMA: "not_loaded"}
    for _ in range(2):  # warm: the first requests' one-time costs are not the model's
        api.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=8)
    baseline = rss(server.process.pid)

    stamps: list[float] = []
    finish: list[Any] = []

    def stream() -> None:
        chunks = api.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Tell a long story about a dragon."}],
            max_tokens=200,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in chunks:
            stamps.append(time.monotonic())
            finish.append(chunk)

    streamer = threading.Thread(target=stream)
    streamer.start()
    while len(stamps) < 20 and streamer.is_alive():
        time.sleep(0.01)
    started = time.monotonic()
    answer = api.completions.create(model=GEMMA, prompt="The capital of France is", max_tokens=8, temperature=0)
    loaded_in = time.monotonic() - started
    streamer.join(120)
    text = answer.choices[0].text
    assert text.strip() and answer.model == GEMMA
    # the stream on the first model went on through the load, to its full length
    usage = finish[-1].usage
    assert usage is not None and usage.completion_tokens == 200
    assert [c for c in finish if c.choices][-1].choices[0].finish_reason == "length"
    during = [b - a for a, b in itertools.pairwise(stamps) if started <= b <= started + loaded_in]
    assert during, "the stream sent nothing while the second model loaded"
    # never held for the load (which runs at low priority); BENCHMARKS has the figure: max 21 ms against 12 ms
    assert max(during) < 0.5, (max(during), loaded_in)
    assert states(url) == {DEFAULT_MODEL: "loaded", GEMMA: "loaded"}
    state = httpx.get(f"{url}/v1/appliance/models/{GEMMA}/state").json()
    assert state["keep_alive_seconds"] == 300 and state["device"] == "cpu" and state["memory_bytes"] > 100e6
    assert state["load_seconds"] > 0

    # ps: both, with their plans
    capsys.readouterr()
    assert main(["ps", "--url", url, "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {DEFAULT_MODEL, GEMMA} and rows[GEMMA]["memory_bytes"] > 100e6

    # refused while loaded; the CLI says how
    assert main(["models", "remove", GEMMA, "--url", url]) == 1
    assert "unload it first" in capsys.readouterr().err

    loaded = rss(server.process.pid)
    assert main(["unload", GEMMA, "--url", url]) == 0
    assert f"{GEMMA}: not loaded" in capsys.readouterr().out
    assert states(url) == {DEFAULT_MODEL: "loaded", GEMMA: "not_loaded"}
    for _ in range(2):
        api.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=8)
    after = rss(server.process.pid)
    assert after < loaded - 150e6  # Gemma's weights and KV cache are gone
    assert after < baseline * 1.10, (baseline, loaded, after)  # the benchmark shows within 5 %

    # asked for again, it loads again and answers the same
    again = api.completions.create(model=GEMMA, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert again.choices[0].text == text
    assert main(["load", GEMMA, "--url", url]) == 0  # already loaded: says so
    assert f"{GEMMA}: loaded" in capsys.readouterr().out

    # --force unloads, then removes; the linked file stays where it is
    assert main(["models", "remove", GEMMA, "--force", "--url", url]) == 0
    assert gemma_model_path.is_file()
    assert states(url) == {DEFAULT_MODEL: "loaded"}
    gone = httpx.post(url + "/v1/completions", json={"model": GEMMA, "prompt": "Hi"}, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert api.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=4).usage.completion_tokens == 4


def test_keep_alive_unloads_even_the_first_model_and_a_request_brings_it_back(start_server: Any) -> None:
    import openai

    server = start_server("--parallel", "1", "--ctx-size", "512", "--keep-alive", "1s")
    url = server.base_url
    api = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    first = api.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    deadline = time.monotonic() + 30
    while states(url)[DEFAULT_MODEL] != "not_loaded" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert states(url)[DEFAULT_MODEL] == "not_loaded"
    assert server.health()["models"] == []  # nothing loaded, the server still healthy
    again = api.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    log = "".join(server.output)
    assert "past its keep_alive: unloading" in log and "loading smollm2-135m-instruct on demand" in log


def test_the_loader_refuses_what_would_not_fit_before_loading_anything(gemma_model_path: Path, app_home: Path) -> None:
    """The composition root's own loader, with real files: the plan decides, nothing is loaded."""
    from appliance.bootstrap import on_demand_loader
    from appliance.config import Settings, app_paths
    from appliance.generation import ModelUnavailableError
    from appliance.hardware.detect import detect
    from appliance.hardware.facts import MIB

    assert main(["models", "import", str(gemma_model_path), "--link", "--id", GEMMA]) == 0
    hardware = detect(15, cache_file=app_paths().cache_dir / "engines-probe.json")
    small = hardware.model_copy(update={"cpu": hardware.cpu.model_copy(update={"ram_available": 900 * MIB})})
    load = on_demand_loader(Settings(ctx_size=8192, parallel=4), app_paths(), small)
    before = rss(os.getpid())
    with pytest.raises(ModelUnavailableError) as refused:
        load(GEMMA, [])
    assert refused.value.code == "insufficient_memory"
    assert f"not enough memory to load '{GEMMA}'" in str(refused.value) and "unload" in str(refused.value)
    assert rss(os.getpid()) < before + 50e6  # refused before the weights were read


def test_a_moved_linked_file_is_reported_with_how_to_relink_it(
    default_model_path: Path, app_home: Path, tmp_path: Path
) -> None:
    import shutil

    from appliance.bootstrap import on_demand_loader
    from appliance.config import Settings, app_paths
    from appliance.generation import ModelUnavailableError
    from appliance.hardware.detect import detect

    copy = tmp_path / "elsewhere" / "mine.gguf"
    copy.parent.mkdir()
    shutil.copyfile(default_model_path, copy)
    assert main(["models", "import", str(copy), "--link", "--id", "mine"]) == 0
    copy.rename(copy.with_name("moved.gguf"))
    hardware = detect(15, cache_file=app_paths().cache_dir / "engines-probe.json")
    with pytest.raises(ModelUnavailableError) as gone:
        on_demand_loader(Settings(), app_paths(), hardware)("mine", [])
    assert gone.value.code == "model_unavailable"
    assert "which is gone (moved or deleted)" in str(gone.value)
    assert "appliance models import NEW-PATH --link --id mine" in str(gone.value)
