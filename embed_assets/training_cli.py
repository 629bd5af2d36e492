"""Run :func:`embed_assets.training.train` from a JSON spec, in-process or as N ``torchrun`` workers.

Multi-GPU data parallelism (DDP) is the Trainer's own: started by ``torchrun``, every worker runs this entry
point on the same spec, the Trainer shards the batches across ``cuda:<LOCAL_RANK>`` devices and all-reduces the
gradients, and rank 0 alone saves the model, writes the report and logs to MLflow. The ``checkpoint`` asset
builds the spec and the command with :func:`write_spec` and :func:`torchrun_command` when
``TrainingConfig.num_gpus > 1`` and that many CUDA devices exist (see ``docs/multi-gpu.md``)::

    python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 4 \\
        -m embed_assets.training_cli --spec <work_dir>/ddp/spec.json

(``torchrun`` is the console script of ``torch.distributed.run``; the module form always uses the same
interpreter as the code location.)

The spec holds no secret: the MLflow tracking URI travels in the ``EMBED_ASSETS_MLFLOW_TRACKING_URI``
environment variable of the launched processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from embed_assets.stages.train import TrainSettings
from embed_assets.training import TrainReport

TRACKING_URI_ENV = "EMBED_ASSETS_MLFLOW_TRACKING_URI"
SPEC_VERSION = 1


def distributed_processes(num_gpus: int, device: str, cuda_devices: int) -> int:
    """How many training processes to launch: ``min(num_gpus, cuda_devices)`` on CUDA, else 1 (in-process).

    Args:
        num_gpus: ``TrainingConfig.num_gpus``.
        device: The resolved torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        cuda_devices: ``torch.cuda.device_count()``.

    Returns:
        ``1`` means "train in the asset's process"; more means "launch that many torchrun workers".
    """
    if num_gpus <= 1 or not device.startswith("cuda") or cuda_devices <= 1:
        return 1
    if device not in ("cuda", "cuda:0"):
        return 1  # a specific non-default GPU was asked for: keep to it
    return min(num_gpus, cuda_devices)


def torchrun_command(
    spec_path: str | Path, nproc: int, python: str | None = None, master_port: int | None = None
) -> list[str]:
    """The ``torchrun`` command line that runs :func:`main` on ``spec_path`` with ``nproc`` workers.

    Args:
        spec_path: The spec written by :func:`write_spec`.
        nproc: Workers (one per GPU).
        python: Interpreter (default: this one, so the workers see the same environment).
        master_port: Rendezvous port; default ``--standalone`` (a free local port, single node).

    Returns:
        The argv list for ``subprocess``.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    cmd += (
        ["--standalone"]
        if master_port is None
        else ["--master_addr", "127.0.0.1", "--master_port", str(master_port)]
    )
    cmd += [
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "embed_assets.training_cli",
        "--spec",
        str(spec_path),
    ]
    return cmd


def write_spec(
    spec_dir: str | Path,
    *,
    base_model: str,
    rows: Sequence[Mapping[str, str]],
    work_dir: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    device: str,
    val: Mapping[str, Any] | None = None,
    tracking: Mapping[str, Any] | None = None,
    prompts: Mapping[str, str] | None = None,
) -> Path:
    """Write the training rows (JSON Lines) and the spec (JSON) that :func:`main` reads.

    Args:
        spec_dir: Folder for ``spec.json``, ``rows.jsonl`` and, after the run, ``report.json``.
        base_model: As for :func:`embed_assets.training.train`.
        rows: Training rows.
        work_dir: Trainer checkpoint folder (resume point).
        out_dir: Final model folder.
        settings: Hyper-parameters.
        device: ``"cuda"`` (each worker uses ``cuda:<LOCAL_RANK>``) or ``"cpu"``.
        val: Optional validation set (``relevant_docs`` values may be sets).
        tracking: Optional ``{"run_id", "experiment", "artifact_root", "log_model"}``; the tracking URI itself
            goes in the ``EMBED_ASSETS_MLFLOW_TRACKING_URI`` environment variable.
        prompts: Optional ``{"query": ..., "passage": ...}`` prefixes.

    Returns:
        The spec path.
    """
    from embed_assets.storage import write_json, write_jsonl

    spec_dir = Path(spec_dir)
    spec_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(spec_dir / "rows.jsonl", rows)
    val_json = None
    if val:
        val_json = {
            "queries": dict(val["queries"]),
            "corpus": dict(val["corpus"]),
            "relevant_docs": {q: sorted(ids) for q, ids in val["relevant_docs"].items()},
        }
    spec = {
        "version": SPEC_VERSION,
        "base_model": base_model,
        "rows_path": str(spec_dir / "rows.jsonl"),
        "work_dir": str(work_dir),
        "out_dir": str(out_dir),
        "settings": settings.model_dump(),
        "prompts": dict(prompts or {}),
        "device": device,
        "val": val_json,
        "tracking": dict(tracking) if tracking else None,
        "report_path": str(spec_dir / "report.json"),
    }
    if "tracking_uri" in (spec["tracking"] or {}):
        raise ValueError(f"pass the tracking URI in ${TRACKING_URI_ENV}, not in the spec file")
    return write_json(spec_dir / "spec.json", spec)


def read_report(path: str | Path) -> TrainReport:
    """The :class:`TrainReport` rank 0 wrote."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["loss_curve"] = [tuple(p) for p in data.get("loss_curve", [])]
    data["eval_curve"] = [tuple(p) for p in data.get("eval_curve", [])]
    return TrainReport(**data)


def run_distributed(
    spec_path: str | Path,
    nproc: int,
    progress: Callable[[str], None] | None = None,
    tracking_uri: str | None = None,
    python: str | None = None,
) -> TrainReport:
    """Launch ``nproc`` torchrun workers on a spec, stream their output, and return rank 0's report.

    Args:
        spec_path: From :func:`write_spec`.
        nproc: Workers.
        progress: Receives every output line (e.g. ``context.log.info``).
        tracking_uri: MLflow tracking URI for rank 0 (passed through the environment, never on disk).
        python: Interpreter for the workers (default: this one).

    Returns:
        The report.

    Raises:
        RuntimeError: the launcher exited non-zero (the last output lines are in the message).
    """
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    Path(spec["report_path"]).unlink(missing_ok=True)
    env = dict(os.environ)
    if tracking_uri:
        env[TRACKING_URI_ENV] = tracking_uri
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = torchrun_command(spec_path, nproc, python=python)
    if progress:
        progress("launching: " + " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-39:], line]
            if progress and line:
                progress(line)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"distributed training failed (exit code {code}):\n" + "\n".join(tail))
    return read_report(spec["report_path"])


# ---------------------------------------------------------------------------------------- worker entry
def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point: read the spec, train, and (rank 0) write the report."""
    parser = argparse.ArgumentParser(description="Run embed_assets.training.train from a JSON spec.")
    parser.add_argument("--spec", required=True, type=Path, help="spec.json written by write_spec()")
    args = parser.parse_args(argv)

    from embed_assets.storage import read_jsonl, write_json
    from embed_assets.training import train

    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    if spec.get("version") != SPEC_VERSION:
        raise SystemExit(f"unsupported spec version {spec.get('version')!r} (expected {SPEC_VERSION})")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = spec["device"]
    if device.startswith("cuda") and world > 1:
        import torch

        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    val = spec.get("val")
    if val:
        val = {**val, "relevant_docs": {q: set(ids) for q, ids in val["relevant_docs"].items()}}
    callbacks: list[Any] = []
    tracking = spec.get("tracking")
    if tracking and rank == 0:
        from embed_assets.tracking import MLflowTracker

        tracker = MLflowTracker(
            os.environ.get(TRACKING_URI_ENV, ""),
            tracking.get("experiment", "embed_assets"),
            tracking.get("artifact_root", "."),
        )
        callbacks.append(tracker.callback(tracking["run_id"]))

    def progress(line: str) -> None:
        print(f"[rank {rank}/{world}] {line}", flush=True)

    report = train(
        spec["base_model"],
        read_jsonl(spec["rows_path"]),
        spec["work_dir"],
        spec["out_dir"],
        TrainSettings.model_validate(spec["settings"]),
        device=device,
        val=val,
        progress=progress if rank == 0 else None,
        callbacks=callbacks,
        query_prompt=spec.get("prompts", {}).get("query", ""),
        passage_prompt=spec.get("prompts", {}).get("passage", ""),
    )
    if rank == 0:
        write_json(spec["report_path"], asdict(report))
        progress(f"done: {report.steps} steps in {report.seconds}s, model in {report.model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
