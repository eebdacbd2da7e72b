"""Time to first token over TCP and over the Unix socket, measured against one server in one run.

    python benchmarks/ttft_transport.py --requests 50      # the Reliability figures
    python benchmarks/ttft_transport.py --requests 10      # a dry run

One server (``--port 0 --threads 2 --socket HOME/appliance.sock``, the default model) in a fresh
``APPLIANCE_HOME``. One client per transport, each on a kept-alive connection, take turns
(TCP, socket, TCP, socket ...), one request at a time, so machine drift hits both alike. For a
streamed chat (max_tokens 8, temperature 0, the same prompt every time, so the prefix cache
makes the model's share small and constant) it times the first body byte and the first content
delta; for ``GET /health`` the round trip. Printed: median and p95 per transport and the ratio
socket / TCP of the medians; the last line holds every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import MODEL_ID, NO_LOG, median, percentile, start_server

BODY = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
    "max_tokens": 8,
    "temperature": 0,
    "stream": True,
}
METRICS = ("first_byte_ms", "first_content_ms", "stream_total_ms", "health_ms")


def timed_stream(client: httpx.Client) -> tuple[float, float | None, float]:
    """Milliseconds to the first body byte, to the first non-empty content delta (None: none came), to the end."""
    start = time.perf_counter()
    first_byte = first_content = 0.0
    with client.stream("POST", "/v1/chat/completions", json=BODY, headers=NO_LOG) as response:
        response.raise_for_status()
        buffer = b""
        for piece in response.iter_raw():
            if not first_byte:
                first_byte = time.perf_counter() - start
            if first_content:
                continue  # drain the rest
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                choices = json.loads(data).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first_content = time.perf_counter() - start
                    break
    total = time.perf_counter() - start
    return first_byte * 1000, first_content * 1000 if first_content else None, total * 1000


def timed_health(client: httpx.Client) -> float:
    start = time.perf_counter()
    client.get("/health").raise_for_status()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="per transport and per request kind")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ttft-") as tmp:
        home = Path(tmp) / "home"
        sock = home / "appliance.sock"
        server = start_server(home, "--socket", str(sock))
        try:
            clients = {
                "tcp": httpx.Client(base_url=server.base_url, timeout=60, trust_env=False),
                "socket": httpx.Client(
                    base_url="http://localhost", transport=httpx.HTTPTransport(uds=str(sock)), timeout=60
                ),
            }
            for _ in range(args.warmup):
                for client in clients.values():
                    timed_stream(client)
                    timed_health(client)
            times: dict[str, dict[str, list[float]]] = {t: {m: [] for m in METRICS} for t in clients}
            for _ in range(args.requests):
                for transport, client in clients.items():  # interleaved: TCP, socket, TCP, socket ...
                    first_byte, first_content, total = timed_stream(client)
                    times[transport]["first_byte_ms"].append(first_byte)
                    if first_content is not None:
                        times[transport]["first_content_ms"].append(first_content)
                    times[transport]["stream_total_ms"].append(total)
                for transport, client in clients.items():
                    times[transport]["health_ms"].append(timed_health(client))
            for client in clients.values():
                client.close()
        finally:
            exit_code = server.stop()
    summary: dict[str, Any] = {"requests": args.requests, "server_exit_code": exit_code}
    print(f"{args.requests} requests per transport and kind; medians and p95 in ms\n")
    print(f"{'':18s} {'TCP p50':>9s} {'TCP p95':>9s} {'sock p50':>9s} {'sock p95':>9s} {'sock/TCP':>9s}")
    for metric in METRICS:
        row = {t: (median(times[t][metric]), percentile(times[t][metric], 0.95)) for t in clients}
        ratio = row["socket"][0] / row["tcp"][0] if row["tcp"][0] else float("nan")
        summary[metric] = {
            "tcp_p50": round(row["tcp"][0], 2),
            "tcp_p95": round(row["tcp"][1], 2),
            "socket_p50": round(row["socket"][0], 2),
            "socket_p95": round(row["socket"][1], 2),
            "socket_over_tcp": round(ratio, 3),
        }
        print(
            f"{metric:18s} {row['tcp'][0]:9.1f} {row['tcp'][1]:9.1f} {row['socket'][0]:9.1f} "
            f"{row['socket'][1]:9.1f} {ratio:9.2f}"
        )
    print(f"\nserver exit code {exit_code} after SIGTERM; {len(server.problems)} WARNING/ERROR lines")
    for line in server.problems[:10]:
        print(f"  {line[:300]}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
