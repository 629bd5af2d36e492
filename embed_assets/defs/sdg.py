"""Asset of the synthetic-data stage: ``synthetic_qa``."""

import dagster as dg

from embed_assets.defs.common import GROUP, emit, latest_manifest, stage_errors
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel, LLMResource
from embed_assets.stages.ingest import ChunksManifest
from embed_assets.stages.sdg import PairsManifest, SDGSettings, generate_pairs


class SDGConfig(SDGSettings, dg.Config):
    """Run config of ``synthetic_qa`` (the fields of :class:`~embed_assets.stages.sdg.SDGSettings`)."""


@dg.asset(group_name=GROUP, kinds={"python", "json"}, code_version="1")
def synthetic_qa(
    context: dg.AssetExecutionContext,
    config: SDGConfig,
    store: ArtifactStore,
    llm: LLMResource,
    model: EmbeddingModel,
    corpus_chunks: ChunksManifest,
):
    """(query, positive passages) pairs to train on: offline inverse cloze by default, an OpenAI-compatible
    LLM, or your own pairs. Cached by chunk content + generator fingerprint: a re-run pays only for changes."""
    previous = latest_manifest(store, "synthetic_qa")
    with stage_errors():
        manifest = generate_pairs(
            corpus_chunks,
            config,
            model.spec(),
            store.stage_context(context),
            llm.endpoint(),
            previous if isinstance(previous, PairsManifest) else None,
        )
    yield from emit(manifest, "synthetic_qa", manifest.data_version)
