"""Stage 2 — synthetic data: (query, positive passages) pairs from the chunks.

Three generators (``SDGSettings.generator``): the offline inverse-cloze generator (default, no network, no key),
an OpenAI-compatible LLM (the Nemotron recipe's four steps, :mod:`embed_assets.sdg.llm`), or the user's own
pairs (:mod:`embed_assets.byod`). Generated pairs are cached by chunk content + generator fingerprint, so a
re-run pays only for changed chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from embed_assets.sdg.settings import SDGSettings
from embed_assets.stages.common import (
    Manifest,
    ModelSpec,
    PathRef,
    StageContext,
    StageError,
    Table,
    file_digest,
    fingerprint,
    reuse_unchanged,
)
from embed_assets.stages.ingest import ChunksManifest, load_chunks

#: Pairs shown in the asset's preview table.
PREVIEW_PAIRS = 10

__all__ = [
    "PairsManifest",
    "SDGSettings",
    "generate_pairs",
    "iter_passage_pool",
    "load_pairs",
    "passage_pool",
]


@dataclass
class PairsManifest(Manifest):
    """The pairs: ``path`` is JSON Lines of QA records; user data may add passages (``extra_chunks_path``)."""

    path: str
    n_pairs: int
    generator: str
    generator_model: str
    data_version: str
    extra_chunks_path: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    drops: list[dict[str, Any]] = field(default_factory=list)  # reason, count, one example
    preview: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    inputs_fingerprint: str = ""  # the chunks file + the generator: equal inputs, equal pairs
    output_reused: bool = False  # the inputs were unchanged: the last run's pairs were used as they are

    def metadata(self) -> dict[str, Any]:
        return {
            "pairs": self.n_pairs,
            "output_reused": self.output_reused,
            "generator": self.generator,
            "generator_model": self.generator_model,
            **self.stats,
            **({"drops": _drops_table(self.drops)} if self.drops else {}),
            "preview": Table(["query", "positives", "type", "doc"], self.preview),
            "artifact_path": PathRef(self.path),
            "seconds": self.seconds,
        }

    def load(self) -> list[Any]:
        """The pairs as :class:`embed_assets.records.QARecord` objects."""
        return load_pairs(self.path)


def load_pairs(path: str) -> list[Any]:
    """Read QA records from JSON Lines."""
    from embed_assets.records import QARecord
    from embed_assets.storage import read_jsonl

    return [QARecord.from_dict(r) for r in read_jsonl(path)]


def passage_pool(chunks: ChunksManifest, pairs: PairsManifest) -> list[Any]:
    """Every passage: the corpus's chunks plus passages that came with the user's pairs."""
    return list(iter_passage_pool(chunks, pairs))


def iter_passage_pool(chunks: ChunksManifest, pairs: PairsManifest) -> Iterator[Any]:
    """:func:`passage_pool`, streamed: one batch of the corpus's chunks in memory at a time."""
    extra = {c.chunk_id: c for c in load_chunks(pairs.extra_chunks_path)} if pairs.extra_chunks_path else {}
    for batch in chunks.batches():
        for c in batch:
            extra.pop(c.chunk_id, None)  # a user passage that is in the corpus already: the corpus's chunk
            yield c
    yield from extra.values()


def _drops_table(drops: list[dict[str, Any]]) -> Table:
    return Table(["reason", "count", "example"], drops, max_rows=50, max_chars=300)


def make_generator(settings: SDGSettings, model: ModelSpec, endpoint: Any | None, log: Any = None) -> Any:
    """The generator ``settings.generator`` names (not ``user_data``, which needs no generator).

    Args:
        settings: The SDG settings.
        model: The base model (the LLM generator dedups questions with it).
        endpoint: An :class:`embed_assets.sdg.llm.LLMEndpoint` (only for ``generator="llm"``).
        log: Where the LLM generator reports drops and endpoint problems.
    """
    if settings.generator == "inverse_cloze":
        from embed_assets.sdg.offline import InverseClozeGenerator, InverseClozeSettings

        return InverseClozeGenerator(
            InverseClozeSettings(
                settings.queries_per_chunk,
                settings.min_query_words,
                settings.max_query_words,
                settings.seed,
                kinds=tuple(dict.fromkeys(settings.offline_queries)),
                keyword_terms=settings.keyword_terms,
                mask_rate=settings.cloze_mask_rate,
            )
        )
    from embed_assets.sdg.llm import LLMQAGenerator

    if endpoint is None:
        raise ValueError("generator='llm' needs an LLM endpoint (the llm resource's base_url and model)")
    # The model *name* (not its resolved path) keeps the cache fingerprint stable across venvs.
    return LLMQAGenerator(settings, endpoint, embed_model=model.base_model, log=log)


def corpus_queries(
    chunks: ChunksManifest, user: list[Any], settings: SDGSettings, model: ModelSpec, ctx: StageContext
) -> list[Any]:
    """Offline pseudo-queries of the corpus to train on beside the user's pairs (``corpus_queries_per_pair``).

    The user's pairs cover some passages; the rest of the corpus still carries the domain's vocabulary, which
    the offline generator turns into training pairs at no cost. A seeded sample of at most
    ``corpus_queries_per_pair`` per user pair is kept (so they support the user's pairs instead of outnumbering
    them), never one whose query is also a user query. The split keeps them out of validation and test.

    Returns:
        The sampled records (their ``generator`` is the offline generator's, which is how the split knows them).
    """
    import random

    from embed_assets.sdg.offline import query_key
    from embed_assets.sdg.runner import run_generation

    generator = make_generator(settings.model_copy(update={"generator": "inverse_cloze"}), model, None)
    records = run_generation(generator, chunks.load(), None).records
    taken = {query_key(r.query) for r in user}
    records = [r for r in records if query_key(r.query) not in taken]
    limit = int(settings.corpus_queries_per_pair * len(user))
    if len(records) > limit:
        keep = set(random.Random(settings.seed).sample(range(len(records)), limit))
        records = [r for i, r in enumerate(records) if i in keep]
    ctx.log.info(f"synthetic_qa: {len(records)} corpus pseudo-queries train beside your {len(user)} pairs")
    return records


def generate_pairs(
    chunks: ChunksManifest,
    settings: SDGSettings,
    model: ModelSpec,
    ctx: StageContext,
    endpoint: Any | None = None,
    previous: PairsManifest | None = None,
) -> PairsManifest:
    """Generate (or load) the training pairs for the corpus.

    When the chunks file and the generator (its fingerprint: settings, prompts, model) are those of the
    ``previous`` run and that run had no failed chunk, its pairs are this run's: nothing is read or written.

    Args:
        chunks: The corpus passages.
        settings: Which generator and its options.
        model: The base model (the LLM generator dedups questions with it).
        ctx: Where to write ``qa.jsonl``; the SDG cache lives in ``ctx.cache_dir("sdg")``.
        endpoint: The :class:`embed_assets.sdg.llm.LLMEndpoint` (only for ``generator="llm"``).
        previous: The last run's pairs (``None``: none).

    Returns:
        A :class:`PairsManifest`.

    Raises:
        StageError: no pair came out (the statistics say why).
        embed_assets.byod.DataValidationError: bad user data (file, line, field).
    """
    import time

    from embed_assets.storage import jsonl_writer, write_parquet

    start = time.monotonic()
    out_dir = ctx.out_dir("synthetic_qa")
    path = str(out_dir / "qa.jsonl")
    extra_path = None
    inputs = ""
    preview: list[Any] = []
    n_pairs = 0

    def sink(write: Any) -> Any:
        def take(records: list[Any]) -> None:
            nonlocal n_pairs
            n_pairs += write(r.to_dict() for r in records)
            preview.extend(records[: max(0, PREVIEW_PAIRS - len(preview))])

        return take

    if settings.generator == "user_data":
        from embed_assets.byod import load_user_pairs

        # Passages already in the corpus reuse its chunks and documents (keeps the split leak-free).
        records, extra = load_user_pairs(settings.user_data_path, corpus=chunks.load())
        extra_path = str(out_dir / "user_passages.parquet")
        write_parquet(extra_path, [c.to_dict() for c in extra])
        corpus = (
            corpus_queries(chunks, records, settings, model, ctx) if settings.corpus_queries_per_pair else []
        )
        with jsonl_writer(path) as write:
            sink(write)(records)
            sink(write)(corpus)
        generator_name, model_name = "user_data", "none"
        stats = {"user_passages": len(extra), "user_pairs": len(records), "corpus_queries": len(corpus)}
        del records, corpus
        drops = []
    else:
        from embed_assets.sdg.cache import SDGCache
        from embed_assets.sdg.runner import stream_generation

        generator = make_generator(settings, model, endpoint, log=ctx.log)
        inputs = fingerprint(file_digest(chunks.path), generator.fingerprint)
        reused = reuse_unchanged(
            previous,
            lambda p: p.inputs_fingerprint == inputs and not p.stats.get("chunks_failed"),
            lambda p: [p.path],
            ctx,
            "synthetic_qa: chunks and generator unchanged, the last run's pairs reused",
            start,
            output_reused=True,
        )
        if reused is not None:
            if hasattr(generator, "close"):
                generator.close()
            return reused
        cache = SDGCache(ctx.cache_dir("sdg"))
        try:
            # One batch of chunks and its pairs in memory at a time; the pairs file appears when all are written.
            with jsonl_writer(path) as write:
                run_stats = stream_generation(
                    generator,
                    chunks.batches,
                    cache,
                    sink(write),
                    progress=ctx.log.info,
                    evict=True,
                    total_chunks=chunks.n_chunks,
                )
        finally:
            cache.close()
            if hasattr(generator, "close"):
                generator.close()  # the LLM generator's HTTP connection pool
        generator_name, model_name = generator.name, generator.model
        stats = run_stats.as_metadata()
        drops = run_stats.drop_table()
        stats["estimated_cost_usd"] = settings.estimated_cost_usd(
            run_stats.prompt_tokens, run_stats.completion_tokens
        )
        for row in drops:  # every drop reason in the run's log, with one example
            ctx.log.warning(f"synthetic_qa dropped {row['count']} × {row['reason']}, e.g. {row['example']}")

    ctx.publish(path, extra_path)
    if not n_pairs:
        raise StageError(
            f"synthetic_qa produced no pairs (generator {generator_name}); the drops table says why",
            {**{k: v for k, v in stats.items() if isinstance(v, int)}, "drops": _drops_table(drops)},
        )
    return PairsManifest(
        inputs_fingerprint=inputs,
        path=path,
        n_pairs=n_pairs,
        generator=generator_name,
        generator_model=model_name,
        data_version=file_digest(path, extra_path),
        extra_chunks_path=extra_path,
        stats=stats,
        drops=drops,
        preview=[
            {"query": r.query, "positives": len(r.positive_chunk_ids), "type": r.query_type, "doc": r.doc_id}
            for r in preview
        ],
        seconds=round(time.monotonic() - start, 2),
    )
