"""Top-k inner-product search at size: a FAISS index whose recall against exact search is measured, not assumed.

Exact search (a matrix product per query batch) costs ``queries × passages`` and stays the default below a
corpus size (:data:`AUTO_ANN_MIN_CORPUS`) and, on a CPU, while there are too few queries to pay for building
an index (:data:`HNSW_BREAK_EVEN_QUERIES`); past both, mining and evaluation use an approximate index
(:func:`auto_index`):

- ``"ivf"``: ``IndexIVFFlat`` (k-means cells, ``nlist ≈ 4·√n``), trained on a sample; runs on GPU when FAISS
  sees one (``faiss-gpu``), else on every CPU core. ``"auto"`` on a GPU.
- ``"hnsw"``: ``IndexHNSWFlat`` (graph; CPU only in FAISS). ``"auto"`` on a CPU: on a million real-text
  passages it reached recall@10 ≥ 0.99 at 13× exact search's speed, where IVF needed half its cells
  (``benchmarks/scale.py --parts search``).

Neither has a setting that is right for every corpus, so the search knob (``nprobe`` for IVF, ``efSearch`` for
HNSW) is chosen per run: a random sample of the queries is searched exactly, and the knob doubles until the
index's top-k agrees with exact search on at least ``target_recall`` of the sample's neighbours. The recall
reached and the knob are returned, so the caller reports them (mining's and evaluation's metadata).

Custom code over a FAISS ``index_factory`` string alone because of that calibration: FAISS ships the indexes,
not a rule for when an approximate answer is good enough.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

#: ``"auto"`` uses an approximate index from this many passages on (exact below: as fast, and exact).
AUTO_ANN_MIN_CORPUS = 100_000
#: On a CPU, ``"auto"`` builds an HNSW index only for at least this many queries: inserting a passage costs
#: about as much as scoring it exactly against this many queries (measured with ``benchmarks/scale.py``: 229 s
#: to insert a million 384-d vectors, 31 s to score them against 2,000 queries), so with fewer queries exact
#: search is faster all-in. Calibrating the knob adds an exact search of :data:`RECALL_SAMPLE` queries.
HNSW_BREAK_EVEN_QUERIES = 15_000
#: The share of exact top-k neighbours the approximate index must return on the calibration sample.
TARGET_RECALL = 0.99
#: Queries searched both ways to measure recall (and to choose the search knob).
RECALL_SAMPLE = 512
#: IVF cells per √passages, and training points per cell (FAISS warns below 39, uses at most 256).
IVF_CELLS_PER_SQRT_N = 4
IVF_TRAIN_POINTS_PER_CELL = 64
#: HNSW graph degree and build-time beam (FAISS's usual values for ~1M vectors).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
#: Queries per ``index.search`` call (bounds the result buffers).
QUERY_BATCH = 16384

AnnIndex = Literal["ivf", "hnsw"]
Progress = Callable[[str], Any]


@dataclass
class SearchReport:
    """How a top-k search was done, for metadata.

    Attributes:
        index: ``"exact"``, ``"flat"`` (FAISS exhaustive), ``"ivf"`` or ``"hnsw"``.
        n_corpus: Passages searched.
        n_queries: Queries searched.
        k: Neighbours per query.
        recall_at_k: Mean share of the exact top-k found, on the calibration sample (``None``: exact search).
        recall_sample: Queries in the calibration sample.
        knob: ``nprobe`` (IVF) or ``efSearch`` (HNSW) chosen by the calibration.
        cells: IVF cells (``nlist``).
        build_seconds: Index training and adding.
        calibration_seconds: Exact search of the sample and the index searches that chose the knob.
        search_seconds: Search of every query at the chosen knob.
        device: ``"cpu"`` or ``"cuda"``.
    """

    index: str
    n_corpus: int
    n_queries: int
    k: int
    recall_at_k: float | None = None
    recall_sample: int = 0
    knob: int = 0
    cells: int = 0
    build_seconds: float = 0.0
    calibration_seconds: float = 0.0
    search_seconds: float = 0.0
    device: str = "cpu"

    def as_metadata(self) -> dict[str, Any]:
        return {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None
        }


def auto_index(n_corpus: int, n_queries: int) -> Literal["exact", "ivf", "hnsw"]:
    """What ``"auto"`` searches with.

    Args:
        n_corpus: Passages to search.
        n_queries: Queries to search them with.

    Returns:
        ``"exact"`` below :data:`AUTO_ANN_MIN_CORPUS` passages (or without faiss); from there on ``"ivf"`` on a
        GPU (it builds in seconds there), and on a CPU ``"hnsw"`` for at least :data:`HNSW_BREAK_EVEN_QUERIES`
        queries, else ``"exact"`` (faster all-in than building the index).
    """
    import importlib.util

    if importlib.util.find_spec("faiss") is None or n_corpus < AUTO_ANN_MIN_CORPUS:
        return "exact"
    if faiss_gpus():
        return "ivf"
    return "hnsw" if n_queries >= HNSW_BREAK_EVEN_QUERIES else "exact"


def faiss_gpus() -> int:
    """GPUs FAISS can use (0 without faiss or with faiss-cpu)."""
    try:
        import faiss
    except ImportError:
        return 0
    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def exact_topk(query_emb: np.ndarray, corpus_emb: np.ndarray, k: int, cells: int = 1 << 25) -> np.ndarray:
    """Indices of the ``k`` highest inner products per query (unordered ties), in bounded query batches.

    Args:
        query_emb: ``[n_q, dim]`` float32.
        corpus_emb: ``[n_c, dim]`` float32.
        k: Neighbours per query (at most ``n_c``).
        cells: Scores held at once (bounds memory).

    Returns:
        ``int64 [n_q, k]`` indices, best first.
    """
    k = min(k, len(corpus_emb))
    step = max(1, cells // max(1, len(corpus_emb)))
    out = np.empty((len(query_emb), k), dtype=np.int64)
    for start in range(0, len(query_emb), step):
        scores = query_emb[start : start + step] @ corpus_emb.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start : start + step] = np.take_along_axis(part, order, axis=1)
    return out


def recall_at_k(
    found: np.ndarray,
    exact: np.ndarray,
    query_emb: np.ndarray | None = None,
    corpus_emb: np.ndarray | None = None,
) -> float:
    """Mean share of each row of ``exact`` that the same row of ``found`` holds (``-1`` = nothing found).

    With the embeddings, ties count: a found passage scoring at least the exact k-th score is a hit even if
    exact search happened to pick another passage of that score (identical texts, truncated windows).
    """
    if not len(exact):
        return 1.0
    if query_emb is None or corpus_emb is None:
        hits = sum(len(set(f[f >= 0].tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True))
        return hits / exact.size
    kth = np.einsum("qd,qd->q", query_emb, corpus_emb[exact[:, -1]])
    safe = np.where(found >= 0, found, 0)
    scores = np.einsum("qd,qkd->qk", query_emb, corpus_emb[safe[:, : exact.shape[1]]])
    hit = (scores >= kth[:, None] - 1e-5) & (found[:, : exact.shape[1]] >= 0)
    return float(hit.sum() / exact.size)


def ann_search(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    k: int,
    index: AnnIndex = "ivf",
    *,
    target_recall: float = TARGET_RECALL,
    recall_sample: int = RECALL_SAMPLE,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray, SearchReport]:
    """Approximate top-k inner-product search, calibrated to ``target_recall`` against exact search.

    Args:
        query_emb: ``[n_q, dim]`` (normalized for cosine).
        corpus_emb: ``[n_c, dim]``.
        k: Neighbours per query.
        index: ``"ivf"`` or ``"hnsw"``.
        target_recall: Share of the exact top-k the calibration sample must reach.
        recall_sample: Queries in the calibration sample (all of them when there are fewer).
        seed: Seeds the k-means training sample and the calibration sample.
        progress: Receives one line per phase.

    Returns:
        ``(scores, indices, report)``: ``float32`` / ``int64 [n_q, k]``, best first, ``-1`` where an index
        returned fewer than ``k`` neighbours.
    """
    import faiss

    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    corpus_emb = np.ascontiguousarray(corpus_emb, dtype=np.float32)
    n, dim = corpus_emb.shape
    rng = np.random.default_rng(seed)
    report = SearchReport(index=index, n_corpus=n, n_queries=len(query_emb), k=k)
    t0 = time.perf_counter()
    if index == "ivf":
        cells = max(1, min(int(IVF_CELLS_PER_SQRT_N * math.sqrt(n)), n // 39))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        train = corpus_emb[rng.choice(n, size=min(n, cells * IVF_TRAIN_POINTS_PER_CELL), replace=False)]
        ivf.cp.seed = seed
        ivf.train(train)
        ivf.add(corpus_emb)
        searcher: Any = ivf
        if faiss_gpus():
            searcher = faiss.index_cpu_to_all_gpus(ivf)
            report.device = "cuda"
        report.cells = cells
        knobs = _doublings(8, cells)

        def set_knob(value: int) -> None:
            faiss.ParameterSpace().set_index_parameter(searcher, "nprobe", value)
    elif index == "hnsw":
        searcher = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        searcher.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        searcher.add(corpus_emb)
        knobs = _doublings(max(16, k), max(16, k) * 64)

        def set_knob(value: int) -> None:
            searcher.hnsw.efSearch = value
    else:
        raise ValueError(f"index must be 'ivf' or 'hnsw', got {index!r}")
    report.build_seconds = time.perf_counter() - t0
    _say(progress, f"search: {index} index over {n} passages built in {report.build_seconds:.1f}s")

    t0 = time.perf_counter()
    sample = rng.choice(len(query_emb), size=min(recall_sample, len(query_emb)), replace=False)
    sample_q = query_emb[np.sort(sample)]
    exact = exact_topk(sample_q, corpus_emb, k)
    for knob in knobs:
        set_knob(knob)
        _, found = searcher.search(sample_q, min(k, n))
        report.knob, report.recall_at_k = knob, recall_at_k(found, exact, sample_q, corpus_emb)
        if report.recall_at_k >= target_recall:
            break
    report.recall_sample = len(sample_q)
    report.calibration_seconds = time.perf_counter() - t0
    _say(
        progress,
        f"search: {index} knob {report.knob} reaches recall@{k} {report.recall_at_k:.4f} vs exact "
        f"on {len(sample_q)} queries (target {target_recall})",
    )
    t0 = time.perf_counter()
    scores, indices = _search_all(searcher, query_emb, k, progress)
    report.search_seconds = time.perf_counter() - t0
    return scores, indices, report


def flat_search(
    query_emb: np.ndarray, corpus_emb: np.ndarray, k: int, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray, SearchReport]:
    """Exhaustive top-k with a FAISS ``IndexFlatIP`` (on all GPUs FAISS sees, else CPU).

    Returns:
        ``(scores, indices, report)`` as :func:`ann_search`; missing neighbours have index -1.
    """
    import faiss

    t0 = time.perf_counter()
    index: Any = faiss.IndexFlatIP(corpus_emb.shape[1])
    report = SearchReport(index="flat", n_corpus=len(corpus_emb), n_queries=len(query_emb), k=k)
    if faiss_gpus():
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True
        index = faiss.index_cpu_to_all_gpus(index, co=co)
        report.device = "cuda"
    index.add(np.ascontiguousarray(corpus_emb, dtype=np.float32))
    report.build_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, indices = _search_all(index, np.ascontiguousarray(query_emb, dtype=np.float32), k, progress)
    report.search_seconds = time.perf_counter() - t0
    return scores, indices, report


def _search_all(index: Any, query_emb: np.ndarray, k: int, progress: Progress | None):
    scores_parts, index_parts = [], []
    for start in range(0, len(query_emb), QUERY_BATCH):
        s, i = index.search(query_emb[start : start + QUERY_BATCH], k)
        scores_parts.append(s)
        index_parts.append(i)
        _say(progress, f"search: {min(start + QUERY_BATCH, len(query_emb))}/{len(query_emb)} queries")
    if not scores_parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores_parts), np.concatenate(index_parts)


def _doublings(start: int, stop: int) -> list[int]:
    """``start, 2·start, …`` up to and including ``stop`` (the exhaustive setting, recall 1 by construction)."""
    out, value = [], max(1, start)
    while value < stop:
        out.append(value)
        value *= 2
    return [*out, max(1, stop)]


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)
