"""Re-running assets on the same Dagster instance (the recovery path after any failure or kill)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from embed_assets.definitions import corpus, corpus_chunks, pipeline_resources
from embed_assets.defs.resources import ArtifactStore


def materialize(instance: dg.DagsterInstance, docs: Path, artifacts: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [corpus, corpus_chunks],
        instance=instance,
        resources=pipeline_resources(ArtifactStore(root=str(artifacts))),
        run_config={"ops": {"corpus": {"config": {"path": str(docs)}}}},
    )


def test_corpus_chunks_can_be_materialized_again(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(
        "The harbor was rebuilt in 1921. Ships arrive every second day. Oak was used."
    )
    instance = dg.DagsterInstance.ephemeral()
    first = materialize(instance, docs, tmp_path / "artifacts")
    n_chunks = first.output_for_node("corpus_chunks").n_chunks
    second = materialize(instance, docs, tmp_path / "artifacts")  # e.g. re-running after a later step failed
    assert second.success
    meta = instance.get_latest_materialization_event(
        dg.AssetKey("corpus_chunks")
    ).asset_materialization.metadata
    assert meta["chunks_unchanged_since_last_run"].value == n_chunks
