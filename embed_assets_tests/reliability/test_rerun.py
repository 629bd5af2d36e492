"""Re-running assets on the same Dagster instance (the recovery path after any failure or kill)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from embed_assets.defs.assets import corpus, corpus_chunks
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel


def materialize(instance: dg.DagsterInstance, docs: Path, artifacts: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [corpus, corpus_chunks],
        instance=instance,
        resources={"store": ArtifactStore(root=str(artifacts)), "model": EmbeddingModel()},
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
    n_chunks = first.output_for_node("corpus_chunks")["n_chunks"]
    second = materialize(instance, docs, tmp_path / "artifacts")  # e.g. re-running after a later step failed
    assert second.success
    meta = instance.get_latest_materialization_event(
        dg.AssetKey("corpus_chunks")
    ).asset_materialization.metadata
    assert meta["chunks_unchanged_since_last_run"].value == n_chunks
