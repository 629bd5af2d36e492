"""The interface every synthetic-QA generator implements, and the statistics it reports."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from embed_assets.records import Chunk, QARecord

#: Receives one human-readable progress line (rate, ETA); the Dagster asset forwards it to the run log.
ProgressFn = Callable[[str], None]


@dataclass
class SDGStats:
    """What a generation run did, for asset metadata."""

    chunks_total: int = 0
    chunks_generated: int = 0  # chunks whose records were produced in this run
    chunks_reused: int = 0  # chunks whose records came from the cache
    chunks_failed: int = 0
    calls_made: int = 0  # LLM requests actually sent
    calls_reused: int = 0  # LLM answers taken from the cache
    calls_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pairs_generated: int = 0
    pairs_kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    failed_chunk_ids: list[str] = field(default_factory=list)

    def as_metadata(self) -> dict[str, int]:
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, int)}
        for reason, n in sorted(self.dropped.items()):
            out[f"dropped_{reason}"] = n
        return out


@dataclass
class SDGResult:
    records: list[QARecord]
    stats: SDGStats


class QAGenerator(Protocol):
    """A synthetic QA generator.

    ``name`` and ``model`` are recorded on every QA record and in the asset metadata.
    ``fingerprint`` changes whenever anything that affects the output changes (prompts, model, settings),
    so it can key a cache together with the chunk content hash.
    """

    name: str
    model: str

    @property
    def fingerprint(self) -> str: ...

    def generate(self, chunks: Sequence[Chunk], progress: ProgressFn | None = None) -> SDGResult:
        """Generate QA records whose ``positive_chunk_ids`` refer to ``chunks``.

        Must not raise for one bad chunk: record it in ``stats.failed_chunk_ids`` and go on.
        """
        ...
