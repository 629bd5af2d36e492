"""Stage 8 — serve / deploy: the exported model behind a NIM-compatible ``/v1/embeddings`` endpoint.

``mode="local"`` starts this project's server (:mod:`embed_assets.serving`) on loopback as a managed background
process (the previous one is stopped first), waits for it, and evaluates *through the endpoint* on the BEIR test
set: the served metrics must match the checkpoint's within NIM's tolerance. ``mode="docker"|"kubernetes"``
renders the real NIM container's deployment files (``deploy/nim/``), applies them when ``apply`` is set
(``bash docker-run.sh`` / ``kubectl apply``), and evaluates ``endpoint_url`` when one is given.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from embed_assets.stages.common import (
    Gate,
    JsonValue,
    Manifest,
    PathRef,
    StageContext,
    StageError,
    Url,
)
from embed_assets.stages.evaluate import MetricsManifest
from embed_assets.stages.export import OnnxManifest, parity_table, served_parity


class ServiceSettings(BaseModel):
    """Where and how the model is served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["local", "docker", "kubernetes"] = Field(
        default="local",
        description="'local' (this project's server on loopback), 'docker' or 'kubernetes' (NIM manifests).",
    )
    host: str = Field(default="127.0.0.1", description="local: bind address.")
    port: int = Field(default=0, ge=0, description="local: port (0 = a free port).")
    variant: Literal["fp32", "int8"] = Field(
        default="fp32", description="'fp32' or 'int8' (int8 only if it passed the parity gate)."
    )
    api_key_env: str = Field(default="", description="Name of an env var holding a bearer token to require.")
    apply: bool = Field(default=False, description="docker/kubernetes: apply the rendered manifest.")
    endpoint_url: str = Field(
        default="", description="docker/kubernetes: URL of the deployed NIM to evaluate."
    )
    ready_timeout_s: float = Field(
        default=900.0, gt=0, description="docker/kubernetes: wait this long for ready."
    )


@dataclass
class ServiceManifest(Manifest):
    """A running endpoint (``url``) or rendered deployment files (``manifests``)."""

    mode: str
    url: str = ""
    served_model: str = ""
    variant: str = ""
    pid: int | None = None
    pid_create_time: float | None = None
    log: str = ""
    health: dict[str, Any] = field(default_factory=dict)
    served_ndcg_at_10: float | None = None
    served_eval_seconds: float = 0.0
    parity_rows: list[dict[str, Any]] = field(default_factory=list)
    parity_ok: bool | None = None  # None: not evaluated (no endpoint)
    manifests: dict[str, str] = field(default_factory=dict)
    applied: bool = False
    apply_output: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    def gates(self) -> list[Gate]:
        if self.parity_ok is None:
            return [
                Gate(
                    "served_metrics_parity",
                    False,
                    "not evaluated: set endpoint_url to the deployed NIM's URL to evaluate it",
                    severity="warn",
                    metadata={"not_evaluated": "set endpoint_url to the deployed NIM's URL to evaluate it"},
                )
            ]
        worst = max((abs(r["diff"]) for r in self.parity_rows), default=0.0)
        message = (
            f"served metrics vs the checkpoint's: worst diff {worst:.4f} (tolerance 0.03 at @1, 0.01 above)"
        )
        if not self.parity_ok:
            message += " — the endpoint does not serve what was evaluated; see the server log"
        return [
            Gate(
                "served_metrics_parity",
                self.parity_ok,
                message,
                blocking=True,
                metadata={"worst_metric_diff": worst},
            )
        ]

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"mode": self.mode}
        if self.url:
            meta.update(
                url=Url(self.url),
                served_model=self.served_model,
                health=JsonValue(self.health),
                served_eval_seconds=self.served_eval_seconds,
                served_metric_parity=parity_table(self.parity_rows),
            )
            if self.served_ndcg_at_10 is not None:
                meta["served_ndcg@10"] = self.served_ndcg_at_10
        if self.pid is not None:
            meta.update(pid=self.pid, variant=self.variant, log=PathRef(self.log))
        if self.pid_create_time is not None:
            meta["pid_create_time"] = self.pid_create_time
        if self.identity:
            meta["served_identity"] = JsonValue(self.identity)
        if self.mode != "local":
            meta.update(applied=self.applied, apply_output=self.apply_output)
            meta.update({name: PathRef(path) for name, path in self.manifests.items()})
        return meta


def serve_model(
    metrics: MetricsManifest,
    onnx: OnnxManifest,
    settings: ServiceSettings,
    ctx: StageContext,
    previous: ServiceManifest | None = None,
) -> ServiceManifest:
    """Serve (or deploy) the exported model and evaluate it through its endpoint.

    Args:
        metrics: The checkpoint's metrics (parity reference, on its primary evaluation set).
        onnx: The exported model.
        settings: Mode, address, variant, auth.
        ctx: Where the server log and rendered files go.
        previous: The last materialization's service (its local server is stopped first).

    Returns:
        A :class:`ServiceManifest` (gate: served metrics parity).

    Raises:
        StageError: a deployment command failed or the endpoint never became ready.
    """
    out = ctx.out_dir("nim_service")
    if settings.mode != "local":
        return _deploy(metrics, onnx, settings, ctx, out)
    from embed_assets.serving.process import start_server

    variant = settings.variant
    if variant == "int8" and not onnx.int8_ok:
        ctx.log.warning("int8 model failed its metric parity gate; serving fp32 instead")
        variant = "fp32"
    if previous is not None and previous.pid:
        ctx.log.info(f"previous server (pid {previous.pid}): {stop_service(previous)}")
    log_path = str(out / "server.log")
    handle = start_server(
        onnx.onnx_dir,
        host=settings.host,
        port=settings.port,
        variant=variant,
        api_key_env=settings.api_key_env or None,
        log_path=log_path,
    )
    ctx.log.info(f"serving {variant} at {handle.url} (pid {handle.pid})")
    manifest = ServiceManifest(
        mode="local",
        url=handle.url,
        variant=variant,
        pid=handle.pid,
        pid_create_time=handle.create_time,
        log=log_path,
        identity={**onnx.identity, "variant": variant},
    )
    return _evaluate_endpoint(manifest, metrics, settings)


def _evaluate_endpoint(
    manifest: ServiceManifest, metrics: MetricsManifest, settings: ServiceSettings
) -> ServiceManifest:
    """Probe the endpoint's health and evaluate through it (the served-parity gate)."""
    import httpx

    from embed_assets.serving.client import EndpointEncoder

    api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    client = EndpointEncoder(manifest.url, api_key=api_key)
    try:
        manifest.health = httpx.get(f"{manifest.url}/v1/health/ready", timeout=10).json()
        start = time.monotonic()
        served, rows, ok = served_parity(client.encode, metrics)
        manifest.served_eval_seconds = round(time.monotonic() - start, 2)
        manifest.served_model = client.model
    finally:
        client.close()
    manifest.served_ndcg_at_10 = served.get("NDCG@10")
    manifest.parity_rows, manifest.parity_ok = rows, ok
    return manifest


def _deploy(
    metrics: MetricsManifest,
    onnx: OnnxManifest,
    settings: ServiceSettings,
    ctx: StageContext,
    out: Path,
) -> ServiceManifest:
    """Render (and with ``apply`` run) the real NIM container deployment for the exported model."""
    from embed_assets.serving.deploy import render_nim_manifests

    rendered = render_nim_manifests(onnx.onnx_dir, str(out))
    manifest = ServiceManifest(mode=settings.mode, manifests=rendered, identity=dict(onnx.identity))
    if settings.apply:
        if settings.mode == "docker":
            cmd = ["bash", rendered["docker-run.sh"]]
        else:
            cmd = ["kubectl", "apply", "-f", rendered["kubernetes.yaml"]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise StageError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        manifest.applied, manifest.apply_output = True, proc.stdout[-2000:]
    ctx.log.info(f"rendered NIM deployment files: {sorted(rendered)}")
    if not settings.endpoint_url:
        return manifest
    from embed_assets.serving.process import wait_ready

    if not wait_ready(settings.endpoint_url, settings.ready_timeout_s):
        raise StageError(
            f"{settings.endpoint_url}/v1/health/ready not ready after {settings.ready_timeout_s}s"
        )
    manifest.url = settings.endpoint_url
    return _evaluate_endpoint(manifest, metrics, settings)


def stop_service(service: ServiceManifest) -> str:
    """Stop the local server a ``nim_service`` materialization recorded, and only that server.

    The recorded PID is signalled only while it still runs ``embed_assets.serving`` with the recorded start
    time, so a PID the system reused for another process is left alone.

    Returns:
        ``"stopped"``, ``"not_running"``, ``"not_ours"`` or ``"no local server recorded"``.
    """
    from embed_assets.serving.process import stop_recorded

    if service.mode != "local" or not service.pid:
        return "no local server recorded"
    return stop_recorded(service.pid, service.pid_create_time)


def main(argv: list[str] | None = None) -> int:
    """``python -m embed_assets.stages.serve stop``: stop the server the latest ``nim_service`` recorded."""
    import argparse

    from embed_assets.stages.common import artifact_root, latest_manifest_at

    parser = argparse.ArgumentParser(
        description="Stop the server the latest nim_service materialization started."
    )
    parser.add_argument("command", choices=["stop"])
    parser.add_argument("--root", default="", help="artifact root (default: as the pipeline)")
    args = parser.parse_args(argv)
    # Under ``python -m`` this module is ``__main__``: the stored manifest is of the importable module's class.
    from embed_assets.stages.serve import ServiceManifest as Recorded

    service = latest_manifest_at(artifact_root(args.root), "nim_service")
    if not isinstance(service, Recorded):
        print("no nim_service materialization under the artifact root: nothing to stop")
        return 0
    outcome = stop_service(service)
    print(f"nim_service server pid {service.pid} at {service.url}: {outcome}")
    return 3 if outcome == "not_ours" else 0


if __name__ == "__main__":
    raise SystemExit(main())
