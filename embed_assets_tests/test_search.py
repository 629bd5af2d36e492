"""The approximate index reaches its recall target against exact search, and says what it reached."""

from __future__ import annotations

import numpy as np
import pytest

from embed_assets.search import ann_search, exact_topk, recall_at_k


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres (text embeddings cluster by topic; uniform noise has no structure
    for any index to use)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_topk_and_recall() -> None:
    x = clustered(500, 16, 5, 0)
    q = x[:20] + 0.01
    top = exact_topk(q, x, 7)
    full = np.argsort(-(q @ x.T), axis=1)[:, :7]
    assert (top == full).all()
    assert recall_at_k(top, full) == 1.0
    half = top.copy()
    half[:, 4:] = -1
    assert recall_at_k(half, full) == pytest.approx(4 / 7)
    # ties: a passage scoring as the exact k-th one is as good an answer (identical texts, truncated windows)
    twins = np.concatenate([x, x[:1]])  # passage 500 is passage 0 again
    q0 = x[:1]
    (best,) = exact_topk(q0, twins, 1)
    other = np.array([[500 if best[0] == 0 else 0]])
    assert recall_at_k(other, best[None]) == 0.0 and recall_at_k(other, best[None], q0, twins) == 1.0


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_ann_reaches_the_target_and_reports_the_recall_it_measured(index: str) -> None:
    corpus = clustered(20_000, 32, 50, 1)
    queries = clustered(2_000, 32, 50, 2)
    scores, found, report = ann_search(queries, corpus, 10, index, target_recall=0.95, recall_sample=400)
    assert found.shape == (2000, 10) and scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    true = recall_at_k(found, exact_topk(queries, corpus, 10))  # over every query, not just the sample
    assert report.recall_at_k >= 0.95 and true >= 0.93
    assert abs(true - report.recall_at_k) < 0.03  # the sampled estimate is what the user gets
    assert report.recall_sample == 400 and report.knob > 0
    if index == "ivf":
        assert report.cells > 0 and report.knob < report.cells  # it did not fall back to scanning every cell
    assert set(report.as_metadata()) >= {"index", "recall_at_k", "knob", "build_seconds", "search_seconds"}


def test_auto_index_weighs_the_index_build_against_exact_search(monkeypatch) -> None:
    import embed_assets.search as search

    big, many = search.AUTO_ANN_MIN_CORPUS, search.HNSW_BREAK_EVEN_QUERIES
    assert search.auto_index(big - 1, many) == "exact"  # small corpus: exact is as fast
    assert search.auto_index(big, many - 1) == "exact"  # few queries: the graph costs more than it saves
    assert search.auto_index(big, many) == "hnsw"
    # a GPU (which this machine has not): IVF builds there in seconds, whatever the query count
    monkeypatch.setattr(search, "faiss_gpus", lambda: 1)
    assert search.auto_index(big, 10) == "ivf" and search.auto_index(big - 1, 10) == "exact"


def test_evaluation_search_past_the_size_limit_is_approximate_and_reported(monkeypatch) -> None:
    import embed_assets.search
    from embed_assets.metrics import encode_and_search, evaluate

    corpus_emb = clustered(3_000, 32, 20, 3)
    queries = {f"q{i}": str(i) for i in range(200)}
    corpus = {f"d{i}": {"text": f"doc {i}"} for i in range(len(corpus_emb))}
    q_emb = clustered(200, 32, 20, 4)

    class Model:  # encodes the queries as the fixed vectors above (the corpus is given)
        def encode(self, texts, **_):
            return q_emb[[int(t) for t in texts]]

    exact, _ = encode_and_search(Model(), queries, corpus, top_k=10, corpus_embeddings=corpus_emb)
    qrels = {q: {list(exact[q])[2]: 1} for q in queries}  # judged: exact search's third hit
    reports: list = []
    monkeypatch.setattr(embed_assets.search, "AUTO_ANN_MIN_CORPUS", 1_000)
    monkeypatch.setattr(embed_assets.search, "HNSW_BREAK_EVEN_QUERIES", 100)
    approx, _ = encode_and_search(
        Model(), queries, corpus, top_k=10, corpus_embeddings=corpus_emb, reports=reports
    )
    (report,) = reports
    assert report.index == "hnsw" and report.recall_at_k >= 0.99 and report.k == 11  # one spare: own id
    overlap = sum(len(set(exact[q]) & set(approx[q])) for q in queries) / (10 * len(queries))
    assert overlap >= 0.97 and all(
        list(approx[q]) == sorted(approx[q], key=approx[q].get, reverse=True) for q in queries
    )
    m_exact, m_approx = evaluate(qrels, exact, k_values=(10,)), evaluate(qrels, approx, k_values=(10,))
    assert m_exact["NDCG@10"] == 0.5 and abs(m_exact["NDCG@10"] - m_approx["NDCG@10"]) < 0.02
