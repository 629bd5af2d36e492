"""Benchmark embed_assets.metrics against BEIR on a BEIR-format dataset.

Runs the same sentence-transformers model through

* ours: ``load_beir_folder`` → ``encode_and_search`` → ``evaluate``, and
* BEIR: ``GenericDataLoader`` → ``models.SentenceBERT`` + ``DenseRetrievalExactSearch`` →
  ``EvaluateRetrieval.evaluate`` + ``evaluate_custom(..., "mrr")``,

then prints Markdown tables: the metrics of both (BEIR rounds to 5 decimals, so ours are rounded the same
way to compare), cross-evaluations (each evaluator on the other's run), run agreement, and wall times.

BEIR is not a project dependency: ``pip install --no-deps beir`` (it needs ``pytrec-eval-terrier``, a dev extra).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/eval.py                      # covidqa test split, all 1,930 passages
    python benchmarks/eval.py --dataset ../shared/datasets/xquad-de --split test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from embed_assets.beir_io import load_beir_folder
from embed_assets.metrics import encode_and_search, encode_corpus, evaluate, round_metrics
from embed_assets.models import load_sentence_transformer, resolve_model_path

DEFAULT_DATASET = (
    Path(os.environ.get("EMBED_ASSETS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    / "datasets"
    / "covidqa"
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The parsed namespace.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", type=Path, default=DEFAULT_DATASET, help="BEIR folder (default: covidqa)"
    )
    parser.add_argument("--split", default="test", help="qrels split (default: test)")
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2", help="base_model setting or folder")
    parser.add_argument("--batch-size", type=int, default=32, help="encoding batch size for both sides")
    parser.add_argument("--k-values", default="1,5,10,100", help="comma-separated cut-offs")
    parser.add_argument("--max-seq-length", type=int, default=None, help="optional truncation for both sides")
    parser.add_argument("--eval-repeats", type=int, default=5, help="repeats when timing evaluation alone")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers to this JSON file")
    return parser.parse_args(argv)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` and return ``(result, seconds)``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_ours(
    model: Any, corpus: dict, queries: dict, qrels: dict, ks: tuple[int, ...], batch_size: int
) -> dict:
    """Our pipeline with per-phase wall times.

    Args:
        model: The loaded ``SentenceTransformer``.
        corpus: BEIR corpus.
        queries: Judged queries.
        qrels: Judgments.
        ks: Cut-offs.
        batch_size: Encoding batch size.

    Returns:
        ``{"run", "metrics", "times"}``.
    """
    embeddings, t_corpus = timed(lambda: encode_corpus(model, corpus, batch_size=batch_size))
    encode_times = {"encode": 0.0}
    _time_method(model, "encode", encode_times, "encode")
    try:
        (run, _), t_search = timed(
            lambda: encode_and_search(
                model, queries, corpus, top_k=max(ks), batch_size=batch_size, corpus_embeddings=embeddings
            )
        )
    finally:
        del model.encode  # drop the instance attribute set by _time_method
    metrics, t_eval = timed(lambda: evaluate(qrels, run, ks))
    times = {
        "encode corpus": t_corpus,
        "encode queries": encode_times["encode"],
        "search": t_search - encode_times["encode"],
        "evaluate": t_eval,
    }
    return {"run": run, "metrics": metrics, "times": times}


def run_beir(
    model_path: str, corpus: dict, queries: dict, qrels: dict, ks: tuple[int, ...], args: Any
) -> dict:
    """BEIR's own pipeline (SentenceBERT + DenseRetrievalExactSearch + EvaluateRetrieval), timed.

    Args:
        model_path: Local model folder for ``SentenceBERT``.
        corpus: BEIR corpus.
        queries: Judged queries.
        qrels: Judgments.
        ks: Cut-offs.
        args: Parsed command line (batch size, max sequence length).

    Returns:
        ``{"run", "metrics", "times"}`` with unrounded-by-us (BEIR-rounded) metrics.
    """
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.models import SentenceBERT
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    sbert = SentenceBERT(model_path, max_length=args.max_seq_length, device="cpu")
    encode_times = {"encode corpus": 0.0, "encode queries": 0.0}
    _time_method(sbert, "encode_corpus", encode_times, "encode corpus")
    _time_method(sbert, "encode_queries", encode_times, "encode queries")
    dres = DenseRetrievalExactSearch(sbert, batch_size=args.batch_size, show_progress_bar=False)
    retriever = EvaluateRetrieval(dres, k_values=list(ks), score_function="cos_sim")
    run, t_retrieve = timed(lambda: retriever.retrieve(corpus, queries))
    metrics, t_eval = timed(lambda: beir_evaluate(qrels, run, ks))
    times = {
        "encode corpus": encode_times["encode corpus"],
        "encode queries": encode_times["encode queries"],
        "search": t_retrieve - encode_times["encode corpus"] - encode_times["encode queries"],
        "evaluate": t_eval,
    }
    return {"run": run, "metrics": metrics, "times": times}


def _time_method(obj: Any, name: str, totals: dict[str, float], key: str) -> None:
    """Wrap ``obj.name`` so that its wall time accumulates in ``totals[key]``."""
    method = getattr(obj, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        result, seconds = timed(lambda: method(*a, **kw))
        totals[key] += seconds
        return result

    setattr(obj, name, wrapper)


def beir_evaluate(qrels: dict, run: dict, ks: tuple[int, ...]) -> dict[str, float]:
    """BEIR's metrics as one dict (``evaluate`` mutates the run, so it gets a copy)."""
    from beir.retrieval.evaluation import EvaluateRetrieval

    copy = {qid: dict(docs) for qid, docs in run.items()}
    ndcg, _map, recall, precision = EvaluateRetrieval.evaluate(qrels, copy, list(ks))
    mrr = EvaluateRetrieval.evaluate_custom(qrels, copy, list(ks), metric="mrr")
    return {**ndcg, **_map, **recall, **precision, **mrr}


def run_agreement(ours: dict, beir: dict, k: int = 10) -> dict[str, float]:
    """How far the two runs agree: identical top-k lists and score differences on shared documents.

    Args:
        ours: Our run (already in rank order).
        beir: BEIR's run (heap order; sorted here like trec_eval).
        k: Depth compared.

    Returns:
        ``{"queries", "same_top_k", "same_top_k_set", "max_abs_score_diff"}``.
    """
    same, same_set, max_diff = 0, 0, 0.0
    for qid, docs in ours.items():
        theirs = beir.get(qid, {})
        ranked = [d for d, _ in sorted(theirs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)][:k]
        mine = list(docs)[:k]
        same += mine == ranked
        same_set += set(mine) == set(ranked)
        shared = set(docs) & set(theirs)
        max_diff = max([max_diff, *(abs(docs[d] - theirs[d]) for d in shared)])
    return {
        "queries": len(ours),
        "same_top_k": same,
        "same_top_k_set": same_set,
        "max_abs_score_diff": max_diff,
    }


def time_evaluators(qrels: dict, run: dict, ks: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` wall time of each evaluator alone on the same run."""
    ours = min(timed(lambda: evaluate(qrels, run, ks))[1] for _ in range(repeats))
    beir = min(timed(lambda: beir_evaluate(qrels, run, ks))[1] for _ in range(repeats))
    return {"ours": ours, "beir": beir}


def metrics_table(ours: dict[str, float], beir: dict[str, float], cross: dict[str, dict[str, float]]) -> str:
    """Markdown table of both metric sets and the cross-evaluations."""
    lines = [
        "| metric | ours (unrounded) | ours (5 dp) | BEIR | identical | BEIR eval on our run | ours eval on BEIR run |",
        "|---|---:|---:|---:|:---:|---:|---:|",
    ]
    rounded = round_metrics(ours)
    for key, value in ours.items():
        same = "yes" if rounded[key] == beir[key] else f"no (Δ {rounded[key] - beir[key]:+.5f})"
        lines.append(
            f"| {key} | {value:.8f} | {rounded[key]:.5f} | {beir[key]:.5f} | {same} | "
            f"{cross['beir_on_ours'][key]:.5f} | {cross['ours_on_beir'][key]:.5f} |"
        )
    return "\n".join(lines)


def times_table(ours: dict[str, float], beir: dict[str, float], eval_only: dict[str, float]) -> str:
    """Markdown table of wall times per phase and the BEIR / ours ratio."""
    lines = ["| phase | ours (s) | BEIR (s) | BEIR / ours |", "|---|---:|---:|---:|"]
    rows = [*ours.items(), ("total", sum(ours.values()))]
    beir_total = sum(beir.values())
    for phase, seconds in rows:
        theirs = beir_total if phase == "total" else beir[phase]
        lines.append(f"| {phase} | {seconds:.3f} | {theirs:.3f} | {_ratio(theirs, seconds)} |")
    lines.append(
        f"| evaluate only (best of repeats, same run) | {eval_only['ours']:.4f} | {eval_only['beir']:.4f} | "
        f"{_ratio(eval_only['beir'], eval_only['ours'])} |"
    )
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report.

    Args:
        argv: Command-line arguments.

    Returns:
        Process exit code (0 when the rounded metrics are identical, 1 otherwise).
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        from beir.datasets.data_loader import GenericDataLoader
    except ImportError:
        print("BEIR is not installed: pip install --no-deps beir", file=sys.stderr)
        return 2
    ks = tuple(int(k) for k in args.k_values.split(","))

    (corpus, queries, qrels), t_load = timed(lambda: load_beir_folder(args.dataset, args.split))
    beir_data, t_beir_load = timed(lambda: GenericDataLoader(str(args.dataset)).load(split=args.split))
    same_data = (corpus, queries, qrels) == beir_data
    model = load_sentence_transformer(args.model, device="cpu", max_seq_length=args.max_seq_length)

    ours = run_ours(model, corpus, queries, qrels, ks, args.batch_size)
    beir = run_beir(resolve_model_path(args.model), *beir_data, ks, args)
    cross = {
        "beir_on_ours": beir_evaluate(qrels, ours["run"], ks),
        "ours_on_beir": round_metrics(evaluate(qrels, beir["run"], ks)),
    }
    agreement = run_agreement(ours["run"], beir["run"])
    eval_only = time_evaluators(qrels, ours["run"], ks, args.eval_repeats)
    identical = round_metrics(ours["metrics"]) == beir["metrics"]

    print(
        f"## {args.dataset.name} ({args.split}): {len(corpus)} passages, {len(queries)} queries, model {args.model}"
    )
    print(f"\nloaders agree: {same_data} (ours {t_load:.2f} s, BEIR {t_beir_load:.2f} s)")
    print(f"metrics identical after BEIR's 5-decimal rounding: {identical}")
    print(f"run agreement (top-10): {json.dumps(agreement)}\n")
    print(metrics_table(ours["metrics"], beir["metrics"], cross))
    print()
    print(times_table(ours["times"], beir["times"], eval_only))
    if args.json:
        report = {
            "dataset": str(args.dataset), "split": args.split, "model": args.model, "identical": identical,
            "ours": ours["metrics"], "beir": beir["metrics"], "cross": cross, "agreement": agreement,
            "times": {"ours": ours["times"], "beir": beir["times"], "evaluate_only": eval_only},
        }  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
