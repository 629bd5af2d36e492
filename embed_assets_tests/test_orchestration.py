"""Orchestration as users drive it, through Dagster's real machinery on a tiny corpus.

- the corpus-change sensor (skip when unchanged, exactly corpus + downstream when changed, stable run keys),
- staleness as Dagster computes it from the assets' data versions,
- incremental SDG with the LLM generator against the scripted OpenAI-compatible stub server,
- the GPU tag limit of the multiprocess executor (two CUDA steps of one run never overlap).
"""

# No "from __future__ import annotations": Dagster reads the assets' config annotations at definition time.

import shutil
import time
from collections import deque
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from embed_assets.definitions import (
    ALL_ASSETS,
    corpus,
    corpus_chunks,
    defs,
    pipeline_resources,
    split_sets,
    synthetic_qa,
)
from embed_assets.defs.common import GPU_OP_TAGS, GPU_POOL, GPU_TAGS
from embed_assets.defs.jobs import build_executor
from embed_assets.defs.resources import ArtifactStore, LLMResource
from embed_assets.defs.sensors import corpus_change_sensor, retrain_schedule
from embed_assets_tests.conftest import SAMPLE_CORPUS
from embed_assets_tests.openai_stub_server import OpenAIStub

#: Four of the smallest sample documents (3-4 passages each): enough for a split, quick to chunk.
SMALL_DOCS = ("atom-identifiers.txt", "power.txt", "integers.txt", "booleans.txt")
UPSTREAM = [corpus, corpus_chunks, synthetic_qa, split_sets]


def _small_corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in SMALL_DOCS:
        shutil.copy(SAMPLE_CORPUS / "python-reference" / name, root / name)
    return root


def _instance(tmp_path: Path) -> dg.DagsterInstance:
    home = tmp_path / "dagster_home"
    home.mkdir()
    return dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}})


def _resources(tmp_path: Path, llm: LLMResource | None = None) -> dict:
    return pipeline_resources(ArtifactStore(root=str(tmp_path / "artifacts")), llm=llm or LLMResource())


def _materialize(instance, tmp_path, run_config, selection=None, llm=None) -> dg.ExecuteInProcessResult:
    result = dg.materialize(
        UPSTREAM,
        instance=instance,
        resources=_resources(tmp_path, llm),
        run_config=run_config,
        selection=selection,
        raise_on_error=False,
    )
    failures = [
        f"{e.step_key}: {e.step_failure_data.error.to_string()[-2000:]}"
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE" and e.step_failure_data.error
    ]
    assert result.success, f"materialization failed: {failures}"
    return result


def _meta(instance: dg.DagsterInstance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was never materialized"
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _edit_one_document(root: Path, name: str = "power.txt") -> None:
    with (root / name).open("a", encoding="utf-8") as f:
        f.write(" The power operator is evaluated right to left when chained without parentheses.\n")


# -------------------------------------------------------------------------------- eval set per corpus
def test_eval_set_belongs_to_its_corpus(tmp_path: Path) -> None:
    """A second corpus folder gets its own test set (nothing of the first corpus in it); going back to the
    first corpus reuses the set frozen for it, and the metadata says which corpus and run it came from."""
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.stages.ingest import load_chunks

    first = _small_corpus(tmp_path / "python")
    second = tmp_path / "other"
    second.mkdir()
    for name in ("typesseq-mutable.txt", "slicings.txt", "dict.txt", "global.txt"):
        shutil.copy(SAMPLE_CORPUS / "python-reference" / name, second / name)
    instance = _instance(tmp_path)

    def run(folder: Path) -> tuple[dg.ExecuteInProcessResult, dict]:
        result = _materialize(instance, tmp_path, {"ops": {"corpus": {"config": {"path": str(folder)}}}})
        return result, _meta(instance, "split_sets")

    r1, m1 = run(first)
    assert m1["eval_set"] == "new" and "first evaluation set for corpus" in m1["eval_set_reason"]
    r2, m2 = run(second)
    assert m2["eval_set"] == "new" and str(second.resolve()) in m2["eval_set_reason"]
    assert m2["eval_corpus_root"] == str(second.resolve())
    split = r2.output_for_node("split_sets")
    eval_corpus, eval_queries, qrels = load_beir_folder(split.eval_beir, split="test")
    chunks = {c.chunk_id: c for c in load_chunks(r2.output_for_node("corpus_chunks").path)}
    assert set(eval_corpus) == set(chunks)  # only the second corpus's passages
    assert eval_queries and all(pid in chunks for rels in qrels.values() for pid in rels)
    assert {chunks[pid].doc_id for rels in qrels.values() for pid in rels} <= set(split.test_docs)
    assert set(split.test_docs) <= {p.name for p in second.iterdir()}

    _, m3 = run(first)
    assert m3["eval_set"] == "reused" and m3["eval_frozen_by_run"] == r1.run_id
    assert m3["eval_corpus_root"] == str(first.resolve())
    assert m3["eval_changes_since_last"] == "passages +0/-0, queries +0/-0"


# ------------------------------------------------------------------------------------------------ sensor
def _evaluate_sensor(instance: dg.DagsterInstance):
    context = dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def())
    return corpus_change_sensor.evaluate_tick(context)


def _downstream_closure(start: dg.AssetKey) -> set[dg.AssetKey]:
    """``start`` and everything downstream of it, from the asset definitions' own dependency lists."""
    children: dict[dg.AssetKey, set[dg.AssetKey]] = {}
    for assets_def in ALL_ASSETS:
        for dep in assets_def.dependency_keys:
            children.setdefault(dep, set()).update(assets_def.keys)
    seen, todo = {start}, deque([start])
    while todo:
        for child in children.get(todo.popleft(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def test_corpus_change_sensor(tmp_path: Path) -> None:
    docs = _small_corpus(tmp_path / "corpus")
    # A file the user's corpus config excludes: the sensor must hash the folder the way the asset did.
    (docs / "scratch-notes.txt").write_text("Private notes that are not part of the corpus.\n")
    corpus_config = {"path": str(docs), "exclude_globs": ["README.md", "LICENSE*", "scratch-*"]}
    instance = _instance(tmp_path)
    _materialize(instance, tmp_path, {"ops": {"corpus": {"config": corpus_config}}}, selection=UPSTREAM[:3])
    assert _meta(instance, "corpus")["documents"] == len(SMALL_DOCS)

    unchanged = _evaluate_sensor(instance)
    assert not unchanged.run_requests
    assert "unchanged" in (unchanged.skip_message or "")

    _edit_one_document(docs)
    changed = _evaluate_sensor(instance)
    assert len(changed.run_requests) == 1
    request = changed.run_requests[0]
    from embed_assets.corpus import read_corpus

    new_hash = read_corpus(docs, exclude_globs=corpus_config["exclude_globs"]).data_version
    assert new_hash != _meta(instance, "corpus")["corpus_hash"]
    assert new_hash in request.run_key
    assert request.tags["embed_assets/corpus_hash"] == new_hash
    expected = _downstream_closure(dg.AssetKey("corpus"))
    assert set(request.asset_selection) == expected
    assert len(request.asset_selection) == len(expected) == len(ALL_ASSETS)  # every asset depends on it
    requested_config = request.run_config["ops"]["corpus"]["config"]
    assert requested_config["path"] == str(docs.resolve())
    assert requested_config["exclude_globs"] == corpus_config["exclude_globs"]

    # Same state, same key: the daemon deduplicates repeated ticks by run key.
    again = _evaluate_sensor(instance)
    assert [r.run_key for r in again.run_requests] == [request.run_key]

    # Running the requested corpus config makes the sensor skip again.
    _materialize(instance, tmp_path, request.run_config, selection=[corpus])
    assert not _evaluate_sensor(instance).run_requests

    # Going back to the first state (and forth again) needs new runs, so their keys must be new too.
    original = (SAMPLE_CORPUS / "python-reference" / "power.txt").read_text(encoding="utf-8")
    (docs / "power.txt").write_text(original, encoding="utf-8")
    back = _evaluate_sensor(instance).run_requests
    assert len(back) == 1 and back[0].run_key != request.run_key
    _materialize(instance, tmp_path, back[0].run_config, selection=[corpus])
    _edit_one_document(docs)
    forth = _evaluate_sensor(instance).run_requests
    assert len(forth) == 1 and new_hash in forth[0].run_key
    assert forth[0].run_key not in {request.run_key, back[0].run_key}

    # The nightly schedule retrains on the user's corpus (with its config), not on the bundled sample.
    (nightly,) = retrain_schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    assert nightly.run_config["ops"]["corpus"]["config"] == {**requested_config, "path": str(docs.resolve())}


# --------------------------------------------------------------------------------------------- staleness
def _stale_status(instance: dg.DagsterInstance) -> dict[str, str]:
    resolver = CachingStaleStatusResolver(
        instance, defs.get_repository_def().asset_graph, LoadingContextForTest(instance)
    )
    return {a.key.to_user_string(): resolver.get_status(a.key).value for a in ALL_ASSETS}


def _stale_causes(instance: dg.DagsterInstance, asset: str) -> list[tuple[str, str]]:
    resolver = CachingStaleStatusResolver(
        instance, defs.get_repository_def().asset_graph, LoadingContextForTest(instance)
    )
    return [
        (c.category.value, c.dependency.asset_key.to_user_string() if c.dependency else "")
        for c in resolver.get_stale_causes(dg.AssetKey(asset))
    ]


def _expect(status: dict[str, str], stale: set[str]) -> None:
    materialized = {a.key.to_user_string() for a in UPSTREAM}
    expected = {
        name: (StaleStatus.STALE.value if name in stale else StaleStatus.FRESH.value)
        if name in materialized
        else StaleStatus.MISSING.value
        for name in status
    }
    assert status == expected


def test_staleness_follows_the_corpus_content(tmp_path: Path) -> None:
    docs = _small_corpus(tmp_path / "corpus")
    instance = _instance(tmp_path)
    run_config = {"ops": {"corpus": {"config": {"path": str(docs)}}}}
    _materialize(instance, tmp_path, run_config)
    _expect(_stale_status(instance), stale=set())

    # Re-materializing an unchanged corpus keeps its data version (the content hash): nothing goes stale.
    _materialize(instance, tmp_path, run_config, selection=[corpus])
    _expect(_stale_status(instance), stale=set())

    # One edited document: only the corpus's downstream asset is stale, because of the corpus's new version.
    _edit_one_document(docs)
    _materialize(instance, tmp_path, run_config, selection=[corpus])
    _expect(_stale_status(instance), stale={"corpus_chunks"})
    assert _stale_causes(instance, "corpus_chunks") == [("DATA", "corpus")]


def test_staleness_after_a_config_change(tmp_path: Path) -> None:
    """Re-materializing synthetic_qa with other pairs must make its downstream stale, and only that."""
    docs = _small_corpus(tmp_path / "corpus")
    instance = _instance(tmp_path)
    _materialize(instance, tmp_path, {"ops": {"corpus": {"config": {"path": str(docs)}}}})
    pairs_before = _meta(instance, "synthetic_qa")["pairs"]
    _materialize(
        instance,
        tmp_path,
        {"ops": {"synthetic_qa": {"config": {"queries_per_chunk": 3}}}},
        selection=[synthetic_qa],
    )
    assert _meta(instance, "synthetic_qa")["pairs"] != pairs_before  # the output really changed
    status = _stale_status(instance)
    _expect(status, stale={"split_sets"})
    assert _stale_causes(instance, "split_sets") == [("DATA", "synthetic_qa")]


# ----------------------------------------------------------------------------------- incremental LLM SDG
def _chunks(tmp_path: Path, instance: dg.DagsterInstance) -> dict[str, tuple[str, str]]:
    """``{chunk_id: (doc_id, text)}`` of the latest corpus_chunks run, read from the artifact store by run id."""
    from embed_assets.storage import read_parquet

    run_id = instance.get_latest_materialization_event(dg.AssetKey("corpus_chunks")).run_id
    path = tmp_path / "artifacts" / "corpus_chunks" / run_id / "chunks.parquet"
    return {r["chunk_id"]: (r["doc_id"], r["text"].strip()) for r in read_parquet(path)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sdg_drop_reasons_reach_the_event_log_and_metadata(tmp_path: Path) -> None:
    docs = _small_corpus(tmp_path / "corpus")
    instance = _instance(tmp_path)
    sdg = {"generator": "llm", "bundle_size": 1, "num_pairs": 2, "timeout_s": 30, "dedup_threshold": 1.0}
    run_config = {"ops": {"corpus": {"config": {"path": str(docs)}}, "synthetic_qa": {"config": sdg}}}
    with OpenAIStub() as stub:
        # The judge rejects every other question: those pairs are dropped for quality, with a reason.
        stub.judge_overall = lambda question: 3.0 if len(question) % 2 else 9.0
        llm = LLMResource(base_url=stub.base_url, model="stub/chat-model")
        result = _materialize(instance, tmp_path, run_config, selection=UPSTREAM[:3], llm=llm)
    meta = _meta(instance, "synthetic_qa")
    reason = meta["drops"].records[0].data["reason"]
    assert reason and meta[f"dropped_{reason}"] > 0 and meta["pairs"] > 0
    warnings = [
        r.user_message
        for r in instance.all_logs(result.run_id)
        if r.step_key == "synthetic_qa" and r.level >= 30
    ]
    assert any(f"synthetic_qa dropped {meta[f'dropped_{reason}']} × {reason}, e.g. " in w for w in warnings)


def test_incremental_llm_sdg(tmp_path: Path) -> None:
    docs = _small_corpus(tmp_path / "corpus")
    instance = _instance(tmp_path)
    sdg = {"generator": "llm", "bundle_size": 1, "num_pairs": 2, "max_parallel_requests": 2, "timeout_s": 30}
    run_config = {
        "ops": {"corpus": {"config": {"path": str(docs)}}, "synthetic_qa": {"config": sdg}},
    }
    with OpenAIStub() as stub:
        llm = LLMResource(base_url=stub.base_url, model="stub/chat-model")
        _materialize(instance, tmp_path, run_config, selection=UPSTREAM[:3], llm=llm)
        first = _meta(instance, "synthetic_qa")
        chunks_before = _chunks(tmp_path, instance)
        n = len(chunks_before)
        assert first["generator"] == "llm" and first["pairs"] > 0
        assert first["chunks_generated"] == n and first["chunks_reused"] == 0
        # bundle_size=1: one extraction and one generation call per passage, at most one judge call each.
        assert stub.count("artifact_extraction") == stub.count("qa_generation") == n
        assert stub.count(status=200) == stub.count()

        stub.reset()
        _edit_one_document(docs)
        _materialize(instance, tmp_path, run_config, selection=UPSTREAM[:3], llm=llm)
        chunks_after = _chunks(tmp_path, instance)
        new = {cid: text for cid, (_, text) in chunks_after.items() if cid not in chunks_before}
        unchanged = len(chunks_after) - len(new)
        assert 1 <= len(new) <= 2 and unchanged >= n - 2
        assert {chunks_after[cid][0] for cid in new} == {"power.txt"}  # only the edited document's passages

        chunk_meta = _meta(instance, "corpus_chunks")
        assert chunk_meta["chunks_unchanged_since_last_run"] == unchanged
        assert chunk_meta["chunks_new"] == len(new)

        # Calls only for the edited document's new passages, counted at the server.
        assert stub.count("artifact_extraction") == stub.count("qa_generation") == len(new)
        assert stub.count() <= 3 * len(new)
        new_texts = set(new.values())
        assert all(c.segments and set(c.segments) <= new_texts for c in stub.calls)
        second = _meta(instance, "synthetic_qa")
        assert second["chunks_reused"] == unchanged
        assert second["chunks_generated"] == len(new)
        assert second["pairs"] > 0


# ------------------------------------------------------------------------------------ GPU executor limit
class HoldConfig(dg.Config):
    log_dir: str
    seconds: float = 4.0  # how long the step holds (its "GPU")
    peer: str = ""  # if set: stop holding as soon as this step is seen running at the same time


def _running(log: Path, name: str) -> bool:
    return (log / f"{name}.start").exists() and not (log / f"{name}.end").exists()


def _hold(name: str, config: HoldConfig) -> None:
    """Record start/end times; with a peer, also record whether both steps ever ran at the same time."""
    log = Path(config.log_dir)
    (log / f"{name}.start").write_text(repr(time.time()))
    deadline = time.time() + config.seconds
    while time.time() < deadline:
        if config.peer and _running(log, config.peer):
            (log / f"{name}.met").write_text(config.peer)
            time.sleep(0.5)  # let the peer see this step too
            break
        time.sleep(0.05)
    (log / f"{name}.end").write_text(repr(time.time()))


@dg.asset(tags=GPU_TAGS, op_tags=GPU_OP_TAGS, pool=GPU_POOL)
def gpu_step_a(config: HoldConfig) -> None:
    _hold("gpu_step_a", config)


@dg.asset(tags=GPU_TAGS, op_tags=GPU_OP_TAGS, pool=GPU_POOL)
def gpu_step_b(config: HoldConfig) -> None:
    _hold("gpu_step_b", config)


@dg.asset
def cpu_step_a(config: HoldConfig) -> None:
    _hold("cpu_step_a", config)


@dg.asset
def cpu_step_b(config: HoldConfig) -> None:
    _hold("cpu_step_b", config)


def _pair_job(name: str, assets: list) -> dg.JobDefinition:
    """Two independent steps in a job with the project's multiprocess executor."""
    job = dg.define_asset_job(
        name, selection=[a.key for a in assets], executor_def=build_executor("multiprocess")
    )
    return dg.Definitions(assets=assets, jobs=[job]).resolve_job_def(name)


def gpu_pair_job() -> dg.JobDefinition:  # module level: the multiprocess executor reconstructs it
    return _pair_job("gpu_pair", [gpu_step_a, gpu_step_b])


def cpu_pair_job() -> dg.JobDefinition:
    return _pair_job("cpu_pair", [cpu_step_a, cpu_step_b])


def _run_pair(tmp_path: Path, instance, factory, names: tuple[str, str]) -> tuple[list, set[str]]:
    log = tmp_path / factory.__name__
    log.mkdir()
    config = {"log_dir": str(log), "seconds": 10.0}
    run_config = {
        "ops": {name: {"config": {**config, "peer": other}} for name, other in (names, names[::-1])}
    }
    result = dg.execute_job(dg.reconstructable(factory), instance=instance, run_config=run_config)
    assert result.success
    spans = sorted(
        (float((log / f"{n}.start").read_text()), float((log / f"{n}.end").read_text())) for n in names
    )
    return spans, {n for n in names if (log / f"{n}.met").exists()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_steps_never_overlap_within_a_run(tmp_path: Path) -> None:
    instance = _instance(tmp_path)
    # Control: two plain steps of one run meet (the executor runs steps in parallel)...
    spans, met = _run_pair(tmp_path, instance, cpu_pair_job, ("cpu_step_a", "cpu_step_b"))
    assert met == {"cpu_step_a", "cpu_step_b"}, spans
    # ...but two CUDA-tagged steps never do: the executor's tag limit runs them one after the other.
    spans, met = _run_pair(tmp_path, instance, gpu_pair_job, ("gpu_step_a", "gpu_step_b"))
    assert not met
    (_, first_end), (second_start, _) = spans
    assert second_start >= first_end, f"GPU steps overlapped: {spans}"


def gpu_pool_job() -> dg.JobDefinition:
    """One CUDA step (module level, so two processes can each run it against one instance)."""
    job = dg.define_asset_job(
        "gpu_pool", selection=["gpu_step_a"], executor_def=build_executor("multiprocess")
    )
    return dg.Definitions(assets=[gpu_step_a], jobs=[job]).resolve_job_def("gpu_pool")


class ProbeConfig(dg.Config):
    out: str


@dg.asset
def import_probe(config: ProbeConfig) -> None:
    """Records what the step process already had imported before its body ran."""
    import os
    import sys

    Path(config.out).write_text(f"{'torch' in sys.modules} {os.getpid()}")


def _probe_job(start: str) -> dg.JobDefinition:
    job = dg.define_asset_job(
        f"probe_{start}", selection=["import_probe"], executor_def=build_executor("multiprocess", start)
    )
    return dg.Definitions(assets=[import_probe], jobs=[job]).resolve_job_def(f"probe_{start}")


def forkserver_probe_job() -> dg.JobDefinition:
    return _probe_job("forkserver")


def spawn_probe_job() -> dg.JobDefinition:
    return _probe_job("spawn")


def test_step_start_method_is_validated() -> None:
    from embed_assets.defs.jobs import STEP_PRELOAD_MODULES, multiprocess_start_method

    assert multiprocess_start_method() == {"forkserver": {"preload_modules": STEP_PRELOAD_MODULES}}
    assert multiprocess_start_method("spawn") == {"spawn": {}}
    with pytest.raises(ValueError, match="EMBED_ASSETS_STEP_START"):
        build_executor("multiprocess", "fork")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_step_processes_fork_from_a_server_that_preloaded_torch(tmp_path: Path) -> None:
    """The default start method: steps begin with torch imported (spawned steps re-import it every time)."""
    import os

    instance = _instance(tmp_path)
    seen = {}
    for factory in (forkserver_probe_job, spawn_probe_job):
        out = tmp_path / f"{factory.__name__}.txt"
        run_config = {"ops": {"import_probe": {"config": {"out": str(out)}}}}
        result = dg.execute_job(dg.reconstructable(factory), instance=instance, run_config=run_config)
        assert result.success
        preloaded, pid = out.read_text().split()
        assert int(pid) != os.getpid(), "the step ran in its own process"
        seen[factory.__name__] = preloaded == "True"
    assert seen == {"forkserver_probe_job": True, "spawn_probe_job": False}


_RUN_GPU_POOL_JOB = """
import json, sys
import dagster as dg
from embed_assets_tests.test_orchestration import gpu_pool_job
result = dg.execute_job(dg.reconstructable(gpu_pool_job), instance=dg.DagsterInstance.get(), run_config=json.loads(sys.argv[1]))
sys.exit(0 if result.success else 1)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_pool_serializes_gpu_steps_across_runs(tmp_path: Path) -> None:
    """Two runs at once on an instance with the project's dagster.yaml: the `gpu` pool admits one step."""
    import json
    import os
    import subprocess
    import sys

    from embed_assets_tests.dagster_procs import REPO, instance_at, make_dagster_home

    home = make_dagster_home(tmp_path / "dagster_home")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    logs, procs = [], []
    try:
        for i in range(2):
            log = tmp_path / f"run{i}"
            log.mkdir()
            logs.append(log)
            config = {"ops": {"gpu_step_a": {"config": {"log_dir": str(log), "seconds": 4.0}}}}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _RUN_GPU_POOL_JOB, json.dumps(config)],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    spans = sorted(
        (float((log / "gpu_step_a.start").read_text()), float((log / "gpu_step_a.end").read_text()))
        for log in logs
    )
    (_, first_end), (second_start, _) = spans
    assert second_start >= first_end, f"GPU steps of two runs overlapped: {spans}"
    with instance_at(home) as instance:
        records = instance.get_run_records()
    assert len(records) == 2
    # The runs themselves did overlap: the second step waited for the pool, not for the other run to end.
    starts = sorted(r.start_time for r in records if r.start_time)
    assert starts[1] < first_end, (starts, spans)
