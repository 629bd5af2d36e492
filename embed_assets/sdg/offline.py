"""The embedded default generator: pseudo-queries from the corpus itself, no network, no API key.

Three kinds of query, mixed by ``InverseClozeSettings.kinds`` and deduplicated per document:

* ``inverse_cloze`` (Lee et al., 2019, "Latent Retrieval for Weakly Supervised Open Domain QA"): a sentence of a
  passage, cropped to a query-like span, whose positive is the passage it came from. It teaches the domain's
  vocabulary and which passages belong together. As in the paper, a share ``mask_rate`` of these queries can
  train on the positive with the sentence cut out (``QARecord.mask_answer``, applied when the training rows are
  mined), so the model has to match a query to the context it belongs to instead of finding it verbatim. The
  paper pre-trains with 0.9; fine-tuning a pre-trained model on a few hundred queries, 0.9 measured worse on
  real test questions than keeping the sentence (the model loses the exact-match signal it is scored on), so
  the default is 0.
* ``keywords``: the passage's most salient terms against the corpus (TF-IDF over the passages; terms in more
  than half of them are treated as function words, so no stop-word list per language is needed), in passage
  order: the short keyword queries users type into a search box.
* ``titles``: the heading a passage sits under (Markdown / reStructuredText sections, BEIR ``title`` fields)
  as a query for the first passage of its section: structure the author wrote, i.e. what the section is about.
  A heading used by more than one document is ambiguous and skipped.

Everything is deterministic per content and seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from embed_assets.records import Chunk, QARecord, content_hash
from embed_assets.sdg.base import ProgressFn, SDGResult, SDGStats

_WORD = re.compile(r"[A-Za-zÀ-ÿ]")
#: A term of a keyword query: three or more letters of any script.
_TERM = re.compile(r"[^\W\d_]{3,}")
#: Terms in more than this share of the passages behave like function words (``the``, ``der``, ``self``).
MAX_TERM_SHARE = 0.5


@dataclass(frozen=True)
class InverseClozeSettings:
    """Settings of :class:`InverseClozeGenerator` (all part of its cache fingerprint)."""

    queries_per_chunk: int = 2
    min_query_words: int = 6
    max_query_words: int = 16
    seed: int = 42
    kinds: tuple[str, ...] = ("inverse_cloze",)  # inverse_cloze, keywords, titles
    keyword_terms: int = 4
    mask_rate: float = 0.0  # share of cloze queries trained with their sentence cut out of the positive


class InverseClozeGenerator:
    """Pseudo-queries cut from the passages themselves (inverse cloze, keywords, titles: see the module).

    For each chunk, up to ``queries_per_chunk`` of its most prose-like sentences are chosen (deterministically
    per chunk content and seed) and cropped to at most ``max_query_words`` contiguous words; with ``keywords``,
    one query of its ``keyword_terms`` most salient terms; with ``titles``, each section heading becomes a query
    for the section's first chunk. Units are documents, so a section's chunks are seen together.
    """

    name = "inverse_cloze"
    model = "none"

    def __init__(self, settings: InverseClozeSettings | None = None) -> None:
        self.settings = settings or InverseClozeSettings()
        from embed_assets.sdg.settings import OFFLINE_QUERY_KINDS as QUERY_KINDS

        unknown = set(self.settings.kinds) - set(QUERY_KINDS)
        if unknown or not self.settings.kinds:
            raise ValueError(
                f"offline query kinds must be a non-empty subset of {QUERY_KINDS}, got {unknown}"
            )
        self._df: Counter[str] = Counter()
        self._n_passages = 0
        self._shared_titles: set[str] = set()

    @property
    def fingerprint(self) -> str:
        payload = json.dumps({"name": self.name, "v": 3, **asdict(self.settings)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def observe(self, batches: Iterable[Sequence[Chunk]]) -> None:
        """Learn the corpus statistics keyword and title queries need, one batch of chunks at a time.

        Args:
            batches: Every chunk of the corpus, in batches (called again, it starts over).
        """
        df: Counter[str] = Counter()
        n, title_doc, shared = 0, {}, set()
        for chunks in batches:
            for c in chunks:
                df.update({t.casefold() for t in _terms(c.text)})
                n += 1
                if c.title:
                    title = c.title.casefold()
                    if title_doc.setdefault(title, c.doc_id) != c.doc_id:
                        shared.add(title)  # a heading several documents share names none of them
        self._df, self._n_passages, self._shared_titles = df, n, shared

    def units(self, chunks: Sequence[Chunk]) -> list[list[Chunk]]:
        """One unit per document (a section's chunks are seen together)."""
        from embed_assets.sdg.runner import units_per_document

        return units_per_document(chunks)

    def generate(self, chunks: Sequence[Chunk], progress: ProgressFn | None = None) -> SDGResult:
        """Generate pseudo-queries for every chunk.

        Args:
            chunks: Passages to generate for (a document's, in order, when run through :meth:`units`).
            progress: Optional progress sink.

        Returns:
            Records and statistics; chunks without a usable sentence are counted as ``dropped_no_sentence``,
            queries that repeat another of the same document as ``duplicate``, headings several documents share
            as ``ambiguous_title``.
        """
        from embed_assets.chunking import split_sentences

        if not self._n_passages:  # called without observe(): the statistics of these chunks alone
            self.observe([chunks])
        stats = SDGStats(chunks_total=len(chunks))
        records: list[QARecord] = []
        seen: set[tuple[str, str]] = set()
        start = time.monotonic()

        def add(chunk: Chunk, query: str, kind: str, answer: str, mask: bool = False) -> None:
            key = (chunk.doc_id, query_key(query))
            if key in seen:
                stats.drop("duplicate", f"{kind}: {query}")
                return
            seen.add(key)
            records.append(
                QARecord(
                    qa_id=content_hash(f"{chunk.chunk_id}:{query}"),
                    query=query,
                    positive_chunk_ids=[chunk.chunk_id],
                    doc_id=chunk.doc_id,
                    answer=answer,
                    query_type=kind,
                    reasoning_type="lexical",
                    complexity=1,
                    generator=self.name,
                    model=self.model,
                    mask_answer=mask,
                )
            )

        kinds = self.settings.kinds
        if "titles" in kinds:
            for chunk in _section_starts(chunks):
                if chunk.title.casefold() in self._shared_titles:
                    stats.drop("ambiguous_title", chunk.title)
                else:
                    add(chunk, chunk.title, "title", chunk.title)
        for i, chunk in enumerate(chunks, start=1):
            if "inverse_cloze" in kinds:
                rng = random.Random(f"{self.settings.seed}:{chunk.chunk_id}")
                candidates = [s for s in split_sentences(chunk.text) if self._usable(s)]
                if not candidates:
                    stats.drop(
                        "no_sentence",
                        f"no prose sentence of ≥ {self.settings.min_query_words} words in: {chunk.text}",
                    )
                for sentence in rng.sample(candidates, min(self.settings.queries_per_chunk, len(candidates))):
                    query = self._crop(sentence, rng)
                    add(chunk, query, "inverse_cloze", sentence, self._mask(chunk, sentence, query))
            if "keywords" in kinds:
                query = self._keywords(chunk.text)
                if query:
                    add(chunk, query, "keywords", query)
            stats.chunks_generated += 1
            if progress and (i % 200 == 0 or i == len(chunks)):
                rate = i / max(time.monotonic() - start, 1e-9)
                progress(f"{self.name}: {i}/{len(chunks)} chunks, {rate:.0f} chunks/s")
        stats.pairs_generated = stats.pairs_kept = len(records)
        return SDGResult(records=records, stats=stats)

    def _keywords(self, text: str) -> str:
        """The passage's ``keyword_terms`` highest-TF-IDF terms, in the order they first appear."""
        terms = _terms(text)
        if not terms or not self._n_passages:
            return ""
        first = {}
        for pos, t in enumerate(terms):
            first.setdefault(t.casefold(), (pos, t))
        tf = Counter(t.casefold() for t in terms)
        n = self._n_passages
        scored = [
            (tf[t] * math.log((1 + n) / (1 + self._df[t])), -first[t][0], t)
            for t in tf
            if self._df[t] <= MAX_TERM_SHARE * n or n < 4
        ]
        top = sorted(scored, reverse=True)[: self.settings.keyword_terms]
        if len(top) < 2:
            return ""
        return " ".join(first[t][1] for _, _, t in sorted(top, key=lambda x: -x[1]))

    def _mask(self, chunk: Chunk, sentence: str, query: str) -> bool:
        """Whether this cloze query trains on its passage without the sentence (see the module docstring).

        Decided per query (seeded, stable per content); never when the rest of the passage would be shorter than
        a query, since then nothing is left to match.
        """
        rest = cut_sentence(chunk.text, sentence)
        if rest is None or len(rest.split()) < self.settings.min_query_words:
            return False
        draw = random.Random(f"{self.settings.seed}:mask:{chunk.chunk_id}:{query}").random()
        return draw < self.settings.mask_rate

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


def query_key(query: str) -> str:
    """The form two queries are compared in for duplicates: case-folded, whitespace-normalized."""
    return " ".join(query.casefold().split())


def cut_sentence(text: str, sentence: str) -> str | None:
    """``text`` without the first occurrence of ``sentence`` (``None`` if it is not there).

    Sentences are whitespace-normalized (:func:`embed_assets.chunking.split_sentences`), so a passage with
    soft-wrapped lines is matched, and then returned, with its whitespace normalized.
    """
    if sentence not in text:
        text = " ".join(text.split())
        if sentence not in text:
            return None
    before, _, after = text.partition(sentence)
    return f"{before.rstrip()} {after.lstrip()}".strip()


def _terms(text: str) -> list[str]:
    """Candidate keyword terms, case kept (the document frequency counts them case-folded)."""
    return _TERM.findall(text)


def _section_starts(chunks: Sequence[Chunk]) -> list[Chunk]:
    """The first chunk of each titled section, in document order."""
    out, last = [], None
    for chunk in sorted(chunks, key=lambda c: c.sent_start):
        if chunk.title and chunk.title != last:
            out.append(chunk)
        last = chunk.title
    return out
