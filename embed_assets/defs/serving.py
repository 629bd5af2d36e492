"""Asset of the serve/deploy stage: ``nim_service``."""

import dagster as dg

from embed_assets.defs.common import GROUP, emit, latest_manifest, stage_errors
from embed_assets.defs.resources import ArtifactStore
from embed_assets.stages.evaluate import MetricsManifest
from embed_assets.stages.export import OnnxManifest
from embed_assets.stages.serve import ServiceManifest, ServiceSettings, serve_model


class ServiceConfig(ServiceSettings, dg.Config):
    """Run config of ``nim_service`` (the fields of :class:`~embed_assets.stages.serve.ServiceSettings`)."""


@dg.asset(
    group_name=GROUP,
    kinds={"fastapi", "onnx"},
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            "served_metrics_parity",
            blocking=True,
            asset="nim_service",
            description="BEIR metrics measured through the endpoint within NIM's tolerance of the checkpoint's.",
        )
    ],
)
def nim_service(
    context: dg.AssetExecutionContext,
    config: ServiceConfig,
    store: ArtifactStore,
    beir_metrics: MetricsManifest,
    onnx_model: OnnxManifest,
):
    """A running NIM-compatible /v1/embeddings endpoint serving the ONNX model (local default, a managed
    background process), or the rendered real NIM deployment (docker / Kubernetes)."""
    previous = latest_manifest(store, "nim_service")
    with stage_errors():
        manifest = serve_model(
            beir_metrics,
            onnx_model,
            config,
            store.stage_context(context),
            previous if isinstance(previous, ServiceManifest) else None,
        )
    yield from emit(manifest, "nim_service")
