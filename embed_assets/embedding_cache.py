"""A content-addressed, on-disk cache of text embeddings (Dagster-free).

Embeddings are stored per text under a *namespace* that identifies everything the vector depends on besides
the text itself: the model fingerprint, the prompt, the task (query / document) and whether the vector was
L2-normalized. Inside a namespace every vector is keyed by the content hash of its text, so an unchanged
chunk is never encoded twice across runs, whatever its id, and a chunk whose text changed under the same id
is re-encoded (its hash changed). Layout::

    cache_dir/<namespace>/namespace.json            what the namespace means (for humans)
    cache_dir/<namespace>/shard-<stamp>.npy         float32 [n, dim] embeddings
    cache_dir/<namespace>/shard-<stamp>.keys.npy    the n text hashes (``S32``), written last = shard complete
    cache_dir/<namespace>/shard-<stamp>.ids.json    the caller's ids of those n texts (for inspection only)

Every call that encodes something appends one shard; readers ignore shards whose keys file is missing, so a
crashed or concurrent writer never corrupts the cache. Missing texts are encoded in a single ``encode`` call
in first-occurrence order, which on a cold cache reproduces exactly the batches (and so the bits) that
``sentence_transformers.util.mine_hard_negatives`` gets when it encodes the same de-duplicated corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Bump when the on-disk layout changes; it is part of every namespace.
CACHE_FORMAT = 1


def text_key(text: str) -> bytes:
    """The content hash of a text, as stored in a shard's keys file.

    Args:
        text: Any text.

    Returns:
        32 ASCII hex characters (blake2b-128 of the UTF-8 bytes).
    """
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest().encode("ascii")


def model_fingerprint(model: Any) -> str:
    """A fingerprint of a sentence-transformers model that changes whenever its embeddings could change.

    Hashes every parameter and buffer (so a fine-tuned checkpoint saved over the same folder gets a new
    fingerprint), the module stack, the maximum sequence length and the model's saved prompts. Costs one pass
    over the weights (about 0.2 s for all-MiniLM-L6-v2 on CPU).

    Args:
        model: A ``SentenceTransformer``.

    Returns:
        32 hex characters.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(model).encode())
    h.update(repr(getattr(model, "max_seq_length", None)).encode())
    h.update(json.dumps(getattr(model, "prompts", {}) or {}, sort_keys=True).encode())
    import torch

    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())  # byte view: works for bf16/fp16 too
    return h.hexdigest()


@dataclass
class CacheStats:
    """What one :meth:`EmbeddingCache.encode` call did.

    Attributes:
        n_texts: Texts asked for (duplicates included).
        n_unique: Distinct texts among them.
        n_cached: Distinct texts found in the cache.
        n_encoded: Distinct texts encoded by the model in this call.
        seconds: Wall time of the call.
    """

    n_texts: int = 0
    n_unique: int = 0
    n_cached: int = 0
    n_encoded: int = 0
    seconds: float = 0.0


class EmbeddingCache:
    """Per-text embedding cache for one (model fingerprint, prompt, task, normalization) namespace.

    Args:
        cache_dir: Root folder of the cache (created if missing); namespaces are sub-folders.
        model_fingerprint: Anything that identifies the model weights, e.g. :func:`model_fingerprint`.
        prompt: The raw prompt prepended to every text (``None`` = the model's default for ``task``).
        task: ``"document"`` (passages; encoded with ``encode_document``) or ``"query"`` (``encode_query``).
        normalize: Whether the stored vectors are L2-normalized (``mine_hard_negatives`` needs ``True``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        model_fingerprint: str,
        prompt: str | None = None,
        task: str = "document",
        normalize: bool = True,
    ) -> None:
        if task not in ("document", "query"):
            raise ValueError(f"task must be 'document' or 'query', got {task!r}")
        self.model_fingerprint = model_fingerprint
        self.prompt = prompt
        self.task = task
        self.normalize = normalize
        spec = {
            "format": CACHE_FORMAT,
            "model_fingerprint": model_fingerprint,
            "prompt": prompt,
            "task": task,
            "normalize": normalize,
        }
        self.namespace = hashlib.blake2b(
            json.dumps(spec, sort_keys=True).encode(), digest_size=12
        ).hexdigest()
        self.dir = Path(cache_dir) / self.namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "namespace.json"
        if not spec_file.exists():
            _atomic_write_bytes(spec_file, json.dumps(spec, indent=2).encode())
        self.last_stats = CacheStats()

    # ----------------------------------------------------------------------------------------- reading
    def _shards(self) -> list[Path]:
        """Complete shards (their keys file exists), oldest first."""
        return sorted(p for p in self.dir.glob("shard-*.keys.npy"))

    def lookup(self, keys: Sequence[bytes]) -> tuple[dict[bytes, int], np.ndarray | None]:
        """Find cached vectors for some keys.

        Args:
            keys: Distinct text keys (see :func:`text_key`).

        Returns:
            ``(position_of_key, vectors)``: for every key found, its row in ``vectors``; ``vectors`` is
            ``None`` when nothing was found.
        """
        wanted = set(keys)
        found: dict[bytes, int] = {}
        parts: list[np.ndarray] = []
        n = 0
        for keys_file in self._shards():
            try:
                shard_keys = np.load(keys_file)
                rows = [i for i, k in enumerate(shard_keys.tolist()) if k in wanted and k not in found]
                if not rows:
                    continue
                vectors = np.load(str(keys_file).replace(".keys.npy", ".npy"), mmap_mode="r")
                if len(vectors) != len(shard_keys):
                    raise ValueError(f"{len(vectors)} vectors for {len(shard_keys)} keys")
            except (OSError, ValueError) as e:
                logger.warning("embedding cache: ignoring unreadable shard %s (%s)", keys_file.name, e)
                continue
            parts.append(np.asarray(vectors[rows], dtype=np.float32))
            for i in rows:
                found[shard_keys[i].item()] = n
                n += 1
        return found, (np.concatenate(parts) if parts else None)

    # ----------------------------------------------------------------------------------------- writing
    def store(self, keys: Sequence[bytes], vectors: np.ndarray, ids: Sequence[str] | None = None) -> Path:
        """Append one shard.

        Args:
            keys: Text keys, one per row of ``vectors``.
            vectors: ``[len(keys), dim]`` embeddings.
            ids: The callers' ids of those texts, stored alongside for inspection.

        Returns:
            The path of the shard's vector file.
        """
        stem = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        vec_file = self.dir / f"{stem}.npy"
        _atomic_save(vec_file, np.ascontiguousarray(vectors, dtype=np.float32))
        if ids is not None:
            _atomic_write_bytes(self.dir / f"{stem}.ids.json", json.dumps(list(ids)).encode())
        _atomic_save(self.dir / f"{stem}.keys.npy", np.asarray(list(keys), dtype="S32"))
        return vec_file

    # ---------------------------------------------------------------------------------------- encoding
    def encode(
        self, model: Any, texts: Sequence[str], ids: Sequence[str] | None = None, batch_size: int = 32
    ) -> np.ndarray:
        """Embeddings of ``texts``, encoding only those not cached yet.

        Args:
            model: A ``SentenceTransformer`` (must match the namespace's fingerprint).
            texts: Texts to embed (duplicates allowed; each distinct text is encoded at most once).
            ids: Optional ids aligned with ``texts`` (recorded next to new shards, not used as keys).
            batch_size: Encoding batch size.

        Returns:
            ``float32 [len(texts), dim]``, row ``i`` for ``texts[i]``. The call's counts are in
            :attr:`last_stats`.
        """
        start = time.perf_counter()
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        keys = [text_key(t) for t in texts]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        found, cached = self.lookup(list(first))
        missing = [i for k, i in first.items() if k not in found]
        new_vectors = None
        if missing:
            new_vectors = encode_texts(
                model, [texts[i] for i in missing], self.task, self.prompt, batch_size, self.normalize
            )
            self.store(
                [keys[i] for i in missing], new_vectors, None if ids is None else [ids[i] for i in missing]
            )
        dim = (cached if cached is not None else new_vectors).shape[1] if first else 0
        out = np.empty((len(texts), dim), dtype=np.float32)
        new_row = {keys[i]: r for r, i in enumerate(missing)}
        for i, k in enumerate(keys):
            out[i] = cached[found[k]] if k in found else new_vectors[new_row[k]]
        self.last_stats = CacheStats(
            n_texts=len(texts),
            n_unique=len(first),
            n_cached=len(found),
            n_encoded=len(missing),
            seconds=time.perf_counter() - start,
        )
        logger.info(
            "embedding cache %s: %d texts, %d distinct, %d cached, %d encoded in %.1fs",
            self.namespace,
            len(texts),
            len(first),
            len(found),
            len(missing),
            self.last_stats.seconds,
        )
        return out


def encode_texts(
    model: Any, texts: Sequence[str], task: str, prompt: str | None, batch_size: int, normalize: bool
) -> np.ndarray:
    """Encode texts the way ``sentence_transformers.util.mine_hard_negatives`` does.

    Args:
        model: A ``SentenceTransformer``.
        texts: Texts to encode (one ``encode`` call, so batches are length-sorted over all of them).
        task: ``"query"`` (``encode_query``) or ``"document"`` (``encode_document``); models without these
            methods fall back to ``encode``.
        prompt: Raw prompt, or ``None`` for the model's default prompt for the task.
        batch_size: Encoding batch size.
        normalize: L2-normalize the vectors.

    Returns:
        ``float32 [len(texts), dim]``.
    """
    method = getattr(model, "encode_query" if task == "query" else "encode_document", None) or model.encode
    vectors = method(
        list(texts),
        prompt=prompt,
        batch_size=batch_size,
        normalize_embeddings=normalize,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def encode_with_cache(
    model: Any,
    texts: Sequence[str],
    ids: Sequence[str],
    cache_dir: str | os.PathLike[str],
    model_fingerprint: str,
    prompt: str | None = None,
    batch_size: int = 32,
    *,
    task: str = "document",
    normalize: bool = True,
) -> np.ndarray:
    """Embed texts, reusing every vector already computed for the same text, model and prompt.

    Args:
        model: A ``SentenceTransformer``.
        texts: Texts to embed, aligned with ``ids``.
        ids: Their ids (e.g. chunk ids); recorded next to new shards. Keys are the texts' content hashes, so
            a changed text is re-encoded even when its id stays the same.
        cache_dir: Root folder of the cache.
        model_fingerprint: Identifies the model weights (see :func:`model_fingerprint`).
        prompt: Raw prompt (``None`` = the model's default prompt for ``task``).
        batch_size: Encoding batch size.
        task: ``"document"`` for passages, ``"query"`` for queries.
        normalize: L2-normalize (what mining expects).

    Returns:
        ``float32 [len(texts), dim]`` aligned with ``texts``.
    """
    cache = EmbeddingCache(cache_dir, model_fingerprint, prompt=prompt, task=task, normalize=normalize)
    return cache.encode(model, texts, ids, batch_size=batch_size)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    from embed_assets.storage import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from embed_assets.storage import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
