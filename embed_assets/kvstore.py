"""A content-addressed key-value store in one SQLite file (caches that must not become a file per entry).

Custom over the standard library's ``sqlite3`` because the caches need exactly this: many small JSON values
looked up in bulk by content hash, each write committed at once (a killed process keeps what it finished),
readable while another process writes (WAL), and evictable down to the keys a run still uses — one file
instead of one per entry, and nothing to install.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: SQLite's default limit of bound parameters is 999 on old builds: look keys up in slices of this size.
_SLICE = 500


class KVStore:
    """``(namespace, key) -> JSON value`` in one SQLite file.

    A namespace separates entries made under different settings (e.g. a fingerprint of the chunking settings
    and the tokenizer), so changing a setting never returns a stale value. One connection per store, shared
    by threads under a lock; every write is its own committed transaction. ``synchronous=NORMAL`` in WAL mode
    survives a killed process (not a power cut, which costs at most the last commits of a cache).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
            "PRIMARY KEY (ns, key)) WITHOUT ROWID"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_many(self, namespace: str, keys: Iterable[str]) -> dict[str, Any]:
        """The stored values of those ``keys`` that are present (an undecodable value counts as absent)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock:
            for i in range(0, len(wanted), _SLICE):
                part = wanted[i : i + _SLICE]
                rows = self._db.execute(
                    f"SELECT key, value FROM entries WHERE ns = ? AND key IN ({','.join('?' * len(part))})",
                    [namespace, *part],
                ).fetchall()
                for k, v in rows:
                    try:
                        found[k] = json.loads(v)
                    except json.JSONDecodeError:
                        continue  # damaged by hand or by a disk error: a miss, rewritten by the caller
        return found

    def get(self, namespace: str, key: str) -> Any | None:
        """One value, or ``None`` when absent."""
        return self.get_many(namespace, [key]).get(key)

    def put_many(self, namespace: str, items: Mapping[str, Any]) -> None:
        """Store (or replace) values, all in one transaction."""
        if not items:
            return
        rows = [(namespace, k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO entries (ns, key, value) VALUES (?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put(self, namespace: str, key: str, value: Any) -> None:
        """Store (or replace) one value."""
        self.put_many(namespace, {key: value})

    def items(self, namespace_prefix: str = "") -> Iterator[tuple[str, str, Any]]:
        """``(namespace, key, value)`` of every entry whose namespace starts with ``namespace_prefix``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ns, key, value FROM entries WHERE substr(ns, 1, ?) = ?",
                [len(namespace_prefix), namespace_prefix],
            ).fetchall()
        for ns, key, value in rows:
            try:
                yield ns, key, json.loads(value)
            except json.JSONDecodeError:
                continue

    def evict(self, namespace: str, keep: Iterable[str], *, prefix: bool = False) -> int:
        """Delete the namespace's entries whose key is not in ``keep``; returns how many went.

        Args:
            namespace: The namespace (with ``prefix``: every namespace starting with it).
            keep: The live keys; consumed as a stream into a temporary table, never held in a Python set.
            prefix: Treat ``namespace`` as a prefix.
        """
        where = "substr(ns, 1, ?) = ?" if prefix else "ns = ?"
        params = [len(namespace), namespace] if prefix else [namespace]
        return self._delete_with_keep(
            keep, f"DELETE FROM entries WHERE {where} AND key NOT IN (SELECT key FROM keep)", params
        )

    def evict_referencing(self, namespace_prefix: str, field: str, keep: Iterable[str]) -> int:
        """Delete the entries (of every namespace starting with ``namespace_prefix``) whose JSON list ``field``
        names a value not in ``keep`` (e.g. an answer tied to chunks of which one is gone).

        Args:
            namespace_prefix: Which namespaces.
            field: A top-level key of the values holding a list of strings.
            keep: The live values; streamed into a temporary table.

        Returns:
            How many entries went.
        """
        return self._delete_with_keep(
            keep,
            "DELETE FROM entries WHERE substr(ns, 1, ?) = ? AND json_valid(value) AND EXISTS ("
            "SELECT 1 FROM json_each(entries.value, ?) AS j WHERE j.value NOT IN (SELECT key FROM keep))",
            [len(namespace_prefix), namespace_prefix, f"$.{field}"],
        )

    def has(self, namespace_prefix: str) -> bool:
        """Whether any entry's namespace starts with ``namespace_prefix``."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM entries WHERE substr(ns, 1, ?) = ? LIMIT 1",
                [len(namespace_prefix), namespace_prefix],
            ).fetchone()
        return row is not None

    def _delete_with_keep(self, keep: Iterable[str], sql: str, params: list[Any]) -> int:
        """Run a ``DELETE`` that refers to the temporary table ``keep`` filled from ``keep``, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("CREATE TEMP TABLE IF NOT EXISTS keep (key TEXT PRIMARY KEY)")
                self._db.execute("DELETE FROM keep")
                self._db.executemany("INSERT OR IGNORE INTO keep VALUES (?)", ((k,) for k in keep))
                cursor = self._db.execute(sql, params)
                self._db.execute("DELETE FROM keep")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return cursor.rowcount

    def count(self, namespace: str | None = None) -> int:
        """Entries in one namespace (or in all)."""
        with self._lock:
            if namespace is None:
                return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM entries WHERE ns = ?", [namespace]).fetchone()[0]
