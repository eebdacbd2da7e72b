"""Every command of the README, run against a live server in a temporary home, in the README's order.

The README's fenced ``bash`` and ``python`` blocks are extracted and run one after the other, as a
reader would, so the README cannot drift from the program. A block the test cannot run (it installs,
needs the internet, root or a GPU) says so in a comment just above it, ``<!-- readme-test: not run:
why -->``, and is listed in ``NOT_RUN`` below, so a new one is a decision made here, not an accident.

What the test changes, and only that: the server is a live one on a free port (the README's
``127.0.0.1:8484`` and ``/run/appliance.sock`` point at it; ``APPLIANCE_PORT`` lets the CLI's
``ps``/``load``/``unload`` find it); ``/srv/models/qwen2.5-0.5b-instruct-q4_k_m.gguf``, the file
the not-run download would fetch, is a copy of the default model; ``~/llm-models`` holds the second
GGUF (Gemma 3 270M). An ``appliance serve`` line is run until it says it is serving, then stopped
(``--port 0`` added). Each block must exit 0 and print no OpenAI error body.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LiveServer, _start

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*not run:\s*(?P<why>.+?)\s*-->")
# The blocks not run, by their first line, with why (each also says so in the README above it).
NOT_RUN = {
    "pip install . && appliance --serve": "the first command: installs; CI's command installs the same way",
    'pip install ".[test]" && python -m pytest': "CI's own command, which runs this test",
    "curl -L -o qwen2.5-0.5b-instruct-q4_k_m.gguf \\": "needs the internet",
    'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36    # NVIDIA': (
        "needs a GPU toolkit"
    ),
    'pip install -e ".[gui,build]" && python packaging/build.py': "tests/packaging builds and runs the executable",
    "sudo useradd --system --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance": (
        "needs root and systemd; tests/test_service_unit.py checks the unit"
    ),
}
SERVE = re.compile(
    r"^(?P<env>(?:[A-Z_]+=(?:\$\([^)]*\)|\S+)\s+)*)appliance (?P<cmd>serve|--serve)\b(?P<rest>[^#]*)(?P<comment>#.*)?$"
)


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # where it starts in the README, for messages
    not_run: str | None  # why, if the README marks it


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        mark = MARK.search(lines[start - 1]) if start else None
        found.append(Block(fence.group(1), "\n".join(body), start + 1, mark.group("why") if mark else None))
    return [b for b in found if b.language in ("bash", "python")]


def test_every_block_is_run_or_says_why_not() -> None:
    listed = {b.code.splitlines()[0]: b.not_run for b in blocks(README.read_text()) if b.not_run is not None}
    assert set(listed) == set(NOT_RUN), "a README block is marked not run without being listed here, or the reverse"
    assert all(why and len(why) > 10 for why in listed.values())


@pytest.fixture(scope="module")
def reader(
    tmp_path_factory: pytest.TempPathFactory, default_model_path: Path, gemma_model_path: Path
) -> Iterator[tuple[LiveServer, dict[str, str], Path]]:
    """A reader's machine: a home, a live server on it, the files the README's commands name."""
    root = tmp_path_factory.mktemp("readme")
    user = root / "user"
    (user / "llm-models").mkdir(parents=True)
    os.symlink(gemma_model_path, user / "llm-models" / gemma_model_path.name)
    srv = root / "srv-models"
    srv.mkdir()
    shutil.copyfile(default_model_path, srv / "qwen2.5-0.5b-instruct-q4_k_m.gguf")
    home = root / "home"
    server = _start(home, ["--socket", str(root / "appliance.sock"), "--parallel", "2", "--ctx-size", "1024"])
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(user),
        "APPLIANCE_HOME": str(home),
        "APPLIANCE_PORT": str(server.port),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(README.parent),
    }
    try:
        yield server, env, root
    finally:
        server.stop()


def prepared(block: Block, server: LiveServer, root: Path) -> str:
    """The block as the test runs it: the README's addresses and paths pointed at the test's."""
    code = block.code.replace("127.0.0.1:8484", f"127.0.0.1:{server.port}").replace(
        "localhost:8484", f"localhost:{server.port}"
    )
    code = code.replace("/run/appliance.sock", str(root / "appliance.sock"))
    code = code.replace("/srv/models", str(root / "srv-models"))
    if block.language == "bash":
        lines = []
        for line in code.splitlines():
            match = SERVE.match(line.strip())
            if match:  # run until it serves, then stop it
                line = f"{match['env']}{sys.executable} -m tests.test_readme serve-check {match['rest'].strip()}"
            lines.append(line)
        code = "\n".join(lines)
    return code


def test_every_readme_command_works(reader: tuple[LiveServer, dict[str, str], Path]) -> None:
    server, env, root = reader
    ran = 0
    for block in blocks(README.read_text()):
        if block.not_run is not None:
            continue
        code = prepared(block, server, root)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
        shown = f"README line {block.line}:\n{textwrap.indent(code, '  ')}\n"
        shown += f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        assert done.returncode == 0, shown
        assert '{"error":' not in done.stdout.replace(" ", ""), shown
        ran += 1
    assert ran >= 10
    # what the commands did, seen from the server: the imported and linked models, and the last state
    states = {
        m["id"]: m["state"] for m in __import__("httpx").get(server.base_url + "/v1/models", timeout=10).json()["data"]
    }
    assert states.get("gemma-3-270m-q4_k_m") == "not_loaded"  # loaded, then unloaded by the README
    assert "qwen0.5b" not in states  # removed by the README


def serve_check(args: list[str]) -> int:
    """``appliance serve ARGS`` until it says it is serving (on a free port), then SIGTERM; its exit status."""
    cmd = [sys.executable, "-m", "appliance", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    served = False
    for line in proc.stdout:
        sys.stdout.write(line)
        match = re.search(r"serving .* on (http://\S+)", line)
        if match:
            import httpx

            url = match.group(1).replace("0.0.0.0", "127.0.0.1")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not served:
                try:
                    served = httpx.get(url + "/health", timeout=2).status_code == 200
                except httpx.TransportError:
                    time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    return 0 if served and code == 0 else 1


if __name__ == "__main__" and sys.argv[1:2] == ["serve-check"]:
    sys.exit(serve_check(sys.argv[2:]))
