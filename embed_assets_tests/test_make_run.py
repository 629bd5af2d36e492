"""`make run` as a user runs it (the README's first command), on a tiny corpus through its CONFIG hook."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from embed_assets_tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    not (REPO / ".venv" / ".installed").is_file(),
    reason="`make run` uses the project's .venv (`make install`)",
)
def test_make_run_ends_with_a_summary_of_numbers_gates_and_places(tmp_path: Path, tiny_corpus: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "ops:\n"
        f"  corpus: {{config: {{path: '{tiny_corpus}'}}}}\n"
        "  checkpoint: {config: {max_steps: 4, batch_size: 8, max_seq_length: 64}}\n",
        encoding="utf-8",
    )
    home = tmp_path / "dagster_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "EMBED_ASSETS_HOME"))}
    proc = subprocess.run(
        ["make", "--no-print-directory", "run", f"CONFIG={config}", f"DAGSTER_HOME={home}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = proc.stdout
    served = re.search(r"\(pid (\d+);", out)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
        summary = out[out.index("== embed_assets: summary of the last run") :]
        assert re.search(r"generated_test\s+nDCG@10 base [01]\.\d{4} -> fine-tuned [01]\.\d{4}", summary)
        assert re.search(r"guard\s+nDCG@10 base [01]\.\d{4}", summary)  # the forgetting guard, on by default
        for gate in (
            "no_document_leakage",
            "finetuned_not_worse_than_base",
            "no_forgetting",
            "onnx_fp32_parity",
        ):
            assert f"gate {gate}: " in summary
        assert f"model:   {home}" in summary and f"ONNX:    {home}" in summary
        assert re.search(
            r"served:  http://127\.0\.0\.1:\d+/v1/embeddings \(pid \d+; `make stop-service`", summary
        )
        assert "UI:      `make dev`, then http://127.0.0.1:3000" in summary
        assert "MLflow run " in summary and "`make mlflow`" in summary
        # The trainer's log dicts and progress bars never reach the console.
        assert "{'loss'" not in out + proc.stderr and "it/s]" not in out
        # `make stop-service` stops the server this run recorded.
        stop = subprocess.run(
            ["make", "--no-print-directory", "stop-service", f"DAGSTER_HOME={home}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stop.returncode == 0 and f"pid {served.group(1)}" in stop.stdout and ": stopped" in stop.stdout
        served = None
    finally:
        if served:
            from embed_assets.serving.process import stop_server

            stop_server(int(served.group(1)))
