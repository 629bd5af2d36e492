"""Content-addressed cache of generated QA records.

Key = (chunk content hash, generator fingerprint). An unchanged chunk under an unchanged generator never pays
for generation twice, and an interrupted run resumes from what it already stored: each entry is written
atomically as soon as its chunk is done.

Two kinds of entries share the folder:

- record entries (:meth:`SDGCache.get` / :meth:`SDGCache.put`): the QA records of one generation unit, written
  by :func:`embed_assets.sdg.runner.run_generation`;
- raw JSON entries (:meth:`SDGCache.get_json` / :meth:`SDGCache.put_json`): e.g. one validated LLM answer per
  request, written by :class:`embed_assets.sdg.llm.LLMQAGenerator`, so even a partially finished unit
  reuses its finished calls.

Entries never contain credentials: callers key them by content hashes and store only answers and counts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from embed_assets.records import QARecord
from embed_assets.storage import atomic_path


class SDGCache:
    """A folder of JSON files, one per (key, fingerprint)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str, fingerprint: str) -> Path:
        digest = hashlib.sha256(f"{key}\x00{fingerprint}".encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, key: str, fingerprint: str) -> list[QARecord] | None:
        """Return the cached records for ``key`` or ``None`` when absent (or unreadable)."""
        path = self._path(key, fingerprint)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a corrupt entry is treated as a miss and rewritten
        return [QARecord.from_dict(r) for r in data["records"]]

    def put(self, key: str, fingerprint: str, records: list[QARecord]) -> None:
        """Store records for ``key`` atomically."""
        path = self._path(key, fingerprint)
        with atomic_path(path) as tmp:
            tmp.write_text(
                json.dumps(
                    {"key": key, "fingerprint": fingerprint, "records": [r.to_dict() for r in records]}
                ),
                encoding="utf-8",
            )

    def get_json(self, key: str, fingerprint: str = "") -> dict[str, Any] | None:
        """Return a raw JSON entry stored by :meth:`put_json`, or ``None`` when absent (or unreadable).

        Args:
            key: Content-derived key of the entry.
            fingerprint: Optional second key part (e.g. a prompt/model hash).

        Returns:
            The stored payload.
        """
        path = self._path(key, fingerprint)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        payload = data.get("payload") if isinstance(data, dict) else None
        return payload if isinstance(payload, dict) else None

    def put_json(self, key: str, fingerprint: str, payload: dict[str, Any]) -> None:
        """Store a JSON-serializable ``payload`` atomically.

        Args:
            key: Content-derived key of the entry.
            fingerprint: Optional second key part.
            payload: The object to store.
        """
        path = self._path(key, fingerprint)
        with atomic_path(path) as tmp:
            tmp.write_text(
                json.dumps({"key": key, "fingerprint": fingerprint, "payload": payload}, ensure_ascii=False),
                encoding="utf-8",
            )
