"""The Dagster UI as a user sees it: a real webserver and daemon, a run launched through GraphQL, and headless
Chromium (Playwright) on the asset lineage and an asset's page. Screenshots go to ``test_artifacts/``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest

from embed_assets.launch import launch, materializations, wait
from embed_assets_tests.conftest import REPO, SAMPLE_CORPUS
from embed_assets_tests.dagster_procs import dagster_deployment, processes_in_group

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = ("atom-identifiers.txt", "power.txt", "integers.txt", "booleans.txt")
UI_TIMEOUT_MS = 90_000
#: Through the evaluation: a tiny training so that the metrics page has real numbers.
ASSETS = [
    "corpus",
    "corpus_chunks",
    "synthetic_qa",
    "split_sets",
    "mined_negatives",
    "checkpoint",
    "beir_metrics",
]
TINY_TRAINING = {"max_steps": 3, "batch_size": 8, "max_seq_length": 64}
#: Set to 1 to refresh the pictures the README shows (docs/images/) from this test's screenshots.
UPDATE_DOCS_ENV = "EMBED_ASSETS_UPDATE_DOCS_IMAGES"


def _dismiss_community_modal(page) -> None:
    """The UI greets a fresh browser profile with a 'Join the Dagster community' dialog; skip it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):
        page.get_by_role("button", name="Skip").click(timeout=10_000)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
@pytest.mark.timeout(900)
def test_asset_graph_and_metadata_in_the_ui(tmp_path: Path, artifacts_dir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in DOCS:
        shutil.copy(SAMPLE_CORPUS / "python-reference" / name, corpus / name)
    with dagster_deployment(tmp_path / "deployment") as dep:
        groups = [p.pgid for p in dep.processes]
        run_id = launch(
            dep.host,
            dep.port,
            assets=ASSETS,
            run_config={
                "ops": {
                    "corpus": {"config": {"path": str(corpus)}},
                    "checkpoint": {"config": TINY_TRAINING},
                }
            },
        )
        status = wait(dep.host, dep.port, run_id, timeout_s=900)
        assert status == "SUCCESS", dep.logs()
        chunks = materializations(dep.host, dep.port, run_id)["corpus_chunks"]["chunks"]

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(UI_TIMEOUT_MS)

                # The pipeline's lineage: every asset of the group is a node of the graph.
                page.goto(f"{dep.url}/locations/embed_assets/asset-groups/embed_pipeline")
                _dismiss_community_modal(page)
                for name in ("corpus", "corpus_chunks", "synthetic_qa", "checkpoint", "nim_service"):
                    expect(page.get_by_text(name, exact=True).first).to_be_visible()
                page.wait_for_timeout(1500)  # let the graph layout settle before the screenshot
                page.screenshot(path=str(artifacts_dir / "ui_asset_graph.png"))

                # An asset's page shows its materialization metadata.
                page.goto(f"{dep.url}/assets/corpus")
                _dismiss_community_modal(page)
                row = page.locator("tr").filter(has=page.get_by_text("documents", exact=True)).first
                expect(row.locator("td").last).to_have_text(re.compile(rf"^\s*{len(DOCS)}\s*$"))
                expect(page.get_by_text("corpus_hash", exact=True).first).to_be_visible()
                page.screenshot(path=str(artifacts_dir / "ui_asset_corpus.png"), full_page=True)

                page.goto(f"{dep.url}/assets/corpus_chunks")
                _dismiss_community_modal(page)
                row = page.locator("tr").filter(has=page.get_by_text("chunks", exact=True)).first
                expect(row.locator("td").last).to_have_text(re.compile(rf"^\s*{chunks}\s*$"))
                expect(page.get_by_text("token_histogram", exact=True).first).to_be_visible()
                page.screenshot(path=str(artifacts_dir / "ui_asset_corpus_chunks.png"), full_page=True)

                # The evaluation's base / fine-tuned / delta table is on the page itself, not behind a click.
                page.goto(f"{dep.url}/assets/beir_metrics")
                _dismiss_community_modal(page)
                table = page.locator("table").filter(has=page.get_by_text("NDCG@10", exact=True)).first
                expect(table).to_be_visible()
                for header in ("metric", "base", "finetuned", "delta"):
                    expect(table.get_by_text(header, exact=True).first).to_be_visible()
                expect(table.get_by_text("Recall@10", exact=True).first).to_be_visible()
                row = page.locator("tr").filter(has=page.get_by_text("ndcg@10_finetuned", exact=True)).first
                expect(row.locator("td").last).to_have_text(re.compile(r"^\s*0\.\d{1,4}\s*$"))  # 4 digits
                page.screenshot(path=str(artifacts_dir / "ui_asset_beir_metrics.png"), full_page=True)
            finally:
                browser.close()
    for name in (
        "ui_asset_graph.png",
        "ui_asset_corpus.png",
        "ui_asset_corpus_chunks.png",
        "ui_asset_beir_metrics.png",
    ):
        assert (artifacts_dir / name).stat().st_size > 10_000
    if os.environ.get(UPDATE_DOCS_ENV) == "1":
        images = REPO / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        for name in ("ui_asset_graph.png", "ui_asset_beir_metrics.png"):
            shutil.copy(artifacts_dir / name, images / name)
    assert not any(processes_in_group(g) for g in groups), "a webserver/daemon process outlived the test"
