"""Cross-encoder rescoring of mined candidates: sentence-transformers' semantics, and what the stage records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embed_assets.mining import mine_hard_negatives
from embed_assets.models import BUNDLED_MODEL, load_sentence_transformer, resolve_model_path
from embed_assets_tests.test_mining import _load, _st_mine, _st_tuples

N_QUERIES, N_PASSAGES = 25, 120


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory) -> Path:
    """A tiny cross-encoder built locally: the bundled MiniLM with a (seeded) one-logit classification head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    source = resolve_model_path(BUNDLED_MODEL)
    out = tmp_path_factory.mktemp("cross-encoder")
    AutoModelForSequenceClassification.from_pretrained(source, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(cross_encoder_dir) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    return {
        "model": load_sentence_transformer(BUNDLED_MODEL, max_seq_length=64),
        "cross_encoder": CrossEncoder(str(cross_encoder_dir), device="cpu", max_length=64),
        "data": _load(N_QUERIES, N_PASSAGES),
    }


def test_rescoring_equals_sentence_transformers(setup) -> None:
    data, model, ce = setup["data"], setup["model"], setup["cross_encoder"]
    settings = {"num_negatives": 3, "relative_margin": 0.05}
    reference = _st_mine(data, model, cross_encoder=ce, **settings)
    ours = mine_hard_negatives(
        data["queries"],
        data["positive_ids"],
        data["corpus_ids"],
        data["corpus_texts"],
        model,
        cross_encoder=ce,
        use_faiss=False,
        **settings,
    )
    assert [(r.query, r.positive_text, *r.negative_texts) for r in ours.rows] == _st_tuples(reference, 3)
    scores = np.array([[r.positive_score, *r.negative_scores] for r in ours.rows])
    np.testing.assert_allclose(scores, np.array(reference["scores"]), rtol=0, atol=1e-5)
    assert ours.stats.cross_encoder_pairs > N_QUERIES
    # Without the cross-encoder the bi-encoder's ranking picks other negatives.
    plain = mine_hard_negatives(
        data["queries"], data["positive_ids"], data["corpus_ids"], data["corpus_texts"], model, **settings
    )
    assert [r.negative_ids for r in plain.rows] != [r.negative_ids for r in ours.rows]


def test_suspected_false_negatives_are_counted_and_never_mined(setup) -> None:
    data, model, ce = setup["data"], setup["model"], setup["cross_encoder"]
    result = mine_hard_negatives(
        data["queries"],
        data["positive_ids"],
        data["corpus_ids"],
        data["corpus_texts"],
        model,
        cross_encoder=ce,
        relative_margin=0.0,  # only candidates the cross-encoder ranks above the positive are filtered
        num_negatives=3,
        min_negatives=0,
    )
    assert result.stats.suspected_false_negatives > 0
    assert result.stats.relative_margin_drops >= result.stats.suspected_false_negatives
    for row in result.rows:
        assert all(s <= row.positive_score for s in row.negative_scores)


def test_the_mining_stage_loads_a_cross_encoder_by_path(
    tmp_path: Path, tiny_corpus: Path, cross_encoder_dir
) -> None:
    from embed_assets.stages.common import ModelSpec, StageContext
    from embed_assets.stages.ingest import ChunkSettings, CorpusSettings, chunk_documents, read_documents
    from embed_assets.stages.mine import MiningSettings, mine_negatives
    from embed_assets.stages.sdg import SDGSettings, generate_pairs
    from embed_assets.stages.split import SplitSettings, split_pairs

    ctx = StageContext.local(tmp_path / "artifacts")
    spec = ModelSpec(BUNDLED_MODEL, device="cpu")
    chunks = chunk_documents(
        read_documents(CorpusSettings(path=str(tiny_corpus)), ctx), ChunkSettings(), spec, ctx
    )
    pairs = generate_pairs(chunks, SDGSettings(queries_per_chunk=1), spec, ctx)
    split = split_pairs(chunks, pairs, SplitSettings(), ctx)
    mined = mine_negatives(
        chunks, pairs, split, MiningSettings(cross_encoder=str(cross_encoder_dir)), spec, ctx
    )
    assert mined.stats["cross_encoder_pairs"] > 0 and "suspected_false_negatives" in mined.stats
    assert mined.stats["n_rows"] == mined.n_rows == split.n_train  # every training pair keeps its row
