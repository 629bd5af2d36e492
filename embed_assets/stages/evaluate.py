"""Stage 6 — evaluation: base and fine-tuned models on the same BEIR test set, at the same window.

Both models retrieve over the whole evaluation corpus BEIR-style (:func:`embed_assets.metrics.encode_and_search`,
cosine, exact search) and are scored like pytrec_eval (nDCG/Recall/P/MAP/MRR at every k). Both encode at
``eval_max_seq_length`` tokens (the evaluation window's one owner; default: the base model's own window), so a
model is never penalized or favoured by a different truncation. The nDCG@10 difference carries a paired
bootstrap interval over queries; the quality gate fails when the fine-tuned model is worse beyond that noise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from embed_assets.stages.common import Gate, Manifest, ModelSpec, PathRef, StageContext, Table
from embed_assets.stages.split import SplitManifest
from embed_assets.stages.train import CheckpointManifest, MLflowInfo

#: The general-domain guard set shipped with the package (see its README for source and license).
BUNDLED_GUARD = Path(__file__).resolve().parents[1] / "data" / "guard"
#: Metrics the model card shows per model and evaluation set.
CARD_METRICS = ("NDCG@10", "Recall@10")


class EvalSettings(BaseModel):
    """Cut-offs, the evaluation window and the noise estimate of the quality gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k_values: list[int] = Field(default=[1, 5, 10, 100], description="Cut-offs for every metric.")
    batch_size: int = Field(default=64, ge=1, description="Encoding batch size.")
    eval_max_seq_length: int = Field(
        default=0,
        ge=0,
        description="Tokens per text for base and fine-tuned alike (0 = the base model's window).",
    )
    noise_bootstrap_samples: int = Field(
        default=1000, ge=100, description="Paired bootstrap draws for the check."
    )
    allow_regression: bool = Field(
        default=False,
        description="Let a fine-tuned model that is worse than the base beyond noise through the quality gate "
        "(the check still fails, as a warning, and the override is recorded); by default it stops the run "
        "before anything is exported or served.",
    )
    guard_path: str = Field(
        default="bundled",
        description="Forgetting guard: a general-domain BEIR folder on which the fine-tuned model may not lose "
        "more than guard_margin nDCG@10 beyond noise. 'bundled': the general-knowledge set shipped with the "
        "package (TruthfulQA questions -> answers, Apache-2.0, see embed_assets/data/guard/README.md); '' = off.",
    )
    guard_margin: float = Field(
        default=0.01, ge=0, le=1, description="Allowed nDCG@10 loss on the guard set (0.01 = 1 point)."
    )
    merge: Literal["auto", "off"] = Field(
        default="auto",
        description="Model merging (LM-Cocktail): 'auto' builds base/fine-tuned weight interpolations at each of "
        "merge_weights; a merge is served when the fine-tuned model forgets (the best on validation of those that "
        "keep the guard) or beats it on validation beyond noise (needs the checkpoint's validation split; without "
        "one: the fine-tuned model). 'off': the fine-tuned model is served.",
    )
    merge_weights: list[float] = Field(
        # Denser towards the fine-tuned end: a model that forgets a little is usually rescued by a light merge
        # (w = 0.9) that keeps nearly all of its gain; 0.5 is the LM-Cocktail midpoint for one that forgets a lot.
        default=[0.5, 0.75, 0.9],
        description="Fine-tuned share of each merged candidate (0 < w < 1; 1 - w is the base model's share).",
    )

    @field_validator("merge_weights")
    @classmethod
    def _weights_inside(cls, weights: list[float]) -> list[float]:
        outside = [w for w in weights if not 0.0 < w < 1.0]
        if outside:
            raise ValueError(f"merge weights must be strictly between 0 and 1, got {outside}")
        return sorted(set(weights))


@dataclass
class ModelChoice:
    """The model to serve: ``weight`` is its fine-tuned share (1.0: the fine-tuned model, < 1: a merge).

    ``candidates`` holds what each scored on the validation split and on the guard set (the base model too,
    as weight 0), which is what the choice was made on.
    """

    weight: float
    model_dir: str
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def merged(self) -> bool:
        return self.weight < 1.0

    def label(self) -> str:
        return f"merged (fine-tuned weight {self.weight:g})" if self.merged else "fine-tuned"


@dataclass
class Bootstrap:
    """Mean per-query nDCG@10 difference (fine-tuned − base) and its 95 % interval."""

    delta: float
    ci95_low: float
    ci95_high: float


@dataclass
class SetMetrics:
    """Both models on one evaluation set (``generated_test``: the split's test queries; ``golden``: yours)."""

    name: str
    beir: str
    base: dict[str, float]
    finetuned: dict[str, float]
    deltas: list[dict[str, Any]]
    bootstrap: Bootstrap
    queries: int
    passages: int
    matryoshka: dict[str, float] = field(default_factory=dict)  # trained dimension -> served nDCG@10
    merged: dict[str, float] = field(default_factory=dict)  # the merged model's metrics, when it is served

    @property
    def served(self) -> dict[str, float]:
        """The served model's metrics (the merged model's when merging chose one, else the fine-tuned's)."""
        return self.merged or self.finetuned


@dataclass
class MetricsManifest(Manifest):
    """Metrics of both models on every evaluation set (``path``: metrics.json; run files beside it).

    The *primary* set (your golden set when given, else the generated test split) is what the quality gate,
    the export parity checks and the served-parity check use.
    """

    path: str
    sets: list[SetMetrics]
    eval_max_seq_length: int
    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    mlflow: MLflowInfo = field(default_factory=MLflowInfo)
    allow_regression: bool = False
    guard_margin: float = 0.01
    choice: ModelChoice | None = None  # None: merging off or impossible, the fine-tuned model is served
    model_dir: str = ""  # the served model's folder (fine-tuned or merged)

    @property
    def primary(self) -> SetMetrics:
        return next((s for s in self.sets if s.name == "golden"), self.sets[0])

    @property
    def base(self) -> dict[str, float]:
        return self.primary.base

    @property
    def finetuned(self) -> dict[str, float]:
        return self.primary.finetuned

    @property
    def served(self) -> dict[str, float]:
        """The served model's metrics on the primary set (the export parity reference)."""
        return self.primary.served

    @property
    def served_label(self) -> str:
        return self.choice.label() if self.choice else "fine-tuned"

    @property
    def bootstrap(self) -> Bootstrap:
        """Served − base nDCG@10 on the primary set."""
        return self.primary.bootstrap

    @property
    def eval_beir(self) -> str:
        """The BEIR folder of the primary set (parity checks evaluate there)."""
        return self.primary.beir

    @property
    def guard(self) -> SetMetrics | None:
        return next((s for s in self.sets if s.name == "guard"), None)

    def gates(self) -> list[Gate]:
        p = self.primary
        b = p.bootstrap
        passed = b.ci95_high >= 0
        message = f"on {p.name}: {self.served_label} nDCG@10 {_vs(p)}"
        if not passed:
            message += (
                " — worse than the base beyond noise, so nothing downstream is exported or served; "
                + (
                    "allowed through by allow_regression: true"
                    if self.allow_regression
                    else "to ship it anyway set ops.beir_metrics.config.allow_regression: true"
                )
            )
        gates = [
            Gate(
                "finetuned_not_worse_than_base",
                passed,
                message,
                severity="warn" if self.allow_regression and not passed else "error",
                blocking=True,
                metadata={
                    "eval_set": p.name,
                    "ndcg@10_delta": b.delta,
                    "ci95_low": b.ci95_low,
                    "ci95_high": b.ci95_high,
                    "allow_regression": self.allow_regression,
                },
            )
        ]
        g = self.guard
        if g is None:
            gates.append(
                Gate(
                    "no_forgetting",
                    True,
                    "not evaluated: the forgetting guard is off (guard_path is empty)",
                    severity="warn",
                    metadata={"evaluated": False},
                )
            )
        else:
            kept = g.bootstrap.ci95_high >= -self.guard_margin
            message = f"on the guard set {g.beir}: {self.served_label} nDCG@10 {_vs(g)}"
            if not kept:
                message += (
                    f" — loses more than {100 * self.guard_margin:.1f} points beyond noise outside the domain; "
                    + (
                        "allowed through by allow_regression: true"
                        if self.allow_regression
                        else "lower the learning rate or the epochs, let model merging keep more of the base, "
                        "or set ops.beir_metrics.config.allow_regression: true"
                    )
                )
            gates.append(
                Gate(
                    "no_forgetting",
                    kept,
                    message,
                    severity="warn" if self.allow_regression and not kept else "error",
                    blocking=True,
                    metadata={
                        "guard_set": g.beir,
                        "ndcg@10_delta": g.bootstrap.delta,
                        "ci95_low": g.bootstrap.ci95_low,
                        "ci95_high": g.bootstrap.ci95_high,
                        "margin": self.guard_margin,
                        "allow_regression": self.allow_regression,
                    },
                )
            )
        return gates

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "ndcg@10_base": self.base["NDCG@10"],
            "ndcg@10_finetuned": self.finetuned["NDCG@10"],
            **({"ndcg@10_merged": self.primary.merged["NDCG@10"]} if self.primary.merged else {}),
            "ndcg@10_delta": self.served["NDCG@10"] - self.base["NDCG@10"],
            "recall@10_served": self.served["Recall@10"],
            "served_model": self.served_label,
            "served_model_dir": PathRef(self.model_dir),
            "primary_eval_set": self.primary.name,
            **(self.choice_metadata()),
        }
        for s in self.sets:
            suffix = "" if s.name == "generated_test" else f"_{s.name}"
            meta[f"metrics{suffix}"] = delta_table(s.deltas, s)
            if suffix:
                meta[f"ndcg@10_base{suffix}"] = s.base["NDCG@10"]
                meta[f"ndcg@10_finetuned{suffix}"] = s.finetuned["NDCG@10"]
                if s.merged:
                    meta[f"ndcg@10_merged{suffix}"] = s.merged["NDCG@10"]
            meta[f"eval_queries{suffix}"] = s.queries
            if s.matryoshka:
                full = s.served["NDCG@10"]  # the per-dimension numbers are the served model's
                meta[f"matryoshka{suffix}"] = Table(
                    ["dimensions", "ndcg@10", "share_of_full"],
                    [
                        {"dimensions": int(d), "ndcg@10": v, "share_of_full": v / full if full else 0.0}
                        for d, v in s.matryoshka.items()
                    ],
                )
        return {
            **meta,
            "eval_max_seq_length": self.eval_max_seq_length,
            "eval_passages": self.primary.passages,
            "device": self.device,
            "seconds_base": self.seconds.get("base", 0.0),
            "seconds_finetuned": self.seconds.get("finetuned", 0.0),
            "artifact_path": PathRef(self.path),
            **self.mlflow.metadata(),
        }

    def choice_metadata(self) -> dict[str, Any]:
        if self.choice is None:
            return {}
        return {
            "merge_weight": self.choice.weight,
            "merge_choice": self.choice.reason,
            "merge_candidates": Table(
                ["finetuned_weight", "val_ndcg@10", "guard_ndcg@10", "keeps_guard"],
                self.choice.candidates,
                max_rows=len(self.choice.candidates),
            ),
        }


def delta_table(deltas: list[dict[str, Any]], s: SetMetrics | None = None) -> Table:
    """Base, fine-tuned (merged, when served) and Δ (served − base) per metric, shown inline on the asset page."""
    merged = s.merged if s is not None else {}
    columns = ["metric", "base", "finetuned", *(["merged"] if merged else []), "delta"]
    rows = []
    for r in deltas:
        # deltas compare the served model with the base; with a merge served, r["tuned"] is the merged value
        tuned = s.finetuned.get(r["metric"], r["tuned"]) if s is not None else r["tuned"]
        row = {"metric": r["metric"], "base": r["base"], "finetuned": tuned, "delta": r["delta"]}
        if merged:
            row["merged"] = r["tuned"]
        rows.append(row)
    return Table(columns, rows, max_rows=len(deltas))


def _vs(s: SetMetrics) -> str:
    b = s.bootstrap
    return (
        f"{s.served['NDCG@10']:.4f} vs base {s.base['NDCG@10']:.4f} ({100 * b.delta:+.1f} points, "
        f"95% CI [{100 * b.ci95_low:+.1f}, {100 * b.ci95_high:+.1f}])"
    )


def evaluate_checkpoint(
    split: SplitManifest,
    checkpoint: CheckpointManifest,
    settings: EvalSettings,
    model: ModelSpec,
    ctx: StageContext,
    tracker: Any | None = None,
) -> MetricsManifest:
    """Evaluate the base model and the checkpoint on the split's test set (and your golden set, if given).

    Args:
        split: Holds ``eval_beir`` (the generated test split) and ``golden`` (your golden set, optional).
        checkpoint: The fine-tuned model.
        settings: Cut-offs, window, bootstrap draws.
        model: The base model and its prompts.
        ctx: Where to write ``metrics.json`` and the run files; passage embeddings are cached per text in
            ``ctx.cache_dir("embeddings")`` (the base model's are shared with mining and with later runs).
        tracker: An :class:`embed_assets.tracking.MLflowTracker` (the checkpoint's run gets the table), or ``None``.

    Returns:
        A :class:`MetricsManifest` (its gate: fine-tuned not worse than base beyond noise, on the primary set).
    """
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import compare, paired_bootstrap, per_query_ndcg
    from embed_assets.model_card import update_card
    from embed_assets.storage import write_json

    folders = {"generated_test": split.eval_beir}
    if split.golden:
        folders["golden"] = split.golden.beir
    if settings.guard_path:
        folders["guard"] = resolve_guard(settings.guard_path)
    data = {name: load_beir_folder(folder, split="test") for name, folder in folders.items()}
    device = model.torch_device()
    window = settings.eval_max_seq_length or base_window(model)
    out = ctx.out_dir("beir_metrics")
    results: dict[str, dict[str, Any]] = {name: {} for name in folders}
    runs: dict[str, dict[str, Any]] = {name: {} for name in folders}
    per_dim: dict[str, dict[str, dict[str, float]]] = {name: {} for name in folders}
    seconds = {}
    start = time.monotonic()
    # (model folder, set name) -> evaluate_model's result: the merge selection's guard evaluations are reused below.
    scored: dict[tuple[str, str], tuple[dict[str, float], dict[str, Any], dict[str, float]]] = {}
    choice = choose_model(checkpoint, settings, model, window, device, ctx, data.get("guard"), scored)
    if choice is not None:
        seconds["merge_selection"] = round(time.monotonic() - start, 2)
    sides = [("base", model.base_model), ("finetuned", checkpoint.model_dir)]
    if choice is not None and choice.merged:
        sides.append(("merged", choice.model_dir))
    served_side = sides[-1][0]
    for side, path in sides:
        start = time.monotonic()
        for name, (corpus, queries, qrels) in data.items():
            dims = checkpoint.matryoshka_dims if side == served_side else ()
            ctx.log.info(
                f"evaluating the {side} model on {name}: {len(queries)} queries x {len(corpus)} passages at "
                f"{window} tokens"
            )
            reused = scored.get((path, name)) if not dims else None
            results[name][side], runs[name][side], per_dim[name][side] = reused or evaluate_model(
                path,
                corpus,
                queries,
                qrels,
                settings,
                model,
                window,
                device,
                ctx.cache_dir("embeddings"),
                dims,
            )
            prefix = "" if name == "generated_test" else f"{name}_"
            write_json(out / f"{prefix}run_{side}.json", runs[name][side])
        seconds[side] = round(time.monotonic() - start, 2)
    sets = []
    for name, (corpus, queries, qrels) in data.items():
        base, tuned = results[name]["base"], results[name]["finetuned"]
        served = results[name][served_side]
        boot = Bootstrap(
            *paired_bootstrap(
                per_query_ndcg(qrels, runs[name]["base"], 10),
                per_query_ndcg(qrels, runs[name][served_side], 10),
                n=settings.noise_bootstrap_samples,
                seed=0,
            )
        )
        sets.append(
            SetMetrics(
                name,
                folders[name],
                base,
                tuned,
                compare(base, served),
                boot,
                len(queries),
                len(corpus),
                per_dim[name].get(served_side, {}),
                merged=results[name].get("merged", {}),
            )
        )
        merged_note = f", merged {served['NDCG@10']:.4f}" if served_side == "merged" else ""
        ctx.log.info(
            f"{name}: nDCG@10 base {base['NDCG@10']:.4f} -> fine-tuned {tuned['NDCG@10']:.4f}{merged_note} "
            f"(served {100 * boot.delta:+.1f} points, 95% CI [{100 * boot.ci95_low:+.1f}, {100 * boot.ci95_high:+.1f}]) "
            f"on {len(queries)} queries at {window} tokens"
        )
    manifest = MetricsManifest(
        path=str(out / "metrics.json"),
        sets=sets,
        eval_max_seq_length=window,
        device=device,
        seconds=seconds,
        allow_regression=settings.allow_regression,
        guard_margin=settings.guard_margin,
        choice=choice,
        model_dir=choice.model_dir if choice is not None else checkpoint.model_dir,
    )
    write_json(
        manifest.path,
        {
            s.name: {"base": s.base, "finetuned": s.finetuned, "merged": s.merged, "deltas": s.deltas}
            for s in sets
        },
    )
    manifest.mlflow = _log_to_mlflow(tracker, checkpoint, manifest, ctx)
    card = {
        "metrics": {
            s.name: {
                side: {k: v for k, v in getattr(s, side).items() if k in CARD_METRICS}
                for side in ("base", "finetuned", "merged")
                if getattr(s, side)
            }
            for s in sets
        },
        "gates": {g.name: {"passed": g.passed, "result": g.message} for g in manifest.gates()},
    }
    for folder in {checkpoint.model_dir, manifest.model_dir}:
        update_card(folder, **card)
    return manifest


def choose_model(
    checkpoint: CheckpointManifest,
    settings: EvalSettings,
    model: ModelSpec,
    window: int,
    device: str,
    ctx: StageContext,
    guard: tuple[dict[str, Any], dict[str, str], dict[str, dict[str, int]]] | None,
    scored: dict[tuple[str, str], Any] | None = None,
) -> ModelChoice | None:
    """Choose between the fine-tuned model and its merges with the base, on validation data only.

    Every candidate (the fine-tuned model, and :func:`embed_assets.merging.interpolate` at each
    ``merge_weights``) is scored on the checkpoint's validation split and on the guard set. A candidate keeps the
    guard when its guard nDCG@10 is within ``guard_margin`` of the base's. When the fine-tuned model keeps it, it
    is served unless a merge beats it on validation beyond noise (paired bootstrap over validation queries, 95 %
    interval above 0). When it forgets, the merge with the best validation nDCG@10 among those that keep the
    guard is served; when none does, the one that forgets least (the guard gate then says so). The test queries
    are not looked at. The guard set is the one the ``no_forgetting`` gate checks: the choice is a constraint the gate
    then verifies with its noise estimate, not an estimate of it.

    Args:
        scored: Receives each guard evaluation as ``(model folder, "guard") -> evaluate_model(...)``, for the
            caller to reuse.

    Returns:
        The :class:`ModelChoice`, or ``None`` when merging is off or there is no validation split.
    """
    import shutil

    from embed_assets.beir_io import load_beir_folder
    from embed_assets.merging import interpolate
    from embed_assets.metrics import paired_bootstrap, per_query_ndcg

    if settings.merge == "off" or not settings.merge_weights:
        return None
    if not checkpoint.val_beir:
        ctx.log.info("model merging skipped: the checkpoint has no validation split to choose on")
        return None
    val = load_beir_folder(checkpoint.val_beir, split="dev")
    cache = ctx.cache_dir("embeddings")
    merges = ctx.out_dir("beir_metrics") / "merged"

    per_query: dict[float, dict[str, float]] = {}

    def score(path: str, data: Any, weight: float | None = None) -> float:
        result = evaluate_model(path, *data, settings, model, window, device, cache)
        if weight is not None:  # validation: keep per-query nDCG@10 for the noise estimate
            per_query[weight] = per_query_ndcg(data[2], result[1], 10)
        elif scored is not None and data is guard:
            scored[(path, "guard")] = result
        return result[0]["NDCG@10"]

    base_guard = score(model.base_model, guard) if guard else float("nan")
    # The base model's row is for reference (what the gain is measured from); it is not a candidate.
    base_row = {
        "finetuned_weight": 0.0,
        "val_ndcg@10": score(model.base_model, val),
        "guard_ndcg@10": base_guard,
        "keeps_guard": True,
    }
    candidates: list[dict[str, Any]] = []
    folders = {1.0: checkpoint.model_dir}
    for weight in [*settings.merge_weights, 1.0]:
        if weight < 1.0:
            folders[weight] = str(
                interpolate(model.base_model, checkpoint.model_dir, weight, merges / f"w{weight:g}")
            )
        g = score(folders[weight], guard) if guard else float("nan")
        candidates.append(
            {
                "finetuned_weight": weight,
                "val_ndcg@10": score(folders[weight], val, weight),
                "guard_ndcg@10": g,
                "keeps_guard": bool(not guard or g >= base_guard - settings.guard_margin),
            }
        )
        ctx.log.info(
            f"merge candidate {weight:g}: validation nDCG@10 {candidates[-1]['val_ndcg@10']:.4f}"
            + (f", guard {g:.4f} (base {base_guard:.4f})" if guard else "")
        )
    tuned = candidates[-1]
    kept = [c for c in candidates if c["keeps_guard"]]
    if tuned["keeps_guard"]:
        # A merge replaces a fine-tuned model that keeps the guard only when it is better on validation beyond
        # noise: validation sets are small, and a point-estimate win there is often a loss on test.
        better = []
        for c in (c for c in kept if c is not tuned):
            _, low, _ = paired_bootstrap(
                per_query[1.0], per_query[c["finetuned_weight"]], n=settings.noise_bootstrap_samples, seed=0
            )
            if low > 0:
                better.append(c)
        if better:
            best = best_on_validation(better)
            reason = (
                f"better than the fine-tuned model on validation beyond noise (nDCG@10 {best['val_ndcg@10']:.4f} vs "
                f"{tuned['val_ndcg@10']:.4f}, 95% CI of the difference above 0), and keeps the guard"
            )
        else:
            best = tuned
            reason = (
                "the fine-tuned model keeps the guard"
                + (f" (within {100 * settings.guard_margin:g} points of the base)" if guard else "")
                + " and no merge is better on validation beyond noise"
            )
    elif kept:
        best = best_on_validation(kept)
        reason = (
            f"the fine-tuned model forgets (guard {tuned['guard_ndcg@10']:.4f} vs base {base_guard:.4f}): the best "
            f"validation nDCG@10 ({best['val_ndcg@10']:.4f}) of the merges that keep the guard within "
            f"{100 * settings.guard_margin:g} points"
        )
    else:
        best = max(candidates, key=lambda c: (c["guard_ndcg@10"], c["val_ndcg@10"]))
        reason = "no candidate keeps the guard: the one that forgets least"
    weight = best["finetuned_weight"]
    for w, folder in folders.items():
        if w != weight and w < 1.0:
            shutil.rmtree(folder, ignore_errors=True)  # only the chosen merge is kept
    choice = ModelChoice(weight, folders[weight], reason, [base_row, *candidates])
    ctx.log.info(f"serving the {choice.label()} model: {reason}")
    return choice


def best_on_validation(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the best validation nDCG@10 (ties: the larger fine-tuned weight)."""
    return max(candidates, key=lambda c: (c["val_ndcg@10"], c["finetuned_weight"]))


def resolve_guard(guard_path: str) -> str:
    """The guard set's BEIR folder: ``"bundled"`` is the general-domain set shipped with the package."""
    if guard_path == "bundled":
        return str(BUNDLED_GUARD)
    if not Path(guard_path, "corpus.jsonl").is_file():
        raise FileNotFoundError(
            f"guard_path {guard_path!r} is not a BEIR folder (no corpus.jsonl); use 'bundled', a BEIR folder, "
            "or '' to turn the forgetting guard off"
        )
    return guard_path


def base_window(model: ModelSpec) -> int:
    """The base model's own maximum sequence length (from its config when it says, else by loading it)."""
    from embed_assets.models import load_sentence_transformer, model_window

    window = model_window(model.base_model)
    return window or int(load_sentence_transformer(model.base_model, device="cpu").max_seq_length)


def evaluate_model(
    path: str,
    corpus: dict[str, Any],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    settings: EvalSettings,
    model: ModelSpec,
    window: int,
    device: str,
    cache_dir: str | Path | None = None,
    dims: list[int] | tuple[int, ...] = (),
) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, float]]:
    """One model's metrics and run file at ``window`` tokens.

    Args:
        path: The model (folder, bundled name or hub id).
        corpus: ``{id: {"title", "text"}}``.
        queries: ``{id: text}``.
        qrels: Judgments.
        settings: Cut-offs and batch size.
        model: Prompts.
        window: Tokens per text.
        device: Torch device.
        cache_dir: Per-text embedding cache for the passages (keyed by the model's weights and window).
        dims: Matryoshka sizes to score too (nDCG@10 of the truncated, re-normalized embeddings).

    Returns:
        ``(metrics, run, {dim: nDCG@10})``.
    """
    from embed_assets.embedding_cache import EmbeddingCache, model_fingerprint
    from embed_assets.metrics import document_text, encode_and_search, evaluate
    from embed_assets.models import load_sentence_transformer

    st_model = load_sentence_transformer(path, device=device, max_seq_length=window)
    query_prompt, passage_prompt = model.prompts()
    corpus_emb = None
    if cache_dir is not None:
        cache = EmbeddingCache(cache_dir, model_fingerprint(st_model), prompt=passage_prompt, task="document")
        corpus_emb = cache.encode(
            st_model,
            [document_text(d) for d in corpus.values()],
            list(corpus),
            batch_size=settings.batch_size,
        )
    reports: list = []
    run, corpus_emb = encode_and_search(
        st_model,
        queries,
        corpus,
        top_k=max(settings.k_values),
        batch_size=settings.batch_size,
        query_prompt=query_prompt,
        corpus_prompt=passage_prompt,
        corpus_embeddings=corpus_emb,
        reports=reports,
    )
    for report in reports:  # past exact search's size: say how close the approximate index came
        logging.getLogger("embed_assets").info(
            f"evaluation of {path}: {report.index} search, recall@{report.k} {report.recall_at_k:.4f} vs exact "
            f"on {report.recall_sample} queries"
        )
    per_dim: dict[str, float] = {}
    if dims and queries:
        # Matryoshka: the first d coordinates, re-normalized, are the d-dimensional embedding.
        from embed_assets.metrics import exact_search

        q_ids = list(queries)
        q_emb = st_model.encode(
            [queries[q] for q in q_ids],
            prompt=query_prompt,
            batch_size=settings.batch_size,
            convert_to_numpy=True,
        )
        for d in sorted(set(dims), reverse=True):
            truncated = exact_search(
                q_emb[:, :d], corpus_emb[:, :d], q_ids, list(corpus), top_k=max(settings.k_values)
            )
            per_dim[str(d)] = evaluate(qrels, truncated, k_values=settings.k_values).get(
                "NDCG@10", float("nan")
            )
    return evaluate(qrels, run, k_values=settings.k_values), run, per_dim


def _merge_metrics(manifest: MetricsManifest) -> dict[str, float]:
    """The merge choice as MLflow metrics: the chosen weight, each candidate's validation and guard nDCG@10."""
    if manifest.choice is None:
        return {}
    out = {"merge/finetuned_weight": manifest.choice.weight}
    for c in manifest.choice.candidates:
        w = f"{c['finetuned_weight']:g}"
        out[f"merge/{w}/val_NDCG_at_10"] = c["val_ndcg@10"]
        if c["guard_ndcg@10"] == c["guard_ndcg@10"]:  # not NaN (no guard set)
            out[f"merge/{w}/guard_NDCG_at_10"] = c["guard_ndcg@10"]
    for s in manifest.sets:
        if s.merged:
            out[f"{s.name}/merged/NDCG_at_10"] = s.merged["NDCG@10"]
    return out


def _log_to_mlflow(
    tracker: Any, checkpoint: CheckpointManifest, manifest: MetricsManifest, ctx: StageContext
) -> MLflowInfo:
    """Log the BEIR table into the checkpoint's MLflow run (a new run if that one is not in this store)."""
    if tracker is None:
        return MLflowInfo()
    try:
        run_id = checkpoint.mlflow.run_id
        if not tracker.run_exists(run_id):
            if run_id:
                ctx.log.warning(f"the checkpoint's MLflow run {run_id} is not in {tracker!r}: new run")
            run_id = tracker.start_run(
                run_name=f"beir_metrics-{ctx.run_id[:8]}",
                tags={"dagster/run_id": ctx.run_id, "model_dir": checkpoint.model_dir},
            )
        tracker.set_tags(run_id, {"dagster/beir_metrics_run_id": ctx.run_id})
        b = manifest.bootstrap
        from embed_assets.metrics import markdown_table

        tracker.log_beir(
            run_id,
            manifest.base,
            manifest.finetuned,
            manifest.primary.deltas,
            markdown_table(manifest.primary.deltas),
            extra={
                "ndcg_at_10_delta_mean": b.delta,
                "ndcg_at_10_delta_ci95_low": b.ci95_low,
                "ndcg_at_10_delta_ci95_high": b.ci95_high,
                "eval_queries": manifest.primary.queries,
                "eval_passages": manifest.primary.passages,
                "eval_max_seq_length": manifest.eval_max_seq_length,
                **_merge_metrics(manifest),
                **{
                    f"{s.name}/{side}/NDCG_at_10": getattr(s, side)["NDCG@10"]
                    for s in manifest.sets
                    if s is not manifest.primary
                    for side in ("base", "finetuned")
                },
            },
            source=f"dagster run {ctx.run_id}",
        )
        tracker.finish(run_id)
        return MLflowInfo.from_link(tracker.link(run_id))
    except Exception as e:  # the metrics are computed and saved; tracking trouble is reported, not fatal
        ctx.log.warning(f"MLflow logging of the BEIR metrics failed: {e}")
        return MLflowInfo(error=str(e)[:500])
