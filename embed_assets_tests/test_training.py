from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embed_assets.chunking import chunk_corpus
from embed_assets.corpus import read_corpus
from embed_assets.models import BUNDLED_MODEL
from embed_assets.sdg.offline import InverseClozeGenerator
from embed_assets.stages.train import TrainSettings
from embed_assets.training import train, training_rows


def _rows(corpus: Path, n: int = 24) -> list[dict[str, str]]:
    chunks, _ = chunk_corpus(read_corpus(corpus).documents)
    records = InverseClozeGenerator().generate(chunks).records[:n]
    texts = [c.text for c in chunks]
    mined = [
        {
            "query": r.query,
            "positive_text": next(c.text for c in chunks if c.chunk_id == r.positive_chunk_ids[0]),
            # Every third row kept no negative after the margin: it trains on in-batch negatives only.
            "negative_texts": []
            if i % 3 == 2
            else [texts[(i + 3) % len(texts)], texts[(i + 7) % len(texts)]],
        }
        for i, r in enumerate(records)
    ]
    return training_rows(mined)


def test_training_rows_keep_what_each_row_has() -> None:
    """A row with fewer mined negatives keeps its row (fewer negatives, or none: in-batch only)."""
    mined = [
        {"query": "q", "positive_text": "p", "negative_texts": ["a", "b", "c"]},
        {"query": "q2", "positive_text": "p2", "negative_texts": ["d"]},
        {"query": "q3", "positive_text": "p3", "negative_texts": []},
    ]
    assert training_rows(mined, negatives_per_row=2) == [
        {"anchor": "q", "positive": "p", "negative_1": "a", "negative_2": "b"},
        {"anchor": "q2", "positive": "p2", "negative_1": "d"},
        {"anchor": "q3", "positive": "p3"},
    ]
    assert training_rows(mined, negatives_per_row=0) == [
        {"anchor": q, "positive": p} for q, p in (("q", "p"), ("q2", "p2"), ("q3", "p3"))
    ]


def test_rows_with_different_negatives_train_as_one_dataset_per_count() -> None:
    from embed_assets.training import _datasets

    rows = training_rows(
        [
            {"query": "q", "positive_text": "p", "negative_texts": ["a", "b"]},
            {"query": "q2", "positive_text": "p2", "negative_texts": ["d", "e"]},
            {"query": "q3", "positive_text": "p3", "negative_texts": []},
        ]
    )
    datasets = _datasets(rows)
    assert sorted(datasets) == ["negatives_0", "negatives_2"]
    assert datasets["negatives_2"].column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert datasets["negatives_0"]["anchor"] == ["q3"]
    assert _datasets(rows[:2]).num_rows == 2  # one layout: one plain dataset


def test_validation_scores_at_the_serving_window_not_the_training_window() -> None:
    """The answer sits past the training window: validation at the saved window sees it, then restores 16."""
    from embed_assets.models import load_sentence_transformer
    from embed_assets.training import windowed_evaluator

    filler = " ".join(
        ["Boil the pasta in salted water, stir it often and drain it when soft."] * 2
    )  # ~34 tokens
    val = {
        "queries": {"q": "What is the capital city of Australia?"},
        "corpus": {
            "answer": f"{filler} Canberra is the capital city of Australia.",
            "near": "Kangaroos hop across the dry outback of Australia.",
            "far": "A guide to knitting warm wool socks for winter.",
        },
        "relevant_docs": {"q": {"answer"}},
    }
    model = load_sentence_transformer(BUNDLED_MODEL)
    model.max_seq_length = 16  # the training window
    at_serving = windowed_evaluator(val, 256)(model)["val_cosine_ndcg@10"]
    assert model.max_seq_length == 16
    evaluator = windowed_evaluator(val, 16)
    at_training = evaluator(model)["val_cosine_ndcg@10"]
    assert evaluator.per_query == {"q": pytest.approx(at_training)}  # per query, for paired comparisons
    assert at_serving == pytest.approx(1.0) and at_training < 1.0


def test_a_validation_window_beyond_the_model_is_refused_before_training(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    rows = _rows(tiny_corpus, n=4)
    val = {
        "queries": {"q": rows[0]["anchor"]},
        "corpus": {"p": rows[0]["positive"]},
        "relevant_docs": {"q": {"p"}},
    }
    settings = TrainSettings(max_steps=1, batch_size=2, validation_max_seq_length=4096)
    with pytest.raises(ValueError, match="max_seq_length=4096 exceeds"):
        train(BUNDLED_MODEL, rows, tmp_path / "work", tmp_path / "model", settings, val=val)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(("configured", "trained"), [(0, 256), (48, 48)])
def test_training_runs_at_the_base_models_window_unless_set(
    tmp_path: Path, tiny_corpus: Path, configured: int, trained: int
) -> None:
    from transformers import TrainerCallback

    seen: list[int] = []

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.max_seq_length)

    settings = TrainSettings(max_steps=1, batch_size=2, max_seq_length=configured)
    rows = _rows(tiny_corpus, n=4)
    report = train(BUNDLED_MODEL, rows, tmp_path / "work", tmp_path / "model", settings, callbacks=[Window()])
    assert seen == [trained] and report.train_window == trained
    recorded = json.loads((tmp_path / "model" / "embed_assets_training.json").read_text())
    assert recorded["train_max_seq_length"] == trained and recorded["saved_max_seq_length"] == 256


@pytest.mark.slow
def test_train_updates_weights_saves_and_resumes(tmp_path: Path, tiny_corpus: Path, capfd) -> None:
    from sentence_transformers import SentenceTransformer

    from embed_assets import quiet
    from embed_assets.models import load_sentence_transformer

    quiet.configure()  # as the code location does when it loads
    rows = _rows(tiny_corpus)
    settings = TrainSettings(
        max_steps=4, batch_size=8, max_seq_length=48, save_steps=2, logging_steps=1, learning_rate=5e-5
    )
    lines: list[str] = []
    report = train(
        BUNDLED_MODEL, rows, tmp_path / "work", tmp_path / "model", settings, progress=lines.append
    )
    assert report.steps == 4 and report.device == "cpu" and report.resumed_from is None
    assert len(report.loss_curve) == 4 and all(np.isfinite(v) for _, v in report.loss_curve)
    assert any("ETA" in line for line in lines)
    # Progress goes through `progress` (the run's logger), never raw trainer dicts or bars on stdout/stderr.
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err and "'grad_norm'" not in out + err and "it/s]" not in out + err
    assert "first step" in lines[0] and any("steps/s ETA" in line for line in lines)

    tuned = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    base = load_sentence_transformer(BUNDLED_MODEL)
    text = [rows[0]["anchor"]]
    assert not np.allclose(tuned.encode(text), base.encode(text))  # the weights moved
    # Trained at 48 tokens, saved with the base model's window (what evaluation and serving use).
    assert tuned.max_seq_length == base.max_seq_length == 256
    recorded = json.loads((tmp_path / "model" / "embed_assets_training.json").read_text())
    assert recorded["train_max_seq_length"] == 48 and recorded["saved_max_seq_length"] == 256

    # A second call with more steps picks up the trainer checkpoint instead of starting over.
    more = TrainSettings(**{**settings.model_dump(), "max_steps": 6})
    again = train(BUNDLED_MODEL, rows, tmp_path / "work", tmp_path / "model2", more)
    assert again.resumed_from is not None and again.resumed_from.endswith("checkpoint-4")
    assert again.steps == 6


def test_matryoshka_rotation_orders_coordinates_by_variance_and_keeps_similarities(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    """The rotation is orthogonal (full-size similarities unchanged), frozen, saved, and puts variance first."""
    from embed_assets.merging import interpolate
    from embed_assets.models import load_sentence_transformer
    from embed_assets.training import add_variance_rotation

    rows = _rows(tiny_corpus)
    texts = sorted({r["positive"] for r in rows})
    model = load_sentence_transformer(BUNDLED_MODEL, max_seq_length=64)
    before = model.encode(texts)
    shares = add_variance_rotation(model, texts)
    after = model.encode(texts)
    np.testing.assert_allclose(after @ after.T, before @ before.T, atol=1e-5)  # a rotation: same similarities
    assert type(model[-1]).__name__ == "Dense" and not any(p.requires_grad for p in model[-1].parameters())
    assert len(shares) == 384 and shares[-1] == pytest.approx(1.0) and np.all(np.diff(shares) >= -1e-12)

    # The leading coordinates hold more of the texts' energy than the base model's own first ones (the tiny
    # corpus has fewer texts than 96 dimensions, so the check is at 8).
    def energy(e: np.ndarray, d: int) -> float:
        return float((e[:, :d] ** 2).sum() / (e**2).sum())

    assert energy(after, 8) == pytest.approx(shares[7], abs=0.02)
    assert energy(after, 8) > energy(before, 8) + 0.1, (energy(after, 8), energy(before, 8))

    model.save(str(tmp_path / "rotated"))
    loaded = load_sentence_transformer(str(tmp_path / "rotated"), max_seq_length=64)
    np.testing.assert_allclose(loaded.encode(texts), after, atol=1e-5)
    # Merging with the base keeps the appended layer: at weight 0 it is the base model, rotated.
    merged = load_sentence_transformer(
        str(interpolate(BUNDLED_MODEL, tmp_path / "rotated", 0.0, tmp_path / "m"))
    )
    np.testing.assert_allclose(merged.encode(texts), after, atol=1e-5)
