"""LoRA adapters on the running scheduler, with real adapters on the real default model.

An adapter changes the answers, scale 0 gives back the base exactly, selection by model id and
by the ``lora`` field agree, and mixed traffic never lets one request's adapters touch another's
tokens: every answer equals the one the request gets alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.bootstrap import base_resolver, build_scheduler
from appliance.config import Paths, Settings
from appliance.generation import GenerationRequest, UnknownAdapterError, UnknownModelError
from appliance.lora.store import AdapterStore
from appliance.lora.sync import AdapterSync
from appliance.scheduler import Scheduler
from engines.base import ChatMessage
from tests.conftest import DEFAULT_MODEL
from tests.loras import write_lora

PROMPTS = ["Tell me about the sea.", "What is a CPU?", "Name three fruits.", "Describe a cat."]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, default_model_path: Path
) -> Iterator[tuple[Scheduler, AdapterSync]]:
    home = tmp_path_factory.mktemp("home")
    paths = Paths(home)
    sched = build_scheduler(Settings(ctx_size=1024, threads=2, parallel=8, prefix_cache=False), paths)
    sync = AdapterSync(AdapterStore(paths), sched, base_resolver(paths))
    src = tmp_path_factory.mktemp("src")
    for name, seed in (("pirate", 1), ("poet", 2)):
        sync.add(write_lora(src / f"{name}.gguf", default_model_path, seed=seed), base=DEFAULT_MODEL, name=name)
    yield sched, sync
    sched.stop()


def req(
    text: str, model: str = DEFAULT_MODEL, lora: tuple[tuple[str, float], ...] = (), n: int = 24
) -> GenerationRequest:
    return GenerationRequest(
        model, {"temperature": 0.0}, messages=(ChatMessage("user", text),), max_tokens=n, adapters=lora
    )


async def answer(sched: Scheduler, request: GenerationRequest) -> str:
    text, finish = await (await sched.submit(request)).collect()
    assert finish.finish_reason in ("stop", "length"), finish
    return text


def solo(sched: Scheduler, request: GenerationRequest) -> str:
    return asyncio.run(answer(sched, request))


def test_an_adapter_changes_the_answer_and_scale_zero_restores_the_base(served: tuple[Scheduler, AdapterSync]) -> None:
    sched, _ = served
    base = solo(sched, req(PROMPTS[0]))
    pirate = solo(sched, req(PROMPTS[0], f"{DEFAULT_MODEL}:pirate"))
    poet = solo(sched, req(PROMPTS[0], f"{DEFAULT_MODEL}:poet"))
    assert len({base, pirate, poet}) == 3
    assert solo(sched, req(PROMPTS[0], lora=(("pirate", 1.0),))) == pirate  # the same by the lora field
    assert solo(sched, req(PROMPTS[0], f"{DEFAULT_MODEL}:pirate", (("pirate", 0.0),))) == base
    assert solo(sched, req(PROMPTS[0], lora=(("pirate", 0.0), ("poet", 0.0)))) == base
    both = solo(sched, req(PROMPTS[0], lora=(("pirate", 1.0), ("poet", 1.0))))
    assert both not in (base, pirate, poet)
    # half the scale is a third answer (on one prompt of two: a short answer may not show it)
    halves = [
        (
            solo(sched, req(p, lora=(("pirate", 0.5),))),
            solo(sched, req(p)),
            solo(sched, req(p, lora=(("pirate", 1.0),))),
        )
        for p in PROMPTS[:2]
    ]
    assert any(half not in (b, full) for half, b, full in halves)


def test_mixed_traffic_gives_every_request_its_solo_answer(served: tuple[Scheduler, AdapterSync]) -> None:
    sched, _ = served
    models = [DEFAULT_MODEL, f"{DEFAULT_MODEL}:pirate", DEFAULT_MODEL, f"{DEFAULT_MODEL}:poet"]
    requests = [req(p, m) for p in PROMPTS for m in models[:2]] + [req(PROMPTS[1], models[3], n=40)]
    requests.append(req(PROMPTS[2], lora=(("pirate", 0.7), ("poet", 0.3))))
    alone = [solo(sched, r) for r in requests]

    async def together() -> list[str]:
        return list(await asyncio.gather(*(answer(sched, r) for r in requests)))

    model = sched.resolve(DEFAULT_MODEL).model
    kinds_per_call: list[int] = []  # how many adapter choices (the base counting as one) each call held

    def counting(items: Any, adapters: Any = ()) -> Any:
        kinds_per_call.append(len({tuple((a.name, s) for a, s in item.adapters) for item in items}))
        return type(model).decode(model, items, adapters)

    model.decode = counting  # type: ignore[method-assign]
    try:
        assert asyncio.run(together()) == alone
    finally:
        del model.decode
    # the base and both adapters decode in the same calls (engines/ggufmixer.py)
    assert model.facts.mixes_adapters and max(kinds_per_call) >= 3


def test_unknown_adapters_are_refused_by_name(served: tuple[Scheduler, AdapterSync]) -> None:
    sched, _ = served
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct:pirate"):
        solo(sched, req("hi", f"{DEFAULT_MODEL}:nobody"))
    with pytest.raises(UnknownAdapterError, match=r"'nobody' is not loaded.*pirate, poet"):
        solo(sched, req("hi", lora=(("nobody", 1.0),)))
    assert sched.resolve(DEFAULT_MODEL).stats().active == 0


def test_removal_waits_for_the_requests_using_it(
    served: tuple[Scheduler, AdapterSync], tmp_path: Path, default_model_path: Path
) -> None:
    sched, sync = served
    sync.add(write_lora(tmp_path / "brief.gguf", default_model_path, seed=3), base=DEFAULT_MODEL)
    model = f"{DEFAULT_MODEL}:brief"

    async def scenario() -> None:
        gen = await sched.submit(req(PROMPTS[0], model, n=60))
        events = gen.events()
        await anext(events)  # it is generating with the adapter
        (gone,) = await asyncio.to_thread(sync.remove, "brief")
        assert not gone.is_set()  # still in use
        with pytest.raises(UnknownModelError):  # but refused to anyone new
            await sched.submit(req("hi", model))
        async for _ in events:
            pass
        assert gen.finish is not None and gen.finish.finish_reason == "length"
        await asyncio.to_thread(gone.wait, 10)
        assert gone.is_set()

    asyncio.run(scenario())
    assert "brief" not in sched.resolve(DEFAULT_MODEL).adapters()
    assert [m for m, _, _ in sched.adapter_models()] == [f"{DEFAULT_MODEL}:pirate", f"{DEFAULT_MODEL}:poet"]
