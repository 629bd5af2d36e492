"""Asset of the evaluation stage: ``beir_metrics``."""

import dagster as dg

from embed_assets.defs.common import GPU_STEP, GROUP, emit
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel, MLflowTracking
from embed_assets.stages.evaluate import EvalSettings, evaluate_checkpoint
from embed_assets.stages.split import SplitManifest
from embed_assets.stages.train import CheckpointManifest


class EvalConfig(EvalSettings, dg.Config):
    """Run config of ``beir_metrics`` (the fields of :class:`~embed_assets.stages.evaluate.EvalSettings`)."""


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "json"},
    code_version="2",
    check_specs=[
        dg.AssetCheckSpec(
            "finetuned_not_worse_than_base",
            blocking=True,
            asset="beir_metrics",
            description="Fails when the served model's nDCG@10 (fine-tuned, or its merge with the base) is below "
            "the base beyond bootstrap noise (95% CI).",
        ),
        dg.AssetCheckSpec(
            "no_forgetting",
            blocking=True,
            asset="beir_metrics",
            description="Fails when the served model loses more than guard_margin nDCG@10 beyond noise on "
            "a general-domain set (the forgetting guard).",
        ),
    ],
    **GPU_STEP,
)
def beir_metrics(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    tracking: MLflowTracking,
    split_sets: SplitManifest,
    checkpoint: CheckpointManifest,
):
    """BEIR metrics (nDCG/Recall/P/MAP/MRR @1,5,10,100) of the base and the fine-tuned model on the same
    test set at the same window, with deltas and a bootstrap interval on the nDCG@10 difference; with model
    merging on, also chooses on the validation split which model is served (fine-tuned or a base merge)."""
    manifest = evaluate_checkpoint(
        split_sets,
        checkpoint,
        config,
        model.spec(),
        store.stage_context(context),
        tracking.tracker(store.root_path()),
    )
    yield from emit(manifest, "beir_metrics")
