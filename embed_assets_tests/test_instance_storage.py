"""The instance storage that ``dagster.yaml`` selects: pool slots hold across processes on SQLite."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import time
from pathlib import Path

import dagster as dg
import pytest

from embed_assets.defs.instance import PoolSafeSqliteEventLogStorage, PoolSafeSqliteStorage
from embed_assets_tests.dagster_procs import instance_at, make_dagster_home

POOL = "gpu"


def _claim_and_hold(home: str, worker: int, start_at: float, rounds: int, out: str) -> None:
    """Claim the pool ``rounds`` times the way a run worker does (poll until claimed), hold, free; log spans."""
    with instance_at(Path(home)) as instance:
        storage = instance.event_log_storage
        while time.time() < start_at:  # start every worker at the same instant to provoke the race
            pass
        # Every run worker's first gpu step initializes the pool at its default limit (InstanceConcurrencyContext).
        storage.initialize_concurrency_limit_to_default(POOL)
        spans = []
        for i in range(rounds):
            run_id, step_key = f"run-{worker}-{i}", "checkpoint"
            while not storage.claim_concurrency_slot(POOL, run_id, step_key).is_claimed:
                time.sleep(0.005)
            begin = time.time()
            time.sleep(0.03)
            spans.append((begin, time.time()))
            storage.free_concurrency_slot_for_step(run_id, step_key)
    Path(out).write_text(json.dumps(spans))


def test_dagster_yaml_selects_the_pool_safe_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:  # as the Dagster CLI, webserver and daemon open it
        assert isinstance(instance.event_log_storage, PoolSafeSqliteEventLogStorage)
        assert instance.event_log_storage.supports_global_concurrency_limits
    # Dagster's default layout under DAGSTER_HOME, so an existing home keeps its history.
    assert (tmp_path / "history" / "runs.db").is_file()
    assert (tmp_path / "history" / "runs" / "index.db").is_file()
    assert (tmp_path / "schedules" / "schedules.db").is_file()


def test_pool_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    storage = PoolSafeSqliteStorage.from_local(str(tmp_path))
    events = storage.event_log_storage
    assert isinstance(events, PoolSafeSqliteEventLogStorage)
    with events.pool_lock(), events.pool_lock():
        assert events._lock_fd is not None
    assert events._lock_fd is None
    storage.dispose()


@pytest.mark.timeout(240)
def test_pool_slots_never_overlap_across_processes(tmp_path: Path) -> None:
    """4 processes claim the limit-1 pool 10 times each, starting at one instant: holds never overlap.

    The stock SQLite storage fails this (2-3 overlapping holds per run when measured): two claims read the
    same free slot and both take it.
    """
    home = make_dagster_home(tmp_path / "home")  # creates the schema once, before the race
    workers, rounds = 4, 10
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 8  # after every worker has imported dagster
    procs = [
        ctx.Process(
            target=_claim_and_hold, args=(str(home), w, start_at, rounds, str(tmp_path / f"{w}.json"))
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(200)
    assert [p.exitcode for p in procs] == [0] * workers
    spans = sorted(tuple(s) for w in range(workers) for s in json.loads((tmp_path / f"{w}.json").read_text()))
    assert len(spans) == workers * rounds
    overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    assert not overlaps, f"{len(overlaps)} holds of the limit-1 pool overlapped: {overlaps[:3]}"
    with instance_at(home) as instance:
        info = instance.event_log_storage.get_concurrency_info(POOL)
    assert info.slot_count == 1 and not info.claimed_slots
