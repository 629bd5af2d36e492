"""Bad configuration is rejected with a message naming the field, before the stage it configures does any work.

Dagster validates run config against the schema (types, unknown keys) before a run starts; the range and
cross-field rules of the stage configs are pydantic validators, which Dagster runs when the step builds its
config object, i.e. before the asset body runs.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from pydantic import ValidationError

from embed_assets.definitions import (
    corpus,
    corpus_chunks,
    mined_negatives,
    pipeline_resources,
    split_sets,
    synthetic_qa,
)
from embed_assets.defs.mining import MiningConfig
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel, LLMResource
from embed_assets.defs.split import SplitConfig
from embed_assets.defs.training import TrainingConfig
from embed_assets.models import BUNDLED_MODEL, resolve_model_path

UPSTREAM = [corpus, corpus_chunks, synthetic_qa, split_sets, mined_negatives]


@pytest.fixture(scope="module")
def materialized(tmp_path_factory: pytest.TempPathFactory):
    """corpus → split_sets materialized once (offline generator); tests then run single steps on top."""
    tmp = tmp_path_factory.mktemp("config")
    docs = tmp / "docs"
    docs.mkdir()
    for d in range(4):
        (docs / f"d{d}.txt").write_text(
            f"Town {d} has a harbor that was rebuilt after the storm of {1900 + d}. "
            f"Ships from the northern islands arrive there every {d + 2} days in summer. "
            f"The old lighthouse of town {d} still guides the fishing boats at night."
        )
    instance = dg.DagsterInstance.ephemeral()
    resources = pipeline_resources(ArtifactStore(root=str(tmp / "artifacts")), llm=LLMResource())
    run_config = {"ops": {"corpus": {"config": {"path": str(docs)}}}}
    result = dg.materialize(UPSTREAM[:4], instance=instance, resources=resources, run_config=run_config)
    assert result.success
    return instance, resources, run_config


def _step(materialized, asset, config: dict) -> None:
    instance, resources, _ = materialized
    ops = {asset.key.path[-1]: {"config": config}}
    dg.materialize(
        UPSTREAM, instance=instance, resources=resources, run_config={"ops": ops}, selection=[asset]
    )


def _count(instance: dg.DagsterInstance, asset: str) -> int:
    return len(instance.fetch_materializations(dg.AssetKey(asset), limit=100).records)


def test_split_ratios_not_summing_to_one(materialized) -> None:
    with pytest.raises(
        ValidationError, match=r"split ratios must sum to 1, got \[0\.5, 0\.1, 0\.1\] \(sum 0\.7000\)"
    ):
        SplitConfig(train_ratio=0.5, val_ratio=0.1, test_ratio=0.1)
    before = _count(materialized[0], "split_sets")
    with pytest.raises(ValidationError, match=r"SplitConfig\n.*split ratios must sum to 1"):
        _step(materialized, split_sets, {"train_ratio": 0.7, "val_ratio": 0.2, "test_ratio": 0.2})
    assert _count(materialized[0], "split_sets") == before  # nothing written


def test_split_ratio_out_of_range(materialized) -> None:
    with pytest.raises(ValidationError) as info:
        SplitConfig(train_ratio=1.5, val_ratio=0.0, test_ratio=-0.5)
    fields = {e["loc"][0]: e["msg"] for e in info.value.errors()}
    assert fields == {
        "train_ratio": "Input should be less than or equal to 1",
        "test_ratio": "Input should be greater than or equal to 0",
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"relative_margin": 1.5}, r"relative_margin must be in \[0, 1\), got 1\.5"),
        ({"relative_margin": -0.05}, r"relative_margin must be in \[0, 1\), got -0\.05"),
        (
            {"relative_margin": None, "absolute_margin": 2.5},
            r"absolute_margin must be in \[0, 2\) .*got 2\.5",
        ),
        ({"range_min": 10, "range_max": 5}, r"range_max \(5\) must be greater than range_min \(10\)"),
    ],
)
def test_mining_margin_out_of_range(materialized, config: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MiningConfig(**config)
    before = _count(materialized[0], "mined_negatives")
    with pytest.raises(ValidationError, match=message):  # before the model is even loaded
        _step(materialized, mined_negatives, config)
    assert _count(materialized[0], "mined_negatives") == before


def test_wrong_types_and_unknown_fields_are_rejected_before_the_run_starts(materialized) -> None:
    instance = materialized[0]
    runs_before = len(instance.get_run_records())
    with pytest.raises(dg.DagsterInvalidConfigError) as info:
        _step(materialized, mined_negatives, {"relative_margin": "high"})
    assert "root:ops:mined_negatives:config:relative_margin" in str(info.value)
    assert 'Value "high"' in str(info.value)
    with pytest.raises(dg.DagsterInvalidConfigError, match=r'unexpected config entry "margin"'):
        _step(materialized, mined_negatives, {"margin": 0.1})
    with pytest.raises(dg.DagsterInvalidConfigError, match=r"root:ops:split_sets:config:train_ratio"):
        _step(materialized, split_sets, {"train_ratio": [0.8]})
    assert len(instance.get_run_records()) == runs_before  # no run was even created


def test_training_config_ranges() -> None:
    with pytest.raises(ValidationError) as info:
        TrainingConfig(batch_size=1, warmup_ratio=1.0, loss="triplet")
    fields = {e["loc"][0] for e in info.value.errors()}
    assert fields == {"batch_size", "warmup_ratio", "loss"}
    # a Literal option lists every choice
    assert "Input should be 'mnrl', 'cached_mnrl', 'gist' or 'cached_gist'" in str(info.value)
    # 0 is the base model's window; a window of a few tokens stays refused (the bound before 0 meant that)
    with pytest.raises(ValidationError, match=r"max_seq_length must be 0 .* or at least 8 tokens; got 4"):
        TrainingConfig(max_seq_length=4)
    assert TrainingConfig(max_seq_length=0).max_seq_length == 0


@pytest.mark.slow  # loads torch and the model
def test_sequence_length_over_the_model_maximum_is_rejected_before_training(tmp_path: Path) -> None:
    """TrainingConfig cannot know the model's limit (it accepts 100000); the model load rejects it, before the
    trainer starts, so no checkpoint or model folder is written."""
    from embed_assets.stages.train import TrainSettings
    from embed_assets.training import train

    assert TrainingConfig(max_seq_length=100_000).max_seq_length == 100_000
    rows = [{"anchor": "q", "positive": "p", "negative_1": "n"}] * 4
    with pytest.raises(ValueError) as info:
        train(
            BUNDLED_MODEL, rows, tmp_path / "work", tmp_path / "model", TrainSettings(max_seq_length=100_000)
        )
    assert str(info.value) == (
        "max_seq_length=100000 exceeds the model's maximum of 512 positions (bundled:all-MiniLM-L6-v2); lower it."
    )
    assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()


def test_unknown_model_path_message_names_the_value() -> None:
    """``resolve_model_path`` names the bad value; the resource validator (next test) surfaces it at
    configuration time, before any step runs."""
    with pytest.raises(
        FileNotFoundError, match=r"base_model='/nope' is neither an existing folder nor a Hugging"
    ):
        resolve_model_path("/nope")


def test_unknown_model_path_is_rejected_when_the_resource_is_configured() -> None:
    with pytest.raises(ValidationError, match="/nope"):
        EmbeddingModel(base_model="/nope")
