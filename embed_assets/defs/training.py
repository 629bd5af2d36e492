"""Asset of the fine-tuning stage: ``checkpoint``."""

import dagster as dg

from embed_assets.defs.common import GPU_STEP, GROUP, emit, stage_errors
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel, MLflowTracking
from embed_assets.stages.ingest import ChunksManifest
from embed_assets.stages.mine import MinedManifest
from embed_assets.stages.sdg import PairsManifest
from embed_assets.stages.split import SplitManifest
from embed_assets.stages.train import TrainSettings, train_checkpoint


class TrainingConfig(TrainSettings, dg.Config):
    """Run config of ``checkpoint`` (the fields of :class:`~embed_assets.stages.train.TrainSettings`)."""


@dg.asset(group_name=GROUP, kinds={"pytorch", "huggingface"}, code_version="2", **GPU_STEP)
def checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    tracking: MLflowTracking,
    corpus_chunks: ChunksManifest,
    synthetic_qa: PairsManifest,
    split_sets: SplitManifest,
    mined_negatives: MinedManifest,
):
    """The fine-tuned sentence-transformers model (MNRL over mined + in-batch negatives), tracked in MLflow;
    an interrupted training resumes from its last trainer checkpoint."""
    with stage_errors():
        manifest = train_checkpoint(
            corpus_chunks,
            synthetic_qa,
            split_sets,
            mined_negatives,
            config,
            model.spec(),
            store.stage_context(context),
            tracking.tracker(store.root_path()),
        )
    yield from emit(manifest, "checkpoint")
