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
