"""Assets of the ingest stage: ``corpus`` (the documents) and ``corpus_chunks`` (the passages).

(No ``from __future__ import annotations`` in the asset modules: Dagster reads the config, resource and input
annotations at definition time.)
"""

import dagster as dg

from embed_assets.defs.common import GROUP, SHARD_OP_TAGS, emit, latest_manifest
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel
from embed_assets.stages.ingest import (
    ChunkSettings,
    ChunksManifest,
    CorpusManifest,
    CorpusSettings,
    ShardManifest,
    ShardPlan,
    ShardPlanSet,
    chunk_shard,
    finish_shards,
    merge_shards,
    pending_shards,
    plan_shards,
    read_documents,
)


class CorpusConfig(CorpusSettings, dg.Config):
    """Run config of ``corpus`` (the fields of :class:`~embed_assets.stages.ingest.CorpusSettings`)."""


class ChunkingConfig(ChunkSettings, dg.Config):
    """Run config of ``corpus_chunks`` (the fields of :class:`~embed_assets.stages.ingest.ChunkSettings`)."""


@dg.asset(group_name=GROUP, kinds={"python", "file"}, code_version="1")
def corpus(context: dg.AssetExecutionContext, config: CorpusConfig, store: ArtifactStore):
    """The documents of the corpus folder with content hashes; data version = hash of all documents, so
    everything downstream goes stale exactly when a document is added, removed or edited."""
    manifest = read_documents(config, store.stage_context(context))
    yield from emit(manifest, "corpus", manifest.data_version)


# ------------------------------------------------------------------ corpus_chunks: one step per shard
@dg.op(out={"pending": dg.DynamicOut(ShardPlan), "plan": dg.Out(ShardPlanSet)})
def plan_chunk_shards(
    context: dg.OpExecutionContext,
    config: ChunkingConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    corpus: CorpusManifest,
):
    """The corpus cut into shards by a stable hash of each document id (``documents_per_shard`` each); a step
    per shard with more than ``step_min_changed_documents`` changed documents (an unchanged shard's output
    exists already; one with fewer changes is cut in the merge step)."""
    plans = plan_shards(corpus, config, model.spec())
    pending = pending_shards(plans, config, model.spec(), store.stage_context(context))
    context.log.info(
        f"{len(plans)} shards, {len(pending)} with more than {config.step_min_changed_documents} changed "
        "documents (a step each; the merge step cuts smaller changes)"
    )
    for plan in pending:
        yield dg.DynamicOutput(plan, output_name="pending", mapping_key=plan.mapping_key)
    yield dg.Output(ShardPlanSet(plans), output_name="plan")


@dg.op(out=dg.Out(ShardManifest), tags=SHARD_OP_TAGS)
def chunk_corpus_shard(
    context: dg.OpExecutionContext,
    config: ChunkingConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    corpus: CorpusManifest,
    shard: ShardPlan,
) -> ShardManifest:
    """One shard's passages (a step of its own: a process under the multiprocess executor, a pod on k8s);
    an unchanged shard returns its earlier output at once."""
    manifest = chunk_shard(corpus, shard, config, model.spec(), store.stage_context(context))
    context.log.info(
        f"shard {shard.index}/{shard.n_shards}: {manifest.n_docs} documents, {manifest.n_chunks} passages"
        + (" (unchanged: earlier output reused)" if manifest.output_reused else
           f" ({manifest.documents_chunked} cut, {manifest.documents_reused} from the chunk cache)")
    )  # fmt: skip
    return manifest


@dg.op
def merge_chunk_shards(
    context: dg.OpExecutionContext,
    config: ChunkingConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    corpus: CorpusManifest,
    plan: ShardPlanSet,
    shards: list[ShardManifest],
):
    """Every shard's passages in corpus order, each text once: the ``corpus_chunks`` asset's value (the shards
    without a step of their own are looked up, or cut here when they changed a little)."""
    previous = latest_manifest(store, "corpus_chunks")
    ctx = store.stage_context(context)
    every = finish_shards(corpus, plan.shards, shards, config, model.spec(), ctx)
    manifest = merge_shards(
        corpus, every, config, model.spec(), ctx, previous if isinstance(previous, ChunksManifest) else None
    )
    yield from emit(manifest, "corpus_chunks", manifest.data_version)


@dg.config_mapping
def _chunking_config(config: ChunkingConfig) -> dict:
    """The asset's one config (``ops: {corpus_chunks: {config: …}}``) given to each of its steps."""
    fields = {"config": config.model_dump()}
    return {"plan_chunk_shards": fields, "chunk_corpus_shard": fields, "merge_chunk_shards": fields}


@dg.graph_asset(group_name=GROUP, kinds={"python", "parquet"}, code_version="2", config=_chunking_config)
def corpus_chunks(corpus: CorpusManifest):
    """Sentence-based passages of at most ``passage_max_length`` tokens; ``chunk_id`` = hash of the text, so
    unchanged passages keep their ids (and their cached SDG pairs and embeddings) across runs. The documents
    are cut in shards that run as parallel steps; a shard whose documents did not change is not cut again."""
    pending, plan = plan_chunk_shards(corpus)
    shards = pending.map(lambda shard: chunk_corpus_shard(corpus, shard))
    return merge_chunk_shards(corpus, plan, shards.collect())
