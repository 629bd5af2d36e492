"""The embedding service under load and attack: a real server process on loopback serving the ONNX export.

Every answer has the right status, no request sees another's data, memory stays bounded and the server is
healthy afterwards with nothing but 2xx/4xx answers (no traceback in its log). test_serving.py covers the
single malformed requests, the 413 limit and the basic auth cases; this module adds concurrency, hostile
bodies, disconnecting clients, memory and a bounded load test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from embed_assets_tests.conftest_serving import MAX_SEQ_LENGTH, exported_minilm, running_server

KEY_ENV = "EMBED_ASSETS_RELIABILITY_KEY"
KEY = "rel-token-5d2e9b71c4"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "all-MiniLM-L6-v2"


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
    with running_server(onnx_dir, log, KEY_ENV, KEY, extra_args=["--access-log"]) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def vectors(body: dict) -> np.ndarray:
    rows = [
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        if isinstance(d["embedding"], str)
        else np.asarray(d["embedding"], dtype=np.float32)
        for d in body["data"]
    ]
    return np.stack(rows)


def expected(embedder, texts: list[str], input_type: str, truncate: str, dims: int | None) -> np.ndarray:
    out = embedder.encode(texts, input_type=input_type, truncate=truncate)
    if dims:
        out = out[:, :dims] / np.linalg.norm(out[:, :dims], axis=1, keepdims=True)
    return out


def assert_healthy(server) -> None:
    assert server.is_alive()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v1/health/ready").status_code == 200
        ok = c.post("/v1/embeddings", json={"input": "still fine"}, headers=AUTH)
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384


# ------------------------------------------------------------------------------------------- concurrency


def test_concurrent_mixed_requests_each_get_their_own_vectors(server, embedder) -> None:
    """8 clients send requests of 1-6 distinct texts with random options, interleaved with bad requests; each
    good answer equals the in-process embeddings of that request's own texts, in order."""
    rng = random.Random(7)
    plans = []
    for t in range(8):
        for r in range(8):
            if r % 5 == 4:  # a bad request in the middle of the traffic
                plans.append((t, r, {"input": []} if t % 2 else {"input": [1, "x"]}, None))
                continue
            n = rng.randint(1, 6)
            texts = [f"client {t} request {r} text {i}: " + "word " * rng.randint(1, 60) for i in range(n)]
            body = {
                "input": texts,
                "input_type": rng.choice(["query", "passage"]),
                "truncate": "END",
                "encoding_format": rng.choice(["float", "base64"]),
            }
            if rng.random() < 0.3:
                body["dimensions"] = 128
            plans.append((t, r, body, texts))
    want = {
        (t, r): expected(embedder, texts, body["input_type"], "END", body.get("dimensions"))
        for t, r, body, texts in plans
        if texts
    }
    barrier = threading.Barrier(8)
    failures: list[str] = []

    def client_thread(t: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
            barrier.wait()
            for tt, r, body, texts in plans:
                if tt != t:
                    continue
                resp = c.post("/v1/embeddings", json=body)
                if texts is None:
                    if resp.status_code not in (400, 422):
                        failures.append(f"bad request {t}/{r} got {resp.status_code}")
                    continue
                if resp.status_code != 200:
                    failures.append(f"{t}/{r}: {resp.status_code} {resp.text[:200]}")
                    continue
                got = vectors(resp.json())
                if got.shape != want[(t, r)].shape:
                    failures.append(f"{t}/{r}: shape {got.shape}")
                    continue
                cos = (got * want[(t, r)]).sum(1)
                if cos.min() < 0.9999:
                    failures.append(f"{t}/{r}: vector of another input (min cos {cos.min():.4f})")

    threads = [threading.Thread(target=client_thread, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(180)
    assert not failures, failures[:5]
    assert_healthy(server)


def test_clients_disconnecting_mid_request_do_not_disturb_the_others(server, client, embedder) -> None:
    """24 clients give up (close the connection) while their 64-input request waits for inference: their
    inputs are dropped, not embedded for nobody, and the 24 patient clients get their own vectors promptly."""
    texts = [f"patient client {i}: " + "context " * 40 for i in range(24)]
    want = embedder.encode(texts, truncate="END")
    processed_before = _metric(client.get("/v1/metrics").text, "embed_batch_size_sum")
    results: dict[int, np.ndarray] = {}
    errors: list[str] = []

    def impatient(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=httpx.Timeout(0.05, connect=10)) as c:
            body = {"input": [f"impatient {i}.{j} " + "filler " * 100 for j in range(64)], "truncate": "END"}
            with contextlib.suppress(httpx.TimeoutException):
                c.post("/v1/embeddings", json=body)

    def patient(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
            resp = c.post("/v1/embeddings", json={"input": [texts[i]], "truncate": "END"})
            if resp.status_code != 200:
                errors.append(resp.text)
            else:
                results[i] = vectors(resp.json())[0]

    with ThreadPoolExecutor(12) as pool:
        for job in [pool.submit(impatient, i) for i in range(24)]:
            job.result(timeout=60)
        start = time.monotonic()
        for job in [pool.submit(patient, i) for i in range(24)]:
            job.result(timeout=180)
        patient_s = time.monotonic() - start
    assert not errors, errors[:3]
    got = np.stack([results[i] for i in range(24)])
    assert (got * want).sum(1).min() > 0.9999
    processed = _metric(client.get("/v1/metrics").text, "embed_batch_size_sum") - processed_before
    print(
        f"abandoned 24 x 64 inputs: {processed - 24:.0f} embedded anyway; patient clients took {patient_s:.1f}s"
    )
    assert processed < 24 * 64 / 2, processed  # most abandoned inputs were skipped
    assert_healthy(server)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


# --------------------------------------------------------------------------------------------- hostile bodies

J = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("name", "content", "status", "code"),
    [
        ("lone surrogate", b'{"input": ["fine", "bad \\ud800 text"]}', 400, "invalid_input"),
        ("deep nesting", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
        ("JSON null body", b"null", 422, "invalid_type"),
        ("a JSON list body", b'[{"input": "x"}]', 422, "invalid_type"),
        ("NaN dimensions", b'{"input": "x", "dimensions": NaN}', 422, "invalid_type"),
        (
            "huge dimensions",
            b'{"input": "x", "dimensions": 100000000000000000000000}',
            400,
            "invalid_dimensions",
        ),
        ("boolean input", b'{"input": true}', 422, "invalid_type"),
        ("not UTF-8", b'{"input": "caf\xe9"}', 400, None),
        ("empty body", b"", 422, "invalid_type"),
    ],
)
def test_hostile_bodies_get_a_4xx_not_a_5xx(server, name: str, content: bytes, status: int, code) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        resp = c.post("/v1/embeddings", content=content, headers=J)
    assert resp.status_code == status, (name, resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code, error
    assert_healthy(server)


def test_unicode_edge_inputs_are_embedded(client, embedder) -> None:
    texts = ["NUL \x00 inside", "emoji 🧪🚀", "RTL مرحبا", "combining é", "\u2028line separator"]
    resp = client.post("/v1/embeddings", json={"input": texts, "truncate": "END"})
    assert resp.status_code == 200, resp.text
    assert (vectors(resp.json()) * embedder.encode(texts, truncate="END")).sum(1).min() > 0.9999


def test_oversize_uploads_in_parallel_are_refused(server) -> None:
    big = json.dumps({"input": ["x" * 100_000] * 11}).encode()  # 1.1 MB > the 1 MB limit
    before = rss_kb(server.pid)

    def send(_: int) -> int:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            return c.post("/v1/embeddings", content=big, headers=J).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, range(40)))
    assert statuses == [413] * 40
    assert rss_kb(server.pid) - before < 100_000  # refused bodies are not kept (40 x 1.1 MB sent)
    assert_healthy(server)


def test_very_long_inputs(client, embedder) -> None:
    # one input of ~0.9 MB: truncated to the model's length, answered in seconds
    huge = "lorem ipsum dolor " * 50_000
    start = time.monotonic()
    resp = client.post("/v1/embeddings", json={"input": huge, "truncate": "END"})
    assert resp.status_code == 200, resp.text[:300]
    assert time.monotonic() - start < 30
    assert resp.json()["usage"]["prompt_tokens"] == MAX_SEQ_LENGTH
    assert (vectors(resp.json()) * embedder.encode([huge[:2000]], truncate="END")).sum(1).min() > 0.9999
    # 24 inputs of 38 KB each (just under the body limit), all truncated
    many = [f"{i} " + "long passage text " * 2100 for i in range(24)]
    resp = client.post("/v1/embeddings", json={"input": many, "truncate": "START"})
    assert resp.status_code == 200 and len(resp.json()["data"]) == 24
    # without truncation: refused, naming the first input that is too long
    resp = client.post("/v1/embeddings", json={"input": ["short", huge], "truncate": "NONE"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "input_too_long"
    assert resp.json()["error"]["message"].startswith("input[1] has ")


# --------------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("headers", "url"),
    [
        ({}, "/v1/embeddings"),
        ({"Authorization": "Bearer"}, "/v1/embeddings"),
        ({"Authorization": f"Basic {base64.b64encode(f'user:{KEY}'.encode()).decode()}"}, "/v1/embeddings"),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, "/v1/embeddings"),
        ({"Authorization": f"Bearer {KEY}x"}, "/v1/embeddings"),
        ({"Authorization": f"Token {KEY}"}, "/v1/embeddings"),
        ({"X-Api-Key": KEY}, "/v1/embeddings"),
        ({}, f"/v1/embeddings?api_key={KEY}"),
        ({"Authorization": "Bearer wrong"}, "/v1/embeddings/"),
        ({"Authorization": "Bearer wrong"}, "/v1/models"),
    ],
)
def test_missing_or_wrong_token_is_401_without_echo(server, headers: dict, url: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        resp = (
            c.post(url, json={"input": "x"}, headers=headers)
            if "embed" in url
            else c.get(url, headers=headers)
        )
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert KEY[:8] not in resp.text  # nothing of the key or the sent token comes back


def test_token_guessing_does_not_hurt_the_server(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        statuses = {
            c.post(
                "/v1/embeddings", json={"input": "x"}, headers={"Authorization": f"Bearer guess-{i}"}
            ).status_code
            for i in range(300)
        }
    assert statuses == {401}
    assert_healthy(server)


# ------------------------------------------------------------------------------------------- memory, load


def test_memory_is_bounded_over_many_requests(server, client) -> None:
    """After a warm-up, 100 rounds of a 0.9 MB request (parsed, then refused: 257 inputs) and a small embedding
    request (~90 MB through the server in all): its RSS stays flat, nothing of a request is retained."""
    big = json.dumps({"input": [f"{i} " + "x" * 3500 for i in range(257)]}).encode()

    def burst(n: int, tag: str) -> None:
        for i in range(n):
            resp = client.post("/v1/embeddings", content=big, headers=J)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_inputs"
            small = {"input": [f"memory probe {tag} {i}.{j} about harbor number {j * i}" for j in range(4)]}
            assert client.post("/v1/embeddings", json=small).status_code == 200

    burst(10, "warm-up")  # allocator arenas, onnxruntime buffers
    before = rss_kb(server.pid)
    burst(100, "measured")
    after = rss_kb(server.pid)
    print(f"server RSS {before / 1024:.0f} MB -> {after / 1024:.0f} MB after 100 more rounds (~90 MB sent)")
    assert after - before < 20_000, (before, after)


@pytest.mark.slow
def test_load_8_clients_x_50_requests(server, embedder) -> None:
    clients, per_client = 8, 50
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    texts = [f"load test query {i} about topic {i % 13}" for i in range(clients * per_client)]

    def run(c: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            for r in range(per_client):
                text = texts[c * per_client + r]
                start = time.perf_counter()
                try:
                    resp = http.post("/v1/embeddings", json={"input": [text], "model": MODEL})
                    ok = resp.status_code == 200 and len(resp.json()["data"][0]["embedding"]) == 384
                    problem = "" if ok else f"{resp.status_code} {resp.text[:100]}"
                except httpx.HTTPError as e:
                    problem = f"{type(e).__name__}: {e}"
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if problem:
                        errors.append(problem)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    print(
        f"\nload: {clients} clients x {per_client} requests = {len(lat)} in {wall:.1f}s "
        f"({len(lat) / wall:.0f} req/s), errors={len(errors)}, p50={p50:.0f} ms, p99={p99:.0f} ms, "
        f"max={lat.max():.0f} ms"
    )
    assert len(lat) == clients * per_client
    assert errors == []
    assert p99 < 5000, f"p99 {p99:.0f} ms"
    assert_healthy(server)


def test_server_log_has_no_traceback_and_no_key(server) -> None:
    """Runs last in this module: everything above got a 2xx/4xx answer, nothing raised inside the server."""
    log = Path(server.log_path).read_text(errors="replace")
    assert "POST /v1/embeddings HTTP/1.1" in log  # access log on: the log does record requests
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert KEY not in log
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")
    assert KEY not in cmdline and KEY_ENV in cmdline  # only the variable's name is on the command line
