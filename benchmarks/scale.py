"""Scale benchmark: how the cheap stages' cost grows with the corpus, what a re-run costs, and search at size.

Two parts, all through the product's own code:

1. ``pipeline`` (per corpus size): a corpus generated from real English text (Python standard-library
   docstrings, Debian package documentation and license texts on this machine; ``--words`` words a document,
   sentences drawn with a fixed seed) is materialized through Dagster's real machinery (``dg.execute_job`` of
   the real assets ``corpus`` → ``corpus_chunks`` → ``synthetic_qa`` → ``split_sets`` with the code location's
   resources, a temporary instance and artifact root) on the project's multiprocess executor, as the UI
   launches the job: every step in its own process, two at a time. Printed per stage: wall time (first
   STEP_START → last STEP_SUCCESS from the event log; ``corpus_chunks`` spans its plan, shard and merge steps,
   the shards two in parallel) and peak RSS (the largest high-water mark among the stage's step processes). Then an unchanged re-run and a re-run
   after 1 % of the documents were edited (one sentence appended), each with the artifact root's disk growth
   (distinct inodes: a hard link to an unchanged file costs nothing). The growth exponent of each stage is the
   least-squares slope of log(time) over log(documents) across the sizes run.
2. ``search``: ``--search-passages`` real-text passages (distinct pairs of random sentences) and
   ``--search-queries`` queries (single sentences not among the passages). The sentences (``--search-text``)
   are part 1's (~19,000: at a million passages each recurs in ~100 of them, so the neighbourhoods are crowds
   of near-duplicates, a worst case for an approximate index) or, by default, those plus the installed
   packages' docstrings (~300,000). They are embedded with the bundled model truncated to
   ``--search-max-tokens`` tokens, by the product's int8 ONNX export by default (so a million passages embed in
   under an hour on a CPU; the vectors are still the model's vectors of real text), cached in the work folder
   (a resumable run). Exact search (:func:`embed_assets.search.exact_topk`) against each FAISS index of
   ``--search-indexes`` (IVF and HNSW, what ``use_faiss: auto`` chooses from past 100,000 passages, see
   :func:`embed_assets.search.auto_index`; :func:`embed_assets.search.ann_search`, calibrated to recall@10 ≥ 0.99 on a query sample), alternating
   which goes first over ``--repeats`` rounds: recall@10 over every query and the search-time ratios.

Usage::

    python benchmarks/scale.py --docs 1000,10000                 # ~25 min on 2 cores
    python benchmarks/scale.py --parts search --search-passages 1000000   # resumable embedding blocks
    python benchmarks/scale.py --docs 100000 --work-dir /big/disk  # resumable: the corpus is generated once
    python benchmarks/scale.py --docs 100000 --stages corpus,corpus_chunks   # chunking only (~15 min)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("corpus", "corpus_chunks", "synthetic_qa", "split_sets")
#: ``--stages`` reaches the worker and its step processes (which rebuild the job) through the environment.
STAGES_ENV = "EMBED_ASSETS_SCALE_STAGES"


def selected_stages() -> tuple[str, ...]:
    """The stages this run materializes (``--stages``; all four by default), in pipeline order."""
    chosen = set(filter(None, os.environ.get(STAGES_ENV, ",".join(STAGES)).split(",")))
    if unknown := chosen - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in chosen)


EDIT_SHARE = 0.01
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# ------------------------------------------------------------------------------------------ the text pool
def _docstrings(library: str = "stdlib") -> list[str]:
    """Docstrings of the modules, classes and functions of the standard library (``"stdlib"``) or of the
    installed packages (``"purelib"``: this environment's site-packages), parsed, never imported."""
    import sysconfig

    out = []
    for path in sorted(Path(sysconfig.get_paths()[library]).rglob("*.py")):
        if (
            "test" in path.parts
            or "tests" in path.parts
            or (library == "stdlib" and "site-packages" in path.parts)
        ):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


def _debian_texts() -> list[str]:
    texts = []
    for folder, pattern in (("/usr/share/common-licenses", "*"), ("/usr/share/doc", "*/copyright")):
        for path in sorted(Path(folder).glob(pattern)):
            if path.is_file() and path.stat().st_size < 2_000_000:
                texts.append(path.read_text(encoding="utf-8", errors="ignore"))
    return texts


def sentence_pool(with_packages: bool = False) -> list[str]:
    """Distinct prose sentences of 6-60 words from the texts above (~19,000); ``with_packages`` adds the
    docstrings of the installed packages (~300,000 in all with the locked dependencies)."""
    seen: dict[str, None] = {}
    texts = _docstrings() + _debian_texts() + (_docstrings("purelib") if with_packages else [])
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            flat = " ".join(paragraph.split())
            for sentence in _SENTENCE.split(flat):
                words = sentence.split()
                if 6 <= len(words) <= 60 and sentence[-1:] in ".!?" and sum(w.isalpha() for w in words) > 4:
                    seen.setdefault(sentence, None)
    return list(seen)


def generate_corpus(folder: Path, n_docs: int, words: int, pool: list[str], seed: int = 0) -> None:
    """``n_docs`` documents of about ``words`` words, sentences drawn from ``pool`` (resumable: existing
    documents are kept)."""
    for i in range(n_docs):
        path = folder / f"{i // 1000:04d}" / f"doc{i:07d}.txt"
        if path.exists():
            continue
        rng = random.Random(seed * 10_000_019 + i)
        sentences, n = [], 0
        while n < words:
            s = pool[rng.randrange(len(pool))]
            sentences.append(s)
            n += len(s.split())
        paragraphs = [" ".join(sentences[j : j + 6]) for j in range(0, len(sentences), 6)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Document {i}\n\n" + "\n\n".join(paragraphs) + "\n", encoding="utf-8")


def edit_share(folder: Path, share: float, pool: list[str], round_: int) -> int:
    """Append one sentence to every ``1/share``-th document; returns how many were edited."""
    files = sorted(folder.rglob("*.txt"))
    step = max(1, round(1 / share))
    for path in files[::step]:
        with path.open("a", encoding="utf-8") as f:
            f.write(pool[(zlib.crc32(path.name.encode()) + round_) % len(pool)] + "\n")
    return len(files[::step])


def disk_bytes(root: Path) -> int:
    """Bytes of the distinct files under ``root`` (a hard-linked file counts once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# ------------------------------------------------------------------------------------ part 1, one size
def scale_job():
    """The cheap stages as a job on the project's multiprocess executor (module level: Dagster reconstructs
    it in every step process). The artifact root comes from ``$EMBED_ASSETS_HOME``."""
    import dagster as dg

    from embed_assets.definitions import ALL_ASSETS, pipeline_resources
    from embed_assets.defs.jobs import build_executor
    from embed_assets.defs.resources import ArtifactStore

    job = dg.define_asset_job(
        "scale", selection=list(selected_stages()), executor_def=build_executor("multiprocess")
    )
    return dg.Definitions(
        assets=ALL_ASSETS, jobs=[job], resources=pipeline_resources(ArtifactStore())
    ).resolve_job_def("scale")


class StepPeaks:
    """Peak RSS (``VmHWM``) of every process below this one, polled: each step runs in its own process."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._interval = interval

    def __enter__(self) -> StepPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from benchmarks.run_all import _process_tree

        while not self._stop.wait(self._interval):
            for pid in _process_tree(os.getpid())[1:]:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peaks[pid] = max(self.peaks.get(pid, 0), int(line.split()[1]))
                except OSError:
                    pass


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Materialize the cheap stages three times (first, unchanged, 1 % edited) through the multiprocess
    executor, every step in its own process (as the UI launches the job)."""
    import dagster as dg

    from benchmarks.pipeline import _instance

    work = Path(args.size_dir)
    corpus_dir, artifacts = work / "docs", work / "artifacts"
    os.environ["EMBED_ASSETS_HOME"] = str(artifacts)  # the step processes inherit it
    run_config = {"ops": {"corpus": {"config": {"path": str(corpus_dir), "extensions": [".txt"]}}}}
    instance = _instance("local", work / "dagster_home")
    pool = sentence_pool() if args.edit else []
    out: dict[str, Any] = {"runs": {}}
    for label in ("first", "unchanged", "edited"):
        if label == "edited":
            out["edited_docs"] = edit_share(corpus_dir, EDIT_SHARE, pool, 1)
        before = disk_bytes(artifacts) if artifacts.exists() else 0
        begin = time.time()
        with StepPeaks() as peaks:
            result = dg.execute_job(dg.reconstructable(scale_job), instance=instance, run_config=run_config)
        end = time.time()
        if not result.success:
            raise RuntimeError(f"{label} run failed")
        stages = _stage_numbers(instance, result.run_id, peaks.peaks)
        meta = {
            stage: {
                k: getattr(v, "value", v)
                for k, v in instance.get_latest_materialization_event(
                    dg.AssetKey(stage)
                ).asset_materialization.metadata.items()
            }
            for stage in selected_stages()
        }
        out["runs"][label] = {
            "total_seconds": end - begin,
            "stages": stages,
            "disk_added_mib": (disk_bytes(artifacts) - before) / 2**20,
            "chunks": meta["corpus_chunks"]["chunks"],
            "documents": meta["corpus"]["documents"],
            "pairs": meta.get("synthetic_qa", {}).get("pairs"),
            "shards": f"{meta['corpus_chunks']['shards_unchanged']}/{meta['corpus_chunks']['shards']} unchanged, "
            f"{meta['corpus_chunks'].get('shards_cut_in_merge_step', 0)} cut in the merge step",
        }
        print(f"[{label}] {json.dumps(out['runs'][label])}", file=sys.stderr, flush=True)
        if not args.edit and label == "unchanged":
            break
    instance.dispose()
    return out


def _stage_numbers(instance: Any, run_id: str, peaks: dict[int, int]) -> dict[str, dict[str, float]]:
    """Per stage: wall time (first STEP_START to last STEP_SUCCESS of its steps) and the largest peak RSS
    of its step processes."""
    spans: dict[str, list[float]] = {}
    pids: dict[str, list[int]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        stage = entry.step_key.split(".", 1)[0]
        if event.event_type_value == "STEP_START":
            span = spans.setdefault(stage, [entry.timestamp, entry.timestamp])
            span[0] = min(span[0], entry.timestamp)
            pids.setdefault(stage, []).append(event.pid)
        elif event.event_type_value == "STEP_SUCCESS":
            spans[stage][1] = max(spans[stage][1], entry.timestamp)
    return {
        stage: {
            "seconds": spans[stage][1] - spans[stage][0],
            "peak_mib": max((peaks.get(pid, 0) for pid in pids[stage]), default=0) / 1024,
            "steps": len(pids[stage]),
        }
        for stage in selected_stages()
    }


def run_size(n_docs: int, args: argparse.Namespace) -> dict[str, Any]:
    stages = selected_stages()
    size_dir = Path(args.work_dir) / (f"docs-{n_docs}" + ("" if stages == STAGES else "-" + "-".join(stages)))
    if (size_dir / "result.json").exists() and not args.fresh:
        return json.loads((size_dir / "result.json").read_text())
    pool = sentence_pool()
    print(
        f"generating {n_docs} documents of ~{args.words} words ({len(pool)} distinct sentences)", flush=True
    )
    generate_corpus(size_dir / "docs", n_docs, args.words, pool)
    for stale in ("artifacts", "dagster_home"):
        subprocess.run(["rm", "-rf", str(size_dir / stale)], check=True)
    cmd = [sys.executable, __file__, "--worker", "--size-dir", str(size_dir)]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"worker for {n_docs} documents failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(docs=n_docs, stages=list(stages), wall_seconds=time.time() - started, load=os.getloadavg())
    # the edit was made in the worker: put the documents back for the next run of this benchmark
    subprocess.run(["rm", "-rf", str(size_dir / "docs")], check=True)
    (size_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def growth_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) over log(documents)."""
    pts = [(math.log(n), math.log(max(s, 1e-3))) for n, s in points]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def _common_stages(results: list[dict[str, Any]]) -> list[str]:
    """The stages every result measured."""
    return [s for s in STAGES if all(s in r["runs"]["first"]["stages"] for r in results)]


def pipeline_table(results: list[dict[str, Any]]) -> str:
    stages = _common_stages(results)
    lines = [
        "| docs | chunks | "
        + " / ".join(stages)
        + " (s) | peak RSS (MiB) | unchanged re-run: chunks (s, % of first)"
        " / total (s) / disk (MiB) | 1 %-edit re-run: chunks (s, %) / total (s) / shards | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first, same, edit = r["runs"]["first"], r["runs"]["unchanged"], r["runs"].get("edited")
        chunks_first = first["stages"]["corpus_chunks"]["seconds"]

        def pct(run: dict[str, Any], base: float = chunks_first) -> str:
            s = run["stages"]["corpus_chunks"]["seconds"]
            return f"{s:.1f} ({100 * s / base:.0f} %)"

        peak = max(s["peak_mib"] for s in first["stages"].values())
        edited = f"{pct(edit)} / {edit['total_seconds']:.1f} / {edit['shards']}" if edit else "—"
        lines.append(
            f"| {r['docs']:,} | {first['chunks']:,} | "
            + " / ".join(f"{first['stages'][s]['seconds']:.1f}" for s in stages)
            + f" | {peak:.0f} | {pct(same)} / {same['total_seconds']:.1f} / {same['disk_added_mib']:.2f} | {edited}"
            f" | {'/'.join(f'{x:.1f}' for x in r['load'])} |"
        )
    if len(results) >= 2:
        exps = {
            s: growth_exponent([(r["docs"], r["runs"]["first"]["stages"][s]["seconds"]) for r in results])
            for s in stages
        }
        lines.append("")
        lines.append("growth exponent (time ∝ docs^k): " + ", ".join(f"{s} {k:.2f}" for s, k in exps.items()))
    lines += ["", stage_table(results)]
    return "\n".join(lines)


def stage_table(results: list[dict[str, Any]]) -> str:
    """Per run and stage: wall seconds, peak RSS of its step processes and the number of steps."""
    stages = _common_stages(results)
    lines = [
        "| docs | run | " + " | ".join(f"{s}: s / peak MiB / steps" for s in stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    for r in results:
        for label, run in r["runs"].items():
            cells = [
                f"{run['stages'][s]['seconds']:.1f} / {run['stages'][s]['peak_mib']:.0f} / {run['stages'][s]['steps']}"
                for s in stages
            ]
            lines.append(f"| {r['docs']:,} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- part 2
def search_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Exact search against each index of ``--search-indexes``, alternating which goes first per round."""
    from embed_assets.search import ann_search, exact_topk, recall_at_k

    tag = ("" if args.search_encoder == "torch" else f"-{args.search_encoder}") + (
        "" if args.search_text == "stdlib-debian" else f"-{args.search_text}"
    )
    folder = Path(args.work_dir) / f"search-{args.search_passages}-{args.search_max_tokens}{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    corpus_emb, query_emb = _search_embeddings(folder, args)
    k = 10
    indexes = [i for i in args.search_indexes.split(",") if i]
    rows = []
    for round_ in range(args.repeats):
        methods = ["exact", *indexes]
        for which in methods if round_ % 2 == 0 else methods[::-1]:
            t0 = time.perf_counter()
            if which == "exact":
                exact_topk(query_emb, corpus_emb, k)
                rows.append({"round": round_, "method": "exact", "search_s": time.perf_counter() - t0})
                continue
            _, found, report = ann_search(query_emb, corpus_emb, k, which, seed=round_)
            rows.append(
                {
                    "round": round_,
                    "method": which,
                    "build_s": report.build_seconds,
                    "calibration_s": report.calibration_seconds,
                    "search_s": report.search_seconds,
                    "knob": report.knob,
                    "cells": report.cells,
                    "sample_recall": report.recall_at_k,
                    "found": found,
                }
            )
            print(f"[round {round_}] {which}: {report.as_metadata()}", file=sys.stderr, flush=True)
    exact = exact_topk(query_emb, corpus_emb, k)
    for row in rows:
        if "found" in row:
            row["recall"] = recall_at_k(row.pop("found"), exact, query_emb, corpus_emb)
    ex = statistics.median(r["search_s"] for r in rows if r["method"] == "exact")
    out: dict[str, Any] = {
        "passages": len(corpus_emb),
        "queries": len(query_emb),
        "encoder": args.search_encoder,
        "text": args.search_text,
        "exact_search_s": ex,
        "indexes": {},
        "load": os.getloadavg(),
    }
    for index in indexes:
        mine = [r for r in rows if r["method"] == index]
        search_s = statistics.median(r["search_s"] for r in mine)
        build_s = statistics.median(r["build_s"] for r in mine)
        calibration_s = statistics.median(r["calibration_s"] for r in mine)
        out["indexes"][index] = {
            "search_s": search_s,
            "build_s": build_s,
            "calibration_s": calibration_s,
            "recall@10": min(r["recall"] for r in mine),
            "sample_recall@10": min(r["sample_recall"] for r in mine),
            "knob": "/".join(
                sorted({f"{r['knob']}" + (f" of {r['cells']}" if r["cells"] else "") for r in mine})
            ),
            "speedup_search": ex / search_s,
            "speedup_all_in": ex / (search_s + build_s + calibration_s),
        }
    return out


def search_table(s: dict[str, Any]) -> str:
    """One row per index: exact search time, the index's build / calibration / search, recall, ratios."""
    lines = [
        "| passages | queries | index | exact search (s) | build / calibration / search (s) | knob (nprobe of "
        "cells, efSearch) | recall@10 (all queries, ties count) | search speed-up | all-in speed-up | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s["indexes"].items():
        lines.append(
            f"| {s['passages']:,} | {s['queries']:,} | {name} | {s['exact_search_s']:.2f} | {r['build_s']:.1f} / "
            f"{r['calibration_s']:.1f} / {r['search_s']:.2f} | {r['knob']} | {r['recall@10']:.4f} | "
            f"{r['speedup_search']:.1f}× | {r['speedup_all_in']:.1f}× | {'/'.join(f'{x:.1f}' for x in s['load'])} |"
        )
    return "\n".join(lines)


def _search_embeddings(folder: Path, args: argparse.Namespace):
    """Passage and query embeddings of real text, encoded in resumable blocks."""
    import numpy as np

    pool = sentence_pool(with_packages=args.search_text == "with-packages")
    rng = random.Random(7)
    queries = rng.sample(pool, args.search_queries)
    taken = set(queries)
    rest = [s for s in pool if s not in taken]
    passages: dict[str, None] = {}
    while len(passages) < args.search_passages:
        i = rng.randrange(len(rest) - 1)
        passages.setdefault(f"{rest[i]} {rest[rng.randrange(len(rest))]}", None)
    texts = list(passages)
    # The cached blocks are only valid for the same texts (the pool follows the installed packages).
    digest = hashlib.sha256("\n".join(queries + texts).encode()).hexdigest()
    stamp = folder / "texts.sha256"
    if stamp.exists() and stamp.read_text().strip() != digest:
        raise SystemExit(f"{folder} holds embeddings of other texts (other installed packages?): delete it")
    stamp.write_text(digest + "\n")
    print(
        f"search: {len(texts):,} passages from {len(pool):,} distinct sentences", file=sys.stderr, flush=True
    )
    model = None
    block = 50_000
    parts = []
    for start in range(0, len(texts), block):
        path = folder / f"passages-{start:08d}.npy"
        if not path.exists():
            model = model or _encoder(folder, args)
            emb = model(texts[start : start + block])
            np.save(path, emb.astype(np.float32))
            print(f"embedded {min(start + block, len(texts))}/{len(texts)} passages", flush=True)
        parts.append(np.load(path))
    qpath = folder / "queries.npy"
    if not qpath.exists():
        model = model or _encoder(folder, args)
        np.save(qpath, model(queries).astype(np.float32))
    return np.ascontiguousarray(np.concatenate(parts)), np.load(qpath)


def _encoder(folder: Path, args: argparse.Namespace) -> Callable[[list[str]], Any]:
    """The bundled model as a texts → normalized vectors function: sentence-transformers on torch, or the
    product's own ONNX export (``onnx-int8``: the int8 variant the server runs, ~2× torch's texts/s here, so a
    million passages embed in under an hour; the export checks parity with torch)."""
    from embed_assets.models import resolve_model_path
    from embed_assets.stages.common import ModelSpec

    path = resolve_model_path(ModelSpec().base_model)
    if args.search_encoder == "torch":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device="cpu")
        model.max_seq_length = args.search_max_tokens
        return lambda texts: model.encode(texts, batch_size=256, normalize_embeddings=True)
    from embed_assets.export import export_onnx
    from embed_assets.serving.embedder import OnnxEmbedder

    onnx_dir = folder / "onnx"
    if not (onnx_dir / "model_int8.onnx").exists():
        export_onnx(path, str(onnx_dir), max_seq_length=args.search_max_tokens)
    embedder = OnnxEmbedder(str(onnx_dir), "int8", max_seq_length=args.search_max_tokens)
    return lambda texts: embedder.encode(texts, "passage", batch_size=64)


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="pipeline,search", help="pipeline, search or both")
    p.add_argument("--docs", default="1000,10000", help="corpus sizes (documents), comma-separated")
    p.add_argument("--words", type=int, default=1500, help="words per generated document")
    p.add_argument(
        "--work-dir",
        default=str(REPO / "benchmarks" / ".work" / "scale"),
        help="corpora, embeddings, results",
    )
    p.add_argument("--fresh", action="store_true", help="re-measure sizes that have a result already")
    p.add_argument("--no-edit", dest="edit", action="store_false", help="skip the 1 %%-edit re-run")
    p.add_argument(
        "--search-passages",
        type=int,
        default=200_000,
        help="the issue size is 1000000 (embedding ~30 min here with onnx-int8)",
    )
    p.add_argument("--search-queries", type=int, default=2000)
    p.add_argument("--search-max-tokens", type=int, default=32)
    p.add_argument(
        "--search-encoder",
        choices=["torch", "onnx-int8"],
        default="onnx-int8",
        help="how the passages are embedded (onnx-int8: the served int8 export, ~2x faster here)",
    )
    p.add_argument(
        "--search-text",
        choices=["stdlib-debian", "with-packages"],
        default="with-packages",
        help="the sentences passages are drawn from: those of part 1 (~19,000, so each recurs in ~100 of a "
        "million passages) or with the installed packages' docstrings too (~300,000)",
    )
    p.add_argument("--search-indexes", default="ivf,hnsw", help="FAISS indexes to compare with exact search")
    p.add_argument(
        "--repeats", type=int, default=3, help="search rounds (alternating which method goes first)"
    )
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="the cheap stages to materialize (a prefix of the pipeline, e.g. corpus,corpus_chunks)",
    )
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        os.environ[STAGES_ENV] = args.stages  # the worker and its step processes inherit it
    selected_stages()  # an unknown name fails here, before any work
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {}
    if "pipeline" in parts:
        results = [run_size(int(n), args) for n in args.docs.split(",")]
        report["pipeline"] = results
        print(pipeline_table(results))
    if "search" in parts:
        s = search_bench(args)
        report["search"] = s
        print("\n" + search_table(s))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
