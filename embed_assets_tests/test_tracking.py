"""MLflow tracking and the torchrun entry point: a real (tiny) training logged into a real SQLite store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from embed_assets.stages.train import TrainSettings
from embed_assets.tracking import (
    MLflowTracker,
    default_tracking_uri,
    flatten_params,
    make_callback,
    metric_name,
    numeric_metrics,
    plot_training_curves,
    png_data_uri,
    redact_uri,
    resolve_tracking_uri,
    run_link,
)
from embed_assets.training_cli import (
    TRACKING_URI_ENV,
    distributed_processes,
    main,
    read_report,
    torchrun_command,
    write_spec,
)


# ------------------------------------------------------------------------------------------ pure helpers
def test_uris_names_and_params(tmp_path: Path) -> None:
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("", tmp_path) == default_tracking_uri(tmp_path)
    assert resolve_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    assert resolve_tracking_uri(str(tmp_path / "runs"), tmp_path) == (tmp_path / "runs").resolve().as_uri()
    assert redact_uri("https://alice:s3cret@mlflow.example:8443/x") == "https://***@mlflow.example:8443/x"
    assert redact_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"
    assert metric_name("eval_val_cosine_ndcg@10") == "eval_val_cosine_ndcg_at_10"
    assert metric_name("a(b)") == "a_b_"
    # Credential-looking keys never reach the store; nested settings are flattened; None is skipped.
    flat = flatten_params({"lr": 1e-5, "api_key": "x", "llm": {"token": "y", "model": "m"}, "none": None})
    assert flat == {"lr": "1e-05", "llm/model": "m"}
    assert numeric_metrics({"a": 1, "b": True, "c": "x", "d": float("nan"), "e@1": 0.5}) == {
        "a": 1.0,
        "e_at_1": 0.5,
    }


def test_run_links() -> None:
    local = run_link("sqlite:////data/mlflow.db", "3", "abc", "/data")
    assert local.url == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert local.ui_command.startswith("mlflow ui --backend-store-uri 'sqlite:////data/mlflow.db'")
    assert "mlflow ui" in local.markdown()
    db = run_link("postgresql://u:pw@db:5432/mlflow", "1", "r", "/data")
    assert db.ui_command.startswith("mlflow ui --backend-store-uri 'postgresql://***@db:5432/mlflow'")
    assert run_link("databricks", "1", "r").url == ""
    remote = run_link("https://bob:pw@mlflow.example/", "7", "def")
    assert remote.url == "https://***@mlflow.example/#/experiments/7/runs/def"
    assert remote.ui_command is None and "pw" not in remote.markdown()


def test_curve_png_and_data_uri(tmp_path: Path) -> None:
    png = plot_training_curves([(1, 2.0), (2, 1.5), (3, 1.2)], [(3, 0.41)], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_data_uri(png).startswith("data:image/png;base64,iVBORw0KGgo")
    # No eval points: one panel, still a valid PNG.
    assert plot_training_curves([], [], tmp_path / "empty.png").stat().st_size > 0


def test_callback_metric_names_and_main_process_only() -> None:
    calls = []

    class Recorder:
        def log_metrics(self, run_id, values, step=None, prefix=""):
            calls.append((run_id, dict(values), step))

    cb = make_callback(Recorder(), "run")
    main_proc = SimpleNamespace(is_world_process_zero=True, global_step=7)
    cb.on_log(None, main_proc, None, logs={"loss": 0.5, "learning_rate": 1e-5})
    cb.on_log(None, main_proc, None, logs={"eval_val_cosine_ndcg@10": 0.8})
    cb.on_log(None, main_proc, None, logs={"train_loss": 0.6, "train_runtime": 3.0})
    cb.on_log(None, SimpleNamespace(is_world_process_zero=False, global_step=7), None, logs={"loss": 9.0})
    assert calls == [
        ("run", {"train/loss": 0.5, "train/learning_rate": 1e-5}, 7),
        ("run", {"eval/val_cosine_ndcg@10": 0.8}, 7),  # made MLflow-safe by log_metrics
        ("run", {"train/train_loss": 0.6, "train/train_runtime": 3.0}, 7),  # never mixed into train/loss
    ]


def test_callback_never_breaks_training_on_tracking_errors(caplog) -> None:
    class Broken:
        def log_metrics(self, *a, **k):
            raise ConnectionError("tracking server down")

    cb = make_callback(Broken(), "run")
    state = SimpleNamespace(is_world_process_zero=True, global_step=1)
    cb.on_log(None, state, None, logs={"loss": 1.0})
    cb.on_log(None, state, None, logs={"loss": 0.9})  # disabled after the first failure: no second warning
    assert cb.failed
    assert sum("tracking server down" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------ multi-GPU
def test_distributed_processes_decision() -> None:
    assert distributed_processes(1, "cuda", 8) == 1
    assert distributed_processes(4, "cpu", 0) == 1  # no CUDA: in-process
    assert distributed_processes(4, "cuda", 1) == 1
    assert distributed_processes(4, "cuda", 2) == 2  # capped at the devices present
    assert distributed_processes(4, "cuda", 8) == 4
    assert distributed_processes(4, "cuda:3", 8) == 1  # a specific GPU was asked for


def test_torchrun_command() -> None:
    cmd = torchrun_command("/w/ddp/spec.json", 4)
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", "4", "-m", "embed_assets.training_cli", "--spec", "/w/ddp/spec.json",
    ]  # fmt: skip
    pinned = torchrun_command("s.json", 2, python="/venv/bin/python", master_port=29511)
    assert pinned[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    assert pinned[3:7] == ["--master_addr", "127.0.0.1", "--master_port", "29511"]
    with pytest.raises(ValueError):
        torchrun_command("s.json", 0)


def test_spec_round_trip(tmp_path: Path) -> None:
    val = {"queries": {"q": "x?"}, "corpus": {"c": "x."}, "relevant_docs": {"q": {"c"}}}
    settings = TrainSettings(max_steps=2, learning_rate=3e-5)
    path = write_spec(
        tmp_path / "ddp", base_model="m", rows=[{"anchor": "a", "positive": "p"}], work_dir=tmp_path / "w",
        out_dir=tmp_path / "o", settings=settings, device="cuda", val=val, tracking={"run_id": "r"},
    )  # fmt: skip
    spec = json.loads(path.read_text())
    assert spec["settings"] == settings.model_dump() and TrainSettings(**spec["settings"]) == settings
    assert spec["val"]["relevant_docs"] == {"q": ["c"]} and spec["device"] == "cuda"
    assert Path(spec["rows_path"]).read_text().strip() == '{"anchor": "a", "positive": "p"}'
    assert spec["tracking"] == {"run_id": "r"} and spec["report_path"].endswith("report.json")


def test_spec_never_holds_the_tracking_uri(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=TRACKING_URI_ENV):
        write_spec(
            tmp_path, base_model="m", rows=[], work_dir=tmp_path, out_dir=tmp_path / "o",
            settings=TrainSettings(), device="cpu", tracking={"run_id": "r", "tracking_uri": "https://u:p@h"},
        )  # fmt: skip


# ------------------------------------------------------------------------ a real run, end to end
@pytest.fixture(scope="module")
def tracked_training(tmp_path_factory, bundled_model_path):
    """A 2-step training through the worker entry point, logging to a fresh SQLite store."""
    from embed_assets.models import BUNDLED_MODEL

    root = tmp_path_factory.mktemp("tracking")
    tracker = MLflowTracker("", "embed_assets_test", root / "artifacts")
    run_id = tracker.start_run("unit", tags={"dagster/run_id": "r0", "secret_token": "nope"})
    settings = TrainSettings(max_steps=2, batch_size=4, max_seq_length=32, logging_steps=1, save_steps=100)
    logged_params = tracker.log_params(
        run_id, {**settings.model_dump(), "base_model": BUNDLED_MODEL, "data/rows": 12}
    )
    rows = [
        {
            "anchor": f"what is topic {i}?",
            "positive": f"Topic {i} is about item {i}.",
            "negative_1": f"Item {i + 20}.",
        }
        for i in range(12)
    ]
    spec = write_spec(
        root / "ddp",
        base_model=BUNDLED_MODEL,
        rows=rows,
        work_dir=root / "work",
        out_dir=root / "model",
        settings=settings,
        device="cpu",
        tracking={
            "run_id": run_id,
            "experiment": "embed_assets_test",
            "artifact_root": str(root / "artifacts"),
        },
    )
    assert "sqlite" not in spec.read_text()  # the URI travels in the environment only
    mp = pytest.MonkeyPatch()
    mp.setenv(TRACKING_URI_ENV, tracker.tracking_uri)
    try:
        assert main(["--spec", str(spec)]) == 0
    finally:
        mp.undo()
    report = read_report(json.loads(spec.read_text())["report_path"])
    png = plot_training_curves(report.loss_curve, report.eval_curve, root / "curves.png")
    tracker.log_metrics(run_id, report.as_metadata(), step=report.steps, prefix="checkpoint/")
    tracker.log_file(run_id, png, "plots")
    assert tracker.log_model_dir(run_id, report.model_dir)
    tracker.finish(run_id)
    rows_cmp = [{"metric": "NDCG@10", "base": 0.5, "tuned": 0.6, "delta": 0.1, "delta_pct": 20.0}]
    tracker.log_beir(run_id, {"NDCG@10": 0.5}, {"NDCG@10": 0.6}, rows_cmp, "| table |", source="t")
    return SimpleNamespace(tracker=tracker, run_id=run_id, report=report, root=root, params=logged_params)


def test_training_is_logged_into_one_mlflow_run(tracked_training) -> None:
    t = tracked_training
    assert (t.root / "artifacts" / "mlflow.db").is_file()  # the local default store, under the artifact root
    client = t.tracker.client
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "5e-05" and run.data.params["base_model"].startswith(
        "bundled:"
    )
    assert run.data.params["data/rows"] == "12" and run.data.params["trainer/max_steps"] == "2"
    assert "secret_token" not in run.data.tags
    # Per-step loss from the trainer callback, at the trainer's steps.
    loss = client.get_metric_history(t.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2] == [s for s, _ in t.report.loss_curve]
    assert run.data.metrics["train/train_loss"] > 0  # the end-of-training summary, apart from the curve
    assert run.data.metrics["checkpoint/steps"] == 2
    assert run.data.metrics["beir/delta/NDCG_at_10"] == pytest.approx(0.1)
    # Artifacts: the model folder, the curve PNG, the BEIR table, all under the artifact root.
    top = {a.path for a in client.list_artifacts(t.run_id)}
    assert {"model", "plots", "beir"} <= top
    model_files = {Path(a.path).name for a in client.list_artifacts(t.run_id, "model")}
    assert {"config.json", "modules.json", "embed_assets_training.json"} <= model_files
    assert [a.path for a in client.list_artifacts(t.run_id, "plots")] == ["plots/curves.png"]
    assert "beir/metrics_table.json" in {a.path for a in client.list_artifacts(t.run_id, "beir")}
    assert run.info.artifact_uri.startswith((t.root / "artifacts" / "mlartifacts").resolve().as_uri())
    link = t.tracker.link(t.run_id)
    assert link.url.endswith(f"/#/experiments/{run.info.experiment_id}/runs/{t.run_id}")


def test_resource_default_store_and_disabled(tmp_path: Path) -> None:
    from embed_assets.defs.resources import MLflowTracking

    tracker = MLflowTracking().tracker(tmp_path)
    assert tracker.tracking_uri == default_tracking_uri(tmp_path) and tracker.experiment == "embed_assets"
    assert MLflowTracking(enabled=False).tracker(tmp_path) is None
    assert MLflowTracking(tracking_uri="http://h:5000").tracker(tmp_path).tracking_uri == "http://h:5000"


def test_resumed_training_reopens_its_run(tracked_training, tmp_path: Path, caplog) -> None:
    tracker = tracked_training.tracker
    marker = tmp_path / "work" / "mlflow_run_id.txt"
    first, reopened = tracker.resume_or_start(marker, resuming=False, run_name="a")
    assert not reopened and marker.read_text() == first
    tracker.finish(first, "FAILED")  # the training was interrupted
    again, reopened = tracker.resume_or_start(marker, resuming=True, run_name="b")
    assert (again, reopened) == (first, True) and tracker.client.get_run(first).info.status == "RUNNING"
    # Params are write-once in MLflow: logging them again on resume is a no-op, a changed value a warning.
    tracker.log_params(first, {"lr": 1})
    tracker.log_params(first, {"lr": 2, "x": 3})
    assert tracker.client.get_run(first).data.params == {"lr": "1", "x": "3"}
    assert any("already '1'" in r.getMessage() for r in caplog.records)
    tracker.finish(first)
    fresh, reopened = tracker.resume_or_start(marker, resuming=True)  # a finished run is never reopened
    assert fresh != first and not reopened
    assert tracker.resume_or_start(marker, resuming=False)[0] not in (first, fresh)
