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

from pydantic import BaseModel, ConfigDict, Field

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

#: Rows at or below which ``epochs=0`` trains 2 epochs (1 above: DESIGN §2's ranges).
SMALL_DATA_ROWS = 10_000


class TrainSettings(BaseModel):
    """Training hyper-parameters (the training sequence length has its one owner here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=0, ge=0, description="0 = by data size (≤10K rows: 2, >10K: 1).")
    negatives_per_row: int = Field(
        default=3, ge=0, description="Hardest mined negatives per training row (plus in-batch negatives)."
    )
    batch_size: int = Field(
        default=16, ge=2, description="Per-device batch (in-batch negatives scale with it)."
    )
    learning_rate: float = Field(default=1e-5, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps for linear warmup.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    max_seq_length: int = Field(
        default=128,
        ge=8,
        description="Training window in tokens (≤ the model's maximum); the saved model "
        "keeps the base model's window for evaluation and serving.",
    )
    max_steps: int = Field(default=-1, description="Stop after this many steps (-1 = by epochs).")
    loss: Literal["mnrl", "cached_mnrl"] = Field(
        default="mnrl", description="'mnrl' or 'cached_mnrl' (large effective batches)."
    )
    cached_mini_batch_size: int = Field(default=32, ge=1, description="cached_mnrl mini-batch size.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        default="auto", description="'auto' (bf16/fp16 on CUDA), 'no', 'fp16', 'bf16'."
    )
    eval_steps: int = Field(
        default=50, ge=1, description="Validation every N steps (when a val split exists)."
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
    num_gpus: int = Field(
        default=1,
        ge=1,
        description="Data-parallel GPUs: > 1 launches that many torchrun workers (DDP) when CUDA has them; "
        "batch_size is per GPU (see docs/multi-gpu.md).",
    )

    def resolved_epochs(self, n_rows: int) -> int:
        """Epochs by data size unless set explicitly."""
        if self.epochs > 0:
            return self.epochs
        return 2 if n_rows <= SMALL_DATA_ROWS else 1


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
    train_rows: int = 0
    mlflow: MLflowInfo = field(default_factory=MLflowInfo)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.mlflow.run_id or None

    def metadata(self) -> dict[str, Any]:
        from embed_assets.tracking import png_data_uri

        curve = [{"step": int(s), "loss": v} for s, v in self.loss_curve]
        return {
            **{k: v for k, v in self.report.items() if v is not None and k != "model_dir"},
            "num_processes": self.num_processes,
            "loss_curve": Table(["step", "loss"], curve, max_rows=40),
            "training_curves": Markdown(f"![loss and eval curves]({png_data_uri(self.curves_png)})"),
            "training_curves_png": PathRef(self.curves_png),
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
    trained_on = settings.model_dump(exclude={"num_gpus"})
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
    run_id = _open_run(tracker, work, last_complete_checkpoint(work) is not None, params, model, ctx)
    ctx.log.info(f"training on {len(rows)} rows on {device} x{nproc}; trainer checkpoints in {work}")
    try:
        report = _train(rows, work, out, settings, model, device, nproc, val, ctx, tracker, run_id)
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
    write_card(out, card_facts(chunks, pairs, rows, val, settings, model, report))
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
        train_rows=len(rows),
        mlflow=_log_result(tracker, run_id, summary, report.steps, png, out, ctx),
    )


def card_facts(
    chunks: ChunksManifest,
    pairs: PairsManifest,
    rows: list[dict[str, str]],
    val: dict[str, Any] | None,
    settings: TrainSettings,
    model: ModelSpec,
    report: Any,
) -> dict[str, Any]:
    """What the model card states about the training: counts and hashes, never corpus text (unless opted in)."""
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
            "train_max_seq_length": settings.max_seq_length,
            "query_prompt": model.query_prompt,
            "passage_prompt": model.passage_prompt,
            "device": report.device,
        },
    }
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
