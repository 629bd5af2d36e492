"""The code location: one ``Definitions`` with every asset, check, job, sensor and resource."""

from __future__ import annotations

import os

import dagster as dg

from embed_assets.defs.assets import ALL_ASSETS
from embed_assets.defs.jobs import embed_pipeline_job, gpu_aware_executor
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel, LLMResource, MLflowTracking
from embed_assets.defs.sensors import corpus_change_sensor, retrain_schedule

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[embed_pipeline_job],
    sensors=[corpus_change_sensor],
    schedules=[retrain_schedule],
    executor=gpu_aware_executor,
    resources={
        "store": ArtifactStore(),
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
    },
)
