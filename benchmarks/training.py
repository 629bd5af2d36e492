"""Benchmark training throughput: ``embed_assets.training.train`` vs a plain sentence-transformers script.

Both sides fine-tune the same model on the same rows (query → positive passage + k negatives, built once
from a BEIR folder's train qrels) for exactly the same number of optimizer steps:

* embed_assets: ``train(base_model, rows, work_dir, out_dir, TrainSettings(...))``, exactly what the
  ``checkpoint`` asset calls (model load, dataset, MNRL, trainer, ``trainer.train()``, atomic model save);
* plain sentence-transformers: the script a user writes by hand: ``SentenceTransformer`` +
  ``datasets.Dataset.from_list`` + ``MultipleNegativesRankingLoss`` + ``SentenceTransformerTrainingArguments``
  + ``SentenceTransformerTrainer(...).train()`` + ``model.save_pretrained``.

Same batch size, ``max_steps``, ``max_seq_length``, learning rate, warm-up ratio, weight decay, seed, fp32, no
evaluation, and the batch sampler sentence-transformers recommends for MNRL (``NO_DUPLICATES``, which
``train()`` uses): with the same seed both see the same batches, so their logged losses must agree (shown as a
check that they did the same work). Neither saves an intermediate checkpoint (``save_steps`` ≥ the step
count); both trainers write their one end-of-training checkpoint (transformers' ``save_strategy="steps"``
default), which counts in the ``trainer.train()`` and end-to-end times of both and in neither's loop time.

Three scopes are timed in every run:

* training loop: steps ``W+1 .. W+N`` between two ``on_step_end`` callbacks (the first W warm-up steps are
  run but excluded: the first steps pay one-off allocations); the same callback is given to both trainers;
* ``trainer.train()``: all ``W+N`` steps plus the trainer's end checkpoint (``TrainReport.seconds`` for ours);
* end to end: model load + dataset + trainer + ``train()`` (incl. its end checkpoint) + final model save.

An untimed 1-step run of each implementation comes first (lazy imports, first-call code paths).

Both log the loss every step (``logging_steps=1``; free on CPU, where the loss is already synchronised).
Implementations alternate order on every repeat (ABBA...); each table shows the best of ``--repeats`` and
the ratio of the mean wall times (with an even number of repeats, it cancels a linear drift of the load).
Other CPU-heavy processes on the machine make absolute numbers noisy: compare the ratios, the CPU seconds
and the median step time over all runs.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/training.py         # ~3 min on an idle 2-core CPU, longer when busy
    python benchmarks/training.py --steps 30 --batch-size 32 --negatives 3 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from embed_assets.beir_io import load_beir_folder
from embed_assets.models import BUNDLED_MODEL, load_sentence_transformer, resolve_model_path
from embed_assets.training import TrainSettings, train, training_rows

DEFAULT_DATASET = (
    Path(os.environ.get("EMBED_ASSETS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    / "datasets"
    / "covidqa"
)
OURS = "embed_assets train()"
PEER = "plain sentence-transformers"


def log(msg: str) -> None:
    """Progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    parser.add_argument("--split", default="train", help="qrels split the rows come from (default: train)")
    parser.add_argument("--model", default=BUNDLED_MODEL, help="base_model setting or folder (both sides)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per optimizer step (default: 16)")
    parser.add_argument("--negatives", type=int, default=1, help="negatives per row (default: 1)")
    parser.add_argument("--max-seq-length", type=int, default=128, help="token truncation (default: 128)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: 10)")
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="untimed steps run first in every run (default: 2)"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="both sides (default: 1e-5)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="LR warm-up ratio (default: 0.1)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="both sides (default: 0.01)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per implementation, best of (default: 2)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=42, help="trainer seed and negative choice (default: 42)")
    return parser.parse_args(argv)


def build_rows(
    dataset: Path, split: str, negatives: int, seed: int, limit: int | None = None
) -> list[dict[str, str]]:
    """Training rows from a BEIR folder: each judged (query, passage) pair plus ``negatives`` other passages.

    Negatives are drawn deterministically (seeded) from passages of *other* documents (covidqa ids are
    ``<doc>-<chunk>``), so the rows are cheap to build and identical for both sides; their compute cost equals
    that of mined hard negatives (the passages are truncated to the same length).

    Args:
        dataset: BEIR folder.
        split: Qrels split.
        negatives: Negatives per row.
        seed: Seed of the negative choice.
        limit: Keep at most this many rows (``None``: all).

    Returns:
        Rows in :func:`embed_assets.training.training_rows` layout (anchor, positive, negative_1..k).
    """
    corpus, queries, qrels = load_beir_folder(dataset, split)
    ids = list(corpus)
    rng = random.Random(seed)

    def text(doc_id: str) -> str:
        return corpus[doc_id]["text"]

    def document(doc_id: str) -> str:
        return doc_id.rsplit("-", 1)[0]

    mined = []
    for qid, judged in qrels.items():
        positives = [d for d, score in judged.items() if score > 0]
        if not positives:
            continue
        docs = {document(d) for d in positives}
        negs: list[str] = []
        while len(negs) < negatives:
            cand = ids[rng.randrange(len(ids))]
            if document(cand) not in docs and text(cand) not in negs:
                negs.append(text(cand))
        mined.append({"query": queries[qid], "positive_text": text(positives[0]), "negative_texts": negs})
    rows = training_rows(mined, negatives)
    return rows[:limit] if limit else rows


@dataclass
class Run:
    """Timings of one run of one implementation."""

    loop_wall: float = 0.0
    loop_cpu: float = 0.0
    train_wall: float = 0.0
    total_wall: float = 0.0
    total_cpu: float = 0.0
    steps: int = 0
    step_walls: list[float] = field(default_factory=list)
    threads: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)


def step_timer(warmup: int) -> Any:
    """A ``TrainerCallback`` timing steps ``warmup+1 ..`` (wall and process CPU) and recording the losses."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[int, tuple[float, float]] = {}
            self.losses: list[tuple[int, float]] = []
            self.threads = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks[state.global_step] = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks[state.global_step] = (time.perf_counter(), time.process_time())
            self.threads = torch.get_num_threads()  # as set while the trainer runs

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))

        def window(self) -> tuple[float, float, int, list[float]]:
            """Wall and CPU seconds of the timed steps, their number, and each one's wall seconds."""
            last = max(self.marks)
            first = min(warmup, last)
            (w0, c0), (w1, c1) = self.marks[first], self.marks[last]
            per_step = [self.marks[s][0] - self.marks[s - 1][0] for s in range(first + 1, last + 1)]
            return w1 - w0, c1 - c0, last - first, per_step

    return StepTimer()


def run_ours(args: argparse.Namespace, rows: list[dict[str, str]], tmp: Path) -> Run:
    """``embed_assets.training.train``, as the ``checkpoint`` asset calls it."""
    total = args.warmup_steps + args.steps
    settings = TrainSettings(
        negatives_per_row=args.negatives,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_seq_length=args.max_seq_length,
        max_steps=total,
        loss="mnrl",
        mixed_precision="no",
        save_steps=max(total, 50),  # no intermediate checkpoint
        logging_steps=1,  # a loss per step, compared with the peer's (on CPU, logging costs nothing)
        seed=args.seed,
    )
    timer = step_timer(args.warmup_steps)
    w0, c0 = time.perf_counter(), time.process_time()
    report = train(args.model, rows, tmp / "work", tmp / "model", settings, device="cpu", callbacks=[timer])
    total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    loop_wall, loop_cpu, steps, per_step = timer.window()
    return Run(
        loop_wall,
        loop_cpu,
        report.seconds,
        total_wall,
        total_cpu,
        steps,
        per_step,
        timer.threads,
        timer.losses,
    )


def run_peer(args: argparse.Namespace, rows: list[dict[str, str]], tmp: Path) -> Run:
    """The plain sentence-transformers training script, same hyper-parameters."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    total = args.warmup_steps + args.steps
    timer = step_timer(args.warmup_steps)
    w0, c0 = time.perf_counter(), time.process_time()
    model = SentenceTransformer(resolve_model_path(args.model), device="cpu")
    model.max_seq_length = args.max_seq_length
    dataset = Dataset.from_list(rows)
    loss = MultipleNegativesRankingLoss(model)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp / "work"),
        max_steps=total,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_steps=max(total, 50),  # no intermediate checkpoint (one at the end, as train() writes)
        logging_steps=1,  # same cadence as ours: the per-step losses are compared
        seed=args.seed,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=loss, callbacks=[timer]
    )
    t0 = time.perf_counter()
    result = trainer.train()
    train_wall = time.perf_counter() - t0
    model.save_pretrained(str(tmp / "model"))
    total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    loop_wall, loop_cpu, steps, per_step = timer.window()
    assert result.global_step == total, result.global_step
    return Run(
        loop_wall, loop_cpu, train_wall, total_wall, total_cpu, steps, per_step, timer.threads, timer.losses
    )


def table(
    title: str, runs: dict[str, list[Run]], pick: Callable[[Run], tuple[float, float]], steps: int, bs: int
) -> str:
    """Markdown table of one timing scope: the best run per implementation, and the ratio of mean wall times.

    With alternating order (ABBA...) and an even number of repeats, the mean ratio cancels a linear drift of
    the machine's load; the best-of ratio is robust to bursts.
    """
    lines = [
        f"### {title}",
        "",
        "| implementation | steps | samples | wall s (best) | CPU s | samples/s | steps/s "
        "| ratio vs plain ST | ratio of means |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = {n: min(rs, key=lambda r: pick(r)[0]) for n, rs in runs.items()}
    mean = {n: statistics.fmean(pick(r)[0] for r in rs) for n, rs in runs.items()}
    for name in (OURS, PEER):
        wall, cpu = pick(best[name])
        cpu_cell = f"{cpu:.1f}" if cpu == cpu else "–"  # NaN: not measured for this scope
        lines.append(
            f"| {name} | {steps} | {steps * bs} | {wall:.2f} | {cpu_cell} | {steps * bs / wall:.2f} | "
            f"{steps / wall:.3f} | {pick(best[PEER])[0] / wall:.2f}× | {mean[PEER] / mean[name]:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report.

    Args:
        argv: Command-line arguments.

    Returns:
        Process exit code (0; 1 when the two sides' losses disagree, i.e. they did not do the same work).
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("transformers", "sentence_transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    total = args.warmup_steps + args.steps
    rows = build_rows(args.dataset, args.split, args.negatives, args.seed)
    log(
        f"{len(rows)} rows from {args.dataset.name}/{args.split}; "
        f"{total} steps per run, batch {args.batch_size}"
    )
    load_sentence_transformer(args.model)  # warm imports and the file cache before anything is timed

    runners = {OURS: run_ours, PEER: run_peer}
    # One untimed 1-step run of each first: lazy imports and first-call code paths (optimizer, checkpoint
    # save, model card) would otherwise be paid by whichever implementation happens to run first.
    warm = argparse.Namespace(**{**vars(args), "steps": 1, "warmup_steps": 0})
    for name, runner in runners.items():
        log(f"{name}: untimed 1-step warm-up run ...")
        with (
            tempfile.TemporaryDirectory(prefix="embed_assets_bench_train_") as tmp,
            contextlib.redirect_stdout(sys.stderr),
        ):
            runner(warm, rows, Path(tmp))
    runs: dict[str, list[Run]] = {OURS: [], PEER: []}
    for attempt in range(args.repeats):
        order = [OURS, PEER] if attempt % 2 == 0 else [PEER, OURS]
        for name in order:
            log(f"{name} ({attempt + 1}/{args.repeats}) ...")
            # With disable_tqdm, transformers prints its logs on stdout: keep stdout for the report.
            with (
                tempfile.TemporaryDirectory(prefix="embed_assets_bench_train_") as tmp,
                contextlib.redirect_stdout(sys.stderr),
            ):
                run = runners[name](args, rows, Path(tmp))
            runs[name].append(run)
            log(
                f"  -> loop {run.loop_wall:.2f}s ({run.steps} steps, "
                f"median {statistics.median(run.step_walls):.2f}s, CPU {run.loop_cpu:.1f}s, "
                f"{run.threads} threads), "
                f"trainer.train {run.train_wall:.2f}s, end to end {run.total_wall:.2f}s; "
                f"losses {[round(v, 4) for _, v in run.losses]}"
            )

    steps = runs[OURS][0].steps
    threads = {r.threads for rs in runs.values() for r in rs}
    nan = float("nan")
    print(f"## training throughput: {args.model} on {args.dataset.name}/{args.split} ({len(rows)} rows)")
    print(
        f"\nsettings: batch {args.batch_size}, {args.negatives} negative(s)/row "
        f"({args.batch_size * (2 + args.negatives)} sequences/step), max_seq_length {args.max_seq_length}, "
        f"{args.steps} timed steps after {args.warmup_steps} warm-up steps, lr {args.learning_rate:g}, "
        f"warmup_ratio {args.warmup_ratio:g}, weight_decay {args.weight_decay:g}, fp32 on CPU, "
        f"NO_DUPLICATES sampler, MNRL, seed {args.seed}; torch {torch.__version__} with "
        f"{'/'.join(map(str, sorted(threads)))} threads during training ({os.cpu_count()} cores); "
        f"{args.repeats} runs each, alternating order"
    )
    print()
    print(
        table(
            f"training loop (steps {args.warmup_steps + 1}-{total})",
            runs,
            lambda r: (r.loop_wall, r.loop_cpu),
            steps,
            args.batch_size,
        )
    )
    median = {n: statistics.median([w for r in rs for w in r.step_walls]) for n, rs in runs.items()}
    print(
        f"\nmedian step over all runs (robust to load bursts): ours {median[OURS]:.2f} s, "
        f"plain ST {median[PEER]:.2f} s, ratio {median[PEER] / median[OURS]:.2f}×"
    )
    print()
    print(
        table(
            f"trainer.train() ({total} steps incl. warm-up and the end checkpoint)",
            runs,
            lambda r: (r.train_wall, nan),
            total,
            args.batch_size,
        )
    )
    print()
    print(
        table(
            f"end to end ({total} steps + model load + dataset + trainer + save)",
            runs,
            lambda r: (r.total_wall, r.total_cpu),
            total,
            args.batch_size,
        )
    )

    ours_loss, peer_loss = runs[OURS][0].losses, runs[PEER][0].losses
    same = bool(ours_loss) and [s for s, _ in ours_loss] == [s for s, _ in peer_loss]
    delta = max((abs(a - b) for (_, a), (_, b) in zip(ours_loss, peer_loss, strict=False)), default=nan)
    same = same and delta <= 1e-3
    print(
        f"\nsame work: {same} (per-step training losses of both sides over {len(ours_loss)} logged steps, "
        f"max |Δ| {delta:.2e}; final loss ours {ours_loss[-1][1] if ours_loss else nan:.4f}, "
        f"plain ST {peer_loss[-1][1] if peer_loss else nan:.4f})"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
