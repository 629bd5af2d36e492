"""One run config per stage, with DESIGN.md's defaults; every field is described for the launchpad."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator, model_validator

from embed_assets.sdg.settings import SDGSettings

#: The bundled sample corpus (Python Language Reference topics, PSF License v2).
SAMPLE_CORPUS = str(Path(__file__).resolve().parents[2] / "sample_corpus")


class CorpusConfig(dg.Config):
    path: str = Field(default=SAMPLE_CORPUS, description="Folder of documents, read recursively.")
    extensions: list[str] = Field(default=[".txt", ".md"], description="File suffixes to read.")
    exclude_globs: list[str] = Field(
        default=["README.md", "LICENSE*"],
        description="File-name patterns to skip (not reported as rejected).",
    )
    max_file_bytes: int = Field(
        default=5_000_000, gt=0, description="Larger files are rejected with a reason."
    )


class ChunkingConfig(dg.Config):
    sentences_per_chunk: int = Field(default=5, ge=1, description="Consecutive sentences per passage.")
    passage_max_length: int = Field(
        default=512, ge=16, description="Max tokens per passage (model tokenizer)."
    )


class SDGConfig(SDGSettings, dg.Config):
    """The synthetic_qa run config: every field, default, description and validator is SDGSettings'."""


class SplitConfig(dg.Config):
    train_ratio: float = Field(default=0.8, ge=0, le=1, description="Share of documents for training.")
    val_ratio: float = Field(default=0.1, ge=0, le=1, description="Share of documents for validation.")
    test_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Share of documents for the BEIR test set."
    )
    small_data_threshold: int = Field(default=1000, ge=0, description="Below this many pairs, split 80/0/20.")
    seed: int = Field(default=42, description="Split seed (documents are placed by a seeded hash).")
    regenerate_eval: bool = Field(default=False, description="Rebuild the frozen eval_beir/ folder.")

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitConfig:
        from embed_assets.prep import check_ratios

        check_ratios((self.train_ratio, self.val_ratio, self.test_ratio))
        return self


class MiningConfig(dg.Config):
    hard_negatives_to_mine: int = Field(default=5, ge=1, description="Negatives kept per query.")
    range_min: int = Field(default=0, ge=0, description="Skip the top range_min candidates.")
    range_max: int | None = Field(default=None, description="Consider only the top range_max candidates.")
    relative_margin: float | None = Field(
        default=0.05, description="'perc' margin: drop candidates scoring above (1 - m) × min positive score."
    )
    absolute_margin: float | None = Field(
        default=None, description="Drop candidates above positive − margin."
    )
    sampling_strategy: str = Field(default="top", description="'top' (hardest) or 'random' within the range.")
    use_faiss: str = Field(default="auto", description="'auto', 'yes' or 'no' (exact matmul search).")
    batch_size: int = Field(default=64, ge=1, description="Encoding batch size.")

    @model_validator(mode="after")
    def _check(self) -> MiningConfig:
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin must be in [0, 1), got {self.relative_margin}")
        if self.absolute_margin is not None and not 0 <= self.absolute_margin < 2:
            raise ValueError(f"absolute_margin must be in [0, 2) (cosine scale), got {self.absolute_margin}")
        if self.sampling_strategy not in ("top", "random"):
            raise ValueError(f"sampling_strategy must be 'top' or 'random', got {self.sampling_strategy!r}")
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(
                f"range_max ({self.range_max}) must be greater than range_min ({self.range_min})"
            )
        if self.use_faiss not in ("auto", "yes", "no"):
            raise ValueError(f"use_faiss must be 'auto', 'yes' or 'no', got {self.use_faiss!r}")
        return self


class TrainingConfig(dg.Config):
    epochs: int = Field(default=0, ge=0, description="0 = by data size (≤10K rows: 2, >10K: 1).")
    negatives_per_row: int = Field(
        default=3, ge=0, description="Hardest mined negatives per training row (plus in-batch negatives)."
    )
    batch_size: int = Field(
        default=16, ge=2, description="Per-device batch (in-batch negatives scale with it)."
    )
    learning_rate: float = Field(default=1e-5, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps for linear warmup.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    max_seq_length: int = Field(default=128, ge=8, description="Tokens per text (≤ the model's maximum).")
    max_steps: int = Field(default=-1, description="Stop after this many steps (-1 = by epochs).")
    loss: str = Field(default="mnrl", description="'mnrl' or 'cached_mnrl' (large effective batches).")
    cached_mini_batch_size: int = Field(default=32, ge=1, description="cached_mnrl mini-batch size.")
    mixed_precision: str = Field(
        default="auto", description="'auto' (bf16/fp16 on CUDA), 'no', 'fp16', 'bf16'."
    )
    eval_steps: int = Field(
        default=50, ge=1, description="Validation every N steps (when a val split exists)."
    )
    save_steps: int = Field(default=50, ge=1, description="Checkpoint every N steps (resume point).")
    seed: int = Field(default=42, description="Training seed.")
    num_gpus: int = Field(
        default=1,
        ge=1,
        description="Data-parallel GPUs: > 1 launches that many torchrun workers (DDP) when CUDA has them; "
        "batch_size is per GPU (see docs/multi-gpu.md).",
    )

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        if v not in ("mnrl", "cached_mnrl"):
            raise ValueError(f"loss must be 'mnrl' or 'cached_mnrl', got {v!r}")
        return v


class EvalConfig(dg.Config):
    k_values: list[int] = Field(default=[1, 5, 10, 100], description="Cut-offs for every metric.")
    batch_size: int = Field(default=64, ge=1, description="Encoding batch size.")
    noise_bootstrap_samples: int = Field(
        default=1000, ge=100, description="Paired bootstrap draws for the check."
    )


class ExportConfig(dg.Config):
    opset: int = Field(default=17, ge=17, description="ONNX opset (≥ 17).")
    quantize_int8: bool = Field(default=True, description="Also export a dynamically quantized int8 model.")
    served_model_name: str = Field(default="embed-assets", description="Model id the service reports.")


class TensorRTConfig(dg.Config):
    fp16: bool = Field(default=True, description="Build an fp16 engine.")


class ServiceConfig(dg.Config):
    mode: str = Field(
        default="local",
        description="'local' (this project's server on loopback), 'docker' or 'kubernetes' (NIM manifests).",
    )
    host: str = Field(default="127.0.0.1", description="local: bind address.")
    port: int = Field(default=0, ge=0, description="local: port (0 = a free port).")
    variant: str = Field(
        default="fp32", description="'fp32' or 'int8' (int8 only if it passed the parity gate)."
    )
    api_key_env: str = Field(default="", description="Name of an env var holding a bearer token to require.")
    apply: bool = Field(default=False, description="docker/kubernetes: apply the rendered manifest.")
    endpoint_url: str = Field(
        default="", description="docker/kubernetes: URL of the deployed NIM to evaluate."
    )
    ready_timeout_s: float = Field(
        default=900.0, gt=0, description="docker/kubernetes: wait this long for ready."
    )

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("local", "docker", "kubernetes"):
            raise ValueError(f"mode must be 'local', 'docker' or 'kubernetes', got {v!r}")
        return v
