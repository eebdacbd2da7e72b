"""What the request log costs: aggregate tokens/s with logging on vs ``--no-log``, in one run.

    python benchmarks/log_overhead.py                 # N = 8 streaming clients, 5 rounds
    python benchmarks/log_overhead.py --clients 32 --rounds 3

Both servers run at once with the same flags (an idle one takes no CPU) and take turns in every
round; the ratio of the median rounds is printed. The target is at most 3% slower with the log.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrent_streams import measure, one_stream
from vs_llama_server import MODEL_ID, free_port, running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    variants: dict[str, list[str]] = {"log on": [], "--no-log": ["--no-log"]}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, extra in variants.items():  # each with its own home, so its own log
            port = free_port()
            cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--threads", str(args.threads),
                   "--parallel", "8", "--log-level", "warning", *extra]  # fmt: skip
            home = {"APPLIANCE_HOME": tempfile.mkdtemp(prefix="bench-log-")}
            base = stack.enter_context(running(name, cmd, port, home))
            clients[name] = OpenAI(base_url=base, api_key="bench", max_retries=0, timeout=900)
            one_stream(clients[name], MODEL_ID, [{"role": "user", "content": "Hi"}], 4)
        for r in range(args.rounds):
            for name, client in clients.items():
                summary = measure(client, MODEL_ID, args.clients, args.max_tokens)
                assert summary.errors == 0 and summary.all_whole, summary.first_error
                rates[name].append(summary.tokens_per_s)
                print(f"round {r + 1}  {name:9s} {summary.line()}", flush=True)
    on, off = (statistics.median(rates[name]) for name in variants)
    print(
        f"\nmedian tok/s: log on {on:.1f}, --no-log {off:.1f}; log on / off = {on / off:.3f} "
        f"({(1 - on / off) * 100:+.1f}% cost)"
    )


if __name__ == "__main__":
    main()
