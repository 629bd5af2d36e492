"""Artifact I/O: atomic writes, JSON Lines and Parquet helpers.

Every artifact is written to a temporary sibling and renamed into place, so an interrupted write never
leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _writer_pid(tmp: Path, final: Path) -> int | None:
    """The PID that :func:`atomic_path` put in a temporary's name (``.<name>.<pid>.<random>.tmp``)."""
    pid = tmp.name[len(final.name) + 2 :].split(".", 1)[0]
    return int(pid) if pid.isdigit() else None


def collect_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what writers killed mid-write (SIGKILL skips their cleanup) left next to ``path``.

    A temporary folder ``.<name>.<pid>.*.tmp`` is stale when the process ``pid`` is gone. If the kill came
    between moving the previous version of a folder aside and moving the new one in, ``path`` is missing and
    the previous version is put back first, so nothing is lost.

    Args:
        path: Final location of an artifact.

    Returns:
        The temporary folders removed.
    """
    final = Path(path)
    removed: list[Path] = []
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = _writer_pid(tmp, final)
        if pid is None:
            continue  # not one of ours
        from embed_assets.serving.process import is_alive  # only when there is a candidate

        if is_alive(pid):
            continue
        previous = tmp / f"{final.name}.previous"
        if previous.exists() and not final.exists():
            os.replace(previous, final)
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    Works for files and directories. On error the temporary is removed and ``path`` is untouched. Leftovers of
    writers that were killed (see :func:`collect_stale_temporaries`) are collected first.

    Args:
        path: Final location of the artifact.

    Yields:
        A temporary path in the same directory to write to.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    collect_stale_temporaries(final)
    # The writer's PID in the name lets a later write tell a killed writer's leftovers from a live one's.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            # A folder cannot be renamed over another: move the old one aside (into tmp, removed below) and
            # put it back if the new one cannot be moved in, so the previous version is never lost.
            # (Deleting it first would leave nothing at ``path`` when interrupted during the deletion.)
            old = tmp / f"{final.name}.previous"
            os.replace(final, old)
            try:
                os.replace(target, final)
            except BaseException:
                os.replace(old, final)
                raise
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dedupe_file(path: str | os.PathLike[str], objects: str | os.PathLike[str]) -> bool:
    """Make ``path`` a hard link to the object of the same content in ``objects`` (content-addressed storage).

    The first file with some content becomes the object (a second link, no copy); a later file with the same
    bytes is replaced, atomically, by a link to it, so an unchanged output of a re-run costs no disk. Safe
    because artifacts are never modified in place (every write renames a new file over the old one).

    Args:
        path: A finished artifact file.
        objects: The object folder (``<sha256>.<suffix>`` files).

    Returns:
        Whether an earlier identical file was found (this one's bytes were freed).
    """
    import hashlib

    final = Path(path)
    digest = hashlib.sha256()
    with final.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    obj = Path(objects) / f"{digest.hexdigest()}{final.suffix}"
    obj.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not obj.exists():
            os.link(final, obj)
            return False
        if os.path.samefile(obj, final):
            return True
        link = final.with_name(f".{final.name}.{os.getpid()}.link")
        os.link(obj, link)
        os.replace(link, final)
        return True
    except OSError:
        return False  # no hard links on this filesystem (or across two): the file stays a copy


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as pretty JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Atomically write rows as JSON Lines.

    Returns:
        The number of rows written.
    """
    with jsonl_writer(path) as write:
        return write(rows)


@contextmanager
def jsonl_writer(path: str | os.PathLike[str]) -> Iterator[Callable[[Iterable[dict[str, Any]]], int]]:
    """Write JSON Lines in several calls, atomically: the file appears when the block ends without error.

    Yields:
        ``write(rows) -> number of rows written``.
    """
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:

        def write(rows: Iterable[dict[str, Any]]) -> int:
            n = 0
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            return n

        yield write


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Stream JSON Lines, one row at a time; a malformed or non-UTF-8 line raises ``ValueError`` naming the file
    and line."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read JSON Lines (all rows; :func:`iter_jsonl` streams them)."""
    return list(iter_jsonl(path))


def write_parquet(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Atomically write rows (dicts with the same keys) as a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    return Path(path)


def read_parquet(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
