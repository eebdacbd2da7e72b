"""The scheduler with the real model: queue bound, cancellation frees the slot, per-request params."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.generation import GenerationRequest, QueueFullError, TextEvent
from appliance.scheduler import Scheduler
from tests.conftest import DEFAULT_MODEL


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    settings = Settings(ctx_size=512, parallel=1, max_queue=1, threads=2)
    sched = build_scheduler(settings, Paths(tmp_path_factory.mktemp("home")))
    yield sched
    sched.stop()


def long_request(**kw: object) -> GenerationRequest:
    return GenerationRequest(
        model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", max_tokens=400, sampling={"temperature": 0.0}, **kw
    )  # type: ignore[arg-type]


def test_queue_full_is_refused_at_once(one_slot: Scheduler) -> None:
    async def scenario() -> None:
        running = await one_slot.submit(long_request())
        waiting = await one_slot.submit(long_request())
        started = time.monotonic()
        with pytest.raises(QueueFullError) as info:
            await one_slot.submit(long_request())
        assert time.monotonic() - started < 1.0
        assert info.value.retry_after >= 1
        running.cancel()
        _, finish = await waiting.collect()  # the waiting one gets the slot once it is freed
        assert finish.finish_reason == "length" and finish.completion_tokens == 400
        _, first = await running.collect()
        assert first.finish_reason == "cancelled"

    asyncio.run(scenario())


def test_cancel_frees_slot_promptly(one_slot: Scheduler) -> None:
    async def scenario() -> None:
        gen = await one_slot.submit(long_request())
        async for event in gen.events():
            if isinstance(event, TextEvent):
                gen.cancel()
                break
        deadline = time.monotonic() + 2
        while one_slot.stats()[0].active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert one_slot.stats()[0].active == 0

    asyncio.run(scenario())


def test_mixed_parameters_in_one_batch(tmp_path: Path) -> None:
    sched = build_scheduler(Settings(ctx_size=512, parallel=3, threads=2), Paths(tmp_path))
    try:

        async def scenario() -> None:
            base = {"model": DEFAULT_MODEL, "prompt": "1, 2, 3, 4,", "sampling": {"temperature": 0.0}}
            gens = await asyncio.gather(
                sched.submit(GenerationRequest(**base, max_tokens=5)),  # type: ignore[arg-type]
                sched.submit(GenerationRequest(**base, max_tokens=60, stop=(" 8",))),  # type: ignore[arg-type]
                sched.submit(
                    GenerationRequest(
                        model=DEFAULT_MODEL, prompt="Hello", max_tokens=30, sampling={"temperature": 1.0, "seed": 7}
                    )
                ),
            )
            results = await asyncio.gather(*(g.collect() for g in gens))
            (_, short), (stopped_text, stopped), (sampled_text, _) = results
            assert short.finish_reason == "length" and short.completion_tokens == 5
            assert stopped.finish_reason == "stop" and " 8" not in stopped_text and stopped_text.endswith("7,")
            again = await sched.submit(
                GenerationRequest(
                    model=DEFAULT_MODEL, prompt="Hello", max_tokens=30, sampling={"temperature": 1.0, "seed": 7}
                )
            )
            assert (await again.collect())[0] == sampled_text

        asyncio.run(scenario())
    finally:
        sched.stop()
