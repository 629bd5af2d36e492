"""Quality benchmark: does the product, with its defaults, make a retriever better on data nobody tuned to?

For every BEIR dataset folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``, ``qrels/test.tsv``)
under ``../shared/datasets`` (or ``$EMBED_ASSETS_SHARED/datasets``), the pipeline runs through **the same stage
functions and defaults the assets use** (``embed_assets.stages``): the corpus as passages
(:func:`~embed_assets.stages.ingest.chunks_from_beir`), pairs, the split with the dataset's official test qrels
as the golden set (``SplitSettings.eval_path``: its documents never reach training), mining, training,
evaluation. The reported numbers are the golden (official test) metrics, base vs fine-tuned, at the same window,
with a paired-bootstrap 95 % interval.

Rows per dataset:

* ``supervised``: the train qrels as your own pairs (``generator="user_data"``); pairs whose passage is a
  passage of a test document are dropped with a notice (published splits often share passages).
* ``corpus-only``: no labels at all, the product's default offline SDG over the corpus.
* ablations (``--ablations``): the same with one setting changed (see :data:`ABLATIONS`).
* ``peer``: the plain sentence-transformers script a user would write by hand on the same pairs
  (``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss``, ``NO_DUPLICATES``, no mined negatives),
  with the product run's epochs, batch, learning rate, weight decay, warmup and windows; scored with pytrec_eval
  on the same test qrels over the full corpus.

One configuration for all datasets; nothing here sets a hyperparameter of the product. ``--max-train-pairs``
caps the pairs per dataset and mode (seeded sample; default 2,000, more than either shared set has) and
``--budget quick`` runs a fast smoke version (300 pairs, supervised and corpus-only only).

Usage::

    python benchmarks/quality.py                                   # every dataset, defaults
    python benchmarks/quality.py --datasets ../shared/datasets/xquad-de --budget quick
    python benchmarks/quality.py --ablations mnrl,no_hard_negatives --output /tmp/q.md --json /tmp/q.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from embed_assets.models import BUNDLED_MODEL
from embed_assets.stages.common import ModelSpec, StageContext
from embed_assets.stages.train import MNRL_DIRECTIONS

# ../shared/datasets beside the checkout (as in CI), unless EMBED_ASSETS_SHARED points elsewhere.
DATASETS_ROOT = (
    Path(os.environ.get("EMBED_ASSETS_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets"
)
MODES = ("supervised", "corpus-only")
#: Ablation rows: name -> ({stage: {setting: value}}, which modes it applies to). Each changes one thing of the
#: product's defaults; the stage names are the settings classes' stages (sdg, split, mine, train, evaluate).
ABLATIONS: dict[str, tuple[dict[str, dict[str, Any]], tuple[str, ...]]] = {
    "gist": ({"train": {"loss": "gist"}}, MODES),
    "cached_gist_b64": ({"train": {"loss": "cached_gist", "batch_size": 64}}, MODES),
    "mnrl_hardness": ({"train": {"loss": "mnrl", "hardness_strength": 5.0}}, MODES),
    # GTE's improved contrastive loss: passages against queries, queries against queries, passages against passages.
    "gte_loss": ({"train": {"mnrl_directions": list(MNRL_DIRECTIONS)}}, MODES),
    "matryoshka": ({"train": {"matryoshka_dims": [192, 96]}}, MODES),
    "no_hard_negatives": ({"train": {"negatives_per_row": 0}}, MODES),
    # After the choices on validation, retrain on the training and validation pairs together.
    "refit": ({"train": {"refit_on_validation": True}}, MODES),
    # Train at 128 tokens (the default before 2026-12-06) instead of the base model's window (256 for MiniLM).
    "train_window_128": ({"train": {"max_seq_length": 128}}, MODES),
    # Offline pseudo-queries of the corpus beside the user's pairs (they only train).
    "corpus_queries": ({"sdg": {"corpus_queries_per_pair": 1.0}}, ("supervised",)),
    # The offline SDG mixture (corpus-only): the default is whichever the validation split favours across datasets.
    "sdg_keywords": ({"sdg": {"offline_queries": ["inverse_cloze", "keywords"]}}, ("corpus-only",)),
    "sdg_titles": ({"sdg": {"offline_queries": ["inverse_cloze", "titles"]}}, ("corpus-only",)),
    "sdg_mixture": ({"sdg": {"offline_queries": ["inverse_cloze", "keywords", "titles"]}}, ("corpus-only",)),
    "sdg_cloze_only": ({"sdg": {"offline_queries": ["inverse_cloze"]}}, ("corpus-only",)),
    "sdg_cloze_mask": ({"sdg": {"cloze_mask_rate": 0.9}}, ("corpus-only",)),
    # Corpus-only: the pseudo-queries of the golden (official test) documents' passages kept out of training too.
    "golden_all_pairs": ({"split": {"golden_holdout": "all_pairs"}}, ("corpus-only",)),
    # The default's chosen learning rate halved and doubled (no knife-edge setting): filled in per dataset.
    "lr_half": ({}, ("supervised",)),
    "lr_double": ({}, ("supervised",)),
}
#: Ablations whose learning rate is the default run's chosen one times this factor.
LR_FACTORS = {"lr_half": 0.5, "lr_double": 2.0}
QUICK_PAIRS = 300


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--datasets", nargs="*", type=Path, default=None, help=f"BEIR folders (default: {DATASETS_ROOT}/*)"
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: supervised,corpus-only")
    p.add_argument("--ablations", default="", help=f"comma-separated ablation rows: {', '.join(ABLATIONS)}")
    p.add_argument("--no-peer", action="store_true", help="skip the plain sentence-transformers script")
    p.add_argument(
        "--no-defaults",
        action="store_true",
        help="only the ablation rows (their default rows measured before; implies --no-peer)",
    )
    p.add_argument("--model", default=BUNDLED_MODEL, help="base_model (bundled, folder or hub id)")
    p.add_argument("--max-train-pairs", type=int, default=2000, help="pairs per dataset and mode (0 = all)")
    p.add_argument("--budget", choices=("full", "quick"), default="full", help="quick: a fast smoke run")
    p.add_argument("--seed", type=int, default=42, help="seed of the pair sample")
    p.add_argument("--work-dir", type=Path, default=None, help="artifacts (default: a temporary folder)")
    p.add_argument("--output", type=Path, default=None, help="also write the Markdown report here")
    p.add_argument("--json", type=Path, default=None, help="also write every number as JSON here")
    args = p.parse_args(argv)
    if args.budget == "quick":
        args.max_train_pairs = min(args.max_train_pairs or QUICK_PAIRS, QUICK_PAIRS)
        args.no_peer = True
    if args.no_defaults:
        args.no_peer = True
        if set(_names(args.ablations)) & set(LR_FACTORS):
            p.error(f"{sorted(LR_FACTORS)} scale the default row's learning rate: drop --no-defaults")
    unknown = [a for a in _names(args.ablations) if a not in ABLATIONS]
    if unknown:
        p.error(f"unknown ablation(s) {unknown}; known: {sorted(ABLATIONS)}")
    return args


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def find_datasets(root: Path = DATASETS_ROOT) -> list[Path]:
    """BEIR folders under ``root`` that have both train and test qrels."""
    if not root.is_dir():
        return []
    return sorted(
        d
        for d in root.iterdir()
        if (d / "corpus.jsonl").is_file()
        and (d / "qrels/train.tsv").is_file()
        and (d / "qrels/test.tsv").is_file()
    )


# ------------------------------------------------------------------------------------------ one dataset
@dataclass
class Result:
    dataset: str
    row: str  # "supervised", "corpus-only", "<mode>/<ablation>", "peer"
    pairs: int = 0
    train_rows: int = 0
    ndcg_base: float = 0.0
    ndcg_tuned: float = 0.0
    ci: tuple[float, float] = (0.0, 0.0)
    recall_base: float = 0.0
    recall_tuned: float = 0.0
    seconds: float = 0.0
    notes: str = ""
    chosen: dict[str, Any] = field(default_factory=dict)
    served: str = "fine-tuned"  # which model the product serves (ndcg_tuned is its nDCG@10)
    # Model merging (issue 15): fine-tuned vs merged on the test set and on the forgetting guard; the merge is
    # the one the product served, else the best merge candidate by the product's own rule (for the table).
    ndcg_finetuned: float = float("nan")
    ndcg_merged: float = float("nan")
    merge_weight: float = float("nan")
    guard_base: float = float("nan")
    guard_finetuned: float = float("nan")
    guard_merged: float = float("nan")
    matryoshka: dict[str, float] = field(default_factory=dict)  # trained dimension -> served test nDCG@10


def settings_for(overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every stage's settings: the product defaults with ``overrides`` applied (validated)."""
    from embed_assets.stages.evaluate import EvalSettings
    from embed_assets.stages.mine import MiningSettings
    from embed_assets.stages.sdg import SDGSettings
    from embed_assets.stages.split import SplitSettings
    from embed_assets.stages.train import TrainSettings

    classes = {
        "sdg": SDGSettings,
        "split": SplitSettings,
        "mine": MiningSettings,
        "train": TrainSettings,
        "evaluate": EvalSettings,
    }
    return {name: cls(**overrides.get(name, {})) for name, cls in classes.items()}


def supervised_pairs_file(
    folder: Path, chunks: Any, out: Path, log: Callable[[str], None], limit: int = 0, seed: int = 42
) -> tuple[Path, int]:
    """The train qrels as a bring-your-own JSONL; pairs touching a test document are dropped (with a notice).

    At most ``limit`` queries (seeded sample; 0: all) are written, so the cap applies to the user's pairs and
    whatever the product adds to them (``corpus_queries_per_pair``) comes on top, as it would for a user.
    """
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import document_text
    from embed_assets.storage import write_jsonl

    corpus, train_queries, train_qrels = load_beir_folder(folder, split="train")
    _, _, test_qrels = load_beir_folder(folder, split="test")
    doc_of = {c.source_id: c.doc_id for c in chunks.load()}
    test_docs = {doc_of[pid] for rels in test_qrels.values() for pid, r in rels.items() if r > 0}
    rows, dropped = [], 0
    for qid, rels in train_qrels.items():
        pids = [pid for pid, r in rels.items() if r > 0]
        if any(doc_of[pid] in test_docs for pid in pids):
            dropped += 1
            continue
        rows.append(
            {
                "query": train_queries[qid],
                "positives": [document_text(corpus[pid]) for pid in pids],
                "doc_id": doc_of[pids[0]],
            }
        )
    if dropped:
        log(
            f"notice: {dropped} of {len(train_qrels)} train queries judge a passage of a test document "
            "(the published splits share documents); those pairs are dropped so no test document is trained on"
        )
    if limit and len(rows) > limit:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    write_jsonl(out, rows)
    return out, dropped


def sample_pairs(pairs: Any, limit: int, seed: int, ctx: StageContext) -> Any:
    """A seeded sample of at most ``limit`` pairs (the same manifest type, pointing at the sample)."""
    from embed_assets.stages.sdg import load_pairs
    from embed_assets.storage import write_jsonl

    records = load_pairs(pairs.path)
    if limit <= 0 or len(records) <= limit:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    path = ctx.out_dir("synthetic_qa") / f"qa-sample-{limit}.jsonl"
    write_jsonl(path, (records[i].to_dict() for i in keep))
    return type(pairs)(**{**asdict(pairs), "path": str(path), "n_pairs": limit})


def run_product(
    folder: Path,
    chunks: Any,
    mode: str,
    overrides: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    root: Path,
    log: Callable[[str], None],
) -> tuple[Result, Any]:
    """One product run (pairs → split with the official test set as golden → mine → train → evaluate)."""
    from embed_assets.stages.evaluate import evaluate_checkpoint
    from embed_assets.stages.mine import mine_negatives
    from embed_assets.stages.sdg import generate_pairs
    from embed_assets.stages.split import split_pairs
    from embed_assets.stages.train import train_checkpoint

    start = time.monotonic()
    ctx = StageContext.local(root, run_id=f"{mode}-{time.strftime('%H%M%S')}", log=_logger(log))
    model = ModelSpec(args.model, device="auto")
    notes = ""
    settings = settings_for(overrides)
    sdg = settings["sdg"]
    if mode == "supervised":
        path, dropped = supervised_pairs_file(
            folder, chunks, root / "train-pairs.jsonl", log, args.max_train_pairs, args.seed
        )
        sdg = sdg.model_copy(update={"generator": "user_data", "user_data_path": str(path)})
        notes = f"{dropped} train queries on test documents dropped" if dropped else ""
    pairs = generate_pairs(chunks, sdg, model, ctx)
    if mode != "supervised":  # the user's pairs were capped above
        pairs = sample_pairs(pairs, args.max_train_pairs, args.seed, ctx)
    split_settings = settings["split"].model_copy(update={"eval_path": str(folder), "eval_split": "test"})
    split = split_pairs(chunks, pairs, split_settings, ctx)
    mined = mine_negatives(chunks, pairs, split, settings["mine"], model, ctx)
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its log dicts; stdout is the report
        checkpoint = train_checkpoint(chunks, pairs, split, mined, settings["train"], model, ctx)
    metrics = evaluate_checkpoint(split, checkpoint, settings["evaluate"], model, ctx)
    golden = metrics.primary
    assert golden.name == "golden", "the official test set must be the primary evaluation set"
    merge = merge_scores(split, checkpoint, metrics, settings["evaluate"], model, root, log)
    result = Result(
        dataset=folder.name,
        row=mode,
        pairs=pairs.n_pairs,
        train_rows=checkpoint.train_rows,
        ndcg_base=golden.base["NDCG@10"],
        ndcg_tuned=golden.served["NDCG@10"],
        ci=(golden.bootstrap.ci95_low, golden.bootstrap.ci95_high),
        recall_base=golden.base["Recall@10"],
        recall_tuned=golden.served["Recall@10"],
        seconds=round(time.monotonic() - start, 1),
        notes="; ".join(filter(None, [notes, _matryoshka_note(golden.matryoshka, golden.served["NDCG@10"])])),
        matryoshka=dict(golden.matryoshka),
        chosen={
            "learning_rate": checkpoint.selection.learning_rate if checkpoint.selection else None,
            "steps": checkpoint.report.get("steps"),
            "kept": checkpoint.selection_metadata().get("kept_checkpoint", ""),
            **(
                {"refit": checkpoint.selection.refit}
                if checkpoint.selection and checkpoint.selection.refit
                else {}
            ),
            "val_ndcg@10": max((v for _, v in checkpoint.eval_curve), default=float("nan")),
        },
        served=metrics.served_label,
        ndcg_finetuned=golden.finetuned["NDCG@10"],
        **merge,
    )
    return result, (split, checkpoint, metrics, settings["train"])


def _matryoshka_note(per_dim: dict[str, float], full: float) -> str:
    """``nDCG@10 at 96 dims 0.7012 (97 % of full)`` for each trained truncation, largest first."""
    return ", ".join(
        f"nDCG@10 at {d} dims {v:.4f} ({100 * v / full:.0f} % of full)"
        for d, v in sorted(per_dim.items(), key=lambda kv: -int(kv[0]))
        if full
    )


def merge_scores(
    split: Any,
    checkpoint: Any,
    metrics: Any,
    settings: Any,
    model: ModelSpec,
    root: Path,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Test and guard nDCG@10 of the merged model next to the fine-tuned one (for the merging table).

    The merge is the one the product served; when it served the fine-tuned model, the merge its own rule ranks
    best (best validation nDCG@10 among merges that keep the guard) is built and evaluated the same way.
    """
    from dataclasses import replace

    from embed_assets.merging import interpolate
    from embed_assets.stages.evaluate import best_on_validation, evaluate_checkpoint

    guard = metrics.guard
    out = {
        "guard_base": guard.base["NDCG@10"] if guard else float("nan"),
        "guard_finetuned": guard.finetuned["NDCG@10"] if guard else float("nan"),
    }
    choice = metrics.choice
    if choice is None:
        return out
    if choice.merged:
        return {
            **out,
            "merge_weight": choice.weight,
            "ndcg_merged": metrics.primary.merged["NDCG@10"],
            "guard_merged": guard.merged["NDCG@10"] if guard else float("nan"),
        }
    merges = [c for c in choice.candidates if 0 < c["finetuned_weight"] < 1]
    kept = [c for c in merges if c["keeps_guard"]] or merges
    if not kept:
        return out
    weight = best_on_validation(kept)["finetuned_weight"]
    log(f"merging table: evaluating the best merge candidate (fine-tuned weight {weight:g}) on test")
    folder = interpolate(
        model.base_model, checkpoint.model_dir, weight, root / "merge-for-table" / f"w{weight:g}"
    )
    ctx = StageContext.local(root / "merge-for-table", run_id="merge", log=_logger(log))
    merged = evaluate_checkpoint(
        split,
        replace(checkpoint, model_dir=str(folder)),
        settings.model_copy(update={"merge": "off"}),
        model,
        ctx,
    )
    return {
        **out,
        "merge_weight": weight,
        "ndcg_merged": merged.primary.finetuned["NDCG@10"],
        "guard_merged": merged.guard.finetuned["NDCG@10"] if merged.guard else float("nan"),
    }


def run_peer(folder: Path, chunks: Any, product: tuple, args: argparse.Namespace, root: Path, log) -> Result:
    """The plain script: MNRL on the same pairs with the product run's training settings, no mined negatives."""
    import pytrec_eval
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import document_text
    from embed_assets.models import resolve_model_path
    from embed_assets.storage import read_jsonl

    start = time.monotonic()
    _, checkpoint, metrics, train = product
    rows = read_jsonl(root / "train-pairs.jsonl")
    pairs = [{"anchor": r["query"], "positive": p} for r in rows for p in r["positives"]]
    if args.max_train_pairs and len(pairs) > args.max_train_pairs:
        pairs = random.Random(args.seed).sample(pairs, args.max_train_pairs)
    model = SentenceTransformer(resolve_model_path(args.model), device="cpu")
    window = model.max_seq_length
    model.max_seq_length = train.training_window(window)
    # The product run's training budget: its epochs (the most it may train) and its chosen learning rate.
    epochs = int(checkpoint.report.get("epochs") or train.resolved_epochs(len(pairs)))
    lr = checkpoint.selection.learning_rate if checkpoint.selection else train.learning_rate
    trainer = SentenceTransformerTrainer(
        model=model,
        args=Args(
            output_dir=str(root / "peer-work"),
            num_train_epochs=epochs,
            per_device_train_batch_size=train.batch_size,
            learning_rate=lr,
            warmup_steps=float(train.warmup_ratio),
            weight_decay=train.weight_decay,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            seed=train.seed,
        ),
        train_dataset=Dataset.from_list(pairs),
        loss=MultipleNegativesRankingLoss(model),
    )
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    model.max_seq_length = window  # evaluated at the same window as the product's models
    corpus, queries, qrels = load_beir_folder(folder, split="test")
    ids = list(corpus)
    c_emb = model.encode([document_text(corpus[i]) for i in ids], batch_size=64, normalize_embeddings=True)
    q_ids = list(queries)
    q_emb = model.encode([queries[q] for q in q_ids], batch_size=64, normalize_embeddings=True)
    scores = q_emb @ c_emb.T
    run = {}
    for qi, qid in enumerate(q_ids):
        top = scores[qi].argsort()[::-1][:100]
        run[qid] = {ids[j]: float(scores[qi, j]) for j in top}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10"}).evaluate(run)
    tuned = sum(per_query[q]["ndcg_cut_10"] for q in qrels) / len(qrels)
    recall = sum(per_query[q]["recall_10"] for q in qrels) / len(qrels)
    base_per_query = _per_query_base(metrics)
    from embed_assets.metrics import paired_bootstrap

    _, lo, hi = paired_bootstrap(
        base_per_query, {q: per_query[q]["ndcg_cut_10"] for q in qrels}, n=1000, seed=0
    )
    shutil.rmtree(root / "peer-work", ignore_errors=True)
    return Result(
        dataset=folder.name,
        row="peer (plain ST MNRL script)",
        pairs=len(pairs),
        train_rows=len(pairs),
        ndcg_base=metrics.primary.base["NDCG@10"],
        ndcg_tuned=tuned,
        ci=(lo, hi),
        recall_base=metrics.primary.base["Recall@10"],
        recall_tuned=recall,
        seconds=round(time.monotonic() - start, 1),
        notes=f"epochs {epochs}, lr {lr:g}, batch {train.batch_size}",
    )


def _per_query_base(metrics: Any) -> dict[str, float]:
    """The base model's per-query nDCG@10 on the golden set, keyed by the dataset's query ids."""
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import per_query_ndcg

    golden = metrics.primary
    _, _, qrels = load_beir_folder(golden.beir, split="test")
    run = json.loads((Path(metrics.path).parent / "golden_run_base.json").read_text())
    return per_query_ndcg(qrels, run, 10)


def _logger(log: Callable[[str], None]) -> logging.Logger:
    logger = logging.getLogger("bench.quality")
    if not logger.handlers:

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                log(record.getMessage())

        logger.addHandler(_Handler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def run_dataset(folder: Path, args: argparse.Namespace, work: Path, log, on_result) -> None:
    from embed_assets.stages.ingest import chunks_from_beir

    root = work / folder.name
    ctx = StageContext.local(root, run_id="corpus", log=_logger(log))
    chunks = chunks_from_beir(folder, ctx)
    log(f"[{folder.name}] {chunks.n_chunks} passages of {chunks.n_docs} documents")
    defaults: dict[str, Result] = {}
    product = None
    for mode in _names(args.modes):  # the product's defaults first, then the peer, then the ablations
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; use {', '.join(MODES)}")
        if args.no_defaults:
            continue
        result, outputs = run_product(folder, chunks, mode, {}, args, root / mode, log)
        on_result(result)
        defaults[mode] = result
        if mode == "supervised":
            product = outputs
            if not args.no_peer:
                on_result(run_peer(folder, chunks, product, args, root / "supervised", log))
    for name in _names(args.ablations):
        overrides, modes = ABLATIONS[name]
        for mode in [m for m in _names(args.modes) if m in modes]:
            if name in LR_FACTORS:
                lr = LR_FACTORS[name] * float(defaults[mode].chosen["learning_rate"])
                overrides = {"train": {"lr_candidates": [], "learning_rate": lr}}
            ablated, _ = run_product(folder, chunks, mode, overrides, args, root / f"{mode}-{name}", log)
            ablated.row = f"{mode} / {name}"
            on_result(ablated)


# ------------------------------------------------------------------------------------------------ report
def markdown(results: list[Result], args: argparse.Namespace, total_s: float) -> str:
    lines = [
        "| dataset | row | pairs | train rows | nDCG@10 base | nDCG@10 tuned | Δ nDCG@10 (pts) [95% CI] "
        "| R@10 base | R@10 tuned | served | chosen | s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for r in results:
        lo, hi = (100 * x for x in r.ci)
        chosen = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.chosen.items())
        lines.append(
            f"| {r.dataset} | {r.row} | {r.pairs} | {r.train_rows} | {r.ndcg_base:.4f} | {r.ndcg_tuned:.4f} "
            f"| {100 * (r.ndcg_tuned - r.ndcg_base):+.1f} [{lo:+.1f}, {hi:+.1f}] | {r.recall_base:.4f} "
            f"| {r.recall_tuned:.4f} | {r.served if r.row != 'peer (plain ST MNRL script)' else '-'} | {chosen} "
            f"| {r.seconds:.0f} | {r.notes} |"
        )
    lines += merge_table(results)
    lines += [
        "",
        f"Product defaults throughout (one configuration for every dataset); model `{args.model}`; "
        f"max_train_pairs {args.max_train_pairs or 'all'}, budget {args.budget}, device cpu. Golden set = the "
        "dataset's `qrels/test.tsv` over its full corpus (its questions never train; corpus-only pseudo-queries of "
        "its passages do, `golden_holdout`); Δ CI: paired bootstrap over test queries (1000 draws); "
        "`s` = wall seconds of the row (pairs, mining, training, evaluation).",
        f"Total wall time: {total_s / 60:.1f} min.",
    ]
    return "\n".join(lines)


def merge_table(results: list[Result]) -> list[str]:
    """Model merging: domain Δ and guard Δ (vs base) of the fine-tuned and the merged model, and the share of
    the fine-tuned domain gain the merge keeps."""
    rows = [r for r in results if r.ndcg_merged == r.ndcg_merged]  # rows with a merge (not NaN)
    if not rows:
        return []
    lines = [
        "",
        "Model merging (test set and the bundled forgetting guard; Δ vs base in nDCG@10 points; the merge is the "
        "served one, else the best merge candidate by the product's rule):",
        "",
        "| dataset | row | served | merge weight | domain Δ fine-tuned | domain Δ merged | merged keeps of the gain "
        "| guard Δ fine-tuned | guard Δ merged |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d_ft, d_m = 100 * (r.ndcg_finetuned - r.ndcg_base), 100 * (r.ndcg_merged - r.ndcg_base)
        kept = f"{100 * d_m / d_ft:.0f} %" if d_ft > 0 else "-"
        lines.append(
            f"| {r.dataset} | {r.row} | {r.served} | {r.merge_weight:g} | {d_ft:+.1f} | {d_m:+.1f} | {kept} "
            f"| {100 * (r.guard_finetuned - r.guard_base):+.1f} | {100 * (r.guard_merged - r.guard_base):+.1f} |"
        )
    return lines


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

    def save(final: bool = False) -> str:
        """Write the report so far (after every row, so an interrupted run keeps what it measured)."""
        report = markdown(results, args, time.monotonic() - start)
        if not final:
            report += f"\n\n_Partial: {len(results)} row(s) so far._"
        if args.output:
            args.output.write_text(report + "\n")
        if args.json:
            payload = {
                "settings": {k: str(v) for k, v in vars(args).items()},
                "results": [asdict(r) for r in results],
                "complete": final,
            }
            args.json.write_text(json.dumps(payload, indent=2))
        return report

    def on_result(result: Result) -> None:
        results.append(result)
        lo, hi = (100 * x for x in result.ci)
        log(
            f"[{result.dataset}/{result.row}] nDCG@10 {result.ndcg_base:.4f} -> {result.ndcg_tuned:.4f} "
            f"({100 * (result.ndcg_tuned - result.ndcg_base):+.1f} [{lo:+.1f}, {hi:+.1f}])"
        )
        save()

    try:
        for folder in datasets:
            run_dataset(folder, args, work, log, on_result)
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    print(save(final=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
