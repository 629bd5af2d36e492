"""Model merging: weight interpolation, and the choice of the served model on validation data."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from embed_assets.models import BUNDLED_MODEL
from embed_assets.stages.common import ModelSpec, StageContext
from embed_assets.stages.evaluate import EvalSettings, evaluate_checkpoint
from embed_assets_tests.conftest import model_checkpoint, perturbed_model

MODEL = ModelSpec(BUNDLED_MODEL, device="cpu")


def test_interpolation_is_linear_in_the_weights(tmp_path: Path) -> None:
    from embed_assets.merging import interpolate
    from embed_assets.model_card import write_card
    from embed_assets.models import load_sentence_transformer

    tuned = perturbed_model(tmp_path / "tuned")
    write_card(tuned, {"base_model": BUNDLED_MODEL, "data": {"passages": 7}})
    base = load_sentence_transformer(BUNDLED_MODEL).state_dict()
    other = load_sentence_transformer(str(tuned)).state_dict()
    name = next(k for k, v in base.items() if v.dim() > 1)
    for weight in (0.0, 0.25, 1.0):
        merged = interpolate(BUNDLED_MODEL, tuned, weight, tmp_path / f"m{weight}")
        got = load_sentence_transformer(str(merged)).state_dict()[name]
        expected = weight * other[name] + (1 - weight) * base[name]
        assert (got - expected).abs().max().item() < 1e-6, weight
    card = (merged / "README.md").read_text()  # our card (the facts carried over), stating the merge
    assert "- passages: 7" in card and "## Model merging" in card and "base_weight: 0.0000" in card
    with pytest.raises(ValueError, match="outside"):
        interpolate(BUNDLED_MODEL, tuned, 1.5, tmp_path / "bad")


def test_merge_weights_must_be_strictly_between_0_and_1() -> None:
    with pytest.raises(ValidationError, match="strictly between 0 and 1"):
        EvalSettings(merge_weights=[0.5, 1.0])
    assert EvalSettings(merge_weights=[0.75, 0.5, 0.5]).merge_weights == [0.5, 0.75]


@pytest.mark.slow  # evaluates base, a forgetful model and two merges on validation, guard and test
def test_a_merge_is_served_when_the_fine_tuned_model_forgot(tmp_path: Path, tiny_corpus: Path) -> None:
    """The fine-tuned model forgot (and is worse on validation too): a merge with the base is chosen on the
    validation split and the guard, evaluated on test, exported, and named in the card and the gates."""
    from embed_assets.stages.ingest import ChunkSettings, CorpusSettings, chunk_documents, read_documents
    from embed_assets.stages.sdg import SDGSettings, generate_pairs
    from embed_assets.stages.split import SplitSettings, split_pairs
    from embed_assets.stages.train import validation_set, write_validation_beir

    ctx = StageContext.local(tmp_path / "artifacts", run_id="run-1")
    corpus = read_documents(CorpusSettings(path=str(tiny_corpus)), ctx)
    chunks = chunk_documents(corpus, ChunkSettings(passage_max_length=256), MODEL, ctx)
    pairs = generate_pairs(chunks, SDGSettings(), MODEL, ctx)
    split = split_pairs(chunks, pairs, SplitSettings(), ctx)
    val_beir = write_validation_beir(validation_set(chunks, pairs, split), tmp_path / "val_beir")
    assert val_beir, "small data keeps a validation split"
    forgot = perturbed_model(tmp_path / "forgot")
    checkpoint = model_checkpoint(forgot, val_beir=val_beir)
    metrics = evaluate_checkpoint(split, checkpoint, EvalSettings(merge_weights=[0.25, 0.5]), MODEL, ctx)
    choice = metrics.choice
    assert choice is not None and choice.merged and choice.weight in (0.25, 0.5)
    rows = {c["finetuned_weight"]: c for c in choice.candidates}
    assert set(rows) == {0.0, 0.25, 0.5, 1.0}
    assert not rows[1.0]["keeps_guard"]  # the forgetful model itself does not keep the guard
    best_kept = max(
        (c for w, c in rows.items() if w > 0 and c["keeps_guard"]),
        key=lambda c: (c["val_ndcg@10"], c["finetuned_weight"]),  # ties: more fine-tuned
    )
    assert choice.weight == best_kept["finetuned_weight"]
    assert Path(metrics.model_dir).is_dir() and metrics.model_dir != str(forgot)
    assert not (Path(metrics.model_dir).parent / ("w0.5" if choice.weight == 0.25 else "w0.25")).exists()
    guard = metrics.guard
    assert guard is not None and guard.merged and guard.served is guard.merged
    assert guard.merged["NDCG@10"] > guard.finetuned["NDCG@10"]
    meta = metrics.metadata()
    assert meta["served_model"].startswith("merged") and meta["merge_weight"] == choice.weight
    assert "merged" in meta["metrics"].columns and meta["merge_candidates"].rows
    gate = next(g for g in metrics.gates() if g.name == "finetuned_not_worse_than_base")
    assert gate.message.startswith(f"on generated_test: merged (fine-tuned weight {choice.weight:g})")
    card = (Path(metrics.model_dir) / "README.md").read_text()
    assert "## Model merging" in card and "merged nDCG@10" in card and "finetuned_weight" in card

    off = evaluate_checkpoint(split, checkpoint, EvalSettings(merge="off"), MODEL, ctx)
    assert off.choice is None and off.model_dir == str(forgot) and not off.primary.merged

    # A fine-tuned model that keeps the guard is served unless a merge beats it beyond noise: here the "fine-tuned"
    # model is the base itself, so every merge scores the same and the fine-tuned one stays.
    from embed_assets.models import resolve_model_path

    same = evaluate_checkpoint(
        split,
        model_checkpoint(Path(resolve_model_path(BUNDLED_MODEL)), val_beir=val_beir),
        EvalSettings(merge_weights=[0.5]),
        MODEL,
        ctx,
    )
    assert same.choice is not None and same.choice.weight == 1.0 and not same.primary.merged
    assert "no merge is better on validation beyond noise" in same.choice.reason
