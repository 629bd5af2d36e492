"""Stage 3 — split: train/val/test by document, and the BEIR evaluation folder of this corpus.

No test document is ever seen in training. Which documents are test is *frozen per corpus*: the first run on a
corpus folder records its test documents under ``<root>/eval_frozen/<corpus key>.json``, and later runs on the
same folder keep them in test, so metrics stay comparable across re-trainings. A different corpus folder gets
its own frozen set; when frozen test documents are gone from the corpus, a new set is frozen and the reason is
logged and shown. The evaluation folder itself (``eval_beir/`` in this run's output) always reflects the current
passages and test queries; what changed since the last evaluation of this corpus is stated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embed_assets.stages.common import (
    Gate,
    Manifest,
    PathRef,
    StageContext,
    file_digest,
    fingerprint,
    reuse_unchanged,
)
from embed_assets.stages.ingest import ChunksManifest
from embed_assets.stages.sdg import PairsManifest, iter_passage_pool, passage_pool

FROZEN_DIR = "eval_frozen"


class SplitSettings(BaseModel):
    """Shares of documents per split and the evaluation-freeze switch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_ratio: float = Field(default=0.8, ge=0, le=1, description="Share of documents for training.")
    val_ratio: float = Field(default=0.1, ge=0, le=1, description="Share of documents for validation.")
    test_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Share of documents for the BEIR test set."
    )
    small_data_threshold: int = Field(
        default=1000, ge=0, description="Below this many pairs, small_data_ratios apply instead."
    )
    small_data_ratios: list[float] = Field(
        default=[0.7, 0.1, 0.2],
        description="Train/val/test shares for small data: a larger test share keeps the test set usable, "
        "and the validation share still picks the learning rate and the kept checkpoint.",
    )
    golden_ratios: list[float] = Field(
        default=[0.85, 0.1, 0.05],
        description="Train/val/test shares when eval_path gives your golden set (it is the test that counts; "
        "the generated test split stays small and is reported next to it).",
    )
    seed: int = Field(default=42, description="Split seed (documents are placed by a seeded hash).")
    regenerate_eval: bool = Field(
        default=False, description="Freeze a new test set for this corpus instead of reusing the frozen one."
    )
    eval_path: str = Field(
        default="",
        description="Your own golden set: a BEIR folder or a query/passage CSV over the corpus. Its questions "
        "never train (golden_holdout: what else of its documents stays out); beir_metrics reports it next to the "
        "generated test split and gates on it.",
    )
    eval_split: str = Field(
        default="test", description="eval_path as a BEIR folder: which qrels file to read."
    )
    golden_holdout: Literal["user_pairs", "all_pairs"] = Field(
        default="user_pairs",
        description="Which pairs on the golden set's documents stay out of training. 'user_pairs': your own "
        "(user_data) pairs, which may repeat golden questions; generated pseudo-queries of those passages carry "
        "nothing of the golden questions and train, as they do in use, where the model is adapted to every "
        "passage of the corpus (GPL's protocol); so do the corpus pseudo-queries (corpus_queries_per_pair) of "
        "validation and test documents, so those splits measure the same adaptation. 'all_pairs': every pair, so "
        "training sees no golden, validation or test passage.",
    )

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitSettings:
        from embed_assets.prep import check_ratios

        check_ratios((self.train_ratio, self.val_ratio, self.test_ratio))
        check_ratios(self.small_data_ratios)
        check_ratios(self.golden_ratios)
        return self


@dataclass
class EvalSetInfo:
    """Where the evaluation set came from and what changed since the last evaluation of the corpus."""

    status: str  # "new" | "reused"
    reason: str
    corpus_root: str
    frozen_by_run: str
    queries: int = 0
    passages: int = 0
    qrels: int = 0
    passages_added: int = 0
    passages_removed: int = 0
    queries_added: int = 0
    queries_removed: int = 0


@dataclass
class GoldenInfo:
    """The user's golden set as resolved against the corpus (``beir``: its BEIR folder over all passages)."""

    source: str
    beir: str
    queries: int
    qrels: int
    documents: int
    documents_trained_on: int = 0  # golden documents whose generated pseudo-queries train


@dataclass
class SplitManifest(Manifest):
    """Train/val/test JSON Lines of QA records, and the BEIR folder (``eval_beir``) to evaluate on."""

    train: str
    val: str
    test: str
    eval_beir: str
    train_docs: list[str]
    val_docs: list[str]
    test_docs: list[str]
    n_train: int
    n_val: int
    n_test: int
    ratios: list[float]
    leakage_documents: int
    eval_set: EvalSetInfo
    golden: GoldenInfo | None = None
    data_version: str = ""
    seconds: float = 0.0
    inputs_fingerprint: str = ""  # chunks, pairs, settings, golden file and frozen test documents
    output_reused: bool = False  # the inputs were unchanged: the last run's split was used as it is

    def gates(self) -> list[Gate]:
        return [
            Gate(
                "no_document_leakage",
                self.leakage_documents == 0,
                f"{self.leakage_documents} documents are in train and in val/test",
                blocking=True,
                metadata={"documents_in_train_and_eval": self.leakage_documents},
            )
        ]

    def metadata(self) -> dict[str, Any]:
        e = self.eval_set
        return {
            "output_reused": self.output_reused,
            "train_pairs": self.n_train,
            "val_pairs": self.n_val,
            "test_pairs": self.n_test,
            "documents_train_val_test": f"{len(self.train_docs)}/{len(self.val_docs)}/{len(self.test_docs)}",
            "ratios_used": str(tuple(self.ratios)),
            "leakage_documents": self.leakage_documents,
            "eval_set": e.status,
            "eval_set_reason": e.reason,
            "eval_frozen_reused": e.status == "reused",
            "eval_frozen_by_run": e.frozen_by_run,
            "eval_corpus_root": PathRef(e.corpus_root),
            "eval_queries": e.queries,
            "eval_corpus_passages": e.passages,
            "eval_changes_since_last": f"passages +{e.passages_added}/-{e.passages_removed}, "
            f"queries +{e.queries_added}/-{e.queries_removed}",
            "eval_beir": PathRef(self.eval_beir),
            **(
                {
                    "golden_source": PathRef(self.golden.source),
                    "golden_queries": self.golden.queries,
                    "golden_documents": self.golden.documents,
                    "golden_documents_with_generated_training_pairs": self.golden.documents_trained_on,
                    "golden_beir": PathRef(self.golden.beir),
                }
                if self.golden
                else {}
            ),
            "artifact_path": PathRef(str(Path(self.train).parent)),
            "seconds": self.seconds,
        }

    def val_records(self) -> list[Any]:
        from embed_assets.stages.sdg import load_pairs

        return load_pairs(self.val)

    def train_records(self) -> list[Any]:
        from embed_assets.stages.sdg import load_pairs

        return load_pairs(self.train)


def frozen_record_path(root: Path, corpus_root: str) -> Path:
    """The freeze record of one corpus folder."""
    return root / FROZEN_DIR / f"{fingerprint(str(Path(corpus_root).resolve()))}.json"


def split_pairs(
    chunks: ChunksManifest,
    pairs: PairsManifest,
    settings: SplitSettings,
    ctx: StageContext,
    previous: SplitManifest | None = None,
) -> SplitManifest:
    """Split the pairs by document and write the evaluation folder of this corpus.

    When the chunks, the pairs, the settings, the golden file and the corpus's frozen test documents are those
    of the ``previous`` run (and its files exist), its split is this run's: nothing is read or written.

    Args:
        chunks: The corpus passages (``corpus_root`` names the corpus whose frozen test set applies).
        pairs: The pairs to split.
        settings: Ratios, seed, and whether to freeze a new test set.
        ctx: Where to write the splits, ``eval_beir/`` and the freeze record.
        previous: The last run's split (``None``: none).

    Returns:
        A :class:`SplitManifest` (its ``eval_set`` says whether the test set is new or reused, and why).
    """
    from embed_assets.byod import GENERATOR_NAME as USER_GENERATOR
    from embed_assets.golden import load_golden
    from embed_assets.prep import assign_documents, documents_by_split, leakage, write_eval_beir
    from embed_assets.records import QARecord
    from embed_assets.storage import iter_jsonl, jsonl_writer, write_json

    start = time.monotonic()
    record_file = frozen_record_path(ctx.root, chunks.corpus_root)
    inputs = _split_inputs(chunks, pairs, settings, record_file)
    reused = reuse_unchanged(
        previous,
        lambda p: p.inputs_fingerprint == inputs,
        lambda p: [p.train, p.val, p.test, p.eval_beir],
        ctx,
        "split_sets: chunks, pairs and settings unchanged, the last run's split reused",
        start,
        output_reused=True,
    )
    if reused is not None:
        return reused

    # Pass 1: which documents have pairs (no record is kept). Corpus pseudo-queries beside user pairs
    # (SDGSettings.corpus_queries_per_pair) only train: the documents are placed by the user's pairs alone, and
    # (golden_holdout user_pairs) they train on validation and test documents too, so validation and test
    # measure the model adapted to the whole corpus, as the golden set does.
    user_pairs = pairs.generator == "user_data"

    def train_only(row: dict[str, Any]) -> bool:
        return user_pairs and row.get("generator") != USER_GENERATOR

    doc_ids, n_records = set(), 0
    for row in iter_jsonl(pairs.path):
        if not train_only(row):
            doc_ids.add(row["doc_id"])
            n_records += 1
    # A golden set is matched against every passage's text, so it needs the pool in memory.
    pool = passage_pool(chunks, pairs) if settings.eval_path else None
    golden = load_golden(settings.eval_path, pool, settings.eval_split) if pool is not None else None
    frozen, reason = _usable_freeze(record_file, doc_ids, settings, chunks.corpus_root)
    frozen_docs = set(frozen["test_docs"] if frozen else ())
    golden_docs = golden.docs if golden else set()
    # The user's pairs on golden documents may repeat golden questions, so they never train; a generated
    # pseudo-query carries nothing of them and trains on a golden passage unless golden_holdout says otherwise.
    hide_all = settings.golden_holdout == "all_pairs"
    hide_generated = golden_docs if hide_all else set()
    held_out_generated = frozen_docs | hide_generated
    held_out = frozen_docs | (golden_docs if user_pairs else hide_generated)
    assignment, used = assign_documents(
        doc_ids,
        n_records,
        ratios=settings.golden_ratios
        if golden
        else (settings.train_ratio, settings.val_ratio, settings.test_ratio),
        small_data_ratios=settings.golden_ratios if golden else settings.small_data_ratios,
        small_data_threshold=settings.small_data_threshold,
        seed=settings.seed,
        # The golden set's documents are test documents too: none of their passages may be trained on.
        frozen_test_docs=held_out,
    )
    docs = documents_by_split(assignment)
    del doc_ids
    out = ctx.out_dir("split_sets")
    # Pass 2: every record to its split's file as it is read; only the test records stay (for the qrels).
    paths = {name: str(out / f"{name}.jsonl") for name in ("train", "val", "test")}
    sizes = dict.fromkeys(paths, 0)
    test: list[Any] = []
    dropped_train_only = held_out_trained = 0
    golden_trained: set[str] = set()
    with (
        jsonl_writer(paths["train"]) as train_file,
        jsonl_writer(paths["val"]) as val_file,
        jsonl_writer(paths["test"]) as test_file,
    ):
        files = {"train": train_file, "val": val_file, "test": test_file}
        for row in iter_jsonl(pairs.path):
            record = QARecord.from_dict(row)
            if train_only(row):
                # A pseudo-query always trains; with golden_holdout all_pairs, one on a validation, test or
                # golden document drops instead.
                fallback = "test" if record.doc_id in held_out_generated else "train"
                held = assignment.get(record.doc_id, fallback) != "train"
                if held and hide_all:
                    dropped_train_only += 1
                    continue
                held_out_trained += held
                name = "train"
            else:
                name = assignment[record.doc_id]
            sizes[name] += files[name]([record.to_dict()])
            if name == "train" and record.doc_id in golden_docs:
                golden_trained.add(record.doc_id)
            if name == "test":
                test.append(record)
    if dropped_train_only:
        ctx.log.info(
            f"split_sets: {dropped_train_only} corpus pseudo-queries on validation or test documents dropped "
            "(golden_holdout all_pairs)"
        )
    if held_out_trained:
        ctx.log.info(
            f"split_sets: {held_out_trained} corpus pseudo-queries on validation or test documents train "
            "(your pairs there never do)"
        )
    eval_dir = out / "eval_beir"
    counts = write_eval_beir(eval_dir, test, iter_passage_pool(chunks, pairs))
    del test
    golden_info = (
        _write_golden(golden, pool, out / "golden_beir", len(golden_trained), ctx)
        if golden and pool
        else None
    )
    changes = _changes(frozen.get("last_eval_dir") if frozen else None, eval_dir, counts.passage_id_hashes)
    info = EvalSetInfo(
        status="reused" if frozen else "new",
        reason=reason,
        corpus_root=chunks.corpus_root,
        frozen_by_run=frozen["created_by_run"] if frozen else ctx.run_id,
        queries=counts.queries,
        passages=counts.corpus,
        qrels=counts.qrels,
        **changes,
    )
    record = (
        dict(frozen)
        if frozen
        else {
            "corpus_root": chunks.corpus_root,
            "test_docs": docs["test"],
            "created_by_run": ctx.run_id,
        }
    )
    record.update(last_eval_dir=str(eval_dir), last_eval_run=ctx.run_id)
    write_json(record_file, record)
    ctx.log.info(
        f"eval set {info.status} for corpus {chunks.corpus_root} ({reason}): {counts.queries} queries over "
        f"{counts.corpus} passages in {eval_dir}"
    )
    ctx.publish(*paths.values(), *sorted(p for p in eval_dir.rglob("*") if p.is_file()))
    return SplitManifest(
        **paths,
        eval_beir=str(eval_dir),
        train_docs=docs["train"],
        val_docs=docs["val"],
        test_docs=docs["test"],
        n_train=sizes["train"],
        n_val=sizes["val"],
        n_test=sizes["test"],
        ratios=list(used),
        leakage_documents=leakage(docs),
        eval_set=info,
        golden=golden_info,
        data_version=file_digest(
            *paths.values(), str(eval_dir / "corpus.jsonl"), str(eval_dir / "qrels" / "test.tsv")
        ),
        seconds=round(time.monotonic() - start, 2),
        inputs_fingerprint=_split_inputs(chunks, pairs, settings, record_file),  # the record as written now
    )


def _split_inputs(chunks: ChunksManifest, pairs: PairsManifest, settings: SplitSettings, record: Path) -> str:
    """What a split is a function of: the passages, the pairs, the settings, the golden file (by size and
    modification time) and the frozen test documents of the corpus."""
    golden: list[Any] = []
    if settings.eval_path and Path(settings.eval_path).exists():
        root = Path(settings.eval_path)
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        golden = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    try:
        frozen = json.loads(record.read_text(encoding="utf-8")).get("test_docs")
    except (OSError, ValueError):
        frozen = None
    return fingerprint(
        chunks.data_version, chunks.corpus_root, pairs.data_version, settings.model_dump(), golden, frozen
    )


def _write_golden(
    golden: Any, pool: list[Any], folder: Path, trained_on: int, ctx: StageContext
) -> GoldenInfo:
    """The golden set as a BEIR folder over every passage (ids = chunk ids); ``trained_on``: how many of its
    documents have generated pseudo-queries in training."""
    from embed_assets.beir_io import write_beir_folder

    corpus = {c.chunk_id: {"title": "", "text": c.text} for c in pool}
    write_beir_folder(folder, corpus, golden.queries, golden.qrels, split="test")
    ctx.log.info(
        f"golden set {golden.source}: {len(golden.queries)} queries over {len(golden.docs)} documents "
        + (
            f"(its questions never train; generated pseudo-queries of {trained_on} of these documents do)"
            if trained_on
            else "(kept out of training)"
        )
    )
    return GoldenInfo(
        source=golden.source,
        beir=str(folder),
        queries=len(golden.queries),
        qrels=sum(len(r) for r in golden.qrels.values()),
        documents=len(golden.docs),
        documents_trained_on=trained_on,
    )


def _usable_freeze(
    record_file: Path, docs: set[str], settings: SplitSettings, corpus_root: str
) -> tuple[dict[str, Any] | None, str]:
    """The frozen test set to keep, or ``None`` with the reason a new one is frozen."""
    from embed_assets.storage import read_json

    if settings.regenerate_eval:
        return None, "regenerate_eval is set"
    if not record_file.is_file():
        return None, f"first evaluation set for corpus {corpus_root}"
    frozen = read_json(record_file)
    gone = [d for d in frozen["test_docs"] if d not in docs]
    if gone:
        return None, (
            f"{len(gone)} of the {len(frozen['test_docs'])} frozen test documents are no longer in the corpus "
            f"(e.g. {gone[0]!r})"
        )
    return frozen, f"frozen by run {frozen['created_by_run']} for corpus {frozen['corpus_root']}"


def _changes(previous_dir: str | None, current_dir: Path, passage_hashes: Any) -> dict[str, int]:
    """Passages and queries added/removed since the previous evaluation folder of the corpus.

    Passages are compared by hashes of their ids (``passage_hashes``: this run's, as written), so neither
    folder's passages are held in memory; a 64-bit collision between two of a corpus's ids would hide one change.
    """
    import numpy as np

    from embed_assets.beir_io import QUERIES_FILE, iter_passage_ids
    from embed_assets.storage import iter_jsonl

    if not previous_dir or not Path(previous_dir, "corpus.jsonl").is_file():
        return {}
    new = (
        np.unique(np.frombuffer(passage_hashes, dtype=np.int64))
        if len(passage_hashes)
        else np.zeros(0, np.int64)
    )
    old = np.unique(np.fromiter((hash(i) for i in iter_passage_ids(previous_dir)), dtype=np.int64))
    old_queries = {str(q["_id"]) for q in iter_jsonl(Path(previous_dir, QUERIES_FILE))}
    new_queries = {str(q["_id"]) for q in iter_jsonl(current_dir / QUERIES_FILE)}
    return {
        "passages_added": len(np.setdiff1d(new, old, assume_unique=True)),
        "passages_removed": len(np.setdiff1d(old, new, assume_unique=True)),
        "queries_added": len(new_queries - old_queries),
        "queries_removed": len(old_queries - new_queries),
    }
