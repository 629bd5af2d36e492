"""Data preparation: split QA records by document and freeze the BEIR evaluation folder."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embed_assets.records import Chunk, QARecord


@dataclass
class SplitResult:
    train: list[QARecord]
    val: list[QARecord]
    test: list[QARecord]
    ratios: tuple[float, float, float]
    docs: dict[str, list[str]]  # split name -> sorted doc ids

    def leakage(self) -> int:
        """Number of test (or val) documents that also appear in train: must be 0."""
        return leakage(self.docs)


def leakage(docs: dict[str, list[str]]) -> int:
    """Number of test (or val) documents of ``{split name: doc ids}`` that also appear in train: must be 0."""
    train_docs = set(docs["train"])
    return len(train_docs & set(docs["test"])) + len(train_docs & set(docs["val"]))


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(train, val, test)`` ratios.

    Raises:
        ValueError: when not three non-negative numbers summing to 1 with a positive train and test share.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios):
        raise ValueError(
            f"split ratios must be three non-negative numbers (train, val, test), got {list(ratios)}"
        )
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must sum to 1, got {list(ratios)} (sum {sum(ratios):.4f})")
    if ratios[0] == 0 or ratios[2] == 0:
        raise ValueError(f"split ratios need a train and a test share, got {list(ratios)}")
    return (float(ratios[0]), float(ratios[1]), float(ratios[2]))


def _bucket(doc_id: str, seed: int) -> float:
    """A document's stable position in [0, 1): adding or removing other documents never moves it."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_by_document(
    records: Iterable[QARecord],
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    small_data_ratios: Sequence[float] = (0.8, 0.0, 0.2),
    small_data_threshold: int = 1000,
    seed: int = 42,
    frozen_test_docs: Iterable[str] = (),
) -> SplitResult:
    """Assign every record to train/val/test by its document, so no test document is seen in training.

    Documents are placed by a seeded hash of their id, which keeps each document's split stable when the
    corpus grows. Documents of a frozen evaluation set stay in test.

    Args:
        records: QA records (each has a ``doc_id``).
        ratios: Train/val/test shares of documents.
        small_data_ratios: Shares used when there are fewer than ``small_data_threshold`` records.
        small_data_threshold: Record count under which ``small_data_ratios`` apply.
        seed: Split seed.
        frozen_test_docs: Documents forced into test (those of an already frozen eval set).

    Returns:
        A :class:`SplitResult`.
    """
    records = list(records)
    assignment, used = assign_documents(
        {r.doc_id for r in records}, len(records), ratios, small_data_ratios, small_data_threshold, seed,
        frozen_test_docs,
    )  # fmt: skip
    parts: dict[str, list[QARecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        parts[assignment[r.doc_id]].append(r)
    return SplitResult(parts["train"], parts["val"], parts["test"], used, documents_by_split(assignment))


def assign_documents(
    doc_ids: Iterable[str],
    n_records: int,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    small_data_ratios: Sequence[float] = (0.8, 0.0, 0.2),
    small_data_threshold: int = 1000,
    seed: int = 42,
    frozen_test_docs: Iterable[str] = (),
) -> tuple[dict[str, str], tuple[float, float, float]]:
    """Place documents in train/val/test (the rule of :func:`split_by_document`, without holding records).

    Args:
        doc_ids: The documents that have records.
        n_records: How many records there are (below ``small_data_threshold``, ``small_data_ratios`` apply).
        ratios: Train/val/test shares of documents.
        small_data_ratios: Shares for small data.
        small_data_threshold: Record count under which ``small_data_ratios`` apply.
        seed: Split seed.
        frozen_test_docs: Documents forced into test.

    Returns:
        ``{doc_id: "train" | "val" | "test"}`` and the ratios used.
    """
    used = check_ratios(small_data_ratios if n_records < small_data_threshold else ratios)
    frozen = set(frozen_test_docs)
    docs = sorted(set(doc_ids), key=lambda d: _bucket(d, seed))
    assignment: dict[str, str] = {}
    for doc in docs:
        u = _bucket(doc, seed)
        if doc in frozen:
            assignment[doc] = "test"
        elif u < used[0]:
            assignment[doc] = "train"
        elif u < used[0] + used[1]:
            assignment[doc] = "val"
        else:
            assignment[doc] = "test"
    # Tiny corpora: hash buckets can leave test or train empty; move the extreme documents over.
    if len(docs) >= 2 and "test" not in assignment.values():
        assignment[docs[-1]] = "test"
    if len(docs) >= 2 and "train" not in assignment.values():
        assignment[next(d for d in docs if d not in frozen)] = "train"
    return assignment, used


def documents_by_split(assignment: dict[str, str]) -> dict[str, list[str]]:
    """``{split name: sorted doc ids}`` of an :func:`assign_documents` result."""
    return {name: sorted(d for d, s in assignment.items() if s == name) for name in ("train", "val", "test")}


def write_eval_beir(folder: str | Path, test: Sequence[QARecord], chunks: Iterable[Chunk]) -> EvalBeirCounts:
    """Write the BEIR evaluation folder: the whole corpus as passages, test queries and their qrels.

    The passages are streamed to ``corpus.jsonl`` (one passage in memory at a time); a test query whose
    positives are not among them is left out.

    Args:
        folder: Destination (``eval_beir/``).
        test: Test records.
        chunks: Every chunk of the corpus (the retrieval pool), each id once.

    Returns:
        Counts of corpus passages, queries and qrels rows, and the passages' id hashes (for what changed).
    """
    from array import array

    from embed_assets.beir_io import write_beir_folder, write_beir_passages

    wanted = {cid for r in test for cid in r.positive_chunk_ids}
    found: set[str] = set()
    id_hashes = array("q")

    def passages() -> Iterable[tuple[str, dict[str, str]]]:
        for c in chunks:
            if c.chunk_id in wanted:
                found.add(c.chunk_id)
            id_hashes.append(hash(c.chunk_id))
            yield c.chunk_id, {"title": "", "text": c.text}

    n_passages = write_beir_passages(folder, passages())
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for r in test:
        known = [cid for cid in r.positive_chunk_ids if cid in found]
        if not known:
            continue
        queries[r.qa_id] = r.query
        qrels[r.qa_id] = {cid: 1 for cid in known}
    write_beir_folder(folder, None, queries, qrels, split="test", corpus_ids=found)
    return EvalBeirCounts(n_passages, len(queries), sum(len(v) for v in qrels.values()), id_hashes)


@dataclass
class EvalBeirCounts:
    """What :func:`write_eval_beir` wrote."""

    corpus: int
    queries: int
    qrels: int
    passage_id_hashes: Any  # array('q') of hash(chunk_id), in file order (valid in this process only)
