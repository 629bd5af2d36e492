"""Asset of the split stage: ``split_sets``."""

import dagster as dg

from embed_assets.defs.common import GROUP, emit, latest_manifest
from embed_assets.defs.resources import ArtifactStore
from embed_assets.stages.ingest import ChunksManifest
from embed_assets.stages.sdg import PairsManifest
from embed_assets.stages.split import SplitManifest, SplitSettings, split_pairs


class SplitConfig(SplitSettings, dg.Config):
    """Run config of ``split_sets`` (the fields of :class:`~embed_assets.stages.split.SplitSettings`)."""


@dg.asset(
    group_name=GROUP,
    kinds={"python", "json"},
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            "no_document_leakage",
            blocking=True,
            asset="split_sets",
            description="No document in train and in val/test.",
        )
    ],
)
def split_sets(
    context: dg.AssetExecutionContext,
    config: SplitConfig,
    store: ArtifactStore,
    corpus_chunks: ChunksManifest,
    synthetic_qa: PairsManifest,
):
    """Train/val/test by document (no test document in train), and the BEIR evaluation folder of this
    corpus; the test documents stay frozen per corpus folder, and the metadata says where they came from."""
    previous = latest_manifest(store, "split_sets")
    manifest = split_pairs(
        corpus_chunks,
        synthetic_qa,
        config,
        store.stage_context(context),
        previous if isinstance(previous, SplitManifest) else None,
    )
    yield from emit(manifest, "split_sets", manifest.data_version)
