"""The code location: one ``Definitions`` with every asset, check, job, sensor and resource.

Each stage's assets live in their own module under ``embed_assets/defs/`` and call one stage function of
``embed_assets/stages/`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import os

import dagster as dg

from embed_assets import quiet
from embed_assets.defs.common import ManifestIOManager
from embed_assets.defs.evaluation import beir_metrics
from embed_assets.defs.export import onnx_model, tensorrt_engine
from embed_assets.defs.ingest import corpus, corpus_chunks
from embed_assets.defs.jobs import embed_pipeline_job, gpu_aware_executor
from embed_assets.defs.mining import mined_negatives
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel, LLMResource, MLflowTracking
from embed_assets.defs.sdg import synthetic_qa
from embed_assets.defs.sensors import corpus_change_sensor, retrain_schedule
from embed_assets.defs.serving import nim_service
from embed_assets.defs.split import split_sets
from embed_assets.defs.training import checkpoint

# Before any asset runs in this process: no third-party progress bars, no repeated beta warnings.
quiet.configure()

#: Every asset, in lineage order.
ALL_ASSETS = [
    corpus,
    corpus_chunks,
    synthetic_qa,
    split_sets,
    mined_negatives,
    checkpoint,
    beir_metrics,
    onnx_model,
    tensorrt_engine,
    nim_service,
]


def pipeline_resources(store: ArtifactStore | None = None, **overrides: object) -> dict[str, object]:
    """The resources of the code location (tests and benchmarks pass their own ``store`` or overrides).

    Args:
        store: The artifact store (default: ``$EMBED_ASSETS_HOME`` / ``$DAGSTER_HOME/embed_assets``).
        **overrides: Resources to replace by key (``model``, ``llm``, ``tracking``).

    Returns:
        ``{key: resource}`` including the manifest IO manager bound to ``store``.
    """
    store = store or ArtifactStore()
    resources: dict[str, object] = {
        "store": store,
        "io_manager": ManifestIOManager(store=store),
        "model": EmbeddingModel(),
        # The key is an EnvVar (shown as such in the UI, never as a value); without it only the offline
        # generator and user data work, which is the embedded default.
        "llm": LLMResource(api_key=dg.EnvVar("NVIDIA_API_KEY"))
        if os.environ.get("NVIDIA_API_KEY")
        else LLMResource(),
        # MLflow: a local SQLite store under the artifact root unless MLFLOW_TRACKING_URI names another one.
        "tracking": MLflowTracking(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"))
        if os.environ.get("MLFLOW_TRACKING_URI")
        else MLflowTracking(),
    }
    resources.update(overrides)
    return resources


defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[embed_pipeline_job],
    sensors=[corpus_change_sensor],
    schedules=[retrain_schedule],
    executor=gpu_aware_executor,
    resources=pipeline_resources(),
)
