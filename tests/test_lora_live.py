"""LoRA adapters on a live server, through the official ``openai`` client and plain HTTP.

An adapter added to a running server (by path, by upload, or by the CLI beside it) answers at
once; a wrong file is refused with what is wrong and changes nothing; removal waits for the
stream using it; the adapter list survives a restart; the request log records adapters used.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, LiveServer
from tests.loras import targets, write_lora

openai = pytest.importorskip("openai")
PIRATE = f"{DEFAULT_MODEL}:pirate"


def ask(client: openai.OpenAI, model: str, **extra: object) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=20,
        temperature=0,
        extra_body=extra or None,
    )
    assert reply.model == model
    return reply.choices[0].message.content or ""


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"APPLIANCE_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "lora", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_adapters_on_a_running_server(
    start_server: Callable[..., LiveServer], tmp_path: Path, default_model_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pirate = write_lora(src / "pirate.gguf", default_model_path, seed=1)
    home = tmp_path / "server-home"
    added = cli(home, "add", str(pirate), "--base", DEFAULT_MODEL)
    assert added.returncode == 0, added.stderr
    assert PIRATE in added.stdout

    server = start_server("--parallel", "4", "--lora-dir", str(src))
    url = server.base_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    models = {m.id: m for m in client.models.list().data}
    assert models[PIRATE].model_extra == {"parent": DEFAULT_MODEL, "state": "loaded"}
    base = ask(client, DEFAULT_MODEL)
    by_id = ask(client, PIRATE)
    assert by_id != base
    assert ask(client, DEFAULT_MODEL, lora=[{"name": "pirate", "scale": 1.0}]) == by_id
    assert ask(client, PIRATE, lora=[{"name": "pirate", "scale": 0}]) == base

    # refused clearly: unknown names, bad scales, a model id that does not exist
    bad = httpx.post(
        url + "/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "lora": [{"name": "nope"}]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "lora_not_found"
    bad = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "lora": [{"name": "pirate", "scale": "x"}],
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora.0.scale"
    with pytest.raises(openai.NotFoundError):
        ask(client, f"{DEFAULT_MODEL}:nope")

    # hot add by path: usable at once, and the time to its first token
    poet = write_lora(src / "poet.gguf", default_model_path, seed=2)
    started = time.monotonic()
    made = httpx.post(url + "/v1/appliance/loras", json={"path": str(poet), "base": DEFAULT_MODEL}, timeout=60)
    assert made.status_code == 201, made.text
    assert made.json()["loaded"] is True and made.json()["id"] == f"{DEFAULT_MODEL}:poet"
    stream = client.chat.completions.create(
        model=f"{DEFAULT_MODEL}:poet", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    next(iter(stream))
    print(f"hot add + first token: {time.monotonic() - started:.3f} s")
    for _ in stream:
        pass

    # a wrong file, by upload: refused with the tensor and shapes, nothing changes
    wrong = write_lora(src / "wrong.gguf", default_model_path, tensors=targets(2), wrong_shape="blk.0.attn_q.weight")
    refused = httpx.post(
        url + "/v1/appliance/loras",
        params={"base": DEFAULT_MODEL, "name": "wrong"},
        content=wrong.read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    assert refused.status_code == 400
    assert "tensor blk.0.attn_q.weight: lora_a [640, 8]" in refused.json()["error"]["message"]
    names = [a["name"] for a in httpx.get(url + "/v1/appliance/loras").json()["data"]]
    assert names == ["pirate", "poet"]
    assert sorted(p.name for p in (home / "loras").glob("*.gguf")) == ["pirate.gguf", "poet.gguf"]

    # a good file by upload
    upload = write_lora(src / "up.gguf", default_model_path, seed=4, tensors=targets(10))
    made = httpx.post(
        url + "/v1/appliance/loras",
        params={"base": DEFAULT_MODEL, "name": "uploaded"},
        content=upload.read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    assert made.status_code == 201 and made.json()["loaded"], made.text
    assert ask(client, f"{DEFAULT_MODEL}:uploaded")

    # the CLI beside the running server: picked up by the store poll
    assert cli(home, "remove", "uploaded").returncode == 0
    deadline = time.monotonic() + 10
    while f"{DEFAULT_MODEL}:uploaded" in {m.id for m in client.models.list().data}:
        assert time.monotonic() < deadline, "the server did not notice the CLI's removal"
        time.sleep(0.2)

    # removal waits for the stream using it
    stream = client.chat.completions.create(
        model=PIRATE, messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=80, stream=True
    )
    chunks = iter(stream)
    next(chunks)
    deleted: list[httpx.Response] = []
    remover = threading.Thread(
        target=lambda: deleted.append(httpx.delete(url + "/v1/appliance/loras/pirate", timeout=60))
    )
    remover.start()
    time.sleep(0.5)
    assert not deleted  # still streaming
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    remover.join(30)
    assert deleted and deleted[0].json() == {"id": "pirate", "object": "lora", "deleted": True}
    assert text
    with pytest.raises(openai.NotFoundError):
        ask(client, PIRATE)

    # the request log knows which adapter answered
    logged = httpx.get(url + "/v1/appliance/logs", params={"adapter": "pirate"}).json()["data"]
    assert logged and all(r["adapters"][0]["name"] == "pirate" for r in logged)
    assert logged[0]["model"] == DEFAULT_MODEL

    # the list survives a restart
    assert server.stop() == 0
    again = start_server("--parallel", "2")
    ids = {m["id"] for m in httpx.get(again.base_url + "/v1/models").json()["data"]}
    assert ids == {DEFAULT_MODEL, f"{DEFAULT_MODEL}:poet"}
