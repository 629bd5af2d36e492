"""Entry points the reliability tests run in a child process, so they can kill it with SIGKILL part-way.

``python workers.py sdg BASE_URL CACHE_DIR OUT_JSONL``
    LLM synthetic-QA generation (:class:`~embed_assets.sdg.llm.LLMQAGenerator` through
    :func:`~embed_assets.sdg.runner.run_generation`) of :data:`SDG_DOCS` against an OpenAI-compatible endpoint.
    The dedup embedder is a deterministic hashing embedder (no torch import), so the child starts in about a
    second and two runs produce identical records.

``python workers.py train WORK_DIR OUT_DIR REPORT_JSON``
    Tiny fine-tuning of the bundled model (6 steps, checkpoint every 2 steps, batch 4, 32 tokens).

``python workers.py write PATH ROWS``
    ``write_jsonl`` of ``ROWS`` large rows, slowly, printing ``started`` once the temporary file exists.

Every command prints one JSON line on stdout when it finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Six small documents of two chunks each (12 bundles of one chunk: 36 LLM calls for a clean run).
SDG_DOCS: dict[str, list[str]] = {
    f"doc{d}.md": [
        f"Document {d} describes the harbor of town {d}. Ships arrive there every {d + 2} days. "
        f"The pier was rebuilt in {1900 + 7 * d}.",
        f"The lighthouse of town {d} is {20 + d} meters tall. Its lamp was electrified in {1920 + 3 * d}. "
        f"Keepers lived there until {1960 + d}.",
    ]
    for d in range(6)
}

TRAIN_SETTINGS = {
    "max_steps": 6,
    "save_steps": 2,
    "batch_size": 4,
    "max_seq_length": 32,
    "logging_steps": 1,
    "learning_rate": 5e-5,
}


def sdg_chunks():
    from embed_assets.records import Chunk, content_hash

    return [
        Chunk(content_hash(text), doc_id, text, 3 * i, 3 * i + 3)
        for doc_id, texts in SDG_DOCS.items()
        for i, text in enumerate(texts)
    ]


def hashing_embedder(texts: list[str]):
    """Deterministic bag-of-words embeddings (64 dims, L2-normalized): same texts, same vectors, any process."""
    import numpy as np

    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int(hashlib.sha256(word.encode()).hexdigest()[:8], 16) % 64] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def run_sdg(base_url: str, cache_dir: str, out_path: str) -> dict:
    from embed_assets.sdg.cache import SDGCache
    from embed_assets.sdg.llm import LLMEndpoint, LLMQAGenerator
    from embed_assets.sdg.runner import run_generation
    from embed_assets.sdg.settings import SDGSettings
    from embed_assets.storage import write_jsonl

    settings = SDGSettings(
        generator="llm",
        num_pairs=3,
        bundle_size=1,
        max_parallel_requests=1,  # one call at a time: at most one call is in flight when the kill lands
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        timeout_s=10.0,
    )
    cache = SDGCache(cache_dir)
    key = os.environ.get("WORKER_LLM_KEY")
    endpoint = LLMEndpoint(base_url, "stub-model", key)
    with LLMQAGenerator(settings, endpoint, embedder=hashing_embedder) as gen:
        result = run_generation(gen, sdg_chunks(), cache)
    n = write_jsonl(out_path, (r.to_dict() for r in result.records))
    return {"records": n, "stats": result.stats.as_metadata(), "failed": result.stats.failed_chunk_ids}


def train_rows() -> list[dict[str, str]]:
    from embed_assets.chunking import chunk_corpus
    from embed_assets.corpus import read_corpus
    from embed_assets.sdg.offline import InverseClozeGenerator
    from embed_assets.training import training_rows

    chunks, _ = chunk_corpus(read_corpus(REPO / "sample_corpus" / "python-reference").documents[:6])
    records = InverseClozeGenerator().generate(chunks).records[:24]
    texts = {c.chunk_id: c.text for c in chunks}
    pool = list(texts.values())
    mined = [
        {
            "query": r.query,
            "positive_text": texts[r.positive_chunk_ids[0]],
            "negative_texts": [pool[(i + 3) % len(pool)], pool[(i + 7) % len(pool)]],
        }
        for i, r in enumerate(records)
    ]
    return training_rows(mined)


def run_train(work_dir: str, out_dir: str, report_path: str) -> dict:
    from dataclasses import asdict

    from embed_assets.models import BUNDLED_MODEL
    from embed_assets.stages.train import TrainSettings
    from embed_assets.storage import write_json
    from embed_assets.training import train

    callbacks = []
    pause = float(os.environ.get("WORKER_PAUSE_AFTER_SAVE_S", "0"))
    if pause > 0:
        from transformers import TrainerCallback

        class PauseAfterSave(TrainerCallback):
            """Gives the test a quiet window after each complete checkpoint, so its SIGKILL lands between
            training steps deterministically rather than in the middle of the next checkpoint's save."""

            def on_save(self, args, state, control, **kwargs):
                print(f"saved checkpoint-{state.global_step}", flush=True)
                time.sleep(pause)

        callbacks.append(PauseAfterSave())
    report = train(
        BUNDLED_MODEL, train_rows(), work_dir, out_dir, TrainSettings(**TRAIN_SETTINGS), callbacks=callbacks
    )
    out = asdict(report)
    write_json(report_path, out)
    return {"steps": report.steps, "resumed_from": report.resumed_from}


def run_write(path: str, rows: int) -> dict:
    from embed_assets.storage import write_jsonl

    payload = "x" * 10_000

    def slow_rows():
        for i in range(rows):
            if i == 10:
                print("started", flush=True)
            if i >= 10:
                time.sleep(0.01)
            yield {"i": i, "version": 2, "payload": payload}

    return {"written": write_jsonl(path, slow_rows())}


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "sdg":
        result = run_sdg(*args)
    elif command == "train":
        result = run_train(*args)
    elif command == "write":
        result = run_write(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
