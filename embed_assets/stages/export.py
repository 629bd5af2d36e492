"""Stage 7 — export: the checkpoint as ONNX (fp32 and int8), gated by parity with the checkpoint.

:func:`export_checkpoint` exports with :func:`embed_assets.export.export_onnx` (pooling and normalization in the
graph, dynamic axes) at the evaluation window, then evaluates every variant on the same BEIR test set as the
checkpoint and compares the metrics within NIM's tolerance (0.03 at @1, 0.01 at @5 and above). fp32 must also
reproduce the torch embeddings (min cosine ≥ 0.999). The export folder carries ``embed_assets_model.json``: which
model it is (source, checkpoint run, base model), so the server can say what it serves.
:func:`build_engine` builds a TensorRT plan where CUDA and TensorRT exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from embed_assets.stages.common import Gate, JsonValue, Manifest, PathRef, StageContext, Table
from embed_assets.stages.evaluate import MetricsManifest
from embed_assets.stages.train import CheckpointManifest

#: What the server reads to report the identity of the model it serves.
IDENTITY_FILE = "embed_assets_model.json"


class ExportSettings(BaseModel):
    """ONNX export options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    opset: int = Field(default=17, ge=17, description="ONNX opset (≥ 17).")
    quantize_int8: bool = Field(default=True, description="Also export a dynamically quantized int8 model.")
    served_model_name: str = Field(default="embed-assets", description="Model id the service reports.")
    allow_parity_failure: bool = Field(
        default=False,
        description="Serve an fp32 export whose metrics or embeddings differ from the checkpoint's beyond "
        "tolerance (the check still fails, as a warning, and the override is recorded).",
    )


class TensorRTSettings(BaseModel):
    """TensorRT build options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fp16: bool = Field(default=True, description="Build an fp16 engine.")


@dataclass
class VariantParity:
    """One exported variant's metrics against the checkpoint's."""

    variant: str
    ok: bool
    ndcg_at_10: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    def worst(self) -> float:
        return max((abs(r["diff"]) for r in self.rows), default=0.0)


@dataclass
class OnnxManifest(Manifest):
    """The ONNX folder (``onnx_dir``: model.onnx, model_int8.onnx, tokenizer, metadata, identity)."""

    onnx_dir: str
    int8_ok: bool
    report: dict[str, Any]
    parity: list[VariantParity]
    identity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    allow_parity_failure: bool = False

    def variant(self, name: str) -> VariantParity | None:
        return next((p for p in self.parity if p.variant == name), None)

    def gates(self) -> list[Gate]:
        from embed_assets.export import FP32_MIN_COSINE

        fp32, int8 = self.variant("fp32"), self.variant("int8")
        cosine = self.report.get("fp32_cosine_min", 0.0)
        ok = bool(fp32 and fp32.ok and cosine >= FP32_MIN_COSINE)
        message = (
            f"fp32 min cosine {cosine:.6f} (need ≥ {FP32_MIN_COSINE}), worst metric diff "
            f"{fp32.worst() if fp32 else float('nan'):.4f} (tolerance 0.03 at @1, 0.01 above)"
        )
        if not ok:
            message += " — the export does not reproduce the checkpoint, so it is not served; " + (
                "allowed through by allow_parity_failure: true"
                if self.allow_parity_failure
                else "to serve it anyway set ops.onnx_model.config.allow_parity_failure: true"
            )
        gates = [
            Gate(
                "onnx_fp32_parity",
                ok,
                message,
                severity="warn" if self.allow_parity_failure and not ok else "error",
                blocking=True,
                metadata={
                    "fp32_cosine_min": cosine,
                    "worst_metric_diff": fp32.worst() if fp32 else 0.0,
                    "allow_parity_failure": self.allow_parity_failure,
                },
            )
        ]
        gates.append(
            Gate(
                "onnx_int8_parity",
                self.int8_ok,
                "int8 within tolerance: may be served"
                if self.int8_ok
                else "int8 not exported or outside tolerance: served as fp32",
                severity="warn",
                metadata={
                    "int8_cosine_min": self.report.get("int8_cosine_min", 0.0),
                    "worst_metric_diff": int8.worst() if int8 else 0.0,
                },
            )
        )
        return gates

    def metadata(self) -> dict[str, Any]:
        return {
            **self.report,
            **{f"{p.variant}_ndcg@10": p.ndcg_at_10 for p in self.parity},
            "int8_served_allowed": self.int8_ok,
            **{f"{p.variant}_metric_parity": parity_table(p.rows) for p in self.parity},
            "identity": JsonValue(self.identity),
            "onnx_dir": PathRef(self.onnx_dir),
        }


@dataclass
class EngineManifest(Manifest):
    """A TensorRT plan, or why none was built (``skipped_reason``)."""

    engine_path: str = ""
    fp16: bool = True
    profiles: list[dict[str, Any]] = field(default_factory=list)
    build_seconds: float = 0.0
    skipped_reason: str = ""

    def metadata(self) -> dict[str, Any]:
        if self.skipped_reason:
            return {"skipped": True, "reason": self.skipped_reason}
        return {
            "engine": PathRef(self.engine_path),
            "fp16": self.fp16,
            "profiles": JsonValue(self.profiles),
            "build_seconds": self.build_seconds,
        }


def parity_table(rows: list[dict[str, Any]]) -> Table:
    """Metric-parity rows (checkpoint vs exported or served) as a table for the UI."""
    return Table(
        ["metric", "checkpoint", "exported", "diff", "tolerance", "ok"],
        [
            {
                "metric": r["metric"],
                "checkpoint": r["reference"],
                "exported": r["candidate"],
                "diff": r["diff"],
                "tolerance": r["tolerance"],
                "ok": bool(r["ok"]),
            }
            for r in rows
        ],
        max_rows=len(rows),
    )


def served_parity(
    encode: Any, metrics: MetricsManifest
) -> tuple[dict[str, float], list[dict[str, Any]], bool]:
    """Metrics of any encoder on the checkpoint's primary evaluation set, and their parity with the checkpoint's.

    Args:
        encode: ``encode(texts, input_type) -> (n, dim)`` (ONNX, a torch model, an HTTP endpoint).
        metrics: The checkpoint's evaluation (its primary set's folder and metrics are the reference).

    Returns:
        ``(metrics, parity rows, all within tolerance)``.
    """
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import evaluate_encoder, metric_parity

    reference = metrics.served
    corpus, queries, qrels = load_beir_folder(metrics.eval_beir, split="test")
    k_values = sorted({int(k.rsplit("@", 1)[1]) for k in reference})
    served, _ = evaluate_encoder(encode, corpus, queries, qrels, k_values)
    ok, rows = metric_parity(reference, served)
    return served, rows, ok


def export_checkpoint(
    checkpoint: CheckpointManifest,
    metrics: MetricsManifest,
    settings: ExportSettings,
    ctx: StageContext,
) -> OnnxManifest:
    """Export the served model (fine-tuned, or the merge evaluation chose) to ONNX; measure each variant's parity.

    Args:
        checkpoint: The fine-tuned model (its run ids are part of the served identity).
        metrics: The evaluation: which model is served (``model_dir``), its metrics on the primary set (the
            parity reference) and the evaluation window.
        settings: Opset, int8, served model name.
        ctx: Where to write the ONNX folder.

    Returns:
        An :class:`OnnxManifest` (gates: fp32 parity, int8 parity).
    """
    from embed_assets.export import export_onnx
    from embed_assets.serving.embedder import OnnxEmbedder
    from embed_assets.storage import write_json

    start = time.monotonic()
    out = ctx.out_dir("onnx_model") / "onnx"
    report = export_onnx(
        metrics.model_dir or checkpoint.model_dir,
        str(out),
        opset=settings.opset,
        quantize_int8=settings.quantize_int8,
        max_seq_length=metrics.eval_max_seq_length,
        model_name=settings.served_model_name,
    )
    identity = {
        "source": "merged" if metrics.choice is not None and metrics.choice.merged else "finetuned",
        **({"merge_weight": metrics.choice.weight} if metrics.choice is not None else {}),
        "model_dir": metrics.model_dir or checkpoint.model_dir,
        "served_model_name": settings.served_model_name,
        "checkpoint_run_id": checkpoint.run_id,
        "dagster_run_id": ctx.run_id,
        "base_model": checkpoint.base_model,
        "mlflow_run_id": checkpoint.mlflow.run_id,
        "max_seq_length": metrics.eval_max_seq_length,
        "ndcg@10_served": metrics.served.get("NDCG@10"),
        "ndcg@10_finetuned": metrics.finetuned.get("NDCG@10"),
        "ndcg@10_base": metrics.base.get("NDCG@10"),
    }
    write_json(Path(out) / IDENTITY_FILE, identity)
    parity = []
    for variant in ["fp32"] + (["int8"] if report.int8_path else []):
        embedder = OnnxEmbedder(str(out), variant=variant)
        served, rows, ok = served_parity(
            lambda texts, kind, e=embedder: e.encode(texts, input_type=kind, truncate="END"), metrics
        )
        parity.append(VariantParity(variant, ok, served.get("NDCG@10", float("nan")), rows))
    int8 = next((p for p in parity if p.variant == "int8"), None)
    return OnnxManifest(
        onnx_dir=str(out),
        int8_ok=bool(int8 and int8.ok),
        report=report.as_metadata(),
        parity=parity,
        identity=identity,
        seconds=round(time.monotonic() - start, 2),
        allow_parity_failure=settings.allow_parity_failure,
    )


def build_engine(onnx: OnnxManifest, settings: TensorRTSettings, ctx: StageContext) -> EngineManifest:
    """Build a TensorRT plan from the fp32 ONNX model, or say why not (no CUDA / TensorRT here).

    Args:
        onnx: The exported model.
        settings: fp16 or not.
        ctx: Where to write ``model.plan``.

    Returns:
        An :class:`EngineManifest` (``skipped_reason`` set when nothing was built).
    """
    from embed_assets.export import build_tensorrt_engine, tensorrt_profiles, tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        ctx.log.warning(f"tensorrt_engine skipped: {reason}")
        return EngineManifest(skipped_reason=reason, fp16=settings.fp16)
    out = ctx.out_dir("tensorrt_engine") / "model.plan"
    profiles = tensorrt_profiles()
    start = time.monotonic()
    build_tensorrt_engine(
        str(Path(onnx.onnx_dir) / "model.onnx"), str(out), fp16=settings.fp16, profiles=profiles
    )
    return EngineManifest(
        engine_path=str(out),
        fp16=settings.fp16,
        profiles=[{"input": name, **shapes} for name, shapes in profiles.items()],
        build_seconds=round(time.monotonic() - start, 2),
    )
