"""Automation: retrain when the corpus changes (sensor) or on a cron (schedule). Both are off by default and
switchable in the UI (Automation tab)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from embed_assets.defs.ingest import CorpusConfig
from embed_assets.defs.jobs import embed_pipeline_job
from embed_assets.stages.ingest import SAMPLE_CORPUS

CORPUS_KEY = dg.AssetKey("corpus")


@dataclass
class CorpusState:
    """What the latest ``corpus`` materialization recorded.

    Attributes:
        digest: Its content hash (``None``: never materialized).
        config: The corpus config it ran with (path = the resolved corpus root), so the sensor hashes the folder
            exactly as the asset did (same extensions, excludes, size limit) and requests a run with it.
        storage_id: Event-log id of the materialization; part of the run key, so returning to an earlier
            corpus state (A → B → A) still triggers a run while repeated ticks on one state are deduplicated.
    """

    digest: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    storage_id: int = 0


def last_corpus_state(instance: dg.DagsterInstance) -> CorpusState:
    """The state recorded by the latest ``corpus`` materialization (empty when there is none)."""
    records = instance.fetch_materializations(CORPUS_KEY, limit=1).records
    if not records or records[0].asset_materialization is None:
        return CorpusState()
    record = records[0]
    meta = record.asset_materialization.metadata
    digest = meta.get("corpus_hash")
    root = meta.get("corpus_root")
    config: dict[str, Any] = {}
    run = instance.get_run_by_id(record.run_id)
    if run is not None:
        ops = (run.run_config or {}).get("ops") or {}
        config = dict(((ops.get("corpus") or {}).get("config")) or {})
    if root is not None:
        config["path"] = str(root.value)
    return CorpusState(
        digest=str(digest.value) if digest is not None else None, config=config, storage_id=record.storage_id
    )


@dg.sensor(
    job=embed_pipeline_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Hashes the corpus folder of the last run (or $EMBED_ASSETS_CORPUS) with that run's corpus "
    "config; when its content hash differs from the materialized one, requests a run of the corpus and "
    "everything downstream of it.",
)
def corpus_change_sensor(context: dg.SensorEvaluationContext):
    from embed_assets.corpus import EmptyCorpusError, corpus_version, empty_corpus_error, scan_documents

    state = last_corpus_state(context.instance)
    values = {"path": os.environ.get("EMBED_ASSETS_CORPUS", SAMPLE_CORPUS), **state.config}
    try:
        config = CorpusConfig(**values)
    except Exception as e:  # a config recorded by an older version of the code: fall back to the defaults
        context.log.warning(f"ignoring the last corpus config {values}: {e}")
        config = CorpusConfig(path=values["path"])
    rejected: list[dict[str, str]] = []
    try:  # one document's text in memory at a time: only ids and hashes are kept
        index = [
            (d.doc_id, d.content_hash)
            for d in scan_documents(
                config.path, config.extensions, config.exclude_globs, config.max_file_bytes, rejected=rejected
            )
        ]
        if not index:
            raise empty_corpus_error(Path(config.path).expanduser(), rejected, config.extensions)
    except (FileNotFoundError, NotADirectoryError, EmptyCorpusError) as e:
        return dg.SkipReason(f"corpus at {config.path} is not usable: {e}")
    version = corpus_version(index)
    if version == state.digest:
        return dg.SkipReason(f"corpus unchanged ({version}, {len(index)} documents)")
    context.log.info(f"corpus changed: {state.digest} -> {version}")
    # Everything downstream of the corpus depends on it, so this is exactly the set a change makes stale.
    return dg.RunRequest(
        run_key=f"corpus-{version}-after-{state.storage_id}",
        asset_selection=downstream_of_corpus(context.repository_def),
        run_config={"ops": {"corpus": {"config": config.model_dump()}}},
        tags={"embed_assets/trigger": "corpus_change", "embed_assets/corpus_hash": version},
    )


def downstream_of_corpus(repository_def: dg.RepositoryDefinition | None) -> list[dg.AssetKey]:
    """The corpus and every asset downstream of it, in a stable order."""
    if repository_def is None:
        raise dg.DagsterInvariantViolationError("corpus_change_sensor needs its repository definition")
    selection = dg.AssetSelection.assets(CORPUS_KEY).downstream()
    return sorted(selection.resolve(repository_def.asset_graph), key=lambda k: k.to_user_string())


def corpus_run_config(instance: dg.DagsterInstance) -> dict[str, Any]:
    """Run config that points the corpus at the folder (and corpus config) of the latest materialization."""
    state = last_corpus_state(instance)
    return {"ops": {"corpus": {"config": state.config}}} if state.config else {}


@dg.schedule(
    name="nightly_retrain",
    job=embed_pipeline_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-materializes the pipeline nightly on the corpus of the latest run; cached SDG and "
    "embeddings keep unchanged work free.",
)
def retrain_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(
        run_config=corpus_run_config(context.instance), tags={"embed_assets/trigger": "nightly_retrain"}
    )
