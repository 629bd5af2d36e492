"""Stage 2 — synthetic data: (query, positive passages) pairs from the chunks.

Three generators (``SDGSettings.generator``): the offline inverse-cloze generator (default, no network, no key),
an OpenAI-compatible LLM (the Nemotron recipe's four steps, :mod:`embed_assets.sdg.llm`), or the user's own
pairs (:mod:`embed_assets.byod`). Generated pairs are cached by chunk content + generator fingerprint, so a
re-run pays only for changed chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embed_assets.stages.common import (
    Manifest,
    ModelSpec,
    PathRef,
    StageContext,
    StageError,
    Table,
    file_digest,
)
from embed_assets.stages.ingest import ChunksManifest, load_chunks


class SDGSettings(BaseModel):
    """Every option of synthetic-data generation (the LLM endpoint itself comes from the ``llm`` resource)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generator: Literal["inverse_cloze", "llm", "user_data"] = Field(
        default="inverse_cloze",
        description="'inverse_cloze' (offline default, no LLM), 'llm' (OpenAI-compatible endpoint of the "
        "llm resource) or 'user_data' (bring your own pairs from user_data_path).",
    )
    user_data_path: str = Field(
        default="", description="For generator='user_data': Question,Answer CSV, pairs JSONL or triplets."
    )
    queries_per_chunk: int = Field(default=2, ge=1, description="inverse_cloze: pseudo-queries per passage.")
    min_query_words: int = Field(default=6, ge=1, description="inverse_cloze: shortest usable sentence.")
    max_query_words: int = Field(default=16, ge=3, description="inverse_cloze: queries are cropped to this.")
    num_pairs: int = Field(default=7, ge=1, description="llm: QA pairs asked per document or bundle.")
    max_artifacts_per_type: int = Field(default=2, ge=1, description="llm: artifacts kept per type.")
    bundle_size: int = Field(
        default=4, ge=1, description="llm: chunks of one document per prompt (3 calls each)."
    )
    quality_threshold: float = Field(
        default=7.0, ge=0, le=10, description="llm: judge 'overall' to keep a pair."
    )
    dedup_threshold: float = Field(
        default=0.9, gt=0, le=1, description="llm: question cosine above = duplicate."
    )
    max_parallel_requests: int = Field(default=4, ge=1, description="llm: concurrent requests.")
    temperature: float = Field(default=0.6, ge=0, le=2, description="llm: sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="llm: nucleus sampling.")
    timeout_s: float = Field(default=120.0, gt=0, description="llm: per-request timeout in seconds.")
    max_retries: int = Field(
        default=5, ge=0, description="llm: retries on 429/5xx/timeouts (exponential backoff)."
    )
    json_mode: bool = Field(
        default=False, description="llm: ask for response_format=json_object (helps small local models)."
    )
    extraction_model: str = Field(
        default="", description="llm: model for artifact extraction (default: the resource's)."
    )
    judge_model: str = Field(
        default="", description="llm: model for the quality judge (default: the resource's)."
    )
    seed: int = Field(default=42, description="Seed of the offline generator.")
    usd_per_1m_prompt_tokens: float = Field(
        default=0.0, ge=0, description="llm: price, for the cost estimate."
    )
    usd_per_1m_completion_tokens: float = Field(
        default=0.0, ge=0, description="llm: price, for the cost estimate."
    )

    @model_validator(mode="after")
    def _user_data_needs_path(self) -> SDGSettings:
        if self.generator == "user_data" and not self.user_data_path:
            raise ValueError("generator='user_data' needs user_data_path (CSV or JSONL of your pairs)")
        return self


@dataclass(frozen=True)
class LLMEndpoint:
    """Where the LLM generator sends its requests (the key is a value read from an env var, never logged)."""

    base_url: str
    model: str
    api_key: str | None = None


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
    preview: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {
            "pairs": self.n_pairs,
            "generator": self.generator,
            "generator_model": self.generator_model,
            **self.stats,
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
    pool = chunks.load()
    if pairs.extra_chunks_path:
        known = {c.chunk_id for c in pool}
        pool += [c for c in load_chunks(pairs.extra_chunks_path) if c.chunk_id not in known]
    return pool


def make_generator(settings: SDGSettings, model: ModelSpec, endpoint: LLMEndpoint | None) -> Any:
    """The generator ``settings.generator`` names (not ``user_data``, which needs no generator)."""
    if settings.generator == "inverse_cloze":
        from embed_assets.sdg.offline import InverseClozeGenerator, InverseClozeSettings

        return InverseClozeGenerator(
            InverseClozeSettings(
                settings.queries_per_chunk, settings.min_query_words, settings.max_query_words, settings.seed
            )
        )
    from embed_assets.sdg.llm import LLMQAGenerator, LLMSettings

    if endpoint is None:
        raise ValueError("generator='llm' needs an LLM endpoint (the llm resource's base_url and model)")
    llm = LLMSettings(
        base_url=endpoint.base_url,
        model=endpoint.model,
        temperature=settings.temperature,
        top_p=settings.top_p,
        timeout_s=settings.timeout_s,
        max_parallel_requests=settings.max_parallel_requests,
        num_pairs=settings.num_pairs,
        max_artifacts_per_type=settings.max_artifacts_per_type,
        bundle_size=settings.bundle_size,
        quality_threshold=settings.quality_threshold,
        dedup_threshold=settings.dedup_threshold,
        max_retries=settings.max_retries,
        json_mode=settings.json_mode,
        extraction_model=settings.extraction_model or None,
        judge_model=settings.judge_model or None,
    )
    # The model *name* (not its resolved path) keeps the cache fingerprint stable across venvs.
    return LLMQAGenerator(llm, api_key=endpoint.api_key, embed_model=model.base_model)


def generate_pairs(
    chunks: ChunksManifest,
    settings: SDGSettings,
    model: ModelSpec,
    ctx: StageContext,
    endpoint: LLMEndpoint | None = None,
) -> PairsManifest:
    """Generate (or load) the training pairs for the corpus.

    Args:
        chunks: The corpus passages.
        settings: Which generator and its options.
        model: The base model (the LLM generator dedups questions with it).
        ctx: Where to write ``qa.jsonl``; the SDG cache lives in ``ctx.cache_dir("sdg")``.
        endpoint: The LLM endpoint (only for ``generator="llm"``).

    Returns:
        A :class:`PairsManifest`.

    Raises:
        StageError: no pair came out (the statistics say why).
        embed_assets.byod.DataValidationError: bad user data (file, line, field).
    """
    import time

    from embed_assets.storage import write_jsonl, write_parquet

    start = time.monotonic()
    out_dir = ctx.out_dir("synthetic_qa")
    path = str(out_dir / "qa.jsonl")
    extra_path = None
    if settings.generator == "user_data":
        from embed_assets.byod import load_user_pairs

        # Passages already in the corpus reuse its chunks and documents (keeps the split leak-free).
        records, extra = load_user_pairs(settings.user_data_path, corpus=chunks.load())
        extra_path = str(out_dir / "user_passages.parquet")
        write_parquet(extra_path, [c.to_dict() for c in extra])
        generator_name, model_name, stats = "user_data", "none", {"user_passages": len(extra)}
    else:
        from embed_assets.sdg.cache import SDGCache
        from embed_assets.sdg.runner import run_generation

        generator = make_generator(settings, model, endpoint)
        try:
            result = run_generation(
                generator, chunks.load(), SDGCache(ctx.cache_dir("sdg")), progress=ctx.log.info
            )
        finally:
            if hasattr(generator, "close"):
                generator.close()  # the LLM generator's HTTP connection pool
        records, generator_name, model_name = result.records, generator.name, generator.model
        stats = result.stats.as_metadata()
        stats["estimated_cost_usd"] = round(
            (
                result.stats.prompt_tokens * settings.usd_per_1m_prompt_tokens
                + result.stats.completion_tokens * settings.usd_per_1m_completion_tokens
            )
            / 1e6,
            4,
        )
    write_jsonl(path, (r.to_dict() for r in records))
    if not records:
        raise StageError(
            f"synthetic_qa produced no pairs (generator {generator_name})",
            {k: v for k, v in stats.items() if isinstance(v, int)},
        )
    return PairsManifest(
        path=path,
        n_pairs=len(records),
        generator=generator_name,
        generator_model=model_name,
        data_version=file_digest(path, extra_path),
        extra_chunks_path=extra_path,
        stats=stats,
        preview=[
            {"query": r.query, "positives": len(r.positive_chunk_ids), "type": r.query_type, "doc": r.doc_id}
            for r in records[:10]
        ],
        seconds=round(time.monotonic() - start, 2),
    )
