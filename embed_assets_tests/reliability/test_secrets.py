"""Secrets never appear in logs, metadata, stored run data, artifacts or exceptions.

The LLM key is used for real (the scripted server requires it and echoes it back in error bodies, as some
providers do); afterwards every place a run leaves text is searched for it: the Dagster event log and run
record, materialization metadata, every file of the instance folder (SQLite event and run storage, compute
logs, IO-manager pickles) and of the artifact folder, and everything the process printed. The embedding
server's bearer token is checked in test_service_attack.py (server log with the access log on, command line).
"""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
import pytest

from embed_assets.definitions import corpus, corpus_chunks, pipeline_resources, synthetic_qa
from embed_assets.defs.resources import ArtifactStore, LLMResource
from embed_assets.sdg.llm import LLMConfigError
from embed_assets_tests.openai_stub_server import Fault, OpenAIStub

SECRET = "nvapi-RELIABILITY-7c41f0e9a2b35d68"
KEY_ENV = "EMBED_ASSETS_RELIABILITY_LLM_KEY"


def run_synthetic_qa(
    tmp_path: Path, stub: OpenAIStub, monkeypatch
) -> tuple[dg.DagsterInstance, object, Path]:
    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(2):
        (docs / f"d{d}.txt").write_text(
            f"The archive of town {d} holds the harbor records since 1850. The records list every ship. "
            f"Storms damaged the pier of town {d} in 1903 and in 1958. The pier was rebuilt with oak both times."
        )
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv(KEY_ENV, SECRET)
    instance = dg.DagsterInstance.local_temp(str(home))
    artifacts = tmp_path / "artifacts"
    result = dg.materialize(
        [corpus, corpus_chunks, synthetic_qa],
        instance=instance,
        resources=pipeline_resources(
            ArtifactStore(root=str(artifacts)),
            # as definitions.py does it: the resource holds the variable's name, the value is read at run time
            llm=LLMResource(base_url=stub.base_url, model="stub-model", api_key=dg.EnvVar(KEY_ENV)),
        ),
        run_config={
            "ops": {
                "corpus": {"config": {"path": str(docs)}},
                "synthetic_qa": {
                    "config": {"generator": "llm", "num_pairs": 3, "max_retries": 1, "dedup_threshold": 1.0}
                },
            }
        },
        raise_on_error=False,
    )
    return instance, result, home


def texts_of_the_run(instance: dg.DagsterInstance, run_id: str, *folders: Path) -> dict[str, str]:
    """Everything the run left behind, as text, by where it came from."""
    found: dict[str, str] = {}
    for i, entry in enumerate(instance.all_logs(run_id)):
        found[f"event {i}"] = dg.serialize_value(entry)
    record = instance.get_run_by_id(run_id)
    found["run record"] = dg.serialize_value(record)
    for key in instance.all_asset_keys():
        for rec in instance.fetch_materializations(key, limit=10).records:
            found[f"metadata {key.to_user_string()}"] = repr(rec.asset_materialization.metadata)
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                found[str(path)] = path.read_bytes().decode("latin-1")  # any bytes: a literal search
    return found


def test_llm_key_is_used_but_never_stored_logged_or_shown(tmp_path: Path, monkeypatch, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with OpenAIStub(required_key=SECRET) as stub:
        stub.faults += [
            Fault(
                "status", status=500, step="artifact_extraction", times=1, body="upstream error for {auth}"
            ),
            Fault("status", status=400, step="qa_generation", times=1, body="bad request from {auth}"),
        ]
        instance, result, home = run_synthetic_qa(tmp_path, stub, monkeypatch)
        assert result.success
        assert stub.count() > 0 and {c.authorization for c in stub.calls} == {f"Bearer {SECRET}"}
        assert stub.count(status=400) == 1  # the echoing error reached the client

    meta = instance.get_latest_materialization_event(
        dg.AssetKey("synthetic_qa")
    ).asset_materialization.metadata
    assert meta["dropped_request_failed"].value == 1 and meta["chunks_failed"].value >= 1
    printed = capfd.readouterr()
    found = texts_of_the_run(instance, result.run_id, home, tmp_path / "artifacts")
    found["stdout"], found["stderr"], found["python logs"] = printed.out, printed.err, caplog.text
    assert len([k for k in found if k.startswith("event")]) > 10
    assert any(
        str(tmp_path / "artifacts" / "cache" / "sdg") in k for k in found
    )  # the SDG cache was searched
    # the echoed key was redacted in the warning, which reached the Dagster event log
    assert any("bad request from Bearer ***" in t for k, t in found.items() if k.startswith("event"))
    assert any("stub-model" in text for text in found.values())  # the search does find what runs store
    leaks = [where for where, text in found.items() if SECRET in text]
    assert leaks == []


def test_rejected_llm_key_fails_the_run_without_showing_it(
    tmp_path: Path, monkeypatch, capfd, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    with OpenAIStub() as stub:
        stub.faults.append(Fault("status", status=401, times=None, body="key {auth} is not valid"))
        instance, result, home = run_synthetic_qa(tmp_path, stub, monkeypatch)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    error = failure.step_failure_data.error
    user_error = error.cause or error
    assert user_error.cls_name == LLMConfigError.__name__
    assert "HTTP 401" in user_error.message and "key Bearer *** is not valid" in user_error.message
    printed = capfd.readouterr()
    found = texts_of_the_run(instance, result.run_id, home, tmp_path / "artifacts")
    found["stdout"], found["stderr"], found["python logs"] = printed.out, printed.err, caplog.text
    found["exception"] = user_error.to_string()
    assert [where for where, text in found.items() if SECRET in text] == []


def test_the_resource_holds_the_variable_name_not_the_value(monkeypatch) -> None:
    """What the code location holds (and the UI shows) is the variable's name; the value is read at run time."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    resource = LLMResource(api_key=dg.EnvVar(KEY_ENV))
    assert KEY_ENV in repr(resource) and SECRET not in repr(resource)


@pytest.mark.parametrize("where", ["repr", "fingerprint", "settings"])
def test_generator_surfaces_never_carry_the_key(where: str) -> None:
    from embed_assets.sdg.llm import LLMEndpoint, LLMQAGenerator

    endpoint = LLMEndpoint(base_url="http://127.0.0.1:9/v1", api_key=SECRET)
    gen = LLMQAGenerator(endpoint=endpoint, embedder=lambda t: t)
    try:
        text = {
            "repr": repr(gen),
            "fingerprint": gen.fingerprint,
            "settings": str(gen.settings.model_dump()) + repr(gen.endpoint),
        }
        assert SECRET not in text[where]
    finally:
        gen.close()
