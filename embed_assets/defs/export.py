"""Assets of the export stage: ``onnx_model`` and ``tensorrt_engine``."""

import dagster as dg

from embed_assets.defs.common import GPU_STEP, GROUP, emit, to_metadata
from embed_assets.defs.resources import ArtifactStore
from embed_assets.stages.evaluate import MetricsManifest
from embed_assets.stages.export import (
    ExportSettings,
    OnnxManifest,
    TensorRTSettings,
    build_engine,
    export_checkpoint,
)
from embed_assets.stages.train import CheckpointManifest


class ExportConfig(ExportSettings, dg.Config):
    """Run config of ``onnx_model`` (the fields of :class:`~embed_assets.stages.export.ExportSettings`)."""


class TensorRTConfig(TensorRTSettings, dg.Config):
    """Run config of ``tensorrt_engine`` (the fields of :class:`~embed_assets.stages.export.TensorRTSettings`)."""


@dg.asset(
    group_name=GROUP,
    kinds={"onnx"},
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            "onnx_fp32_parity",
            blocking=True,
            asset="onnx_model",
            description="min cosine ≥ 0.999 and metrics within tolerance",
        ),
        dg.AssetCheckSpec(
            "onnx_int8_parity",
            asset="onnx_model",
            description="int8 metrics within tolerance (else not served)",
        ),
    ],
)
def onnx_model(
    context: dg.AssetExecutionContext,
    config: ExportConfig,
    store: ArtifactStore,
    checkpoint: CheckpointManifest,
    beir_metrics: MetricsManifest,
):
    """The checkpoint as ONNX (fp32 + int8; pooling and normalization in the graph, dynamic axes), gated by
    parity with the checkpoint: cosine, and BEIR metrics within NIM's tolerance (0.03 at @1, 0.01 at @5+)."""
    manifest = export_checkpoint(checkpoint, beir_metrics, config, store.stage_context(context))
    yield from emit(manifest, "onnx_model")


@dg.asset(group_name=GROUP, kinds={"tensorrt"}, code_version="1", output_required=False, **GPU_STEP)
def tensorrt_engine(
    context: dg.AssetExecutionContext, config: TensorRTConfig, store: ArtifactStore, onnx_model: OnnxManifest
):
    """A TensorRT plan (profiles batch 1/16/64, seq 3/128/512) where CUDA and TensorRT exist; elsewhere the
    step records why it was skipped as an observation and materializes nothing."""
    manifest = build_engine(onnx_model, config, store.stage_context(context))
    if manifest.skipped_reason:
        yield dg.AssetObservation(asset_key="tensorrt_engine", metadata=to_metadata(manifest.metadata()))
        return
    yield from emit(manifest, "tensorrt_engine")
