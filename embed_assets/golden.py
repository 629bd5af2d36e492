"""Your own golden set: labeled queries over the corpus, evaluated next to the generated test split.

Accepted (``SplitSettings.eval_path``):

- a **BEIR folder** (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``): a judged passage is matched to a
  corpus chunk by its id when the corpus came from that folder (:func:`embed_assets.stages.ingest.chunks_from_beir`
  keeps BEIR ids as ``source_id``), else by its text (title + text, BEIR's encoding);
- a **CSV/TSV** with a query column (``query`` or ``question``) and either a passage-id column (``passage_id``,
  ``chunk_id``, ``corpus_id``) or a passage-text column (``passage``, ``positive``, ``answer``). A text matches the
  chunk with exactly that text, else every chunk that contains it (so a ``Question,Answer`` file whose answers
  are spans of the corpus works). Rows with the same query make one query with several relevant passages.

Every problem is reported as ``<file>:<line>: <what>``: an empty query, a passage that is in no chunk, an
unknown id, a duplicate (query, passage) row, a duplicate query id.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embed_assets.byod import DataValidationError, _Errors
from embed_assets.records import Chunk, content_hash

_QUERY_COLUMNS = ("query", "question")
_ID_COLUMNS = ("passage_id", "chunk_id", "corpus_id")
_TEXT_COLUMNS = ("passage", "positive", "answer")


@dataclass
class GoldenSet:
    """Queries and their relevant chunks (``qrels`` keyed by chunk id), and the documents they touch."""

    source: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    docs: set[str] = field(default_factory=set)


def load_golden(path: str | os.PathLike[str], chunks: Sequence[Chunk], split: str = "test") -> GoldenSet:
    """Load a golden set and resolve every judged passage to a chunk of the corpus.

    Args:
        path: A BEIR folder or a CSV/TSV file (see the module docstring).
        chunks: The corpus passages (every judged passage must be one of them).
        split: The qrels file of a BEIR folder.

    Returns:
        A :class:`GoldenSet`.

    Raises:
        DataValidationError: every ``file:line`` problem found (up to 20).
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if p.is_dir():
        return _from_beir(p.resolve(), chunks, split)
    if p.is_file():
        return _from_csv(p.resolve(), chunks)
    raise FileNotFoundError(f"eval_path {str(path)!r}: no such folder or file (a BEIR folder or a CSV)")


def _index(chunks: Sequence[Chunk]) -> tuple[dict[str, Chunk], dict[str, Chunk], dict[str, Chunk]]:
    by_id = {c.chunk_id: c for c in chunks}
    by_source = {c.source_id: c for c in chunks if c.source_id}
    by_text = {content_hash(c.text): c for c in chunks}
    return by_id, by_source, by_text


def _from_beir(folder: Path, chunks: Sequence[Chunk], split: str) -> GoldenSet:
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import document_text

    corpus, queries, qrels = load_beir_folder(folder, split=split)  # file:line errors of its own
    _, by_source, by_text = _index(chunks)
    qrels_file = folder / "qrels" / f"{split}.tsv"
    errors = _Errors(str(qrels_file), 20)
    lines = _qrels_lines(qrels_file)
    resolved: dict[str, dict[str, int]] = {}
    for qid, rels in qrels.items():
        if not queries[qid].strip():
            errors.add(None, f"query {qid!r} is empty (queries.jsonl)")
            continue
        for pid, score in rels.items():
            if score <= 0:
                continue
            chunk = by_source.get(pid) or by_text.get(content_hash(document_text(corpus[pid])))
            if chunk is None:
                errors.add(
                    lines.get((qid, pid)),
                    f"passage {pid!r} of query {qid!r} is not a passage of the corpus (neither its id nor its "
                    "text matches a chunk)",
                )
                continue
            resolved.setdefault(qid, {})[chunk.chunk_id] = score
    errors.raise_if_any()
    return _golden(str(folder), {q: queries[q] for q in resolved}, resolved, chunks)


def _qrels_lines(path: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) >= 2:
            out.setdefault((parts[0], parts[1]), lineno)
    return out


def _from_csv(path: Path, chunks: Sequence[Chunk]) -> GoldenSet:
    errors = _Errors(str(path), 20)
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader, [])]
    query_col = next((header.index(c) for c in _QUERY_COLUMNS if c in header), None)
    id_col = next((header.index(c) for c in _ID_COLUMNS if c in header), None)
    text_col = next((header.index(c) for c in _TEXT_COLUMNS if c in header), None)
    if query_col is None or (id_col is None and text_col is None):
        raise DataValidationError(
            [
                f"{path}:1: need a query column ({' or '.join(_QUERY_COLUMNS)}) and a passage column "
                f"({', '.join(_ID_COLUMNS + _TEXT_COLUMNS)}); found {header}"
            ]
        )
    by_id, by_source, by_text = _index(chunks)
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, str]] = set()
    for lineno, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        query = _cell(row, query_col).strip()
        if not query:
            errors.add(lineno, f"field {header[query_col]!r} is empty")
            continue
        if id_col is not None:
            pid = _cell(row, id_col).strip()
            found = [c for c in (by_id.get(pid) or by_source.get(pid),) if c is not None]
            missing = f"passage id {pid!r} is not in the corpus"
        else:
            found = _by_text(_cell(row, text_col), by_text, chunks)
            missing = f"field {header[text_col]!r} matches no passage of the corpus"
        if not found:
            errors.add(lineno, missing)
            continue
        qid = f"golden-{content_hash(query)}"
        for chunk in found:
            if (qid, chunk.chunk_id) in seen:
                errors.add(lineno, f"duplicate row: query {query[:60]!r} and this passage appear earlier")
                break
            seen.add((qid, chunk.chunk_id))
            qrels.setdefault(qid, {})[chunk.chunk_id] = 1
        queries[qid] = query
    errors.raise_if_any()
    if not qrels:
        raise DataValidationError([f"{path}: no labeled queries found"])
    return _golden(str(path), queries, qrels, chunks)


def _cell(row: list[str], index: int) -> str:
    return row[index] if index < len(row) else ""


def _by_text(text: str, by_text: dict[str, Chunk], chunks: Sequence[Chunk]) -> list[Chunk]:
    """The chunk whose text is ``text``, else every chunk containing it (whitespace-normalized)."""
    text = " ".join(text.split())
    if not text:
        return []
    exact = by_text.get(content_hash(text))
    if exact is not None:
        return [exact]
    return [c for c in chunks if text in " ".join(c.text.split())]


def _golden(
    source: str, queries: dict[str, str], qrels: dict[str, dict[str, int]], chunks: Sequence[Any]
) -> GoldenSet:
    doc_of = {c.chunk_id: c.doc_id for c in chunks}
    docs = {doc_of[cid] for rels in qrels.values() for cid in rels}
    return GoldenSet(source, queries, qrels, docs)
