"""The NIM-compatible server, run for real: a background process on loopback, spoken to over HTTP."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from embed_assets_tests.conftest_serving import MAX_SEQ_LENGTH, exported_minilm, running_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEY_ENV = "EMBED_ASSETS_TEST_API_KEY"
KEY = "test-key-3f1c"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "all-MiniLM-L6-v2"
LONG = " ".join(f"token{i}" for i in range(300))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return exported_minilm(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def embedder(onnx_dir: str):
    from embed_assets.serving.embedder import OnnxEmbedder

    return OnnxEmbedder(onnx_dir, "fp32")


@pytest.fixture(scope="module")
def server(onnx_dir: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(onnx_dir, log, KEY_ENV, KEY) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def _embed(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/embeddings", json=body)


def _vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- happy paths ------------------------------------------------------------------------------------------


def test_health_and_models(server, client: httpx.Client) -> None:
    with httpx.Client(base_url=server.url) as anon:  # probes need no token
        assert anon.get("/v1/health/ready").json() == {
            "object": "health.response",
            "message": "ready",
            "ready": True,
        }
        live = anon.get("/v1/health/live")
        assert live.status_code == 200 and live.json()["object"] == "health.response"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == MODEL and card["object"] == "model"
    served = card["embed_assets"]
    assert served["dimension"] == 384 and served["max_seq_length"] == MAX_SEQ_LENGTH
    assert served["variant"] == "fp32" and served["backend"] == "onnx"
    assert served["source"] == "unknown" and served["identity_file"] is None  # no embed_assets_model.json
    assert client.get(f"/v1/models/{MODEL}").json() == card
    assert client.get("/models").json() == models  # alias without /v1
    err = _error(client.get("/v1/models/nvidia/llama-3.2-nv-embedqa-1b-v2"), 404)
    assert err["code"] == "model_not_found" and MODEL in err["message"]


def test_embeddings_shape_order_and_parity(client: httpx.Client, embedder) -> None:
    texts = ["first text", "second, a little longer text", "3", "Ünïcödé ✓", "the fifth"]
    resp = _embed(client, input=texts, model=MODEL, input_type="passage", truncate="END")
    body = resp.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    assert all(d["object"] == "embedding" for d in body["data"])
    vecs = _vectors(resp)
    assert vecs.shape == (5, 384)
    local = embedder.encode(texts, input_type="passage")
    assert _cos(vecs, local).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == sum(embedder.count_tokens(texts))


def test_single_string_input_and_default_model(client: httpx.Client, embedder) -> None:
    vecs = _vectors(_embed(client, input="just one string"))
    assert vecs.shape == (1, 384)
    assert _cos(vecs, embedder.encode(["just one string"])).min() > 0.9999


def test_large_request_is_split_into_batches_in_order(client: httpx.Client, embedder) -> None:
    texts = [f"item number {i} of a long request" for i in range(200)]  # > max_batch_size (64)
    resp = _embed(client, input=texts, truncate="END")
    assert [d["index"] for d in resp.json()["data"]] == list(range(200))
    assert _cos(_vectors(resp), embedder.encode(texts)).min() > 0.9999


def test_base64_equals_float(client: httpx.Client) -> None:
    texts = ["alpha", "beta gamma"]
    floats = _vectors(_embed(client, input=texts, model=MODEL))
    b64 = _embed(client, input=texts, model=MODEL, encoding_format="base64").json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    np.testing.assert_array_equal(decoded, floats)


def test_dimensions_matryoshka(client: httpx.Client) -> None:
    full = _vectors(_embed(client, input=["matryoshka"], model=MODEL))
    small = _vectors(_embed(client, input=["matryoshka"], model=MODEL, dimensions=64))
    assert small.shape == (1, 64)
    np.testing.assert_allclose(np.linalg.norm(small), 1.0, atol=1e-5)
    expected = full[:, :64] / np.linalg.norm(full[:, :64])
    np.testing.assert_allclose(small, expected, atol=1e-5)
    assert _vectors(_embed(client, input=["matryoshka"], dimensions=384)).shape == (1, 384)


def test_truncate_start_and_end(client: httpx.Client, embedder) -> None:
    end = _vectors(_embed(client, input=[LONG], truncate="END"))
    start = _vectors(_embed(client, input=[LONG], truncate="START"))
    assert _cos(end, embedder.encode([LONG], truncate="END")).min() > 0.9999
    assert _cos(start, embedder.encode([LONG], truncate="START")).min() > 0.9999
    assert _cos(start, end).max() < 0.999  # different halves of the text
    resp = _embed(client, input=[LONG], truncate="END")
    assert resp.json()["usage"]["prompt_tokens"] == MAX_SEQ_LENGTH


# --- errors -----------------------------------------------------------------------------------------------


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_over_long_input_with_truncate_none_is_400(client: httpx.Client) -> None:
    err = _error(_embed(client, input=["ok", LONG], truncate="NONE"), 400)
    assert "input[1]" in err["message"] and f"maximum of {MAX_SEQ_LENGTH} tokens" in err["message"]
    assert err["code"] == "input_too_long"
    _error(_embed(client, input=LONG), 400)  # NONE is the default, as in NIM


@pytest.mark.parametrize(
    "body",
    [
        {"input": 123},
        {"input": [1, "a"]},
        {"input": [[1, 2], "a"]},
        {"input": [-1, 2]},
        {"input": ["ok", None]},
        {"input": {"text": "x"}},
        {"model": MODEL},
        {"input": "x", "input_type": "document"},
        {"input": "x", "encoding_format": "int8"},
        {"input": "x", "truncate": "MIDDLE"},
        {"input": "x", "dimensions": "64"},
        {"input": "x", "dimensions": 0},
        {"input": "x", "dimensions": 64.5},
        {"input": "x", "dimensions": True},
        {"input": "x", "embedding_type": "float16"},
        {"input": "x", "model": 5},
    ],
)
def test_wrong_types_are_422(client: httpx.Client, body: dict) -> None:
    err = _error(_embed(client, **body), 422)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"input": []}, "empty_input"),
        ({"input": ""}, "empty_input"),
        ({"input": ["fine", "   "]}, "empty_input"),
        ({"input": ["fine", "\u200b\u200b"]}, "empty_input"),  # no tokens once tokenized
        ({"input": "\x00"}, "empty_input"),
        ({"input": [[]]}, "empty_input"),
        ({"input": [[101, 999_999]]}, "invalid_input"),
        ({"input": "x", "embedding_type": "int8"}, "unsupported_embedding_type"),
        ({"input": "x", "model": f"{MODEL}-passage", "input_type": "query"}, "conflicting_input_type"),
        ({"input": ["x"] * 257}, "too_many_inputs"),
        ({"input": "x", "dimensions": 385}, "invalid_dimensions"),
    ],
)
def test_invalid_requests_are_400(client: httpx.Client, body: dict, code: str) -> None:
    assert _error(_embed(client, **body), 400)["code"] == code


def test_dimensions_as_integral_float(client: httpx.Client) -> None:
    as_int = _vectors(_embed(client, input=["matryoshka"], dimensions=64))
    np.testing.assert_array_equal(_vectors(_embed(client, input=["matryoshka"], dimensions=64.0)), as_int)


def test_token_id_inputs(client: httpx.Client, embedder) -> None:
    texts = ["token ids of the served model", "second input"]
    encodings = embedder.tokenize(texts, "query", "END")
    want = _vectors(_embed(client, input=texts))
    framed = [list(e.ids) for e in encodings]  # [CLS] ... [SEP]: used as they are
    np.testing.assert_allclose(_vectors(_embed(client, input=framed)), want, atol=1e-6)
    content = [ids[1:-1] for ids in framed]  # without special tokens: added like for text
    np.testing.assert_allclose(_vectors(_embed(client, input=content)), want, atol=1e-6)
    one = _vectors(_embed(client, input=content[0]))  # a flat integer array is one input
    np.testing.assert_allclose(one, want[:1], atol=1e-6)
    long_ids = [2000 + i for i in range(300)]
    assert _error(_embed(client, input=[long_ids]), 400)["code"] == "input_too_long"
    cut = _embed(client, input=[long_ids], truncate="END").json()
    assert cut["usage"]["prompt_tokens"] == MAX_SEQ_LENGTH


def test_model_suffix_sets_input_type(client: httpx.Client) -> None:
    base = _vectors(_embed(client, input=["suffix"], input_type="passage"))
    np.testing.assert_array_equal(_vectors(_embed(client, input=["suffix"], model=f"{MODEL}-passage")), base)
    body = _embed(client, input=["suffix"], model=f"{MODEL}-query").json()
    assert body["model"] == MODEL


def test_binary_embedding_types_match_sentence_transformers(client: httpx.Client) -> None:
    from sentence_transformers.quantization import quantize_embeddings

    texts = ["binary one", "binary two, a longer text", "three"]
    floats = _vectors(_embed(client, input=texts))
    for precision in ("binary", "ubinary"):
        got = _embed(client, input=texts, embedding_type=precision).json()["data"]
        values = np.array([d["embedding"] for d in got])
        np.testing.assert_array_equal(values, quantize_embeddings(floats, precision=precision))
        b64 = _embed(client, input=texts, embedding_type=precision, encoding_format="base64").json()["data"]
        dtype = np.int8 if precision == "binary" else np.uint8
        decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=dtype) for d in b64])
        np.testing.assert_array_equal(decoded, values)
    assert values.shape == (3, 384 // 8)


def test_unknown_model_is_404(client: httpx.Client) -> None:
    err = _error(_embed(client, input="x", model="nvidia/llama-3.2-nv-embedqa-1b-v2"), 404)
    assert err["code"] == "model_not_found" and MODEL in err["message"]


def test_malformed_json_and_unknown_route(client: httpx.Client) -> None:
    bad = client.post("/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"})
    assert _error(bad, 400)["code"] == "invalid_json"
    _error(client.get("/v1/nothing-here"), 404)
    _error(client.get("/v1/embeddings"), 405)


def test_auth(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        assert _error(anon.post("/v1/embeddings", json={"input": "x"}), 401)["type"] == "authentication_error"
        wrong = anon.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer nope"})
        assert _error(wrong, 401)["code"] == "invalid_api_key"
        assert (
            anon.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": KEY}).status_code
            == 401
        )
        _error(anon.get("/v1/models"), 401)
        assert anon.post("/v1/embeddings", json={"input": "x"}, headers=AUTH).status_code == 200
        assert anon.get("/v1/metrics").status_code == 200


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = {"input": ["word " * 1000] * 250}  # ~1.25 MB > 1 MB default limit
    assert _error(_embed(client, **big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies to streamed bodies too
        for _ in range(30):
            yield b" " * 50_000

    streamed = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    _error(streamed, 413)


def test_server_survives_errors(client: httpx.Client) -> None:
    assert client.get("/v1/health/ready").status_code == 200
    assert _embed(client, input="still alive").status_code == 200


# --- concurrency / batching ------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_concurrent_clients_are_coalesced_without_mixing(server, client: httpx.Client, embedder) -> None:
    threads, per_thread = 16, 6
    texts = {
        (t, r): f"client {t} request {r}: topic {t * 7 + r} about {'abc'[r % 3]}"
        for t in range(threads)
        for r in range(per_thread)
    }
    expected = dict(zip(texts, embedder.encode(list(texts.values())), strict=True))
    before = client.get("/v1/metrics").text
    barrier = threading.Barrier(threads)
    failures: list[str] = []

    def worker(t: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            barrier.wait()
            for r in range(per_thread):
                resp = c.post("/v1/embeddings", json={"input": [texts[(t, r)]], "model": MODEL})
                if resp.status_code != 200:
                    failures.append(resp.text)
                    continue
                vec = np.array(resp.json()["data"][0]["embedding"], dtype=np.float32)[None]
                if _cos(vec, expected[(t, r)][None])[0] < 0.9999:
                    failures.append(f"wrong vector for client {t} request {r}")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(120)
    assert not failures, failures[:3]
    after = client.get("/v1/metrics").text
    requests = threads * per_thread
    batches = _metric(after, "embed_batches_total") - _metric(before, "embed_batches_total")
    inputs = _metric(after, "embed_inputs_total") - _metric(before, "embed_inputs_total")
    assert inputs == requests
    # Single-input requests answered in fewer forward passes than requests: they were coalesced.
    assert batches < requests, (batches, requests)
    assert _metric(after, "embed_batch_size_max") > 1
    print(f"{requests} concurrent single-input requests -> {batches:.0f} forward passes")


def test_metrics_format(client: httpx.Client) -> None:
    resp = client.get("/v1/metrics")
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = resp.text
    for name in (
        "embed_inputs_total",
        "embed_batches_total",
        "embed_batch_size_count",
        "embed_queue_depth",
        "embed_inflight_tokens",
        "embed_batch_padded_tokens_total",
        "embed_batch_real_tokens_total",
        "process_resident_memory_bytes",
    ):
        _metric(text, name)
    assert 'embed_http_requests_total{method="POST",path="/v1/embeddings",status="200"}' in text
    assert 'embed_batch_size_bucket{le="+Inf"}' in text
    assert "# TYPE embed_request_duration_seconds histogram" in text
    assert 'source="unknown"' in text and 'variant="fp32"' in text  # embed_model_info
    assert _metric(text, "embed_batch_real_tokens_total") <= _metric(text, "embed_batch_padded_tokens_total")


# --- processes, variants, peers ---------------------------------------------------------------------------


def test_int8_server_and_failed_start(onnx_dir: str, tmp_path: Path) -> None:
    from embed_assets.serving.embedder import OnnxEmbedder
    from embed_assets.serving.process import is_alive, start_server, stop_server

    handle = start_server(onnx_dir, variant="int8", log_path=str(tmp_path / "int8.log"))
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as c:  # no api key configured: open
            assert c.get("/v1/models").json()["data"][0]["embed_assets"]["variant"] == "int8"
            vec = _vectors(c.post("/v1/embeddings", json={"input": ["int8 check"]}))
        assert _cos(vec, OnnxEmbedder(onnx_dir, "int8").encode(["int8 check"])).min() > 0.9999
    finally:
        assert stop_server(handle.pid)
    assert not is_alive(handle.pid)

    with pytest.raises(RuntimeError, match="exited with code") as err:
        start_server(str(tmp_path / "missing"), log_path=str(tmp_path / "bad.log"), ready_timeout=60)
    assert "embed_assets_onnx.json" in str(err.value)  # the log tail explains why
    with pytest.raises(ValueError, match="unset"):
        start_server(onnx_dir, api_key_env="EMBED_ASSETS_SURELY_UNSET_VAR")


def test_serving_never_imports_torch(onnx_dir: str) -> None:
    code = (
        "import sys\n"
        "from embed_assets.serving.app import create_app\n"
        "from embed_assets.serving.embedder import OnnxEmbedder\n"
        f"app = create_app({onnx_dir!r})\n"
        f"OnnxEmbedder({onnx_dir!r}).encode(['x'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_torch_peer_matches_onnx(embedder) -> None:
    from embed_assets.models import BUNDLED_MODEL, resolve_model_path
    from embed_assets.serving.embedder import TorchEmbedder

    peer = TorchEmbedder(resolve_model_path(BUNDLED_MODEL), "cpu", max_seq_length=MAX_SEQ_LENGTH)
    texts = ["torch peer", LONG, "another"]
    for truncate in ("END", "START"):
        assert (
            _cos(peer.encode(texts, truncate=truncate), embedder.encode(texts, truncate=truncate)).min()
            > 0.9999
        )
    assert peer.dimension == embedder.dimension and peer.max_seq_length == embedder.max_seq_length


def test_render_nim_manifests(onnx_dir: str, tmp_path: Path) -> None:
    from embed_assets.serving.deploy import NIM_IMAGE, render_nim_manifests, render_template

    files = render_nim_manifests(
        onnx_dir, str(tmp_path / "nim"), name="my-embed", port=8080, model_pvc="models"
    )
    assert set(files) == {"docker-run.sh", "docker-compose.yaml", "kubernetes.yaml"}
    for path in files.values():
        text = Path(path).read_text()
        assert set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)) <= {"NGC_API_KEY"}, path
        assert NIM_IMAGE in text and "NIM_CUSTOM_MODEL" in text and "/opt/nim/custom_model" in text
    run = Path(files["docker-run.sh"]).read_text()
    assert f"{Path(onnx_dir).resolve()}:/opt/nim/custom_model:ro" in run and "8080:8000" in run
    assert os.access(files["docker-run.sh"], os.X_OK)
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all(Path(files["kubernetes.yaml"]).read_text()))
    deployment, service = docs
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert container["ports"][0]["containerPort"] == 8000
    assert {"name": "NIM_CUSTOM_MODEL", "value": "/opt/nim/custom_model"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert service["spec"]["ports"][0]["port"] == 8080
    compose = yaml.safe_load(Path(files["docker-compose.yaml"]).read_text())
    svc = compose["services"]["my-embed"]
    assert svc["environment"]["NIM_CUSTOM_MODEL"] == "/opt/nim/custom_model" and "8080:8000" in svc["ports"]
    with pytest.raises(KeyError):
        render_template("${UNKNOWN}", {})
    with pytest.raises(ValueError):
        render_nim_manifests(onnx_dir, str(tmp_path / "x"), name="Bad_Name")
