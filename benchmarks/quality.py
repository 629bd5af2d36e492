"""Quality benchmark: does the pipeline's data prep + mining + fine-tuning measurably improve retrieval?

For every BEIR-format dataset folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``,
``qrels/test.tsv`` with document-disjoint train/test qrels), through the same library functions the assets call:

* **base**: the base model, evaluated on the dataset's own test qrels over the full corpus;
* **supervised**: the train qrels as bring-your-own pairs (query → relevant passage text, loaded with
  :func:`embed_assets.byod.load_user_pairs`), hard negatives mined with :func:`embed_assets.mining.mine_hard_negatives`
  (base model, 'perc' margin 0.05, top 5, candidates = passages of non-test documents, as ``mined_negatives``),
  then :func:`embed_assets.training.train` (MNRL over mined + in-batch negatives);
* **corpus-only (SDG)**: no labels: the passages of the train-split documents go through the offline
  inverse-cloze generator (:class:`embed_assets.sdg.offline.InverseClozeGenerator`), then the same mining and
  training.

Both fine-tuned models are evaluated exactly like the base (:func:`embed_assets.metrics.encode_and_search` +
:func:`embed_assets.metrics.evaluate`, BEIR's conventions), at the same ``--eval-max-seq-length`` (default: the
base model's), so a model trained on shorter sequences is not penalized by a shorter evaluation window.
The ``Δ nDCG@10`` column carries a paired-bootstrap 95 % interval over test queries.

A passage's document is its id without the last ``-suffix`` (``covidqa-630-000`` → ``covidqa-630``,
``xquad-a3-p2`` → ``xquad-a3``); test documents are those with a passage in the test qrels, and no passage of a
test document is ever a training positive, negative or SDG source.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/quality.py                        # every dataset under ../shared/datasets
    python benchmarks/quality.py --datasets ../shared/datasets/xquad-de --lr 2e-5 --output /tmp/q.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import numpy as np

from embed_assets.beir_io import load_beir_folder
from embed_assets.byod import load_user_pairs
from embed_assets.metrics import (
    document_text,
    encode_and_search,
    evaluate,
    paired_bootstrap,
    per_query_ndcg,
)
from embed_assets.mining import mine_hard_negatives
from embed_assets.models import BUNDLED_MODEL, load_sentence_transformer
from embed_assets.records import Chunk, QARecord, content_hash
from embed_assets.sdg.offline import InverseClozeGenerator, InverseClozeSettings
from embed_assets.storage import write_jsonl
from embed_assets.training import TrainSettings, train, training_rows

# ../shared/datasets beside the checkout (as in CI), unless EMBED_ASSETS_SHARED points elsewhere.
DATASETS_ROOT = (
    Path(os.environ.get("EMBED_ASSETS_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets"
)
K_VALUES = (1, 5, 10, 100)
MODES = ("supervised", "sdg")


# ------------------------------------------------------------------------------------------------ CLI
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The parsed namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--datasets",
        nargs="*",
        type=Path,
        default=None,
        help=f"BEIR folders (default: every folder under {DATASETS_ROOT} with train and test qrels)",
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: supervised,sdg")
    p.add_argument("--model", default=BUNDLED_MODEL, help="base_model setting (bundled, folder or hub id)")
    p.add_argument(
        "--max-train-pairs",
        type=int,
        default=384,
        help="QA pairs (queries) kept for training per dataset and mode, seeded sample (0 = all)",
    )
    p.add_argument("--max-seq-length", type=int, default=128, help="training sequence length")
    p.add_argument(
        "--eval-max-seq-length",
        type=int,
        default=0,
        help="evaluation sequence length for base and fine-tuned alike (0 = the base model's)",
    )
    p.add_argument("--epochs", type=int, default=1, help="training epochs (0 = by data size, as the asset)")
    p.add_argument(
        "--lr",
        type=_floats,
        default=[5e-5],
        help="peak learning rate; comma-separated values train one model each on the same mined rows",
    )
    p.add_argument("--batch-size", type=int, default=32, help="training batch (in-batch negatives)")
    p.add_argument(
        "--negatives-per-row", type=int, default=1, help="hardest mined negatives per training row"
    )
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup share of the steps")
    p.add_argument("--hard-negatives-to-mine", type=int, default=5, help="mining: negatives kept per query")
    p.add_argument("--relative-margin", type=float, default=0.05, help="mining: 'perc' margin")
    p.add_argument("--queries-per-chunk", type=int, default=2, help="SDG: inverse-cloze queries per passage")
    p.add_argument("--encode-batch-size", type=int, default=64, help="encoding batch size (eval, mining)")
    p.add_argument("--seed", type=int, default=42, help="seed for sampling pairs, training and SDG")
    p.add_argument(
        "--work-dir", type=Path, default=None, help="where models are written (default: a temp dir)"
    )
    p.add_argument("--keep-models", action="store_true", help="keep the fine-tuned models in --work-dir")
    p.add_argument("--output", type=Path, default=None, help="also write the Markdown report here")
    p.add_argument("--json", type=Path, default=None, help="also write every number as JSON here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- datasets
def doc_of(passage_id: str) -> str:
    """A passage's document: its id without the last ``-suffix``."""
    return passage_id.rsplit("-", 1)[0] if "-" in passage_id else passage_id


def find_datasets(root: Path = DATASETS_ROOT) -> list[Path]:
    """BEIR folders under ``root`` that have both train and test qrels."""
    return sorted(
        d
        for d in root.iterdir()
        if (d / "corpus.jsonl").is_file()
        and (d / "qrels/train.tsv").is_file()
        and (d / "qrels/test.tsv").is_file()
    )


@dataclass
class Dataset:
    name: str
    corpus: dict[str, dict[str, str]]
    test_queries: dict[str, str]
    test_qrels: dict[str, dict[str, int]]
    train_queries: dict[str, str]
    train_qrels: dict[str, dict[str, int]]
    test_docs: set[str]

    @classmethod
    def load(cls, folder: Path) -> Dataset:
        corpus, test_queries, test_qrels = load_beir_folder(folder, split="test")
        _, train_queries, train_qrels = load_beir_folder(folder, split="train")
        test_docs = {doc_of(pid) for rels in test_qrels.values() for pid, r in rels.items() if r > 0}
        train_docs = {doc_of(pid) for rels in train_qrels.values() for pid, r in rels.items() if r > 0}
        if test_docs & train_docs:
            raise ValueError(
                f"{folder}: train and test qrels share documents {sorted(test_docs & train_docs)[:5]}"
            )
        return cls(folder.name, corpus, test_queries, test_qrels, train_queries, train_qrels, test_docs)

    def train_passage_ids(self) -> list[str]:
        """Passages of the non-test documents: the only ones training may see."""
        return [pid for pid in self.corpus if doc_of(pid) not in self.test_docs]


@dataclass
class Pool:
    """Training-side passages as the pipeline's chunks: ``chunk_id`` = content hash of the encoded text."""

    chunks: list[Chunk]  # text = the passage text (what SDG reads)
    encoded: dict[str, str]  # chunk_id -> title + text (what the model encodes, as in BEIR eval)
    corpus_index: dict[str, int]  # chunk_id -> row of the corpus embedding matrix

    @classmethod
    def build(cls, data: Dataset) -> Pool:
        position = {pid: i for i, pid in enumerate(data.corpus)}
        chunks, encoded, index = [], {}, {}
        for pid in data.train_passage_ids():
            text = document_text(data.corpus[pid])
            cid = content_hash(text)
            if cid in encoded:  # identical passage text: the first id wins (as mining de-duplicates)
                continue
            encoded[cid] = text
            index[cid] = position[pid]
            chunks.append(
                Chunk(
                    chunk_id=cid, doc_id=doc_of(pid), text=data.corpus[pid]["text"], sent_start=0, sent_end=0
                )
            )
        return cls(chunks, encoded, index)


# ---------------------------------------------------------------------------------------- pair sources
def supervised_records(data: Dataset, pool: Pool, work: Path) -> list[QARecord]:
    """The train qrels as a bring-your-own JSONL (query, positive passage texts, doc_id), loaded by byod."""
    path = work / f"{data.name}-train-pairs.jsonl"
    rows = []
    for qid, rels in data.train_qrels.items():
        pids = [pid for pid, r in rels.items() if r > 0 and pid in data.corpus]
        if pids and qid in data.train_queries:
            positives = [document_text(data.corpus[pid]) for pid in pids]
            rows.append({"query": data.train_queries[qid], "positives": positives, "doc_id": doc_of(pids[0])})
    write_jsonl(path, rows)
    as_chunks = [Chunk(c.chunk_id, c.doc_id, pool.encoded[c.chunk_id], 0, 0) for c in pool.chunks]
    records, extra = load_user_pairs(path, corpus=as_chunks)
    if extra:
        raise RuntimeError(f"{len(extra)} train positives are not passages of train documents")
    return records


def sdg_records(pool: Pool, queries_per_chunk: int, seed: int) -> list[QARecord]:
    """Corpus only: inverse-cloze pseudo-queries from the passages of the train documents."""
    generator = InverseClozeGenerator(InverseClozeSettings(queries_per_chunk=queries_per_chunk, seed=seed))
    return generator.generate(pool.chunks).records


def sample(records: list[QARecord], limit: int, seed: int) -> list[QARecord]:
    if limit <= 0 or len(records) <= limit:
        return records
    picked = random.Random(seed).sample(range(len(records)), limit)
    return [records[i] for i in sorted(picked)]


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_model(model: Any, data: Dataset, batch_size: int) -> tuple[dict[str, float], dict, np.ndarray]:
    run, corpus_emb = encode_and_search(
        model, data.test_queries, data.corpus, top_k=max(K_VALUES), batch_size=batch_size
    )
    return evaluate(data.test_qrels, run, k_values=K_VALUES), run, corpus_emb


@dataclass
class Result:
    dataset: str
    mode: str
    lr: float = 0.0
    pairs: int = 0
    rows: int = 0
    steps: int = 0
    ndcg_base: float = 0.0
    ndcg_tuned: float = 0.0
    recall_base: float = 0.0
    recall_tuned: float = 0.0
    ndcg_ci: tuple[float, float] = (0.0, 0.0)
    seconds: dict[str, float] = field(default_factory=dict)
    metrics_tuned: dict[str, float] = field(default_factory=dict)


def run_dataset(
    folder: Path, args: argparse.Namespace, work: Path, log, on_result=None
) -> tuple[dict[str, float], list[Result]]:
    """Base eval, then each mode's prep → mining → training → eval on one dataset."""
    t0 = time.monotonic()
    data = Dataset.load(folder)
    pool = Pool.build(data)
    base_model = load_sentence_transformer(args.model, device="cpu")
    eval_len = args.eval_max_seq_length or base_model.max_seq_length
    base_model.max_seq_length = eval_len
    log(
        f"[{data.name}] {len(data.corpus)} passages ({len(pool.chunks)} of train documents), "
        f"{len(data.test_queries)} test / {len(data.train_queries)} train queries; eval max_seq_length {eval_len}"
    )
    t = time.monotonic()
    base_metrics, base_run, corpus_emb = evaluate_model(base_model, data, args.encode_batch_size)
    base_eval_s = time.monotonic() - t
    log(
        f"[{data.name}] base nDCG@10 {base_metrics['NDCG@10']:.4f} R@10 {base_metrics['Recall@10']:.4f} ({base_eval_s:.0f}s)"
    )
    base_per_query = per_query_ndcg(data.test_qrels, base_run, 10)
    pool_ids = [c.chunk_id for c in pool.chunks]
    pool_texts = [pool.encoded[c] for c in pool_ids]
    # The base eval already embedded every passage (same model, same text, same length): mining reuses them.
    pool_emb = corpus_emb[[pool.corpus_index[c] for c in pool_ids]]

    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        t = time.monotonic()
        if mode == "supervised":
            records = supervised_records(data, pool, work)
        elif mode == "sdg":
            records = sdg_records(pool, args.queries_per_chunk, args.seed)
        else:
            raise ValueError(f"unknown mode {mode!r}; use {', '.join(MODES)}")
        records = sample(records, args.max_train_pairs, args.seed)
        mined = mine_hard_negatives(
            [r.query for r in records],
            [r.positive_chunk_ids for r in records],
            pool_ids,
            pool_texts,
            base_model,
            num_negatives=args.hard_negatives_to_mine,
            relative_margin=args.relative_margin,
            sampling_strategy="top",
            batch_size=args.encode_batch_size,
            corpus_embeddings=pool_emb,
        )
        rows = training_rows([asdict(r) for r in mined.rows], args.negatives_per_row)
        prep_s = round(time.monotonic() - t, 1)
        log(
            f"[{data.name}/{mode}] {len(records)} pairs → {len(rows)} rows "
            f"({mined.stats.n_dropped_no_negatives} without enough negatives)"
        )
        for lr in args.lr:
            res = Result(
                data.name,
                mode,
                lr,
                pairs=len(records),
                rows=len(rows),
                ndcg_base=base_metrics["NDCG@10"],
                recall_base=base_metrics["Recall@10"],
            )
            res.seconds.update(base_eval=round(base_eval_s, 1), prep_and_mining=prep_s)
            tag = f"[{data.name}/{mode}/lr={lr:g}]"
            settings = TrainSettings(
                epochs=args.epochs,
                negatives_per_row=args.negatives_per_row,
                batch_size=args.batch_size,
                learning_rate=lr,
                warmup_ratio=args.warmup_ratio,
                max_seq_length=args.max_seq_length,
                save_steps=10**9,  # no intermediate trainer checkpoints: they cost minutes on CPU
                logging_steps=5,
                seed=args.seed,
            )
            out_dir = work / f"{data.name}-{mode}-lr{lr:g}-model"
            t = time.monotonic()
            trainer_dir = tempfile.mkdtemp(prefix=f"{data.name}-{mode}-", dir=work)
            # The trainer prints its log dicts on stdout; keep stdout for the report.
            with contextlib.redirect_stdout(sys.stderr):
                report = train(
                    args.model,
                    rows,
                    trainer_dir,
                    out_dir,
                    settings,
                    device="cpu",
                    progress=lambda line, tag=tag: log(f"{tag} {line}"),
                )
            res.steps = report.steps
            res.seconds["train"] = round(time.monotonic() - t, 1)
            shutil.rmtree(trainer_dir, ignore_errors=True)

            t = time.monotonic()
            tuned = load_sentence_transformer(str(out_dir), device="cpu")
            tuned.max_seq_length = eval_len  # same evaluation window as the base model
            tuned_metrics, tuned_run, _ = evaluate_model(tuned, data, args.encode_batch_size)
            res.seconds["tuned_eval"] = round(time.monotonic() - t, 1)
            res.ndcg_tuned, res.recall_tuned = tuned_metrics["NDCG@10"], tuned_metrics["Recall@10"]
            res.metrics_tuned = tuned_metrics
            _, lo, hi = paired_bootstrap(
                base_per_query, per_query_ndcg(data.test_qrels, tuned_run, 10), n=1000, seed=0
            )
            res.ndcg_ci = (lo, hi)
            log(
                f"{tag} nDCG@10 {res.ndcg_base:.4f} → {res.ndcg_tuned:.4f} "
                f"({100 * (res.ndcg_tuned - res.ndcg_base):+.1f} pts), "
                f"R@10 {res.recall_base:.4f} → {res.recall_tuned:.4f}"
            )
            results.append(res)
            if on_result is not None:
                on_result(res)
            if not args.keep_models:
                shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": round(time.monotonic() - t0, 1), **base_metrics}, results


# ------------------------------------------------------------------------------------------------ report
def markdown(results: list[Result], args: argparse.Namespace, total_s: float) -> str:
    lines = [
        "| dataset | mode | lr | pairs | rows | steps | nDCG@10 base | nDCG@10 tuned | Δ nDCG@10 (pts) [95% CI] "
        "| R@10 base | R@10 tuned | Δ R@10 (pts) | prep+mine s | train s | eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d_ndcg = 100 * (r.ndcg_tuned - r.ndcg_base)
        lo, hi = (100 * x for x in r.ndcg_ci)
        lines.append(
            f"| {r.dataset} | {r.mode} | {r.lr:g} | {r.pairs} | {r.rows} | {r.steps} | {r.ndcg_base:.4f} | {r.ndcg_tuned:.4f} "
            f"| {d_ndcg:+.1f} [{lo:+.1f}, {hi:+.1f}] | {r.recall_base:.4f} | {r.recall_tuned:.4f} "
            f"| {100 * (r.recall_tuned - r.recall_base):+.1f} | {r.seconds.get('prep_and_mining', 0):.0f} "
            f"| {r.seconds.get('train', 0):.0f} | {r.seconds.get('base_eval', 0) + r.seconds.get('tuned_eval', 0):.0f} |"
        )
    settings = (
        f"model `{args.model}`, max_train_pairs {args.max_train_pairs}, epochs {args.epochs}, lr {','.join(f'{x:g}' for x in args.lr)}, "
        f"batch {args.batch_size}, negatives/row {args.negatives_per_row} (of {args.hard_negatives_to_mine} mined, "
        f"relative margin {args.relative_margin}), train max_seq_length {args.max_seq_length}, eval max_seq_length "
        f"{args.eval_max_seq_length or 'base model default'}, warmup {args.warmup_ratio}, SDG queries/passage "
        f"{args.queries_per_chunk}, seed {args.seed}, device cpu, torch threads {_threads()}"
    )
    lines += [
        "",
        f"Settings: {settings}.",
        "Δ CI: paired bootstrap over test queries (1000 draws). `eval s` = the base model's evaluation (done once "
        "per dataset, repeated on each of its rows) + the fine-tuned model's; times are wall-clock seconds.",
        f"Total wall time: {total_s / 60:.1f} min.",
    ]
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    datasets = args.datasets or find_datasets()
    if not datasets:
        print(f"no BEIR dataset with train and test qrels under {DATASETS_ROOT}", file=sys.stderr)
        return 2
    start = time.monotonic()

    def log(msg: str) -> None:
        print(f"{time.monotonic() - start:7.0f}s {msg}", file=sys.stderr, flush=True)

    work_ctx = None
    if args.work_dir is None:
        work_ctx = tempfile.TemporaryDirectory(prefix="embed-quality-")
        work = Path(work_ctx.name)
    else:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    bases: dict[str, dict[str, float]] = {}

    def save(final: bool = False) -> str:
        """Write the report so far (after every model, so an interrupted run keeps what it measured)."""
        report = markdown(results, args, time.monotonic() - start)
        if not final:
            report += f"\n\n_Partial: {len(results)} result(s) so far._"
        if args.output:
            args.output.write_text(report + "\n")
        if args.json:
            payload = {
                "settings": {k: str(v) for k, v in vars(args).items()},
                "base": bases,
                "results": [asdict(r) for r in results],
                "complete": final,
            }
            args.json.write_text(json.dumps(payload, indent=2))
        return report

    def on_result(result: Result) -> None:
        results.append(result)
        save()

    try:
        for folder in datasets:
            bases[folder.name], _ = run_dataset(folder, args, work, log, on_result=on_result)
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    print(save(final=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
