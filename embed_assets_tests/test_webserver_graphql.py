"""Runs launched the way users launch them: a real ``dagster-webserver`` and ``dagster-daemon`` (queued runs)
on the project's workspace and instance config, driven through GraphQL with ``embed_assets.launch``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from embed_assets.definitions import ALL_ASSETS
from embed_assets.launch import failures, launch, materializations, wait
from embed_assets_tests.conftest import SAMPLE_CORPUS
from embed_assets_tests.dagster_procs import (
    LOCATION,
    DagsterDeployment,
    dagster_deployment,
    processes_in_group,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DOCS = ("atom-identifiers.txt", "power.txt", "integers.txt", "booleans.txt")
SELECTION = ["corpus", "corpus_chunks", "synthetic_qa", "split_sets"]
RUN_TIMEOUT_S = 600
SENSOR = {
    "repositoryLocationName": LOCATION,
    "repositoryName": "__repository__",
    "sensorName": "corpus_change_sensor",
}

_ASSET_STATE_QUERY = """
query AssetState($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    staleStatus
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name executionForLatestMaterialization { status } } }
    }
  }
}
"""

_RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status assetSelection { path } tags { key value } runConfigYaml }
  }
}
"""

_RUNS_BY_TAG_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) { __typename ... on Runs { results { runId status } } }
}
"""

_SENSOR_DRY_RUN = """
mutation DryRun($selector: SensorSelector!, $cursor: String) {
  sensorDryRun(selectorData: $selector, cursor: $cursor) {
    __typename
    ... on DryRunInstigationTick {
      evaluationResult {
        skipReason
        error { message }
        runRequests { runKey runConfigYaml tags { key value } assetSelection { path } }
      }
    }
    ... on PythonError { message }
  }
}
"""

_START_SENSOR = """
mutation Start($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on PythonError { message } }
}
"""

_RESET_SENSOR = """
mutation Reset($selector: SensorSelector!) {
  resetSensor(sensorSelector: $selector) { __typename ... on PythonError { message } }
}
"""

_TERMINATE = """
mutation Terminate($runId: String!, $policy: TerminateRunPolicy) {
  terminateRun(runId: $runId, terminatePolicy: $policy) { __typename }
}
"""


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("graphql") / "corpus"
    root.mkdir()
    for name in DOCS:
        shutil.copy(SAMPLE_CORPUS / "python-reference" / name, root / name)
    return root


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    with dagster_deployment(tmp_path_factory.mktemp("deployment")) as dep:
        groups = [p.pgid for p in dep.processes]
        yield dep
    leftovers = {g: processes_in_group(g) for g in groups}
    assert not any(leftovers.values()), f"processes outlived the deployment: {leftovers}"


def _run_config(corpus: Path) -> dict:
    return {"ops": {"corpus": {"config": {"path": str(corpus)}}}}


def _wait_success(dep: DagsterDeployment, run_id: str) -> None:
    status = wait(dep.host, dep.port, run_id, timeout_s=RUN_TIMEOUT_S, poll_s=1.0)
    assert status == "SUCCESS", f"run {run_id} {status}: {failures(dep.host, dep.port, run_id)}\n{dep.logs()}"


def _materialized_before(dep: DagsterDeployment, asset: str) -> bool:
    data = dep.graphql(
        "query($k: [AssetKeyInput!]) { assetNodes(assetKeys: $k) { assetMaterializations(limit: 1) { runId } } }",
        {"k": [{"path": [asset]}]},
    )
    return bool(data["assetNodes"][0]["assetMaterializations"])


def test_launch_a_selection_through_graphql(deployment: DagsterDeployment, corpus_dir: Path) -> None:
    dep = deployment
    run_id = launch(dep.host, dep.port, assets=SELECTION, run_config=_run_config(corpus_dir))
    _wait_success(dep, run_id)

    run = dep.graphql(_RUN_QUERY, {"runId": run_id})["runOrError"]
    assert sorted(a["path"][0] for a in run["assetSelection"]) == sorted(SELECTION)
    assert {"key": "embed_assets/trigger", "value": "graphql"} in run["tags"]

    meta = materializations(dep.host, dep.port, run_id)
    assert set(meta) == set(SELECTION)  # exactly the selection, nothing downstream
    assert meta["corpus"]["documents"] == len(DOCS)
    assert meta["corpus"]["rejected_files"] == 0
    assert meta["corpus_chunks"]["chunks"] > 0
    assert meta["corpus_chunks"]["documents"] == len(DOCS)
    assert meta["synthetic_qa"]["pairs"] > 0
    assert meta["synthetic_qa"]["generator"] == "inverse_cloze"
    assert meta["split_sets"]["leakage_documents"] == 0
    assert meta["split_sets"]["train_pairs"] > 0 and meta["split_sets"]["test_pairs"] > 0

    # The run worker got the deployment's artifact folder (EMBED_ASSETS_HOME).
    documents = dep.artifacts / "corpus" / run_id / "documents.jsonl"
    assert len(documents.read_text().splitlines()) == len(DOCS)

    # What the UI shows: fresh assets, the leakage check passed.
    nodes = dep.graphql(_ASSET_STATE_QUERY, {"keys": [{"path": [a]} for a in SELECTION]})["assetNodes"]
    assert {n["assetKey"]["path"][0]: n["staleStatus"] for n in nodes} == dict.fromkeys(SELECTION, "FRESH")
    split = next(n for n in nodes if n["assetKey"]["path"] == ["split_sets"])
    checks = {
        c["name"]: c["executionForLatestMaterialization"] for c in split["assetChecksOrError"]["checks"]
    }
    assert checks["no_document_leakage"]["status"] == "SUCCEEDED"


def test_launch_cli_waits_and_prints_metadata(
    deployment: DagsterDeployment, corpus_dir: Path, tmp_path: Path
) -> None:
    dep = deployment
    rechunk = _materialized_before(dep, "corpus_chunks")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_run_config(corpus_dir)))
    args = ["--host", dep.host, "--port", str(dep.port), "--select", "corpus,corpus_chunks"]
    args += ["--config", str(config), "--location", LOCATION, "--wait", "--timeout", str(RUN_TIMEOUT_S)]
    proc = subprocess.run(
        [sys.executable, "-m", "embed_assets.launch", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S + 120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    decoder, out, pos = json.JSONDecoder(), [], 0
    text = proc.stdout.strip()
    while pos < len(text):
        obj, end = decoder.raw_decode(text, pos)
        out.append(obj)
        pos = end + len(text[end:]) - len(text[end:].lstrip())
    assert len(out) == 2, proc.stdout + proc.stderr
    first, report = out
    assert first["run_id"] == report["run_id"]
    assert report["status"] == "SUCCESS", f"{report.get('failures')}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0
    assert set(report["assets"]) == {"corpus", "corpus_chunks"}
    assert report["assets"]["corpus"]["documents"] == len(DOCS)
    chunks = report["assets"]["corpus_chunks"]
    # Re-chunking an unchanged corpus recognizes every passage of the previous run.
    assert chunks["chunks_unchanged_since_last_run"] == (chunks["chunks"] if rechunk else 0)


def _sensor_runs(dep: DagsterDeployment) -> list[dict]:
    data = dep.graphql(
        _RUNS_BY_TAG_QUERY, {"filter": {"tags": [{"key": "embed_assets/trigger", "value": "corpus_change"}]}}
    )
    return data["runsOrError"]["results"]


def _cancel(dep: DagsterDeployment, run_id: str, timeout_s: float = 60) -> None:
    """Terminate a run (its worker stops), or at least mark it cancelled if it does not stop in time."""
    dep.graphql(_TERMINATE, {"runId": run_id, "policy": "SAFE_TERMINATE"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = dep.graphql(_RUN_QUERY, {"runId": run_id})["runOrError"]["status"]
        if status in ("CANCELED", "FAILURE", "SUCCESS"):
            return
        time.sleep(1.0)
    dep.graphql(_TERMINATE, {"runId": run_id, "policy": "MARK_AS_CANCELED_IMMEDIATELY"})


def test_corpus_change_sensor_in_the_daemon(deployment: DagsterDeployment, corpus_dir: Path) -> None:
    dep = deployment
    if not _materialized_before(dep, "corpus"):
        _wait_success(dep, launch(dep.host, dep.port, assets=["corpus"], run_config=_run_config(corpus_dir)))

    # "Test sensor" in the UI: evaluated by the code server against the instance, nothing launched.
    result = dep.graphql(_SENSOR_DRY_RUN, {"selector": SENSOR, "cursor": None})["sensorDryRun"][
        "evaluationResult"
    ]
    assert not result["runRequests"] and "unchanged" in result["skipReason"], result

    with (corpus_dir / "power.txt").open("a", encoding="utf-8") as f:
        f.write(" Chained power operators group from the right.\n")
    result = dep.graphql(_SENSOR_DRY_RUN, {"selector": SENSOR, "cursor": None})["sensorDryRun"][
        "evaluationResult"
    ]
    assert result["error"] is None, result
    (request,) = result["runRequests"]
    assert len(request["assetSelection"]) == len(ALL_ASSETS)  # the corpus and everything downstream
    assert yaml.safe_load(request["runConfigYaml"])["ops"]["corpus"]["config"]["path"] == str(corpus_dir)

    # Started for real, the daemon's first tick launches that run (cancelled at once: it is the full pipeline).
    assert dep.graphql(_START_SENSOR, {"selector": SENSOR})["startSensor"]["__typename"] == "Sensor"
    try:
        deadline = time.monotonic() + 180
        runs: list[dict] = []
        while not runs and time.monotonic() < deadline:
            dep.check_alive()
            runs = _sensor_runs(dep)
            time.sleep(1.0)
        assert len(runs) == 1, f"no run from the sensor after 180s\n{dep.logs()}"
    finally:
        dep.graphql(_RESET_SENSOR, {"selector": SENSOR})
        for r in _sensor_runs(dep):
            _cancel(dep, r["runId"])
    run = dep.graphql(_RUN_QUERY, {"runId": runs[0]["runId"]})["runOrError"]
    assert sorted(a["path"][0] for a in run["assetSelection"]) == sorted(
        a["path"][0] for a in request["assetSelection"]
    )
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags["dagster/run_key"] == request["runKey"]
    assert tags["dagster/sensor_name"] == "corpus_change_sensor"
