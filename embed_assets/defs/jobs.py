"""Jobs and the executor: the CUDA tag limits GPU steps within a run, the `gpu` pool across runs."""

from __future__ import annotations

import dagster as dg

from embed_assets.defs.assets import GPU_TAGS, GROUP

_GPU_KEY, _GPU_VALUE = next(iter(GPU_TAGS.items()))

#: Multiprocess execution; steps tagged for CUDA never overlap inside a run (the pool covers across runs).
gpu_aware_executor = dg.multiprocess_executor.configured(
    {"max_concurrent": 2, "tag_concurrency_limits": [{"key": _GPU_KEY, "value": _GPU_VALUE, "limit": 1}]},
    name="gpu_aware_multiprocess",
)

embed_pipeline_job = dg.define_asset_job(
    "embed_pipeline",
    selection=dg.AssetSelection.groups(GROUP),
    description="Every asset from the corpus to the served model (the embedded default end to end).",
    executor_def=gpu_aware_executor,
)
