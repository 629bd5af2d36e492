"""Bring your own data: load user QA pairs / triplets as :class:`QARecord` plus the passages as chunks.

Accepted files (DESIGN §2, "Bring your own data"); column and field names are case-insensitive:

- CSV ``Question,Answer`` (the Nemotron tutorial format: ``Answer`` is the positive passage text);
- CSV or TSV with ``query,positive[,negative]`` or triplets ``anchor,positive,negative``; extra positive or
  negative columns (``positive_2``, ``negative_1``, ``hard_negative`` ...) are read too;
- JSON Lines (``.jsonl``, ``.ndjson``, ``.json``) of ``{"query", "positives" | "positive", "negatives"? |
  "negative"?}`` (a string or a list of strings each) or triplets ``{"anchor", "positive", "negative"}``.

An optional ``doc_id`` column/field names the document of a pair. Without it the document id is derived from
content so that the later split by document stays leak-free: pairs that share a positive passage (directly or
through a chain of multi-positive pairs) get the same id, which for a single passage is the passage's content
hash; a passage that is already a chunk of the corpus keeps that chunk's document.

Every problem is reported as ``<file>:<line>: <what>`` naming the field, e.g.
``pairs.csv:12: field 'Answer' is empty``, collected into one :class:`DataValidationError`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embed_assets.records import Chunk, QARecord, content_hash

GENERATOR_NAME = "byod"

_QUERY_KEYS = ("query", "question", "anchor")
_POSITIVE_KEYS = ("positives", "positive", "answer")
_NEGATIVE_KEYS = ("negatives", "negative")
_DOC_KEYS = ("doc_id", "document_id", "doc")
_POSITIVE_COLUMN = re.compile(r"^(answer|positives?)([ _-]?\d+)?$")
_NEGATIVE_COLUMN = re.compile(r"^(hard[ _-]?)?negatives?([ _-]?\d+)?$")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_CSV_SUFFIXES = (".csv", ".tsv")


class DataValidationError(ValueError):
    """User data that cannot be loaded; ``errors`` lists every ``file:line: problem`` found (up to a limit)."""

    def __init__(self, errors: list[str], truncated: bool = False) -> None:
        self.errors = list(errors)
        more = "\n(more errors not shown)" if truncated else ""
        super().__init__("\n".join(self.errors) + more)


@dataclass
class UserRow:
    """One validated input row, before ids are assigned."""

    line: int
    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    doc_id: str | None = None
    answer: str = ""


class _Errors:
    def __init__(self, display: str, limit: int) -> None:
        self.display, self.limit, self.items, self.truncated = display, limit, [], False

    def add(self, line: int | None, message: str) -> None:
        if len(self.items) >= self.limit:
            self.truncated = True
            return
        where = f"{self.display}:{line}" if line is not None else self.display
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise DataValidationError(self.items, self.truncated)


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"jsonl"`` or ``"csv"``/``"tsv"`` from the extension; unknown extensions are sniffed from the content.

    Args:
        path: The user file.

    Returns:
        The format name.
    """
    suffix = Path(path).suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _CSV_SUFFIXES:
        return suffix[1:]
    with Path(path).open(encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
    return "jsonl" if head.startswith("{") else ("tsv" if "\t" in head.split("\n", 1)[0] else "csv")


def load_user_pairs(
    path: str | os.PathLike[str], corpus: Sequence[Chunk] | None = None, max_errors: int = 20
) -> tuple[list[QARecord], list[Chunk]]:
    """Load user pairs or triplets.

    Args:
        path: A CSV/TSV or JSON Lines file (see the module docstring).
        corpus: Chunks already in the corpus; passages equal to one of them (same content hash) reuse it and its
            document instead of creating a new chunk.
        max_errors: Stop collecting problems after this many.

    Returns:
        ``(records, new_chunks)``: one :class:`QARecord` per distinct (query, positives) row with
        ``generator="byod"``, and the chunks created for passages not already in ``corpus``
        (``chunk_id = content_hash(text)``).

    Raises:
        DataValidationError: Unreadable file, missing columns/fields, empty fields, malformed lines.
        FileNotFoundError: ``path`` does not exist.
    """
    display = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{display}: no such file")
    errors = _Errors(display, max_errors)
    text = _read_text(path, errors)
    fmt = detect_format(path)
    rows = _rows_from_jsonl(text, errors) if fmt == "jsonl" else _rows_from_csv(text, fmt, errors)
    errors.raise_if_any()
    if not rows:
        raise DataValidationError([f"{display}: no records found"])
    return build_records(rows, corpus)


def _read_text(path: str | os.PathLike[str], errors: _Errors) -> str:
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataValidationError(
            [f"{errors.display}: not UTF-8 text ({e.reason} at byte {e.start}, line {line})"]
        ) from None


# ---------------------------------------------------------------------------------------------- CSV


@dataclass
class _Columns:
    query: int
    positives: list[int]
    negatives: list[int]
    doc: int | None
    triplets: bool


def _columns(header: list[str], errors: _Errors) -> _Columns | None:
    names = [h.strip().lower() for h in header]
    query = next((names.index(k) for k in _QUERY_KEYS if k in names), None)
    positives = [i for i, n in enumerate(names) if _POSITIVE_COLUMN.match(n)]
    negatives = [i for i, n in enumerate(names) if _NEGATIVE_COLUMN.match(n)]
    doc = next((names.index(k) for k in _DOC_KEYS if k in names), None)
    triplets = "anchor" in names
    found = ", ".join(h.strip() for h in header) or "nothing"
    if query is None:
        errors.add(1, f"missing column 'Question' (or 'query' / 'anchor'); found: {found}")
    if not positives:
        wanted = "positive" if triplets or "query" in names else "Answer"
        errors.add(1, f"missing column '{wanted}'; found: {found}")
    if triplets and not negatives:
        errors.add(1, f"missing column 'negative' (triplets need anchor, positive, negative); found: {found}")
    if query is None or not positives or (triplets and not negatives):
        return None
    return _Columns(query, positives, negatives, doc, triplets)


def _rows_from_csv(text: str, fmt: str, errors: _Errors) -> list[UserRow]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",", strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        errors.add(1, f"malformed CSV header ({e})")
        return []
    if header is None:
        errors.add(None, "empty file (expected a header such as 'Question,Answer')")
        return []
    cols = _columns(header, errors)
    if cols is None:
        return []
    names = [h.strip() for h in header]
    rows: list[UserRow] = []
    line = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            errors.add(line, f"malformed CSV ({e})")
            break
        if any(v.strip() for v in values):
            row = _csv_row(values, names, cols, line, errors)
            if row is not None:
                rows.append(row)
        line = reader.line_num + 1
    return rows


def _csv_row(
    values: list[str], names: list[str], cols: _Columns, line: int, errors: _Errors
) -> UserRow | None:
    if len(values) != len(names):
        errors.add(line, f"expected {len(names)} fields ({', '.join(names)}), got {len(values)}")
        return None
    ok = True

    def required(i: int) -> str:
        nonlocal ok
        value = values[i].strip()
        if not value:
            errors.add(line, f"field '{names[i]}' is empty")
            ok = False
        return value

    query = required(cols.query)
    positives = [required(cols.positives[0])] + [
        values[i].strip() for i in cols.positives[1:] if values[i].strip()
    ]
    if cols.triplets:
        negatives = [required(cols.negatives[0])] + [
            values[i].strip() for i in cols.negatives[1:] if values[i].strip()
        ]
    else:
        negatives = [values[i].strip() for i in cols.negatives if values[i].strip()]
    doc_id = (values[cols.doc].strip() or None) if cols.doc is not None else None
    if not ok:
        return None
    return UserRow(line, query, positives, negatives, doc_id)


# ---------------------------------------------------------------------------------------------- JSON Lines


def _rows_from_jsonl(text: str, errors: _Errors) -> list[UserRow]:
    rows: list[UserRow] = []
    for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid inside JSON
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            if not rows and not errors.items and raw.lstrip().startswith("["):  # a pretty-printed JSON array
                errors.add(
                    line, "a JSON array; expected JSON Lines (one JSON object per line, no enclosing [ ])"
                )
                break
            errors.add(line, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.add(line, f"expected a JSON object, got {type(obj).__name__}")
            continue
        row = _jsonl_row({str(k).lower(): v for k, v in obj.items()}, line, errors)
        if row is not None:
            rows.append(row)
    return rows


def _jsonl_row(obj: dict[str, Any], line: int, errors: _Errors) -> UserRow | None:
    n_before = len(errors.items)
    query_key = next((k for k in _QUERY_KEYS if k in obj), None)
    query = ""
    if query_key is None:
        errors.add(line, "missing field 'query'")
    else:
        query = _text_field(obj[query_key], query_key, line, errors)
    triplet = "anchor" in obj
    pos_key = next((k for k in _POSITIVE_KEYS if k in obj), None)
    if pos_key == "answer" and ("positive" in obj or "positives" in obj):
        pos_key = "positives" if "positives" in obj else "positive"
    positives: list[str] = []
    if pos_key is None:
        errors.add(line, f"missing field '{'positive' if triplet else 'positives'}'")
    else:
        positives = _passages(obj[pos_key], pos_key, line, errors)
    neg_key = next((k for k in _NEGATIVE_KEYS if k in obj), None)
    negatives: list[str] = []
    if neg_key is not None and obj[neg_key] is not None:
        negatives = _passages(obj[neg_key], neg_key, line, errors)
    elif triplet:
        errors.add(line, "missing field 'negative' (triplets need anchor, positive, negative)")
    doc_id = None
    doc_key = next((k for k in _DOC_KEYS if k in obj), None)
    if doc_key is not None and obj[doc_key] is not None:
        doc_id = str(obj[doc_key]).strip() or None
    answer = obj.get("answer") if pos_key != "answer" and isinstance(obj.get("answer"), str) else ""
    if len(errors.items) > n_before:
        return None
    return UserRow(line, query, positives, negatives, doc_id, answer.strip())


def _text_field(value: Any, name: str, line: int, errors: _Errors) -> str:
    if not isinstance(value, str):
        errors.add(line, f"field '{name}' must be a string, got {type(value).__name__}")
        return ""
    if not value.strip():
        errors.add(line, f"field '{name}' is empty")
    try:
        value.encode("utf-8")  # a JSON escape such as "\ud800" decodes to a lone surrogate
    except UnicodeEncodeError as e:
        errors.add(line, f"field '{name}' is not valid Unicode (unpaired surrogate at character {e.start})")
    return value.strip()


def _passages(value: Any, name: str, line: int, errors: _Errors) -> list[str]:
    if isinstance(value, str):
        return [_text_field(value, name, line, errors)]
    if not isinstance(value, list):
        errors.add(line, f"field '{name}' must be a string or a list of strings, got {type(value).__name__}")
        return []
    if not value:
        errors.add(line, f"field '{name}' is empty")
        return []
    return [_text_field(v, f"{name}[{i}]", line, errors) for i, v in enumerate(value)]


# ---------------------------------------------------------------------------------------------- records


def build_records(
    rows: Iterable[UserRow], corpus: Sequence[Chunk] | None = None
) -> tuple[list[QARecord], list[Chunk]]:
    """Assign chunk ids and leak-free document ids to validated rows.

    Args:
        rows: Validated rows (see :class:`UserRow`).
        corpus: Existing chunks whose passages are reused.

    Returns:
        ``(records, new_chunks)`` as :func:`load_user_pairs` documents; exact duplicate rows are merged.
    """
    rows = list(rows)
    existing = {c.chunk_id: c for c in corpus or []}
    groups = _passage_groups(rows, existing)
    records: dict[str, QARecord] = {}
    new_chunks: dict[str, Chunk] = {}
    for row in rows:
        pos_ids = list(dict.fromkeys(content_hash(p) for p in row.positives))
        neg_ids = [i for i in dict.fromkeys(content_hash(n) for n in row.negatives) if i not in pos_ids]
        doc_id = row.doc_id or groups[pos_ids[0]]
        for text in row.positives:
            _add_chunk(new_chunks, existing, text, doc_id)
        for text in row.negatives:
            _add_chunk(new_chunks, existing, text, groups.get(content_hash(text), content_hash(text)))
        qa_id = content_hash(row.query + "\x00" + "\x00".join(pos_ids))
        if qa_id in records:
            merged = records[qa_id].negative_chunk_ids
            merged.extend(i for i in neg_ids if i not in merged)
            continue
        records[qa_id] = QARecord(
            qa_id=qa_id,
            query=row.query,
            positive_chunk_ids=pos_ids,
            doc_id=doc_id,
            answer=row.answer,
            generator=GENERATOR_NAME,
            negative_chunk_ids=neg_ids,
        )
    return list(records.values()), list(new_chunks.values())


def _add_chunk(new_chunks: dict[str, Chunk], existing: dict[str, Chunk], text: str, doc_id: str) -> None:
    chunk_id = content_hash(text)
    if chunk_id not in existing and chunk_id not in new_chunks:
        new_chunks[chunk_id] = Chunk(chunk_id=chunk_id, doc_id=doc_id, text=text, sent_start=0, sent_end=0)


def _passage_groups(rows: list[UserRow], existing: dict[str, Chunk]) -> dict[str, str]:
    """Map every positive passage id to a document id shared by all passages linked through a row."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for row in rows:
        ids = [content_hash(p) for p in row.positives]
        for other in ids[1:]:
            parent[find(other)] = find(ids[0])
        find(ids[0])
    members: dict[str, list[str]] = {}
    for x in list(parent):
        members.setdefault(find(x), []).append(x)
    doc_of: dict[str, str] = {}
    for group in members.values():
        known = sorted(existing[i].doc_id for i in group if i in existing)
        if known:
            doc = known[0]
        elif len(group) == 1:
            doc = group[0]  # the passage's own content hash
        else:
            doc = content_hash("\x00".join(sorted(group)))
        doc_of.update(dict.fromkeys(group, doc))
    return doc_of
