"""Stage 5 — fine-tuning: the base model trained on the mined rows (asset ``checkpoint``).

:func:`train_checkpoint` owns the whole training lifecycle: the resumable trainer work folder (keyed by data,
model, settings and world size), the MLflow run (opened before any compute, reopened when an interrupted
training resumes, marked FAILED on error), single-process or ``torchrun`` data-parallel training
(:mod:`embed_assets.training_cli`), the loss/validation plot, and the tracking of the result. The
sentence-transformers plumbing itself is in :mod:`embed_assets.training`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from embed_assets.stages.common import (
    Manifest,
    Markdown,
    ModelSpec,
    PathRef,
    StageContext,
    StageError,
    Table,
    fingerprint,
)
from embed_assets.stages.ingest import ChunksManifest
from embed_assets.stages.mine import MinedManifest
from embed_assets.stages.sdg import PairsManifest, passage_pool
from embed_assets.stages.split import SplitManifest

#: Rows at or below which ``epochs=0`` trains up to 3 epochs (1 above; early stopping picks within).
SMALL_DATA_ROWS = 10_000
#: A learning-rate probe shorter than this says more about noise than about the learning rate.
MIN_PROBE_STEPS = 8
#: The in-batch contrasts of the MNRL losses (sentence-transformers' ``directions``).
MNRL_DIRECTIONS = ("query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc")
#: Smallest training window in tokens (besides 0 = the base model's): below it a passage is a word or two.
MIN_TRAIN_WINDOW = 8


class TrainSettings(BaseModel):
    """Training hyper-parameters (the training sequence length has its one owner here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(
        default=0,
        ge=0,
        description="Most epochs to train; with a validation split the best checkpoint is kept and training "
        "stops early (early_stopping_patience). 0 = by data size (≤10K rows: 3, >10K: 1).",
    )
    negatives_per_row: int = Field(
        default=1,
        ge=0,
        description="Hardest mined negatives per training row (plus in-batch negatives). Each costs a forward "
        "and backward pass per row; beyond the first they add little.",
    )
    batch_size: int = Field(
        default=16, ge=2, description="Per-device batch (in-batch negatives scale with it)."
    )
    learning_rate: float = Field(
        default=5e-5,
        gt=0,
        description="Peak learning rate when it is not chosen on the validation split (see lr_candidates).",
    )
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps for linear warmup.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    max_seq_length: int = Field(
        default=0,
        ge=0,
        description="Training window in tokens (≤ the model's maximum). 0: the base model's own window, the "
        "one evaluation and serving use, so a passage trains on the text it is searched by (a shorter window "
        "cuts the tail of long passages off the positives: cheaper steps, and queries about the tail then "
        "teach the wrong match). The saved model keeps the base model's window either way.",
    )
    validation_max_seq_length: int = Field(
        default=0,
        ge=0,
        description="Window in tokens of the validation passes that choose the learning rate and the kept "
        "checkpoint. 0: the training window (max_seq_length).",
    )
    max_steps: int = Field(default=-1, description="Stop after this many steps (-1 = by epochs).")
    loss: Literal["mnrl", "cached_mnrl", "gist", "cached_gist"] = Field(
        default="mnrl",
        description="'mnrl' (MultipleNegativesRankingLoss), 'gist' (GISTEmbed: the base model as guide masks "
        "false in-batch negatives), or their 'cached_' forms (GradCache: large batches at small memory).",
    )
    cached_mini_batch_size: int = Field(default=32, ge=1, description="cached_* losses: mini-batch size.")
    hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] = Field(
        default="in_batch_negatives", description="MNRL losses: which negatives hardness_strength up-weights."
    )
    hardness_strength: float = Field(
        default=0.0, ge=0, description="MNRL losses: weight harder negatives more (0 = off)."
    )
    mnrl_directions: list[str] = Field(
        default=["query_to_doc"],
        description="MNRL losses: the in-batch contrasts, in one softmax. 'query_to_doc' (always included) is "
        "plain MNRL; adding 'doc_to_query', 'query_to_query' and 'doc_to_doc' gives GTE's improved contrastive "
        "loss (each passage also against the batch's queries, each query against the other queries, each "
        "passage against the other passages).",
    )
    matryoshka_dims: list[int] = Field(
        default=[],
        description="Also train truncated embeddings of these sizes (MatryoshkaLoss over the chosen loss; the "
        "full size is always included); beir_metrics then reports nDCG@10 at each. Empty: off.",
    )
    matryoshka_rotation: bool = Field(
        default=True,
        description="With matryoshka_dims: after training, rotate the embedding space (a frozen orthogonal "
        "layer, the PCA of the corpus passages' embeddings) so the leading coordinates carry the most variance. "
        "Similarities at the full size are unchanged; each truncated size keeps more of the full quality.",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        default="auto", description="'auto' (bf16/fp16 on CUDA), 'no', 'fp16', 'bf16'."
    )
    eval_steps: int = Field(
        default=0,
        ge=0,
        description="Validation every N steps when a val split exists (0: once per epoch); each is a resume "
        "point, and the best one by validation nDCG@10 is the model kept.",
    )
    early_stopping_patience: int = Field(
        default=1,
        ge=0,
        description="Stop after this many validations without a better nDCG@10 (0: never stop early).",
    )
    save_steps: int = Field(default=50, ge=1, description="Checkpoint every N steps (resume point).")
    logging_steps: int = Field(default=5, ge=1, description="Loss logged every N steps.")
    seed: int = Field(default=42, description="Training seed.")
    model_card_examples: int = Field(
        default=0,
        ge=0,
        description="Training pairs quoted in the model card (README.md). 0 keeps corpus text out of the card, "
        "so publishing the model does not publish the corpus.",
    )
    lr_candidates: list[float] = Field(
        default=[2e-5, 5e-5, 1e-4],
        description="Learning rates to choose from on the validation split (a short probe each, the best "
        "validation nDCG@10 wins if it beats learning_rate beyond noise); empty, or no validation split: "
        "learning_rate is used.",
    )
    lr_probe_fraction: float = Field(
        default=0.5,
        gt=0,
        le=2,
        description="Compute budget of the learning-rate probes, as a share of the final training's steps.",
    )
    refit_on_validation: bool = Field(
        default=False,
        description="After the learning rate and the kept checkpoint are chosen on the validation split, train "
        "once more from the base model on the training and validation rows together (the chosen rate, as many "
        "epochs as the kept model trained, one complete schedule) and keep that model, so the validation pairs "
        "train too, as a plain script would use them. Costs one more training; the refit model has no "
        "validation score of its own (validation is then training data).",
    )
    num_gpus: int = Field(
        default=1,
        ge=1,
        description="Data-parallel GPUs: > 1 launches that many torchrun workers (DDP) when CUDA has them; "
        "batch_size is per GPU (see docs/multi-gpu.md).",
    )

    @field_validator("max_seq_length")
    @classmethod
    def _usable_window(cls, value: int) -> int:
        if 0 < value < MIN_TRAIN_WINDOW:
            raise ValueError(
                f"max_seq_length must be 0 (the base model's window) or at least {MIN_TRAIN_WINDOW} tokens; "
                f"got {value}"
            )
        return value

    def training_window(self, base_window: int) -> int:
        """Tokens per text while training: ``max_seq_length``, or the base model's own window when it is 0."""
        return self.max_seq_length or base_window

    @field_validator("mnrl_directions")
    @classmethod
    def _known_directions(cls, value: list[str]) -> list[str]:
        unknown = [d for d in value if d not in MNRL_DIRECTIONS]
        if unknown or "query_to_doc" not in value:
            raise ValueError(
                f"mnrl_directions must include 'query_to_doc' and name only {', '.join(MNRL_DIRECTIONS)}; "
                f"got {value}"
            )
        return list(dict.fromkeys(value))

    def resolved_epochs(self, n_rows: int) -> int:
        """Epochs by data size unless set explicitly."""
        if self.epochs > 0:
            return self.epochs
        return 3 if n_rows <= SMALL_DATA_ROWS else 1


@dataclass
class MLflowInfo:
    """Where a stage's numbers went in MLflow (empty ``run_id``: tracking off; ``error``: logging failed)."""

    run_id: str = ""
    experiment_id: str = ""
    tracking_uri: str = ""
    url: str = ""
    ui_command: str = ""
    markdown: str = ""
    error: str = ""

    @classmethod
    def from_link(cls, link: Any) -> MLflowInfo:
        return cls(
            run_id=link.run_id,
            experiment_id=link.experiment_id,
            tracking_uri=link.tracking_uri,
            url=link.url or "",
            ui_command=link.ui_command or "",
            markdown=link.markdown(),
        )

    def metadata(self) -> dict[str, Any]:
        from embed_assets.stages.common import Url

        if self.error:
            return {"mlflow_error": self.error}
        if not self.run_id:
            return {}
        meta: dict[str, Any] = {
            "mlflow_run_id": self.run_id,
            "mlflow_experiment_id": self.experiment_id,
            "mlflow_tracking_uri": self.tracking_uri,
            "mlflow": Markdown(self.markdown),
        }
        if self.url:
            meta["mlflow_run"] = Url(self.url)
        if self.ui_command:
            meta["mlflow_ui_command"] = self.ui_command
        return meta


@dataclass
class CheckpointManifest(Manifest):
    """The fine-tuned sentence-transformers folder (``model_dir``) and how it was trained."""

    model_dir: str
    base_model: str
    run_id: str
    device: str
    num_processes: int
    work_dir: str
    report: dict[str, Any]
    curves_png: str
    loss_curve: list[list[float]] = field(default_factory=list)
    eval_curve: list[list[float]] = field(default_factory=list)  # (step, validation nDCG@10)
    train_rows: int = 0
    matryoshka_dims: list[int] = field(default_factory=list)  # sizes trained besides the full one
    val_beir: str = ""  # the validation split as a BEIR folder (model merging chooses on it); "": none
    selection: LRSelection | None = None
    mlflow: MLflowInfo = field(default_factory=MLflowInfo)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.mlflow.run_id or None

    def selection_metadata(self) -> dict[str, Any]:
        if self.selection is None:
            return {}
        meta: dict[str, Any] = {
            "learning_rate": self.selection.learning_rate,
            "learning_rate_choice": self.selection.reason,
        }
        if self.selection.probes:
            meta["learning_rate_probes"] = Table(["learning_rate", "val_ndcg@10"], self.selection.probes)
        if self.selection.kept:
            meta["kept_checkpoint"] = self.selection.kept
        elif self.eval_curve:
            best = max(self.eval_curve, key=lambda p: p[1])
            meta["kept_checkpoint"] = f"step {int(best[0])} (best validation nDCG@10 {best[1]:.4f})"
        if self.selection.refit:
            meta["refit"] = self.selection.refit
        return meta

    def metadata(self) -> dict[str, Any]:
        from embed_assets.tracking import png_data_uri

        curve = [{"step": int(s), "loss": v} for s, v in self.loss_curve]
        shown = "training loss per step" + (
            " and validation nDCG@10" if self.eval_curve else " (no validation split: no validation curve)"
        )
        return {
            **{k: v for k, v in self.report.items() if v is not None and k != "model_dir"},
            "num_processes": self.num_processes,
            "loss_curve": Table(["step", "loss"], curve, max_rows=40),
            "training_curves": Markdown(f"![{shown}]({png_data_uri(self.curves_png)})\n\n{shown}"),
            "training_curves_png": PathRef(self.curves_png),
            **self.selection_metadata(),
            **self.mlflow.metadata(),
            "model_dir": PathRef(self.model_dir),
            "trainer_work_dir": PathRef(self.work_dir),
        }


def validation_set(
    chunks: ChunksManifest, pairs: PairsManifest, split: SplitManifest
) -> dict[str, Any] | None:
    """The val split as an ``InformationRetrievalEvaluator`` input over the non-test passages (or ``None``)."""
    val = split.val_records()
    if not val:
        return None
    test_docs = set(split.test_docs)
    corpus = {c.chunk_id: c.text for c in passage_pool(chunks, pairs) if c.doc_id not in test_docs}
    return {
        "queries": {r.qa_id: r.query for r in val},
        "corpus": corpus,
        "relevant_docs": {r.qa_id: {c for c in r.positive_chunk_ids if c in corpus} for r in val},
    }


def train_checkpoint(
    chunks: ChunksManifest,
    pairs: PairsManifest,
    split: SplitManifest,
    mined: MinedManifest,
    settings: TrainSettings,
    model: ModelSpec,
    ctx: StageContext,
    tracker: Any | None = None,
) -> CheckpointManifest:
    """Fine-tune the base model on the mined rows (resumable, tracked).

    Args:
        chunks: The corpus passages (validation corpus).
        pairs: The pairs (for lineage in MLflow).
        split: The split (validation queries).
        mined: The mined rows.
        settings: Hyper-parameters.
        model: Base model, prompts and device.
        ctx: Output folder; trainer checkpoints live in ``ctx.cache_dir("train")``.
        tracker: An :class:`embed_assets.tracking.MLflowTracker`, or ``None`` for no tracking.

    Returns:
        A :class:`CheckpointManifest`.

    Raises:
        StageError: MLflow could not be reached before training (with how to turn tracking off).
    """
    from embed_assets.model_card import write_card
    from embed_assets.tracking import plot_training_curves
    from embed_assets.training import last_complete_checkpoint, training_rows
    from embed_assets.training_cli import distributed_processes

    rows = training_rows(mined.rows(), settings.negatives_per_row)
    val = validation_set(chunks, pairs, split)
    device = model.torch_device()
    nproc = distributed_processes(settings.num_gpus, device, _cuda_devices(device))
    if settings.num_gpus > 1 and nproc == 1:
        ctx.log.warning(
            f"num_gpus={settings.num_gpus} but only one usable CUDA device for {device!r}: one process"
        )
    # Stable per (data, model, settings, world size): a killed run resumes from its last trainer checkpoint.
    data_hash = hashlib.sha256(Path(mined.path).read_bytes()).hexdigest()[:16]
    # The refit trains in its own sub-folder (see refit_on_validation), so the choices before it stay resumable.
    trained_on = settings.model_dump(exclude={"num_gpus", "refit_on_validation"})
    work = ctx.cache_dir("train") / fingerprint(
        data_hash,
        model.base_model,
        trained_on,
        model.query_prompt,
        model.passage_prompt,
        *([nproc] if nproc > 1 else []),
    )
    run_dir = ctx.out_dir("checkpoint")
    out = run_dir / "model"
    params = {
        **settings.model_dump(),
        "query_prompt": model.query_prompt,
        "passage_prompt": model.passage_prompt,
        "base_model": model.base_model,
        "device": device,
        "num_processes": nproc,
        "data/train_rows": len(rows),
        "data/train_queries": len({r["anchor"] for r in rows}),
        "data/val_queries": len(val["queries"]) if val else 0,
        "data/val_passages": len(val["corpus"]) if val else 0,
        "data/sdg_pairs": pairs.n_pairs,
        "data/sdg_generator": pairs.generator,
        "data/mined_rows_sha256": data_hash,
    }
    resuming = any(last_complete_checkpoint(d) for d in (work, *work.glob("*/")))
    run_id = _open_run(tracker, work, resuming, params, model, ctx)
    ctx.log.info(f"training on {len(rows)} rows on {device} x{nproc}; trainer checkpoints in {work}")
    try:
        selection = choose_learning_rate(
            rows, val, settings, model, device, nproc, work, ctx, tracker, run_id
        )
        settings = settings.model_copy(update={"learning_rate": selection.learning_rate})
        final_work = work / f"lr-{selection.learning_rate:g}" if selection.probes else work
        report = _train(rows, final_work, out, settings, model, device, nproc, val, ctx, tracker, run_id)
        keep_best_probe(selection, report, work, out, ctx, tracker, run_id)
        if settings.refit_on_validation:
            val_rows = training_rows(mined.val_rows(), settings.negatives_per_row)
            refit = refit_on_validation(
                rows, val_rows, selection, report, settings, model, device, nproc, work, out, ctx
            )
            if refit is not None:
                rows = rows + val_rows
                _log_refit(selection, refit, ctx, tracker, run_id)
        if settings.matryoshka_dims and settings.matryoshka_rotation:
            rotate_by_corpus_variance(out, chunks, pairs, settings, model, report, ctx)
    except BaseException:
        if tracker is not None:
            _quietly(ctx, "marking the MLflow run failed", tracker.finish, run_id, "FAILED")
        raise
    png = plot_training_curves(
        report.loss_curve,
        report.eval_curve,
        run_dir / "training_curves.png",
        title=f"checkpoint {ctx.run_id[:8]}",
    )
    write_card(out, card_facts(chunks, pairs, rows, val, settings, model, report, selection))
    val_beir = write_validation_beir(val, run_dir / "val_beir")
    summary = {k: v for k, v in report.as_metadata().items() if k not in ("model_dir", "resumed_from")}
    return CheckpointManifest(
        model_dir=str(out),
        base_model=model.base_model,
        run_id=ctx.run_id,
        device=device,
        num_processes=nproc,
        work_dir=str(work),
        report=report.as_metadata(),
        curves_png=str(png),
        loss_curve=[[s, v] for s, v in report.loss_curve],
        eval_curve=[[s, v] for s, v in report.eval_curve],
        train_rows=len(rows),
        matryoshka_dims=sorted(set(settings.matryoshka_dims), reverse=True),
        val_beir=val_beir,
        selection=selection,
        mlflow=_log_result(tracker, run_id, summary, report.steps, png, out, ctx),
    )


def write_validation_beir(val: dict[str, Any] | None, folder: Path) -> str:
    """The validation set as a BEIR folder (split ``dev``) for choices made after training; ``""`` if none."""
    from embed_assets.beir_io import write_beir_folder

    if not val or not val["queries"]:
        return ""
    qrels = {q: {c: 1 for c in rel} for q, rel in val["relevant_docs"].items() if rel}
    corpus = {cid: {"title": "", "text": text} for cid, text in val["corpus"].items()}
    write_beir_folder(folder, corpus, {q: val["queries"][q] for q in qrels}, qrels, split="dev")
    return str(folder)


@dataclass
class LRSelection:
    """Which learning rate the training used, and why (``probes``: what each candidate scored)."""

    learning_rate: float
    reason: str
    probes: list[dict[str, float]] = field(default_factory=list)  # learning_rate, val_ndcg@10
    probe_steps: int = 0
    kept: str = ""  # set when the winning probe, not the final training, is the model kept (and why)
    refit: str = ""  # set by refit_on_validation: what the kept model was retrained on (or why it was not)
    refit_steps: int = 0  # the refit's steps (0: no refit)


def choose_learning_rate(
    rows: list[dict[str, str]],
    val: dict[str, Any] | None,
    settings: TrainSettings,
    model: ModelSpec,
    device: str,
    nproc: int,
    work: Path,
    ctx: StageContext,
    tracker: Any,
    run_id: str,
) -> LRSelection:
    """Pick the learning rate on the validation split: a short probe per candidate, the best nDCG@10 wins.

    Each of the ``lr_candidates`` trains from the base model for the same number of steps, together
    ``lr_probe_fraction`` of the final training's steps (the stated compute budget), and is scored on the
    validation queries; the final training then runs at the winner (and stops early on the same validation
    set). The winner must beat the configured ``learning_rate`` (when it is a candidate) beyond noise, a paired
    bootstrap over the validation queries: a validation split of a few dozen queries ranks near-equal
    candidates by chance (xquad-de, full budget, validated at 256 tokens: 1e-4 won by 0.0006 and its
    training gained +5.4 nDCG@10 points on the test set, the one at 5e-05 +7.2). Without a validation split,
    or with too little data for a probe, ``learning_rate`` is used.

    Returns:
        The :class:`LRSelection` (recorded in metadata and MLflow).
    """
    from embed_assets.metrics import paired_bootstrap
    from embed_assets.training import _steps_per_epoch

    candidates = sorted(set(settings.lr_candidates))
    if not candidates:
        return LRSelection(settings.learning_rate, "learning_rate as configured (lr_candidates is empty)")
    if not val or not val.get("queries"):
        return LRSelection(
            settings.learning_rate, "learning_rate as configured: no validation split to choose on"
        )
    final_steps = (
        settings.max_steps
        if settings.max_steps > 0
        else _steps_per_epoch(rows, settings.batch_size) * settings.resolved_epochs(len(rows))
    )
    probe_steps = int(final_steps * settings.lr_probe_fraction / len(candidates))
    if probe_steps < MIN_PROBE_STEPS:
        return LRSelection(
            settings.learning_rate,
            f"learning_rate as configured: {final_steps} training steps leave {probe_steps} per probe "
            f"(< {MIN_PROBE_STEPS})",
        )
    probes = []
    per_query: dict[float, dict[str, float]] = {}
    for lr in candidates:
        probe = settings.model_copy(
            update={
                "learning_rate": lr,
                "max_steps": probe_steps,
                "eval_steps": probe_steps,
                "early_stopping_patience": 0,
            }
        )
        ctx.log.info(f"learning-rate probe {lr:g}: {probe_steps} steps, then validation")
        report = _train(
            rows,
            _probe_dir(work, lr),
            _probe_dir(work, lr) / "model",
            probe,
            model,
            device,
            nproc,
            val,
            ctx,
            None,
            run_id,
        )
        score = report.eval_curve[-1][1] if report.eval_curve else float("nan")
        probes.append({"learning_rate": lr, "val_ndcg@10": score})
        if report.val_per_query:
            per_query[lr] = report.val_per_query
        ctx.log.info(f"learning-rate probe {lr:g}: validation nDCG@10 {score:.4f}")
    best = max(probes, key=lambda p: (p["val_ndcg@10"], -p["learning_rate"]))
    budget = (
        f"{len(candidates)} probes of {probe_steps} steps each "
        f"({settings.lr_probe_fraction:g} of the {final_steps} final steps in all)"
    )
    reason = f"best validation nDCG@10 ({best['val_ndcg@10']:.4f}) of {budget}"
    chosen = best["learning_rate"]
    if settings.learning_rate in per_query and chosen != settings.learning_rate:
        delta, low, high = paired_bootstrap(per_query[settings.learning_rate], per_query[chosen])
        if low <= 0:
            reason = (
                f"learning_rate as configured: the best of {budget}, {chosen:g}, was not better beyond noise "
                f"({delta:+.4f} nDCG@10 [95% CI {low:+.4f}, {high:+.4f}] on {len(per_query[chosen])} validation "
                "queries)"
            )
            chosen = settings.learning_rate
    selection = LRSelection(chosen, reason, probes, probe_steps)
    if tracker is not None:
        _quietly(
            ctx,
            "logging the learning-rate probes to MLflow",
            tracker.log_metrics,
            run_id,
            {f"lr_probe/{p['learning_rate']:g}/val_ndcg_at_10": p["val_ndcg@10"] for p in probes},
        )
        _quietly(
            ctx,
            "logging the chosen learning rate",
            tracker.set_tags,
            run_id,
            {"selected/learning_rate": selection.learning_rate, "selected/reason": selection.reason},
        )
    ctx.log.info(f"learning rate {selection.learning_rate:g}: {selection.reason}")
    return selection


def _probe_dir(work: Path, learning_rate: float) -> Path:
    """The trainer folder of one learning-rate probe (its model in ``model/``)."""
    return work / f"probe-lr-{learning_rate:g}"


def keep_best_probe(
    selection: LRSelection, report: Any, work: Path, out: Path, ctx: StageContext, tracker: Any, run_id: str
) -> None:
    """Keep the winning learning-rate probe instead of the final training when it validates better.

    The probe is a complete short training (its schedule decays to zero) scored on the same validation queries
    as the final training's checkpoints, so all are candidates of one model selection: the best validation
    nDCG@10 is the model kept. A longer run can forget more of the base model than it learns (measured on
    covidqa: the 25-step probe beat every checkpoint of the 150-step run on validation, and on the test set,
    +6.9 against +4.9 nDCG@10 points). Costs nothing: the probe was trained and scored anyway.
    """
    import shutil

    from embed_assets.storage import atomic_path

    if not selection.probes or not report.eval_curve:
        return
    probe = next(p for p in selection.probes if p["learning_rate"] == selection.learning_rate)
    final_best = max(v for _, v in report.eval_curve)
    if not probe["val_ndcg@10"] > final_best:
        return
    with atomic_path(out) as tmp:
        shutil.copytree(_probe_dir(work, selection.learning_rate) / "model", tmp, dirs_exist_ok=True)
    selection.kept = (
        f"learning-rate probe {selection.learning_rate:g} after {selection.probe_steps} steps (best validation "
        f"nDCG@10 {probe['val_ndcg@10']:.4f}; the final training's best was {final_best:.4f})"
    )
    ctx.log.info(f"kept model: the {selection.kept}")
    if tracker is not None:
        _quietly(ctx, "logging the kept model", tracker.set_tags, run_id, {"selected/kept": selection.kept})


@dataclass
class Refit:
    """The refit of :func:`refit_on_validation`: its steps and rows, and the trainer's report."""

    steps: int
    train_rows: int
    val_rows: int
    report: Any


def kept_steps(selection: LRSelection, report: Any) -> int:
    """Optimizer steps the kept model trained: the winning probe's, or the best validated checkpoint's."""
    if selection.kept:
        return selection.probe_steps
    return int(max(report.eval_curve, key=lambda p: p[1])[0]) if report.eval_curve else 0


def refit_on_validation(
    rows: list[dict[str, str]],
    val_rows: list[dict[str, str]],
    selection: LRSelection,
    report: Any,
    settings: TrainSettings,
    model: ModelSpec,
    device: str,
    nproc: int,
    work: Path,
    out: Path,
    ctx: StageContext,
) -> Refit | None:
    """Retrain the kept model's recipe from the base model on the training and validation rows together.

    Model selection needs held-out pairs, the final model does not: once the learning rate and the number of
    steps are chosen on validation, those pairs are more training data (the plain script a user writes trains
    on all of them). The refit runs as many epochs as the kept model trained (its steps over the training rows'
    epoch, times the larger set's epoch), as one complete schedule at the chosen learning rate, and replaces
    the model in ``out``. Nothing validates the refit itself; the evaluation's test split and the golden set,
    never trained on, still do. Without a validated choice (no validation split, or no validation rows
    mined), ``selection.refit`` says why and ``out`` is left as it is.

    Returns:
        The :class:`Refit`, or ``None`` when there was nothing to refit on.
    """
    from embed_assets.training import _steps_per_epoch

    steps = kept_steps(selection, report)
    if not val_rows or not steps:
        selection.refit = "not refit: " + (
            "no validation rows were mined"
            if not val_rows
            else "no validated checkpoint to take the steps of"
        )
        ctx.log.info(selection.refit)
        return None
    all_rows = rows + val_rows
    epochs = steps / _steps_per_epoch(rows, settings.batch_size)
    refit_steps = max(1, round(epochs * _steps_per_epoch(all_rows, settings.batch_size)))
    refit = settings.model_copy(
        update={"max_steps": refit_steps, "eval_steps": 0, "early_stopping_patience": 0}
    )
    ctx.log.info(
        f"refit on {len(rows)} training + {len(val_rows)} validation rows: {refit_steps} steps "
        f"({epochs:.2f} epochs, as the kept model's {steps} steps) at learning rate {settings.learning_rate:g}"
    )
    # Its own folder per validation data: a killed refit resumes, a changed split starts over.
    folder = work / f"refit-{fingerprint(val_rows)}"
    trained = _train(all_rows, folder, out, refit, model, device, nproc, None, ctx, None, "")
    selection.refit = (
        f"refit from the base model on {len(all_rows)} rows ({len(rows)} training + {len(val_rows)} "
        f"validation) for {refit_steps} steps ({epochs:.2f} epochs, as the kept model's {steps} steps) at "
        f"learning rate {settings.learning_rate:g}; the validation scores above are of the model before it"
    )
    selection.refit_steps = refit_steps
    return Refit(refit_steps, len(rows), len(val_rows), trained)


def _log_refit(selection: LRSelection, refit: Refit, ctx: StageContext, tracker: Any, run_id: str) -> None:
    """Say what the refit trained on, in the log and as MLflow tags and metrics."""
    ctx.log.info(f"kept model: {selection.refit}")
    if tracker is None:
        return
    _quietly(ctx, "logging the refit", tracker.set_tags, run_id, {"selected/refit": selection.refit})
    _quietly(
        ctx,
        "logging the refit's size",
        tracker.log_metrics,
        run_id,
        {"refit/steps": refit.steps, "refit/val_rows": refit.val_rows, "refit/seconds": refit.report.seconds},
    )


def rotate_by_corpus_variance(
    out: Path,
    chunks: ChunksManifest,
    pairs: PairsManifest,
    settings: TrainSettings,
    model: ModelSpec,
    report: Any,
    ctx: StageContext,
) -> None:
    """Append the variance rotation of the corpus passages to the kept model (see ``add_variance_rotation``).

    Runs on the model that is kept (final training or probe), at its serving window, so every later stage --
    merging, evaluation per Matryoshka size, export, serving's ``dimensions`` -- sees the rotated coordinates.
    ``report.rotation_variance`` records the share of variance each trained size keeps.
    """
    import shutil

    from embed_assets.models import load_sentence_transformer
    from embed_assets.storage import atomic_path
    from embed_assets.training import ROTATION_FIT_TEXTS, add_variance_rotation, matryoshka_sizes

    st_model = load_sentence_transformer(str(out), device=model.torch_device())
    passages = [c.text for c in passage_pool(chunks, pairs)]
    shares = add_variance_rotation(st_model, passages, model.passage_prompt, seed=settings.seed)
    report.rotation_variance = {str(d): round(shares[d - 1], 4) for d in matryoshka_sizes(st_model, settings)}
    with atomic_path(out) as tmp:
        shutil.copytree(out, tmp, dirs_exist_ok=True)  # the training record and any other file stay
        st_model.save(str(tmp), create_model_card=False)
    shown = ", ".join(f"{d} dims {s:.0%}" for d, s in report.rotation_variance.items())
    fitted = min(len(set(passages)), ROTATION_FIT_TEXTS)
    ctx.log.info(f"Matryoshka rotation fitted on {fitted} corpus passages; variance kept: {shown}")


def card_facts(
    chunks: ChunksManifest,
    pairs: PairsManifest,
    rows: list[dict[str, str]],
    val: dict[str, Any] | None,
    settings: TrainSettings,
    model: ModelSpec,
    report: Any,
    selection: LRSelection | None = None,
) -> dict[str, Any]:
    """What the model card states about the training: counts and hashes, never corpus text (unless opted in).

    When the winning learning-rate probe is the model kept (:func:`keep_best_probe`), its steps are the card's.
    """
    facts: dict[str, Any] = {
        "base_model": model.base_model,
        "data": {
            "passages": chunks.n_chunks,
            "documents": chunks.n_docs,
            "passages_sha256": chunks.data_version,
            "pairs": pairs.n_pairs,
            "pairs_generator": pairs.generator,
            "pairs_sha256": pairs.data_version,
            "training_rows": len(rows),
            "validation_queries": len(val["queries"]) if val else 0,
        },
        "training": {
            "loss": settings.loss,
            "epochs": report.epochs,
            "steps": report.steps,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "negatives_per_row": settings.negatives_per_row,
            "train_max_seq_length": report.train_window,
            "query_prompt": model.query_prompt,
            "passage_prompt": model.passage_prompt,
            "device": report.device,
        },
    }
    if selection is not None and selection.kept:
        facts["training"].update(steps=selection.probe_steps, kept=selection.kept)
        facts["training"].pop("epochs")
    if selection is not None and selection.refit_steps:
        facts["training"].update(steps=selection.refit_steps, refit=selection.refit)
        facts["training"].pop("epochs", None)
    if settings.model_card_examples:
        facts["examples"] = [
            {"anchor": r["anchor"], "positive": r["positive"]} for r in rows[: settings.model_card_examples]
        ]
    return facts


def _open_run(
    tracker: Any, work: Path, resuming: bool, params: dict[str, Any], model: ModelSpec, ctx: StageContext
) -> str:
    """Open (or reopen, when resuming) the MLflow run and log the parameters, before any compute."""
    from embed_assets.tracking import redact_uri

    if tracker is None:
        return ""
    try:
        # A training resumed from its trainer checkpoint continues its interrupted MLflow run.
        run_id, reopened = tracker.resume_or_start(
            work / "mlflow_run_id.txt",
            resuming=resuming,
            run_name=f"checkpoint-{ctx.run_id[:8]}",
            tags={
                "dagster/run_id": ctx.run_id,
                "dagster/asset": "checkpoint",
                "base_model": model.base_model,
            },
        )
        tracker.log_params(run_id, params)
    except Exception as e:  # fail before spending compute, with a way out
        raise StageError(
            f"MLflow tracking at {redact_uri(tracker.tracking_uri)} failed: {e}. Fix the tracking resource's "
            "tracking_uri, or set resources.tracking.config.enabled: false."
        ) from e
    ctx.log.info(f"MLflow run {run_id} ({tracker!r}){' reopened' if reopened else ''}")
    return run_id


def _train(
    rows: list[dict[str, str]],
    work: Path,
    out: Path,
    settings: TrainSettings,
    model: ModelSpec,
    device: str,
    nproc: int,
    val: dict[str, Any] | None,
    ctx: StageContext,
    tracker: Any,
    run_id: str,
) -> Any:
    """Train in this process, or as ``nproc`` torchrun workers (rank 0 logs to MLflow)."""
    from embed_assets.training import train
    from embed_assets.training_cli import run_distributed, write_spec

    if nproc == 1:
        return train(
            model.base_model,
            rows,
            work,
            out,
            settings,
            device=device,
            val=val,
            progress=ctx.log.info,
            callbacks=[tracker.callback(run_id)] if tracker is not None else [],
            query_prompt=model.query_prompt,
            passage_prompt=model.passage_prompt,
        )
    spec = write_spec(
        work / "ddp",
        base_model=model.base_model,
        rows=rows,
        work_dir=work,
        out_dir=out,
        settings=settings,
        device="cuda",
        val=val,
        prompts={"query": model.query_prompt, "passage": model.passage_prompt},
        tracking={"run_id": run_id, "experiment": tracker.experiment, "artifact_root": str(ctx.root)}
        if tracker is not None
        else None,
    )
    return run_distributed(
        spec, nproc, progress=ctx.log.info, tracking_uri=tracker.tracking_uri if tracker else None
    )


def _log_result(
    tracker: Any, run_id: str, summary: dict[str, Any], steps: int, png: Path, out: Path, ctx: StageContext
) -> MLflowInfo:
    """Log the training summary, plot and model into the run and finish it (trouble is reported, not fatal)."""
    if tracker is None:
        return MLflowInfo()
    try:
        tracker.log_metrics(run_id, summary, step=steps, prefix="checkpoint/")
        tracker.log_file(run_id, png, "plots")
        tracker.log_model_dir(run_id, out, "model")
        tracker.finish(run_id)
        return MLflowInfo.from_link(tracker.link(run_id))
    except Exception as e:  # the model is trained and saved: report the tracking problem, keep the result
        ctx.log.warning(f"MLflow logging after training failed: {e}")
        return MLflowInfo(run_id=run_id, error=str(e)[:500])


def _cuda_devices(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def _quietly(ctx: StageContext, what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:
        ctx.log.warning(f"{what}: {e}")
