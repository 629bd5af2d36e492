"""The interface every synthetic-QA generator implements, and the statistics it reports."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from embed_assets.records import Chunk, QARecord

#: Receives one human-readable progress line (rate, ETA); the Dagster asset forwards it to the run log.
ProgressFn = Callable[[str], None]


#: Longest drop example kept (one per reason), so metadata and log lines stay readable.
EXAMPLE_CHARS = 300


@dataclass
class SDGStats:
    """What a generation run did, for asset metadata.

    Requests and bundles are counted separately: ``calls_*`` count HTTP requests (every retry, repair and
    shrunk retry is one more), ``bundles_*`` the prompts' groups of chunks. Every dropped item is counted
    under a reason in ``dropped`` with the first example in ``drop_examples``.
    """

    chunks_total: int = 0
    chunks_generated: int = 0  # chunks whose records were produced in this run
    chunks_reused: int = 0  # chunks whose records came from the cache
    chunks_failed: int = 0
    bundles_total: int = 0  # bundles attempted in this run (a split bundle counts its halves too)
    bundles_failed: int = 0  # bundles that yielded nothing (their chunks are in failed_chunk_ids)
    bundles_split: int = 0  # bundles cut in halves because their prompt overflowed the server's context
    calls_made: int = 0  # LLM requests actually sent (retries and repairs included)
    calls_reused: int = 0  # LLM answers taken from the cache
    calls_failed: int = 0  # requests without a usable HTTP answer (error status, timeout, broken stream)
    calls_invalid: int = 0  # answers that were not schema-valid JSON (each one led to a repair or a drop)
    calls_repair: int = 0  # repair requests sent (included in calls_made)
    calls_timed_out: int = 0  # requests the client abandoned after timeout_s (included in calls_failed)
    calls_cut_off: int = 0  # answers that stopped at max_tokens (finish_reason "length")
    context_overflows: int = 0  # requests the server rejected for exceeding its context
    max_tokens_shrunk: int = 0  # retries sent with a smaller completion budget after an overflow
    check_requests: int = 0  # requests of the endpoint check at start (GET /v1/models, model-name probe)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pairs_generated: int = 0
    pairs_kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    drop_examples: dict[str, str] = field(default_factory=dict)  # reason -> first example
    failed_chunk_ids: list[str] = field(default_factory=list)
    cache_evicted: int = 0  # cache entries no live chunk uses any more, removed after the run

    def drop(self, reason: str, example: str, n: int = 1) -> None:
        """Count ``n`` items dropped for ``reason``; the first ``example`` of each reason is kept.

        Args:
            reason: Short key (``invalid_json``, ``quality``, ...).
            example: What was dropped and why, one line (cut to :data:`EXAMPLE_CHARS`).
            n: How many items.
        """
        self.dropped[reason] += n
        if reason not in self.drop_examples:
            line = " ".join(str(example).split())
            self.drop_examples[reason] = (
                line if len(line) <= EXAMPLE_CHARS else line[: EXAMPLE_CHARS - 1] + "…"
            )

    def drop_table(self) -> list[dict[str, object]]:
        """One row per drop reason, most frequent first: ``{"reason", "count", "example"}``."""
        return [
            {"reason": reason, "count": n, "example": self.drop_examples.get(reason, "")}
            for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
            if n
        ]

    def as_metadata(self) -> dict[str, int]:
        """The integer counters, plus ``dropped_<reason>`` per reason."""
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
