"""Hard-negative mining: equality with sentence-transformers' ``mine_hard_negatives``, invariants, backends and
the embedding cache.

Real data: 100 covidqa training queries and 200 covidqa passages (all their positives included; where the
covidqa folder is missing, an inverse-cloze set built from the repository's sample corpus), plus
injected edge cases: a passage whose text is identical to a positive (under another id), a multi-hop query
(two positives), and a query that appears twice with different positives. The real model embeds every text
once (module fixture); the comparisons then run on a model wrapper that looks embeddings up, so that
sentence-transformers and our implementation see the very same vectors without re-encoding. One test runs
both end to end with the real model on a small subset.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embed_assets.embedding_cache import EmbeddingCache, encode_with_cache, model_fingerprint
from embed_assets.mining import MinedRow, MiningResult, mine_hard_negatives
from embed_assets_tests.conftest import SHARED

DATA = SHARED / "datasets" / "covidqa"
SAMPLE = Path(__file__).resolve().parents[1] / "sample_corpus" / "python-reference"

N_QUERIES = 100
N_PASSAGES = 200


# ------------------------------------------------------------------------------------------------ data
def _load(n_queries: int, n_passages: int) -> dict[str, Any]:
    """COVID-QA when its BEIR folder is there, else an inverse-cloze set from the repository's sample corpus."""
    if (DATA / "corpus.jsonl").exists():
        return _read_beir(n_queries, n_passages)
    return _read_sample_corpus(n_queries, n_passages)


def _read_sample_corpus(n_queries: int, n_passages: int) -> dict[str, Any]:
    """Passages = 3-sentence windows of the sample documents (ids ``<doc>-<nnn>``); a query is the middle
    sentence of every other passage, whose positive is that passage."""
    passages: list[tuple[str, str]] = []
    for path in sorted(SAMPLE.glob("*.txt")):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", path.read_text()) if len(s.split()) >= 4]
        for i in range(0, len(sentences) - 2, 3):
            passages.append((f"{path.stem}-{i // 3:03d}", " ".join(sentences[i : i + 3])))
    chosen = passages[::2][:n_queries]
    queries = [re.split(r"(?<=[.!?])\s+", text)[1] for _, text in chosen]
    needed = {pid for pid, _ in chosen}
    others = [p for p in passages if p[0] not in needed][: max(0, n_passages - len(chosen))]
    corpus = sorted(chosen + others, key=passages.index)
    return {
        "queries": queries,
        "positive_ids": [[pid] for pid, _ in chosen],
        "corpus_ids": [pid for pid, _ in corpus],
        "corpus_texts": [text for _, text in corpus],
    }


def _read_beir(n_queries: int, n_passages: int) -> dict[str, Any]:
    corpus = {}
    with open(DATA / "corpus.jsonl") as f:
        for line in f:
            r = json.loads(line)
            corpus[r["_id"]] = r["text"]
    with open(DATA / "queries.jsonl") as f:
        query_text = {r["_id"]: r["text"] for r in map(json.loads, f)}
    qrels: dict[str, list[str]] = {}
    with open(DATA / "qrels" / "train.tsv") as f:
        next(f)
        for line in f:
            qid, cid, _ = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, []).append(cid)
    qids = list(qrels)[:n_queries]
    positive_ids = [list(qrels[q]) for q in qids]
    needed = list(dict.fromkeys(c for p in positive_ids for c in p))
    others = [c for c in corpus if c not in set(needed)]
    corpus_ids = needed + others[: max(0, n_passages - len(needed))]
    return {
        "queries": [query_text[q] for q in qids],
        "positive_ids": positive_ids,
        "corpus_ids": corpus_ids,
        "corpus_texts": [corpus[c] for c in corpus_ids],
    }


def _with_edge_cases(data: dict[str, Any]) -> dict[str, Any]:
    """Inject an identical-text copy of a positive, a multi-hop query and a repeated query."""
    queries = list(data["queries"])
    positive_ids = [list(p) for p in data["positive_ids"]]
    corpus_ids = list(data["corpus_ids"])
    corpus_texts = list(data["corpus_texts"])
    # 1. passage "dup-of-q0" has exactly the text of query 0's positive
    pos0 = corpus_ids.index(positive_ids[0][0])
    corpus_ids.insert(len(corpus_ids) // 2, "dup-of-q0")
    corpus_texts.insert(len(corpus_texts) // 2, corpus_texts[pos0])
    # 2. query 1 becomes multi-hop: a second positive, another chunk of the same article
    positive_ids[1].append(_sibling(positive_ids[1][0], corpus_ids))
    # 3. query 2 appears once more, with another positive (ST merges identical queries)
    queries.append(queries[2])
    positive_ids.append([_sibling(positive_ids[2][0], corpus_ids, skip=set(positive_ids[1]))])
    return {
        "queries": queries,
        "positive_ids": positive_ids,
        "corpus_ids": corpus_ids,
        "corpus_texts": corpus_texts,
    }


def _sibling(passage_id: str, corpus_ids: list[str], skip: set[str] = frozenset()) -> str:
    """Another chunk of the same article (ids are ``<article>-<chunk>``)."""
    article = passage_id.rsplit("-", 1)[0] + "-"
    return next(c for c in corpus_ids if c.startswith(article) and c != passage_id and c not in skip)


class LookupModel:
    """Wraps a SentenceTransformer; ``encode*`` return embeddings computed once, and count what they encode."""

    def __init__(self, model: Any, table: dict[str, np.ndarray]) -> None:
        self._model = model
        self._table = table
        self.encoded_texts = 0
        self.encode_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _lookup(self, inputs, **_: Any) -> np.ndarray:
        self.encode_calls += 1
        self.encoded_texts += len(inputs)
        return np.stack([self._table[t] for t in inputs])

    encode = encode_query = encode_document = _lookup


@pytest.fixture(scope="module")
def real_model():
    from embed_assets.models import BUNDLED_MODEL, load_sentence_transformer

    return load_sentence_transformer(BUNDLED_MODEL, max_seq_length=64)


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return _with_edge_cases(_load(N_QUERIES, N_PASSAGES))


@pytest.fixture(scope="module")
def table(real_model, data) -> dict[str, np.ndarray]:
    """Every query and passage embedded once with the real model (normalized)."""
    texts = list(dict.fromkeys(data["corpus_texts"]))
    queries = list(dict.fromkeys(data["queries"]))
    emb_c = real_model.encode_document(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    emb_q = real_model.encode_query(queries, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    return {**dict(zip(texts, emb_c, strict=True)), **dict(zip(queries, emb_q, strict=True))}


@pytest.fixture
def model(real_model, table) -> LookupModel:
    return LookupModel(real_model, table)


# ------------------------------------------------------------------------------------------------ helpers
def _st_mine(data: dict[str, Any], model: Any, **kwargs: Any):
    """sentence-transformers' implementation on the same inputs: one (query, positive text) row per pair."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives as st_mine_hard_negatives

    text_of = dict(zip(data["corpus_ids"], data["corpus_texts"], strict=True))
    pairs = [
        (q, text_of[c]) for q, pids in zip(data["queries"], data["positive_ids"], strict=True) for c in pids
    ]
    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "answer": [p for _, p in pairs]})
    kwargs.setdefault("output_format", "n-tuple")
    return st_mine_hard_negatives(
        dataset, model, corpus=list(data["corpus_texts"]), verbose=False, output_scores=True, **kwargs
    )


def _ours(data: dict[str, Any], model: Any, **kwargs: Any) -> MiningResult:
    return mine_hard_negatives(
        data["queries"], data["positive_ids"], data["corpus_ids"], data["corpus_texts"], model, **kwargs
    )


def _as_tuples(result: MiningResult) -> list[tuple[str, ...]]:
    return [(r.query, r.positive_text, *r.negative_texts) for r in result.rows]


def _st_tuples(dataset, num_negatives: int) -> list[tuple[str, ...]]:
    return [
        (row["query"], row["answer"], *[row[f"negative_{i}"] for i in range(1, num_negatives + 1)])
        for row in dataset
    ]


def _assert_same_as_st(result: MiningResult, reference, num_negatives: int) -> None:
    assert _as_tuples(result) == _st_tuples(reference, num_negatives)
    ours = np.array([[r.positive_score, *r.negative_scores] for r in result.rows])
    np.testing.assert_allclose(ours, np.array(reference["scores"]), rtol=0, atol=1e-6)


def _assert_invariants(result: MiningResult, data: dict[str, Any]) -> None:
    text_of = dict(zip(data["corpus_ids"], data["corpus_texts"], strict=True))
    for row in result.rows:
        positive_texts = {text_of[p] for p in row.query_positive_ids}
        assert row.positive_id in row.query_positive_ids
        assert not set(row.negative_ids) & set(row.query_positive_ids), "a positive was mined as negative"
        assert not set(row.negative_texts) & positive_texts, "a copy of a positive was mined as negative"
        assert len(set(row.negative_texts)) == len(row.negative_texts)
        assert row.negative_scores == sorted(row.negative_scores, reverse=True)
        assert [text_of[i] for i in row.negative_ids] == row.negative_texts


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"relative_margin": 0.05}, id="perc-margin-0.05"),
        pytest.param({"relative_margin": None, "absolute_margin": 0.02}, id="absolute-margin"),
        pytest.param({"relative_margin": 0.05, "absolute_margin": 0.1}, id="both-margins"),
        pytest.param({"relative_margin": 0.05, "range_min": 3, "range_max": 30}, id="range-window"),
        pytest.param({"relative_margin": None, "range_min": 2, "num_negatives": 3}, id="no-margin-range-min"),
        pytest.param({"relative_margin": 0.1, "max_score": 0.6, "min_score": 0.15}, id="score-bounds"),
    ],
)
def test_top_sampling_equals_sentence_transformers(model, data, settings):
    settings = {"num_negatives": 5, **settings}
    reference = _st_mine(data, model, sampling_strategy="top", **settings)
    result = _ours(data, model, sampling_strategy="top", use_faiss=False, **settings)
    assert len(result.rows) > 50
    _assert_same_as_st(result, reference, settings["num_negatives"])
    _assert_invariants(result, data)


def test_keep_partial_equals_sentence_transformers_triplets(model, data):
    settings = {"num_negatives": 5, "relative_margin": 0.05, "max_score": 0.55, "range_max": 12}
    reference = _st_mine(data, model, output_format="triplet", **settings)
    result = _ours(data, model, keep_partial=True, use_faiss=False, **settings)
    assert result.stats.n_rows_partial > 0, "settings should leave some rows short of negatives"
    assert result.triplets() == [(r["query"], r["answer"], r["negative"]) for r in reference]
    strict = _ours(data, model, use_faiss=False, **settings)
    assert all(len(r.negative_ids) == 5 for r in strict.rows)
    dropped_for_being_short = len(result.rows) - len(strict.rows)
    assert dropped_for_being_short == result.stats.n_rows_partial > 0
    assert (
        strict.stats.n_dropped_no_negatives == result.stats.n_dropped_no_negatives + dropped_for_being_short
    )


def test_random_sampling_reproduces_sentence_transformers_draws(model, data):
    settings = {"num_negatives": 4, "relative_margin": 0.05, "range_min": 2, "range_max": 25}
    random.seed(7)
    reference = _st_mine(data, model, sampling_strategy="random", **settings)
    result = _ours(data, model, sampling_strategy="random", seed=7, use_faiss=False, **settings)
    _assert_same_as_st(result, reference, 4)
    _assert_invariants(result, data)
    again = _ours(data, model, sampling_strategy="random", seed=7, use_faiss=False, **settings)
    assert _as_tuples(again) == _as_tuples(result)
    other = _ours(data, model, sampling_strategy="random", seed=8, use_faiss=False, **settings)
    assert _as_tuples(other) != _as_tuples(result)
    window_settings = {**settings, "num_negatives": settings["range_max"] - settings["range_min"]}
    window = _ours(data, model, keep_partial=True, use_faiss=False, **window_settings)
    window_ids = {r.query: set(r.negative_ids) for r in window.rows}
    for row in result.rows:
        assert set(row.negative_ids) <= window_ids[row.query], "random negatives come from the rank window"
    top = _ours(data, model, sampling_strategy="top", use_faiss=False, **settings)
    assert _as_tuples(top) != _as_tuples(result)


def test_end_to_end_with_real_model_and_cache_equals_sentence_transformers(real_model, tmp_path):
    """No lookup: both implementations encode with the real model (cold), and ours again from the cache."""
    data = _with_edge_cases(_load(12, 30))
    reference = _st_mine(data, real_model, num_negatives=3, relative_margin=0.05)
    cold = _ours(data, real_model, num_negatives=3, use_faiss=False)
    _assert_same_as_st(cold, reference, 3)
    fingerprint = model_fingerprint(real_model)
    assert model_fingerprint(real_model) == fingerprint and len(fingerprint) == 32
    emb = encode_with_cache(real_model, data["corpus_texts"], data["corpus_ids"], tmp_path, fingerprint)
    warm = _ours(data, real_model, num_negatives=3, corpus_embeddings=emb)
    _assert_same_as_st(warm, reference, 3)
    assert warm.stats.corpus_embeddings_reused and not cold.stats.corpus_embeddings_reused


# ------------------------------------------------------------------------------------------------ semantics
def test_multi_hop_rows_share_negatives_and_margin_uses_min_positive(model, data):
    result = _ours(data, model, use_faiss=False)
    multi = [r for r in result.rows if r.query == data["queries"][1]]
    assert [r.positive_id for r in multi] == data["positive_ids"][1]
    assert len({tuple(r.negative_ids) for r in multi}) == 1
    hardest_positive = min(r.positive_score for r in multi)
    assert max(multi[0].negative_scores) <= hardest_positive - abs(hardest_positive) * 0.05 + 1e-7
    # the repeated query is merged: one group with both queries' positives
    repeated = [r for r in result.rows if r.query == data["queries"][2]]
    assert [r.positive_id for r in repeated] == data["positive_ids"][2] + data["positive_ids"][-1]
    # without unrolling: one row per distinct query
    folded = _ours(data, model, use_faiss=False, unroll_multi_hop=False)
    assert len(folded.rows) == len({r.query for r in result.rows})
    assert len(result.rows) == len(folded.rows) + len(multi) - 1 + len(repeated) - 1


def test_identical_text_of_a_positive_is_never_a_negative(model, data):
    result = _ours(data, model, relative_margin=None, use_faiss=False, num_negatives=20)
    _assert_invariants(result, data)
    assert all("dup-of-q0" not in r.negative_ids for r in result.rows)
    row0 = next(r for r in result.rows if r.query == data["queries"][0])
    assert row0.positive_id == data["positive_ids"][0][0]


def test_every_candidate_above_the_margin_is_dropped(model, data):
    result = _ours(data, model, use_faiss=False, relative_margin=0.05)
    assert result.stats.false_negative_drops > 0
    by_query: dict[str, list[MinedRow]] = {}
    for r in result.rows:
        by_query.setdefault(r.query, []).append(r)
    for rows in by_query.values():
        p = min(r.positive_score for r in rows)
        assert all(s <= p - abs(p) * 0.05 + 1e-7 for s in rows[0].negative_scores)
    meta = result.as_metadata()
    json.dumps(meta)
    assert meta["search_backend"] == "exact"
    assert meta["n_rows"] == len(result.rows) and meta["n_queries"] == len(data["queries"])
    assert meta["margin_min"] >= 0 and meta["margin_mean"] >= meta["margin_min"]


def test_faiss_and_exact_backends_agree(model, data):
    exact = _ours(data, model, use_faiss=False)
    faiss_result = _ours(data, model, use_faiss=True)
    assert (exact.stats.search_backend, faiss_result.stats.search_backend) == ("exact", "faiss")
    assert [(r.query, r.positive_id, r.negative_ids) for r in exact.rows] == [
        (r.query, r.positive_id, r.negative_ids) for r in faiss_result.rows
    ]
    np.testing.assert_allclose(
        [s for r in exact.rows for s in r.negative_scores],
        [s for r in faiss_result.rows for s in r.negative_scores],
        atol=1e-5,
    )
    assert _ours(data, model, use_faiss="auto").stats.search_backend == "exact"  # small corpus
    # The config spelling ("yes"/"no") selects the same backends.
    assert _ours(data, model, use_faiss="yes").stats.search_backend == "faiss"
    assert _ours(data, model, use_faiss="no").stats.search_backend == "exact"
    with pytest.raises(ValueError, match="use_faiss"):
        _ours(data, model, use_faiss="sometimes")


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_is_calibrated_and_reported(model, data, index, monkeypatch):
    import embed_assets.search

    exact = _ours(data, model, use_faiss=False)
    approx = _ours(data, model, use_faiss=index)
    assert approx.stats.search_backend == f"faiss-{index}" and approx.stats.search_recall_at_k >= 0.99
    assert approx.as_metadata()["search_knob"] > 0
    assert [(r.query, r.negative_ids) for r in approx.rows] == [(r.query, r.negative_ids) for r in exact.rows]
    # 'auto' past the size limit: exact for few queries (building the index costs more), HNSW for many
    monkeypatch.setattr(embed_assets.search, "AUTO_ANN_MIN_CORPUS", 10)
    assert _ours(data, model, use_faiss="auto").stats.search_backend == "exact"
    monkeypatch.setattr(embed_assets.search, "HNSW_BREAK_EVEN_QUERIES", 2)
    assert _ours(data, model, use_faiss="auto").stats.search_backend == "faiss-hnsw"


def test_precomputed_embeddings_skip_encoding(model, data):
    corpus_emb = np.stack([model._table[t] for t in data["corpus_texts"]])
    query_emb = np.stack([model._table[q] for q in data["queries"]])
    baseline = _ours(data, model, use_faiss=False)
    model.encoded_texts = 0
    reused = _ours(data, model, use_faiss=False, corpus_embeddings=corpus_emb)
    assert model.encoded_texts == len(set(data["queries"])), "only the distinct queries are encoded"
    model.encoded_texts = 0
    both = _ours(data, model, use_faiss=False, corpus_embeddings=corpus_emb, query_embeddings=query_emb)
    assert model.encoded_texts == 0
    assert _as_tuples(reused) == _as_tuples(baseline) == _as_tuples(both)


def test_mine_pool_reencodes_only_new_queries_and_passages(model, data, tmp_path):
    """What ``mined_negatives`` does on a re-run: a margin change encodes nothing, a new pair at most its query;
    the result always equals mining without the cache."""
    from types import SimpleNamespace

    from embed_assets.mining import mine_pool

    records = [
        SimpleNamespace(qa_id=f"qa{i}", query=q, positive_chunk_ids=p)
        for i, (q, p) in enumerate(zip(data["queries"], data["positive_ids"], strict=True))
    ]
    pool = [
        SimpleNamespace(chunk_id=c, text=t)
        for c, t in zip(data["corpus_ids"], data["corpus_texts"], strict=True)
    ]
    distinct = len(set(data["corpus_texts"])) + len(set(data["queries"]))

    def run(recs, chunks, **kw):
        model.encoded_texts = 0
        out = mine_pool(model, recs, chunks, str(tmp_path), model_fingerprint="fp", use_faiss="no", **kw)
        return out, model.encoded_texts

    first, encoded = run(records[:-1], pool)
    assert encoded == distinct - (records[-1].query not in {r.query for r in records[:-1]})
    again, encoded = run(records[:-1], pool, relative_margin=0.1)
    assert encoded == 0, "a settings change re-mines from cached embeddings"
    assert again.stats.passages_encoded == again.stats.queries_encoded == 0
    assert first.stats.passages_encoded == len(set(data["corpus_texts"]))
    assert _as_tuples(again) == _as_tuples(
        _ours(_subset(data, -1), model, use_faiss="no", relative_margin=0.1)
    )
    grown, encoded = run(records, pool)
    assert encoded <= 1, "one new pair: at most its query is encoded"
    assert _as_tuples(grown) == _as_tuples(_ours(data, model, use_faiss="no"))


def _subset(data: dict[str, Any], stop: int) -> dict[str, Any]:
    return {**data, "queries": data["queries"][:stop], "positive_ids": data["positive_ids"][:stop]}


def test_invalid_inputs_are_rejected(model, data):
    with pytest.raises(KeyError, match="not in corpus_ids"):
        mine_hard_negatives(["q"], [["nope"]], data["corpus_ids"], data["corpus_texts"], model)
    with pytest.raises(ValueError, match="non-empty"):
        mine_hard_negatives(["q"], [[]], data["corpus_ids"], data["corpus_texts"], model)
    with pytest.raises(ValueError, match="Cannot mine"):
        _ours(data, model, num_negatives=10, range_min=5, range_max=12)
    with pytest.raises(ValueError, match="appears more than once"):
        mine_hard_negatives(["q"], [["a"]], ["a", "a"], ["x", "y"], model)
    with pytest.raises(ValueError, match="sampling_strategy"):
        _ours(data, model, sampling_strategy="hardest")


# ------------------------------------------------------------------------------------------------ cache
def test_embedding_cache_encodes_each_text_once(model, tmp_path):
    texts = [f"passage number {i}" for i in range(50)]
    table = {t: np.random.default_rng(i).standard_normal(8).astype(np.float32) for i, t in enumerate(texts)}
    table["changed text"] = np.ones(8, dtype=np.float32)
    counting = LookupModel(model._model, table)
    ids = [f"id{i}" for i in range(50)]

    first = encode_with_cache(counting, texts + texts[:5], ids + ids[:5], tmp_path, "fp-1")
    assert counting.encoded_texts == 50 and counting.encode_calls == 1, "duplicates encoded once"
    second = encode_with_cache(counting, texts, ids, tmp_path, "fp-1")
    assert counting.encoded_texts == 50 and counting.encode_calls == 1, "second call encodes 0 new texts"
    np.testing.assert_array_equal(first[:50], second)
    np.testing.assert_array_equal(first[50:], second[:5])

    edited = [*texts[:-1], "changed text"]  # same id, new text: re-encoded
    cache = EmbeddingCache(tmp_path, "fp-1")
    cache.encode(counting, edited, ids)
    assert cache.last_stats.n_encoded == 1 and cache.last_stats.n_cached == 49
    assert counting.encoded_texts == 51

    encode_with_cache(counting, texts[:3], ids[:3], tmp_path, "fp-2")  # other model: own namespace
    encode_with_cache(counting, texts[:3], ids[:3], tmp_path, "fp-1", prompt="query: ")  # other prompt
    assert counting.encoded_texts == 57


def test_embedding_cache_ignores_incomplete_shards(model, tmp_path):
    texts = ["a", "b", "c"]
    counting = LookupModel(model._model, {t: np.full(4, i, dtype=np.float32) for i, t in enumerate(texts)})
    cache = EmbeddingCache(tmp_path, "fp")
    cache.encode(counting, texts)
    for keys_file in cache.dir.glob("shard-*.keys.npy"):
        keys_file.unlink()  # as if the writer crashed before finishing the shard
    out = cache.encode(counting, texts)
    assert cache.last_stats.n_encoded == 3
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2])
