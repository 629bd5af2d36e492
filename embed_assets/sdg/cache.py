"""Content-addressed cache of generated QA records, in one SQLite file (:class:`~embed_assets.kvstore.KVStore`).

Key = (chunk content hash, generator fingerprint). An unchanged chunk under an unchanged generator never pays
for generation twice, and an interrupted run resumes from what it already stored: each entry is committed as
soon as its unit (or LLM call) is done.

Two kinds of entries share the store:

- record entries (:meth:`SDGCache.get` / :meth:`SDGCache.put`): the QA records of one generation unit, written
  by :func:`embed_assets.sdg.runner.run_generation`;
- raw JSON entries (:meth:`SDGCache.get_json` / :meth:`SDGCache.put_json`): e.g. one validated LLM answer per
  request, written by :class:`embed_assets.sdg.llm.LLMQAGenerator`, so even a partially finished unit
  reuses its finished calls.

:meth:`SDGCache.evict` removes what no live chunk uses any more. Entries never contain credentials: callers
key them by content hashes and store only answers and counts. A cache folder from an older version (one JSON
file per entry) is imported into the store on first use, then those files are removed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from embed_assets.kvstore import KVStore
from embed_assets.records import QARecord

#: The store's file inside the cache folder.
STORE_FILE = "sdg.sqlite"
_RECORDS, _RAW = "records:", "raw:"


class SDGCache:
    """QA records per generation unit and raw JSON answers, by content key and generator fingerprint."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.store = KVStore(self.root / STORE_FILE)
        self._import_legacy_files()

    def close(self) -> None:
        self.store.close()

    def get(self, key: str, fingerprint: str) -> list[QARecord] | None:
        """Return the cached records for ``key`` or ``None`` when absent (or unreadable)."""
        return self.get_many([key], fingerprint).get(key)

    def get_many(self, keys: Iterable[str], fingerprint: str) -> dict[str, list[QARecord]]:
        """The cached records of those ``keys`` that are present, in one lookup."""
        found: dict[str, list[QARecord]] = {}
        for key, value in self.store.get_many(_RECORDS + fingerprint, keys).items():
            try:
                found[key] = [QARecord.from_dict(r) for r in value["records"]]
            except (KeyError, TypeError, ValueError):
                continue  # an entry of an older format: a miss, rewritten by the caller
        return found

    def put(self, key: str, fingerprint: str, records: list[QARecord]) -> None:
        """Store records for ``key`` (committed at once)."""
        self.store.put(_RECORDS + fingerprint, key, {"records": [r.to_dict() for r in records]})

    def get_json(self, key: str, fingerprint: str = "") -> dict[str, Any] | None:
        """Return a raw JSON entry stored by :meth:`put_json`, or ``None`` when absent (or unreadable).

        Args:
            key: Content-derived key of the entry.
            fingerprint: Optional second key part (e.g. a prompt/model hash).

        Returns:
            The stored payload.
        """
        payload = self.store.get(_RAW + fingerprint, key)
        return payload if isinstance(payload, dict) else None

    def put_json(self, key: str, fingerprint: str, payload: dict[str, Any]) -> None:
        """Store a JSON-serializable ``payload`` (committed at once).

        Args:
            key: Content-derived key of the entry.
            fingerprint: Optional second key part.
            payload: The object to store; a ``chunk_ids`` list in it ties it to chunks for :meth:`evict`.
        """
        self.store.put(_RAW + fingerprint, key, payload)

    def records(self) -> list[QARecord]:
        """Every cached record (any unit, any fingerprint): what a run stored, for inspection."""
        return [QARecord.from_dict(r) for _, _, v in self.store.items(_RECORDS) for r in v.get("records", [])]

    def raw_entries(self) -> list[dict[str, Any]]:
        """Every raw JSON payload (any fingerprint)."""
        return [v for _, _, v in self.store.items(_RAW) if isinstance(v, dict)]

    def evict(self, live_unit_keys: Iterable[str], live_chunk_ids: Iterable[str]) -> int:
        """Remove entries no live chunk uses: record entries of units that no longer exist (under any
        fingerprint: a unit key is a hash of its chunks' content) and raw entries tied to a chunk that is gone.

        Args:
            live_unit_keys: The unit keys of the current corpus (streamed into SQLite, not held in a set).
            live_chunk_ids: The chunk ids of the current corpus (read only when raw entries exist).

        Returns:
            How many entries were removed.
        """
        gone = self.store.evict(_RECORDS, live_unit_keys, prefix=True)
        if self.store.has(_RAW):  # the chunk ids are only read when an entry could refer to them
            gone += self.store.evict_referencing(_RAW, "chunk_ids", live_chunk_ids)
        return gone

    def _import_legacy_files(self) -> None:
        """Move entries of the one-file-per-entry layout (``<2 hex>/<sha256>.json``) into the store."""
        files: Sequence[Path] = sorted(self.root.glob("[0-9a-f][0-9a-f]/*.json"))
        for path in files:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                key, fp = data["key"], data.get("fingerprint", "")
                if "records" in data:
                    self.store.put(_RECORDS + fp, key, {"records": data["records"]})
                elif isinstance(data.get("payload"), dict):
                    self.store.put(_RAW + fp, key, data["payload"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: dropped (a miss the next run fills)
            path.unlink(missing_ok=True)
        for folder in {p.parent for p in files}:
            with contextlib.suppress(OSError):  # not empty: something else lives there
                folder.rmdir()
