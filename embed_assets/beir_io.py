"""Read and write BEIR-format evaluation folders (Dagster-free).

A BEIR folder holds ``corpus.jsonl`` (``{"_id", "title", "text"}`` per line), ``queries.jsonl``
(``{"_id", "text"}``) and ``qrels/<split>.tsv`` (header ``query-id<TAB>corpus-id<TAB>score``, then one
judgment per line). :func:`load_beir_folder` returns the same three dicts as BEIR's ``GenericDataLoader``
(queries restricted to those judged in the split, in qrels order) but validates every line and names the
file and line of the first problem instead of failing later with a ``KeyError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from embed_assets.storage import atomic_path, jsonl_writer, write_jsonl

Corpus = dict[str, dict[str, str]]
Queries = dict[str, str]
Qrels = dict[str, dict[str, int]]

QRELS_HEADER = ("query-id", "corpus-id", "score")
CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"


def write_beir_folder(
    folder: str | os.PathLike[str],
    corpus: Mapping[str, Mapping[str, Any]] | None,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    split: str = "test",
    corpus_ids: Collection[str] | None = None,
) -> Path:
    """Write a BEIR folder; every file is written atomically (temporary sibling + rename).

    Everything is validated before the first byte is written, so invalid input leaves the folder untouched.
    Other splits' qrels already in ``folder/qrels`` are kept.

    Args:
        folder: Target folder (created if missing).
        corpus: ``{doc_id: {"title": str, "text": str}}``; a missing/None title is written as ``""``.
            ``None``: ``corpus.jsonl`` was written by :func:`write_beir_passages`; ``corpus_ids`` then names
            the passages the qrels may refer to.
        queries: ``{query_id: text}``; may hold more queries than ``qrels`` judges.
        qrels: ``{query_id: {doc_id: relevance}}`` with integer relevance.
        split: Name of the qrels file (``qrels/<split>.tsv``).

    Returns:
        The folder path.

    Raises:
        ValueError: an id is empty or holds a tab/newline, a text is not a string, a relevance is not an
            integer, or qrels name a query or document that is missing.
    """
    _check_split_name(split)
    known = corpus if corpus is not None else (corpus_ids or set())
    corpus_rows = [_corpus_row(doc_id, doc) for doc_id, doc in corpus.items()] if corpus is not None else None
    query_rows = [_query_row(qid, text) for qid, text in queries.items()]
    qrel_rows = _qrel_rows(qrels, known, queries)

    root = Path(folder)
    if corpus_rows is not None:
        write_jsonl(root / CORPUS_FILE, corpus_rows)
    write_jsonl(root / QUERIES_FILE, query_rows)
    with atomic_path(root / QRELS_DIR / f"{split}.tsv") as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write("\t".join(QRELS_HEADER) + "\n")
        f.writelines(f"{qid}\t{doc_id}\t{score}\n" for qid, doc_id, score in qrel_rows)
    return root


def write_beir_passages(
    folder: str | os.PathLike[str], passages: Iterable[tuple[str, Mapping[str, Any]]]
) -> int:
    """Stream ``(doc_id, {"title", "text"})`` pairs into ``folder/corpus.jsonl`` (atomically; one passage in
    memory at a time), validated as :func:`write_beir_folder` validates them.

    Returns:
        How many passages were written.
    """
    with jsonl_writer(Path(folder) / CORPUS_FILE) as write:
        return write(_corpus_row(doc_id, doc) for doc_id, doc in passages)


def iter_passage_ids(folder: str | os.PathLike[str]) -> Iterator[str]:
    """The ``_id`` of every passage of a BEIR folder's ``corpus.jsonl``, streamed."""
    from embed_assets.storage import iter_jsonl

    for row in iter_jsonl(Path(folder) / CORPUS_FILE):
        yield str(row["_id"])


def load_beir_folder(folder: str | os.PathLike[str], split: str = "test") -> tuple[Corpus, Queries, Qrels]:
    """Load and validate a BEIR folder.

    Args:
        folder: Folder holding ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
        split: Which qrels file to load.

    Returns:
        ``(corpus, queries, qrels)``: ``corpus`` is ``{doc_id: {"title", "text"}}`` in file order, ``queries``
        is restricted to the queries judged in ``qrels`` (in qrels order, as BEIR's ``GenericDataLoader``
        does) and ``qrels`` is ``{query_id: {doc_id: int}}``. Numeric ``_id`` values are read as strings.

    Raises:
        FileNotFoundError: a file is missing (the message lists the available splits).
        ValueError: a malformed line (message ``"<path>:<line>: <problem>"``), a duplicate id, or a qrels line
            naming a query or document that is not in ``queries.jsonl`` / ``corpus.jsonl``.
    """
    root = Path(folder)
    qrels_path = root / QRELS_DIR / f"{split}.tsv"
    for path in (root / CORPUS_FILE, root / QUERIES_FILE):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; a BEIR folder needs {CORPUS_FILE} and {QUERIES_FILE}"
            )
    if not qrels_path.is_file():
        available = (
            sorted(p.stem for p in (root / QRELS_DIR).glob("*.tsv")) if (root / QRELS_DIR).is_dir() else []
        )
        raise FileNotFoundError(f"{qrels_path}: not found (split={split!r}; available splits: {available})")

    corpus = _load_corpus(root / CORPUS_FILE)
    all_queries = _load_queries(root / QUERIES_FILE)
    qrels = _load_qrels(qrels_path, corpus, all_queries)
    queries = {qid: all_queries[qid] for qid in qrels}
    return corpus, queries, qrels


# --------------------------------------------------------------------------------------------- writing


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "\t\r\n"):
        raise ValueError(f"{what} {value!r} must be a non-empty string without tabs or newlines")
    return value


def _check_split_name(split: str) -> None:
    if not split or "/" in split or "\\" in split or split.startswith("."):
        raise ValueError(f"split {split!r} must be a plain file name such as 'test'")


def _corpus_row(doc_id: str, doc: Mapping[str, Any]) -> dict[str, str]:
    _check_id(doc_id, "corpus id")
    title = doc.get("title") or ""
    text = doc.get("text")
    if not isinstance(text, str) or not isinstance(title, str):
        raise ValueError(f"corpus id {doc_id!r}: 'title' and 'text' must be strings")
    return {"_id": doc_id, "title": title, "text": text}


def _query_row(qid: str, text: Any) -> dict[str, str]:
    _check_id(qid, "query id")
    if not isinstance(text, str):
        raise ValueError(f"query id {qid!r}: text must be a string, got {type(text).__name__}")
    return {"_id": qid, "text": text}


def _qrel_rows(
    qrels: Mapping[str, Mapping[str, int]], corpus: Collection[str], queries: Mapping[str, str]
) -> list[tuple[str, str, int]]:
    rows = []
    for qid, judged in qrels.items():
        if qid not in queries:
            raise ValueError(f"qrels: query-id {qid!r} not in queries")
        for doc_id, score in judged.items():
            if doc_id not in corpus:
                raise ValueError(f"qrels: corpus-id {doc_id!r} (query {qid!r}) not in corpus")
            if isinstance(score, bool) or not isinstance(score, int):
                raise ValueError(f"qrels: score {score!r} for ({qid!r}, {doc_id!r}) must be an integer")
            rows.append((qid, doc_id, score))
    return rows


# --------------------------------------------------------------------------------------------- reading


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)``; a line that is not UTF-8 raises ``ValueError`` naming file and line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line of a JSON Lines file."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _read_id(obj: dict[str, Any], path: Path, lineno: int, seen: dict[str, int]) -> str:
    raw = obj.get("_id")
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"{path}:{lineno}: missing or invalid '_id' ({raw!r})")
    if raw in seen:
        raise ValueError(f"{path}:{lineno}: duplicate _id {raw!r} (first on line {seen[raw]})")
    seen[raw] = lineno
    return raw


def _read_str(obj: dict[str, Any], key: str, path: Path, lineno: int, required: bool) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _load_corpus(path: Path) -> Corpus:
    corpus: Corpus = {}
    seen: dict[str, int] = {}
    for lineno, obj in _iter_json_objects(path):
        doc_id = _read_id(obj, path, lineno, seen)
        corpus[doc_id] = {
            "title": _read_str(obj, "title", path, lineno, required=False),
            "text": _read_str(obj, "text", path, lineno, required=True),
        }
    return corpus


def _load_queries(path: Path) -> Queries:
    queries: Queries = {}
    seen: dict[str, int] = {}
    for lineno, obj in _iter_json_objects(path):
        qid = _read_id(obj, path, lineno, seen)
        queries[qid] = _read_str(obj, "text", path, lineno, required=True)
    return queries


def _parse_qrels_line(line: str, path: Path, lineno: int) -> tuple[str, str, int]:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 3:
        raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(fields)}")
    qid, doc_id, raw_score = fields
    if not qid or not doc_id:
        raise ValueError(f"{path}:{lineno}: empty query-id or corpus-id")
    try:
        score = int(raw_score)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: score {raw_score!r} is not an integer") from None
    return qid, doc_id, score


def _check_header(line: str, path: Path) -> None:
    fields = line.rstrip("\r\n").split("\t")
    looks_like_data = len(fields) == 3 and fields[2].strip().lstrip("-").isdigit()
    if len(fields) != 3 or looks_like_data:
        raise ValueError(
            f"{path}:1: expected the header {'<TAB>'.join(QRELS_HEADER)!r}, got {line.rstrip()!r} "
            "(BEIR skips the first line, so a missing header would silently drop a judgment)"
        )


def _load_qrels(path: Path, corpus: Corpus, queries: Queries) -> Qrels:
    qrels: Qrels = {}
    for lineno, line in _lines(path):
        if lineno == 1:
            _check_header(line, path)
            continue
        if not line.strip():
            continue
        qid, doc_id, score = _parse_qrels_line(line, path, lineno)
        if qid not in queries:
            raise ValueError(f"{path}:{lineno}: query-id {qid!r} not in {QUERIES_FILE}")
        if doc_id not in corpus:
            raise ValueError(f"{path}:{lineno}: corpus-id {doc_id!r} not in {CORPUS_FILE}")
        judged = qrels.setdefault(qid, {})
        if doc_id in judged and judged[doc_id] != score:
            raise ValueError(
                f"{path}:{lineno}: conflicting score {score} for ({qid!r}, {doc_id!r}), "
                f"already judged {judged[doc_id]}"
            )
        judged[doc_id] = score
    return qrels
