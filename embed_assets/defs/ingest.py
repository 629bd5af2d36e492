"""Assets of the ingest stage: ``corpus`` (the documents) and ``corpus_chunks`` (the passages).

(No ``from __future__ import annotations`` in the asset modules: Dagster reads the config, resource and input
annotations at definition time.)
"""

import dagster as dg

from embed_assets.defs.common import GROUP, emit, latest_manifest
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel
from embed_assets.stages.ingest import (
    ChunkSettings,
    ChunksManifest,
    CorpusManifest,
    CorpusSettings,
    chunk_documents,
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


@dg.asset(group_name=GROUP, kinds={"python", "parquet"}, code_version="1")
def corpus_chunks(
    context: dg.AssetExecutionContext,
    config: ChunkingConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    corpus: CorpusManifest,
):
    """Sentence-based passages of at most ``passage_max_length`` tokens; ``chunk_id`` = hash of the text, so
    unchanged passages keep their ids (and their cached SDG pairs and embeddings) across runs."""
    previous = latest_manifest(store, "corpus_chunks")
    manifest = chunk_documents(
        corpus,
        config,
        model.spec(),
        store.stage_context(context),
        previous if isinstance(previous, ChunksManifest) else None,
    )
    yield from emit(manifest, "corpus_chunks", manifest.data_version)
