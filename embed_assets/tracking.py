"""Experiment tracking with MLflow (Dagster-free).

One MLflow run per fine-tuning: the ``checkpoint`` asset opens it (params, per-step loss and eval metrics through
a ``transformers.TrainerCallback``, the loss/eval curve PNG, the model folder) and ``beir_metrics`` adds the
BEIR table of base and fine-tuned models to the same run.

The default store is local and needs no server: a SQLite database ``<artifact root>/mlflow.db`` with artifacts
under ``<artifact root>/mlartifacts``; any other tracking URI (an ``http(s)://`` MLflow server, Databricks, a
``file:`` store) is a setting. Browse a local store with the command :attr:`RunLink.ui_command` gives.

mlflow and matplotlib are imported inside the functions that need them, so importing this module is cheap.
Everything here talks to the store through an ``MlflowClient`` and explicit run ids: no global active run, so
concurrent steps (or the trainer's own integrations) cannot log into the wrong run.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "embed_assets"
#: Where ``mlflow ui`` listens by default; the run URL of a local store points there.
LOCAL_UI = "http://127.0.0.1:5000"
#: Parameter / tag keys that look like credentials are never sent to the store.
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|passw(or)?d|credential|authorization|auth)", re.I)
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")
_MAX_PARAM_VALUE = 6000  # MLflow's limit
_MAX_KEY = 250


# ------------------------------------------------------------------------------------------ URIs, names
def default_tracking_uri(artifact_root: str | Path) -> str:
    """The local default store: ``sqlite:///<artifact root>/mlflow.db`` (absolute path)."""
    return f"sqlite:///{(Path(artifact_root).expanduser().resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(tracking_uri: str, artifact_root: str | Path) -> str:
    """``tracking_uri`` if set, else :func:`default_tracking_uri`; a bare local path becomes a ``file:`` URI."""
    uri = (tracking_uri or "").strip()
    if not uri:
        return default_tracking_uri(artifact_root)
    if "://" not in uri and not uri.startswith(("sqlite:", "file:", "databricks")):
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def is_local_store(tracking_uri: str) -> bool:
    """True for stores without a tracking server (SQLite, ``file:``, a database URI such as ``postgresql://``):
    their artifacts go under the artifact root, and ``mlflow ui`` serves them for browsing."""
    if tracking_uri.lower().startswith("databricks"):  # "databricks", "databricks://profile", "databricks-uc"
        return False
    return urlsplit(tracking_uri).scheme.lower() not in ("http", "https")


def redact_uri(uri: str) -> str:
    """The URI without user/password (``https://user:pw@host`` → ``https://***@host``) for logs and metadata."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def metric_name(name: str) -> str:
    """A valid MLflow metric/param key: ``@`` → ``_at_``, other characters MLflow rejects → ``_``."""
    return _BAD_NAME_CHARS.sub("_", name.replace("@", "_at_"))[:_MAX_KEY]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to ``a/b`` keys with string values; credential-like keys are dropped.

    Args:
        params: Parameters (nested dicts allowed; ``None`` values are skipped).
        prefix: Key prefix.

    Returns:
        ``{key: value}`` ready for MLflow (values truncated to its 6000-character limit).
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        if SECRET_KEY.search(str(key)):
            continue
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{full}/"))
        elif value is not None:
            out[metric_name(full)] = str(value)[:_MAX_PARAM_VALUE]
    return out


def numeric_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``values`` under valid metric names (bools, strings and NaN/inf dropped)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[metric_name(f"{prefix}{key}")] = float(value)
    return out


# --------------------------------------------------------------------------------------------- the run link
@dataclass(frozen=True)
class RunLink:
    """Where to find a run.

    Attributes:
        run_id: MLflow run id.
        experiment_id: MLflow experiment id.
        tracking_uri: The store (credentials redacted).
        url: The run page: the server's for an ``http(s)`` store, ``mlflow ui``'s default address for a local
            one, empty when unknown (e.g. Databricks).
        ui_command: For a local store, the command that serves :attr:`url`; ``None`` for a server.
    """

    run_id: str
    experiment_id: str
    tracking_uri: str
    url: str
    ui_command: str | None

    def markdown(self) -> str:
        """A short Markdown note with the link (and the command to start the UI for a local store)."""
        if not self.url:
            return f"MLflow run `{self.run_id}` (experiment {self.experiment_id}) in `{self.tracking_uri}`"
        text = f"MLflow run [`{self.run_id}`]({self.url})"
        if self.ui_command:
            text += f"\n\nLocal store: start the UI first with\n\n```\n{self.ui_command}\n```"
        return text


def run_link(
    tracking_uri: str, experiment_id: str, run_id: str, artifact_root: str | Path | None = None
) -> RunLink:
    """Build the :class:`RunLink` of a run."""
    safe = redact_uri(tracking_uri)
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if is_local_store(tracking_uri):
        command = f"mlflow ui --backend-store-uri '{safe}' --port 5000"
        if artifact_root is not None:
            command += f" --default-artifact-root '{_artifact_location(artifact_root)}'"
        return RunLink(run_id, experiment_id, safe, f"{LOCAL_UI}/{path}", command)
    if not tracking_uri.startswith(("http://", "https://")):  # databricks: the workspace knows the URL
        return RunLink(run_id, experiment_id, safe, "", None)
    base = safe.rstrip("/")
    return RunLink(run_id, experiment_id, safe, f"{base}/{path}", None)


def _artifact_location(artifact_root: str | Path) -> str:
    return (Path(artifact_root).expanduser().resolve() / "mlartifacts").as_uri()


# ------------------------------------------------------------------------------------------------- plots
def plot_training_curves(
    loss_curve: Sequence[tuple[int, float]],
    eval_curve: Sequence[tuple[int, float]],
    path: str | Path,
    title: str = "fine-tuning",
    eval_label: str = "val nDCG@10",
) -> Path:
    """Draw the loss curve (and the eval curve, when there is one) into a PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no display).

    Args:
        loss_curve: ``(step, loss)`` points.
        eval_curve: ``(step, metric)`` points (may be empty).
        path: Output ``.png``.
        title: Figure title.
        eval_label: Y label of the eval panel.

    Returns:
        The PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if eval_curve else 1
    fig = Figure(figsize=(6.4, 2.3 * panels + 0.6), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    if loss_curve:
        steps, losses = zip(*loss_curve, strict=True)
        ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, markersize=3, color="#1f77b4")
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if eval_curve:
        steps, values = zip(*eval_curve, strict=True)
        axes[1].plot(steps, values, marker="o", markersize=3, color="#d62728")
        axes[1].set_ylabel(eval_label)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG (the Dagster UI renders it in Markdown metadata)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ------------------------------------------------------------------------------------------------ tracker
class MLflowTracker:
    """Log one fine-tuning to MLflow by run id.

    Args:
        tracking_uri: Any MLflow tracking URI; empty = the local SQLite default under ``artifact_root``.
        experiment: Experiment name (created when missing; for a local store with its artifact location
            under ``artifact_root``).
        artifact_root: The pipeline's artifact root.
        log_model: Upload the model folder as the run's ``model`` artifact.
    """

    def __init__(
        self,
        tracking_uri: str = "",
        experiment: str = DEFAULT_EXPERIMENT,
        artifact_root: str | Path = ".",
        log_model: bool = True,
    ) -> None:
        self.artifact_root = Path(artifact_root).expanduser().resolve()
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.artifact_root)
        self.experiment = experiment or DEFAULT_EXPERIMENT
        self.log_model = log_model
        self._client: Any = None
        self._experiment_id: str | None = None

    def __repr__(self) -> str:
        return f"MLflowTracker({redact_uri(self.tracking_uri)!r}, experiment={self.experiment!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            if self.tracking_uri.startswith("sqlite:"):
                self.artifact_root.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                if found.lifecycle_stage == "deleted":  # deleted in the UI: a run cannot be created in it
                    self.client.restore_experiment(found.experiment_id)
                self._experiment_id = found.experiment_id
            else:
                location = (
                    _artifact_location(self.artifact_root) if is_local_store(self.tracking_uri) else None
                )
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=location
                    )
                except Exception:  # created concurrently by another step
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
                    self._experiment_id = found.experiment_id
        return self._experiment_id

    # ---------------------------------------------------------------------------------------------- runs
    def start_run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> str:
        """Create a run (status RUNNING) and return its id."""
        clean = {k: str(v) for k, v in (tags or {}).items() if not SECRET_KEY.search(k) and v is not None}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=clean)
        return run.info.run_id

    def resume_or_start(
        self,
        marker: str | Path,
        resuming: bool,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """The run of an interrupted training when it is resumed, else a new run.

        ``marker`` (a file in the trainer's work folder) remembers the run id. When ``resuming`` (the trainer
        will continue from a checkpoint in that folder) and the remembered run exists and did not finish, that
        run is reopened, so the loss curve of the resumed training continues where it stopped.

        Returns:
            ``(run_id, reopened)``.
        """
        marker = Path(marker)
        if resuming and marker.is_file():
            previous = marker.read_text(encoding="utf-8").strip()
            if self.run_exists(previous) and self.client.get_run(previous).info.status != "FINISHED":
                self.client.update_run(previous, status="RUNNING")
                self.set_tags(previous, tags or {})
                return previous, True
        run_id = self.start_run(run_name, tags)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(run_id, encoding="utf-8")
        return run_id, False

    def run_exists(self, run_id: str | None) -> bool:
        """True when ``run_id`` names a live run of this store."""
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` / ``FAILED`` / ``KILLED`` (sets its end time)."""
        self.client.set_terminated(run_id, status=status)

    def link(self, run_id: str) -> RunLink:
        experiment_id = self.client.get_run(run_id).info.experiment_id
        local_root = self.artifact_root if is_local_store(self.tracking_uri) else None
        return run_link(self.tracking_uri, experiment_id, run_id, local_root)

    # ------------------------------------------------------------------------------------------- logging
    def log_params(self, run_id: str, params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
        """Log parameters (flattened, credential-like keys dropped); returns what was logged.

        Keys the run already has are skipped (MLflow params are write-once; a resumed training logs its
        parameters again); a differing value is reported as a warning rather than failing the run.
        """
        from mlflow.entities import Param

        flat = flatten_params(params, prefix)
        existing = self.client.get_run(run_id).data.params
        for key in [k for k in flat if k in existing]:
            if existing[key] != flat[key]:
                logger.warning(
                    "MLflow param %s already %r in run %s; not changed to %r",
                    key,
                    existing[key],
                    run_id,
                    flat[key],
                )
            del flat[key]
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100], synchronous=True)
        return flat

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            if not SECRET_KEY.search(key) and value is not None:
                self.client.set_tag(run_id, key, str(value))

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, Any], step: int | None = None, prefix: str = ""
    ) -> dict[str, float]:
        """Log the finite numbers of ``metrics`` (names made MLflow-safe); returns what was logged."""
        import time

        from mlflow.entities import Metric

        values = numeric_metrics(metrics, prefix)
        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step or 0) for k, v in values.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000], synchronous=True)
        return values

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_model_dir(self, run_id: str, model_dir: str | Path, artifact_path: str = "model") -> bool:
        """Upload the model folder (skipped when ``log_model`` is off); returns whether it was uploaded."""
        if not self.log_model:
            return False
        self.client.log_artifacts(run_id, str(model_dir), artifact_path)
        return True

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_beir(
        self,
        run_id: str,
        base: Mapping[str, float],
        tuned: Mapping[str, float],
        rows: Sequence[Mapping[str, Any]],
        table_md: str = "",
        extra: Mapping[str, Any] | None = None,
        source: str = "",
    ) -> dict[str, float]:
        """Log BEIR metrics of base and fine-tuned models, their deltas and the comparison table.

        Metrics go under ``beir/base/``, ``beir/finetuned/`` and ``beir/delta/`` (``NDCG@10`` →
        ``NDCG_at_10``); the table is stored as ``beir/metrics_table.json`` (MLflow's table artifact, shown in
        the run's artifact view; a later evaluation of the same run appends its rows, told apart by the
        ``source`` column), ``beir/metrics.json`` and ``beir/metrics.md``.

        Returns:
            The metrics logged.
        """
        logged = self.log_metrics(run_id, base, prefix="beir/base/")
        logged |= self.log_metrics(run_id, tuned, prefix="beir/finetuned/")
        logged |= self.log_metrics(
            run_id,
            {r["metric"]: r["delta"] for r in rows if r.get("delta") is not None},
            prefix="beir/delta/",
        )
        if extra:
            logged |= self.log_metrics(run_id, extra, prefix="beir/")
        table = {
            "source": [source] * len(rows),
            "metric": [r["metric"] for r in rows],
            "base": [float(r["base"]) for r in rows],
            "finetuned": [float(r["tuned"]) for r in rows],
            "delta": [float(r["delta"]) for r in rows],
        }
        self.client.log_table(run_id, data=table, artifact_file="beir/metrics_table.json")
        self.log_dict(
            run_id, {"base": dict(base), "finetuned": dict(tuned), "deltas": list(rows)}, "beir/metrics.json"
        )
        if table_md:
            self.log_text(run_id, table_md, "beir/metrics.md")
        return logged

    # ------------------------------------------------------------------------------------------ callback
    def callback(self, run_id: str) -> Any:
        """A ``transformers.TrainerCallback`` logging every trainer log (loss, learning rate, grad norm, eval
        metrics, final runtime figures) at its global step, from the main process only.

        Tracking errors are logged as warnings and never stop the training.
        """
        return make_callback(self, run_id)


def make_callback(tracker: MLflowTracker, run_id: str) -> Any:
    """See :meth:`MLflowTracker.callback`."""
    from transformers import TrainerCallback

    class MLflowCallback(TrainerCallback):
        def __init__(self) -> None:
            self.failed = False
            self.logged_points = 0

        def _safe(self, what: str, fn, *args, **kwargs) -> None:
            if self.failed:
                return
            try:
                fn(*args, **kwargs)
            except Exception as e:  # never let tracking kill a training run
                self.failed = True
                logger.warning(
                    "MLflow %s failed (%s); tracking disabled for the rest of this training", what, e
                )

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                params = {
                    "max_steps": state.max_steps,
                    "num_train_epochs": args.num_train_epochs,
                    "world_size": args.world_size,
                    "train_batch_size_total": args.train_batch_size
                    * args.world_size
                    * args.gradient_accumulation_steps,
                    "device": str(args.device),
                }
                self._safe("param logging", tracker.log_params, run_id, params, "trainer/")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            # eval_val_cosine_ndcg@10 -> eval/val_cosine_ndcg_at_10; loss -> train/loss; the end-of-training
            # summary keeps its own names (train/train_loss, train/train_runtime) so it never mixes with the curve.
            values = {
                (f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in logs.items()
            }
            self._safe("metric logging", tracker.log_metrics, run_id, values, state.global_step)
            self.logged_points += 1

    return MLflowCallback()
