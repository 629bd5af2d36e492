"""The whole pipeline through Dagster's real machinery, on a tiny corpus, asserting on real outputs."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from embed_assets.definitions import ALL_ASSETS, pipeline_resources
from embed_assets.defs.resources import ArtifactStore, MLflowTracking

pytestmark = pytest.mark.slow


def _run_config(corpus: Path) -> dict:
    return {
        "ops": {
            "corpus": {"config": {"path": str(corpus)}},
            "corpus_chunks": {"config": {"sentences_per_chunk": 5, "passage_max_length": 256}},
            "checkpoint": {
                "config": {"max_steps": 6, "batch_size": 8, "max_seq_length": 64, "save_steps": 3}
            },
        }
    }


def metrics_window(instance: dg.DagsterInstance) -> int:
    return _metadata(instance, "beir_metrics")["eval_max_seq_length"].value


def _metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was not materialized"
    return event.asset_materialization.metadata


@pytest.fixture
def pipeline_run(tmp_path: Path, tiny_corpus: Path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    instance = dg.DagsterInstance.local_temp(str(home))
    result = dg.materialize(
        ALL_ASSETS,
        instance=instance,
        # The code location's resources (manifests stored as JSON); MLflow in its default local store:
        # SQLite + artifacts under the (temporary) artifact root.
        resources=pipeline_resources(
            ArtifactStore(root=str(tmp_path / "artifacts")), tracking=MLflowTracking(experiment="e2e")
        ),
        run_config=_run_config(tiny_corpus),
    )
    yield result, instance, tmp_path / "artifacts"
    pid = _metadata(instance, "nim_service").get("pid")
    if pid is not None:
        from embed_assets.serving.process import stop_server

        stop_server(int(pid.value))


def test_pipeline_end_to_end(pipeline_run) -> None:
    import httpx
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    from embed_assets.beir_io import load_beir_folder
    from embed_assets.serving.embedder import OnnxEmbedder

    result, instance, artifacts = pipeline_run
    assert result.success
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert materialized == {a.key.path[-1] for a in ALL_ASSETS} - {"tensorrt_engine"}

    # tensorrt_engine is skipped here (no CUDA) with its reason observed, not silently.
    observations = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    reasons = [o.event_specific_data.asset_observation.metadata["reason"].value for o in observations]
    assert any("CUDA" in r or "tensorrt" in r.lower() for r in reasons)

    # Every asset check passed.
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["no_document_leakage"] and checks["onnx_fp32_parity"]

    # The checkpoint loads and embeds.
    ckpt = result.output_for_node("checkpoint")
    model = SentenceTransformer(ckpt.model_dir, device="cpu")
    emb = model.encode(["What does the with statement do?"], normalize_embeddings=True)
    assert emb.shape == (1, 384)
    assert _metadata(instance, "checkpoint")["device"].value == "cpu"

    # Base and fine-tuned were evaluated at one window, the base model's (training ran at 64 tokens).
    assert metrics_window(instance) == result.output_for_node("beir_metrics").eval_max_seq_length == 256

    # The model card states facts and metrics, and quotes no text of the corpus.
    card = (Path(ckpt.model_dir) / "README.md").read_text()
    assert "base_model: bundled:all-MiniLM-L6-v2" in card and "| generated_test |" in card
    from embed_assets.stages.sdg import load_pairs

    pairs = load_pairs(result.output_for_node("synthetic_qa").path)
    assert not [p.query for p in pairs if p.query in card]
    chunks = result.output_for_node("corpus_chunks").load()
    assert not [c.text[:80] for c in chunks if c.text[:80] in card]

    # The ONNX model embeds like the checkpoint.
    onnx_dir = result.output_for_node("onnx_model").onnx_dir
    onnx_emb = OnnxEmbedder(onnx_dir).encode(["What does the with statement do?"], input_type="query")
    assert float(np.dot(onnx_emb[0], emb[0])) > 0.999

    # The service answers /v1/embeddings with the same vector.
    service = result.output_for_node("nim_service")
    resp = httpx.post(
        f"{service.url}/v1/embeddings",
        json={
            "input": ["What does the with statement do?"],
            "model": httpx.get(f"{service.url}/v1/models").json()["data"][0]["id"],
            "input_type": "query",
        },
        timeout=30,
    )
    assert resp.status_code == 200
    served = np.array(resp.json()["data"][0]["embedding"], dtype=np.float32)
    assert float(np.dot(served, emb[0])) > 0.999

    # Metrics are in [0, 1] and equal pytrec_eval's on the very run file the asset wrote.
    metrics = result.output_for_node("beir_metrics")
    for side in ("base", "finetuned"):
        assert all(0.0 <= v <= 1.0 for v in getattr(metrics, side).values())
    _, _, qrels = load_beir_folder(result.output_for_node("split_sets").eval_beir, split="test")
    run = json.loads((Path(metrics.path).parent / "run_finetuned.json").read_text())
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10"})
    scores = evaluator.evaluate(run)
    ndcg = np.mean([scores[q]["ndcg_cut_10"] if q in scores else 0.0 for q in qrels])
    recall = np.mean([scores[q]["recall_10"] if q in scores else 0.0 for q in qrels])
    assert metrics.finetuned["NDCG@10"] == pytest.approx(ndcg, abs=1e-9)
    assert metrics.finetuned["Recall@10"] == pytest.approx(recall, abs=1e-9)

    # One MLflow run holds the training (params, per-step loss, curve PNG, model) and the BEIR table.
    from mlflow import MlflowClient

    from embed_assets.tracking import default_tracking_uri

    assert (artifacts / "mlflow.db").is_file()
    run_id = ckpt.mlflow_run_id
    ckpt_meta = _metadata(instance, "checkpoint")
    assert (
        ckpt_meta["mlflow_run_id"].value
        == run_id
        == _metadata(instance, "beir_metrics")["mlflow_run_id"].value
    )
    assert ckpt_meta["mlflow_run"].value.endswith(f"/runs/{run_id}")
    assert "mlflow ui --backend-store-uri" in ckpt_meta["mlflow_ui_command"].value
    assert "](data:image/png;base64,iVBORw0KGgo" in ckpt_meta["training_curves"].value
    assert Path(ckpt_meta["training_curves_png"].value).read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(tracking_uri=default_tracking_uri(artifacts))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dagster/run_id"] == result.run_id
    params = run.data.params
    assert params["learning_rate"] == "5e-05" and params["max_steps"] == "6" and params["batch_size"] == "8"
    assert params["base_model"] == "bundled:all-MiniLM-L6-v2" and int(params["data/train_rows"]) > 0
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [
        5
    ]  # logging_steps=5, 6 steps
    assert run.data.metrics["checkpoint/steps"] == 6
    assert run.data.metrics["beir/finetuned/NDCG_at_10"] == pytest.approx(metrics.finetuned["NDCG@10"])
    assert run.data.metrics["beir/base/NDCG_at_10"] == pytest.approx(metrics.base["NDCG@10"])
    model_files = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    assert {"config.json", "modules.json", "tokenizer.json"} <= model_files
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/training_curves.png"]
    assert "beir/metrics_table.json" in {a.path for a in client.list_artifacts(run_id, "beir")}
