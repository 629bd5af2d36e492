"""Dense retrieval and BEIR-compatible IR metrics (Dagster-free, no pytrec_eval at run time).

The numbers equal BEIR's ``EvaluateRetrieval.evaluate`` (pytrec_eval's ``ndcg_cut``, ``map_cut``, ``recall``,
``P``) and ``evaluate_custom(..., "mrr")`` on the same run, before BEIR's 5-decimal rounding (use
:func:`round_metrics` for that). Conventions reproduced on purpose:

* Ranking for NDCG/MAP/Recall/P is trec_eval's: score descending, ties broken by document id descending
  (byte-wise, like ``strcmp``). MRR follows BEIR's ``mrr``: score descending, ties kept in the run's insertion
  order. :func:`exact_search` returns runs already in trec order, so both agree on its runs.
* Relevance: a judgment ``>= 1`` is relevant for Recall/P/MAP/MRR; NDCG uses gain = relevance for positive
  judgments and 0 otherwise; the ideal ranking is built from all positive judgments of the query.
* Which queries count (``missing_queries="beir"``): NDCG/MAP/Recall/P average over queries that are in the
  run *and* have at least one judgment in qrels (what pytrec_eval scores; a run entry with no documents
  counts as all zeros, a query absent from the run is skipped). MRR sums over run queries and divides by
  ``len(qrels)``, as BEIR does. ``missing_queries="zero"`` instead averages every metric over all queries
  in qrels and scores an absent query 0 (trec_eval ``-c``), which is the fair choice when a retriever may
  return nothing for some queries.
* ``ignore_identical_ids``: a document whose id equals the query id is dropped (BEIR's default) both at
  search and at evaluation time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]
MissingQueries = Literal["beir", "zero"]
ScoreFunction = Literal["cos_sim", "dot"]

DEFAULT_K_VALUES: tuple[int, ...] = (1, 5, 10, 100)
METRIC_FAMILIES: tuple[str, ...] = ("NDCG", "MAP", "Recall", "P", "MRR")
_TREC_FAMILIES: tuple[str, ...] = ("NDCG", "MAP", "Recall", "P")


# ================================================================================================ search


def exact_search(
    query_embeddings: Any,
    corpus_embeddings: Any,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    top_k: int = 100,
    batch_size: int = 256,
    corpus_chunk_size: int = 50_000,
    score_function: ScoreFunction = "cos_sim",
    ignore_identical_ids: bool = True,
) -> Run:
    """Exact (brute-force) top-k search by matrix product, in query batches and corpus chunks.

    Ties are resolved like trec_eval (higher document id first), also at the top-k cut-off, so the result is
    deterministic and equals the first ``top_k`` entries of a full trec_eval sort of all scores.

    Args:
        query_embeddings: ``(n_queries, dim)`` array-like (numpy array or torch tensor).
        corpus_embeddings: ``(n_docs, dim)`` array-like.
        query_ids: Ids of the query rows.
        corpus_ids: Ids of the corpus rows (unique).
        top_k: Documents kept per query.
        batch_size: Queries scored per matrix product.
        corpus_chunk_size: Documents scored per matrix product (bounds memory to batch × chunk floats).
        score_function: ``"cos_sim"`` (rows are L2-normalized first, as BEIR's ``cos_sim``) or ``"dot"``.
        ignore_identical_ids: Skip a document whose id equals the query id (BEIR's behaviour).

    Returns:
        ``{query_id: {doc_id: score}}`` with documents in rank order; every query has an entry.

    Raises:
        ValueError: shapes and ids disagree, ids repeat, ``top_k < 1`` or an unknown score function.
    """
    queries, docs, query_ids, corpus_ids = _search_inputs(
        query_embeddings, corpus_embeddings, query_ids, corpus_ids, top_k, score_function
    )
    tie_rank = descending_id_rank(corpus_ids)
    doc_index = {doc_id: i for i, doc_id in enumerate(corpus_ids)}
    run: Run = {}
    for start in range(0, len(query_ids), max(1, batch_size)):
        batch_ids = query_ids[start : start + max(1, batch_size)]
        excluded = np.array([doc_index.get(q, -1) if ignore_identical_ids else -1 for q in batch_ids])
        idx, scores = _search_batch(
            queries[start : start + len(batch_ids)], docs, tie_rank, excluded, top_k, corpus_chunk_size
        )
        for qid, row_idx, row_scores in zip(batch_ids, idx, scores, strict=True):
            keep = np.isfinite(row_scores)
            run[qid] = {corpus_ids[i]: float(s) for i, s in zip(row_idx[keep], row_scores[keep], strict=True)}
    return run


def encode_and_search(
    model: Any,
    queries: Mapping[str, str],
    corpus: Mapping[str, Mapping[str, Any]],
    top_k: int = 100,
    batch_size: int = 32,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    corpus_embeddings: np.ndarray | None = None,
    score_function: ScoreFunction = "cos_sim",
    ignore_identical_ids: bool = True,
    show_progress_bar: bool = False,
    index: Literal["auto", "exact", "ivf", "hnsw"] = "auto",
    reports: list[Any] | None = None,
) -> tuple[Run, np.ndarray]:
    """Encode queries (and the corpus unless given) with a sentence-transformers model, then search.

    Mirrors BEIR's ``SentenceBERT`` + ``DenseRetrievalExactSearch``: a document is encoded as
    ``(title + " " + text).strip()`` (just ``text.strip()`` without a ``title`` key), the corpus is fed to the
    model longest first (same order as BEIR, hence the same batches), scores are cosine similarities and a
    hit whose id equals the query id is skipped.

    Args:
        model: A ``SentenceTransformer`` (anything with ``encode(texts, prompt=, batch_size=, ...)``).
        queries: ``{query_id: text}``.
        corpus: ``{doc_id: {"title": str, "text": str}}``.
        top_k: Documents kept per query.
        batch_size: Encoding batch size.
        query_prompt: Prefix for queries (e.g. e5's ``"query: "``); ``None`` = the model's default prompt.
        corpus_prompt: Prefix for documents (e.g. ``"passage: "``).
        corpus_embeddings: Precomputed ``(len(corpus), dim)`` embeddings in ``corpus`` order (as returned by
            an earlier call) to skip corpus encoding.
        score_function: ``"cos_sim"`` or ``"dot"``.
        ignore_identical_ids: See :func:`exact_search`.
        show_progress_bar: Forwarded to ``model.encode``.
        index: ``"exact"``; ``"ivf"`` / ``"hnsw"``: an approximate FAISS index calibrated to recall@``top_k``
            ≥ 0.99 against exact search (:func:`embed_assets.search.ann_search`); ``"auto"``: exact below
            :data:`embed_assets.search.AUTO_ANN_MIN_CORPUS` documents (or without faiss), then as
            :func:`embed_assets.search.auto_index` decides (HNSW on a CPU for many queries, IVF on a GPU).
        reports: Receives the :class:`~embed_assets.search.SearchReport` of an approximate search (its recall).

    Returns:
        ``(run, corpus_embeddings)``: the run and the ``float32`` corpus embeddings in ``corpus`` order.
    """
    corpus_ids = list(corpus)
    if corpus_embeddings is None:
        corpus_embeddings = encode_corpus(model, corpus, batch_size, corpus_prompt, show_progress_bar)
    elif len(corpus_embeddings) != len(corpus_ids):
        raise ValueError(
            f"corpus_embeddings has {len(corpus_embeddings)} rows for {len(corpus_ids)} documents"
        )
    query_ids = list(queries)
    if not query_ids or not corpus_ids:
        return {qid: {} for qid in query_ids}, np.asarray(corpus_embeddings, dtype=np.float32)
    query_embeddings = _encode(
        model, [queries[q] for q in query_ids], query_prompt, batch_size, show_progress_bar
    )
    chosen = _choose_index(index, len(corpus_ids), len(query_ids))
    if chosen != "exact":
        run, report = ann_run(
            query_embeddings, corpus_embeddings, query_ids, corpus_ids, top_k, chosen, score_function,
            ignore_identical_ids,
        )  # fmt: skip
        if reports is not None:
            reports.append(report)
        return run, np.asarray(corpus_embeddings, dtype=np.float32)
    run = exact_search(
        query_embeddings,
        corpus_embeddings,
        query_ids,
        corpus_ids,
        top_k=top_k,
        score_function=score_function,
        ignore_identical_ids=ignore_identical_ids,
    )
    return run, np.asarray(corpus_embeddings, dtype=np.float32)


def _choose_index(index: str, n_corpus: int, n_queries: int) -> str:
    from embed_assets.search import auto_index

    return auto_index(n_corpus, n_queries) if index == "auto" else index


def ann_run(
    query_embeddings: Any,
    corpus_embeddings: Any,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    top_k: int,
    index: Literal["ivf", "hnsw"] = "ivf",
    score_function: ScoreFunction = "cos_sim",
    ignore_identical_ids: bool = True,
) -> tuple[Run, Any]:
    """:func:`exact_search`'s run from an approximate index (for corpora past exact search's size).

    Returns:
        ``(run, report)``: the run in rank order (ties as the index returns them) and the
        :class:`~embed_assets.search.SearchReport` with the recall@``top_k`` measured against exact search.
    """
    from embed_assets.search import ann_search

    queries, docs, query_ids, corpus_ids = _search_inputs(
        query_embeddings, corpus_embeddings, query_ids, corpus_ids, top_k, score_function
    )
    k = min(top_k + int(ignore_identical_ids), len(corpus_ids))  # one more: a hit on the query's own id
    scores, found, report = ann_search(queries, docs, k, index)
    run: Run = {}
    for qid, row_idx, row_scores in zip(query_ids, found, scores, strict=True):
        hits = [(corpus_ids[i], float(sc)) for i, sc in zip(row_idx, row_scores, strict=True) if i >= 0]
        run[qid] = dict([h for h in hits if not (ignore_identical_ids and h[0] == qid)][:top_k])
    return run, report


def encode_corpus(
    model: Any,
    corpus: Mapping[str, Mapping[str, Any]],
    batch_size: int = 32,
    prompt: str | None = None,
    show_progress_bar: bool = False,
) -> np.ndarray:
    """Encode documents BEIR-style (longest first) and return the embeddings in ``corpus`` order.

    Args:
        model: A ``SentenceTransformer``.
        corpus: ``{doc_id: {"title", "text"}}``.
        batch_size: Encoding batch size.
        prompt: Document prefix, or ``None`` for the model's default.
        show_progress_bar: Forwarded to ``model.encode``.

    Returns:
        ``(len(corpus), dim)`` ``float32`` array (``(0, 0)`` for an empty corpus).
    """
    docs = list(corpus.values())
    if not docs:
        return np.zeros((0, 0), dtype=np.float32)
    order = sorted(range(len(docs)), key=lambda i: _beir_length(docs[i]), reverse=True)
    encoded = _encode(model, [document_text(docs[i]) for i in order], prompt, batch_size, show_progress_bar)
    out = np.empty_like(encoded)
    out[np.asarray(order)] = encoded
    return out


def document_text(doc: Mapping[str, Any], sep: str = " ") -> str:
    """The text BEIR's ``SentenceBERT`` encodes for a document.

    Args:
        doc: ``{"title"?, "text"}``; a ``None`` title counts as empty.
        sep: Separator between title and text.

    Returns:
        ``(title + sep + text).strip()`` when the document has a ``title`` key, else ``text.strip()``.
    """
    text = doc.get("text") or ""
    if "title" in doc:
        return ((doc.get("title") or "") + sep + text).strip()
    return text.strip()


def descending_id_rank(ids: Sequence[str]) -> np.ndarray:
    """Rank of each id when ids are sorted descending (0 = greatest), trec_eval's tie-break order.

    Python compares strings by code point, which is the byte order of their UTF-8 encoding, i.e. ``strcmp``.

    Args:
        ids: Document ids.

    Returns:
        ``int64`` array aligned with ``ids``.
    """
    order = sorted(range(len(ids)), key=ids.__getitem__, reverse=True)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(len(ids), dtype=np.int64)
    return rank


def _encode(model: Any, texts: list[str], prompt: str | None, batch_size: int, progress: bool) -> np.ndarray:
    emb = model.encode(
        texts, prompt=prompt, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True
    )
    return np.asarray(emb, dtype=np.float32)


def _beir_length(doc: Mapping[str, Any]) -> int:
    return len((doc.get("title") or "") + (doc.get("text") or ""))


def _as_matrix(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {arr.shape}")
    return arr


def _check_search_args(
    queries: np.ndarray,
    docs: np.ndarray,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    top_k: int,
    score_function: str,
) -> None:
    if len(query_ids) != len(queries):
        raise ValueError(f"{len(query_ids)} query ids for {len(queries)} query embeddings")
    if len(corpus_ids) != len(docs):
        raise ValueError(f"{len(corpus_ids)} corpus ids for {len(docs)} corpus embeddings")
    if len(docs) and len(queries) and queries.shape[1] != docs.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {queries.shape[1]}, corpus {docs.shape[1]}")
    if len(set(corpus_ids)) != len(corpus_ids):
        raise ValueError("corpus_ids contain duplicates")
    if len(set(query_ids)) != len(query_ids):
        raise ValueError("query_ids contain duplicates")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if score_function not in ("cos_sim", "dot"):
        raise ValueError(f"score_function must be 'cos_sim' or 'dot', got {score_function!r}")


def _search_inputs(
    query_embeddings: Any,
    corpus_embeddings: Any,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    top_k: int,
    score_function: ScoreFunction,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Checked float32 matrices and id lists for a search (rows L2-normalized for ``cos_sim``)."""
    queries = _as_matrix(query_embeddings, "query_embeddings")
    docs = _as_matrix(corpus_embeddings, "corpus_embeddings")
    query_ids, corpus_ids = list(query_ids), list(corpus_ids)
    _check_search_args(queries, docs, query_ids, corpus_ids, top_k, score_function)
    if score_function == "cos_sim":
        queries, docs = _l2_normalize(queries), _l2_normalize(docs)
    return queries, docs, query_ids, corpus_ids


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _search_batch(
    queries: np.ndarray,
    docs: np.ndarray,
    tie_rank: np.ndarray,
    excluded: np.ndarray,
    top_k: int,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus indices and scores for one query batch, merging per-chunk top-k lists."""
    best_idx = np.zeros((len(queries), 0), dtype=np.int64)
    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    rows = np.arange(len(queries))
    for start in range(0, len(docs), max(1, chunk_size)):
        chunk = docs[start : start + max(1, chunk_size)]
        scores = queries @ chunk.T
        scores[np.isnan(scores)] = -1.0  # as BEIR does
        inside = (excluded >= start) & (excluded < start + len(chunk))
        scores[rows[inside], excluded[inside] - start] = -np.inf
        pos = top_k_positions(scores, tie_rank[start : start + len(chunk)], top_k)
        cand_idx = np.concatenate([best_idx, pos + start], axis=1)
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, pos, axis=1)], axis=1)
        keep = top_k_positions(cand_scores, tie_rank[cand_idx], top_k)
        best_idx = np.take_along_axis(cand_idx, keep, axis=1)
        best_scores = np.take_along_axis(cand_scores, keep, axis=1)
    return best_idx, best_scores


def top_k_positions(scores: np.ndarray, tie_rank: np.ndarray, k: int) -> np.ndarray:
    """Column positions of the ``k`` best entries of each row, in rank order.

    Order: score descending, then ``tie_rank`` ascending. ``argpartition`` finds the k-th score; rows where
    entries tie with it across the cut-off are resolved by ``tie_rank``, so the result is exact.

    Args:
        scores: ``(rows, n)`` scores without NaN.
        tie_rank: ``(n,)`` or ``(rows, n)`` tie-break ranks (lower wins).
        k: How many to keep (capped at ``n``).

    Returns:
        ``(rows, min(k, n))`` ``int64`` positions.
    """
    n_rows, n = scores.shape
    k = min(k, n)
    tie = np.broadcast_to(tie_rank, scores.shape)
    if k == 0:
        return np.zeros((n_rows, 0), dtype=np.int64)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
        n_above = (scores > kth).sum(axis=1)
        n_tied = (scores == kth).sum(axis=1)
        for r in np.flatnonzero(n_above + n_tied > k):
            above = np.flatnonzero(scores[r] > kth[r, 0])
            tied = np.flatnonzero(scores[r] == kth[r, 0])
            tied = tied[np.argsort(tie[r, tied], kind="stable")][: k - len(above)]
            part[r] = np.concatenate([above, tied])
    else:
        part = np.tile(np.arange(n, dtype=np.int64), (n_rows, 1))
    sel_scores = np.take_along_axis(scores, part, axis=1)
    sel_tie = np.take_along_axis(tie, part, axis=1)
    order = np.lexsort((sel_tie, -sel_scores), axis=-1)
    return np.take_along_axis(part, order, axis=1).astype(np.int64, copy=False)


# ================================================================================================ metrics


def evaluate(
    qrels: Qrels,
    run: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    ignore_identical_ids: bool = True,
    missing_queries: MissingQueries = "beir",
) -> dict[str, float]:
    """BEIR metrics of a run: ``NDCG@k``, ``MAP@k``, ``Recall@k``, ``P@k`` and ``MRR@k`` (unrounded).

    Args:
        qrels: ``{query_id: {doc_id: relevance}}``.
        run: ``{query_id: {doc_id: score}}`` (not modified).
        k_values: Cut-offs.
        ignore_identical_ids: Drop run documents whose id equals the query id (BEIR's default).
        missing_queries: ``"beir"`` (default, equal to BEIR/pytrec_eval) or ``"zero"`` (every query in qrels
            counts; see the module docstring).

    Returns:
        ``{"NDCG@1": ..., ..., "MRR@100": ...}`` ordered by family then k; all 0.0 when nothing is evaluable.
    """
    ks = _check_k_values(k_values)
    per_query = per_query_metrics(qrels, run, ks, ignore_identical_ids, missing_queries)
    n_trec = len(per_query)
    n_mrr = len(qrels) if missing_queries == "beir" else n_trec
    out: dict[str, float] = {}
    for family in METRIC_FAMILIES:
        denominator = n_mrr if family == "MRR" else n_trec
        for k in ks:
            key = f"{family}@{k}"
            total = 0.0
            for metrics in per_query.values():  # run order and plain addition, as BEIR: bit-identical sums
                total += metrics[key]
            out[key] = total / denominator if denominator else 0.0
    return out


def per_query_metrics(
    qrels: Qrels,
    run: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    ignore_identical_ids: bool = True,
    missing_queries: MissingQueries = "beir",
) -> dict[str, dict[str, float]]:
    """Every metric for every evaluated query.

    Args:
        qrels: ``{query_id: {doc_id: relevance}}``.
        run: ``{query_id: {doc_id: score}}``.
        k_values: Cut-offs.
        ignore_identical_ids: See :func:`evaluate`.
        missing_queries: ``"beir"``: queries in the run with at least one judgment (pytrec_eval's set);
            ``"zero"``: every query in qrels, absent ones scored 0.

    Returns:
        ``{query_id: {"NDCG@k": ..., "MRR@k": ...}}``.
    """
    if missing_queries not in ("beir", "zero"):
        raise ValueError(f"missing_queries must be 'beir' or 'zero', got {missing_queries!r}")
    ks = _check_k_values(k_values)
    qids = [q for q in run if qrels.get(q)] if missing_queries == "beir" else list(qrels)
    out: dict[str, dict[str, float]] = {}
    for qid in qids:
        docs = dict(run.get(qid, {}))
        if ignore_identical_ids:
            docs.pop(qid, None)
        out[qid] = query_metrics(qrels[qid], docs, ks)
    return out


def per_query_ndcg(
    qrels: Qrels,
    run: Mapping[str, Mapping[str, float]],
    k: int = 10,
    ignore_identical_ids: bool = True,
    missing_queries: MissingQueries = "beir",
) -> dict[str, float]:
    """Per-query ``NDCG@k`` (the input of :func:`paired_bootstrap`).

    Args:
        qrels: ``{query_id: {doc_id: relevance}}``.
        run: ``{query_id: {doc_id: score}}``.
        k: Cut-off.
        ignore_identical_ids: See :func:`evaluate`.
        missing_queries: See :func:`per_query_metrics`.

    Returns:
        ``{query_id: ndcg}``; its mean equals ``evaluate(...)[f"NDCG@{k}"]``.
    """
    per_query = per_query_metrics(qrels, run, (k,), ignore_identical_ids, missing_queries)
    return {qid: m[f"NDCG@{k}"] for qid, m in per_query.items()}


def query_metrics(
    judged: Mapping[str, int], doc_scores: Mapping[str, float], k_values: Sequence[int]
) -> dict[str, float]:
    """All metrics for one query.

    Args:
        judged: ``{doc_id: relevance}`` of the query.
        doc_scores: ``{doc_id: score}`` retrieved for the query.
        k_values: Cut-offs.

    Returns:
        ``{"NDCG@k", "MAP@k", "Recall@k", "P@k", "MRR@k"}`` for every k.
    """
    trec_order = [d for d, _ in sorted(doc_scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]
    out = _trec_metrics(judged, trec_order, k_values)
    beir_order = [d for d, _ in sorted(doc_scores.items(), key=lambda kv: kv[1], reverse=True)]
    out.update(_mrr(judged, beir_order, k_values))
    return out


def _trec_metrics(judged: Mapping[str, int], ranking: list[str], k_values: Sequence[int]) -> dict[str, float]:
    """trec_eval's ndcg_cut, map_cut, recall and P (relevance_level 1) for one ranked list."""
    num_rel = sum(1 for r in judged.values() if r >= 1)
    ideal = sorted((r for r in judged.values() if r > 0), reverse=True)
    cut = {k: _cut_state(judged, ranking, k) for k in k_values}
    out: dict[str, float] = {}
    for family in _TREC_FAMILIES:
        for k in k_values:
            rel_ret, sum_prec, dcg = cut[k]
            if family == "NDCG":
                idcg = _dcg(ideal[:k])
                out[f"NDCG@{k}"] = dcg / idcg if idcg > 0 else 0.0
            elif family == "MAP":
                out[f"MAP@{k}"] = sum_prec / num_rel if num_rel else 0.0
            elif family == "Recall":
                out[f"Recall@{k}"] = rel_ret / num_rel if num_rel else 0.0
            else:
                out[f"P@{k}"] = rel_ret / k
    return out


def _cut_state(judged: Mapping[str, int], ranking: list[str], k: int) -> tuple[int, float, float]:
    """(relevant retrieved, sum of precision at relevant ranks, DCG) over the first ``k`` documents."""
    rel_ret, sum_prec, dcg = 0, 0.0, 0.0
    for i, doc_id in enumerate(ranking[:k]):
        rel = judged.get(doc_id, 0)
        if rel > 0:
            dcg += rel / math.log2(i + 2)
        if rel >= 1:
            rel_ret += 1
            sum_prec += rel_ret / (i + 1)
    return rel_ret, sum_prec, dcg


def _dcg(gains: list[int]) -> float:
    total = 0.0
    for i, gain in enumerate(gains):
        total += gain / math.log2(i + 2)
    return total


def _mrr(judged: Mapping[str, int], ranking: list[str], k_values: Sequence[int]) -> dict[str, float]:
    """BEIR's ``mrr`` for one query: reciprocal rank of the first relevant document within k."""
    first = next((i for i, d in enumerate(ranking) if judged.get(d, 0) > 0), None)
    return {f"MRR@{k}": (1.0 / (first + 1) if first is not None and first < k else 0.0) for k in k_values}


def _check_k_values(k_values: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in k_values)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"k_values must be positive integers, got {list(k_values)}")
    return ks


# ================================================================================================ reporting


def round_metrics(metrics: Mapping[str, float], ndigits: int = 5) -> dict[str, float]:
    """Round like BEIR (``round(value, 5)``).

    Args:
        metrics: Output of :func:`evaluate`.
        ndigits: Decimals.

    Returns:
        A new dict with rounded values.
    """
    return {key: round(value, ndigits) for key, value in metrics.items()}


def compare(base: Mapping[str, float], tuned: Mapping[str, float]) -> list[dict[str, Any]]:
    """Rows comparing two metric dicts, one per metric present in both (in ``base`` order).

    Args:
        base: Metrics of the base model.
        tuned: Metrics of the fine-tuned model.

    Returns:
        ``[{"metric", "base", "tuned", "delta", "delta_pct"}]``; ``delta = tuned - base`` and
        ``delta_pct = 100 * delta / base`` (``None`` when ``base`` is 0).
    """
    rows = []
    for metric, b in base.items():
        if metric not in tuned:
            continue
        t = tuned[metric]
        delta = t - b
        rows.append(
            {
                "metric": metric,
                "base": b,
                "tuned": t,
                "delta": delta,
                "delta_pct": 100.0 * delta / b if b else None,
            }
        )
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """Render :func:`compare` rows as a Markdown table (for Dagster ``MetadataValue.md``).

    Args:
        rows: Output of :func:`compare`.
        digits: Decimals for metric values.

    Returns:
        The table text.
    """
    lines = ["| metric | base | tuned | Δ | Δ % |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        pct = row.get("delta_pct")
        pct_text = "n/a" if pct is None else f"{pct:+.2f} %"
        lines.append(
            f"| {row['metric']} | {row['base']:.{digits}f} | {row['tuned']:.{digits}f} | "
            f"{row['delta']:+.{digits}f} | {pct_text} |"
        )
    return "\n".join(lines)


def paired_bootstrap(
    base_per_query: Mapping[str, float],
    tuned_per_query: Mapping[str, float],
    n: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Paired bootstrap of the mean per-query difference ``tuned - base``.

    Queries are resampled with replacement ``n`` times; the interval is the percentile interval of the
    resampled means. "Worse beyond noise" is ``ci_high < 0``, "better beyond noise" is ``ci_low > 0``.

    Args:
        base_per_query: ``{query_id: score}`` of the base model (e.g. :func:`per_query_ndcg`).
        tuned_per_query: Same queries for the fine-tuned model.
        n: Bootstrap resamples.
        seed: RNG seed (results are reproducible).
        confidence: Interval coverage, e.g. 0.95.

    Returns:
        ``(mean_delta, ci_low, ci_high)``.

    Raises:
        ValueError: the two dicts hold different queries, no queries, or bad ``n`` / ``confidence``.
    """
    if set(base_per_query) != set(tuned_per_query):
        only_base = len(set(base_per_query) - set(tuned_per_query))
        only_tuned = len(set(tuned_per_query) - set(base_per_query))
        raise ValueError(
            f"per-query scores cover different queries ({only_base} only in base, {only_tuned} only in tuned)"
        )
    if not base_per_query:
        raise ValueError("no queries to bootstrap")
    if n < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n >= 1 and 0 < confidence < 1, got n={n}, confidence={confidence}")
    qids = sorted(base_per_query)
    deltas = np.array([tuned_per_query[q] - base_per_query[q] for q in qids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n, dtype=np.float64)
    block = max(1, 2_000_000 // len(deltas))  # bound memory to ~16 MB of indices
    for start in range(0, n, block):
        size = min(block, n - start)
        means[start : start + size] = deltas[rng.integers(0, len(deltas), size=(size, len(deltas)))].mean(
            axis=1
        )
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(deltas.mean()), float(low), float(high)


# --------------------------------------------------------------------------- any encoder, parity gates
#: ``encode(texts, input_type) -> (n, dim) float32`` with ``input_type`` "query" or "passage"; an ONNX model,
#: a torch model or a remote /v1/embeddings endpoint all fit.
EncodeFn = Callable[[list[str], str], np.ndarray]


def evaluate_encoder(
    encode: EncodeFn,
    corpus: Mapping[str, Mapping[str, Any]],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int] = (1, 5, 10, 100),
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Retrieve with any encoder over a BEIR folder's contents and score it like :func:`evaluate`.

    Args:
        encode: The encoder (applies its own query/passage prefixes).
        corpus: ``{doc_id: {"title", "text"}}``.
        queries: ``{query_id: text}``.
        qrels: Relevance judgments.
        k_values: Cut-offs.

    Returns:
        ``(metrics, run)``.
    """
    corpus_ids = list(corpus)
    query_ids = list(queries)
    c_emb = encode([document_text(corpus[d]) for d in corpus_ids], "passage")
    q_emb = encode([queries[q] for q in query_ids], "query")
    run = exact_search(q_emb, c_emb, query_ids, corpus_ids, top_k=max(k_values))
    return evaluate(qrels, run, k_values=k_values), run


def metric_parity(
    reference: Mapping[str, float],
    candidate: Mapping[str, float],
    tol_at_1: float = 0.03,
    tol: float = 0.01,
) -> tuple[bool, list[dict[str, Any]]]:
    """Check that ``candidate`` metrics stay within NIM's tolerance of ``reference`` (0.03 at @1, 0.01 above).

    Returns:
        ``(all within tolerance, rows of {metric, reference, candidate, diff, tolerance, ok})``.
    """
    rows = []
    for name, ref in reference.items():
        if name not in candidate:
            continue
        k = int(name.rsplit("@", 1)[1]) if "@" in name else 0
        limit = tol_at_1 if k == 1 else tol
        diff = float(candidate[name]) - float(ref)
        rows.append(
            {
                "metric": name,
                "reference": ref,
                "candidate": candidate[name],
                "diff": diff,
                "tolerance": limit,
                "ok": abs(diff) <= limit + 1e-12,
            }
        )
    return all(r["ok"] for r in rows), rows
