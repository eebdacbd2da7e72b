"""Loading and unloading at runtime, fast tier: the real scheduler, residency and API over the fake engine.

The loader is the test's (the composition root's own, which plans against the machine's memory,
is exercised by tests/test_residency_live.py with real models); the registry is a real
models.toml in the test's home, so ``/v1/models`` and the routes resolve ids as they do in use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Settings, parse_duration
from appliance.generation import ModelUnavailableError
from appliance.hardware.planner import ModelPlan
from appliance.residency import Residency, Resident
from appliance.scheduler import ModelRunner, RunnerConfig, Scheduler
from engines.base import BatchItem, LoadOptions
from tests.engines.fake import FakeEngine, FakeModel, write_model

ANSWERS = {"first": "I am the first model.", "second": "I am the second model.", "huge": "never"}


class SlowModel(FakeModel):
    """The fake model, with each decode step taking ``step`` seconds (a real model's pace, roughly)."""

    step = 0.0

    def decode(self, items: Sequence[BatchItem], adapters: Any = ()) -> list[list[int]]:
        time.sleep(self.step)
        return super().decode(items, adapters)


class Loads:
    """The test's loader: counts loads, can hold one at a gate, refuses ``huge`` as the planner would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count: dict[str, int] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.keep_alive: float | None = 300.0
        self.step = 0.0

    def __call__(self, model_id: str, loaded: Sequence[ModelPlan]) -> Resident:
        self.count[model_id] = self.count.get(model_id, 0) + 1
        self.gate.wait(30)
        if model_id == "huge":
            raise ModelUnavailableError(
                model_id, "huge: not enough memory to load 'huge': it needs 9 GiB", code="insufficient_memory"
            )
        model = SlowModel(self.folder / f"{model_id}.json", LoadOptions(n_ctx_per_slot=1024, n_slots=2))
        model.step = self.step
        runner = ModelRunner(model_id, model, RunnerConfig(n_batch=64))
        return Resident(runner, None, (f"{model_id}-alias",), self.keep_alive)


@pytest.fixture
def setup(app_home: Path) -> Iterator[tuple[Any, Any, Residency, Loads]]:
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from appliance.api.app import create_app
    from appliance.bootstrap import chat_lookup
    from appliance.config import app_paths

    app_home.mkdir(parents=True, exist_ok=True)
    folder = app_home / "models"
    folder.mkdir()
    entries = []
    for name, answer in ANSWERS.items():
        write_model(folder / f"{name}.json", answer)
        entries.append(f'[models.{name}]\nengine = "gguf"\npath = "{name}.json"\naliases = ["{name}-alias"]\n')
    (app_home / "models.toml").write_text("\n".join(entries))
    loads = Loads(folder)
    scheduler = Scheduler()
    first = FakeEngine().load(folder / "first.json", LoadOptions(n_ctx_per_slot=1024, n_slots=2))
    scheduler.add(ModelRunner("first", first, RunnerConfig(n_batch=64)))
    residency = Residency(scheduler, chat_lookup(app_paths()), loads, poll_seconds=0.05)
    residency.adopt(Resident(scheduler.resolve("first"), None, ()))
    app = create_app(scheduler, Settings(), paths=app_paths(), residency=residency)
    try:
        with TestClient(app, base_url="http://localhost") as http:
            api = OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http, max_retries=0)
            yield http, api, residency, loads
    finally:
        residency.close()
        scheduler.stop()


def ask(api: Any, model: str, **kw: Any) -> Any:
    return api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Who are you?"}], **{"temperature": 0, **kw}
    )


def states(http: Any) -> dict[str, str]:
    """The test's models' states in /v1/models (the built-in default model is registered too)."""
    return {m["id"]: m["state"] for m in http.get("/v1/models").json()["data"] if m["id"] in ANSWERS}


def test_a_request_loads_a_registered_model_once(setup: tuple[Any, Any, Residency, Loads]) -> None:
    http, api, residency, loads = setup
    assert states(http) == {"first": "loaded", "second": "not_loaded", "huge": "not_loaded"}
    card = http.get("/v1/models/second").json()
    assert (card["id"], card["state"]) == ("second", "not_loaded")
    loads.gate.clear()  # hold the load while several requests wait for it
    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(ask(api, "second-alias").choices[0].message.content))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while residency.status("second").state != "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert states(http)["second"] == "loading"
    # the loaded model answers at once while the other loads
    assert ask(api, "first").choices[0].message.content == ANSWERS["first"]
    loads.gate.set()
    for t in threads:
        t.join(30)
    assert answers == [ANSWERS["second"]] * 4
    assert loads.count == {"second": 1}  # one load, every waiting request served by it
    assert states(http)["second"] == "loaded"
    state = http.post("/v1/appliance/models/second/state".replace("/state", "/load")).json()
    assert state["state"] == "loaded" and state["keep_alive_seconds"] == 300 and state["load_seconds"] >= 0
    assert loads.count == {"second": 1}  # already loaded: nothing done


def test_a_model_that_does_not_fit_is_a_503_and_the_others_go_on(setup: tuple[Any, Any, Residency, Loads]) -> None:
    http, api, residency, _ = setup
    resp = http.post("/v1/chat/completions", json={"model": "huge", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 503
    error = resp.json()["error"]
    assert error["code"] == "insufficient_memory" and "not enough memory" in error["message"]
    assert error["param"] == "model"
    assert residency.status("huge").state == "not_loaded"
    assert "not enough memory" in (residency.status("huge").last_error or "")
    resp = http.post("/v1/appliance/models/huge/load")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "insufficient_memory"
    assert ask(api, "first").choices[0].message.content == ANSWERS["first"]


def test_unknown_names_are_404s(setup: tuple[Any, Any, Residency, Loads]) -> None:
    http, _, _, _ = setup
    for resp in (
        http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        http.post("/v1/appliance/models/nope/load"),
        http.post("/v1/appliance/models/nope/unload"),
        http.get("/v1/models/nope"),
    ):
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "model_not_found"
    message = http.post("/v1/appliance/models/nope/load").json()["error"]["message"]
    assert all(name in message for name in ANSWERS)


def test_unload_waits_for_running_requests_then_frees(setup: tuple[Any, Any, Residency, Loads]) -> None:
    http, api, residency, loads = setup
    loads.step = 0.02  # about 0.5 s for the answer
    assert http.post("/v1/appliance/models/second/load").json()["state"] == "loaded"
    runner = residency.status("second")
    assert runner.state == "loaded"
    stream = ask(api, "second", stream=True)
    first_chunk = next(iter(stream))
    assert first_chunk.choices[0].delta.role == "assistant"
    unloaded: list[Any] = []
    unloader = threading.Thread(target=lambda: unloaded.append(http.post("/v1/appliance/models/second/unload")))
    unloader.start()
    time.sleep(0.1)
    assert residency.status("second").state == "unloading"
    assert not unloaded  # still waiting for the stream
    rest = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert text == ANSWERS["second"] and rest[-1].choices[0].finish_reason == "stop"  # never cut
    unloader.join(10)
    assert unloaded[0].status_code == 200 and unloaded[0].json()["state"] == "not_loaded"
    assert states(http)["second"] == "not_loaded"
    assert http.post("/v1/appliance/models/second/unload").json()["state"] == "not_loaded"  # again: nothing to do
    # asked for again, it loads again
    assert ask(api, "second").choices[0].message.content == ANSWERS["second"]
    assert loads.count == {"second": 2}


def test_a_request_during_an_unload_waits_and_reloads(setup: tuple[Any, Any, Residency, Loads]) -> None:
    http, api, residency, loads = setup
    loads.step = 0.02
    ask(api, "second")
    stream = ask(api, "second", stream=True)
    next(iter(stream))
    unloader = threading.Thread(target=lambda: http.post("/v1/appliance/models/second/unload"))
    unloader.start()
    time.sleep(0.1)
    assert residency.status("second").state == "unloading"
    answer = ask(api, "second").choices[0].message.content  # waits for the unload, then loads it again
    list(stream)
    unloader.join(10)
    assert answer == ANSWERS["second"] and loads.count == {"second": 2}


def test_keep_alive_unloads_an_idle_model(setup: tuple[Any, Any, Residency, Loads]) -> None:
    http, api, residency, loads = setup
    loads.keep_alive = 0.3
    residency.start()
    ask(api, "second")
    assert states(http)["second"] == "loaded"
    deadline = time.monotonic() + 10
    while residency.status("second").state != "not_loaded" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert states(http) == {"first": "loaded", "second": "not_loaded", "huge": "not_loaded"}  # first stays


def test_keep_alive_never_unloads_a_busy_model(setup: tuple[Any, Any, Residency, Loads]) -> None:
    _, api, residency, loads = setup
    loads.keep_alive, loads.step = 0.0, 0.05
    ask(api, "second", max_tokens=1)
    stream = ask(api, "second", stream=True)
    next(iter(stream))
    assert residency.expire() == []  # busy: kept, whatever its keep_alive
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWERS["second"]
    assert residency.expire() == ["second"]


def test_a_detached_model_answers_503_to_retry_not_404() -> None:
    scheduler = Scheduler()
    model = FakeModel(write_model(Path(__import__("tempfile").mkdtemp()) / "m.json"), LoadOptions(512, 1))
    scheduler.add(ModelRunner("m", model), aliases=("alias",))
    runner = scheduler.detach("m")
    for name in ("m", "alias"):
        with pytest.raises(ModelUnavailableError) as caught:
            scheduler.resolve(name)
        assert caught.value.code == "model_unloading" and caught.value.retry_after == 1
    assert not scheduler.routes("m")
    runner.stop()
    scheduler.forget("m")
    assert scheduler.model_ids == [] and not scheduler.routes("alias")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), ("300", 300.0), ("30s", 30.0), ("0", 0.0), (45, 45.0), ("2.5m", 150.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("forever", ["-1", "forever", "never", -1, None])
def test_forever(forever: str | int | None) -> None:
    assert parse_duration(forever) is None


@pytest.mark.parametrize("bad", ["5 minutes", "", "m", "1d"])
def test_bad_durations_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(bad)
