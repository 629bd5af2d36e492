from __future__ import annotations

import os
from pathlib import Path

from embed_assets.retention import RetentionSettings, collect_garbage, main
from embed_assets.stages.common import ModelSpec, StageContext, manifest_file, read_manifest, write_manifest
from embed_assets.stages.ingest import ChunkSettings, CorpusSettings, chunk_documents, read_documents


def _materialize(root: Path, run_id: str, corpus: Path, age_s: float) -> None:
    """The corpus and chunks stages as a run would materialize them (manifests as the IO manager stores them)."""
    ctx = StageContext(root, run_id)
    docs = read_documents(CorpusSettings(path=str(corpus)), ctx)
    chunks = chunk_documents(docs, ChunkSettings(), ModelSpec(), ctx)
    for asset, manifest in (("corpus", docs), ("corpus_chunks", chunks)):
        write_manifest(manifest, manifest_file(root, asset))
        run_dir = root / asset / run_id
        os.utime(run_dir, (run_dir.stat().st_atime - age_s, run_dir.stat().st_mtime - age_s))


def test_gc_removes_old_runs_and_keeps_live_and_recent(tmp_path: Path, tiny_corpus: Path) -> None:
    root = (tmp_path / "artifacts").resolve()
    edited = sorted(tiny_corpus.iterdir())[0]
    for i, run in enumerate(["r1", "r2", "r3", "r4"]):
        with edited.open("a", encoding="utf-8") as f:  # each run sees other content: its own objects
            f.write(f"\nAnother sentence was added before run number {i} of this corpus.\n")
        _materialize(root, run, tiny_corpus, age_s=(4 - i) * 7200)  # r1 oldest ... r4 newest (2 h old)
    before = sorted(p.name for p in (root / "corpus").iterdir())

    dry = collect_garbage(root, RetentionSettings(keep_runs=1, dry_run=True))
    assert dry.removed and sorted(p.name for p in (root / "corpus").iterdir()) == before  # nothing removed

    report = collect_garbage(root, RetentionSettings(keep_runs=1))
    assert sorted(Path(p).name for p in report.removed) == ["r1", "r1", "r2", "r2", "r3", "r3"]
    assert report.freed_bytes > 0 and report.removed == dry.removed
    assert report.objects_removed == 9  # documents.jsonl, index.parquet, chunks.parquet of r1-r3: unlinked
    assert len(list((root / "objects").iterdir())) == 3
    for asset in ("corpus", "corpus_chunks"):
        assert [p.name for p in (root / asset).iterdir()] == ["r4"]
        manifest = read_manifest(manifest_file(root, asset))  # the latest still loads, its files exist
        assert Path(manifest.path).is_file()
    assert (root / "cache" / "chunks" / "chunks.sqlite").is_file()  # caches untouched


def test_gc_keeps_a_folder_a_live_manifest_names_even_when_old(tmp_path: Path, tiny_corpus: Path) -> None:
    """The latest manifest points at an old run (e.g. a re-run that reused it): that run stays."""
    root = (tmp_path / "artifacts").resolve()
    _materialize(root, "old", tiny_corpus, age_s=10 * 3600)
    live = manifest_file(root, "corpus").read_text()
    _materialize(root, "new", tiny_corpus, age_s=2 * 3600)
    manifest_file(root, "corpus").write_text(live)  # corpus's latest manifest names the old run
    report = collect_garbage(root, RetentionSettings(keep_runs=0))
    assert sorted(p.name for p in (root / "corpus").iterdir()) == ["old"]
    assert sorted(p.name for p in (root / "corpus_chunks").iterdir()) == ["new"]
    assert str(root / "corpus" / "old") in report.kept_live


def test_gc_cli_reports(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    root = (tmp_path / "artifacts").resolve()
    _materialize(root, "a", tiny_corpus, age_s=5 * 3600)
    _materialize(root, "b", tiny_corpus, age_s=0)  # young: kept although keep_runs is 0
    _materialize(root, "c", tiny_corpus, age_s=-60)  # the latest: live
    assert main(["--root", str(root), "--keep-runs", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {root / 'corpus' / 'a'}" in out
    assert "would remove 2 run folders" in out and "kept 2 live and 2 recent" in out
    assert (root / "corpus" / "a").is_dir()  # a dry run
    assert main(["--root", str(root), "--keep-runs", "0"]) == 0
    assert sorted(p.name for p in (root / "corpus").iterdir()) == ["b", "c"]


def test_an_unchanged_rerun_adds_no_disk(tmp_path: Path, tiny_corpus: Path) -> None:
    root = (tmp_path / "artifacts").resolve()
    _materialize(root, "first", tiny_corpus, age_s=0)
    _materialize(root, "again", tiny_corpus, age_s=0)
    for asset, name in (("corpus", "documents.jsonl"), ("corpus_chunks", "chunks.parquet")):
        first, again = (root / asset / run / name for run in ("first", "again"))
        assert first.read_bytes() and first.samefile(again)  # one file, linked twice (and from objects/)
        assert again.stat().st_nlink == 3
    # a run folder's removal leaves the other's file intact
    report = collect_garbage(root, RetentionSettings(keep_runs=0, min_age_hours=0))
    assert report.objects_removed == 0
    assert all(p.stat().st_nlink == 2 for p in (root / "objects").iterdir())
