"""Hard-negative mining (Dagster-free).

:func:`mine_hard_negatives` has the semantics of ``sentence_transformers.util.mine_hard_negatives`` (v6.2) with
``output_format="n-tuple"`` (or ``"triplet"`` with ``keep_partial=True``): same candidates, same filters in the
same order, same negatives in the same order, same scores. It differs in how the work is done:

- the corpus is embedded once, or not at all when ``corpus_embeddings`` are passed (e.g. from
  :func:`embed_assets.embedding_cache.encode_with_cache`, which never re-encodes an unchanged chunk);
- identical queries are encoded once;
- top-k search runs in bounded query batches (exact matmul + ``torch.topk``), with a FAISS ``IndexFlatIP``, or
  past a corpus size with an approximate FAISS index whose recall is measured (:mod:`embed_assets.search`);
- filtering and sampling are vectorized over all queries.

Semantics, step by step (``K = range_max + max_positives`` candidates per query):

1. The corpus is de-duplicated by text (first id wins), so a passage whose text is identical to a positive is
   the positive itself and is never mined as a negative. Identical queries are merged (their positives united).
2. Queries and passages are L2-normalized; scores are the model's similarity (cosine for most models).
3. The top ``K`` passages are retrieved per query; ``range_max`` defaults to
   ``range_min + 10 * num_negatives + max_positives`` when a margin or ``max_score`` is set, else
   ``range_min + num_negatives + max_positives``.
4. Positives are masked. With a margin, the reference is the **minimum** positive score of the query (its
   hardest positive), so for multi-positive queries the rule "drop candidates scoring above 0.95 × min positive
   score" (``relative_margin=0.05``) holds for every positive: a candidate is dropped when
   ``score > p - |p| * relative_margin`` (for ``p > 0`` that is ``score > 0.95 p``) and, with ``absolute_margin``,
   when ``score + absolute_margin > p``. Then ``max_score`` / ``min_score`` drop candidates above / below a bound.
5. The surviving candidates are ranked by score, the best ``range_max`` kept, the first ``range_min`` of those
   skipped (ranks count *after* filtering), and ``num_negatives`` chosen: the hardest (``"top"``) or a uniform
   sample (``"random"``, then re-sorted by score; reproduces sentence-transformers' draws when its global
   ``random`` is seeded with the same ``seed``).
6. Multi-hop unrolling: a query with N positives yields N rows sharing the same negatives.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: The exact backend scores this many (query, passage) pairs per batch (128 MiB of float32).
EXACT_BATCH_CELLS = 1 << 25
#: FAISS on GPU cannot return more than this many neighbours per query.
FAISS_GPU_MAX_K = 2048

Progress = Callable[[str], Any]


@dataclass
class MinedRow:
    """One training row: a query, one of its positives and the query's hard negatives.

    Attributes:
        query: The query text.
        positive_id: Corpus id of the positive.
        positive_text: Its text.
        negative_ids: Corpus ids of the negatives, hardest first.
        negative_texts: Their texts.
        positive_score: Similarity of query and positive.
        negative_scores: Similarities of query and each negative (descending).
        query_positive_ids: All positives of the query (for multi-hop queries, the other rows' positives too).
    """

    query: str
    positive_id: str
    positive_text: str
    negative_ids: list[str]
    negative_texts: list[str]
    positive_score: float
    negative_scores: list[float]
    query_positive_ids: list[str] = field(default_factory=list)


@dataclass
class MiningStats:
    """Counters and timings of one mining run (see :meth:`MiningResult.as_metadata`)."""

    n_queries: int = 0
    n_unique_queries: int = 0
    n_corpus: int = 0
    n_corpus_unique: int = 0
    n_rows: int = 0
    n_dropped_no_negatives: int = 0
    n_rows_partial: int = (
        0  # kept with fewer negatives than asked (``min_negatives`` below ``num_negatives``)
    )
    n_rows_without_negatives: int = 0  # kept with none: in-batch negatives only
    false_negative_drops: int = 0
    cross_encoder_pairs: int = 0  # (query, passage) pairs the cross-encoder scored
    suspected_false_negatives: int = 0  # candidates the cross-encoder scores at or above the query's positive
    absolute_margin_drops: int = 0
    relative_margin_drops: int = 0
    max_score_drops: int = 0
    min_score_drops: int = 0
    positives_in_candidates: int = 0
    candidates_per_query: int = 0
    range_max: int = 0
    margin_mean: float | None = None
    margin_min: float | None = None
    margin_max: float | None = None
    positive_score_mean: float | None = None
    negative_score_mean: float | None = None
    mining_seconds: float = 0.0
    encode_seconds: float = 0.0
    search_seconds: float = 0.0
    search_backend: str = "exact"
    search_device: str = "cpu"
    search_recall_at_k: float | None = None  # approximate index only: share of exact top-k found (sampled)
    search_knob: int = 0  # approximate index only: the nprobe / efSearch the recall calibration chose
    corpus_embeddings_reused: bool = False
    passages_encoded: int = 0  # distinct passages the model encoded in this run (0 = all reused)
    queries_encoded: int = 0  # distinct queries the model encoded in this run


@dataclass
class MiningResult:
    """Mined rows plus statistics.

    Attributes:
        rows: One :class:`MinedRow` per (query, positive) pair that got enough negatives.
        stats: Counters, margin statistics and timings.
        settings: The settings the rows were mined with (resolved ``range_max`` included).
    """

    rows: list[MinedRow]
    stats: MiningStats
    settings: dict[str, Any] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        """A flat, JSON-serializable summary (for asset metadata).

        Returns:
            ``{name: int | float | str | bool | None}``; settings are prefixed with ``setting_``.
        """
        out: dict[str, Any] = {}
        for key, value in asdict(self.stats).items():
            out[key] = round(value, 4) if isinstance(value, float) else value
        for key, value in self.settings.items():
            out[f"setting_{key}"] = value
        return out

    def triplets(self) -> list[tuple[str, str, str]]:
        """The rows flattened to ``(query, positive_text, negative_text)`` triplets, row by row."""
        return [(r.query, r.positive_text, neg) for r in self.rows for neg in r.negative_texts]


# ------------------------------------------------------------------------------------------- preparation
@dataclass
class _Corpus:
    """The corpus de-duplicated by text."""

    texts: list[str]  # distinct texts, first-occurrence order
    first: list[int]  # for each distinct text, its first position in the input corpus
    of_id: dict[str, int]  # corpus id -> distinct-text index


@dataclass
class _Queries:
    """Queries merged by text, with their positives as distinct-text indices."""

    texts: list[str]
    first: list[int]  # first position of each distinct query in the input
    positives: list[list[int]]  # distinct-text indices, first-occurrence order, no repeats
    positive_ids: list[list[str]]  # the id given for each of those positives
    max_pairs: int  # max (query, positive) input pairs of one query, repeats included


def _dedupe_corpus(corpus_ids: Sequence[str], corpus_texts: Sequence[str]) -> _Corpus:
    """De-duplicate the corpus by text.

    Args:
        corpus_ids: Unique ids.
        corpus_texts: Texts aligned with the ids.

    Returns:
        The distinct texts and the maps between ids, input positions and distinct texts.
    """
    if len(corpus_ids) != len(corpus_texts):
        raise ValueError(f"{len(corpus_ids)} corpus ids for {len(corpus_texts)} corpus texts")
    index_of_text: dict[str, int] = {}
    texts: list[str] = []
    first: list[int] = []
    of_id: dict[str, int] = {}
    for pos, (cid, text) in enumerate(zip(corpus_ids, corpus_texts, strict=True)):
        if cid in of_id:
            raise ValueError(f"corpus id {cid!r} appears more than once")
        idx = index_of_text.get(text)
        if idx is None:
            idx = index_of_text[text] = len(texts)
            texts.append(text)
            first.append(pos)
        of_id[cid] = idx
    return _Corpus(texts=texts, first=first, of_id=of_id)


def _group_queries(
    queries: Sequence[str], positive_ids: Sequence[Sequence[str]], corpus: _Corpus
) -> _Queries:
    """Merge identical queries and map their positives to distinct corpus texts.

    Args:
        queries: Query texts (may repeat).
        positive_ids: For each query, the ids of its positives (at least one).
        corpus: The de-duplicated corpus.

    Returns:
        The grouped queries.
    """
    if len(queries) != len(positive_ids):
        raise ValueError(f"{len(queries)} queries for {len(positive_ids)} positive id lists")
    if not queries:
        raise ValueError("No queries to mine negatives for.")
    slot: dict[str, int] = {}
    grouped = _Queries(texts=[], first=[], positives=[], positive_ids=[], max_pairs=0)
    pairs: list[int] = []
    for pos, (query, pids) in enumerate(zip(queries, positive_ids, strict=True)):
        if isinstance(pids, str) or not pids:
            raise ValueError(f"query {pos} ({query[:60]!r}) needs a non-empty list of positive ids")
        q = slot.get(query)
        if q is None:
            q = slot[query] = len(grouped.texts)
            grouped.texts.append(query)
            grouped.first.append(pos)
            grouped.positives.append([])
            grouped.positive_ids.append([])
            pairs.append(0)
        pairs[q] += len(pids)
        for pid in pids:
            if pid not in corpus.of_id:
                raise KeyError(f"positive id {pid!r} of query {pos} is not in corpus_ids")
            idx = corpus.of_id[pid]
            if idx not in grouped.positives[q]:
                grouped.positives[q].append(idx)
                grouped.positive_ids[q].append(pid)
    grouped.max_pairs = max(pairs)
    return grouped


def _resolve_range_max(
    range_min: int,
    range_max: int | None,
    num_negatives: int,
    max_positives: int,
    filtering: bool,
) -> int:
    """``range_max`` as sentence-transformers resolves and validates it.

    Args:
        range_min: Ranks to skip.
        range_max: Requested window end, or ``None``.
        num_negatives: Negatives per query.
        max_positives: Largest number of (query, positive) pairs of one query.
        filtering: Whether a margin or ``max_score`` may drop candidates.

    Returns:
        The window end.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got num_negatives={num_negatives}.")
    if range_max is None:
        range_max = range_min + num_negatives * (10 if filtering else 1) + max_positives
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got range_min={range_min}.")
    if range_min >= range_max:
        raise ValueError(
            f"range_min must be smaller than range_max, got range_min={range_min} and range_max={range_max}."
        )
    if num_negatives > range_max - range_min:
        raise ValueError(
            f"Cannot mine {num_negatives} negatives per query: only {range_max - range_min} candidates remain "
            f"after skipping the first range_min={range_min} of range_max={range_max}."
        )
    return range_max


# ---------------------------------------------------------------------------------------------- embedding
def _encode(model: Any, texts: list[str], task: str, prompt: str | None, batch_size: int) -> np.ndarray:
    from embed_assets.embedding_cache import encode_texts

    return encode_texts(model, texts, task, prompt, batch_size, normalize=True)


def _rows_for(embeddings: np.ndarray, first: list[int], n_expected: int, what: str) -> np.ndarray:
    """Select the rows of precomputed embeddings that belong to the distinct texts.

    Args:
        embeddings: ``[n_expected, dim]`` embeddings aligned with the caller's input list.
        first: Input positions of the distinct texts.
        n_expected: Length of the caller's input list.
        what: Name for error messages.

    Returns:
        ``float32 [len(first), dim]``.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != n_expected:
        raise ValueError(f"{what} must have shape [{n_expected}, dim], got {embeddings.shape}")
    picked = embeddings[first] if len(first) != n_expected else embeddings
    norms = np.linalg.norm(picked, axis=1)
    if len(norms) and np.abs(norms - 1).max() > 1e-3:
        picked = picked / np.maximum(norms, 1e-12)[:, None]
    return np.ascontiguousarray(picked)


# ------------------------------------------------------------------------------------------------ search
_USE_FAISS = {
    True: "faiss",
    "yes": "faiss",
    False: "exact",
    "no": "exact",
    "ivf": "faiss-ivf",
    "hnsw": "faiss-hnsw",
}


def _choose_backend(use_faiss: bool | str, n_corpus: int, n_queries: int, k: int, similarity: str) -> str:
    """Pick ``"exact"``, ``"faiss"`` (exhaustive ``IndexFlatIP``), ``"faiss-ivf"`` or ``"faiss-hnsw"``.

    Args:
        use_faiss: ``True``/``"yes"``, ``False``/``"no"``, ``"ivf"``, ``"hnsw"`` or ``"auto"`` (exhaustive
            FAISS on GPU; on CPU :func:`~embed_assets.search.auto_index`: exact below
            :data:`~embed_assets.search.AUTO_ANN_MIN_CORPUS` passages or for few queries, else HNSW).
        n_corpus: Distinct passages.
        n_queries: Distinct query texts.
        k: Neighbours per query.
        similarity: The model's ``similarity_fn_name``.

    Returns:
        The backend name.
    """
    from embed_assets.search import auto_index, faiss_gpus

    if use_faiss != "auto" and use_faiss not in _USE_FAISS:
        raise ValueError(
            f"use_faiss must be True/'yes', False/'no', 'ivf', 'hnsw' or 'auto', got {use_faiss!r}"
        )
    chosen = _USE_FAISS.get(use_faiss, "auto")
    if similarity not in ("cosine", "dot"):
        if chosen.startswith("faiss"):
            logger.warning("FAISS inner product cannot express %r similarity; using exact search", similarity)
        return "exact"
    if chosen == "exact":
        return "exact"
    has_faiss = importlib.util.find_spec("faiss") is not None
    gpus = faiss_gpus() if has_faiss else 0
    if chosen != "auto":
        if not has_faiss:
            raise ImportError(f"use_faiss={use_faiss!r} needs faiss: pip install faiss-cpu (or faiss-gpu)")
        if gpus and k > FAISS_GPU_MAX_K:
            logger.warning(
                "FAISS on GPU returns at most %d neighbours, %d needed; using exact search",
                FAISS_GPU_MAX_K,
                k,
            )
            return "exact"
        return chosen
    if not has_faiss:
        return "exact"
    if gpus and k <= FAISS_GPU_MAX_K:
        return "faiss"
    chosen_index = auto_index(n_corpus, n_queries)
    return "exact" if chosen_index == "exact" else f"faiss-{chosen_index}"


def _search_exact(model: Any, query_emb: np.ndarray, corpus_emb: np.ndarray, k: int, device: str, progress):
    """Top-k by exact scoring in bounded query batches (the scores sentence-transformers computes).

    Args:
        model: The model (its ``similarity_fn_name`` / ``similarity`` define the score).
        query_emb: ``[n_q, dim]`` normalized query embeddings.
        corpus_emb: ``[n_c, dim]`` normalized passage embeddings.
        k: Neighbours per query (may exceed ``n_c``; the rest is padded with index -1, score -inf).
        device: Torch device for the matmuls.
        progress: Optional message callback.

    Returns:
        ``(scores, indices)`` torch tensors ``[n_q, k]`` on CPU, scores descending.
    """
    import torch

    similarity = getattr(model, "similarity_fn_name", "cosine")
    corpus_t = torch.from_numpy(corpus_emb).to(device)
    if similarity == "cosine":
        corpus_t = torch.nn.functional.normalize(corpus_t, p=2, dim=-1)
    k_eff = min(k, corpus_t.shape[0])
    step = max(1, EXACT_BATCH_CELLS // max(1, corpus_t.shape[0]))
    scores_parts, index_parts = [], []
    for start in range(0, len(query_emb), step):
        q = torch.from_numpy(query_emb[start : start + step]).to(device)
        if similarity == "cosine":
            sim = torch.mm(torch.nn.functional.normalize(q, p=2, dim=-1), corpus_t.T)
        elif similarity == "dot":
            sim = torch.mm(q, corpus_t.T)
        else:
            sim = model.similarity(q, corpus_t)
        top_scores, top_idx = torch.topk(sim, k=k_eff, dim=1)
        scores_parts.append(top_scores.cpu())
        index_parts.append(top_idx.cpu())
        _report_batch(progress, "exact search", start, step, len(query_emb))
    scores = torch.cat(scores_parts)
    indices = torch.cat(index_parts)
    if k > k_eff:
        scores = torch.cat([scores, scores.new_full((scores.size(0), k - k_eff), -float("inf"))], dim=1)
        indices = torch.cat([indices, indices.new_full((indices.size(0), k - k_eff), -1)], dim=1)
    return scores, indices


def _positive_scores(model: Any, query_emb: np.ndarray, corpus_emb: np.ndarray, groups: _Queries):
    """Similarity of every (query, positive) pair, as ``model.similarity_pairwise`` computes it.

    Args:
        model: The model.
        query_emb: Distinct-query embeddings.
        corpus_emb: Distinct-passage embeddings.
        groups: Grouped queries.

    Returns:
        A float tensor with one score per pair, pairs ordered by query then positive.
    """
    import torch

    q_rows = [q for q, pos in enumerate(groups.positives) for _ in pos]
    p_rows = [p for pos in groups.positives for p in pos]
    a = torch.from_numpy(query_emb[q_rows])
    b = torch.from_numpy(corpus_emb[p_rows])
    pairwise = getattr(model, "similarity_pairwise", None)
    if pairwise is not None:
        return pairwise(a, b).cpu()
    a = torch.nn.functional.normalize(a, p=2, dim=-1)
    b = torch.nn.functional.normalize(b, p=2, dim=-1)
    return (a * b).sum(-1)


# ------------------------------------------------------------------------------------------ filtering
def _filter_candidates(
    scores,
    indices,
    groups: _Queries,
    positive_scores,
    *,
    absolute_margin: float | None,
    relative_margin: float | None,
    max_score: float | None,
    min_score: float | None,
    stats: MiningStats,
):
    """Set disqualified candidates to ``-inf`` (padding, positives, margins, score bounds), in ST's order.

    Args:
        scores: ``[n_q, K]`` candidate scores (modified in place).
        indices: ``[n_q, K]`` candidate passage indices (-1 = padding).
        groups: Grouped queries (positives per query).
        positive_scores: Per-pair positive scores.
        absolute_margin: See :func:`mine_hard_negatives`.
        relative_margin: See :func:`mine_hard_negatives`.
        max_score: See :func:`mine_hard_negatives`.
        min_score: See :func:`mine_hard_negatives`.
        stats: Receives the drop counters.

    Returns:
        The scores tensor.
    """
    import torch

    neg_inf = -float("inf")
    scores[indices == -1] = neg_inf
    width = max(len(p) for p in groups.positives)
    pos = torch.full((len(groups.positives), width), -2, dtype=indices.dtype)
    for q, p in enumerate(groups.positives):
        pos[q, : len(p)] = torch.tensor(p, dtype=indices.dtype)
    positive_mask = (indices.unsqueeze(-1) == pos.unsqueeze(1)).any(-1)
    stats.positives_in_candidates = int(positive_mask.sum())
    scores[positive_mask] = neg_inf

    if absolute_margin is not None or relative_margin is not None:
        # The reference is the query's *minimum* positive score (its hardest positive).
        counts = np.array([len(p) for p in groups.positives])
        starts = np.cumsum(counts) - counts
        min_positive = torch.from_numpy(np.minimum.reduceat(positive_scores.numpy(), starts))
        reference = min_positive.unsqueeze(1)
        if absolute_margin is not None:
            removed = scores + absolute_margin > reference
            scores[removed] = neg_inf
            stats.absolute_margin_drops = int(removed.sum())
        if relative_margin is not None:
            removed = scores > (min_positive - min_positive.abs() * relative_margin).unsqueeze(1)
            scores[removed] = neg_inf
            stats.relative_margin_drops = int(removed.sum())
        stats.false_negative_drops = stats.absolute_margin_drops + stats.relative_margin_drops
    if max_score is not None:
        removed = scores > max_score
        scores[removed] = neg_inf
        stats.max_score_drops = int(removed.sum())
    if min_score is not None:
        removed = scores < min_score
        scores[removed] = neg_inf
        stats.min_score_drops = int(removed.sum())
    return scores


def _rescore_with_cross_encoder(
    cross_encoder: Any,
    groups: _Queries,
    corpus: _Corpus,
    scores: Any,
    indices: Any,
    batch_size: int,
    progress: Progress | None,
    stats: MiningStats,
) -> tuple[Any, Any]:
    """Replace the bi-encoder scores of every candidate and positive by the cross-encoder's.

    Returns:
        ``(scores, positive_scores)`` on the cross-encoder's scale (padding stays ``-inf``).
    """
    import torch

    idx = indices.tolist()
    where = [(q, j) for q, row in enumerate(idx) for j, i in enumerate(row) if i >= 0]
    pairs = [(groups.texts[q], corpus.texts[idx[q][j]]) for q, j in where]
    positive_pairs = [
        (groups.texts[q], corpus.texts[p]) for q, pos in enumerate(groups.positives) for p in pos
    ]
    _report(
        progress,
        f"mining: cross-encoder rescoring {len(pairs)} candidates and {len(positive_pairs)} positives",
    )
    predicted = cross_encoder.predict(pairs + positive_pairs, batch_size=batch_size, show_progress_bar=False)
    predicted = torch.as_tensor(np.asarray(predicted, dtype=np.float32))
    rescored = torch.full(scores.shape, -float("inf"), dtype=torch.float32)
    if where:
        rows, cols = zip(*where, strict=True)
        rescored[list(rows), list(cols)] = predicted[: len(pairs)]
    positive_scores = predicted[len(pairs) :]
    stats.cross_encoder_pairs = len(pairs) + len(positive_pairs)
    # A non-positive candidate the cross-encoder likes at least as much as the query's hardest positive.
    counts = np.array([len(p) for p in groups.positives])
    min_positive = torch.from_numpy(np.minimum.reduceat(positive_scores.numpy(), np.cumsum(counts) - counts))
    positive_set = [set(p) for p in groups.positives]
    stats.suspected_false_negatives = sum(
        1
        for (q, j), s in zip(where, predicted[: len(pairs)].tolist(), strict=True)
        if idx[q][j] not in positive_set[q] and s >= float(min_positive[q])
    )
    return rescored, positive_scores


def _select(scores, indices, *, range_min: int, range_max: int, num_negatives: int, strategy: str, seed: int):
    """Rank the survivors, apply the rank window and pick the negatives.

    Args:
        scores: ``[n_q, K]`` filtered scores.
        indices: ``[n_q, K]`` candidate indices.
        range_min: Ranks to skip.
        range_max: Window end.
        num_negatives: Negatives per query.
        strategy: ``"top"`` or ``"random"``.
        seed: Seed of the ``random`` draws.

    Returns:
        ``(scores, indices)`` ``[n_q, num_negatives]``, descending; ``-inf`` marks a missing negative.
    """
    import torch

    n_q = scores.size(0)
    batch_idx = torch.arange(n_q).unsqueeze(-1)
    negative_scores, local = torch.topk(scores, k=range_max, dim=1)
    indices = indices[batch_idx, local]
    if range_min:
        indices = indices[:, range_min:]
        negative_scores = negative_scores[:, range_min:]
    if strategy == "top":
        return negative_scores[:, :num_negatives], indices[:, :num_negatives]
    rng = random.Random(seed)
    options = (indices.size(1) - negative_scores.isinf().sum(1)).clamp(min=num_negatives).tolist()
    sampled = [rng.sample(range(n), k=num_negatives) for n in options]
    indices = indices[batch_idx, sampled]
    negative_scores = negative_scores[batch_idx, sampled]
    negative_scores, local = negative_scores.sort(dim=1, descending=True)
    return negative_scores, indices[batch_idx, local]


# ---------------------------------------------------------------------------------------------- output
def _build_rows(
    groups: _Queries,
    corpus: _Corpus,
    corpus_ids: Sequence[str],
    positive_scores,
    neg_scores,
    neg_indices,
    *,
    required: int,
    unroll: bool,
    stats: MiningStats,
) -> list[MinedRow]:
    """Assemble :class:`MinedRow` objects (one per positive when unrolling, else one per query).

    Args:
        groups: Grouped queries.
        corpus: De-duplicated corpus.
        corpus_ids: The input corpus ids.
        positive_scores: Per-pair positive scores.
        neg_scores: ``[n_q, num_negatives]`` selected negative scores (``-inf`` = none).
        neg_indices: ``[n_q, num_negatives]`` selected negative indices.
        required: Minimum number of negatives for a row to be kept.
        unroll: One row per positive (multi-hop unrolling) instead of one per query.
        stats: Receives row counters and score statistics.

    Returns:
        The rows.
    """
    pos_list = positive_scores.tolist()
    scores_list = neg_scores.tolist()
    index_list = neg_indices.tolist()
    rows: list[MinedRow] = []
    gaps: list[float] = []
    pair = 0
    for q, query in enumerate(groups.texts):
        kept = [(i, s) for i, s in zip(index_list[q], scores_list[q], strict=True) if s != -float("inf")]
        neg_ids = [corpus_ids[corpus.first[i]] for i, _ in kept]
        neg_texts = [corpus.texts[i] for i, _ in kept]
        neg_sc = [float(s) for _, s in kept]
        n_pos = len(groups.positives[q])
        take = range(n_pos) if unroll else range(1)
        for j in take:
            pos_score = float(pos_list[pair + j])
            if len(kept) < required:
                stats.n_dropped_no_negatives += 1
                continue
            stats.n_rows_partial += int(len(kept) < len(index_list[q]))
            stats.n_rows_without_negatives += int(not kept)
            if neg_sc:
                gaps.append(pos_score - neg_sc[0])
            rows.append(
                MinedRow(
                    query=query,
                    positive_id=groups.positive_ids[q][j],
                    positive_text=corpus.texts[groups.positives[q][j]],
                    negative_ids=list(neg_ids),
                    negative_texts=list(neg_texts),
                    positive_score=pos_score,
                    negative_scores=list(neg_sc),
                    query_positive_ids=list(groups.positive_ids[q]),
                )
            )
        pair += n_pos
    stats.n_rows = len(rows)
    if gaps:
        stats.margin_mean = float(np.mean(gaps))
        stats.margin_min = float(np.min(gaps))
        stats.margin_max = float(np.max(gaps))
        stats.positive_score_mean = float(np.mean([r.positive_score for r in rows]))
        stats.negative_score_mean = float(np.mean([s for r in rows for s in r.negative_scores]))
    elif rows:
        stats.positive_score_mean = float(np.mean([r.positive_score for r in rows]))
    return rows


def _report(progress: Progress | None, message: str) -> None:
    logger.debug(message)
    if progress is not None:
        progress(message)


def _report_batch(progress: Progress | None, what: str, start: int, step: int, total: int) -> None:
    """Report a search batch, at most about ten times per search."""
    n_batches = -(-total // step)
    batch = start // step
    if batch == n_batches - 1 or batch % max(1, n_batches // 10) == 0:
        _report(progress, f"mining: {what} {min(start + step, total)}/{total} queries")


# ------------------------------------------------------------------------------------------------- API
def mine_hard_negatives(
    queries: list[str],
    positive_ids: list[list[str]],
    corpus_ids: list[str],
    corpus_texts: list[str],
    model: Any,
    *,
    num_negatives: int = 5,
    range_min: int = 0,
    range_max: int | None = None,
    relative_margin: float | None = 0.05,
    absolute_margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    sampling_strategy: str = "top",
    use_faiss: bool | str = "auto",
    batch_size: int = 32,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    corpus_embeddings: np.ndarray | None = None,
    seed: int = 42,
    unroll_multi_hop: bool = True,
    progress: Progress | None = None,
    query_embeddings: np.ndarray | None = None,
    keep_partial: bool = False,
    min_negatives: int | None = None,
    cross_encoder: Any | None = None,
) -> MiningResult:
    """Mine hard negatives for (query, positives) pairs from a corpus.

    Same semantics as ``sentence_transformers.util.mine_hard_negatives`` with the same settings and
    ``output_format="n-tuple"`` (``"triplet"`` when ``keep_partial=True``); see the module docstring.

    Args:
        queries: Query texts (identical queries are merged and encoded once).
        positive_ids: For each query, the corpus ids of its positives (≥ 1; several = multi-hop).
        corpus_ids: Ids of the candidate passages (unique); must contain every positive id.
        corpus_texts: Texts aligned with ``corpus_ids``; identical texts count as one passage (the first id).
        model: A ``SentenceTransformer`` (encodes queries, and passages unless ``corpus_embeddings`` are given).
        num_negatives: Negatives per query.
        range_min: Skip the ``range_min`` best surviving candidates.
        range_max: Consider only the best ``range_max`` surviving candidates (default: see module docstring).
        relative_margin: Drop candidates scoring above ``p - |p| * relative_margin``, ``p`` = the query's minimum
            positive score (0.05 → above 0.95 × p for positive ``p``). ``None`` disables it.
        absolute_margin: Drop candidates with ``score + absolute_margin > p``. ``None`` disables it.
        max_score: Drop candidates scoring above this.
        min_score: Drop candidates scoring below this.
        sampling_strategy: ``"top"`` (hardest first) or ``"random"`` (uniform within the window, seeded).
        use_faiss: ``True``/``"yes"`` (FAISS ``IndexFlatIP``, GPU when FAISS has one), ``False``/``"no"``
            (exact batched matmul), ``"ivf"`` / ``"hnsw"`` (an approximate FAISS index whose recall against
            exact search is calibrated and reported, :mod:`embed_assets.search`), ``"auto"`` (exhaustive FAISS
            on GPU; on CPU :func:`~embed_assets.search.auto_index`: HNSW past
            :data:`~embed_assets.search.AUTO_ANN_MIN_CORPUS` passages with enough queries to pay for it).
        batch_size: Encoding batch size.
        query_prompt: Raw prompt for queries (``None`` = the model's ``query`` prompt, as ST does).
        corpus_prompt: Raw prompt for passages (``None`` = the model's document prompt).
        corpus_embeddings: Precomputed passage embeddings aligned with ``corpus_ids`` (same model and
            ``corpus_prompt``, normalized), e.g. from ``encode_with_cache``; skips encoding the corpus.
        seed: Seed for ``sampling_strategy="random"``.
        unroll_multi_hop: One row per positive (N rows for N positives, sharing the negatives); ``False`` =
            one row per query with its first positive.
        progress: Optional callback receiving progress messages (e.g. ``context.log.info``).
        query_embeddings: Precomputed query embeddings aligned with ``queries`` (skips encoding queries).
        keep_partial: Keep rows with fewer than ``num_negatives`` (but ≥ 1) negatives (ST's triplet output);
            by default such rows are dropped so every row has exactly ``num_negatives`` (ST's n-tuple output).
        cross_encoder: A ``CrossEncoder`` that rescores the candidates and positives before the margin filter
            (sentence-transformers' ``mine_hard_negatives(cross_encoder=...)`` semantics): a candidate it scores
            above the query's positive is a suspected false negative (counted in the stats) and never mined.
        min_negatives: Keep rows with at least this many negatives (overrides ``keep_partial``; ``0`` keeps every
            row, those without a surviving candidate then train on in-batch negatives only).

    Returns:
        A :class:`MiningResult`.
    """
    start = time.perf_counter()
    if sampling_strategy not in ("top", "random"):
        raise ValueError(f"sampling_strategy must be 'top' or 'random', got {sampling_strategy!r}")
    corpus = _dedupe_corpus(corpus_ids, corpus_texts)
    groups = _group_queries(queries, positive_ids, corpus)
    filtering = absolute_margin is not None or relative_margin is not None or max_score is not None
    range_max = _resolve_range_max(
        range_min,
        range_max,
        num_negatives,
        groups.max_pairs,
        filtering or (cross_encoder is not None and min_score is not None),
    )
    k = range_max + groups.max_pairs
    similarity = getattr(model, "similarity_fn_name", "cosine")
    backend = _choose_backend(use_faiss, len(corpus.texts), len(groups.texts), k, similarity)
    device = _device(model)
    stats = MiningStats(
        n_queries=len(queries),
        n_unique_queries=len(groups.texts),
        n_corpus=len(corpus_ids),
        n_corpus_unique=len(corpus.texts),
        candidates_per_query=k,
        range_max=range_max,
        search_backend=backend,
        search_device=device if backend == "exact" else "cpu",
        corpus_embeddings_reused=corpus_embeddings is not None,
        passages_encoded=0 if corpus_embeddings is not None else len(corpus.texts),
        queries_encoded=0 if query_embeddings is not None else len(groups.texts),
    )
    t0 = time.perf_counter()
    query_emb, corpus_emb = _embed_inputs(
        model, queries, corpus_texts, corpus, groups, batch_size, query_prompt, corpus_prompt,
        corpus_embeddings, query_embeddings, progress,
    )  # fmt: skip
    stats.encode_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    _report(
        progress, f"mining: {backend} top-{k} search, {len(query_emb)} queries x {len(corpus_emb)} passages"
    )
    if backend != "exact":
        import torch

        from embed_assets.search import ann_search, flat_search

        if backend == "faiss":
            found_scores, found, report = flat_search(query_emb, corpus_emb, k, progress)
        else:
            found_scores, found, report = ann_search(
                query_emb, corpus_emb, k, backend.removeprefix("faiss-"), seed=seed, progress=progress
            )
            stats.search_recall_at_k, stats.search_knob = report.recall_at_k, report.knob
        stats.search_device = report.device
        scores, indices = torch.from_numpy(found_scores), torch.from_numpy(found)
    else:
        scores, indices = _search_exact(model, query_emb, corpus_emb, k, device, progress)
    stats.search_seconds = time.perf_counter() - t0

    positive_scores = _positive_scores(model, query_emb, corpus_emb, groups)
    if cross_encoder is not None and (filtering or min_score is not None):
        # As sentence-transformers does: the cross-encoder rescores the candidates and the positives, and the
        # margins, bounds and ranking below then work on its scores.
        scores, positive_scores = _rescore_with_cross_encoder(
            cross_encoder, groups, corpus, scores, indices, batch_size, progress, stats
        )
    scores = _filter_candidates(
        scores,
        indices,
        groups,
        positive_scores,
        absolute_margin=absolute_margin,
        relative_margin=relative_margin,
        max_score=max_score,
        min_score=min_score,
        stats=stats,
    )
    neg_scores, neg_indices = _select(
        scores,
        indices,
        range_min=range_min,
        range_max=range_max,
        num_negatives=num_negatives,
        strategy=sampling_strategy,
        seed=seed,
    )
    rows = _build_rows(
        groups,
        corpus,
        corpus_ids,
        positive_scores,
        neg_scores,
        neg_indices,
        required=min_negatives if min_negatives is not None else (1 if keep_partial else num_negatives),
        unroll=unroll_multi_hop,
        stats=stats,
    )
    stats.mining_seconds = time.perf_counter() - start
    settings = {
        "num_negatives": num_negatives,
        "range_min": range_min,
        "range_max": range_max,
        "relative_margin": relative_margin,
        "absolute_margin": absolute_margin,
        "max_score": max_score,
        "min_score": min_score,
        "sampling_strategy": sampling_strategy,
        "seed": seed,
        "unroll_multi_hop": unroll_multi_hop,
        "keep_partial": keep_partial,
        "min_negatives": min_negatives,
        "similarity": similarity,
    }
    _report(
        progress,
        f"mining: {stats.n_rows} rows from {stats.n_unique_queries} queries in {stats.mining_seconds:.1f}s "
        f"({stats.false_negative_drops} candidates dropped by the margin, "
        f"{stats.n_dropped_no_negatives} rows without enough negatives)",
    )
    return MiningResult(rows=rows, stats=stats, settings=settings)


def _device(model: Any) -> str:
    device = getattr(model, "device", None)
    return str(device) if device is not None else "cpu"


def _embed_inputs(
    model: Any,
    queries: Sequence[str],
    corpus_texts: Sequence[str],
    corpus: _Corpus,
    groups: _Queries,
    batch_size: int,
    query_prompt: str | None,
    corpus_prompt: str | None,
    corpus_embeddings: np.ndarray | None,
    query_embeddings: np.ndarray | None,
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the distinct queries and distinct passages (computed or taken from the caller).

    Args:
        model: The model.
        queries: Input queries.
        corpus_texts: Input corpus texts.
        corpus: De-duplicated corpus.
        groups: Grouped queries.
        batch_size: Encoding batch size.
        query_prompt: Raw query prompt.
        corpus_prompt: Raw passage prompt.
        corpus_embeddings: Optional precomputed passage embeddings aligned with ``corpus_texts``.
        query_embeddings: Optional precomputed query embeddings aligned with ``queries``.
        progress: Optional message callback.

    Returns:
        ``(query_emb, corpus_emb)``, normalized float32.
    """
    if corpus_embeddings is not None:
        corpus_emb = _rows_for(corpus_embeddings, corpus.first, len(corpus_texts), "corpus_embeddings")
    else:
        _report(progress, f"mining: encoding {len(corpus.texts)} distinct passages")
        corpus_emb = _encode(model, corpus.texts, "document", corpus_prompt, batch_size)
    if query_embeddings is not None:
        query_emb = _rows_for(query_embeddings, groups.first, len(queries), "query_embeddings")
    else:
        _report(progress, f"mining: encoding {len(groups.texts)} distinct queries")
        query_emb = _encode(model, groups.texts, "query", query_prompt, batch_size)
    if query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(f"query dim {query_emb.shape[1]} != passage dim {corpus_emb.shape[1]}")
    return query_emb, corpus_emb


def mine_pool(
    model: Any,
    records: Sequence[Any],
    pool: Sequence[Any],
    cache_dir: str,
    *,
    model_fingerprint: str,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    **mining: Any,
) -> MiningResult:
    """Mine negatives for training records from a pool of chunks, as ``mined_negatives`` does.

    The pool's and the queries' embeddings go through the per-text cache
    (:func:`~embed_assets.embedding_cache.encode_with_cache`), so a re-run encodes only new or changed passages
    and queries (e.g. after new SDG pairs or a change of margins, nothing but the new texts).

    Args:
        model: The ``SentenceTransformer`` that mines (the base model).
        records: Training pairs (``.query``, ``.positive_chunk_ids``), e.g. ``QARecord``.
        pool: Candidate chunks (``.chunk_id``, ``.text``); must hold every positive.
        cache_dir: Root folder of the embedding cache.
        model_fingerprint: Identifies the model weights and passage prompt in the cache.
        query_prompt: Raw query prompt (``None`` = the model's).
        passage_prompt: Raw passage prompt (``None`` = the model's).
        batch_size: Encoding batch size.
        progress: Optional callback receiving progress messages.
        **mining: More :func:`mine_hard_negatives` settings (``num_negatives``, margins, ``use_faiss``, ...).

    Returns:
        The :class:`MiningResult`.
    """
    from embed_assets.embedding_cache import EmbeddingCache

    corpus_ids = [c.chunk_id for c in pool]
    corpus_texts = [c.text for c in pool]
    queries = [r.query for r in records]
    passages = EmbeddingCache(cache_dir, model_fingerprint, prompt=passage_prompt, task="document")
    corpus_emb = passages.encode(model, corpus_texts, corpus_ids, batch_size=batch_size)
    questions = EmbeddingCache(cache_dir, model_fingerprint, prompt=query_prompt, task="query")
    query_ids = [getattr(r, "qa_id", str(i)) for i, r in enumerate(records)]
    query_emb = questions.encode(model, queries, query_ids, batch_size=batch_size)
    result = mine_hard_negatives(
        queries,
        [r.positive_chunk_ids for r in records],
        corpus_ids,
        corpus_texts,
        model,
        batch_size=batch_size,
        query_prompt=query_prompt,
        corpus_prompt=passage_prompt,
        corpus_embeddings=corpus_emb,
        query_embeddings=query_emb,
        progress=progress,
        **mining,
    )
    result.stats.passages_encoded = passages.last_stats.n_encoded
    result.stats.queries_encoded = questions.last_stats.n_encoded
    result.stats.encode_seconds += passages.last_stats.seconds + questions.last_stats.seconds
    return result
