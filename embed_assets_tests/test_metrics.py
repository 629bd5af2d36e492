"""Tests of embed_assets.metrics and embed_assets.beir_io against pytrec_eval (and BEIR, when installed)."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest

from embed_assets.beir_io import load_beir_folder, write_beir_folder
from embed_assets.metrics import (
    compare,
    document_text,
    encode_and_search,
    evaluate,
    exact_search,
    markdown_table,
    paired_bootstrap,
    per_query_metrics,
    per_query_ndcg,
    round_metrics,
)
from embed_assets_tests.conftest import SHARED

pytrec_eval = pytest.importorskip("pytrec_eval")

COVIDQA = SHARED / "datasets" / "covidqa"
KS = (1, 2, 3, 5, 10, 100)
TREC_NAMES = {"NDCG": "ndcg_cut", "MAP": "map_cut", "Recall": "recall", "P": "P"}


# ------------------------------------------------------------------------------------------ references


def pytrec_per_query(qrels: dict, run: dict, ks=KS) -> dict[str, dict[str, float]]:
    measures = {f"{name}.{','.join(map(str, ks))}" for name in TREC_NAMES.values()}
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def beir_reference(qrels: dict, run: dict, ks=KS) -> dict[str, float]:
    """BEIR's EvaluateRetrieval.evaluate + custom_metrics.mrr, unrounded (copied logic, no identical ids)."""
    scores = pytrec_per_query(qrels, run, ks)
    out = {}
    for family, name in TREC_NAMES.items():
        for k in ks:
            out[f"{family}@{k}"] = sum(s[f"{name}_{k}"] for s in scores.values()) / len(scores)
    for k in ks:
        total = 0.0
        for qid, doc_scores in run.items():
            top = sorted(doc_scores.items(), key=lambda item: item[1], reverse=True)[: max(ks)]
            relevant = {d for d, r in qrels[qid].items() if r > 0}
            for rank, (doc_id, _) in enumerate(top[:k]):
                if doc_id in relevant:
                    total += 1.0 / (rank + 1)
                    break
        out[f"MRR@{k}"] = total / len(qrels)
    return out


def random_case(seed: int) -> tuple[dict, dict]:
    """Graded qrels (-1..3) and a run with many tied scores, unicode and numeric-looking ids."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(rng.randint(1, 40))] + ["é", "ä", "Z", "z", "10", "9", "d1 "]
    qrels, run = {}, {}
    for q in range(rng.randint(1, 10)):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([-1, 0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
        if rng.random() < 0.9:
            picked = rng.sample(docs, rng.randint(0, len(docs)))
            run[qid] = {d: rng.choice([0.1, 0.25, 0.5, round(rng.random(), 2)]) for d in picked}
    return qrels, run


# ------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("seed", range(40))
def test_per_query_metrics_equal_pytrec_eval(seed: int) -> None:
    qrels, run = random_case(seed)
    reference = pytrec_per_query(qrels, run)
    ours = per_query_metrics(qrels, run, KS)
    assert set(ours) == set(reference)
    for qid, ref in reference.items():
        for family, name in TREC_NAMES.items():
            for k in KS:
                assert ours[qid][f"{family}@{k}"] == pytest.approx(ref[f"{name}_{k}"], abs=1e-12), (
                    qid,
                    family,
                    k,
                )


@pytest.mark.parametrize("seed", range(40))
def test_evaluate_equals_beir_aggregation(seed: int) -> None:
    qrels, run = random_case(seed)
    if not run:
        pytest.skip("BEIR divides by zero without any run entry")
    reference = beir_reference(qrels, run)
    ours = evaluate(qrels, run, KS)
    assert list(ours) == list(reference)
    for key, value in reference.items():
        assert abs(ours[key] - value) < 1e-9, key
    assert round_metrics(ours) == {key: round(value, 5) for key, value in reference.items()}


def test_evaluate_equals_beir_package() -> None:
    evaluation = pytest.importorskip("beir.retrieval.evaluation")
    for seed in range(20):
        qrels, run = random_case(seed)
        if not run:
            continue
        ndcg, _map, recall, precision = evaluation.EvaluateRetrieval.evaluate(
            qrels, json.loads(json.dumps(run)), list(KS)
        )
        mrr = evaluation.EvaluateRetrieval.evaluate_custom(qrels, run, list(KS), metric="mrr")
        beir = {**ndcg, **_map, **recall, **precision, **mrr}
        assert round_metrics(evaluate(qrels, run, KS)) == beir


def test_tie_break_is_docid_descending_like_trec_eval() -> None:
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 0.5, "b": 0.5}}  # trec_eval ranks "b" first
    assert evaluate(qrels, run, (1,))["P@1"] == 0.0
    assert evaluate(qrels, {"q": {"a": 0.5, "B": 0.5}}, (1,))["P@1"] == 1.0  # "a" > "B"
    # MRR keeps BEIR's insertion-order tie handling
    assert evaluate(qrels, {"q": {"a": 0.5, "b": 0.5}}, (1,))["MRR@1"] == 1.0
    assert evaluate(qrels, {"q": {"b": 0.5, "a": 0.5}}, (1,))["MRR@1"] == 0.0


def test_graded_relevance_and_zero_judgments() -> None:
    qrels = {"q": {"a": 1, "b": 3, "c": 2, "n": 0}}
    run = {"q": {"a": 0.9, "n": 0.8, "b": 0.7}}
    m = evaluate(qrels, run, (1, 3))
    ideal3 = 3 + 2 / math.log2(3) + 1 / 2
    assert m["NDCG@3"] == pytest.approx((1 + 3 / 2) / ideal3)
    assert m["P@3"] == pytest.approx(2 / 3)  # "n" (relevance 0) is not relevant
    assert m["Recall@3"] == pytest.approx(2 / 3)
    assert m["MAP@3"] == pytest.approx((1 + 2 / 3) / 3)
    assert m["MRR@1"] == 1.0


def test_queries_without_results_follow_beir() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}, "q4": {}}
    run = {"q1": {"a": 1.0}, "q2": {}}  # q2 retrieved nothing, q3 is absent, q4 has no judgments
    beir = evaluate(qrels, run, (1,))
    # pytrec_eval scores q1 and q2 (q2 as zeros), skips absent q3; BEIR's MRR divides by len(qrels)
    assert set(pytrec_per_query(qrels, run, (1,))) == {"q1", "q2"}
    assert beir["NDCG@1"] == 0.5 and beir["Recall@1"] == 0.5
    assert beir["MRR@1"] == 0.25
    zero = evaluate(qrels, run, (1,), missing_queries="zero")
    assert zero["NDCG@1"] == 0.25 and zero["MRR@1"] == 0.25


def test_empty_inputs_give_zeros() -> None:
    keys = [f"{f}@{k}" for f in ("NDCG", "MAP", "Recall", "P", "MRR") for k in (1, 5, 10, 100)]
    for qrels, run in (({}, {}), ({"q": {"a": 1}}, {}), ({}, {"q": {"a": 1.0}})):
        out = evaluate(qrels, run)
        assert list(out) == keys and all(v == 0.0 for v in out.values())
    with pytest.raises(ValueError, match="k_values"):
        evaluate({}, {}, k_values=(0,))


def test_identical_ids_are_ignored_without_mutating_the_run() -> None:
    qrels = {"q": {"q": 1, "a": 1}}
    run = {"q": {"q": 0.99, "a": 0.5}}
    assert evaluate(qrels, run, (1,))["P@1"] == 1.0
    assert "q" in run["q"]
    assert evaluate(qrels, run, (1,), ignore_identical_ids=False)["NDCG@1"] == 1.0


def test_per_query_ndcg_mean_is_ndcg() -> None:
    qrels, run = random_case(3)
    per_query = per_query_ndcg(qrels, run, k=10)
    assert np.mean(list(per_query.values())) == pytest.approx(
        evaluate(qrels, run, (10,))["NDCG@10"], abs=1e-12
    )


# ------------------------------------------------------------------------------------------ search


def brute_force(
    q: np.ndarray, c: np.ndarray, qids: list[str], cids: list[str], k: int, normalize: bool = True
) -> dict:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True) if normalize else q
    cn = c / np.linalg.norm(c, axis=1, keepdims=True) if normalize else c
    scores = qn @ cn.T
    run = {}
    for i, qid in enumerate(qids):
        ranked = sorted(
            ((float(s), d) for s, d in zip(scores[i], cids, strict=True) if d != qid), reverse=True
        )[:k]
        run[qid] = {d: s for s, d in ranked}
    return run


@pytest.mark.parametrize(("chunk", "batch", "k"), [(50_000, 256, 10), (7, 3, 10), (5, 2, 40), (64, 64, 1)])
def test_exact_search_equals_brute_force_sort_with_ties(chunk: int, batch: int, k: int) -> None:
    rng = np.random.default_rng(0)
    # Few distinct small-integer vectors -> many exactly tied scores, including across the top-k cut-off.
    # Integer dot products are exact whatever the matrix shapes (with real-valued vectors, BLAS may round
    # the same product differently in different chunk shapes, and a 1-ulp difference is no longer a tie).
    base = rng.integers(-3, 4, size=(6, 8)).astype(np.float32)
    c = base[rng.integers(0, 6, size=33)]
    q = rng.integers(-3, 4, size=(11, 8)).astype(np.float32)
    cids = [f"d{i}" for i in range(33)]
    qids = [f"q{i}" for i in range(10)] + ["d4"]  # "d4" collides with a corpus id
    ours = exact_search(
        q, c, qids, cids, top_k=k, batch_size=batch, corpus_chunk_size=chunk, score_function="dot"
    )
    expected = brute_force(q, c, qids, cids, k, normalize=False)
    assert list(ours) == qids
    for qid in qids:
        assert list(ours[qid]) == list(expected[qid]), qid  # same documents, same (trec) order
        np.testing.assert_allclose(list(ours[qid].values()), list(expected[qid].values()), rtol=0, atol=1e-6)
    assert "d4" not in ours["d4"]


def test_exact_search_options() -> None:
    rng = np.random.default_rng(1)
    q, c = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
    run = exact_search(q, c, ["a", "b", "c", "x"], ["a", "b", "c"], top_k=100)
    assert [len(v) for v in run.values()] == [2, 2, 2, 3]  # corpus smaller than top_k, self-hits skipped
    keep = exact_search(q, c, ["a", "b", "c", "x"], ["a", "b", "c"], top_k=100, ignore_identical_ids=False)
    assert all(len(v) == 3 for v in keep.values())
    dot = exact_search(
        q, c, list("abcx"), list("abc"), top_k=1, score_function="dot", ignore_identical_ids=False
    )
    assert dot["x"][next(iter(dot["x"]))] == pytest.approx(float((q[3] @ c.T).max()), rel=1e-5)
    torch = pytest.importorskip("torch")
    assert exact_search(torch.tensor(q), torch.tensor(c), list("abcx"), list("abc")) == exact_search(
        q, c, list("abcx"), list("abc")
    )
    with pytest.raises(ValueError, match="duplicates"):
        exact_search(q, c, list("abcx"), ["a", "a", "c"])
    with pytest.raises(ValueError, match="query ids"):
        exact_search(q, c, list("abc"), list("abc"))


def test_document_text_follows_beir() -> None:
    assert document_text({"title": "T", "text": " body "}) == "T  body"
    assert document_text({"title": "", "text": "body "}) == "body"
    assert document_text({"text": " body"}) == "body"
    assert document_text({"title": None, "text": "body"}) == "body"


# ------------------------------------------------------------------------------------------ reporting


def test_compare_markdown_and_rounding() -> None:
    rows = compare({"NDCG@10": 0.5, "MRR@10": 0.0, "P@1": 0.2}, {"NDCG@10": 0.55, "MRR@10": 0.1})
    assert [r["metric"] for r in rows] == ["NDCG@10", "MRR@10"]
    assert rows[0]["delta"] == pytest.approx(0.05) and rows[0]["delta_pct"] == pytest.approx(10.0)
    assert rows[1]["delta_pct"] is None
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| metric | base | tuned |")
    assert "| NDCG@10 | 0.5000 | 0.5500 | +0.0500 | +10.00 % |" in table and "n/a" in table
    assert round_metrics({"a": 0.123456789}) == {"a": 0.12346}


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.9, size=200))}
    worse = {q: v - 0.1 + rng.normal(0, 0.05) for q, v in base.items()}
    mean, low, high = paired_bootstrap(base, worse, n=500, seed=0)
    assert low <= mean <= high < 0  # worse beyond noise
    noise = {q: v + rng.normal(0, 0.05) for q, v in base.items()}
    _, low, high = paired_bootstrap(base, noise, n=500, seed=0)
    assert low < 0 < high
    assert paired_bootstrap(base, noise, n=200, seed=7) == paired_bootstrap(base, noise, n=200, seed=7)
    with pytest.raises(ValueError, match="different queries"):
        paired_bootstrap(base, {"q0": 1.0})
    with pytest.raises(ValueError, match="no queries"):
        paired_bootstrap({}, {})


# ------------------------------------------------------------------------------------------ beir_io


def small_dataset() -> tuple[dict, dict, dict]:
    corpus = {
        "d1": {"title": "T1", "text": "first\ttext"},
        "d2": {"title": "", "text": "zweiter Text ä"},
        "d3": {"text": "x"},
    }
    queries = {"q1": "what?", "q2": "wer?", "q9": "unjudged"}
    qrels = {"q2": {"d2": 2, "d1": 0}, "q1": {"d1": 1}}
    return corpus, queries, qrels


def test_beir_io_round_trip(tmp_path: Path) -> None:
    corpus, queries, qrels = small_dataset()
    write_beir_folder(tmp_path, corpus, queries, qrels, split="dev")
    assert (tmp_path / "qrels" / "dev.tsv").read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"
    loaded_corpus, loaded_queries, loaded_qrels = load_beir_folder(tmp_path, split="dev")
    assert loaded_corpus == {**corpus, "d3": {"title": "", "text": "x"}}
    assert loaded_qrels == qrels
    assert loaded_queries == {"q2": "wer?", "q1": "what?"}  # judged queries only, in qrels order (like BEIR)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["corpus.jsonl", "qrels/dev.tsv", "queries.jsonl"]  # no temporaries left behind


def test_beir_io_matches_beir_loader(tmp_path: Path) -> None:
    loader = pytest.importorskip("beir.datasets.data_loader")
    corpus, queries, qrels = small_dataset()
    write_beir_folder(tmp_path, corpus, queries, qrels)
    assert loader.GenericDataLoader(str(tmp_path)).load("test") == load_beir_folder(tmp_path)


def test_write_beir_folder_validates_before_writing(tmp_path: Path) -> None:
    corpus, queries, _ = small_dataset()
    with pytest.raises(ValueError, match="corpus-id 'nope'"):
        write_beir_folder(tmp_path, corpus, queries, {"q1": {"nope": 1}})
    with pytest.raises(ValueError, match="query-id 'q7'"):
        write_beir_folder(tmp_path, corpus, queries, {"q7": {"d1": 1}})
    with pytest.raises(ValueError, match="integer"):
        write_beir_folder(tmp_path, corpus, queries, {"q1": {"d1": 1.5}})
    with pytest.raises(ValueError, match="tabs"):
        write_beir_folder(tmp_path, {"a\tb": {"text": "x"}}, {}, {})
    assert list(tmp_path.iterdir()) == []


def write_raw(folder: Path, corpus: str, queries: str, qrels: str) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    (folder / "queries.jsonl").write_text(queries, encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return folder


GOOD_CORPUS = '{"_id": "d1", "title": "t", "text": "a"}\n{"_id": 2, "text": "b"}\n'
GOOD_QUERIES = '{"_id": "q1", "text": "x"}\n'
HEADER = "query-id\tcorpus-id\tscore\n"


@pytest.mark.parametrize(
    ("corpus", "queries", "qrels", "message"),
    [
        (
            GOOD_CORPUS,
            GOOD_QUERIES,
            HEADER + "q1\td1\t1\nq1\tx\t1\n",
            r"qrels/test\.tsv:3: corpus-id 'x' not in corpus\.jsonl",
        ),
        (
            GOOD_CORPUS,
            GOOD_QUERIES,
            HEADER + "\nq2\td1\t1\n",
            r"qrels/test\.tsv:3: query-id 'q2' not in queries\.jsonl",
        ),
        (
            GOOD_CORPUS,
            GOOD_QUERIES,
            HEADER + "q1\td1\thigh\n",
            r"test\.tsv:2: score 'high' is not an integer",
        ),
        (
            GOOD_CORPUS,
            GOOD_QUERIES,
            HEADER + "q1 d1 1\n",
            r"test\.tsv:2: expected 3 tab-separated columns, got 1",
        ),
        (GOOD_CORPUS, GOOD_QUERIES, "q1\td1\t1\n", r"test\.tsv:1: expected the header"),
        (GOOD_CORPUS, GOOD_QUERIES, HEADER + "q1\td1\t1\nq1\td1\t2\n", r"test\.tsv:3: conflicting score 2"),
        (GOOD_CORPUS + "{oops\n", GOOD_QUERIES, HEADER, r"corpus\.jsonl:3: invalid JSON"),
        (GOOD_CORPUS + '{"text": "c"}\n', GOOD_QUERIES, HEADER, r"corpus\.jsonl:3: missing or invalid '_id'"),
        (
            GOOD_CORPUS + '{"_id": "d1", "text": "c"}\n',
            GOOD_QUERIES,
            HEADER,
            r"corpus\.jsonl:3: duplicate _id 'd1' \(first on line 1\)",
        ),
        (GOOD_CORPUS, '{"_id": "q1", "text": 5}\n', HEADER, r"queries\.jsonl:1: 'text' must be a string"),
        (GOOD_CORPUS, "[1, 2]\n", HEADER, r"queries\.jsonl:1: expected a JSON object"),
    ],
)
def test_load_beir_folder_errors_name_file_and_line(tmp_path: Path, corpus, queries, qrels, message) -> None:
    write_raw(tmp_path, corpus, queries, qrels)
    with pytest.raises(ValueError, match=message):
        load_beir_folder(tmp_path)


def test_load_beir_folder_numeric_ids_and_missing_split(tmp_path: Path) -> None:
    write_raw(tmp_path, GOOD_CORPUS, GOOD_QUERIES, HEADER + "q1\t2\t1\n")
    corpus, _, qrels = load_beir_folder(tmp_path)
    assert "2" in corpus and qrels == {"q1": {"2": 1}}
    with pytest.raises(FileNotFoundError, match=r"available splits: \['test'\]"):
        load_beir_folder(tmp_path, split="train")


@pytest.mark.skipif(not COVIDQA.is_dir(), reason="shared covidqa dataset not available")
def test_load_real_covidqa() -> None:
    corpus, queries, qrels = load_beir_folder(COVIDQA)
    assert len(corpus) == 1930 and len(queries) == len(qrels) == 479
    assert sum(len(v) for v in qrels.values()) == 486


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embed_assets.models import load_sentence_transformer

    return load_sentence_transformer("bundled:all-MiniLM-L6-v2")


def covidqa_subset(n_queries: int = 50, n_docs: int = 150) -> tuple[dict, dict, dict]:
    """The first test queries, their relevant passages, then other passages in file order up to n_docs."""
    corpus, queries, qrels = load_beir_folder(COVIDQA)
    qids = list(qrels)[:n_queries]
    keep = {d for q in qids for d in qrels[q]}
    for doc_id in corpus:
        if len(keep) >= n_docs:
            break
        keep.add(doc_id)
    sub_corpus = {d: doc for d, doc in corpus.items() if d in keep}
    return sub_corpus, {q: queries[q] for q in qids}, {q: qrels[q] for q in qids}


@pytest.mark.skipif(not COVIDQA.is_dir(), reason="shared covidqa dataset not available")
def test_encode_and_search_minilm_on_covidqa_subset(minilm) -> None:
    corpus, queries, qrels = covidqa_subset()
    assert len(corpus) == 150 and len(queries) == 50
    run, corpus_embeddings = encode_and_search(minilm, queries, corpus, top_k=100, batch_size=32)
    assert corpus_embeddings.shape == (150, 384) and list(run) == list(queries)
    metrics = evaluate(qrels, run)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["NDCG@10"] > 0.5, metrics  # measured 0.7071 for all-MiniLM-L6-v2
    assert metrics["Recall@100"] == 1.0  # 150 passages: everything is retrieved
    reference = pytrec_per_query(qrels, run, (10,))
    assert metrics["NDCG@10"] == pytest.approx(
        np.mean([s["ndcg_cut_10"] for s in reference.values()]), abs=1e-12
    )
    rerun, _ = encode_and_search(minilm, queries, corpus, corpus_embeddings=corpus_embeddings)
    assert rerun == run
