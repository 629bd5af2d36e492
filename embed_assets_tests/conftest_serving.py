"""Shared helpers for test_export.py and test_serving.py (not a conftest: imported explicitly).

The bundled all-MiniLM-L6-v2 is exported once per test session (max_seq_length 128 keeps it fast) and the
result is reused by both test files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_SEQ_LENGTH = 128
_CACHE: dict[str, Any] = {}


def exported_minilm(tmp_path_factory: Any) -> tuple[str, Any]:
    """Export the bundled MiniLM (fp32 + int8) once per session.

    Args:
        tmp_path_factory: pytest's session-scoped ``tmp_path_factory``.

    Returns:
        ``(onnx_dir, ExportReport)``.
    """
    if "export" not in _CACHE:
        from embed_assets.export import export_onnx
        from embed_assets.models import BUNDLED_MODEL, resolve_model_path

        out = Path(tmp_path_factory.mktemp("onnx_minilm"))
        report = export_onnx(
            resolve_model_path(BUNDLED_MODEL),
            str(out),
            max_seq_length=MAX_SEQ_LENGTH,
            model_name="all-MiniLM-L6-v2",
        )
        _CACHE["export"] = (str(out), report)
    return _CACHE["export"]


def reference_model() -> Any:
    """The torch SentenceTransformer the export is compared with (same max_seq_length), loaded once."""
    if "model" not in _CACHE:
        from embed_assets.models import BUNDLED_MODEL, load_sentence_transformer

        _CACHE["model"] = load_sentence_transformer(
            BUNDLED_MODEL, device="cpu", max_seq_length=MAX_SEQ_LENGTH
        )
    return _CACHE["model"]


@contextlib.contextmanager
def running_server(
    onnx_dir: str,
    log_path: Path,
    key_env: str,
    key: str,
    ready_timeout: float = 120,
    extra_args: list[str] | None = None,
) -> Iterator[Any]:
    """A real embedding server subprocess on loopback, guarded by bearer ``key`` (read from ``key_env``).

    Args:
        onnx_dir: The exported model folder.
        log_path: Where the server writes its log.
        key_env: Environment variable that carries the API key to the server.
        key: The API key.
        ready_timeout: Seconds to wait for ``/v1/health/ready``.
        extra_args: More server CLI arguments.

    Yields:
        The server handle; on exit the server is stopped and must be gone, and its log must not hold the key.
    """
    from embed_assets.serving.process import is_alive, start_server

    old = os.environ.get(key_env)
    os.environ[key_env] = key
    handle = start_server(
        onnx_dir,
        api_key_env=key_env,
        log_path=str(log_path),
        ready_timeout=ready_timeout,
        extra_args=extra_args or [],
    )
    try:
        yield handle
    finally:
        handle.stop()
        if old is None:
            os.environ.pop(key_env, None)
        else:
            os.environ[key_env] = old
        assert not is_alive(handle.pid)
        assert key not in Path(log_path).read_text()  # the key is never logged
