"""The LLM synthetic-QA generator against a real, scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from embed_assets.records import Chunk, QARecord, content_hash
from embed_assets.sdg.base import SDGResult, SDGStats
from embed_assets.sdg.cache import SDGCache
from embed_assets.sdg.llm import (
    LLMConfigError,
    LLMEndpoint,
    LLMQAGenerator,
    _retry_after,
    render,
    sentence_transformer_embedder,
)
from embed_assets.sdg.runner import ProgressMeter, run_generation
from embed_assets.sdg.schemas import AnswerError, QAAnswer, extract_json, parse_answer
from embed_assets.sdg.settings import SDGSettings
from embed_assets_tests.openai_stub_server import Fault, OpenAIStub

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SECRET = "sk-live-SECRET-7f3a9c0e1d2b"

DOCS = {
    "mining.md": [
        "Copper was mined in the northern valley for two centuries. The last mine closed in 1921. "
        "Most miners then moved to the fishing villages on the coast.",
        "A narrow-gauge railway reached the valley in 1887. Its trains carried ore down to the harbor. "
        "The line was electrified after the Second World War.",
        "Acid drainage from the old shafts still colors the river orange. A treatment plant was built in 1998. "
        "Trout returned to the lower river a decade later.",
    ],
    "tidal.md": [
        "Tidal turbines are inspected by divers every spring. Barnacles on the blades reduce the output. "
        "Corrosion of the gearbox housing is the main failure cause.",
        "The array feeds a substation through a single export cable. A cable fault in 2019 stopped production "
        "for six weeks. A second cable is now planned.",
    ],
    "bread.md": [
        "Sourdough relies on a starter of wild yeast and lactic bacteria. Bakers feed it with flour and water "
        "every day. A cold overnight proof deepens the sour flavor.",
    ],
}


def make_chunks(docs: dict[str, list[str]]) -> list[Chunk]:
    return [
        Chunk(content_hash(text), doc_id, text, 3 * i, 3 * i + 3)
        for doc_id, texts in docs.items()
        for i, text in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def embedder():
    embed = sentence_transformer_embedder("bundled:all-MiniLM-L6-v2")
    embed(["warm up"])
    return embed


@pytest.fixture
def stub():
    with OpenAIStub(required_key=SECRET) as server:
        yield server


def make_gen(
    stub: OpenAIStub,
    embedder,
    cache: SDGCache | None,
    api_key: str = SECRET,
    model: str = "stub-model",
    log: logging.Logger | None = None,
    **overrides,
) -> LLMQAGenerator:
    values = dict(
        generator="llm",
        num_pairs=3,
        bundle_size=2,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        timeout_s=5.0,
    )
    values.update(overrides)
    return LLMQAGenerator(
        SDGSettings(**values),
        LLMEndpoint(stub.base_url, model, api_key),
        cache=cache,
        embedder=embedder,
        log=log,
    )


def n_bundles(docs: dict[str, list[str]], bundle_size: int) -> int:
    return sum(-(-len(texts) // bundle_size) for texts in docs.values())


def answered_keys(stub: OpenAIStub) -> list[tuple[str, bool, tuple[str, ...]]]:
    return [(c.step, c.repair, tuple(c.segments)) for c in stub.calls if c.status == 200]


# ---------------------------------------------------------------------------------------------- records


def test_records_have_fields_and_positive_ids(stub, embedder, tmp_path):
    chunks = make_chunks(DOCS)
    by_id = {c.chunk_id: c for c in chunks}
    gen = make_gen(stub, embedder, SDGCache(tmp_path), qa_model="stub-qa", judge_model="stub-judge")
    result = gen.generate(chunks)
    stats = result.stats

    assert result.records, stats
    assert stats.failed_chunk_ids == [] and stats.calls_failed == 0 and stats.bundles_failed == 0
    assert stats.calls_made == stub.count() == 3 * n_bundles(DOCS, 2)
    assert stats.bundles_total == n_bundles(DOCS, 2)
    # the endpoint check at start: GET /v1/models (the stub does not list models) + the model-name probe
    assert stats.check_requests == 2 and stub.model_list_requests == 1 and len(stub.checks) == 1
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    assert stats.chunks_generated == len(chunks) and stats.pairs_kept == len(result.records)
    assert {c.model for c in stub.calls if c.step == "artifact_extraction"} == {"stub-model"}
    assert {c.model for c in stub.calls if c.step == "qa_generation"} == {"stub-qa"}
    assert {c.model for c in stub.calls if c.step == "quality_judge"} == {"stub-judge"}
    multi_hop = 0
    for r in result.records:
        assert isinstance(r, QARecord) and r.query and r.answer
        assert r.generator == "llm" and r.model == "stub-qa"
        assert r.positive_chunk_ids and all(cid in by_id for cid in r.positive_chunk_ids)
        assert all(by_id[cid].doc_id == r.doc_id for cid in r.positive_chunk_ids)
        assert r.query_type in {"multi_hop", "structural", "contextual"}
        assert r.reasoning_type and 2 <= r.complexity <= 5
        assert set(r.quality) == {"relevance", "accuracy", "context_support", "clarity", "overall"}
        assert r.quality["overall"] >= 7.0
        # the stub answers with a sentence of the first named segment: the ids must point at that chunk
        assert r.answer in by_id[r.positive_chunk_ids[0]].text
        if r.query_type == "multi_hop":
            multi_hop += 1
            assert len(r.positive_chunk_ids) == 2
    assert multi_hop >= 1
    assert len({r.qa_id for r in result.records}) == len(result.records)


def test_bundling_puts_several_chunks_of_one_document_in_one_prompt(stub, embedder):
    chunks = make_chunks(DOCS)
    make_gen(stub, embedder, None, bundle_size=3).generate(chunks)
    extraction = [c for c in stub.calls if c.step == "artifact_extraction"]
    assert sorted(len(c.segments) for c in extraction) == [1, 2, 3]  # one prompt per document
    for call in extraction:
        docs = {doc for doc, texts in DOCS.items() for text in texts if text in call.segments}
        assert len(docs) == 1  # never mixes documents

    stub.reset()
    make_gen(stub, embedder, None, bundle_size=1).generate(chunks)
    assert stub.count("artifact_extraction") == len(chunks)
    assert all(len(c.segments) == 1 for c in stub.calls)


def test_settings_reach_the_request_body(stub, embedder):
    make_gen(
        stub, embedder, None, json_mode=True, max_tokens_extraction=1234, max_tokens_qa=0, max_tokens_judge=77
    ).generate(make_chunks({"bread.md": DOCS["bread.md"]}))
    body = stub.calls[0].body
    assert body["temperature"] == 0.6 and body["top_p"] == 0.95 and body["max_tokens"] == 1234
    assert body["response_format"] == {"type": "json_object"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    budgets = {c.step: c.body.get("max_tokens") for c in stub.calls}
    assert budgets == {"artifact_extraction": 1234, "qa_generation": None, "quality_judge": 77}
    assert stub.calls[0].authorization == f"Bearer {SECRET}"
    assert "Generate 3 question-answer pairs" in next(
        m["content"]
        for c in stub.calls
        if c.step == "qa_generation"
        for m in c.body["messages"]
        if m["role"] == "user"
    )


# ---------------------------------------------------------------------------------------------- answers


def test_malformed_json_gets_one_repair_request(stub, embedder):
    stub.faults.append(Fault("malformed", step="qa_generation", repair=False, times=1))
    chunks = make_chunks({"bread.md": DOCS["bread.md"]})
    result = make_gen(stub, embedder, None).generate(chunks)
    assert result.records and result.stats.failed_chunk_ids == []
    assert stub.count("qa_generation", repair=True) == 1
    first = next(c for c in stub.calls if c.step == "qa_generation" and not c.repair)
    repair = next(c for c in stub.calls if c.repair)
    # a fresh, small conversation: the error, the bad answer quoted, the schema; not the segments again
    assert [m["role"] for m in repair.body["messages"]] == ["system", "user"]
    last = repair.body["messages"][-1]["content"]
    assert last.startswith("REPAIR of TASK: qa_generation") and "invalid JSON" in last
    assert '{"pairs": [{"question": "unterminated' in last
    assert DOCS["bread.md"][0] not in last and "[Segment 1]" not in last
    assert len(last) < len(first.body["messages"][-1]["content"])
    assert result.stats.calls_made == stub.count() == 4
    assert result.stats.calls_invalid == 1 and result.stats.calls_repair == 1


def test_schema_violation_is_repaired(stub, embedder):
    stub.faults.append(Fault("schema", step="quality_judge", repair=False, times=1))
    result = make_gen(stub, embedder, None).generate(make_chunks({"bread.md": DOCS["bread.md"]}))
    assert result.records and result.stats.dropped == Counter()
    repair = next(c for c in stub.calls if c.repair)
    assert (
        "evaluations: Input should be a valid list (got string 'none')"
        in repair.body["messages"][-1]["content"]
    )


def test_persistent_garbage_is_a_recorded_drop_not_a_crash(stub, embedder, tmp_path):
    chunks = make_chunks(DOCS)
    bread = [c.chunk_id for c in chunks if c.doc_id == "bread.md"]
    stub.faults.append(Fault("garbage", step="qa_generation", match=DOCS["bread.md"][0], times=None))
    cache = SDGCache(tmp_path)
    result = run_generation(make_gen(stub, embedder, cache), chunks, cache)
    stats = result.stats
    assert stats.failed_chunk_ids == bread and stats.chunks_failed == 1
    assert stats.dropped["invalid_json"] == 1 and stats.bundles_failed == 1
    assert stats.calls_failed == 0 and stats.calls_invalid == 2  # every request was answered, badly
    assert {r.doc_id for r in result.records} == {"mining.md", "tidal.md"}
    assert stub.count("qa_generation", repair=True) == 1  # exactly one repair, then give up
    (row,) = stats.drop_table()
    assert row["reason"] == "invalid_json" and row["count"] == 1
    assert row["example"].startswith("bread.md (1 chunk): qa_generation: the answer contains no JSON object")

    # the failed document is retried next time (not cached); only its unfinished calls are made
    stub.reset()
    again = run_generation(make_gen(stub, embedder, cache), chunks, cache)
    assert again.stats.failed_chunk_ids == [] and {r.doc_id for r in again.records} == set(DOCS)
    assert [c.step for c in stub.calls] == ["qa_generation", "quality_judge"]
    assert again.stats.chunks_reused == len(chunks) - 1 and again.stats.chunks_generated == 1


def test_unknown_segment_and_low_complexity_pairs_are_dropped(stub, embedder):
    def builder(segments, n):
        good = {"answer": "a", "query_type": "contextual", "reasoning_type": "factual", "complexity": 3}
        return [
            {**good, "question": "Which cable failed in 2019?", "segment_ids": [1]},
            {**good, "question": "What did the divers find on the blades?", "segment_ids": [99]},
            {**good, "question": "How long did production stop?", "segment_ids": [1], "complexity": 1},
        ]

    stub.qa_builder = builder
    result = make_gen(stub, embedder, None).generate(make_chunks({"tidal.md": DOCS["tidal.md"]}))
    assert [r.query for r in result.records] == ["Which cable failed in 2019?"]
    assert result.stats.dropped == Counter({"unknown_segment": 1, "complexity": 1})
    assert result.stats.pairs_generated == 3 and result.stats.pairs_kept == 1
    assert result.stats.drop_examples == {
        "unknown_segment": "segment_ids [99] not in 1..2: 'What did the divers find on the blades?'",
        "complexity": "complexity 1 < min_complexity 2: 'How long did production stop?'",
    }


def test_dedup_drops_near_duplicate_questions_within_a_document(stub, embedder):
    def builder(segments, n):
        pairs = []
        for sid, text in segments.items():
            topic = " ".join(text.split()[:4]).lower()
            for verb in ("say", "state"):
                pairs.append(
                    {
                        "question": f"What does the report {verb} about {topic}?",
                        "answer": text.split(".")[0],
                        "query_type": "contextual",
                        "reasoning_type": "factual",
                        "complexity": 2,
                        "segment_ids": [sid],
                    }
                )
        return pairs

    stub.qa_builder = builder
    docs = {"mining.md": DOCS["mining.md"], "copy.md": DOCS["mining.md"][:1]}
    result = make_gen(stub, embedder, None, num_pairs=6).generate(make_chunks(docs))
    stats = result.stats
    # mining.md: 2 bundles -> 3 segments x 2 paraphrases; one paraphrase of each dropped inside its bundle;
    # copy.md holds the same text as mining.md's first chunk but is another document: kept there
    assert stats.dropped["dedup"] == 4
    per_doc = Counter(r.doc_id for r in result.records)
    assert per_doc == {"mining.md": 3, "copy.md": 1}
    mining = [r.query for r in result.records if r.doc_id == "mining.md"]
    vectors = embedder(mining)
    sims = vectors @ vectors.T - np.eye(len(mining))
    assert sims.max() <= 0.9
    # the judge saw only the survivors (dedup runs before the judge)
    assert (
        sum(c.body["messages"][1]["content"].count("[Pair ") for c in stub.calls if c.step == "quality_judge")
        == 4
    )


def test_dedup_across_bundles_of_one_document(stub, embedder):
    text = DOCS["bread.md"][0]
    reworded = text.replace("Bakers feed it", "Bakers nourish it")
    chunks = [Chunk("c1", "bread.md", text, 0, 3), Chunk("c2", "bread.md", reworded, 3, 6)]
    stub.qa_builder = lambda segments, n: [
        {
            "question": "How often do bakers feed a sourdough starter with flour and water?",
            "answer": "Every day.",
            "query_type": "contextual",
            "reasoning_type": "procedural",
            "complexity": 2,
            "segment_ids": [1],
        }
    ]
    result = make_gen(stub, embedder, None, bundle_size=1).generate(chunks)
    assert len(result.records) == 1 and result.records[0].positive_chunk_ids == ["c1"]
    assert result.stats.dropped["dedup"] == 1


def test_quality_below_threshold_is_dropped(stub, embedder):
    stub.judge_overall = lambda question: 6.5 if "railway" in question.lower() else 8.0
    result = make_gen(stub, embedder, None).generate(make_chunks({"mining.md": DOCS["mining.md"]}))
    assert result.records
    assert all("railway" not in r.query.lower() for r in result.records)
    assert result.stats.dropped["quality"] >= 1
    assert all(r.quality["overall"] >= 7.0 for r in result.records)

    stub.reset()
    stub.judge_overall = lambda question: 6.5 if "railway" in question.lower() else 8.0
    lenient = make_gen(stub, embedder, None, quality_threshold=6.0).generate(
        make_chunks({"mining.md": DOCS["mining.md"]})
    )
    assert any("railway" in r.query.lower() for r in lenient.records)


# ---------------------------------------------------------------------------------------------- transport


def test_429_retry_after_is_honored(stub, embedder):
    stub.faults.append(Fault("status", status=429, retry_after="1", step="artifact_extraction", times=1))
    start = time.monotonic()
    result = make_gen(stub, embedder, None).generate(make_chunks({"bread.md": DOCS["bread.md"]}))
    elapsed = time.monotonic() - start
    assert result.records and result.stats.bundles_failed == 0 and result.stats.calls_failed == 1
    first, second = [c for c in stub.calls if c.step == "artifact_extraction"]
    assert first.status == 429 and second.status == 200
    waited = second.at - first.at
    assert 0.95 <= waited < 3.0, waited  # backoff base is 0.01 s: the second must come from Retry-After
    assert elapsed >= 0.95
    assert result.stats.calls_made == stub.count() == 4


def test_5xx_is_retried(stub, embedder):
    stub.faults.append(Fault("status", status=500, step="qa_generation", times=1))
    stub.faults.append(Fault("status", status=503, step="qa_generation", times=1))
    stub.faults.append(Fault("envelope", step="quality_judge", times=1))
    result = make_gen(stub, embedder, None).generate(make_chunks({"bread.md": DOCS["bread.md"]}))
    assert result.records and result.stats.bundles_failed == 0
    assert result.stats.calls_failed == 3 and result.stats.dropped == Counter()
    assert stub.count("qa_generation", status=500) == 1 and stub.count("qa_generation", status=503) == 1
    assert result.stats.calls_made == stub.count() == 6


def test_timeout_is_retried_then_the_chunk_is_recorded_failed(stub, embedder):
    chunks = make_chunks({"tidal.md": DOCS["tidal.md"], "bread.md": DOCS["bread.md"]})
    bread = [c.chunk_id for c in chunks if c.doc_id == "bread.md"]
    # tidal: one slow answer, then fine; bread: always too slow
    stub.faults.append(
        Fault("slow", delay_s=1.0, step="artifact_extraction", match=DOCS["tidal.md"][0], times=1)
    )
    stub.faults.append(
        Fault("slow", delay_s=1.0, step="artifact_extraction", match=DOCS["bread.md"][0], times=None)
    )
    gen = make_gen(stub, embedder, None, timeout_s=0.3, max_retries=1)
    start = time.monotonic()
    result = gen.generate(chunks)
    assert time.monotonic() - start < 5
    stats = result.stats
    assert stats.failed_chunk_ids == bread and stats.chunks_failed == 1
    assert stats.dropped["request_failed"] == 1 and stats.bundles_failed == 1
    assert stats.calls_failed == stats.calls_timed_out == 3  # tidal's first try, bread's two
    assert "timed out after 0.3s (gave up after 2 attempts)" in stats.drop_examples["request_failed"]
    assert {r.doc_id for r in result.records} == {"tidal.md"}
    assert len(stub.calls_with_text(DOCS["bread.md"][0])) == 2  # first attempt + one retry


def test_fatal_status_aborts_with_a_clear_error_without_the_key(stub, embedder, tmp_path):
    gen = make_gen(stub, embedder, SDGCache(tmp_path), api_key="sk-wrong-SECRET-0000", check_model=False)
    with pytest.raises(LLMConfigError) as info:
        run_generation(gen, make_chunks(DOCS), SDGCache(tmp_path))
    assert "401" in str(info.value) and "stub-model" in str(info.value)
    assert "sk-wrong-SECRET-0000" not in str(info.value)
    assert stub.calls[0].authorization == "Bearer sk-wrong-SECRET-0000"

    # with the check at start (the default) the key is refused before any SDG request
    stub.reset()
    gen = make_gen(stub, embedder, SDGCache(tmp_path), api_key="sk-wrong-SECRET-0000")
    with pytest.raises(LLMConfigError, match=r"HTTP 401 to GET /models.*Check the API key") as info:
        run_generation(gen, make_chunks(DOCS), SDGCache(tmp_path))
    assert "sk-wrong-SECRET-0000" not in str(info.value)
    assert stub.model_list_requests == 1 and stub.count() == 0


def test_api_key_is_sent_but_never_leaks(stub, embedder, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    chunks = make_chunks(DOCS)
    stub.faults += [
        Fault(
            "status",
            status=400,
            step="qa_generation",
            match=DOCS["bread.md"][0],
            body="bad request from {auth}",
        ),
        Fault("status", status=500, step="artifact_extraction", times=1, body="upstream error for {auth}"),
        Fault("garbage", step="quality_judge", match=DOCS["tidal.md"][0], times=None),
    ]
    lines: list[str] = []
    cache = SDGCache(tmp_path)
    gen = make_gen(stub, embedder, cache)
    result = run_generation(gen, chunks, cache, progress=lines.append)
    assert result.stats.chunks_failed == 3  # bread (HTTP 400) and tidal (judge garbage)
    assert all(c.authorization == f"Bearer {SECRET}" for c in stub.calls)
    assert lines and any("ETA" in line and "chunks/s" in line for line in lines)

    texts = [
        repr(result.stats),
        str(result.stats.as_metadata()),
        repr(gen),
        gen.fingerprint,
        caplog.text,
        *lines,
    ]
    texts += [r.to_dict().__repr__() for r in result.records]
    # every cache byte (the SQLite file and its write-ahead log)
    texts += [p.read_bytes().decode("utf-8", "replace") for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any("bad request from Bearer ***" in t for t in texts)  # the echoed key was redacted in the log
    assert not [t for t in texts if SECRET in t]
    assert cache.raw_entries() and cache.records()  # the scan above saw what was stored
    assert gen.fingerprint == make_gen(stub, embedder, cache, api_key="other", timeout_s=9).fingerprint


# ---------------------------------------------------------------------------------------------- cache


def test_second_run_makes_no_calls(stub, embedder, tmp_path):
    chunks = make_chunks(DOCS)
    cache = SDGCache(tmp_path)
    first = run_generation(make_gen(stub, embedder, cache), chunks, cache)
    calls = stub.count()
    assert calls == first.stats.calls_made == 3 * n_bundles(DOCS, 2)
    second = run_generation(make_gen(stub, embedder, cache), chunks, cache)
    assert stub.count() == calls
    assert second.stats.calls_made == 0 and second.stats.chunks_reused == len(chunks)
    assert second.stats.chunks_generated == 0
    assert [r.to_dict() for r in second.records] == [r.to_dict() for r in first.records]

    # the generator's own per-call cache answers too when used without the runner
    direct = make_gen(stub, embedder, cache).generate(chunks)
    assert stub.count() == calls
    assert direct.stats.calls_reused == calls and direct.stats.chunks_reused == len(chunks)
    assert [r.to_dict() for r in direct.records] == [r.to_dict() for r in first.records]


def test_changing_one_document_only_calls_for_its_chunks(stub, embedder, tmp_path):
    cache = SDGCache(tmp_path)
    run_generation(make_gen(stub, embedder, cache), make_chunks(DOCS), cache)
    before = stub.count()

    edited = {
        **DOCS,
        "tidal.md": [DOCS["tidal.md"][0], DOCS["tidal.md"][1].replace("six weeks", "nine weeks")],
    }
    stub.reset()
    result = run_generation(make_gen(stub, embedder, cache), make_chunks(edited), cache)
    assert stub.count() == 3  # tidal.md is one bundle of 2 chunks: extraction, QA, judge
    assert all("nine weeks" in " ".join(c.segments) for c in stub.calls)
    assert result.stats.chunks_reused == 4 and result.stats.chunks_generated == 2
    assert before == 3 * n_bundles(DOCS, 2) == 12

    # with one chunk per bundle, only the edited chunk's bundle is called again
    stub.reset()
    run_generation(make_gen(stub, embedder, cache, bundle_size=1), make_chunks(edited), cache)
    full = stub.count()
    edited2 = {**edited, "mining.md": [*DOCS["mining.md"][:2], DOCS["mining.md"][2].replace("1998", "1999")]}
    stub.reset()
    result = run_generation(make_gen(stub, embedder, cache, bundle_size=1), make_chunks(edited2), cache)
    assert full == 3 * 6 - 6  # bread.md and mining.md's 3rd chunk were 1-chunk bundles already: reused
    assert stub.count() == 3
    assert all("1999" in c.segments[0] for c in stub.calls)
    assert result.stats.chunks_generated == 1 and result.stats.chunks_reused == 5
    assert result.stats.calls_reused == 6  # the 2 unchanged chunks of mining.md: answers from the call cache


def test_interrupted_run_resumes_without_repeating_finished_calls(stub, embedder, tmp_path):
    chunks = make_chunks(DOCS)
    cache = SDGCache(tmp_path)
    stub.fail_after = 5  # an outage after 5 good answers
    # no cache handed to the generator: run_generation binds its own for the per-call answers
    first = run_generation(make_gen(stub, embedder, None, max_retries=1), chunks, cache)
    assert first.stats.chunks_failed > 0 and first.stats.dropped["request_failed"] > 0
    done_first = answered_keys(stub)
    assert len(done_first) == 5

    stub.reset()
    second = run_generation(make_gen(stub, embedder, None), chunks, cache)
    done_second = answered_keys(stub)
    assert second.stats.failed_chunk_ids == []
    assert not set(done_first) & set(done_second)  # nothing answered twice
    assert len(done_first) + len(done_second) == 3 * n_bundles(DOCS, 2)


def test_interrupt_by_exception_keeps_finished_work(stub, embedder, tmp_path):
    chunks = make_chunks(DOCS)
    cache = SDGCache(tmp_path)
    seen: list[str] = []

    class Interrupted(Exception):
        pass

    def explode(line: str) -> None:
        seen.append(line)
        raise Interrupted

    gen = make_gen(stub, embedder, cache, max_parallel_requests=1)
    with pytest.raises(Interrupted):
        run_generation(gen, chunks, cache, progress=explode)
    done_first = answered_keys(stub)
    assert seen and 0 < len(done_first) < 12

    stub.reset()
    result = run_generation(make_gen(stub, embedder, cache), chunks, cache)
    assert not set(done_first) & set(answered_keys(stub))
    assert len(done_first) + stub.count() == 12
    assert result.stats.failed_chunk_ids == [] and len({r.doc_id for r in result.records}) == 3


def test_prompt_or_model_change_invalidates(stub, embedder, tmp_path):
    chunks = make_chunks({"bread.md": DOCS["bread.md"]})
    cache = SDGCache(tmp_path)
    a = make_gen(stub, embedder, cache)
    run_generation(a, chunks, cache)
    b = make_gen(stub, embedder, cache, judge_model="other-judge")
    assert a.fingerprint != b.fingerprint
    c = LLMQAGenerator(a.settings, a.endpoint, embedder=embedder, embed_model="some/other-embedder")
    assert c.fingerprint != a.fingerprint and a.dedup_model == "bundled:all-MiniLM-L6-v2"
    assert c.dedup_model == "some/other-embedder"
    stub.reset()
    result = run_generation(b, chunks, cache)
    assert [c.step for c in stub.calls] == ["quality_judge"]  # extraction and QA answers still reused
    assert result.stats.calls_reused == 2 and result.stats.chunks_generated == 1


# ---------------------------------------------------------------------------------------------- runner


class CountingGenerator:
    """A trivial generator (stands in for the offline one): one record per chunk, fails on 'FAIL'."""

    name = "counting"
    model = "none"

    def __init__(self, tag: str = "v1", explode_on: str | None = None) -> None:
        self.tag, self.explode_on, self.seen = tag, explode_on, []

    @property
    def fingerprint(self) -> str:
        return self.tag

    def generate(self, chunks, progress=None) -> SDGResult:
        stats = SDGStats(chunks_total=len(chunks))
        records = []
        for c in chunks:
            self.seen.append(c.chunk_id)
            if self.explode_on and self.explode_on in c.text:
                raise RuntimeError("boom")
            if "FAIL" in c.text:
                stats.failed_chunk_ids.append(c.chunk_id)
                continue
            records.append(
                QARecord(
                    qa_id=c.chunk_id, query=f"q {c.text}", positive_chunk_ids=[c.chunk_id], doc_id=c.doc_id
                )
            )
        stats.pairs_generated = stats.pairs_kept = len(records)
        return SDGResult(records, stats)


def test_runner_with_any_generator(tmp_path):
    chunks = make_chunks({"d1": ["alpha one.", "beta FAIL.", "gamma three."], "d2": ["delta four."]})
    cache = SDGCache(tmp_path)
    gen = CountingGenerator()
    lines: list[str] = []
    first = run_generation(gen, chunks, cache, progress=lines.append)
    assert first.stats.chunks_generated == 3 and first.stats.chunks_failed == 1
    assert len(first.records) == 3 and lines[-1].startswith("sdg[counting]: 4/4 chunks")

    gen.seen.clear()
    second = run_generation(gen, chunks, cache)
    assert gen.seen == [chunks[1].chunk_id]  # only the failed unit is retried
    assert second.stats.chunks_reused == 3 and second.stats.chunks_generated == 0
    assert [r.qa_id for r in second.records] == [r.qa_id for r in first.records]

    other = CountingGenerator(tag="v2")
    run_generation(other, chunks, cache)
    assert len(other.seen) == 4  # another fingerprint: nothing reused

    boom = CountingGenerator(tag="v3", explode_on="gamma")
    with pytest.raises(RuntimeError):
        run_generation(boom, chunks, cache)
    resumed = CountingGenerator(tag="v3")
    run_generation(resumed, chunks, cache)
    assert resumed.seen == [chunks[1].chunk_id, chunks[2].chunk_id, chunks[3].chunk_id]


def test_progress_meter_reports_rate_and_eta():
    lines: list[str] = []
    meter = ProgressMeter(10, lines.append, label="x", every_s=0.0)
    meter.advance(4, cached=True)
    time.sleep(0.05)
    meter.advance(2)
    assert "6/10 chunks (60%, 4 cached, 0 failed)" in lines[-1] and "chunks/s" in lines[-1]
    assert "ETA" in lines[-1] and "ETA ?" not in lines[-1]


# ---------------------------------------------------------------------------------------------- parsing


def test_answer_parsing_and_validation():
    assert extract_json('<think>{"no": 1}</think>\n```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Sure! Here it is: {"a": {"b": [1]}} Hope it helps.') == {"a": {"b": [1]}}
    with pytest.raises(AnswerError, match="no JSON object"):
        extract_json("no json")
    with pytest.raises(AnswerError, match="invalid JSON"):
        extract_json('{"a": }')
    bad = {"pairs": [{"question": " ", "answer": "x", "query_type": "other", "reasoning_type": "factual",
                      "complexity": 9, "segment_ids": ["1"]}]}  # fmt: skip
    with pytest.raises(AnswerError) as info:
        parse_answer(json.dumps(bad), QAAnswer)
    errors = str(info.value).removeprefix("the JSON does not match the schema: ").split("; ")
    assert errors == [
        "pairs[0].question: String should have at least 1 character (got string ' ')",
        "pairs[0].query_type: Input should be 'multi_hop', 'structural' or 'contextual' (got string 'other')",
        "pairs[0].complexity: Input should be less than or equal to 5 (got integer 9)",
        "pairs[0].segment_ids[0]: Input should be a valid integer (got string '1')",
    ]
    with pytest.raises(AnswerError) as info:
        parse_answer('{"pairs": [{"complexity": true}]}', QAAnswer)
    assert str(info.value).startswith("the JSON does not match the schema: pairs[0].question: Field required")
    assert "pairs[0].complexity: Input should be a valid integer (got boolean True)" in str(info.value)
    with pytest.raises(AnswerError, match="pairs: List should have at least 1 item"):
        parse_answer('{"pairs": []}', QAAnswer)
    good = {
        **bad["pairs"][0],
        "question": " Why? ",
        "query_type": "contextual",
        "complexity": 3,
        "segment_ids": [2],
    }
    answer = parse_answer(json.dumps({"pairs": [good]}), QAAnswer)
    assert answer.pairs[0].question == "Why?" and answer.pairs[0].segment_ids == [2]


def test_render_and_retry_after():
    assert render("a {{x}} b", x=1) == "a 1 b"
    with pytest.raises(KeyError):
        render("a {{x}} {{y}}", x=1)
    assert _retry_after("2") == 2.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert _retry_after("100000") == 600.0


# ---------------------------------------------------------------------------------------------- protocol


class ListLog(logging.Logger):
    """A logger that keeps (level, message) pairs, as the Dagster asset's context.log would show them."""

    def __init__(self) -> None:
        super().__init__("test-sdg", logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def _log(self, level, msg, args, *rest, **kwargs) -> None:  # type: ignore[override]
        self.lines.append((level, str(msg) % args if args else str(msg)))

    def at(self, level: int) -> list[str]:
        return [m for lv, m in self.lines if lv == level]


def test_every_settings_field_is_classified_for_the_fingerprint():
    from embed_assets.sdg.llm import _NOT_OUTPUT_FIELDS, _OUTPUT_FIELDS

    assert not set(_OUTPUT_FIELDS) & set(_NOT_OUTPUT_FIELDS)
    assert set(_OUTPUT_FIELDS) | set(_NOT_OUTPUT_FIELDS) == set(SDGSettings.model_fields)


def test_settings_reject_unknown_and_out_of_range_values():
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        SDGSettings(max_tokens=512)  # the old single budget: now per step
    with pytest.raises(ValueError, match="generator"):
        SDGSettings(generator="gpt")
    with pytest.raises(ValueError, match="user_data_path"):
        SDGSettings(generator="user_data")
    with pytest.raises(ValueError, match="min_complexity"):
        SDGSettings(min_complexity=6)


def test_model_check_fails_naming_the_served_models(embedder):
    with OpenAIStub(served_models=["llama-3.1-8b", "qwen2.5-7b"], strict_models=True) as stub:
        gen = make_gen(stub, embedder, None, api_key="", model="stub-model", judge_model="qwen2.5-7b")
        with pytest.raises(LLMConfigError) as info:
            run_generation(gen, make_chunks(DOCS), None)
    message = str(info.value)
    assert "does not serve model(s) 'stub-model'" in message
    assert "it serves: 'llama-3.1-8b', 'qwen2.5-7b'" in message
    assert stub.count() == 0  # nothing was generated with a model that is not there


def test_model_check_passes_and_notices_servers_that_ignore_model_names(embedder):
    chunks = make_chunks({"bread.md": DOCS["bread.md"]})
    with OpenAIStub(served_models=["stub-model"], strict_models=True) as strict:
        log = ListLog()
        gen = make_gen(strict, embedder, None, api_key="", log=log)
        result = run_generation(gen, chunks, None)
        assert result.records and gen.endpoint_check.ignores_model_names is False
        assert gen.endpoint_check.served_models == ["stub-model"]
        assert [c.status for c in strict.checks] == [404] and log.at(logging.WARNING) == []
        assert result.stats.check_requests == 2

    with OpenAIStub(served_models=["stub-model"]) as lenient:  # answers any name, like llama.cpp
        log = ListLog()
        gen = make_gen(lenient, embedder, None, api_key="", log=log)
        run_generation(gen, chunks, None)
        assert gen.endpoint_check.ignores_model_names is True
        (warning,) = log.at(logging.WARNING)
        assert "ignores model names" in warning and "it lists 'stub-model'" in warning

    with OpenAIStub() as unlisted:  # no /v1/models route
        log = ListLog()
        gen = make_gen(unlisted, embedder, None, api_key="", log=log)
        run_generation(gen, chunks, None)
        assert gen.endpoint_check.served_models is None
        assert any("does not list its models" in w for w in log.at(logging.WARNING))
        # the check runs once per generator, not once per unit
        run_generation(gen, make_chunks({"tidal.md": DOCS["tidal.md"]}), None)
        assert unlisted.model_list_requests == 1 and len(unlisted.checks) == 1


def test_context_overflow_shrinks_the_completion_budget(embedder):
    """OpenAI/vLLM style: prompt + max_tokens must fit. The retry asks for what the context leaves."""
    chunks = make_chunks({"bread.md": DOCS["bread.md"]})
    with OpenAIStub(context_length=1200) as stub:
        log = ListLog()
        result = make_gen(
            stub, embedder, None, log=log, max_tokens_extraction=5000, max_tokens_qa=300, max_tokens_judge=300
        ).generate(chunks)
    stats = result.stats
    assert result.records and stats.dropped == Counter()
    first, second = [c for c in stub.calls if c.step == "artifact_extraction"]
    assert first.status == 400 and second.status == 200
    prompt = sum(len(m["content"].split()) for m in first.body["messages"])
    assert first.body["max_tokens"] == 5000 and second.body["max_tokens"] == 1200 - prompt - 16
    assert stats.context_overflows == 1 and stats.max_tokens_shrunk == 1 and stats.bundles_split == 0
    assert stats.calls_made == stub.count() == 4 and stats.calls_failed == 1
    assert any("context overflow, max_tokens 5000 -> " in m for m in log.at(logging.INFO))


def test_prompt_too_long_for_the_context_splits_the_bundle(embedder):
    """llama-cpp-python style: only the prompt must fit (max_tokens is clamped); a bundle whose prompt is
    too long is cut in halves until each fits, and every chunk still gets its pairs."""
    chunks = make_chunks({"mining.md": DOCS["mining.md"]})
    with OpenAIStub() as probe:  # how long the prompts of one-chunk bundles are
        make_gen(probe, embedder, None, bundle_size=1, num_pairs=2).generate(chunks)
    fits_one = max(sum(len(m["content"].split()) for m in c.body["messages"]) for c in probe.calls) + 1
    with OpenAIStub(context_length=fits_one, context_style="llama_cpp") as stub:
        result = make_gen(stub, embedder, None, bundle_size=3, num_pairs=2).generate(chunks)
    stats = result.stats
    assert any(len(c.segments) == 3 and c.status == 400 for c in stub.calls)  # the whole bundle did not fit
    answered_qa = [c for c in stub.calls if c.step == "qa_generation" and c.status == 200 and not c.fault]
    assert answered_qa and {len(c.segments) for c in answered_qa} <= {1, 2}  # its halves did
    assert stats.bundles_split >= 1 and stats.context_overflows >= 1 and stats.max_tokens_shrunk == 0
    assert stats.failed_chunk_ids == [] and stats.chunks_generated == 3
    assert {cid for r in result.records for cid in r.positive_chunk_ids} == {c.chunk_id for c in chunks}
    assert stats.calls_made == stub.count()


def test_a_single_chunk_too_long_for_the_context_is_dropped_with_the_servers_words(embedder):
    chunks = make_chunks({"bread.md": DOCS["bread.md"]})
    with OpenAIStub(context_length=100, context_style="llama_cpp") as stub:
        log = ListLog()
        result = make_gen(stub, embedder, None, log=log).generate(chunks)
    assert result.records == [] and result.stats.dropped == Counter({"context_overflow": 1})
    assert "maximum context length is 100 tokens" in result.stats.drop_examples["context_overflow"]
    # streamed, llama-cpp-python only ends the stream: asked once more without streaming, it says why; after
    # that no retry can help, the prompt itself is too long
    assert [(c.fault, c.status, c.body["stream"]) for c in stub.calls] == [
        ("empty_stream", 200, True),
        ("", 400, False),
    ]
    assert result.stats.calls_made == 2 and result.stats.context_overflows == 1
    (warning,) = [w for w in log.at(logging.WARNING) if w.startswith("SDG dropped")]
    assert warning.startswith(
        "SDG dropped the bundle of bread.md (1 chunk) [context_overflow]: artifact_extraction: "
    )


def test_repair_prompt_is_bounded_whatever_the_answer(stub, embedder):
    def rambling(segments, n):  # 60 pairs with an invalid field: a long answer that fails validation
        return [
            {"question": f"Question {i} " + "very " * 40, "answer": "a", "query_type": "rambling",
             "reasoning_type": "factual", "complexity": 3, "segment_ids": [1]}
            for i in range(60)
        ]  # fmt: skip

    stub.qa_builder = rambling
    result = make_gen(stub, embedder, None, repair_excerpt_chars=600, max_tokens_qa=0).generate(
        make_chunks({"bread.md": DOCS["bread.md"]})
    )
    first = next(c for c in stub.calls if c.step == "qa_generation" and not c.repair)
    repair = next(c for c in stub.calls if c.repair).body["messages"][-1]["content"]
    answer_chars = len(json.dumps({"pairs": rambling({}, 0)}))
    assert answer_chars > 15_000
    assert len(repair) < 600 + 600 + len(load_repair_template()) + 800  # excerpt + error + template + schema
    assert "characters left out" in repair and "... and " in repair  # excerpt cut, errors capped
    assert len(repair) < len(first.body["messages"][-1]["content"])
    assert result.stats.dropped["invalid_json"] == 1  # the stub cannot repair an answer it did not script


def load_repair_template() -> str:
    from embed_assets.sdg.llm import load_prompt

    return load_prompt("repair")


def test_answer_cut_off_at_max_tokens_gets_a_shorter_repair(stub, embedder):
    result = make_gen(stub, embedder, None, max_tokens_qa=12).generate(
        make_chunks({"bread.md": DOCS["bread.md"]})
    )
    first = next(c for c in stub.calls if c.step == "qa_generation" and not c.repair)
    repair = next(c for c in stub.calls if c.repair)
    text = repair.body["messages"][-1]["content"]
    assert first.body["max_tokens"] == 12 and repair.body["max_tokens"] == 12
    assert "finish_reason=length" in text and "cut off at the length limit" in text
    assert result.stats.calls_cut_off == 1 and result.stats.dropped["invalid_json"] == 1


def test_client_timeout_closes_the_stream_and_the_server_stops(stub, embedder):
    stub.faults.append(Fault("endless", step="artifact_extraction", delay_s=0.02, times=None))
    gen = make_gen(stub, embedder, None, timeout_s=0.5, max_retries=1)
    start = time.monotonic()
    result = gen.generate(make_chunks({"bread.md": DOCS["bread.md"]}))
    assert time.monotonic() - start < 5
    assert result.stats.dropped == Counter({"request_failed": 1})
    assert result.stats.calls_timed_out == 2
    for call in stub.calls:
        time.sleep(0.1) if not call.ended_at else None
        assert call.client_left and call.ended_at - call.at < 1.5  # stopped generating when the client left
        assert 0 < call.words_generated < 75


def test_without_streaming_the_server_keeps_generating_after_a_timeout(stub, embedder):
    """What streaming is for: a non-streamed request that timed out keeps the server busy to the end."""
    stub.faults.append(Fault("endless", step="artifact_extraction", delay_s=0.02, duration_s=2.0, times=1))
    gen = make_gen(stub, embedder, None, timeout_s=0.5, max_retries=0, stream=False)
    result = gen.generate(make_chunks({"bread.md": DOCS["bread.md"]}))
    assert result.stats.dropped == Counter({"request_failed": 1})
    call = stub.calls[0]
    deadline = time.monotonic() + 5
    while not call.ended_at and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call.ended_at - call.at >= 1.9 and call.words_generated > 75  # ran to its end, unread


def test_interrupted_stream_is_retried(stub, embedder):
    stub.faults.append(Fault("interrupt", step="qa_generation", times=1))
    result = make_gen(stub, embedder, None).generate(make_chunks({"bread.md": DOCS["bread.md"]}))
    assert result.records and result.stats.dropped == Counter()
    assert result.stats.calls_failed == 1 and stub.count("qa_generation") == 2


def test_system_prompt_as_user(stub, embedder):
    make_gen(stub, embedder, None, system_prompt_as_user=True).generate(
        make_chunks({"bread.md": DOCS["bread.md"]})
    )
    for call in stub.calls:
        (message,) = call.body["messages"]
        assert message["role"] == "user"
        assert (
            message["content"].startswith("You are a meticulous assistant") and "TASK: " in message["content"]
        )


def test_drop_table_rows_and_merge():
    from embed_assets.sdg.runner import merge_stats

    a, b = SDGStats(), SDGStats()
    a.drop("quality", "overall 3 < 7: 'Why?'")
    b.drop("quality", "overall 2 < 7: 'How?'", n=2)
    b.drop("invalid_json", "x" * 1000)
    merge_stats(a, b)
    assert a.drop_table() == [
        {"reason": "quality", "count": 3, "example": "overall 3 < 7: 'Why?'"},
        {"reason": "invalid_json", "count": 1, "example": "x" * 299 + "…"},
    ]
    assert a.as_metadata()["dropped_quality"] == 3


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (  # llama-cpp-python 0.3.36 and OpenAI
            '{"error": {"message": "This model\'s maximum context length is 2048 tokens. However, you requested '
            "2592 tokens (2080 in the messages, 512 in the completion). Please reduce the length of the messages "
            'or completion.", "type": "invalid_request_error", "param": "messages", "code": '
            '"context_length_exceeded"}}',
            (2048, 2080),
        ),
        (  # vLLM >= 0.8
            '{"object": "error", "message": "\'max_tokens\' or \'max_completion_tokens\' is too large: 2000. This '
            "model's maximum context length is 2048 tokens and your request has 600 input tokens (2000 > 2048 - "
            '600).", "type": "BadRequestError", "code": 400}',
            (2048, 600),
        ),
        (  # llama.cpp llama-server
            '{"error": {"code": 400, "message": "the request exceeds the available context size, try increasing '
            'it", "type": "exceed_context_size_error", "n_prompt_tokens": 2592, "n_ctx": 2048}}',
            (2048, 2592),
        ),
        ('{"error": {"message": "temperature must be <= 2"}}', None),
    ],
)
def test_context_overflow_messages_of_real_servers(body, expected):
    from embed_assets.sdg.llm import parse_context_overflow

    found = parse_context_overflow(400, body)
    assert (None if found is None else (found.context_tokens, found.prompt_tokens)) == expected
    assert parse_context_overflow(500, body) is None


def test_pairs_of_a_bundle_split_at_the_judge_are_dropped_with_a_reason(embedder):
    """When only the judge's prompt overflows, the bundle's pairs are not judged: they are dropped as
    ``superseded_by_split`` (counted, with an example) and each half generates and judges its own."""

    def wordy(segments, n):  # long answers make the judge's listing the longest prompt of a bundle
        return [
            {"question": f"What does segment {sid} say about topic {k}?", "answer": f"{text} " * 6,
             "query_type": "contextual", "reasoning_type": "factual", "complexity": 3, "segment_ids": [sid]}
            for k, (sid, text) in enumerate(sorted(segments.items()) * 2)
        ][:n]  # fmt: skip

    chunks = make_chunks({"tidal.md": DOCS["tidal.md"]})

    def prompt_words(stub: OpenAIStub, step: str) -> list[int]:
        return [
            sum(len(m["content"].split()) for m in c.body["messages"]) for c in stub.calls if c.step == step
        ]

    with OpenAIStub() as probe:
        probe.qa_builder = wordy
        make_gen(probe, embedder, None, bundle_size=2, dedup_threshold=1.0).generate(chunks)
        (judge_two,) = prompt_words(probe, "quality_judge")
        longest_other = max(prompt_words(probe, "artifact_extraction") + prompt_words(probe, "qa_generation"))
        probe.reset()
        make_gen(probe, embedder, None, bundle_size=1, dedup_threshold=1.0).generate(chunks)
        judge_one = max(prompt_words(probe, "quality_judge"))
    assert longest_other < judge_two and judge_one < judge_two  # the precondition of this test

    with OpenAIStub(context_length=judge_two, context_style="llama_cpp") as stub:
        stub.qa_builder = wordy
        result = make_gen(stub, embedder, None, bundle_size=2, dedup_threshold=1.0).generate(chunks)
    stats = result.stats
    assert stats.bundles_split == 1 and stats.bundles_total == 3 and stats.bundles_failed == 0
    assert stats.dropped == Counter({"superseded_by_split": 3})
    assert stats.drop_examples["superseded_by_split"].startswith(
        "tidal.md (2 chunks): 3 pair(s) not judged: "
    )
    # the halves have one segment each: the builder writes two pairs per segment
    assert stats.pairs_generated == 3 + 2 + 2 and len(result.records) == 4 and stats.failed_chunk_ids == []
