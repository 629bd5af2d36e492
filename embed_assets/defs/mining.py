"""Asset of the hard-negative stage: ``mined_negatives``."""

import dagster as dg

from embed_assets.defs.common import GPU_STEP, GROUP, emit
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel
from embed_assets.stages.ingest import ChunksManifest
from embed_assets.stages.mine import MiningSettings, mine_negatives
from embed_assets.stages.sdg import PairsManifest
from embed_assets.stages.split import SplitManifest


class MiningConfig(MiningSettings, dg.Config):
    """Run config of ``mined_negatives`` (the fields of :class:`~embed_assets.stages.mine.MiningSettings`)."""


@dg.asset(group_name=GROUP, kinds={"pytorch", "faiss"}, code_version="1", **GPU_STEP)
def mined_negatives(
    context: dg.AssetExecutionContext,
    config: MiningConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    corpus_chunks: ChunksManifest,
    synthetic_qa: PairsManifest,
    split_sets: SplitManifest,
):
    """Hard negatives for every training query, mined with the base model from non-test passages
    (positives and near-copies masked, 'perc' margin), one row per positive (multi-hop unrolled)."""
    manifest = mine_negatives(
        corpus_chunks, synthetic_qa, split_sets, config, model.spec(), store.stage_context(context)
    )
    yield from emit(manifest, "mined_negatives", manifest.data_version)
