"""Fine-tuning with sentence-transformers: MNRL (or Cached MNRL) over mined (anchor, positive, negatives).

The sentence-transformers plumbing of the training stage (:mod:`embed_assets.stages.train`, which owns the
settings, tracking and the resumable work folder): losses, trainer arguments, progress and curves.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embed_assets.stages.train import TrainSettings


@dataclass
class TrainReport:
    model_dir: str
    device: str
    steps: int
    epochs: int
    rows: int
    seconds: float
    samples_per_second: float
    precision: str
    resumed_from: str | None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    best_metric: float | None = None
    train_window: int = 0  # tokens per text while training (TrainSettings.training_window)
    validation_window: int = 0  # tokens per text of the validation passes (0: no validation)
    # Per validation query, nDCG@10 at the last validation (what a paired comparison of two runs needs).
    val_per_query: dict[str, float] = field(default_factory=dict)
    # Matryoshka rotation: trained dimension -> share of the corpus passages' variance in that many coordinates.
    rotation_variance: dict[str, float] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        skip = ("loss_curve", "eval_curve", "rotation_variance", "val_per_query")
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        out["final_loss"] = self.loss_curve[-1][1] if self.loss_curve else None
        for dim, share in self.rotation_variance.items():
            out[f"rotation_variance_at_{dim}"] = share
        return out


def training_rows(
    mined: Sequence[dict[str, Any]], negatives_per_row: int | None = None
) -> list[dict[str, str]]:
    """Turn mined rows into the column layout MNRL expects: anchor, positive, negative_1..k.

    A row keeps up to ``negatives_per_row`` of its hardest negatives; a row with fewer (the margin left fewer
    candidates) keeps what it has, down to none (in-batch negatives only). :func:`train` batches rows with the
    same number of negatives together.

    Args:
        mined: Rows with ``query``, ``positive_text`` and ``negative_texts`` (hardest first).
        negatives_per_row: Keep at most this many of the hardest negatives (each one costs a forward and
            backward pass per row; in-batch negatives come for free). ``None``: all of them.

    Returns:
        Rows for ``datasets.Dataset.from_list``.
    """
    rows = []
    for r in mined:
        row = {"anchor": r["query"], "positive": r["positive_text"]}
        for i, neg in enumerate(r["negative_texts"][:negatives_per_row], start=1):
            row[f"negative_{i}"] = neg
        rows.append(row)
    return rows


def _datasets(rows: Sequence[dict[str, str]]) -> Any:
    """One ``datasets.Dataset`` per number of negatives (a batch needs the same columns in every row).

    Returns:
        A single dataset when every row has the same columns, else ``{"negatives_<k>": dataset}``, which the
        trainer samples proportionally to the datasets' sizes.
    """
    from datasets import Dataset

    groups: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(len(row) - 2, []).append(row)
    if len(groups) == 1:
        return Dataset.from_list(list(rows))
    return {f"negatives_{k}": Dataset.from_list(groups[k]) for k in sorted(groups, reverse=True)}


#: Validation evaluations per epoch when ``eval_steps`` is 0 (each is an early-stopping and best-model point).
EVALS_PER_EPOCH = 1
#: Most passages the Matryoshka rotation is fitted on (a 384-1024-dim second moment needs a few thousand).
ROTATION_FIT_TEXTS = 4096


def add_variance_rotation(
    model: Any, passages: Sequence[str], passage_prompt: str = "", batch_size: int = 64, seed: int = 42
) -> list[float]:
    """Append a frozen orthogonal layer that orders the embedding's coordinates by variance on the passages.

    The layer is the eigenbasis of the uncentered second moment of the passages' embeddings (PCA without
    centering). A rotation keeps every dot product and norm, so the full-size model is unchanged; a prefix of
    ``d`` coordinates is then the best ``d``-dimensional linear summary of the corpus's embeddings, which is what a
    truncated (Matryoshka) embedding of that corpus should be. Fitted on the corpus the model will search, after
    training, because measured that way it kept far more at a quarter of the dimension than a rotation fitted on
    the training texts or before training (benchmarks/RESULTS.md).

    Custom code because sentence-transformers ships no PCA module; it is an eigendecomposition written into its
    own ``Dense`` layer, which saving, loading, merging, ONNX export and serving already handle.

    Args:
        model: The ``SentenceTransformer`` to extend (in place).
        passages: Corpus passages; at most :data:`ROTATION_FIT_TEXTS` of them are used (a seeded sample).
        passage_prompt: Prefix of passages.
        batch_size: Encoding batch.
        seed: Seed of the sample when there are more passages than the cap.

    Returns:
        The share of the variance in the first ``k`` coordinates, for ``k`` = 1 .. dimension.
    """
    import random

    import numpy as np
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense

    texts = sorted(set(passages))
    if len(texts) > ROTATION_FIT_TEXTS:
        texts = random.Random(seed).sample(texts, ROTATION_FIT_TEXTS)
    emb = model.encode(texts, prompt=passage_prompt or None, batch_size=batch_size).astype(np.float64)
    eigenvalues, vectors = np.linalg.eigh(emb.T @ emb / len(emb))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0.0, None), vectors[:, order]
    # Eigenvectors are defined up to sign: fix it (largest component positive) so the layer is reproducible.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    dim = vectors.shape[0]
    param = next(model.parameters())
    weight = torch.tensor(vectors.T, dtype=param.dtype)  # y = V^T x: coordinate i is x's i-th component
    layer = Dense(dim, dim, bias=False, activation_function=torch.nn.Identity(), init_weight=weight).to(
        param.device
    )
    layer.requires_grad_(False)
    model.append(layer)
    return (np.cumsum(eigenvalues) / max(eigenvalues.sum(), 1e-12)).tolist()


def _steps_per_epoch(rows: Sequence[dict[str, str]], batch_size: int) -> int:
    """Optimizer steps of one epoch: rows with the same number of negatives are batched together."""
    counts: dict[int, int] = {}
    for row in rows:
        counts[len(row)] = counts.get(len(row), 0) + 1
    return sum(math.ceil(n / batch_size) for n in counts.values())


def build_loss(model: Any, settings: TrainSettings, base_model: str, device: str) -> Any:
    """The training loss ``settings.loss`` names, with hardness weighting and Matryoshka when configured.

    ``gist`` / ``cached_gist`` (GISTEmbed) use the base model as the guide: an in-batch candidate the guide
    scores above the positive is masked instead of being pushed away, which keeps the false negatives that
    synthetic or mined data is full of from being trained on (Solatorio, 2024). The ``cached_*`` losses
    (GradCache) give large effective batches at the memory of ``cached_mini_batch_size``.

    Args:
        model: The model being trained.
        settings: ``loss``, ``hardness_*``, ``mnrl_directions``, ``cached_mini_batch_size``, ``matryoshka_dims``.
        base_model: The guide of the GIST losses.
        device: Where the guide runs.

    Returns:
        A sentence-transformers loss module.
    """
    from sentence_transformers.sentence_transformer import losses

    hardness = (
        {"hardness_mode": settings.hardness_mode, "hardness_strength": settings.hardness_strength}
        if settings.hardness_strength > 0
        else {}
    )
    mnrl = {**hardness, "directions": tuple(settings.mnrl_directions), "partition_mode": "joint"}
    if settings.loss == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, **mnrl)
    elif settings.loss == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=settings.cached_mini_batch_size, **mnrl
        )
    elif settings.loss in ("gist", "cached_gist"):
        if hardness:
            raise ValueError(
                "hardness_strength applies to the MNRL losses; GISTEmbed has no hardness weighting"
            )
        if settings.mnrl_directions != ["query_to_doc"]:
            raise ValueError(
                "mnrl_directions applies to the MNRL losses; GISTEmbed already contrasts queries with queries "
                "and passages with passages (its guide masks the false ones)"
            )
        from embed_assets.models import load_sentence_transformer

        guide = load_sentence_transformer(base_model, device=device, max_seq_length=model.max_seq_length)
        loss = (
            losses.GISTEmbedLoss(model, guide)
            if settings.loss == "gist"
            else losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=settings.cached_mini_batch_size)
        )
    else:
        raise ValueError(f"unknown loss {settings.loss!r}")
    if settings.matryoshka_dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=matryoshka_sizes(model, settings))
    return loss


def matryoshka_sizes(model: Any, settings: TrainSettings) -> list[int]:
    """The embedding sizes MatryoshkaLoss trains: ``settings.matryoshka_dims`` that fit, plus the full one."""
    dim = model.get_embedding_dimension()
    return sorted({d for d in settings.matryoshka_dims if 0 < d <= dim} | {dim}, reverse=True)


def windowed_evaluator(
    val: dict[str, Any], window: int, query_prompt: str = "", passage_prompt: str = ""
) -> Any:
    """An ``InformationRetrievalEvaluator`` that scores the model at ``window`` tokens, whatever it trains at.

    The trainer's evaluator sees the model at its training window (shorter than the serving window by default,
    so training is cheaper). The validation score picks the learning rate, the kept checkpoint and the kept
    probe; ``validation_max_seq_length`` can make that choice at the serving window instead, where a passage's
    second half, invisible at 128 tokens, counts (measured: no better choices on the shared datasets, at more
    cost per validation, so the default stays the training window).

    Args:
        val: ``{"queries", "corpus", "relevant_docs"}`` (see :func:`train`).
        window: Tokens per text while scoring; the model's own window is restored afterwards.
        query_prompt: Prefix for queries.
        passage_prompt: Prefix for passages.

    Returns:
        The evaluator (its metrics are named ``val_cosine_ndcg@10`` etc.; ``per_query`` holds the last call's
        nDCG@10 of each query, for paired comparisons).
    """
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from embed_assets.metrics import per_query_ndcg

    class WindowedEvaluator(InformationRetrievalEvaluator):
        def __call__(self, model: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            trained = model.max_seq_length
            model.max_seq_length = self.window
            try:
                return super().__call__(model, *args, **kwargs)
            finally:
                model.max_seq_length = trained

        def compute_metrics(self, queries_result_list: list[Any]) -> dict[str, Any]:
            run = {
                qid: {hit["corpus_id"]: float(hit["score"]) for hit in hits}
                for qid, hits in zip(self.queries_ids, queries_result_list, strict=True)
            }
            qrels = {
                q: dict.fromkeys(self.relevant_docs[q], 1) for q in self.queries_ids if self.relevant_docs[q]
            }
            self.per_query = per_query_ndcg(qrels, run, k=10, missing_queries="zero")
            return super().compute_metrics(queries_result_list)

    evaluator = WindowedEvaluator(
        queries=val["queries"],
        corpus=val["corpus"],
        relevant_docs=val["relevant_docs"],
        name="val",
        query_prompt=query_prompt or None,
        corpus_prompt=passage_prompt or None,
        write_csv=False,
    )
    evaluator.window = window
    evaluator.per_query = {}  # set by each call: nDCG@10 per validation query
    return evaluator


def _precision(setting: str, device: str) -> str:
    if setting != "auto":
        return setting
    if not device.startswith("cuda"):
        return "no"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def train(
    base_model: str,
    rows: Sequence[dict[str, str]],
    work_dir: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    device: str = "cpu",
    val: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    callbacks: Sequence[Any] = (),
    query_prompt: str = "",
    passage_prompt: str = "",
) -> TrainReport:
    """Fine-tune ``base_model`` on ``rows`` and save the (best) model to ``out_dir``.

    Trainer checkpoints go to ``work_dir``; a run killed mid-way resumes from the last one when called again
    with the same ``work_dir``. The model trains at ``settings.training_window`` tokens and is saved with the
    base model's own window, so evaluation, export and serving see passages as the base model does.

    Args:
        base_model: Model path or hub id (see :func:`embed_assets.models.resolve_model_path`).
        rows: Output of :func:`training_rows`.
        work_dir: Stable folder for trainer checkpoints (keyed by inputs + settings by the caller).
        out_dir: Final model folder (written atomically).
        settings: Hyper-parameters.
        device: Torch device.
        val: Optional ``{"queries", "corpus", "relevant_docs"}`` for an ``InformationRetrievalEvaluator``;
            with it the best checkpoint by nDCG@10 is kept.
        progress: Optional progress sink (one line per logging step).
        callbacks: Extra ``transformers.TrainerCallback`` instances (e.g. experiment tracking).
        query_prompt: Prefix for anchors (queries), e.g. ``"query: "``.
        passage_prompt: Prefix for positives and negatives.

    Returns:
        A :class:`TrainReport`.
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.training_args import BatchSamplers
    from transformers.trainer_callback import PrinterCallback

    from embed_assets.models import load_sentence_transformer, set_max_seq_length
    from embed_assets.storage import atomic_path

    if not rows:
        raise ValueError("no training rows: the mined_negatives stage produced nothing to train on")
    model = load_sentence_transformer(base_model, device=device)
    base_window = model.max_seq_length
    train_window = settings.training_window(base_window)
    set_max_seq_length(model, train_window, base_model)
    dataset = _datasets(rows)
    loss = build_loss(model, settings, base_model, device)

    evaluator = None
    if val and val.get("queries"):
        val_window = settings.validation_max_seq_length or train_window
        # Refused now, not at the first validation after minutes of training, if beyond the model's positions.
        set_max_seq_length(model, val_window, base_model)
        set_max_seq_length(model, train_window, base_model)
        evaluator = windowed_evaluator(val, val_window, query_prompt, passage_prompt)
    prompts = None
    if query_prompt or passage_prompt:
        prompts = {"anchor": query_prompt}
        columns = {c for row in rows for c in row}
        prompts.update({c: passage_prompt for c in sorted(columns) if c != "anchor"})

    epochs = settings.resolved_epochs(len(rows))
    steps_per_epoch = _steps_per_epoch(rows, settings.batch_size)
    eval_steps = settings.eval_steps or max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
    precision = _precision(settings.mixed_precision, device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        # transformers v5: a warmup_steps float below 1 is the warmup ratio (warmup_ratio is deprecated).
        warmup_steps=float(settings.warmup_ratio),
        weight_decay=settings.weight_decay,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not device.startswith("cuda"),
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # duplicate texts in a batch would be false in-batch negatives
        eval_strategy="steps" if evaluator else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        # With a validation set every evaluation is also a resume point (the best one is kept at the end).
        save_steps=eval_steps if evaluator else settings.save_steps,
        save_total_limit=2,
        load_best_model_at_end=evaluator is not None,
        metric_for_best_model="eval_val_cosine_ndcg@10" if evaluator else None,
        logging_steps=settings.logging_steps,
        seed=settings.seed,
        prompts=prompts,
        report_to="none",
        disable_tqdm=True,
    )
    recorder = _curve_recorder(progress, _total_steps(len(rows), settings, epochs))
    stopping = []
    if evaluator is not None and settings.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        stopping.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=[recorder, *stopping, *callbacks],
    )
    # The trainer prints every log dict ({'loss': ...}) on stdout; the recorder reports them through `progress`.
    trainer.remove_callback(PrinterCallback)
    last = last_complete_checkpoint(work_dir)
    if last and progress:
        progress(f"resuming from {last}")
    start = time.monotonic()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.monotonic() - start

    if trainer.is_world_process_zero():  # under torchrun every rank trains, rank 0 alone writes the model
        model.max_seq_length = base_window  # the window evaluation and serving use (see the docstring)
        with atomic_path(out_dir) as tmp:
            model.save(str(tmp))
            (tmp / "embed_assets_training.json").write_text(
                json.dumps(
                    {
                        "base_model": base_model,
                        "settings": settings.model_dump(),
                        "query_prompt": query_prompt,
                        "passage_prompt": passage_prompt,
                        "epochs": epochs,
                        "train_max_seq_length": train_window,
                        "saved_max_seq_length": base_window,
                        "validation_max_seq_length": evaluator.window if evaluator else None,
                    },
                    indent=2,
                )
            )
    trained_rows = result.global_step * settings.batch_size
    return TrainReport(
        model_dir=str(out_dir),
        device=device,
        steps=result.global_step,
        epochs=epochs,
        rows=len(rows),
        seconds=round(seconds, 2),
        samples_per_second=round(
            result.metrics.get("train_samples_per_second", trained_rows / max(seconds, 1e-9)), 3
        ),
        precision=precision,
        resumed_from=last,
        loss_curve=recorder.loss,
        eval_curve=recorder.eval,
        best_metric=getattr(trainer.state, "best_metric", None),
        train_window=train_window,
        validation_window=evaluator.window if evaluator else 0,
        val_per_query=dict(evaluator.per_query) if evaluator else {},
    )


def last_complete_checkpoint(work_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder whose save finished (``trainer_state.json`` is written last).

    A kill during a save leaves a partial folder that transformers' ``get_last_checkpoint`` would still
    return; resuming from it fails, so it is skipped.

    Args:
        work_dir: The trainer's output folder.

    Returns:
        The folder path, or ``None`` when there is no complete checkpoint.
    """
    done = [
        p
        for p in Path(work_dir).glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


#: Optimizer steps the moving rate (and ETA) is measured over.
RATE_WINDOW_STEPS = 20
#: Longest quiet stretch: a progress line at least this often (seconds) between loss logs, at step ends.
PROGRESS_EVERY_S = 20.0


def _total_steps(n_rows: int, settings: TrainSettings, epochs: int) -> int:
    if settings.max_steps > 0:
        return settings.max_steps
    return math.ceil(n_rows / settings.batch_size) * epochs


def _curve_recorder(progress: Callable[[str], None] | None, total_steps: int) -> Any:
    """A ``TrainerCallback`` collecting loss/eval curves and reporting progress with rate and ETA.

    The rate is a moving estimate over the last :data:`RATE_WINDOW_STEPS` optimizer steps, measured between
    step ends: start-up (model load, tokenization, the first step's allocations) never enters it, so the first
    ETA is not inflated, and a slowdown shows within a few steps.
    """
    from collections import deque

    from transformers import TrainerCallback

    class CurveRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.loss: list[tuple[int, float]] = []
            self.eval: list[tuple[int, float]] = []
            self.ends: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW_STEPS + 1)
            self.total = total_steps
            self.started = time.monotonic()
            self.last_line = self.started

        def say(self, line: str) -> None:
            if progress:
                progress(line)
                self.last_line = time.monotonic()

        def eta(self, step: int) -> str:
            rate = self.rate()
            left = f"ETA {(self.total - step) / rate:.0f}s" if rate > 0 else "ETA after the next steps"
            return f"{rate:.2f} steps/s {left}"

        def on_train_begin(self, args, state, control, **kwargs):
            self.total = state.max_steps or total_steps
            self.started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            first = not self.ends
            self.ends.append((time.monotonic(), state.global_step))
            if first:
                self.say(
                    f"step {state.global_step}/{self.total} done ({time.monotonic() - self.started:.1f}s for the "
                    "first step, model and data preparation included)"
                )
            elif time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
                self.say(f"step {state.global_step}/{self.total} {self.eta(state.global_step)}")

        def rate(self) -> float:
            """Steps per second over the recent window (0 until two steps have ended)."""
            if len(self.ends) < 2:
                return 0.0
            (t0, s0), (t1, s1) = self.ends[0], self.ends[-1]
            return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            step = state.global_step
            if "loss" in logs:
                self.loss.append((step, float(logs["loss"])))
            for key, value in logs.items():
                if key.endswith("ndcg@10"):
                    self.eval.append((step, float(value)))
                    self.say(f"step {step}/{self.total} validation nDCG@10 {float(value):.4f}")
            if "loss" in logs:
                self.say(f"step {step}/{self.total} loss={logs['loss']:.4f} {self.eta(step)}")

    return CurveRecorder()
