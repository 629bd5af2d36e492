"""Automation: retrain when the corpus changes (sensor) or on a cron (schedule). Both are off by default and
switchable in the UI (Automation tab)."""

from __future__ import annotations

import os

import dagster as dg

from embed_assets.defs.configs import SAMPLE_CORPUS
from embed_assets.defs.jobs import embed_pipeline_job

CORPUS_KEY = dg.AssetKey("corpus")


def _last_corpus_state(instance: dg.DagsterInstance) -> tuple[str | None, str | None]:
    """(content hash, corpus root) recorded by the latest ``corpus`` materialization."""
    event = instance.get_latest_materialization_event(CORPUS_KEY)
    if event is None or event.asset_materialization is None:
        return None, None
    meta = event.asset_materialization.metadata
    digest = meta.get("corpus_hash")
    root = meta.get("corpus_root")
    return (digest.value if digest else None), (root.value if root else None)


@dg.sensor(
    job=embed_pipeline_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Hashes the corpus folder of the last run (or $EMBED_ASSETS_CORPUS); when its content hash "
    "differs from the materialized one, requests a run of the corpus and everything downstream of it.",
)
def corpus_change_sensor(context: dg.SensorEvaluationContext):
    from embed_assets.corpus import EmptyCorpusError, read_corpus

    last_hash, last_root = _last_corpus_state(context.instance)
    root = last_root or os.environ.get("EMBED_ASSETS_CORPUS", SAMPLE_CORPUS)
    try:
        scan = read_corpus(root)
    except (FileNotFoundError, EmptyCorpusError) as e:
        return dg.SkipReason(f"corpus at {root} is not usable: {e}")
    if scan.data_version == last_hash:
        return dg.SkipReason(f"corpus unchanged ({scan.data_version}, {len(scan.documents)} documents)")
    context.log.info(f"corpus changed: {last_hash} -> {scan.data_version}")
    # Everything downstream of the corpus depends on it, so this is exactly the set a change makes stale.
    return dg.RunRequest(
        run_key=f"corpus-{scan.data_version}",
        asset_selection=[k for k in _downstream_of_corpus(context)],
        run_config={"ops": {"corpus": {"config": {"path": root}}}},
        tags={"embed_assets/trigger": "corpus_change", "embed_assets/corpus_hash": scan.data_version},
    )


def _downstream_of_corpus(context: dg.SensorEvaluationContext) -> list[dg.AssetKey]:
    graph = context.repository_def.asset_graph
    selection = dg.AssetSelection.assets(CORPUS_KEY).downstream()
    return sorted(selection.resolve(graph), key=lambda k: k.to_user_string())


retrain_schedule = dg.ScheduleDefinition(
    name="nightly_retrain",
    job=embed_pipeline_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-materializes the pipeline nightly; cached SDG and embeddings keep unchanged work free.",
)
