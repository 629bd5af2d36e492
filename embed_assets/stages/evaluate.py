"""Stage 6 — evaluation: base and fine-tuned models on the same BEIR test set, at the same window.

Both models retrieve over the whole evaluation corpus BEIR-style (:func:`embed_assets.metrics.encode_and_search`,
cosine, exact search) and are scored like pytrec_eval (nDCG/Recall/P/MAP/MRR at every k). Both encode at
``eval_max_seq_length`` tokens (the evaluation window's one owner; default: the base model's own window), so a
model is never penalized or favoured by a different truncation. The nDCG@10 difference carries a paired
bootstrap interval over queries; the quality gate fails when the fine-tuned model is worse beyond that noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from embed_assets.stages.common import Gate, Manifest, Markdown, ModelSpec, PathRef, StageContext
from embed_assets.stages.split import SplitManifest
from embed_assets.stages.train import CheckpointManifest, MLflowInfo


class EvalSettings(BaseModel):
    """Cut-offs, the evaluation window and the noise estimate of the quality gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k_values: list[int] = Field(default=[1, 5, 10, 100], description="Cut-offs for every metric.")
    batch_size: int = Field(default=64, ge=1, description="Encoding batch size.")
    eval_max_seq_length: int = Field(
        default=0,
        ge=0,
        description="Tokens per text for base and fine-tuned alike (0 = the base model's window).",
    )
    noise_bootstrap_samples: int = Field(
        default=1000, ge=100, description="Paired bootstrap draws for the check."
    )


@dataclass
class Bootstrap:
    """Mean per-query nDCG@10 difference (fine-tuned − base) and its 95 % interval."""

    delta: float
    ci95_low: float
    ci95_high: float


@dataclass
class MetricsManifest(Manifest):
    """Metrics of both models (``path``: metrics.json; the run files sit beside it)."""

    path: str
    base: dict[str, float]
    finetuned: dict[str, float]
    deltas: list[dict[str, Any]]
    bootstrap: Bootstrap
    eval_max_seq_length: int
    eval_queries: int
    eval_passages: int
    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    table_md: str = ""
    mlflow: MLflowInfo = field(default_factory=MLflowInfo)

    def gates(self) -> list[Gate]:
        b = self.bootstrap
        return [
            Gate(
                "finetuned_not_worse_than_base",
                b.ci95_high >= 0,
                f"fine-tuned nDCG@10 {b.delta:+.4f} vs base (95% CI [{b.ci95_low:+.4f}, {b.ci95_high:+.4f}])",
                metadata={"ndcg@10_delta": b.delta, "ci95_low": b.ci95_low, "ci95_high": b.ci95_high},
            )
        ]

    def metadata(self) -> dict[str, Any]:
        return {
            "ndcg@10_base": self.base["NDCG@10"],
            "ndcg@10_finetuned": self.finetuned["NDCG@10"],
            "ndcg@10_delta": self.finetuned["NDCG@10"] - self.base["NDCG@10"],
            "recall@10_finetuned": self.finetuned["Recall@10"],
            "metrics": Markdown(self.table_md),
            "eval_max_seq_length": self.eval_max_seq_length,
            "eval_queries": self.eval_queries,
            "eval_passages": self.eval_passages,
            "device": self.device,
            "seconds_base": self.seconds.get("base", 0.0),
            "seconds_finetuned": self.seconds.get("finetuned", 0.0),
            "artifact_path": PathRef(self.path),
            **self.mlflow.metadata(),
        }


def evaluate_checkpoint(
    split: SplitManifest,
    checkpoint: CheckpointManifest,
    settings: EvalSettings,
    model: ModelSpec,
    ctx: StageContext,
    tracker: Any | None = None,
) -> MetricsManifest:
    """Evaluate the base model and the checkpoint on the split's BEIR folder.

    Args:
        split: Holds ``eval_beir`` (corpus, test queries, qrels).
        checkpoint: The fine-tuned model.
        settings: Cut-offs, window, bootstrap draws.
        model: The base model and its prompts.
        ctx: Where to write ``metrics.json`` and the run files.
        tracker: An :class:`embed_assets.tracking.MLflowTracker` (the checkpoint's run gets the table), or ``None``.

    Returns:
        A :class:`MetricsManifest` (its gate: fine-tuned not worse than base beyond noise).
    """
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import compare, markdown_table, paired_bootstrap, per_query_ndcg
    from embed_assets.storage import write_json

    corpus, queries, qrels = load_beir_folder(split.eval_beir, split="test")
    device = model.torch_device()
    window = settings.eval_max_seq_length or base_window(model)
    results, runs, seconds = {}, {}, {}
    for name, path in (("base", model.base_model), ("finetuned", checkpoint.model_dir)):
        start = time.monotonic()
        results[name], runs[name] = evaluate_model(
            path, corpus, queries, qrels, settings, model, window, device
        )
        seconds[name] = round(time.monotonic() - start, 2)
    rows = compare(results["base"], results["finetuned"])
    out = ctx.out_dir("beir_metrics")
    write_json(
        out / "metrics.json", {"base": results["base"], "finetuned": results["finetuned"], "deltas": rows}
    )
    write_json(out / "run_finetuned.json", runs["finetuned"])
    write_json(out / "run_base.json", runs["base"])
    boot = Bootstrap(
        *paired_bootstrap(
            per_query_ndcg(qrels, runs["base"], 10),
            per_query_ndcg(qrels, runs["finetuned"], 10),
            n=settings.noise_bootstrap_samples,
            seed=0,
        )
    )
    manifest = MetricsManifest(
        path=str(out / "metrics.json"),
        base=results["base"],
        finetuned=results["finetuned"],
        deltas=rows,
        bootstrap=boot,
        eval_max_seq_length=window,
        eval_queries=len(queries),
        eval_passages=len(corpus),
        device=device,
        seconds=seconds,
        table_md=markdown_table(rows),
    )
    ctx.log.info(
        f"nDCG@10 base {manifest.base['NDCG@10']:.4f} -> fine-tuned {manifest.finetuned['NDCG@10']:.4f} "
        f"({100 * boot.delta:+.1f} points, 95% CI [{100 * boot.ci95_low:+.1f}, {100 * boot.ci95_high:+.1f}]) "
        f"on {len(queries)} queries at {window} tokens"
    )
    manifest.mlflow = _log_to_mlflow(tracker, checkpoint, manifest, ctx)
    return manifest


def base_window(model: ModelSpec) -> int:
    """The base model's own maximum sequence length (from its config when it says, else by loading it)."""
    from embed_assets.models import load_sentence_transformer, model_window

    window = model_window(model.base_model)
    return window or int(load_sentence_transformer(model.base_model, device="cpu").max_seq_length)


def evaluate_model(
    path: str,
    corpus: dict[str, Any],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    settings: EvalSettings,
    model: ModelSpec,
    window: int,
    device: str,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """One model's metrics and run file at ``window`` tokens."""
    from embed_assets.metrics import encode_and_search, evaluate
    from embed_assets.models import load_sentence_transformer

    st_model = load_sentence_transformer(path, device=device, max_seq_length=window)
    query_prompt, passage_prompt = model.prompts()
    run, _ = encode_and_search(
        st_model,
        queries,
        corpus,
        top_k=max(settings.k_values),
        batch_size=settings.batch_size,
        query_prompt=query_prompt,
        corpus_prompt=passage_prompt,
    )
    return evaluate(qrels, run, k_values=settings.k_values), run


def _log_to_mlflow(
    tracker: Any, checkpoint: CheckpointManifest, manifest: MetricsManifest, ctx: StageContext
) -> MLflowInfo:
    """Log the BEIR table into the checkpoint's MLflow run (a new run if that one is not in this store)."""
    if tracker is None:
        return MLflowInfo()
    try:
        run_id = checkpoint.mlflow.run_id
        if not tracker.run_exists(run_id):
            if run_id:
                ctx.log.warning(f"the checkpoint's MLflow run {run_id} is not in {tracker!r}: new run")
            run_id = tracker.start_run(
                run_name=f"beir_metrics-{ctx.run_id[:8]}",
                tags={"dagster/run_id": ctx.run_id, "model_dir": checkpoint.model_dir},
            )
        tracker.set_tags(run_id, {"dagster/beir_metrics_run_id": ctx.run_id})
        b = manifest.bootstrap
        tracker.log_beir(
            run_id,
            manifest.base,
            manifest.finetuned,
            manifest.deltas,
            manifest.table_md,
            extra={
                "ndcg_at_10_delta_mean": b.delta,
                "ndcg_at_10_delta_ci95_low": b.ci95_low,
                "ndcg_at_10_delta_ci95_high": b.ci95_high,
                "eval_queries": manifest.eval_queries,
                "eval_passages": manifest.eval_passages,
                "eval_max_seq_length": manifest.eval_max_seq_length,
            },
            source=f"dagster run {ctx.run_id}",
        )
        tracker.finish(run_id)
        return MLflowInfo.from_link(tracker.link(run_id))
    except Exception as e:  # the metrics are computed and saved; tracking trouble is reported, not fatal
        ctx.log.warning(f"MLflow logging of the BEIR metrics failed: {e}")
        return MLflowInfo(error=str(e)[:500])
