"""The systemd unit of the README's "Running as a service" (packaging/appliance.service) works.

CI runs without systemd as init, so the unit is checked the two ways that need none: ``systemd-analyze
verify`` reads it as systemd would (where the tool is installed), and its ``ExecStart`` is run as
written, with its ``Environment`` (the home pointed at a temporary folder, the port at a free one), then
stopped with its ``KillSignal``: it must serve, and drain and exit 0 within ``TimeoutStopSec``.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "appliance.service"
INSTALLED = "/opt/appliance/venv/bin/appliance"  # where the README's install steps put it


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def here_instead(text: str) -> str:
    """The unit with this environment's ``appliance`` in place of the one the README installs."""
    appliance = shutil.which("appliance", path=str(Path(sys.executable).parent)) or shutil.which("appliance")
    assert appliance, "the appliance command is not installed"
    return text.replace(INSTALLED, appliance)


def test_the_readme_installs_this_unit_where_its_exec_start_expects() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "packaging/appliance.service /etc/systemd/system/appliance.service" in readme
    assert "/opt/appliance/venv/bin/pip install ." in readme
    service = unit()["Service"]
    assert shlex.split(service["ExecStart"])[0] == INSTALLED
    assert service["User"] == "appliance" and service["StateDirectory"] == "appliance"
    assert service["Environment"] == "APPLIANCE_HOME=/var/lib/appliance"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_reads_the_unit_without_a_complaint(tmp_path: Path) -> None:
    copy = tmp_path / "appliance.service"
    copy.write_text(here_instead(UNIT.read_text()))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "appliance.service" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_its_exec_start_serves_and_stops_cleanly(tmp_path: Path) -> None:
    service = unit()["Service"]
    name, _, value = service["Environment"].partition("=")
    assert (name, value) == ("APPLIANCE_HOME", "/var/lib/appliance")
    env = {**os.environ, name: str(tmp_path / "var-lib-appliance"), "APPLIANCE_PORT": "0", "PYTHONUNBUFFERED": "1"}
    command = shlex.split(here_instead(service["ExecStart"]))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    output = []
    url = None
    for line in proc.stdout:
        output.append(line)
        match = re.search(r"serving .* on (http://\S+)", line)
        if match:
            url = match.group(1)
            break
    assert url, "".join(output)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    answer = httpx.post(
        url + "/v1/completions",
        json={"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code == 200
    proc.send_signal(getattr(signal, service["KillSignal"]))
    assert proc.wait(float(service["TimeoutStopSec"])) == 0
    assert (tmp_path / "var-lib-appliance" / "requests.sqlite").exists()  # its state went to its home
