"""A real SIGKILL part-way through LLM generation and through training; the re-run repeats no finished work.

The work runs in a child process (``workers.py``) that the test kills with SIGKILL; the scripted LLM server
runs in the test process, so it counts every call the child makes, per step and per chunk.
"""

from __future__ import annotations

import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

from embed_assets.sdg.cache import SDGCache
from embed_assets.storage import read_json, read_jsonl
from embed_assets_tests.openai_stub_server import Fault, OpenAIStub
from embed_assets_tests.reliability.conftest import Children, child_env, wait_for
from embed_assets_tests.reliability.workers import SDG_DOCS, TRAIN_SETTINGS, sdg_chunks

pytestmark = pytest.mark.slow

CLEAN_CALLS = 3 * sum(len(t) for t in SDG_DOCS.values())  # 3 steps per one-chunk bundle


def answered(stub: OpenAIStub) -> list[tuple[str, tuple[str, ...]]]:
    """(step, segment texts) of every request that got a good (possibly slow) answer."""
    return [(c.step, tuple(c.segments)) for c in stub.calls if c.status == 200 and c.fault in ("", "slow")]


def test_sigkill_during_llm_generation_then_rerun_repeats_no_finished_call(
    stub: OpenAIStub, children: Children, tmp_path: Path
) -> None:
    stub.faults.append(Fault("slow", delay_s=0.05, times=None))  # ~2 s of calls: time to kill part-way
    cache = tmp_path / "cache"
    proc = children.start("sdg", stub.base_url, str(cache), str(tmp_path / "killed.jsonl"))
    wait_for(lambda: stub.count() >= 14 or proc.poll() is not None, 90, "14 LLM calls from the child")
    assert proc.poll() is None, f"the child finished before the kill:\n{children.log(proc)}"
    children.kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.jsonl").exists()  # it never got to write its output

    served_before = answered(stub)
    # What the killed run stored: every entry is a committed SQLite row, none half-written.
    stored = SDGCache(cache)
    text = {c.chunk_id: c.text for c in sdg_chunks()}
    stored_calls = {(e["step"], tuple(text[cid] for cid in e["chunk_ids"])) for e in stored.raw_entries()}
    finished_docs = {r.doc_id for r in stored.records()}
    stored.close()
    assert 0 < len(stored_calls) < CLEAN_CALLS
    assert stored_calls <= set(served_before)
    # one request at a time: at most the call in flight at the kill was answered but not stored
    assert len(set(served_before) - stored_calls) <= 1

    stub.reset()  # the endpoint is healthy and fast again
    children.run("sdg", stub.base_url, str(cache), str(tmp_path / "resumed.jsonl"))
    served_after = answered(stub)
    assert not stored_calls & set(served_after), "a call whose answer was stored was repeated"
    finished_texts = {t for d in finished_docs for t in SDG_DOCS[d]}
    assert not [c for c in served_after if set(c[1]) & finished_texts], "a finished document was asked again"
    per_step_and_chunk = Counter(served_before + served_after)
    assert len(per_step_and_chunk) == CLEAN_CALLS  # every (step, chunk) answered ...
    repeats = sum(n - 1 for n in per_step_and_chunk.values())
    assert repeats == len(set(served_before) - stored_calls) <= 1  # ... once, but the in-flight one
    print(
        f"killed after {len(served_before)} calls ({len(stored_calls)} stored); re-run made {len(served_after)}"
    )

    stub.reset()
    children.run("sdg", stub.base_url, str(tmp_path / "clean-cache"), str(tmp_path / "clean.jsonl"))
    assert stub.count() == CLEAN_CALLS
    clean = read_jsonl(tmp_path / "clean.jsonl")
    assert clean and read_jsonl(tmp_path / "resumed.jsonl") == clean


@pytest.fixture(scope="module")
def killed_and_resumed_training(tmp_path_factory: pytest.TempPathFactory):
    """Train in a child, SIGKILL it right after its first complete trainer checkpoint, train again."""
    tmp = tmp_path_factory.mktemp("train")
    kids = Children(tmp)
    work, out = tmp / "work", tmp / "model"
    # one torch thread: on a small shared CPU two threads contending with other jobs are much slower
    env = child_env(OMP_NUM_THREADS="1", WORKER_PAUSE_AFTER_SAVE_S="30")
    try:
        proc = kids.start("train", str(work), str(out), str(tmp / "first.json"), env=env)
        state = work / "checkpoint-2" / "trainer_state.json"  # written last: the checkpoint is complete
        wait_for(lambda: state.exists() or proc.poll() is not None, 300, "checkpoint-2", poll_s=0.05)
        assert proc.poll() is None, f"training ended before the kill:\n{kids.log(proc)}"
        kids.kill(proc)
        at_kill = {
            "returncode": proc.returncode,
            "checkpoints": sorted(p.name for p in work.glob("checkpoint-*")),
            "out_exists": out.exists(),
            "report_exists": (tmp / "first.json").exists(),
        }
        kids.run("train", str(work), str(out), str(tmp / "second.json"), env=child_env(OMP_NUM_THREADS="1"))
        yield tmp, at_kill, read_json(tmp / "second.json")
    finally:
        kids.cleanup()


def test_sigkill_during_training_then_rerun_resumes_from_the_checkpoint(killed_and_resumed_training) -> None:
    tmp, at_kill, report = killed_and_resumed_training
    assert at_kill == {
        "returncode": -signal.SIGKILL,
        "checkpoints": ["checkpoint-2"],
        "out_exists": False,  # the final model folder only appears, whole, at the end
        "report_exists": False,
    }
    assert report["resumed_from"] == str(tmp / "work" / "checkpoint-2")
    assert report["steps"] == TRAIN_SETTINGS["max_steps"]
    # only the remaining steps ran (logging every step): nothing before the checkpoint was trained again
    assert [step for step, _ in report["loss_curve"]] == [3, 4, 5, 6]
    model = tmp / "model"
    assert (model / "model.safetensors").is_file() and (model / "embed_assets_training.json").is_file()


def test_checkpoint_interrupted_mid_save_is_not_resumed_from(
    killed_and_resumed_training, tmp_path: Path
) -> None:
    from embed_assets.models import BUNDLED_MODEL
    from embed_assets.stages.train import TrainSettings
    from embed_assets.training import train
    from embed_assets_tests.reliability.workers import train_rows

    tmp, _, _ = killed_and_resumed_training
    work = tmp_path / "work"
    shutil.copytree(tmp / "work" / "checkpoint-6", work / "checkpoint-6")  # complete
    partial = work / "checkpoint-8"  # what a SIGKILL right after the folder appeared leaves
    partial.mkdir()
    shutil.copy(tmp / "work" / "checkpoint-6" / "config.json", partial / "config.json")
    report = train(
        BUNDLED_MODEL,
        train_rows(),
        work,
        tmp_path / "model",
        TrainSettings(**{**TRAIN_SETTINGS, "max_steps": 8}),
    )
    assert report.resumed_from == str(work / "checkpoint-6") and report.steps == 8
