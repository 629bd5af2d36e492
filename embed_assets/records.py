"""Record types exchanged between pipeline stages (plain dataclasses, JSON-serializable)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


def content_hash(text: str, length: int = 16) -> str:
    """Stable short hash of a text (sha256 hex prefix), used as document and chunk ids.

    Args:
        text: The text to hash.
        length: Number of hex characters to keep.

    Returns:
        The hex digest prefix.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


@dataclass
class Document:
    """One source document of the corpus."""

    doc_id: str  # path relative to the corpus root, POSIX style
    text: str
    content_hash: str
    n_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Chunk:
    """A passage cut from a document. ``chunk_id`` is a content hash, so it is stable across runs."""

    chunk_id: str
    doc_id: str
    text: str
    sent_start: int  # index of the first sentence of the chunk within its document
    sent_end: int  # exclusive
    n_tokens: int = 0
    source_id: str = ""  # the passage's id in the collection it came from (a BEIR corpus), if any
    title: str = ""  # the heading the passage sits under (Markdown/reST section, BEIR title), if any

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar: no need for asdict's recursive deep copy (6x slower, per passage).
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chunk:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class QARecord:
    """A (query, positive passages) pair produced by SDG or brought by the user."""

    qa_id: str
    query: str
    positive_chunk_ids: list[str]
    doc_id: str
    answer: str = ""
    query_type: str = ""
    reasoning_type: str = ""
    complexity: int = 0
    quality: dict[str, float] = field(default_factory=dict)
    generator: str = ""
    model: str = ""
    negative_chunk_ids: list[str] = field(default_factory=list)  # user-provided negatives (BYOD)
    # Inverse cloze: train on the positive with ``answer`` (the query's source sentence) cut out of it.
    mask_answer: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QARecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
