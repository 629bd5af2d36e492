"""What the last run produced, in a few lines: ``python -m embed_assets.summary`` (``make run`` ends with it).

Reads the latest manifest of each asset under the artifact root (``$EMBED_ASSETS_HOME``, else
``$DAGSTER_HOME/embed_assets``): base → fine-tuned nDCG@10 with its interval, every gate, where the model and its
export are, the served URL, and the commands that open the Dagster UI and the MLflow UI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def summary_lines(root: Path) -> list[str]:
    """The summary of the latest manifests under ``root`` (a line saying so when nothing ran yet)."""
    from embed_assets.stages.common import latest_manifest_at

    def get(asset: str) -> Any:
        return latest_manifest_at(root, asset)

    metrics, checkpoint, onnx, service = (
        get("beir_metrics"),
        get("checkpoint"),
        get("onnx_model"),
        get("nim_service"),
    )
    if metrics is None and checkpoint is None:
        return [f"embed_assets: no evaluated model under {root} yet (run `make run`)."]
    lines = ["", "== embed_assets: summary of the last run"]
    if metrics is not None:
        for s in metrics.sets:
            b = s.bootstrap
            merged = f", merged {s.merged['NDCG@10']:.4f}" if s.merged else ""
            lines.append(
                f"  {s.name:<15} nDCG@10 base {s.base['NDCG@10']:.4f} -> fine-tuned {s.finetuned['NDCG@10']:.4f}"
                f"{merged} (served {100 * b.delta:+.1f} points, 95% CI [{100 * b.ci95_low:+.1f}, {100 * b.ci95_high:+.1f}]) "
                f"on {s.queries} queries, {metrics.eval_max_seq_length} tokens"
            )
    gates = [g for m in (get("split_sets"), metrics, onnx, service) if m is not None for g in m.gates()]
    for g in gates:
        verdict = "passed" if g.passed else ("FAILED" if g.severity == "error" else "warning")
        lines.append(f"  gate {g.name}: {verdict}" + ("" if g.passed else f" — {g.message}"))
    if metrics is not None and metrics.choice is not None:
        lines.append(f"  served model: {metrics.served_label} ({metrics.choice.reason})")
    if checkpoint is not None:
        lines.append(
            f"  model:   {metrics.model_dir if metrics is not None and metrics.model_dir else checkpoint.model_dir}"
        )
        if checkpoint.mlflow.run_id:
            lines.append(
                f"  MLflow run {checkpoint.mlflow.run_id}: `make mlflow`, then {checkpoint.mlflow.url}"
            )
    if onnx is not None:
        lines.append(f"  ONNX:    {onnx.onnx_dir}")
    if service is not None and service.url:
        lines.append(
            f"  served:  {service.url}/v1/embeddings (pid {service.pid}; `make stop-service` stops it)"
        )
    lines.append("  UI:      `make dev`, then http://127.0.0.1:3000 (assets, lineage, metadata, checks)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="artifact root (default: as the pipeline)")
    args = parser.parse_args(argv)
    from embed_assets.stages.common import artifact_root

    root = args.root or artifact_root()
    print("\n".join(summary_lines(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
