"""Contract tests with the real client libraries, as users call them, offline against the real server.

Clients: ``openai`` (float, base64, dimensions, token-id arrays, models), langchain-nvidia-ai-endpoints
``NVIDIAEmbeddings``, llama-index-embeddings-nvidia ``NVIDIAEmbedding``, nvidia-haystack's embedders; plus a
replay of the requests these clients were recorded sending (``../shared/contracts``).

Two servers serve the bundled MiniLM's export under the name ``embed-assets`` (the recordings' name): a
*prompted* copy (``query: `` / ``passage: `` prompts, no API key: the clients' placeholder tokens must pass),
so every test also shows the client sent the right ``input_type``; and the plain export behind an API key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest

from embed_assets_tests.conftest_serving import exported_minilm, running_server
from embed_assets_tests.test_serving_contract import prompted_copy

NAME = "embed-assets"
KEY_ENV = "EMBED_ASSETS_CLIENTS_KEY"
KEY = "clients-key-61e0"
# ../shared beside the checkout (as in CI), unless EMBED_ASSETS_SHARED points elsewhere.
SHARED = Path(os.environ.get("EMBED_ASSETS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CONTRACTS = SHARED / "contracts" / "nim_client_requests.jsonl"
QUERY = "how do I stop a coroutine?"
DOCS = ["A coroutine is stopped by cancelling its task.", "The await expression suspends a coroutine."]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return exported_minilm(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def prompted(onnx_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """Prompted model, no API key (``running_server`` needs a key variable; an empty name disables auth)."""
    from embed_assets.serving.embedder import OnnxEmbedder
    from embed_assets.serving.process import start_server

    root = tmp_path_factory.mktemp("clients-prompted")
    folder = prompted_copy(onnx_dir, root / "onnx")
    handle = start_server(
        folder, log_path=str(root / "server.log"), ready_timeout=120, extra_args=["--model-name", NAME]
    )
    try:
        yield handle, OnnxEmbedder(folder)
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def keyed(onnx_dir: str, tmp_path_factory: pytest.TempPathFactory):
    from embed_assets.serving.embedder import OnnxEmbedder

    log = tmp_path_factory.mktemp("clients-keyed") / "server.log"
    with running_server(onnx_dir, log, KEY_ENV, KEY, extra_args=["--model-name", NAME]) as handle:
        yield handle, OnnxEmbedder(onnx_dir)


def _close(got, want: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float32).reshape(want.shape)
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert float(np.min(cos)) > 0.9999, cos


# ------------------------------------------------------------------------------------------------- openai


def test_openai_float_base64_dimensions_and_models(keyed) -> None:
    from openai import OpenAI

    handle, local = keyed
    client = OpenAI(base_url=f"{handle.url}/v1", api_key=KEY, max_retries=0)
    want = local.encode(DOCS)
    floats = client.embeddings.create(model=NAME, input=DOCS, encoding_format="float")
    _close([d.embedding for d in floats.data], want)
    assert floats.usage.prompt_tokens == sum(local.count_tokens(DOCS))
    default = client.embeddings.create(model=NAME, input=DOCS)  # the SDK asks for base64 and decodes it
    np.testing.assert_array_equal(  # the same float32 values (JSON carries their shortest float32 repr)
        np.array([d.embedding for d in default.data], dtype=np.float32),
        np.array([d.embedding for d in floats.data], dtype=np.float32),
    )
    small = client.embeddings.create(model=NAME, input=DOCS, dimensions=64)
    cut = want[:, :64] / np.linalg.norm(want[:, :64], axis=1, keepdims=True)
    _close([d.embedding for d in small.data], cut)
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    card = client.models.retrieve(NAME)
    assert (
        card.id == NAME and card.model_extra["embed_assets"]["variant"] == "fp32"
    )  # extra key kept, ignored


def test_openai_token_id_arrays(keyed) -> None:
    from openai import OpenAI

    handle, local = keyed
    client = OpenAI(base_url=f"{handle.url}/v1", api_key=KEY, max_retries=0)
    ids = [list(e.ids)[1:-1] for e in local.tokenize(DOCS, "query", "END")]  # the model's own token ids
    resp = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    _close([d.embedding for d in resp.data], local.encode(DOCS))
    import openai

    with pytest.raises(openai.BadRequestError) as err:  # tiktoken ids are not this model's: clear 400
        client.embeddings.create(model=NAME, input=[[100_000, 100_001]])
    assert "check_embedding_ctx_length=False" in str(err.value)


def test_openai_against_a_prompted_model(prompted) -> None:
    import openai
    from openai import OpenAI

    handle, local = prompted
    client = OpenAI(base_url=f"{handle.url}/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=NAME, input=[QUERY])  # OpenAI's API has no input_type
    assert err.value.code == "input_type_required" and f"{NAME}-query" in err.value.message
    by_suffix = client.embeddings.create(model=f"{NAME}-query", input=[QUERY])
    _close(by_suffix.data[0].embedding, local.encode([QUERY], "query")[0])
    by_extra = client.embeddings.create(model=NAME, input=DOCS, extra_body={"input_type": "passage"})
    _close([d.embedding for d in by_extra.data], local.encode(DOCS, "passage"))


# ---------------------------------------------------------------------------------------------- langchain


def test_langchain_nvidia_embeddings(prompted) -> None:
    from langchain_nvidia_ai_endpoints import NVIDIAEmbeddings

    handle, local = prompted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "model unknown to the API catalog": expected for a custom model
        emb = NVIDIAEmbeddings(base_url=handle.url)  # no /v1, no model, no key: GET /v1/models picks ours
    assert emb.model == NAME
    _close(emb.embed_query(QUERY), local.encode([QUERY], "query")[0])
    _close(emb.embed_documents(DOCS), local.encode(DOCS, "passage"))
    _close(asyncio.run(emb.aembed_query(QUERY)), local.encode([QUERY], "query")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        short = NVIDIAEmbeddings(base_url=f"{handle.url}/v1", model=NAME, truncate="END", dimensions=32)
    got = np.array(short.embed_documents([" ".join(["long"] * 400)]))
    assert got.shape == (1, 32)


def test_langchain_with_an_api_key(keyed) -> None:
    from langchain_nvidia_ai_endpoints import NVIDIAEmbeddings

    handle, local = keyed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = NVIDIAEmbeddings(base_url=f"{handle.url}/v1", model=NAME, api_key=KEY)
        wrong = NVIDIAEmbeddings(base_url=f"{handle.url}/v1", model=NAME, api_key="wrong")
    _close(emb.embed_query(QUERY), local.encode([QUERY])[0])
    with pytest.raises(Exception, match="401"):
        wrong.embed_query(QUERY)


# ---------------------------------------------------------------------------------------------- llama-index


def test_llama_index_nvidia_embedding(prompted) -> None:
    from llama_index.embeddings.nvidia import NVIDIAEmbedding

    handle, local = prompted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = NVIDIAEmbedding(base_url=f"{handle.url}/v1", model=NAME)
        bare = NVIDIAEmbedding(base_url=handle.url, model=NAME)  # used as given: POST /embeddings (alias)
    # Its sync query call sends input_type "passage" (a client quirk, see embed_assets.serving.app); async "query".
    _close(emb.get_query_embedding(QUERY), local.encode([QUERY], "passage")[0])
    _close(asyncio.run(emb.aget_query_embedding(QUERY)), local.encode([QUERY], "query")[0])
    _close(emb.get_text_embedding_batch(DOCS), local.encode(DOCS, "passage"))
    _close(bare.get_text_embedding(DOCS[0]), local.encode(DOCS[:1], "passage")[0])


# ----------------------------------------------------------------------------------------------- haystack


def test_haystack_nvidia_embedders(prompted) -> None:
    from haystack import Document
    from haystack_integrations.components.embedders.nvidia import NvidiaDocumentEmbedder, NvidiaTextEmbedder

    handle, local = prompted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = NvidiaTextEmbedder(model=NAME, api_url=f"{handle.url}/v1", api_key=None)
        docs = NvidiaDocumentEmbedder(model=NAME, api_url=f"{handle.url}/v1", api_key=None, truncate="END")
        text.warm_up()
        docs.warm_up()
    _close(text.run(QUERY)["embedding"], local.encode([QUERY], "query")[0])
    out = docs.run([Document(content=d) for d in DOCS])["documents"]
    _close([d.embedding for d in out], local.encode(DOCS, "passage"))


# -------------------------------------------------------------------------------------- recorded requests


def test_recorded_client_requests_are_answered(prompted) -> None:
    """Replay what the real clients were recorded sending (method, path, headers with their placeholder
    tokens, body): every request gets 200 and the shape the client reads."""
    if not CONTRACTS.is_file():
        pytest.skip(f"{CONTRACTS} not found (../shared beside the checkout)")
    handle, _ = prompted
    requests = [r for r in map(json.loads, CONTRACTS.read_text().splitlines()) if "method" in r]
    assert len(requests) >= 10
    drop = {"host", "content-length", "connection", "accept-encoding"}
    with httpx.Client(base_url=handle.url, timeout=30) as c:
        for rec in requests:
            headers = {k: v for k, v in rec["headers"].items() if k.lower() not in drop}
            resp = c.request(rec["method"], rec["path"], json=rec["body"], headers=headers)
            assert resp.status_code == 200, (rec, resp.text)
            body = resp.json()
            if rec["path"].endswith("/models"):
                assert body["data"][0]["id"] == NAME
                continue
            data = body["data"]
            assert len(data) == len(rec["body"]["input"])
            first = data[0]["embedding"]
            if rec["body"].get("encoding_format") == "base64":
                first = np.frombuffer(base64.b64decode(first), dtype="<f4")
            assert len(first) == rec["body"].get("dimensions", 384)
