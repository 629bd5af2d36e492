"""The embedded default generator: inverse-cloze queries, no network, no API key.

Inverse cloze task (Lee et al., 2019, "Latent Retrieval for Weakly Supervised Open Domain QA"): a sentence
of a passage, cropped to a query-like span, is a pseudo-query whose positive is the passage it came from.
It is the classical unsupervised substitute for LLM-written questions: it teaches the model the domain's
vocabulary and which passages belong together, at zero cost and fully reproducibly.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from embed_assets.records import Chunk, QARecord, content_hash
from embed_assets.sdg.base import ProgressFn, SDGResult, SDGStats

_WORD = re.compile(r"[A-Za-zÀ-ÿ]")


@dataclass(frozen=True)
class InverseClozeSettings:
    """Settings of :class:`InverseClozeGenerator` (all part of its cache fingerprint)."""

    queries_per_chunk: int = 2
    min_query_words: int = 6
    max_query_words: int = 16
    seed: int = 42


class InverseClozeGenerator:
    """Pseudo-queries cut from the passages themselves.

    For each chunk, up to ``queries_per_chunk`` of its most prose-like sentences are chosen (deterministically
    per chunk content and seed) and cropped to at most ``max_query_words`` contiguous words.
    """

    name = "inverse_cloze"
    model = "none"

    def __init__(self, settings: InverseClozeSettings | None = None) -> None:
        self.settings = settings or InverseClozeSettings()

    @property
    def fingerprint(self) -> str:
        payload = json.dumps({"name": self.name, "v": 1, **asdict(self.settings)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def generate(self, chunks: Sequence[Chunk], progress: ProgressFn | None = None) -> SDGResult:
        """Generate pseudo-queries for every chunk.

        Args:
            chunks: Passages to generate for.
            progress: Optional progress sink.

        Returns:
            Records and statistics; chunks without a usable sentence are counted as ``dropped_no_sentence``.
        """
        from embed_assets.chunking import split_sentences

        stats = SDGStats(chunks_total=len(chunks))
        records: list[QARecord] = []
        start = time.monotonic()
        for i, chunk in enumerate(chunks, start=1):
            candidates = [s for s in split_sentences(chunk.text) if self._usable(s)]
            if not candidates:
                stats.dropped["no_sentence"] += 1
            rng = random.Random(f"{self.settings.seed}:{chunk.chunk_id}")
            picked = rng.sample(candidates, min(self.settings.queries_per_chunk, len(candidates)))
            for sentence in picked:
                query = self._crop(sentence, rng)
                records.append(
                    QARecord(
                        qa_id=content_hash(f"{chunk.chunk_id}:{query}"),
                        query=query,
                        positive_chunk_ids=[chunk.chunk_id],
                        doc_id=chunk.doc_id,
                        answer=sentence,
                        query_type="inverse_cloze",
                        reasoning_type="lexical",
                        complexity=1,
                        generator=self.name,
                        model=self.model,
                    )
                )
            stats.chunks_generated += 1
            if progress and (i % 200 == 0 or i == len(chunks)):
                rate = i / max(time.monotonic() - start, 1e-9)
                progress(f"inverse_cloze: {i}/{len(chunks)} chunks, {rate:.0f} chunks/s")
        stats.pairs_generated = stats.pairs_kept = len(records)
        return SDGResult(records=records, stats=stats)

    def _usable(self, sentence: str) -> bool:
        words = sentence.split()
        if len(words) < self.settings.min_query_words or "::=" in sentence:
            return False
        # Prose, not code or tables: most words contain letters.
        return sum(bool(_WORD.search(w)) for w in words) >= 0.7 * len(words)

    def _crop(self, sentence: str, rng: random.Random) -> str:
        words = sentence.split()
        n = self.settings.max_query_words
        if len(words) <= n:
            return sentence
        start = rng.randrange(0, len(words) - n + 1)
        return " ".join(words[start : start + n])
