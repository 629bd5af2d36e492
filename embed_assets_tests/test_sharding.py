"""Sharded chunking: shards are separate steps that run in parallel, their result equals the unsharded run, and
a change in one document re-runs only its shard."""

# No "from __future__ import annotations": the job factory below is loaded by Dagster's reconstruction.

import itertools
import json
import shutil
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from embed_assets.definitions import pipeline_resources
from embed_assets.defs.ingest import corpus, corpus_chunks
from embed_assets.defs.jobs import build_executor
from embed_assets.defs.resources import ArtifactStore
from embed_assets.stages.common import ModelSpec, StageContext
from embed_assets.stages.ingest import (
    SAMPLE_CORPUS,
    ChunkSettings,
    CorpusSettings,
    chunk_documents,
    finish_shards,
    merge_shards,
    pending_shards,
    plan_shards,
    read_documents,
    shard_of,
)

DOCS_PER_SHARD = 7  # the sample corpus's 28 documents in 4 shards (or 3: the hash decides who goes where)
COPIES = 40


def _corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    shutil.copytree(Path(SAMPLE_CORPUS) / "python-reference", folder)
    return folder


def _chunk(folder: Path, root: Path, previous=None, **settings) -> tuple:
    ctx = StageContext.local(root)
    scanned = read_documents(CorpusSettings(path=str(folder)), ctx)
    return chunk_documents(scanned, ChunkSettings(**settings), ModelSpec(), ctx, previous), scanned


def test_shards_are_stable_and_equal_the_unsharded_run(tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    whole, scanned = _chunk(folder, tmp_path / "one", documents_per_shard=10_000)
    sharded, _ = _chunk(folder, tmp_path / "many", documents_per_shard=DOCS_PER_SHARD)
    assert (whole.shards, sharded.shards) == (1, 4)
    assert pq.read_table(sharded.path).to_pylist() == pq.read_table(whole.path).to_pylist()
    assert sharded.data_version == whole.data_version and sharded.n_chunks == whole.n_chunks > 0

    plans = plan_shards(scanned, ChunkSettings(documents_per_shard=DOCS_PER_SHARD), ModelSpec())
    assert sorted(d for p in plans for d in p.doc_ids) == sorted(d for d, _ in scanned.index())
    # a shard step reads only its documents' lines, at their byte offsets
    with open(scanned.path, "rb") as f:
        for p in plans:
            for offset, doc_id in zip(p.offsets, p.doc_ids, strict=True):
                f.seek(offset)
                assert json.loads(f.readline())["doc_id"] == doc_id
    assert len(scanned.documents) == 10 < scanned.n_docs  # the manifest lists a preview, the index all

    # an unchanged re-run reads and writes no passage: the last run's file is this run's
    same, _ = _chunk(folder, tmp_path / "many", sharded, documents_per_shard=DOCS_PER_SHARD)
    assert same.path == sharded.path and same.shards_unchanged == 4 and same.documents_chunked == 0
    assert same.unchanged_since_last_run == same.n_chunks == sharded.n_chunks
    assert all(shard_of(d, 4) == p.index for p in plans for d in p.doc_ids)

    # an edit to one document re-cuts only its shard; the others' outputs are used as they are
    edited = folder / "power.txt"
    edited.write_text(edited.read_text() + "\nChained power operators group from the right.\n")
    again, _ = _chunk(folder, tmp_path / "many", sharded, documents_per_shard=DOCS_PER_SHARD)
    assert (again.shards_unchanged, again.documents_chunked) == (3, 1)
    # the edited shard re-read only the edited document: the others' rows came from its last output
    assert again.documents_from_shard_output == again.n_docs - 1
    fresh, _ = _chunk(folder, tmp_path / "fresh", documents_per_shard=DOCS_PER_SHARD)
    assert pq.read_table(again.path).to_pylist() == pq.read_table(fresh.path).to_pylist()
    assert fresh.documents_from_shard_output == 0
    assert again.unchanged_since_last_run >= again.n_chunks - 2  # the rest kept its chunk ids
    # and the cache of shard outputs holds the live shards only
    assert len(list((tmp_path / "many" / "cache" / "chunk_shards").glob("*.parquet"))) == 4

    # a removed and an added document: still the passages a fresh run cuts, in corpus order
    (folder / "power.txt").unlink()
    (folder / "zz-new.txt").write_text(
        "A new page about the walrus operator. It binds a name in an expression.\n"
    )
    moved, _ = _chunk(folder, tmp_path / "many", again, documents_per_shard=DOCS_PER_SHARD)
    fresh, _ = _chunk(folder, tmp_path / "fresh-2", documents_per_shard=DOCS_PER_SHARD)
    assert pq.read_table(moved.path).to_pylist() == pq.read_table(fresh.path).to_pylist()
    assert moved.documents_chunked == 1 and moved.n_docs == again.n_docs


def test_a_shard_with_few_changes_is_cut_in_the_merge_step(tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    root = tmp_path / "many"
    ctx, model = StageContext.local(root), ModelSpec()
    first, _ = _chunk(folder, root, documents_per_shard=DOCS_PER_SHARD)
    edited = folder / "power.txt"
    edited.write_text(edited.read_text() + "\nChained power operators group from the right.\n")
    scanned = read_documents(CorpusSettings(path=str(folder)), ctx)
    for min_changed, stepped in ((0, 1), (1, 0)):  # one edited document: more than 0, not more than 1
        settings = ChunkSettings(documents_per_shard=DOCS_PER_SHARD, step_min_changed_documents=min_changed)
        plans = plan_shards(scanned, settings, model)
        pending = pending_shards(plans, settings, model, ctx)
        assert [p.index for p in pending] == [shard_of("power.txt", 4)][:stepped]
    # a first run: every document of every shard is new, so each shard is a step
    fresh_ctx = StageContext.local(tmp_path / "fresh")
    assert len(pending_shards(plans, settings, model, fresh_ctx)) == len(plans) == 4

    # the merge step cuts the shard no step did, and says so
    shards = finish_shards(scanned, plans, [], settings, model, ctx)
    assert [s.cut_in_merge for s in shards] == [s.index == shard_of("power.txt", 4) for s in shards]
    merged = merge_shards(scanned, shards, settings, model, ctx, first)
    assert (merged.shards_cut_in_merge, merged.shards_unchanged, merged.documents_chunked) == (1, 3, 1)
    fresh, _ = _chunk(folder, tmp_path / "fresh", documents_per_shard=DOCS_PER_SHARD)
    assert pq.read_table(merged.path).to_pylist() == pq.read_table(fresh.path).to_pylist()
    assert fresh.shards_cut_in_merge == 0


def test_the_merge_streams_windows_and_keeps_each_text_once(tmp_path: Path, monkeypatch) -> None:
    import embed_assets.stages.ingest as ingest

    folder = _corpus(tmp_path)
    # two copies of a document under other names: their passages are dropped wherever their shards are
    for name in ("aaa-copy.txt", "zzz-copy.txt"):
        shutil.copy(folder / "power.txt", folder / name)
    whole, scanned = _chunk(folder, tmp_path / "one", documents_per_shard=10_000)
    monkeypatch.setattr(ingest, "MERGE_WINDOW_ROWS", 5)  # many windows, each cutting through shards
    sharded, _ = _chunk(folder, tmp_path / "many", documents_per_shard=DOCS_PER_SHARD)
    rows = pq.read_table(sharded.path).to_pylist()
    assert rows == pq.read_table(whole.path).to_pylist() and sharded.shards == 5
    assert len({r["chunk_id"] for r in rows}) == len(rows) == sharded.n_chunks
    assert (
        sharded.duplicates_dropped
        == whole.duplicates_dropped
        >= 2 * sum(r["doc_id"] == "power.txt" for r in rows)
    )
    # the first document in corpus order keeps the text: the copy named aaa-copy.txt sorts before power.txt
    assert not any(r["doc_id"] in ("power.txt", "zzz-copy.txt") for r in rows)
    assert [r["doc_id"] for r in rows] == sorted(
        (r["doc_id"] for r in rows), key=[d for d, _ in scanned.index()].index
    )
    assert sharded.preview == rows[:10] and sharded.tokens_max == max(r["n_tokens"] for r in rows)


def sharded_chunks_job() -> dg.JobDefinition:  # module level: the multiprocess executor reconstructs it
    job = dg.define_asset_job(
        "sharded_chunks", selection=["corpus", "corpus_chunks"], executor_def=build_executor("multiprocess")
    )
    return dg.Definitions(
        assets=[corpus, corpus_chunks], jobs=[job], resources=pipeline_resources(ArtifactStore())
    ).resolve_job_def("sharded_chunks")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shards_run_as_parallel_steps_under_the_multiprocess_executor(tmp_path: Path, monkeypatch) -> None:
    # 40 variants of each sample document: shards of 280 documents take a second or more each, long enough
    # for the executor's two slots to run two of them at once (7-document shards end before the next starts)
    folder = _corpus(tmp_path)
    for doc in sorted(folder.glob("*.txt")):
        for i in range(1, COPIES):
            text = doc.read_text(encoding="utf-8")
            (folder / f"{doc.stem}-{i:02d}.txt").write_text(
                f"{text}\nVariant {i} of this page adds one sentence of its own.\n", encoding="utf-8"
            )
    monkeypatch.setenv("EMBED_ASSETS_HOME", str(tmp_path / "artifacts"))  # the step processes inherit it
    (tmp_path / "home").mkdir()
    instance = dg.DagsterInstance.local_temp(
        str(tmp_path / "home"), overrides={"telemetry": {"enabled": False}}
    )
    run_config = {
        "ops": {
            "corpus": {"config": {"path": str(folder)}},
            # every shard a step (the hash gives some shards fewer documents than the default's minimum)
            "corpus_chunks": {
                "config": {"documents_per_shard": DOCS_PER_SHARD * COPIES, "step_min_changed_documents": 0}
            },
        }
    }
    result = dg.execute_job(dg.reconstructable(sharded_chunks_job), instance=instance, run_config=run_config)
    assert result.success

    starts, ends, pids = {}, {}, {}
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None or not (entry.step_key or "").startswith("corpus_chunks.chunk_corpus_shard["):
            continue
        if event.event_type_value == "STEP_START":
            starts[entry.step_key], pids[entry.step_key] = entry.timestamp, event.pid
        elif event.event_type_value == "STEP_SUCCESS":
            ends[entry.step_key] = entry.timestamp
    assert sorted(starts) == [f"corpus_chunks.chunk_corpus_shard[shard_{i:03d}]" for i in range(4)]
    assert len(set(pids.values())) == 4  # a process per shard
    # at least two shards ran at the same time (the executor runs two steps at once)
    spans = sorted((starts[k], ends[k]) for k in starts)
    assert any(b_start < a_end for (_, a_end), (b_start, _) in itertools.pairwise(spans)), spans

    meta = _chunk_meta(instance)
    assert meta["shards"] == 4 and meta["shards_unchanged"] == 0
    whole, _ = _chunk(folder, tmp_path / "unsharded", documents_per_shard=10_000)
    assert meta["chunks"] == whole.n_chunks
    assert pq.read_table(meta["artifact_path"]).to_pylist() == pq.read_table(whole.path).to_pylist()

    # a change in one document re-cuts only its shard: in the merge step by default (one document does not
    # pay for a step's start), in a step of its own when every change gets one; nothing changed: neither
    edited = folder / "power.txt"
    chunking = {"documents_per_shard": DOCS_PER_SHARD * COPIES}
    for min_changed, sentence, expected_steps, unchanged, in_merge in (
        (None, "Chained power operators group from the right.", 0, 3, 1),
        (0, "A negative exponent gives a float.", 1, 3, 0),
        (0, None, 0, 4, 0),
    ):
        if sentence:
            edited.write_text(edited.read_text() + f"\n{sentence}\n")
        extra = {} if min_changed is None else {"step_min_changed_documents": min_changed}
        config = {"ops": {**run_config["ops"], "corpus_chunks": {"config": {**chunking, **extra}}}}
        again = dg.execute_job(dg.reconstructable(sharded_chunks_job), instance=instance, run_config=config)
        assert again.success
        steps = {e.step_key for e in instance.all_logs(again.run_id) if e.step_key}
        shard_steps = [k for k in steps if k.startswith("corpus_chunks.chunk_corpus_shard[")]
        assert len(shard_steps) == expected_steps and "corpus_chunks.merge_chunk_shards" in steps
        meta = _chunk_meta(instance)
        assert (meta["shards_unchanged"], meta["shards_cut_in_merge_step"]) == (unchanged, in_merge)
    assert _chunk_meta(instance)["chunks"] >= whole.n_chunks


def _chunk_meta(instance: dg.DagsterInstance) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey("corpus_chunks"))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_an_unchanged_step_output_is_stored_once(tmp_path: Path) -> None:
    from embed_assets.defs.common import ManifestIOManager
    from embed_assets.stages.ingest import ShardPlan, ShardPlanSet

    io = ManifestIOManager(store=ArtifactStore(root=str(tmp_path)))
    plan = ShardPlanSet([ShardPlan(0, 1, "f0", ["a.txt", "b.txt"], [0, 1], [0, 10], ["h1", "h2"])])
    paths = []
    for run_id, value in (("run-1", plan), ("run-2", plan), ("run-3", ShardPlanSet([]))):
        context = dg.build_output_context(
            step_key="corpus_chunks.plan_chunk_shards", name="plan", run_id=run_id
        )
        io.handle_output(context, value)
        paths.append(tmp_path / "steps" / run_id / "corpus_chunks.plan_chunk_shards.plan.json")
    first, same, other = (p.stat() for p in paths)
    assert (first.st_ino, first.st_nlink) == (same.st_ino, 3)  # two runs' files and the object: one copy
    assert other.st_ino != first.st_ino
    loaded = io.load_input(dg.build_input_context(upstream_output=context))
    assert loaded == ShardPlanSet([])
