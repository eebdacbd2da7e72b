"""The Server screen: is it running, where, how to call it; start, stop, and exposing it to the LAN.

Exposing the server to the network without an API key would let anyone there use it (and read the
request log), so it is refused until a key is set, as ``--host`` is on the command line. With a
key, the GUI restarts its server on all interfaces and shows the address others use.
"""

from __future__ import annotations

from typing import Any

import psutil
from PySide6.QtCore import QTimer

from gui.client import ApiClient, ApiError
from gui.server_process import ManagedServer
from gui.viewmodels.base import ScreenViewModel

LAN_PORT = 8484
POLL_MS = 2000


def lan_address() -> str | None:
    """This machine's first IPv4 address that is not the loopback, if any."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family.name == "AF_INET" and not address.address.startswith("127."):
                return str(address.address)
    return None


class ServerViewModel(ScreenViewModel):
    title = "Server"

    def __init__(self, client: ApiClient, managed: ManagedServer | None = None) -> None:
        super().__init__(client)
        self.managed = managed
        self.health: dict[str, Any] | None = None
        self.listening: dict[str, Any] = {}  # host, port, socket, api_key (set or not), as the server runs
        self.api_key = ""
        self.exposed = False
        self.state = "starting" if managed is not None else "connected"
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.refresh)
        if managed is not None:
            managed.ready.connect(self._ready)
            managed.failed.connect(self._failed)

    @property
    def url(self) -> str:
        return self.client.base_url

    @property
    def lan_url(self) -> str | None:
        if not self.exposed:
            return None
        address = lan_address()
        return f"http://{address}:{LAN_PORT}" if address else None

    def snippets(self) -> dict[str, str]:
        url = self.lan_url or self.url
        model = (self.health or {}).get("models", [{}])[0].get("model", "MODEL") if self.health else "MODEL"
        key = self.api_key or "unused-on-localhost"
        auth = f" -H 'Authorization: Bearer {self.api_key}'" if self.api_key and self.exposed else ""
        return {
            "curl": (
                f"curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\\n"
                f'  -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
            ),
            "python": (
                "from openai import OpenAI\n\n"
                f'client = OpenAI(base_url="{url}/v1", api_key="{key}")\n'
                "reply = client.chat.completions.create(\n"
                f'    model="{model}", messages=[{{"role": "user", "content": "Hello!"}}]\n'
                ")\nprint(reply.choices[0].message.content)"
            ),
        }

    # -- polling while the screen is shown -------------------------------------------------

    def activate(self, visible: bool) -> None:
        if visible:
            self.refresh()
            self._timer.start()
        else:
            self._timer.stop()

    def refresh(self) -> None:
        if self.busy:
            return  # one poll in flight at most
        self.call(self._poll, self._got, notify_loaded=True)

    def _poll(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The health, and once the listening settings (host, port, socket, key) the server runs with."""
        health = self.client.health()
        if self.listening:
            return health, None
        try:
            report = self.client.settings()
        except ApiError:  # an older server, or one whose home is unknown: the address is all there is
            return health, {}
        running = {s["name"]: s for s in report.get("settings", [])}
        return health, {
            "host": running.get("host", {}).get("value"),
            "port": running.get("port", {}).get("value"),
            "socket": running.get("socket", {}).get("value"),
            "api_key": running.get("api_key", {}).get("is_set"),
        }

    def _got(self, result: tuple[dict[str, Any], dict[str, Any] | None]) -> None:
        health, listening = result
        if listening is not None:
            self.listening = listening
        self._got_health(health)

    def _got_health(self, health: dict[str, Any]) -> None:
        self.health = health
        if self.state in ("starting", "stopped", "failed") or self.state.startswith("failed"):
            self.state = "running"

    # -- the managed server ------------------------------------------------------------------

    def _ready(self, url: str) -> None:
        self.client.reconnect(url, self.api_key if self.exposed else None)
        self.listening = {}
        self.state = "running"
        self.changed.emit()
        self.refresh()

    def _failed(self, reason: str) -> None:
        self.state = f"failed: {reason}"
        self.health = None
        self.error.emit(reason)
        self.changed.emit()

    def start(self) -> None:
        if self.managed is not None and not self.managed.running:
            self.state = "starting"
            self.managed.start()
            self.changed.emit()

    def stop(self) -> None:
        if self.managed is not None:
            self.managed.stop()
            self.state, self.health = "stopped", None
            self.changed.emit()

    def set_exposed(self, exposed: bool) -> bool:
        """Serve on every interface (needs an API key) or on the loopback only; False if refused."""
        if exposed and len(self.api_key.strip()) < 8:
            self.last_error = (
                "Set an API key of at least 8 characters first: without one, anyone on your network could use "
                "the models and read the request log."
            )
            self.error.emit(self.last_error)
            self.changed.emit()
            return False
        if self.managed is None:
            self.last_error = "This window is attached to a server it did not start: change its address there."
            self.error.emit(self.last_error)
            return False
        self.exposed = exposed
        self.managed.stop()
        extra = ["--host", "0.0.0.0", "--port", str(LAN_PORT), "--api-key", self.api_key.strip()] if exposed else []
        self.managed = _restarted(self.managed, extra, self)
        self.state, self.last_error = "starting", None
        self.changed.emit()
        return True


def _restarted(old: ManagedServer, extra: list[str], vm: ServerViewModel) -> ManagedServer:
    server = ManagedServer(old._home, extra)
    server.setParent(old.parent())
    server.ready.connect(vm._ready)
    server.failed.connect(vm._failed)
    server.start()
    return server
