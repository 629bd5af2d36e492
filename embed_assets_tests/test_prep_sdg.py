from __future__ import annotations

import pytest

from embed_assets.chunking import chunk_corpus
from embed_assets.corpus import read_corpus
from embed_assets.prep import check_ratios, split_by_document
from embed_assets.records import QARecord
from embed_assets.sdg.offline import InverseClozeGenerator, InverseClozeSettings


def _records(n_docs: int, per_doc: int = 3) -> list[QARecord]:
    return [
        QARecord(qa_id=f"{d}-{i}", query=f"q {d} {i}", positive_chunk_ids=[f"c{d}-{i}"], doc_id=f"doc{d}.txt")
        for d in range(n_docs)
        for i in range(per_doc)
    ]


def test_split_is_by_document_and_never_leaks() -> None:
    split = split_by_document(_records(50), ratios=(0.8, 0.1, 0.1), small_data_threshold=0)
    assert split.leakage() == 0
    train_docs = {r.doc_id for r in split.train}
    assert not train_docs & {r.doc_id for r in split.test}
    assert not train_docs & {r.doc_id for r in split.val}
    assert len(split.train) + len(split.val) + len(split.test) == 150
    assert 25 <= len(split.docs["train"]) <= 48 and split.docs["test"]


def test_small_data_uses_80_0_20_and_split_is_stable_when_corpus_grows() -> None:
    small = split_by_document(_records(20))
    assert small.ratios == (0.8, 0.0, 0.2) and not small.val
    grown = split_by_document(_records(30))
    for name in ("train", "test"):
        assert set(small.docs[name]) <= set(grown.docs[name])  # existing documents keep their split


def test_frozen_test_documents_stay_in_test() -> None:
    base = split_by_document(_records(20))
    forced = base.docs["train"][:2]
    again = split_by_document(_records(20), frozen_test_docs=forced)
    assert set(forced) <= set(again.docs["test"]) and again.leakage() == 0


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.2), (0.5, 0.5), (1.0, 0.0, 0.0), (-0.1, 0.6, 0.5)])
def test_bad_ratios_are_rejected(ratios) -> None:
    with pytest.raises(ValueError, match="ratios"):
        check_ratios(ratios)


def test_inverse_cloze_is_deterministic_and_points_at_its_chunk(tiny_corpus) -> None:
    chunks, _ = chunk_corpus(read_corpus(tiny_corpus).documents)
    gen = InverseClozeGenerator()
    first = gen.generate(chunks)
    second = InverseClozeGenerator().generate(chunks)
    assert [r.to_dict() for r in first.records] == [r.to_dict() for r in second.records]
    by_id = {c.chunk_id: c for c in chunks}
    for r in first.records:
        chunk = by_id[r.positive_chunk_ids[0]]
        assert r.doc_id == chunk.doc_id
        assert len(r.query.split()) <= 16
        assert all(w in chunk.text for w in r.query.split())  # a crop of the passage's own sentence
    assert first.stats.pairs_kept == len(first.records) > len(chunks)
    assert InverseClozeGenerator(InverseClozeSettings(queries_per_chunk=1)).fingerprint != gen.fingerprint


def test_masked_cloze_queries_train_on_their_passage_without_the_sentence(tiny_corpus) -> None:
    from embed_assets.stages.mine import cut_cloze_sentences

    chunks, _ = chunk_corpus(read_corpus(tiny_corpus).documents)
    by_id = {c.chunk_id: c for c in chunks}
    kept = InverseClozeGenerator(InverseClozeSettings(mask_rate=0.0)).generate(chunks).records
    masked = InverseClozeGenerator(InverseClozeSettings(mask_rate=1.0)).generate(chunks).records
    half = InverseClozeGenerator(InverseClozeSettings(mask_rate=0.5)).generate(chunks).records
    assert [r.query for r in kept] == [r.query for r in masked]  # same queries, only the flag differs
    assert not any(r.mask_answer for r in kept)
    # every cloze query whose passage has enough words besides the sentence is masked at rate 1
    assert sum(r.mask_answer for r in masked) > 0.5 * len(masked)
    assert 0 < sum(r.mask_answer for r in half) < sum(r.mask_answer for r in masked)
    for r in masked:
        rest = by_id[r.positive_chunk_ids[0]].text.replace(r.answer, "")
        assert r.mask_answer == (len(rest.split()) >= 6), r  # too little left: the sentence stays

    rows = [
        {
            "query": r.query,
            "positive_id": r.positive_chunk_ids[0],
            "positive_text": by_id[r.positive_chunk_ids[0]].text,
        }
        for r in masked
    ]
    n = cut_cloze_sentences(rows, masked)
    assert n == sum(r.mask_answer for r in masked)
    for r, row in zip(masked, rows, strict=True):
        assert (r.answer not in row["positive_text"]) == r.mask_answer
        assert (
            row["positive_text"] if r.mask_answer else row["positive_text"] == by_id[row["positive_id"]].text
        )
    assert (
        InverseClozeGenerator(InverseClozeSettings(mask_rate=0.5)).fingerprint
        != InverseClozeGenerator().fingerprint
    )


# ------------------------------------------------------------------ offline query mixture and passage titles
_MARKDOWN = """# Tide tables

Tide tables list the predicted times of high and low water for a harbour. The predictions come from harmonic
constants measured at the harbour gauge over many months.

## Spring tides

Spring tides happen near new and full moon. The range between high and low water is then at its largest,
because the sun and the moon pull along the same line.
"""
_REST = """Mooring lines
*************

A mooring line holds the vessel against the quay. Nylon stretches and absorbs shocks, polyester barely does.

Chafe protection
================

Where a line crosses a fairlead, chafe gear stops the rope from wearing through within a single season.
"""


def _doc_chunks(name: str, text: str):
    from embed_assets.chunking import chunk_document
    from embed_assets.records import Document

    return chunk_document(Document(name, text, "", 0), sentences_per_chunk=2, max_tokens=256)


def test_passages_know_the_heading_they_sit_under() -> None:
    md = _doc_chunks("tides.md", _MARKDOWN)
    assert [c.title for c in md] == ["Tide tables", "Tide tables", "Spring tides", "Spring tides"][: len(md)]
    assert {c.title for c in md} == {"Tide tables", "Spring tides"}
    rest = _doc_chunks("mooring.txt", _REST)
    assert rest[0].title == "Mooring lines" and rest[-1].title == "Chafe protection"
    assert not any(c.title for c in _doc_chunks("plain.txt", "No heading here. Just two plain sentences."))


def test_chunks_from_beir_keep_the_title(tmp_path) -> None:
    from embed_assets.beir_io import write_beir_folder
    from embed_assets.stages.common import StageContext
    from embed_assets.stages.ingest import chunks_from_beir

    write_beir_folder(
        tmp_path / "beir",
        {
            "d1-0": {"title": "Tide  tables", "text": "Predicted high water."},
            "d2-0": {"title": "", "text": "x y"},
        },
        {"q": "when is high water"},
        {"q": {"d1-0": 1}},
    )
    chunks = chunks_from_beir(tmp_path / "beir", StageContext.local(tmp_path / "a", run_id="r")).load()
    assert {c.source_id: c.title for c in chunks} == {"d1-0": "Tide tables", "d2-0": ""}


def test_offline_mixture_adds_keyword_and_title_queries() -> None:
    from embed_assets.sdg.runner import run_generation

    chunks = _doc_chunks("tides.md", _MARKDOWN) + _doc_chunks("mooring.txt", _REST)
    only_cloze = run_generation(InverseClozeGenerator(InverseClozeSettings()), chunks, None).records
    mixed = run_generation(
        InverseClozeGenerator(InverseClozeSettings(kinds=("inverse_cloze", "keywords", "titles"))),
        chunks,
        None,
    ).records
    kinds = {r.query_type for r in mixed}
    assert kinds == {"inverse_cloze", "keywords", "title"} and {r.query_type for r in only_cloze} == {
        "inverse_cloze"
    }
    cloze = [r.query for r in mixed if r.query_type == "inverse_cloze"]
    assert cloze == [r.query for r in only_cloze]  # the mixture adds queries, it does not change the others
    by_id = {c.chunk_id: c for c in chunks}
    titles = {r.query: by_id[r.positive_chunk_ids[0]] for r in mixed if r.query_type == "title"}
    assert set(titles) == {"Tide tables", "Spring tides", "Mooring lines", "Chafe protection"}
    assert titles["Spring tides"].text.startswith("Spring tides happen")  # the section's first passage
    keywords = [r.query.split() for r in mixed if r.query_type == "keywords"]
    assert len(keywords) == len(chunks) and all(2 <= len(k) <= 4 for k in keywords)
    # salient terms, not the function words every passage shares
    assert "the" not in {w.casefold() for k in keywords for w in k}
    assert any({"fairlead", "chafe"} & {w.casefold() for w in k} for k in keywords)


def test_a_heading_several_documents_share_is_not_a_title_query() -> None:
    from embed_assets.sdg.runner import run_generation

    chunks = _doc_chunks("a.md", "# Overview\n\nAnchors hold boats. Chains help.") + _doc_chunks(
        "b.md", "# Overview\n\nSails drive boats. Wind helps."
    )
    gen = InverseClozeGenerator(InverseClozeSettings(kinds=("titles",)))
    result = run_generation(gen, chunks, None)
    assert not result.records and result.stats.dropped["ambiguous_title"] == 2
    with pytest.raises(ValueError, match="offline query kinds"):
        InverseClozeGenerator(InverseClozeSettings(kinds=("questions",)))


def test_sdg_cache_is_one_store_reused_and_evicted_to_the_live_chunks(tmp_path) -> None:
    from embed_assets.sdg.cache import STORE_FILE, SDGCache
    from embed_assets.sdg.runner import run_generation

    docs = {
        f"d{i}.md": f"Topic number {i} starts right here in this file. It has a second sentence about tides. "
        f"And there is a third sentence about boats number {i}."
        for i in range(4)
    }
    chunks = [c for name, text in docs.items() for c in _doc_chunks(name, text)]
    gen = InverseClozeGenerator(InverseClozeSettings())
    cache = SDGCache(tmp_path)
    first = run_generation(gen, chunks, cache, evict=True)
    assert first.stats.chunks_reused == 0 and first.records
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(STORE_FILE)] == []  # one file

    edited = [c for c in chunks if c.doc_id != "d3.md"] + _doc_chunks(
        "d3.md", "A completely new text was written for this file today. It is quite different from before."
    )
    again = run_generation(gen, edited, cache, evict=True)
    assert again.stats.chunks_reused == len(edited) - 1 and again.stats.cache_evicted == 1
    assert again.stats.as_metadata()["cache_evicted"] == 1
    # what stays is exactly what the live chunks use: d3's old unit went
    assert {r.doc_id for r in cache.records()} == set(docs)
    assert not {r.positive_chunk_ids[0] for r in cache.records()} - {c.chunk_id for c in edited}
    cache.put_json("k", "v1", {"chunk_ids": [chunks[-1].chunk_id]})  # tied to d3's old passage
    cache.put_json("k2", "v1", {"chunk_ids": [edited[0].chunk_id]})
    assert run_generation(gen, edited, cache, evict=True).stats.cache_evicted == 1
    assert cache.get_json("k", "v1") is None and cache.get_json("k2", "v1") is not None


def test_sdg_streams_batches_of_whole_documents_with_the_same_pairs(tmp_path) -> None:
    from embed_assets.sdg.runner import run_generation, stream_generation
    from embed_assets.stages.common import ModelSpec, StageContext
    from embed_assets.stages.ingest import (
        SAMPLE_CORPUS,
        ChunkSettings,
        CorpusSettings,
        chunk_documents,
        iter_chunk_batches,
        read_documents,
    )

    ctx = StageContext.local(tmp_path)
    chunks = chunk_documents(
        read_documents(CorpusSettings(path=SAMPLE_CORPUS), ctx), ChunkSettings(), ModelSpec(), ctx
    )
    batches = list(iter_chunk_batches(chunks.path, batch_rows=7))
    assert len(batches) > 5 and [c for b in batches for c in b] == chunks.load()
    docs = [{c.doc_id for c in b} for b in batches]
    assert all(not (a & b) for i, a in enumerate(docs) for b in docs[i + 1 :])  # no document in two batches

    kinds = ("inverse_cloze", "keywords", "titles")
    streamed: list[QARecord] = []
    stats = stream_generation(
        InverseClozeGenerator(InverseClozeSettings(kinds=kinds)),
        lambda: iter_chunk_batches(chunks.path, batch_rows=7),
        None,
        streamed.extend,
    )
    whole = run_generation(InverseClozeGenerator(InverseClozeSettings(kinds=kinds)), chunks.load(), None)
    assert streamed == whole.records and {r.query_type for r in streamed} == {
        "inverse_cloze",
        "keywords",
        "title",
    }
    assert stats.chunks_total == chunks.n_chunks == stats.chunks_generated
