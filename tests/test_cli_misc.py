"""Issue 13's CLI defects: closed pipes, --log-file after the subcommand, export outputs, doctor's exit status
and the sources it names, config mistakes as one line, the model's size, and the adapter name clash message."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import cli
from appliance.cli import main
from appliance.config import Paths, Settings
from appliance.hardware.facts import HardwareFacts
from appliance.lora.store import AdapterExistsError, AdapterStore
from appliance.requestlog.schema import connect
from appliance.requestlog.store import LogFilter, LogStore
from engines.ggufmeta import model_size, parameter_count, read_header, size_label
from tests.loras import write_lora
from tests.test_hardware_plan import cpu_build, machine
from tests.test_log_export import add, user


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    """A request log with two exchanges, the way the server leaves it (WAL mode, -wal file present)."""
    path = tmp_path / "log" / "requests.sqlite"
    path.parent.mkdir()
    store = LogStore(connect(path))
    add(store, "chatcmpl-a", messages=user("Hi"), answers=["Hello " * 2000])
    add(store, "chatcmpl-b", messages=user("Yo"), answers=["Hey"])
    store.close()
    return path


# --- a reader that goes away ------------------------------------------------------------------------------


def test_a_closed_pipe_ends_quietly(log_file: Path) -> None:
    """`appliance logs show ID | head` printed a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "appliance", "logs", "--log-file", str(log_file), "show", "chatcmpl-a"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == cli.SIGPIPE_EXIT


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:  # what a buffered stdout does when argparse has swallowed the write's error
        raise BrokenPipeError(32, "Broken pipe")


def test_every_command_handles_a_closed_pipe(log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["logs", "list", "--log-file", str(log_file)]) == cli.SIGPIPE_EXIT
    assert main(["models", "list"]) == cli.SIGPIPE_EXIT
    assert main(["--help"]) == cli.SIGPIPE_EXIT


# --- --log-file on either side of the subcommand -----------------------------------------------------------


@pytest.mark.parametrize("before", [True, False])
def test_log_file_goes_before_or_after_the_subcommand(
    log_file: Path, capsys: pytest.CaptureFixture[str], before: bool
) -> None:
    where = ["--log-file", str(log_file)]
    argv = ["logs", *where, "list"] if before else ["logs", "list", *where]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "chatcmpl-a" in out.out and "2 of 2 shown" in out.err


def test_log_file_after_the_subcommand_wins(log_file: Path) -> None:
    args = cli.build_parser().parse_args(["logs", "--log-file", "elsewhere", "stats", "--log-file", str(log_file)])
    assert args.log_file == log_file
    args = cli.build_parser().parse_args(["logs", "--log-file", str(log_file), "stats"])
    assert args.log_file == log_file


# --- export outputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["requests.sqlite-wal", "requests.sqlite", "requests.sqlite-shm"])
def test_exporting_onto_the_log_fails_in_one_line(
    log_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """`logs export -o HOME/requests.sqlite-wal` exited 0 and the exchanges in the WAL were lost."""
    monkeypatch.chdir(log_file.parent.parent)
    before = {p.name: p.read_bytes() for p in log_file.parent.iterdir()}
    out = Path("log", "..", "log", name)  # relative, and through ".."
    assert main(["logs", "--log-file", str(log_file), "export", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"appliance: error: {out} is the request log") and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in log_file.parent.iterdir()} == before
    store = LogStore.open(log_file)
    assert store.count(LogFilter()) == 2
    store.close()


def test_exporting_to_a_directory_fails_in_one_line(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["logs", "export", "--log-file", str(log_file), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"appliance: error: {tmp_path} is a directory: give a file to export to, such as {tmp_path / 'export.jsonl'}\n"
    )


def test_an_unwritable_export_fails_in_one_line(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    assert main(["logs", "export", "--log-file", str(log_file), "-o", str(tmp_path / "a-file" / "x.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("appliance: error: cannot write ") and err.count("\n") == 1


# --- doctor -------------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_machine(monkeypatch: pytest.MonkeyPatch) -> HardwareFacts:
    """The CI box as its probes recorded it: a 2-core EPYC and a CPU-only llama.cpp build."""
    caps = cpu_build()
    facts = machine(dataclasses.replace(caps, providers=tuple(caps.providers)))  # a tuple, as the field is typed
    monkeypatch.setattr("appliance.doctor.detect", lambda timeout: facts)
    return facts


def test_doctor_exits_1_when_a_model_cannot_be_served_as_asked(
    cpu_machine: HardwareFacts, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--device", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "cannot be served as asked: --device cuda: no CUDA GPU usable here" in out
    assert main(["doctor", "--device", "cuda", "--json"]) == 1
    assert '"error": "--device cuda: no CUDA GPU usable here"' in capsys.readouterr().out
    assert main(["doctor"]) == 0


def test_doctor_names_where_an_override_came_from(
    cpu_machine: HardwareFacts, app_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `threads = 2` in config.toml was shown as `--threads`."""
    app_home.mkdir(parents=True)
    (app_home / "config.toml").write_text("[server]\nthreads = 2\nctx_size = 2048\n")
    monkeypatch.setenv("APPLIANCE_PARALLEL", "3")
    assert main(["doctor", "--batch-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "[override: config.toml server.threads]" in out
    assert "[override: config.toml server.ctx_size]" in out
    assert "[override: APPLIANCE_PARALLEL]" in out
    assert "[override: --batch-size]" in out
    assert "[override: --threads]" not in out
    assert main(["doctor", "--threads", "2", "--model", "smollm2-135m-instruct"]) == 0
    assert "[override: --threads]" in capsys.readouterr().out


def test_doctor_names_the_source_in_its_advice(
    cpu_machine: HardwareFacts, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_THREADS", "64")
    assert main(["doctor"]) == 0
    assert "APPLIANCE_THREADS 64 is more than the 2 usable cores" in capsys.readouterr().out


def test_every_irregular_flag_name_is_the_parsers() -> None:
    """The sources name a setting's flag; each must be one the serve parser really has."""
    parser = cli.build_parser()
    serve = next(
        a
        for a in parser._actions
        if isinstance(a, argparse._SubParsersAction)  # argparse has no public way to its subparsers
    ).choices["serve"]
    spellings: dict[str, set[str]] = {}  # a setting may have two flags (--allowed-origin, --cors-origins)
    for action in serve._actions:
        if action.dest in Settings.model_fields:
            spellings.setdefault(action.dest, set()).update(action.option_strings)
    for dest, flags in spellings.items():
        assert cli.FLAGS.get(dest, "--" + dest.replace("_", "-")) in flags, dest


# --- configuration mistakes on the command line ---------------------------------------------------------------


@pytest.mark.parametrize("command", [["doctor"], ["serve"], ["logs", "list"]])
def test_a_config_typo_is_one_line_and_exit_1(
    app_home: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    app_home.mkdir(parents=True)
    (app_home / "config.toml").write_text("[sever]\nport = 9001\n")
    assert main(command) == 1
    err = capsys.readouterr().err
    assert err == f"appliance: error: {app_home / 'config.toml'}: unknown table [sever] (did you mean [server]?)\n"


def test_an_unknown_variable_is_one_warning_line(app_home: Path) -> None:
    env = {**os.environ, "APPLIANCE_THREAD": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "logs", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    warning, error = done.stderr.splitlines()
    assert warning == "APPLIANCE_THREAD is not a setting and is ignored (did you mean APPLIANCE_THREADS?)"
    assert error.startswith(f"appliance: error: no request log at {app_home / 'requests.sqlite'}")


# --- the model's size -------------------------------------------------------------------------------------


def test_the_default_model_is_135m_not_256m(default_model_path: Path) -> None:
    """llama.cpp's description guesses from the layer count: 30 layers made SmolLM2-135M "llama 256M"."""
    header = read_header(default_model_path)
    assert parameter_count(header) == 134_515_008
    assert header.metadata["general.size_label"] == "135M"  # the converter's label agrees
    assert model_size(default_model_path) == "llama 135M"


@pytest.mark.parametrize(
    ("count", "label"),
    [
        (134_515_008, "135M"),
        (494_032_768, "494M"),
        (1_543_714_304, "1.5B"),
        (7_000_000_000, "7B"),
        (70_553_706_496, "71B"),
    ],
)
def test_size_labels(count: int, label: str) -> None:
    assert size_label(count) == label


# --- the adapter name clash, over HTTP and on the command line -------------------------------------------------


def test_an_existing_adapter_name_is_not_told_to_use_a_flag(
    app_home: Path, tmp_path: Path, default_model_path: Path
) -> None:
    """A 409 over HTTP said "pick --name", a flag the HTTP client does not have."""
    adapter = write_lora(tmp_path / "bot.gguf", default_model_path, seed=1)
    store = AdapterStore(Paths(app_home))
    store.add(adapter, base="m", base_file=default_model_path)
    with pytest.raises(AdapterExistsError) as err:
        store.add(adapter, base="m", base_file=default_model_path)
    assert str(err.value) == (
        "an adapter named 'bot' already exists on this server; remove it first or choose another name"
    )


def test_doctor_runs_an_onnx_file_through_onnxruntime(capsys: pytest.CaptureFixture[str]) -> None:
    """``doctor --onnx-model``: one inference on inputs of ones (onnxruntime's own sigmoid test model)."""
    import importlib.util
    import json

    from appliance.cli import main

    spec = importlib.util.find_spec("onnxruntime")
    assert spec and spec.submodule_search_locations
    model = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "sigmoid.onnx"
    assert main(["doctor", "--onnx-model", str(model), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["provider"] == "CPUExecutionProvider"  # never the remote Azure provider
    assert check["outputs"] == [{"name": "y", "type": "tensor(float)", "shape": [3, 4, 5]}]
    assert check["first_values"][0] == pytest.approx(0.7310586)
    assert main(["doctor", "--onnx-model", str(model)]) == 0
    assert "ran on CPUExecutionProvider" in capsys.readouterr().out


@pytest.mark.parametrize(("content", "message"), [(None, "does not exist"), (b"not a model", "cannot load it")])
def test_doctor_says_why_an_onnx_file_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    from appliance.cli import main

    model = tmp_path / "model.onnx"
    if content is not None:
        model.write_bytes(content)
    assert main(["doctor", "--onnx-model", str(model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("appliance: error: cannot load model file") and message in err
