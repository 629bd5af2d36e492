"""A content-addressed key-value store in one SQLite file (caches that must not become a file per entry).

Custom over the standard library's ``sqlite3`` because the caches need exactly this: many small JSON values
looked up in bulk by content hash, written in one transaction per stage run, readable while another process
writes (WAL), and evictable down to the keys a run still uses — one file instead of one per entry, and
nothing to install.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

#: SQLite's default limit of bound parameters is 999 on old builds: look keys up in slices of this size.
_SLICE = 500


class KVStore:
    """``(namespace, key) -> JSON value`` in one SQLite file.

    A namespace separates entries made under different settings (e.g. a fingerprint of the chunking settings
    and the tokenizer), so changing a setting never returns a stale value.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
                "PRIMARY KEY (ns, key)) WITHOUT ROWID"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get_many(self, namespace: str, keys: Iterable[str]) -> dict[str, Any]:
        """The stored values of those ``keys`` that are present."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with closing(self._connect()) as db:
            for i in range(0, len(wanted), _SLICE):
                part = wanted[i : i + _SLICE]
                rows = db.execute(
                    f"SELECT key, value FROM entries WHERE ns = ? AND key IN ({','.join('?' * len(part))})",
                    [namespace, *part],
                )
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put_many(self, namespace: str, items: Mapping[str, Any]) -> None:
        """Store (or replace) values, all in one transaction."""
        if not items:
            return
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO entries (ns, key, value) VALUES (?, ?, ?)",
                [(namespace, k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()],
            )

    def evict(self, namespace: str, keep: Iterable[str]) -> int:
        """Delete the namespace's entries whose key is not in ``keep``; returns how many went."""
        with closing(self._connect()) as db, db:
            db.execute("CREATE TEMP TABLE keep (key TEXT PRIMARY KEY)")
            db.executemany("INSERT OR IGNORE INTO keep VALUES (?)", [(k,) for k in keep])
            cursor = db.execute(
                "DELETE FROM entries WHERE ns = ? AND key NOT IN (SELECT key FROM keep)", [namespace]
            )
            return cursor.rowcount

    def count(self, namespace: str | None = None) -> int:
        """Entries in one namespace (or in all)."""
        with closing(self._connect()) as db:
            if namespace is None:
                return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return db.execute("SELECT COUNT(*) FROM entries WHERE ns = ?", [namespace]).fetchone()[0]
