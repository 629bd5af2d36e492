"""The code location as tools see it: `dg` loads it, and every asset stays a thin, documented wrapper."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from embed_assets.definitions import ALL_ASSETS
from embed_assets_tests.conftest import REPO

#: An asset body resolves config and resources, calls its stage function and emits the manifest.
MAX_ASSET_LINES = 60


def _dg(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    dg = Path(sys.executable).with_name("dg")
    if not dg.exists():
        pytest.skip("dagster-dg-cli is not installed (it is in the dev extra)")
    env = {**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": str(Path(sys.executable).parents[1])}
    return subprocess.run([str(dg), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dg_checks_and_lists_the_code_location(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    check = _dg("check", "defs", home=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    listed = _dg("list", "defs", "--json", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    defs = json.loads(listed.stdout)
    assert {a["asset_key"] for a in defs["assets"]} == {a.key.to_user_string() for a in ALL_ASSETS}
    assert "embed_pipeline" in {j["name"] for j in defs["jobs"]}
    assert {"finetuned_not_worse_than_base", "onnx_fp32_parity", "no_document_leakage"} <= {
        c["name"] for c in defs["asset_checks"]
    }


@pytest.mark.parametrize("asset", ALL_ASSETS, ids=lambda a: a.key.to_user_string())
def test_assets_are_thin_and_documented(asset) -> None:
    # a graph-backed asset (the sharded corpus_chunks): each of its ops is held to the same rule
    node = asset.node_def
    ops = [n.definition for n in node.nodes] if isinstance(node, dg.GraphDefinition) else [node]
    for op in ops:
        fn = op.compute_fn.decorated_fn
        lines = len(inspect.getsourcelines(fn)[0])
        assert lines <= MAX_ASSET_LINES, (
            f"{fn.__name__} is {lines} lines: move the logic into its stage function"
        )
        assert (fn.__doc__ or "").strip(), f"{fn.__name__} has no docstring saying what it is for"
    assert asset.descriptions_by_key[asset.key], "the docstring is the asset's description in the UI"
