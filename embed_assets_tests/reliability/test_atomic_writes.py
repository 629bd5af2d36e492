"""Interrupted writes never leave a half-written artifact at the final path, and the previous version stays."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from embed_assets.records import QARecord
from embed_assets.sdg.cache import STORE_FILE, SDGCache
from embed_assets.storage import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from embed_assets_tests.reliability.conftest import Children, wait_for

V1 = [{"i": i, "version": 1} for i in range(3)]


def leftovers(folder: Path, name: str) -> list[str]:
    """Temporary siblings ``.<name>.*.tmp`` that atomic_path uses."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp")
    )


def test_exception_inside_atomic_path_keeps_the_previous_file(tmp_path: Path) -> None:
    final = tmp_path / "manifest.json"
    write_json(final, {"version": 1})
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(final) as tmp:
        tmp.write_text('{"version": 2, "trunc')
        raise RuntimeError("disk on fire")
    assert read_json(final) == {"version": 1}
    assert leftovers(tmp_path, "manifest.json") == []


def test_exception_half_way_through_write_jsonl_keeps_the_previous_file(tmp_path: Path) -> None:
    final = tmp_path / "qa.jsonl"
    write_jsonl(final, V1)

    def rows():
        yield {"i": 0, "version": 2}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_jsonl(final, rows())
    assert read_jsonl(final) == V1
    assert leftovers(tmp_path, "qa.jsonl") == []


def test_failed_directory_swap_keeps_the_previous_directory(tmp_path: Path, monkeypatch) -> None:
    """A folder artifact (a model, an ONNX export) is replaced by renames; if moving the new one in fails, the
    old one is put back. (It used to be deleted first, so an interruption there left no model at all.)"""
    final = tmp_path / "model"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"v1" * 1000)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name == "model" and Path(dst) == final:  # the new folder moving into place
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr("embed_assets.storage.os.replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"), atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"v2" * 1000)
    monkeypatch.undo()
    assert (final / "weights.bin").read_bytes() == b"v1" * 1000
    assert sorted(p.name for p in final.iterdir()) == ["weights.bin"]
    assert leftovers(tmp_path, "model") == []

    with atomic_path(final) as tmp:  # and a later write replaces it normally
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"v3")
    assert (final / "weights.bin").read_bytes() == b"v3" and leftovers(tmp_path, "model") == []


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_large_jsonl_write(tmp_path: Path, children: Children) -> None:
    final = tmp_path / "big.jsonl"
    write_jsonl(final, V1)
    before = final.read_bytes()
    proc = children.start("write", str(final), "3000")  # 3000 rows of 10 KB, written slowly

    def partial_size() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob(".big.jsonl.*.tmp/big.jsonl"))

    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    wait_for(lambda: partial_size() > 200_000 or proc.poll() is not None, 60, "200 KB written")
    assert proc.poll() is None, children.log(proc)
    children.kill(proc)
    assert proc.returncode == -signal.SIGKILL

    assert final.read_bytes() == before  # the previous version, byte for byte
    assert read_jsonl(final) == V1
    # SIGKILL skips the cleanup: the half-written temporary stays, hidden, next to the artifact (never read)
    assert len(leftovers(tmp_path, "big.jsonl")) == 1 and partial_size() > 200_000
    # The next write is unaffected, and collects the dead writer's temporary.
    write_jsonl(final, [{"version": 3}])
    assert read_jsonl(final) == [{"version": 3}]
    assert leftovers(tmp_path, "big.jsonl") == []


def test_a_folder_swap_killed_half_way_is_recovered_by_the_next_write(tmp_path: Path) -> None:
    """Killed after moving the old folder aside and before moving the new one in: the next write puts the old
    version back before anything else, so even a failing next write leaves it in place."""
    import subprocess

    final = tmp_path / "model"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"v1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".model.{dead.pid}.killed.tmp"  # what the killed writer left: its half-swapped state
    stale.mkdir()
    os.replace(final, stale / "model.previous")
    (stale / "model").mkdir()
    alive = tmp_path / f".model.{os.getpid()}.busy.tmp"  # a live writer's temporary is left alone
    alive.mkdir()

    with pytest.raises(RuntimeError, match="crash"), atomic_path(final):
        raise RuntimeError("crash")
    assert (final / "weights.bin").read_bytes() == b"v1"
    assert leftovers(tmp_path, "model") == [alive.name]


def test_corrupt_cache_entry_is_a_miss_and_is_rewritten(tmp_path: Path) -> None:
    cache = SDGCache(tmp_path)
    record = QARecord(qa_id="a", query="q", positive_chunk_ids=["c"], doc_id="d")
    cache.put("unit:1", "fp", [record])
    with sqlite3.connect(tmp_path / STORE_FILE) as db:  # e.g. a value damaged by a disk error
        n = db.execute(
            "UPDATE entries SET value = ? WHERE key = 'unit:1'", ['{"records": [{"qa_id"']
        ).rowcount
    assert n == 1
    assert cache.get("unit:1", "fp") is None
    cache.put("unit:1", "fp", [record])
    assert cache.get("unit:1", "fp") == [record]


def test_a_cache_of_the_file_per_entry_layout_is_imported_once(tmp_path: Path) -> None:
    record = QARecord(qa_id="a", query="q", positive_chunk_ids=["c"], doc_id="d")
    legacy = tmp_path / "ab" / ("ab" + "0" * 62 + ".json")
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"key": "unit:1", "fingerprint": "fp", "records": [record.to_dict()]}))
    broken = legacy.with_name("ab" + "1" * 62 + ".json")
    broken.write_text('{"key": "unit:2", "rec')  # half-written by a killed writer of that version
    cache = SDGCache(tmp_path)
    assert cache.get("unit:1", "fp") == [record] and cache.get("unit:2", "fp") is None
    assert not (tmp_path / "ab").exists() and sorted(p.name for p in tmp_path.iterdir())[0] == STORE_FILE
