"""The server's contract beyond single requests: token-budget scheduling, token limits (413/429), the served
model's identity, prompted models, process liveness, the NIM response shapes and schemathesis.

Servers are real processes on loopback serving the bundled MiniLM's ONNX export.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from embed_assets_tests.conftest_serving import exported_minilm, running_server

KEY_ENV = "EMBED_ASSETS_CONTRACT_KEY"
KEY = "contract-key-8c1d"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "all-MiniLM-L6-v2"
REPO = Path(__file__).resolve().parents[1]
LONG = " ".join(f"word{i}" for i in range(400))  # > MAX_SEQ_LENGTH tokens: truncated to exactly 128
IDENTITY = {
    "source": "finetuned",
    "checkpoint_run_id": "ckpt-2f7a",
    "dagster_run_id": "run-91b3",
    "base_model": "all-MiniLM-L6-v2",
    "mlflow_run_id": "mlf-44d0",
}


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return exported_minilm(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def embedder(onnx_dir: str):
    from embed_assets.serving.embedder import OnnxEmbedder

    return OnnxEmbedder(onnx_dir, "fp32")


def prompted_copy(
    onnx_dir: str, dest: Path, identity: dict | None = None, raw_identity: str | None = None
) -> str:
    """The export with e5-style query/passage prompts (and optionally an identity file), files symlinked."""
    dest.mkdir(parents=True)
    for f in Path(onnx_dir).iterdir():
        if f.name != "embed_assets_onnx.json":
            (dest / f.name).symlink_to(f)
    meta = json.loads((Path(onnx_dir) / "embed_assets_onnx.json").read_text())
    meta.update(query_prefix="query: ", passage_prefix="passage: ")
    (dest / "embed_assets_onnx.json").write_text(json.dumps(meta))
    if identity is not None:
        (dest / "embed_assets_model.json").write_text(json.dumps(identity))
    if raw_identity is not None:
        (dest / "embed_assets_model.json").write_text(raw_identity)
    return str(dest)


# ------------------------------------------------------------------------------------ scheduling (in-process)


def _jobs(loop: asyncio.AbstractEventLoop, *lengths_per_job: list[int]):
    from embed_assets.serving.batching import Job
    from embed_assets.serving.embedder import TokenIds

    return [
        Job([TokenIds([1] * n) for n in lengths], loop.create_future(), seq)
        for seq, lengths in enumerate(lengths_per_job)
    ]


def test_a_small_request_joins_the_next_pass_of_a_big_one() -> None:
    from embed_assets.serving.batching import bucket, plan_pass

    loop = asyncio.new_event_loop()
    try:
        big, small = _jobs(loop, [128] * 256, [9])
        passes = 0
        while big.pending or small.pending:
            chosen = plan_pass([big, small], 2048, 64)
            assert sum(bucket(len(j.encodings[i].ids)) for j, i in chosen) <= 2048  # the budget holds
            passes += 1
            if passes == 1:
                assert (small, 0) in chosen  # not behind 256 long inputs
        assert passes == 256 * 128 // 2048 + 1  # split into micro-batches that fill the budget
    finally:
        loop.close()


def test_the_oldest_request_always_advances() -> None:
    from embed_assets.serving.batching import plan_pass

    loop = asyncio.new_event_loop()
    try:
        old, *smalls = _jobs(loop, [128] * 4, *([[12]] * 300))
        for _ in range(3):  # a stream of small requests that alone would fill every pass
            chosen = plan_pass([old, *smalls], 512, 64)
            assert any(job is old for job, _ in chosen)
    finally:
        loop.close()


def test_length_groups_cut_padding() -> None:
    from embed_assets.serving.batching import group_by_length

    lengths = [7, 128, 9, 120, 8, 30, 128, 10]
    groups = group_by_length(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < len(lengths) * max(lengths) / 2
    assert [max(lengths[i] for i in g) for g in groups] == sorted(max(lengths[i] for i in g) for g in groups)


def test_batcher_vectors_equal_encode_and_cancellation_drops_inputs(embedder) -> None:
    from embed_assets.serving.batching import TokenBudgetBatcher

    passes: list[int] = []
    texts = [f"request {i}: " + "word " * (3 + (37 * i) % 90) for i in range(24)]
    want = embedder.encode(texts, truncate="END")

    async def run() -> None:
        batcher = TokenBudgetBatcher(
            embedder.embed_tokens,
            embedder.dimension,
            max_batch_tokens=512,
            max_batch_size=16,
            on_pass=lambda size, *_: passes.append(size),
        )
        requests = [embedder.tokenize(texts[i : i + 3], "query", "END") for i in range(0, 24, 3)]
        doomed = asyncio.ensure_future(batcher.submit(embedder.tokenize(["x " * 100] * 40, "query", "END")))
        results = asyncio.gather(*(batcher.submit(r) for r in requests))
        await asyncio.sleep(0)
        doomed.cancel()
        got = np.concatenate(await results)
        assert (got * want).sum(1).min() > 0.9999
        await batcher.close()

    asyncio.run(run())
    assert sum(passes) < 24 + 40  # the cancelled request's inputs did not all run
    assert max(passes) <= 16


# ------------------------------------------------------------------------------- limits and fairness (HTTP)


@pytest.fixture(scope="module")
def limited(onnx_dir: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("limited") / "server.log"
    args = ["--max-request-tokens", "16384", "--max-inflight-tokens", "20000"]
    with running_server(onnx_dir, log, KEY_ENV, KEY, extra_args=args) as handle:
        yield handle


def _long_request(n: int) -> dict:
    return {"input": [f"{i} {LONG}" for i in range(n)], "truncate": "END"}  # n x 128 tokens


def _in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def send() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=300) as c:
            resp = c.post("/v1/embeddings", json=body)
            out.update(status=resp.status_code, end=time.monotonic())

    thread = threading.Thread(target=send)
    thread.start()
    return thread, out


def _wait_inflight(client: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = client.get("/v1/metrics").text
        if float(re.search(r"^embed_inflight_tokens (\S+)$", text, re.M).group(1)) > 0:
            return
        time.sleep(0.01)
    raise AssertionError("the big request never got in flight")


def test_token_limits_413_and_429_and_fairness(limited) -> None:
    with httpx.Client(base_url=limited.url, headers=AUTH, timeout=300) as c:
        too_big = c.post("/v1/embeddings", json=_long_request(130))  # 16,640 tokens > 16,384
        assert too_big.status_code == 413
        err = too_big.json()["error"]
        assert err["code"] == "too_many_tokens" and "16384" in err["message"]

        big, result = _in_background(limited.url, _long_request(100))  # 12,800 tokens, seconds of work
        _wait_inflight(c)
        busy = c.post("/v1/embeddings", json=_long_request(100))  # 25,600 in flight > 20,000
        small = c.post("/v1/embeddings", json={"input": ["a one-text request"]})
        small_end = time.monotonic()
        big.join(300)
    assert busy.status_code == 429, busy.text
    assert busy.json()["error"]["code"] == "server_busy" and int(busy.headers["retry-after"]) >= 1
    assert small.status_code == 200 and result["status"] == 200
    # Fairness: the one-text request was answered while the 100-input request was still running.
    assert small_end < result["end"], (small_end, result["end"])


def test_openapi_documents_every_status(limited) -> None:
    with httpx.Client(base_url=limited.url, timeout=30) as c:
        doc = c.get("/openapi.json").json()
        metrics = c.get("/v1/metrics")
    for path in ("/v1/embeddings", "/embeddings"):
        statuses = set(doc["paths"][path]["post"]["responses"])
        assert {"200", "400", "401", "404", "413", "422", "429", "500"} <= statuses
        assert doc["paths"][path]["post"]["security"] == [{"bearer": []}]
    assert set(doc["paths"]["/v1/health/ready"]["get"]["responses"]) >= {"200", "503"}
    assert "security" not in doc["paths"]["/v1/health/ready"]["get"]  # probes stay open
    content = doc["paths"]["/v1/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == [metrics.headers["content-type"]]  # not JSON: the Prometheus text format
    request = doc["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert all(option.get("minLength", option.get("minItems")) == 1 for option in request["input"]["anyOf"])


def test_stop_command_refuses_a_reused_pid_and_stops_our_server(onnx_dir: str, tmp_path: Path) -> None:
    from embed_assets.serving.process import is_alive, start_server, stop_recorded_server

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    handle = start_server(onnx_dir, log_path=str(tmp_path / "server.log"), ready_timeout=120)
    try:
        assert handle.create_time is not None and "embed_assets.serving" in " ".join(handle.cmdline)
        assert handle.as_metadata()["create_time"] == handle.create_time
        assert is_alive(handle.pid, handle.create_time)
        assert not is_alive(handle.pid, handle.create_time + 100)  # another process with this PID
        assert not stop_recorded_server(stranger.pid)  # not a server: left alone
        assert stranger.poll() is None

        def cli(*args: str) -> subprocess.CompletedProcess:
            env = dict(
                os.environ,
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            )
            cmd = [sys.executable, "-m", "embed_assets.serving.process", "stop", *args]
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)

        wrong = cli("--pid", str(handle.pid), "--create-time", str(handle.create_time + 100))
        assert wrong.returncode == 3 and "left it alone" in wrong.stdout
        assert handle.is_alive()
        done = cli("--pid", str(handle.pid), "--create-time", repr(handle.create_time))
        assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
        handle._process.wait(timeout=10)
        assert not handle.is_alive()
        assert cli("--pid", str(handle.pid)).returncode == 0  # not running any more: nothing to do
    finally:
        handle.stop()
        stranger.kill()
        stranger.wait()


# ------------------------------------------------------------------------------ identity and prompted models


@pytest.fixture(scope="module")
def prompted(onnx_dir: str, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("prompted")
    folder = prompted_copy(onnx_dir, root / "onnx", IDENTITY)
    with running_server(folder, root / "server.log", KEY_ENV, KEY) as handle:
        yield handle, folder


def test_models_report_the_served_identity(prompted) -> None:
    handle, _ = prompted
    with httpx.Client(base_url=handle.url, headers=AUTH, timeout=30) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert c.get(f"/v1/models/{MODEL}").json() == card
        metrics = c.get("/v1/metrics").text
    served = card["embed_assets"]
    assert {k: served[k] for k in IDENTITY} == IDENTITY
    assert served["variant"] == "fp32" and served["identity_file"] == "embed_assets_model.json"
    assert served["query_prefix"] == "query: " and served["passage_prefix"] == "passage: "
    assert 'source="finetuned"' in metrics and 'checkpoint_run_id="ckpt-2f7a"' in metrics
    log = Path(handle.log_path).read_text()
    line = next(line for line in log.splitlines() if "serving all-MiniLM-L6-v2" in line)
    assert "onnx fp32" in line and "source finetuned, checkpoint run ckpt-2f7a, dagster run run-91b3" in line
    assert "mlflow run mlf-44d0" in line and "base model all-MiniLM-L6-v2" in line


def test_prompted_model_needs_input_type_or_a_model_suffix(prompted, onnx_dir: str) -> None:
    from embed_assets.serving.embedder import OnnxEmbedder

    handle, folder = prompted
    local = OnnxEmbedder(folder)
    texts = ["what is a coroutine?"]
    with httpx.Client(base_url=handle.url, headers=AUTH, timeout=30) as c:
        missing = c.post("/v1/embeddings", json={"input": texts})
        assert missing.status_code == 400
        err = missing.json()["error"]
        assert err["code"] == "input_type_required" and f"{MODEL}-query" in err["message"]
        for kind in ("query", "passage"):
            explicit = c.post("/v1/embeddings", json={"input": texts, "input_type": kind}).json()
            suffixed = c.post("/v1/embeddings", json={"input": texts, "model": f"{MODEL}-{kind}"}).json()
            assert explicit["data"] == suffixed["data"]
            got = np.array([explicit["data"][0]["embedding"]], dtype=np.float32)
            assert (got * local.encode(texts, input_type=kind)).sum() > 0.9999
        query = np.array(
            c.post("/v1/embeddings", json={"input": texts, "input_type": "query"}).json()["data"][0][
                "embedding"
            ]
        )
        passage = np.array(
            c.post("/v1/embeddings", json={"input": texts, "input_type": "passage"}).json()["data"][0][
                "embedding"
            ]
        )
    assert float(query @ passage) < 0.999  # the prompts are applied


def test_unreadable_identity_file_fails_the_start_naming_it(onnx_dir: str, tmp_path: Path) -> None:
    from embed_assets.serving.process import start_server

    folder = prompted_copy(onnx_dir, tmp_path / "onnx", raw_identity="{not json")
    with pytest.raises(RuntimeError, match="exited with code") as err:
        start_server(folder, log_path=str(tmp_path / "server.log"), ready_timeout=120)
    assert "embed_assets_model.json: not readable JSON" in str(err.value)


# ---------------------------------------------------------------------------------------- NIM response shapes

# The NIM API reference (NeMo Retriever Text Embedding NIM 2.x, "API Reference", Response Body): the answer
# has object ("list"), data, model, usage; each item of data has object ("embedding"), index and embedding
# ("embedding vector or packed compressed embedding values"); usage is OpenAI's prompt_tokens/total_tokens.
# additionalProperties=false: the server returns no field the reference does not define.
NIM_EMBEDDINGS_RESPONSE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer", "minimum": 0},
                    "embedding": {
                        "anyOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string", "contentEncoding": "base64"},
                        ]
                    },
                },
            },
        },
        "usage": {
            "type": "object",
            "additionalProperties": False,
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer", "minimum": 0},
                "total_tokens": {"type": "integer", "minimum": 0},
            },
        },
    },
}
# The reference's health answers, verbatim.
NIM_READY = {"object": "health.response", "message": "ready", "ready": True}
NIM_LIVE = {"object": "health.response", "message": "live", "live": True}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"encoding_format": "base64"},
        {"dimensions": 64},
        {"embedding_type": "binary"},
        {"embedding_type": "ubinary", "encoding_format": "base64"},
    ],
)
def test_responses_have_the_nim_reference_shape(prompted, options: dict) -> None:
    import jsonschema

    handle, _ = prompted
    with httpx.Client(base_url=handle.url, headers=AUTH, timeout=30) as c:
        body = {"input": ["shape one", "shape two"], "model": MODEL, "input_type": "passage", **options}
        resp = c.post("/v1/embeddings", json=body)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        jsonschema.validate(resp.json(), NIM_EMBEDDINGS_RESPONSE)
        assert [d["index"] for d in resp.json()["data"]] == [0, 1] and resp.json()["model"] == MODEL
        assert c.get("/v1/health/ready").json() == NIM_READY
        assert c.get("/v1/health/live").json() == NIM_LIVE


# ------------------------------------------------------------------------------------------------ schemathesis


@pytest.mark.slow
def test_schemathesis_finds_no_failure(limited, tmp_path: Path) -> None:
    """All of schemathesis' checks (bounded examples, fixed seed) against the real server: every phase
    (examples, coverage, fuzzing, stateful) passes. ``positive_data_acceptance`` is replaced by the
    tokenization-aware variant in ``schemathesis_hooks.py`` (see there); every other check runs as shipped."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{limited.url}/openapi.json", "--checks", "all"]
    cmd += ["--exclude-checks", "positive_data_acceptance", "--max-examples", "25", "--seed", "1"]
    cmd += ["-H", f"Authorization: Bearer {KEY}", "--workers", "1"]  # bounded by --max-examples, not time
    env = dict(
        os.environ,
        SCHEMATHESIS_HOOKS="embed_assets_tests.schemathesis_hooks",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        NO_COLOR="1",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout
    assert re.search(r"Tested: 9\b", proc.stdout)  # every documented operation was exercised
