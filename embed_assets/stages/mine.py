"""Stage 4 — hard negatives: for every training query, passages the base model ranks high that are not its
positives (:func:`embed_assets.mining.mine_hard_negatives`, sentence-transformers' semantics).

Candidates are the passages of non-test documents (test passages are never training data, not even as
negatives). Embeddings are cached per text, so a re-run encodes only new passages and queries.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embed_assets.stages.common import (
    Manifest,
    ModelSpec,
    PathRef,
    StageContext,
    Table,
    file_digest,
    fingerprint,
)
from embed_assets.stages.ingest import ChunksManifest
from embed_assets.stages.sdg import PairsManifest, passage_pool
from embed_assets.stages.split import SplitManifest


class MiningSettings(BaseModel):
    """How many negatives, from which ranks, and which candidates are too close to a positive."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hard_negatives_to_mine: int = Field(default=5, ge=1, description="Negatives kept per query.")
    min_negatives: int = Field(
        default=0,
        ge=0,
        description="Keep a query's rows when at least this many negatives survive the margin (0: every row; "
        "those without any train on in-batch negatives). The queries the base model ranks worst are the ones "
        "the margin empties, so dropping them drops the most useful rows.",
    )
    range_min: int = Field(default=0, ge=0, description="Skip the top range_min candidates.")
    range_max: int | None = Field(default=None, description="Consider only the top range_max candidates.")
    relative_margin: float | None = Field(
        default=0.05, description="'perc' margin: drop candidates scoring above (1 - m) × min positive score."
    )
    absolute_margin: float | None = Field(
        default=None, description="Drop candidates above positive − margin."
    )
    sampling_strategy: Literal["top", "random"] = Field(
        default="top", description="'top' (hardest) or 'random' within the range."
    )
    use_faiss: Literal["auto", "yes", "no", "ivf", "hnsw"] = Field(
        default="auto",
        description="'no': exact matmul search; 'yes': FAISS exhaustive search; 'ivf' / 'hnsw': an approximate "
        "FAISS index whose recall@k against exact search is calibrated on a sample of the queries and shown in "
        "the metadata; 'auto' on a CPU: exact up to 100,000 passages, or for fewer than 15,000 queries (building "
        "the index would cost more), HNSW past both; exhaustive FAISS on a GPU.",
    )
    batch_size: int = Field(default=64, ge=1, description="Encoding batch size.")
    cross_encoder: str = Field(
        default="",
        description="A cross-encoder (Hugging Face id or local folder) that rescores the mined candidates and "
        "positives before the margin filter, so passages it judges as relevant as the positive (suspected false "
        "negatives) are not mined. Empty: the base model's scores.",
    )

    @model_validator(mode="after")
    def _check(self) -> MiningSettings:
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin must be in [0, 1), got {self.relative_margin}")
        if self.absolute_margin is not None and not 0 <= self.absolute_margin < 2:
            raise ValueError(f"absolute_margin must be in [0, 2) (cosine scale), got {self.absolute_margin}")
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(
                f"range_max ({self.range_max}) must be greater than range_min ({self.range_min})"
            )
        return self


@dataclass
class MinedManifest(Manifest):
    """Mined rows: ``path`` is JSON Lines of query, positive, negatives (hardest first) and scores.

    ``val_path`` holds the validation split's rows, mined the same way: they never train while the settings are
    chosen on validation, only in a refit (``TrainSettings.refit_on_validation``). ``""``: no validation split.
    """

    path: str
    n_rows: int
    candidate_passages: int
    device: str
    stats: dict[str, Any] = field(default_factory=dict)
    preview: list[dict[str, Any]] = field(default_factory=list)
    data_version: str = ""
    seconds: float = 0.0
    val_path: str = ""
    n_val_rows: int = 0

    def metadata(self) -> dict[str, Any]:
        return {
            **self.stats,
            "mining_seconds_total": self.seconds,
            "candidate_passages": self.candidate_passages,
            "validation_rows_mined": self.n_val_rows,
            "device": self.device,
            "preview": Table(["query", "hardest_negative", "pos_score", "neg_score"], self.preview),
            "artifact_path": PathRef(self.path),
        }

    def rows(self) -> list[dict[str, Any]]:
        from embed_assets.storage import read_jsonl

        return read_jsonl(self.path)

    def val_rows(self) -> list[dict[str, Any]]:
        """The validation split's mined rows (empty when there is none)."""
        from embed_assets.storage import read_jsonl

        return read_jsonl(self.val_path) if self.val_path else []


def cut_cloze_sentences(rows: list[dict[str, Any]], records: list[Any]) -> int:
    """Cut each masked inverse-cloze query's sentence out of its row's positive text, in place.

    Done after mining, so the negatives are mined against the passage as the corpus has it; only the text the
    model trains on loses the sentence (see :mod:`embed_assets.sdg.offline`).

    Args:
        rows: Mined rows (``query``, ``positive_id``, ``positive_text``).
        records: The training split's pairs; those with ``mask_answer`` name the sentence in ``answer``.

    Returns:
        How many rows were cut.
    """
    from embed_assets.sdg.offline import cut_sentence

    cuts = {
        (r.query, pid): r.answer
        for r in records
        if r.mask_answer and r.answer
        for pid in r.positive_chunk_ids
    }
    n = 0
    for row in rows:
        sentence = cuts.get((row["query"], row["positive_id"]))
        rest = cut_sentence(row["positive_text"], sentence) if sentence else None
        if rest:
            row["positive_text"] = rest
            n += 1
    return n


def mine_negatives(
    chunks: ChunksManifest,
    pairs: PairsManifest,
    split: SplitManifest,
    settings: MiningSettings,
    model: ModelSpec,
    ctx: StageContext,
) -> MinedManifest:
    """Mine hard negatives for the training split with the base model.

    Args:
        chunks: The corpus passages.
        pairs: The pairs (user data may bring extra passages).
        split: The split (its test documents are excluded from the candidates).
        settings: Mining settings.
        model: The base model and its prompts.
        ctx: Where to write ``mined.jsonl``; embeddings are cached in ``ctx.cache_dir("embeddings")``.

    Returns:
        A :class:`MinedManifest`.
    """
    from embed_assets.mining import mine_pool
    from embed_assets.models import load_sentence_transformer
    from embed_assets.storage import write_jsonl

    start = time.monotonic()
    device = model.torch_device()
    st_model = load_sentence_transformer(model.base_model, device=device)
    records = split.train_records()
    test_docs = set(split.test_docs)
    # Test passages are no candidates, except those a training row is about (corpus pseudo-queries of test
    # documents train, SplitSettings.golden_holdout): they are trained on anyway.
    trained = {pid for r in records for pid in r.positive_chunk_ids}
    pool = [c for c in passage_pool(chunks, pairs) if c.doc_id not in test_docs or c.chunk_id in trained]
    query_prompt, passage_prompt = model.prompts()
    cross_encoder = None
    if settings.cross_encoder:
        from sentence_transformers import CrossEncoder

        from embed_assets.models import resolve_model_path

        cross_encoder = CrossEncoder(resolve_model_path(settings.cross_encoder), device=device)
        ctx.log.info(f"rescoring mined candidates with the cross-encoder {settings.cross_encoder}")
    mining = {
        "model_fingerprint": fingerprint(model.base_model, model.passage_prompt),
        "query_prompt": query_prompt,
        "passage_prompt": passage_prompt,
        "batch_size": settings.batch_size,
        "progress": ctx.log.info,
        "num_negatives": settings.hard_negatives_to_mine,
        "min_negatives": min(settings.min_negatives, settings.hard_negatives_to_mine),
        "range_min": settings.range_min,
        "range_max": settings.range_max,
        "relative_margin": settings.relative_margin,
        "absolute_margin": settings.absolute_margin,
        "sampling_strategy": settings.sampling_strategy,
        "use_faiss": settings.use_faiss,
        "cross_encoder": cross_encoder,
    }
    result = mine_pool(st_model, records, pool, ctx.cache_dir("embeddings"), **mining)
    rows = [asdict(r) for r in result.rows]
    n_cut = cut_cloze_sentences(rows, records)
    if n_cut:
        ctx.log.info(f"{n_cut} of {len(rows)} positives train without their cloze sentence (cloze_mask_rate)")
    # The validation rows, mined alike (the pool holds their positives: only test documents are left out).
    val_records = split.val_records()
    val_rows = []
    if val_records:
        val_result = mine_pool(st_model, val_records, pool, ctx.cache_dir("embeddings"), **mining)
        val_rows = [asdict(r) for r in val_result.rows]
        cut_cloze_sentences(val_rows, val_records)
    out = ctx.out_dir("mined_negatives") / "mined.jsonl"
    write_jsonl(out, rows)
    val_out = out.with_name("mined_val.jsonl")
    if val_records:
        write_jsonl(val_out, val_rows)
    ctx.publish(out, val_out if val_records else None)
    return MinedManifest(
        path=str(out),
        n_rows=len(rows),
        candidate_passages=len(pool),
        device=device,
        stats={**result.as_metadata(), "positives_with_cloze_sentence_cut": n_cut},
        preview=[
            {
                "query": r["query"],
                "hardest_negative": r["negative_texts"][0] if r["negative_texts"] else "",
                "pos_score": r["positive_score"],
                "neg_score": r["negative_scores"][0] if r["negative_scores"] else "",
            }
            for r in rows[:10]
        ],
        # A refit trains on the validation rows too, so they are part of what downstream depends on.
        data_version=file_digest(str(out), str(val_out) if val_records else None),
        seconds=round(time.monotonic() - start, 2),
        val_path=str(val_out) if val_records else "",
        n_val_rows=len(val_rows),
    )
