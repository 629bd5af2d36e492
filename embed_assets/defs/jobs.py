"""Jobs and executors: the CUDA tag limits GPU steps within a run, the `gpu` pool across runs.

Locally, steps run in subprocesses (multiprocess executor) forked from a per-run forkserver that has imported
torch and sentence-transformers once, so a step does not pay those imports again (about 5–10 s each on two
cores; ``EMBED_ASSETS_STEP_START=spawn`` restores Dagster's default). With ``EMBED_ASSETS_EXECUTOR=k8s`` (set by the Helm
values in ``deploy/helm``) each step becomes a Kubernetes pod through dagster-k8s's ``k8s_job_executor``; the
CUDA-tagged steps' ``dagster-k8s/config`` op tag makes their pods request a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from embed_assets.defs.common import GPU_TAGS, GROUP

_GPU_KEY, _GPU_VALUE = next(iter(GPU_TAGS.items()))
GPU_TAG_LIMITS = [{"key": _GPU_KEY, "value": _GPU_VALUE, "limit": 1}]

#: Config of the Kubernetes step executor (validated against dagster-k8s's schema in the tests).
K8S_EXECUTOR_CONFIG: dict[str, Any] = {
    "max_concurrent": 4,
    "tag_concurrency_limits": GPU_TAG_LIMITS,
    "step_k8s_config": {"container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}}},
}


#: Imported once per run by the forkserver the step processes fork from (never at definitions load: the UI and
#: the daemon load the definitions often). Only imports happen there, no torch threads start before the fork.
STEP_PRELOAD_MODULES = ["embed_assets.definitions", "torch", "transformers", "sentence_transformers"]


def multiprocess_start_method(start: str | None = None) -> dict[str, Any]:
    """The multiprocess executor's ``start_method`` config.

    Args:
        start: ``"forkserver"`` (default) or ``"spawn"``; overrides ``$EMBED_ASSETS_STEP_START``.

    Returns:
        ``{"forkserver": {"preload_modules": [...]}}`` or ``{"spawn": {}}``.
    """
    start = start or os.environ.get("EMBED_ASSETS_STEP_START", "forkserver")
    if start == "forkserver":
        return {"forkserver": {"preload_modules": list(STEP_PRELOAD_MODULES)}}
    if start == "spawn":
        return {"spawn": {}}
    raise ValueError(f"EMBED_ASSETS_STEP_START must be 'forkserver' or 'spawn', got {start!r}")


def build_executor(kind: str | None = None, start: str | None = None) -> dg.ExecutorDefinition:
    """The executor for this deployment: ``"multiprocess"`` (default) or ``"k8s"``.

    Args:
        kind: Overrides ``$EMBED_ASSETS_EXECUTOR``.
        start: How the multiprocess executor starts step processes (see :func:`multiprocess_start_method`).

    Returns:
        A configured executor definition.
    """
    kind = kind or os.environ.get("EMBED_ASSETS_EXECUTOR", "multiprocess")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(K8S_EXECUTOR_CONFIG, name="gpu_aware_k8s")
    if kind != "multiprocess":
        raise ValueError(f"EMBED_ASSETS_EXECUTOR must be 'multiprocess' or 'k8s', got {kind!r}")
    return dg.multiprocess_executor.configured(
        {
            "max_concurrent": 2,
            "tag_concurrency_limits": GPU_TAG_LIMITS,
            "start_method": multiprocess_start_method(start),
        },
        name="gpu_aware_multiprocess",
    )


gpu_aware_executor = build_executor()

embed_pipeline_job = dg.define_asset_job(
    "embed_pipeline",
    selection=dg.AssetSelection.groups(GROUP),
    description="Every asset from the corpus to the served model (the embedded default end to end).",
    executor_def=gpu_aware_executor,
)
