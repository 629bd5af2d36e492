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
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--max-request-bytes", type=int, default=1_000_000)
    p.add_argument("--max-inputs-per-request", type=int, default=256)
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
    app = create_app(
        args.onnx_dir,
        variant=args.variant,
        api_key=api_key,
        max_batch_size=args.max_batch_size,
        max_request_bytes=args.max_request_bytes,
        max_inputs_per_request=args.max_inputs_per_request,
        batch_wait_ms=args.batch_wait_ms,
        embedder=embedder,
        served_model_name=args.model_name,
    )
    info = app.state.embedder.describe()
    log.info(
        "serving %s (%s %s, dim %d, max_seq_length %d) on http://%s:%d auth=%s",
        info["model_name"],
        info["backend"],
        info["variant"],
        info["dimension"],
        info["max_seq_length"],
        args.host,
        args.port,
        "on" if api_key else "off",
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
