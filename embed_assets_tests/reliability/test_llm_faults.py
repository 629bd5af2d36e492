"""A misbehaving LLM endpoint: every fault is retried, then the chunk is recorded as failed (the run goes on),
and the next run repeats none of the finished work and ends with the records of a clean run.

test_sdg_llm.py covers single recoverable faults (one 429 with Retry-After, one 500/503, one slow answer),
persistent prose and an outage; here every fault kind is persistent for one chunk, followed by a resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from embed_assets.records import Chunk
from embed_assets.sdg.cache import SDGCache
from embed_assets.sdg.llm import LLMEndpoint, LLMQAGenerator
from embed_assets.sdg.runner import run_generation
from embed_assets.sdg.settings import SDGSettings
from embed_assets.serving.process import free_port
from embed_assets_tests.openai_stub_server import Fault, OpenAIStub
from embed_assets_tests.reliability.workers import SDG_DOCS, hashing_embedder, sdg_chunks

MAX_RETRIES = 2
VICTIM = SDG_DOCS["doc2.md"][0]  # the chunk whose requests fail


def make_gen(base_url: str, sleeps: list[float] | None = None, **overrides) -> LLMQAGenerator:
    values = dict(
        generator="llm",
        num_pairs=3,
        bundle_size=1,
        max_retries=MAX_RETRIES,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        timeout_s=5.0,
    )
    values.update(overrides)
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    endpoint = LLMEndpoint(base_url, "stub-model")
    return LLMQAGenerator(SDGSettings(**values), endpoint, embedder=hashing_embedder, sleep=sleep)


def answered(stub: OpenAIStub) -> list[tuple[str, bool, tuple[str, ...]]]:
    """The requests that got a good answer (HTTP 200 and no scripted fault)."""
    return [(c.step, c.repair, tuple(c.segments)) for c in stub.calls if c.status == 200 and not c.fault]


def victim_id(chunks: list[Chunk]) -> str:
    return next(c.chunk_id for c in chunks if c.text == VICTIM)


@pytest.fixture(scope="module")
def clean_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The records of an undisturbed run (the reference every resumed run must end with)."""
    with OpenAIStub() as stub:
        cache = SDGCache(tmp_path_factory.mktemp("clean"))
        result = run_generation(make_gen(stub.base_url), sdg_chunks(), cache)
        assert result.stats.failed_chunk_ids == [] and stub.count() == 36
    return [r.to_dict() for r in result.records]


FAULTS = {
    "429_forever": (
        Fault("status", status=429, retry_after="0", times=None),
        "request_failed",
        1 + MAX_RETRIES,
    ),
    "500_forever": (Fault("status", status=500, times=None), "request_failed", 1 + MAX_RETRIES),
    "503_retry_after": (
        Fault("status", status=503, retry_after="1", times=None),
        "request_failed",
        1 + MAX_RETRIES,
    ),
    "html_instead_of_json": (Fault("envelope", times=None), "request_failed", 1 + MAX_RETRIES),
    "prose_instead_of_json": (Fault("garbage", times=None), "invalid_json", 2),  # + one repair request
    "truncated_json": (Fault("malformed", times=None), "invalid_json", 2),
    "schema_violation": (Fault("schema", times=None), "invalid_json", 2),
    "timeout": (Fault("slow", delay_s=1.5, times=None), "request_failed", 1 + MAX_RETRIES),
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_fault_is_retried_recorded_failed_then_resumed_without_repeats(
    kind: str, stub: OpenAIStub, tmp_path: Path, clean_records: list[dict]
) -> None:
    fault, reason, attempts = FAULTS[kind]
    fault.step, fault.match = "qa_generation", VICTIM  # the victim's extraction succeeds and is cached
    stub.faults.append(fault)
    chunks = sdg_chunks()
    cache = SDGCache(tmp_path)
    sleeps: list[float] = []
    timeout = 0.4 if kind == "timeout" else 5.0
    first = run_generation(make_gen(stub.base_url, sleeps, timeout_s=timeout), chunks, cache)

    # retried, then recorded as failed; every other chunk is done
    stats = first.stats
    assert stats.failed_chunk_ids == [victim_id(chunks)] and stats.chunks_failed == 1
    assert stats.dropped[reason] == 1 and stats.bundles_failed == 1
    victim_calls = [c for c in stub.calls if c.step == "qa_generation" and VICTIM in c.segments]
    assert len(victim_calls) == attempts, [(c.status, c.fault) for c in victim_calls]
    # requests are counted one by one: every failed attempt, or every answer that was not valid JSON
    failed_requests = stats.calls_invalid if reason == "invalid_json" else stats.calls_failed
    assert failed_requests == attempts and stats.calls_made == stub.count()
    assert stats.drop_examples[reason].startswith("doc2.md (1 chunk): qa_generation: ")
    assert all(c.fault == fault.kind for c in victim_calls)
    assert len(first.records) == len(clean_records) - sum(
        r["positive_chunk_ids"][0] == victim_id(chunks) for r in clean_records
    )
    if kind == "503_retry_after":
        assert sleeps.count(1.0) == MAX_RETRIES  # the server's Retry-After, not the 0.01 s backoff
    done_first = answered(stub)

    # the next run (endpoint healthy again) only asks what is missing: the victim's QA and judge calls
    stub.reset()
    second = run_generation(make_gen(stub.base_url), chunks, cache)
    assert second.stats.failed_chunk_ids == []
    done_second = answered(stub)
    assert not set(done_first) & set(done_second), "a finished call was repeated"
    assert sorted((s, tuple(seg)) for s, _, seg in done_second) == [
        ("qa_generation", (VICTIM,)),
        ("quality_judge", (VICTIM,)),
    ]
    # doc2.md is one unit: its other chunk's 3 answers and the victim's extraction come from the call cache
    assert second.stats.chunks_reused == len(chunks) - 1 and second.stats.calls_reused == 4
    assert [r.to_dict() for r in second.records] == clean_records


def test_retry_after_is_capped(stub: OpenAIStub, tmp_path: Path) -> None:
    """A server asking to come back in two hours does not stall the run for two hours per attempt."""
    stub.faults.append(Fault("status", status=429, retry_after="7200", match=VICTIM, times=None))
    sleeps: list[float] = []
    result = run_generation(make_gen(stub.base_url, sleeps), sdg_chunks(), SDGCache(tmp_path))
    assert result.stats.chunks_failed == 1
    assert sleeps == [600.0] * MAX_RETRIES


def test_endpoint_down_fails_every_chunk_without_crashing_then_resumes(
    stub: OpenAIStub, tmp_path: Path, clean_records: list[dict]
) -> None:
    chunks = sdg_chunks()
    cache = SDGCache(tmp_path)
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    first = run_generation(make_gen(down), chunks, cache)
    assert first.records == [] and sorted(first.stats.failed_chunk_ids) == sorted(c.chunk_id for c in chunks)
    assert first.stats.dropped["request_failed"] == len(chunks)
    assert first.stats.calls_made == first.stats.calls_failed == len(chunks) * (1 + MAX_RETRIES)
    assert first.stats.bundles_failed == first.stats.bundles_total == len(chunks)
    assert first.stats.check_requests == 2  # the endpoint check did not stop the run either
    assert cache.records() == [] and cache.raw_entries() == []  # nothing half-done was cached

    second = run_generation(make_gen(stub.base_url), chunks, cache)
    assert second.stats.failed_chunk_ids == [] and stub.count() == 36
    assert [r.to_dict() for r in second.records] == clean_records
