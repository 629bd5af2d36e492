"""Command line of the embedding server: ``embed-assets-serve`` / ``python -m embed_assets.serving``.

The API key is never taken on the command line (it would show in ``ps``): ``--api-key-env NAME`` names the
environment variable that holds it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

log = logging.getLogger("embed_assets.serving")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser.

    Returns:
        An ``argparse.ArgumentParser``.
    """
    p = argparse.ArgumentParser(prog="embed-assets-serve", description="NIM-compatible embedding server.")
    p.add_argument("--onnx-dir", help="folder written by export_onnx (backend onnx)")
    p.add_argument("--variant", default="fp32", choices=["fp32", "int8"], help="ONNX variant (default fp32)")
    p.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="onnx (default) or torch")
    p.add_argument("--model-dir", help="sentence-transformers folder (backend torch)")
    p.add_argument("--max-seq-length", type=int, default=None, help="torch backend: override max_seq_length")
    p.add_argument("--model-name", default=None, help="name clients send as 'model' (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=None, help="environment variable holding the bearer token")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="padded-token budget of one forward pass (default: 2048 on CPU, 16384 on GPU)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="most inputs per forward pass (default: 64 CPU, 256 GPU)",
    )
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="wait for more requests when idle")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000, help="413 above")
    p.add_argument("--max-inputs-per-request", type=int, default=256, help="400 above")
    p.add_argument("--max-request-tokens", type=int, default=65_536, help="413 above (after tokenization)")
    p.add_argument(
        "--max-inflight-tokens",
        type=int,
        default=262_144,
        help="429 + Retry-After above (tokens not answered)",
    )
    p.add_argument(
        "--memory-arena",
        action="store_true",
        help="keep onnxruntime's CPU memory arena (faster first passes, but RSS keeps its peak after bursts)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    return p


def resolve_api_key(env_name: str | None) -> str | None:
    """Read the API key from the named environment variable.

    Args:
        env_name: Variable name, or ``None`` for no authentication.

    Returns:
        The key, or ``None``.

    Raises:
        SystemExit: The variable is named but unset or empty (fail closed rather than serve unprotected).
    """
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise SystemExit(f"--api-key-env {env_name}: the environment variable is unset or empty")
    return key


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, build the app and run it with uvicorn until stopped.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    api_key = resolve_api_key(args.api_key_env)
    import uvicorn

    from embed_assets.serving.app import create_app

    embedder = None
    if args.backend == "torch":
        if not args.model_dir:
            raise SystemExit("--backend torch needs --model-dir")
        # Idle OpenMP threads otherwise spin and starve the event loop (4.7 -> 48 texts/s measured on 2 cores);
        # must be set before torch is imported.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from embed_assets.serving.embedder import TorchEmbedder

        embedder = TorchEmbedder(
            args.model_dir, max_seq_length=args.max_seq_length, model_name=args.model_name
        )
    elif not args.onnx_dir:
        raise SystemExit("--onnx-dir is required (or --backend torch --model-dir DIR)")
    try:
        app = create_app(
            args.onnx_dir,
            variant=args.variant,
            api_key=api_key,
            max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_request_bytes=args.max_request_bytes,
            max_inputs_per_request=args.max_inputs_per_request,
            max_request_tokens=args.max_request_tokens,
            max_inflight_tokens=args.max_inflight_tokens,
            batch_wait_ms=args.batch_wait_ms,
            memory_arena=args.memory_arena,
            embedder=embedder,
            served_model_name=args.model_name,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"embed-assets-serve: {exc}") from None
    batcher = app.state.batcher
    log.info(
        "serving %s on http://%s:%d auth=%s; batches of <= %d padded tokens / %d inputs",
        startup_line(app.state.embedder, app.state.identity, args.model_name),
        args.host,
        args.port,
        "on" if api_key else "off",
        batcher.max_batch_tokens,
        batcher.max_batch_size,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log
    )  # configures uvicorn's loggers: the redaction filter goes on after that
    if api_key:
        for name in ("uvicorn.access", "uvicorn.error"):
            logging.getLogger(name).addFilter(RedactFilter(api_key))
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3  # uvicorn.run's exit code when startup failed


def startup_line(embedder: object, identity: dict, served_name: str | None = None) -> str:
    """What the startup log says about the served model: name, variant, shape and where it came from.

    Args:
        embedder: The serving embedder.
        identity: From :func:`embed_assets.serving.embedder.load_model_identity`.
        served_name: ``--model-name``, if given.

    Returns:
        E.g. ``"all-MiniLM-L6-v2 (onnx fp32, dim 384, max_seq_length 256; source finetuned, checkpoint run
        abc, dagster run def)"``.
    """
    info = embedder.describe()  # type: ignore[attr-defined]
    name = served_name or info["model_name"]
    shape = f"{info['backend']} {info['variant']}, dim {info['dimension']}, max_seq_length {info['max_seq_length']}"
    if identity.get("identity_file") is None:
        origin = "source unknown: no embed_assets_model.json in the model folder"
    else:
        labels = {
            "merge_weight": "fine-tuned weight",
            "checkpoint_run_id": "checkpoint run",
            "dagster_run_id": "dagster run",
            "mlflow_run_id": "mlflow run",
            "base_model": "base model",
        }
        origin = ", ".join(
            [f"source {identity.get('source', 'unknown')}"]
            + [f"{label} {identity[key]}" for key, label in labels.items() if identity.get(key)]
        )
    return f"{name} ({shape}; {origin})"


class RedactFilter(logging.Filter):
    """Replaces a secret in log records with ``***`` (e.g. a client that sends the key as ``?api_key=...``
    would otherwise have it written to the access log, which records the full path)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and self.secret in record.msg:
            record.msg = record.msg.replace(self.secret, "***")
        if isinstance(record.args, tuple) and any(self.secret in str(a) for a in record.args):
            record.args = tuple(
                str(a).replace(self.secret, "***") if self.secret in str(a) else a for a in record.args
            )
        return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
