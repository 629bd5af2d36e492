"""Benchmark the pipeline's orchestration: Dagster vs the same library calls in a plain script.

Four measurements, all in one run:

1. Orchestration overhead: the assets ``corpus`` .. ``beir_metrics`` and ``onnx_model`` materialized with
   ``dg.materialize`` (in-process executor, the real ``defs`` assets and resources, a temporary local instance
   and artifact root) vs a plain Python script that calls the same library functions with the same settings
   on the same inputs. Per-stage wall and CPU times (Dagster: STEP_START to STEP_SUCCESS from the event log;
   the time outside the steps is its own row) and the overhead ``(dagster - plain) / plain``; CPU time is the
   steadier number when other processes compete for the cores. Each path runs in a fresh interpreter; heavy
   libraries (torch, transformers, sentence-transformers, onnxruntime) are imported before the clock starts
   in both, and the import of Dagster and the definitions is reported on its own line.
2. Peak memory per stage: a sampler thread reads the process high-water mark (``VmHWM``) and resets it
   (``/proc/self/clear_refs``) every ``--rss-interval`` seconds; a stage's peak is the largest interval peak
   that overlaps the stage. Both paths use the same sampler.
3. Incremental re-materialization: LLM synthetic QA against a loopback OpenAI-protocol stub server (the
   tests' ``OpenAIStub``, which counts calls) on a copy of the sample corpus: the full run, a re-run with
   nothing changed, and a re-run after one sentence of one document changed (LLM calls and wall times).
4. The job as the UI launches it (``--parts executor``): the same stages through the project's multiprocess
   executor (``dg.execute_job``, every step in its own process), once with Dagster's default ``spawn`` and
   once with the project's ``forkserver`` that preloads torch and sentence-transformers; total wall time
   including every import, against the plain script's total plus its imports.

MLflow tracking is off in both paths of (1) (the plain path has no tracking to compare it with) and the
``tensorrt_engine`` / ``nim_service`` assets are not part of the comparison. Both paths run with
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it. Other processes on the machine make wall times
noisy: the default five runs per path alternate which path goes first, the tables show medians, and the total
overhead is also given per adjacent pair of runs (median over pairs) and fastest run vs fastest run.

Usage::

    python benchmarks/pipeline.py                          # ~11 min on 2 cores
    python benchmarks/pipeline.py --repeats 1              # one run per path (~4 min)
    python benchmarks/pipeline.py --parts incremental      # only (3)
    python benchmarks/pipeline.py --max-steps 60 --corpus /path/to/docs --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning, in both paths: CPU seconds then measure work, not how long
# torch's threads busy-waited (which depends on how loaded the machine is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: The compared stages, in lineage order (asset names = Dagster step keys).
STAGES = (
    "corpus",
    "corpus_chunks",
    "synthetic_qa",
    "split_sets",
    "mined_negatives",
    "checkpoint",
    "beir_metrics",
    "onnx_model",
)
#: Stages without model work (their cost is mostly file I/O: Dagster's per-step cost shows there).
LIGHT_STAGES = ("corpus", "corpus_chunks", "synthetic_qa", "split_sets")
#: Upstream of synthetic QA, and what the incremental part may add after it.
INCREMENTAL_STAGES = ("corpus", "corpus_chunks", "synthetic_qa", "split_sets", "mined_negatives")
#: The stub's SDG steps (one request each per bundle, plus repairs).
LLM_STEPS = ("artifact_extraction", "qa_generation", "quality_judge")
#: The only sizes that differ from the stage configs' defaults: a short fine-tuning, so that the benchmark
#: takes minutes on a 2-core CPU (a step of the default batch 16 x 128 tokens takes seconds to tens of them).
BENCH_TRAINING = {"max_steps": 5, "batch_size": 8, "max_seq_length": 64}
#: Imported before the clock starts in every worker, so neither path pays them inside a stage.
HEAVY_MODULES = (
    "numpy",
    "pyarrow",
    "torch",
    "transformers",
    "sentence_transformers",
    "datasets",
    "onnxruntime",
)


# ------------------------------------------------------------------------------------------ memory sampling
def _shown_path(path: str) -> str:
    """A path relative to the checkout when it is inside it (the table names no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return Path(path).name


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


class PeakSampler:
    """Interval peaks of the process RSS (read ``VmHWM``, reset it) and process CPU time, every interval.

    A reset high-water mark catches spikes shorter than the interval, so every interval's peak is exact and
    a stage's peak is the maximum over the intervals overlapping it (blurred by at most one interval at each
    end). Without a resettable high-water mark, the intervals fall back to plain ``VmRSS`` samples. CPU time
    (all threads, user + system) is interpolated between readings at a stage's start and end; it is far less
    sensitive than wall time to other processes competing for the cores.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.resettable = _reset_hwm()
        self.intervals: list[tuple[float, float, int]] = []  # (start, end, peak KiB)
        self.cpu: list[tuple[float, float]] = [(time.time(), time.process_time())]  # (wall, CPU seconds)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._since = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-sampler")

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.mark()

    def mark(self) -> float:
        """Close the current interval now (a stage boundary of the plain path); returns its time."""
        with self._lock:
            now, cpu = time.time(), time.process_time()
            peak = _status_kib("VmHWM" if self.resettable else "VmRSS")
            if self.resettable:
                _reset_hwm()
            self.intervals.append((self._since, now, peak))
            self.cpu.append((now, cpu))
            self._since = now
            return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.mark()

    def peak_mib(self, start: float, end: float) -> float:
        """Peak RSS in MiB over the intervals overlapping ``[start, end]``."""
        with self._lock:
            peaks = [p for s, e, p in self.intervals if e >= start and s <= end]
        return max(peaks, default=0) / 1024

    def cpu_seconds(self, start: float, end: float) -> float:
        """Process CPU seconds spent between two wall-clock times (linear between readings)."""
        with self._lock:
            marks = list(self.cpu)

        def at(t: float) -> float:
            i = bisect.bisect_left(marks, (t, -1.0))
            if i == 0:
                return marks[0][1]
            if i == len(marks):
                return marks[-1][1]
            (t0, c0), (t1, c1) = marks[i - 1], marks[i]
            return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1

        return at(end) - at(start)


def _import_heavy() -> float:
    start = time.perf_counter()
    for name in HEAVY_MODULES:
        __import__(name)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------- plain
class PlainPipeline:
    """The pipeline as a plain script: the same stage functions the assets call, with the same settings and
    inputs, in lineage order, without Dagster (no event log, no IO manager, no metadata conversion)."""

    def __init__(self, spec: dict[str, Any], root: Path) -> None:
        import logging

        from embed_assets.stages.common import ModelSpec, StageContext

        self.settings = {
            name: cls.model_validate(spec["configs"][name]) for name, cls in stage_settings().items()
        }
        self.model = ModelSpec(**spec["model"])
        self.ctx = StageContext.local(root, log=logging.getLogger("bench.plain"))
        self.outputs: dict[str, Any] = {}

    def corpus(self) -> None:
        from embed_assets.stages.ingest import read_documents

        self.documents = read_documents(self.settings["corpus"], self.ctx)
        self.outputs["documents"] = self.documents.n_docs

    def corpus_chunks(self) -> None:
        from embed_assets.stages.ingest import chunk_documents

        self.chunks = chunk_documents(self.documents, self.settings["corpus_chunks"], self.model, self.ctx)
        self.outputs["chunks"] = self.chunks.n_chunks

    def synthetic_qa(self) -> None:
        from embed_assets.stages.sdg import generate_pairs

        self.pairs = generate_pairs(self.chunks, self.settings["synthetic_qa"], self.model, self.ctx)
        self.outputs["pairs"] = self.pairs.n_pairs

    def split_sets(self) -> None:
        from embed_assets.stages.split import split_pairs

        self.split = split_pairs(self.chunks, self.pairs, self.settings["split_sets"], self.ctx)
        self.outputs["train/val/test pairs"] = f"{self.split.n_train}/{self.split.n_val}/{self.split.n_test}"

    def mined_negatives(self) -> None:
        from embed_assets.stages.mine import mine_negatives

        self.mined = mine_negatives(
            self.chunks, self.pairs, self.split, self.settings["mined_negatives"], self.model, self.ctx
        )
        self.outputs["mined rows"] = self.mined.n_rows

    def checkpoint(self) -> None:
        from embed_assets.stages.train import train_checkpoint

        self.checkpoint_ = train_checkpoint(
            self.chunks, self.pairs, self.split, self.mined, self.settings["checkpoint"], self.model, self.ctx
        )
        self.outputs["training rows / steps"] = (
            f"{self.checkpoint_.train_rows} / {self.checkpoint_.report['steps']}"
        )

    def beir_metrics(self) -> None:
        from embed_assets.stages.evaluate import evaluate_checkpoint

        self.metrics = evaluate_checkpoint(
            self.split, self.checkpoint_, self.settings["beir_metrics"], self.model, self.ctx
        )
        self.outputs["nDCG@10 base / fine-tuned"] = (
            f"{self.metrics.base['NDCG@10']:.4f} / {self.metrics.finetuned['NDCG@10']:.4f}"
        )

    def onnx_model(self) -> None:
        from embed_assets.stages.export import export_checkpoint

        onnx = export_checkpoint(
            self.split, self.checkpoint_, self.metrics, self.settings["onnx_model"], self.ctx
        )
        self.outputs["ONNX nDCG@10 fp32 / int8"] = " / ".join(f"{p.ndcg_at_10:.4f}" for p in onnx.parity)


def run_plain(spec: dict[str, Any], root: Path, sampler: PeakSampler, log: Callable[[str], None]) -> dict:
    pipeline = PlainPipeline(spec, root)
    stages: dict[str, dict[str, float]] = {}
    first = sampler.mark()
    for name in STAGES:
        begin = sampler.mark()
        getattr(pipeline, name)()
        end = sampler.mark()
        stages[name] = _stage(sampler, begin, end)
        log(f"[plain] {name}: {_describe(stages[name])}")
    totals = _totals(sampler, first, end)
    return {**totals, "stages": stages, "outputs": pipeline.outputs}


def _stage(sampler: PeakSampler, begin: float, end: float) -> dict[str, float]:
    return {
        "seconds": end - begin,
        "cpu_seconds": sampler.cpu_seconds(begin, end),
        "peak_mib": sampler.peak_mib(begin, end),
    }


def _totals(sampler: PeakSampler, begin: float, end: float) -> dict[str, float]:
    return {"total": end - begin, "total_cpu": sampler.cpu_seconds(begin, end)}


def _describe(stage: dict[str, float]) -> str:
    wall, cpu, peak = stage["seconds"], stage["cpu_seconds"], stage["peak_mib"]
    return f"{wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.0f} MiB"


# ------------------------------------------------------------------------------------------------ dagster
def _import_definitions() -> tuple[Any, float]:
    start = time.perf_counter()
    from embed_assets.definitions import defs

    return defs, time.perf_counter() - start


def _instance(kind: str, home: Path):
    import dagster as dg

    if kind == "ephemeral":
        return dg.DagsterInstance.ephemeral()
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(str(home), overrides={"telemetry": {"enabled": False}})


def _step_spans(instance: Any, run_id: str) -> dict[str, tuple[float, float]]:
    """``{step_key: (STEP_START time, STEP_SUCCESS time)}`` from the run's event log."""
    starts: dict[str, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        if event.event_type_value == "STEP_START":
            starts[entry.step_key] = entry.timestamp
        elif event.event_type_value == "STEP_SUCCESS":
            spans[entry.step_key] = (starts[entry.step_key], entry.timestamp)
    return spans


def _materialize(defs: Any, instance: Any, resources: dict, run_config: dict, selection: Sequence[str]):
    import dagster as dg

    result = dg.materialize(
        list(defs.assets),
        instance=instance,
        resources=resources,
        run_config=run_config,
        selection=list(selection),
        raise_on_error=False,
    )
    if not result.success:
        failures = [
            f"{e.step_key}: {e.step_failure_data.error.to_string()[-3000:]}"
            for e in result.all_events
            if e.event_type_value == "STEP_FAILURE" and e.step_failure_data.error
        ]
        raise RuntimeError(f"materialization failed: {failures}")
    return result


def _asset_metadata(result: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        meta = event.materialization.metadata
        out[event.asset_key.path[-1]] = {k: getattr(v, "value", v) for k, v in meta.items()}
    return out


def _bench_resources(artifacts: str, **overrides: Any) -> dict[str, Any]:
    """The code location's resources with a scratch artifact root and MLflow tracking off."""
    from embed_assets.definitions import pipeline_resources
    from embed_assets.defs.resources import ArtifactStore, MLflowTracking

    return pipeline_resources(
        ArtifactStore(root=artifacts), **{"tracking": MLflowTracking(enabled=False), **overrides}
    )


def _run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Run config of the compared stages: each stage's overrides (the rest are the configs' defaults)."""
    return {"ops": {name: {"config": spec["overrides"].get(name, {})} for name in STAGES}}


def _ndcg_pair(meta: dict[str, dict[str, Any]]) -> str:
    """``"base / fine-tuned"`` nDCG@10 from the ``beir_metrics`` materialization's metadata."""
    beir = meta["beir_metrics"]
    return f"{beir['ndcg@10_base']:.4f} / {beir['ndcg@10_finetuned']:.4f}"


def run_dagster(
    spec: dict[str, Any], root: Path, sampler: PeakSampler, log: Callable[[str], None], defs: Any
) -> dict:
    resources = _bench_resources(str(root / "artifacts"))
    run_config = _run_config(spec)
    instance = _instance(spec["instance"], root / "dagster_home")
    log(f"[dagster] materializing {len(STAGES)} assets (dagster logs: {spec['log_path']})")
    first = sampler.mark()
    result = _materialize(defs, instance, resources, run_config, STAGES)
    last = sampler.mark()
    spans = _step_spans(instance, result.run_id)
    stages = {name: _stage(sampler, begin, end) for name, (begin, end) in spans.items()}
    for name, stage in stages.items():
        log(f"[dagster] {name}: {_describe(stage)}")
    meta = _asset_metadata(result)
    qa_split = meta["split_sets"]
    outputs = {
        "documents": meta["corpus"]["documents"],
        "chunks": meta["corpus_chunks"]["chunks"],
        "pairs": meta["synthetic_qa"]["pairs"],
        "train/val/test pairs": f"{qa_split['train_pairs']}/{qa_split['val_pairs']}/{qa_split['test_pairs']}",
        "mined rows": result.output_for_node("mined_negatives").n_rows,
        "training rows / steps": f"{meta['checkpoint']['rows']} / {meta['checkpoint']['steps']}",
        "nDCG@10 base / fine-tuned": _ndcg_pair(meta),
        "ONNX nDCG@10 fp32 / int8": " / ".join(
            f"{meta['onnx_model'][k]:.4f}"
            for k in ("fp32_ndcg@10", "int8_ndcg@10")
            if k in meta["onnx_model"]
        ),
    }
    instance.dispose()
    return {**_totals(sampler, first, last), "stages": stages, "outputs": outputs}


def bench_job():
    """The project's job over ``STAGES`` with its multiprocess executor, as a UI-launched run executes it.

    Module level so that every step process can reconstruct it; the artifact root and the step start method
    come from ``$BENCH_PIPELINE_ROOT`` and ``$BENCH_STEP_START``.
    """
    import dagster as dg

    from embed_assets.definitions import defs
    from embed_assets.defs.jobs import build_executor

    executor = build_executor("multiprocess", os.environ["BENCH_STEP_START"])
    job = dg.define_asset_job("bench_pipeline", selection=list(STAGES), executor_def=executor)
    resources = _bench_resources(os.environ["BENCH_PIPELINE_ROOT"])
    return dg.Definitions(assets=list(defs.assets), resources=resources, jobs=[job]).resolve_job_def(
        "bench_pipeline"
    )


def run_job(spec: dict[str, Any], root: Path, start: str, log: Callable[[str], None]) -> dict:
    """``bench_job`` through ``dg.execute_job`` (step processes started with ``start``): wall times only,
    since the steps' CPU and memory are in other processes."""
    import dagster as dg

    os.environ["BENCH_PIPELINE_ROOT"] = str(root / "artifacts")
    os.environ["BENCH_STEP_START"] = start
    run_config = _run_config(spec)
    instance = _instance("local", root / "dagster_home")
    log(f"[job, {start}] executing {len(STAGES)} steps in their own processes")
    begin = time.time()
    result = dg.execute_job(dg.reconstructable(bench_job), instance=instance, run_config=run_config)
    end = time.time()
    if not result.success:
        raise RuntimeError(f"job run {result.run_id} failed; see the Dagster logs in {root}")
    spans = _step_spans(instance, result.run_id)
    stages = {name: {"seconds": b - a} for name, (a, b) in spans.items()}
    for name, stage in stages.items():
        log(f"[job, {start}] {name}: {stage['seconds']:.1f} s wall")
    ndcg = _ndcg_pair(_asset_metadata(result))
    instance.dispose()
    return {"total": end - begin, "stages": stages, "ndcg": ndcg}


# ------------------------------------------------------------------------------------------- incremental
def _edit_one_sentence(path: Path) -> tuple[str, str]:
    """Change one sentence (the middle one of at least six words) of a document in place."""
    from embed_assets.chunking import split_sentences

    text = path.read_text(encoding="utf-8")
    candidates = [s for s in split_sentences(text) if len(s.split()) >= 6 and s.endswith(".") and s in text]
    if not candidates:
        raise SystemExit(f"{path}: no sentence of six or more words to edit")
    old = candidates[len(candidates) // 2]
    new = old[:-1] + ", as this reference explains."
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return old, new


def run_incremental(spec: dict[str, Any], root: Path, log: Callable[[str], None], defs: Any) -> dict:
    from embed_assets.defs.resources import LLMResource
    from embed_assets_tests.openai_stub_server import OpenAIStub

    docs = root / "corpus"
    shutil.copytree(spec["configs"]["corpus"]["path"], docs)
    selection = INCREMENTAL_STAGES[: INCREMENTAL_STAGES.index(spec["incremental_through"]) + 1]
    overrides = spec["incremental_overrides"]
    run_config = {
        "ops": {
            name: {"config": {**overrides.get(name, {}), **({"path": str(docs)} if name == "corpus" else {})}}
            for name in selection
        }
    }
    instance = _instance(spec["instance"], root / "dagster_home")
    runs = []
    with OpenAIStub() as stub:
        resources = _bench_resources(
            str(root / "artifacts"), llm=LLMResource(base_url=stub.base_url, model="stub/chat-model")
        )
        edit: dict[str, str] = {}
        for label in ("full run", "re-run, nothing changed", "re-run, one sentence edited"):
            if label.endswith("edited"):
                matches = [docs / spec["edit_doc"]] if (docs / spec["edit_doc"]).is_file() else []
                matches = matches or sorted(docs.rglob(spec["edit_doc"]))
                if not matches:
                    raise SystemExit(f"--edit-doc {spec['edit_doc']!r} is not in {docs}")
                target = matches[0]
                old, new = _edit_one_sentence(target)
                edit = {"doc": str(target.relative_to(docs)), "old": old, "new": new}
            stub.reset()
            log(f"[incremental] {label} ({', '.join(selection)}) ...")
            start = time.perf_counter()
            result = _materialize(defs, instance, resources, run_config, selection)
            total = time.perf_counter() - start
            spans = _step_spans(instance, result.run_id)
            meta = _asset_metadata(result)
            sdg = meta["synthetic_qa"]
            runs.append(
                {
                    "run": label,
                    "calls": stub.count(),
                    "calls_by_step": {step: stub.count(step) for step in LLM_STEPS},
                    "repairs": stub.count(repair=True),
                    "errors": stub.count() - stub.count(status=200),
                    "chunks": meta["corpus_chunks"]["chunks"],
                    "chunks_new": meta["corpus_chunks"]["chunks_new"],
                    "chunks_generated": sdg["chunks_generated"],
                    "chunks_reused": sdg["chunks_reused"],
                    "calls_reused": sdg["calls_reused"],
                    "pairs": sdg["pairs"],
                    "stage_seconds": {k: end - begin for k, (begin, end) in spans.items()},
                    "total": total,
                }
            )
            log(f"[incremental] {label}: {stub.count()} LLM calls, {total:.1f} s")
    instance.dispose()
    return {
        "runs": runs,
        "edit": edit,
        "selection": list(selection),
        "documents": meta["corpus"]["documents"],
    }


# ------------------------------------------------------------------------------------------------ worker
def worker_main(args: argparse.Namespace) -> int:
    """One measured path in this (fresh) interpreter; results go to ``--worker-out`` as JSON."""
    spec = json.loads(Path(args.worker_spec).read_text())
    progress = os.fdopen(args.worker_progress_fd, "w", buffering=1) if args.worker_progress_fd else sys.stderr

    def log(line: str) -> None:
        print(line, file=progress, flush=True)

    root = Path(spec["root"])
    sampler = PeakSampler(spec["rss_interval"]).start()
    heavy_s = _import_heavy()
    defs, import_s = _import_definitions() if args.worker != "plain" else (None, 0.0)
    baseline = _status_kib("VmRSS") / 1024
    if args.worker == "plain":
        out = run_plain(spec, root, sampler, log)
    elif args.worker == "dagster":
        out = run_dagster(spec, root, sampler, log, defs)
    elif args.worker.startswith("job-"):
        out = run_job(spec, root, args.worker.removeprefix("job-"), log)
    else:
        out = run_incremental(spec, root, log, defs)
    sampler.stop()
    out.update(
        heavy_import_seconds=heavy_s,
        import_seconds=import_s,
        baseline_rss_mib=baseline,
        process_peak_mib=max((p for _, _, p in sampler.intervals), default=0) / 1024,
        hwm_resettable=sampler.resettable,
        dagster_imported="dagster" in sys.modules,
    )
    Path(args.worker_out).write_text(json.dumps(out))
    return 0


def spawn(kind: str, spec: dict[str, Any], scratch: Path, tag: str) -> dict[str, Any]:
    """Run one worker in a fresh interpreter (its stderr to a log file, progress lines to ours)."""
    root = scratch / tag
    root.mkdir(parents=True)
    log_path = scratch / f"{tag}.log"
    spec = {**spec, "root": str(root), "log_path": str(log_path)}
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "result.json"
    progress_fd = os.dup(sys.stderr.fileno())
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--worker-spec",
        str(root / "spec.json"),
        "--worker-out",
        str(out),
        "--worker-progress-fd",
        str(progress_fd),
    ]
    start = time.perf_counter()
    try:
        with log_path.open("w") as log_file:
            proc = subprocess.run(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, pass_fds=(progress_fd,), cwd=REPO, check=False
            )
    finally:
        os.close(progress_fd)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{tag} worker failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - start
    print(f"{tag}: done in {result['process_seconds']:.0f} s", file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------------------------------------ report
def _overhead(new: float, base: float) -> float:
    """``new`` relative to ``base``, in percent."""
    return 100 * (new - base) / base


def _pct(new: float, base: float) -> str:
    return f"{_overhead(new, base):+.1f} %" if base > 0 else "n/a"


def paired_overhead(plain: list[dict], dagster: list[dict]) -> list[str]:
    """The total overhead estimated two load-robust ways: per adjacent pair of runs, and fastest vs fastest.

    Run ``i`` of each path ran back to back (alternating which went first), so the pair saw about the same
    machine load; the median of the per-pair overheads discards pairs hit by a burst. The fastest run of each
    path is the least-disturbed one (timeit's rule). Both lines are empty with one run per path.
    """
    if len(plain) < 2:
        return []
    wall = [_overhead(d["total"], p["total"]) for p, d in zip(plain, dagster, strict=True)]
    cpu = [_overhead(d["total_cpu"], p["total_cpu"]) for p, d in zip(plain, dagster, strict=True)]
    fastest_p, fastest_d = min(r["total"] for r in plain), min(r["total"] for r in dagster)
    return [
        "Paired, each Dagster run against the plain run next to it in time: wall "
        + ", ".join(f"{v:+.1f} %" for v in wall)
        + f" (**median {statistics.median(wall):+.1f} %**); CPU "
        + ", ".join(f"{v:+.1f} %" for v in cpu)
        + f" (median {statistics.median(cpu):+.1f} %). Fastest run of each path: plain {fastest_p:.2f} s, "
        f"Dagster {fastest_d:.2f} s, **{_pct(fastest_d, fastest_p)}**.",
        "",
    ]


def overhead_tables(plain: list[dict], dagster: list[dict]) -> list[str]:
    """Per-stage medians of the repeats: times with overhead, then peak RSS."""

    def med(runs: list[dict], stage: str, key: str) -> float:
        return statistics.median(r["stages"][stage][key] for r in runs)

    def row(label: str, p: float, d: float, pc: float, dc: float, bold: bool = False) -> str:
        cells = [f"{p:.2f}", f"{d:.2f}", f"{d - p:+.2f}", _pct(d, p), f"{pc:.2f}", f"{dc:.2f}", _pct(dc, pc)]
        if bold:
            label, cells = f"**{label}**", [f"**{c}**" for c in cells]
        return f"| {label} | " + " | ".join(cells) + " |"

    runs = f"{len(plain)} run{'s' if len(plain) > 1 else ''} per path"
    lines = [
        f"### Orchestration overhead (seconds, median of {runs})",
        "",
        "| stage | plain wall s | dagster wall s | overhead s | overhead % | plain CPU s | dagster CPU s "
        "| CPU overhead % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        lines.append(
            row(
                stage,
                med(plain, stage, "seconds"),
                med(dagster, stage, "seconds"),
                med(plain, stage, "cpu_seconds"),
                med(dagster, stage, "cpu_seconds"),
            )
        )

    def outside(r: dict, key: str, total: str) -> float:
        return r[total] - sum(s[key] for s in r["stages"].values())

    out_wall = statistics.median(outside(r, "seconds", "total") for r in dagster)
    out_cpu = statistics.median(outside(r, "cpu_seconds", "total_cpu") for r in dagster)
    lines += [
        f"| outside the steps (run setup, step hand-offs, teardown) | – | {out_wall:.2f} | {out_wall:+.2f} | "
        f"| – | {out_cpu:.2f} | |",
        row(
            "total",
            statistics.median(r["total"] for r in plain),
            statistics.median(r["total"] for r in dagster),
            statistics.median(r["total_cpu"] for r in plain),
            statistics.median(r["total_cpu"] for r in dagster),
            bold=True,
        ),
        "",
    ]
    if len(plain) > 1:
        lines += [
            "Totals per run (wall / CPU s), in run order: "
            + "; ".join(
                f"{kind} {r['total']:.1f} / {r['total_cpu']:.1f}"
                for i in range(len(plain))
                for kind, r in ((("plain", plain[i]), ("dagster", dagster[i]))[:: 1 if i % 2 == 0 else -1])
            )
            + ".",
            "",
            *paired_overhead(plain, dagster),
        ]
    p_total = statistics.median(r["total"] for r in plain)
    fixed = out_wall + sum(med(dagster, s, "seconds") - med(plain, s, "seconds") for s in LIGHT_STAGES)
    model_diff = sum(
        med(dagster, s, "seconds") - med(plain, s, "seconds") for s in STAGES if s not in LIGHT_STAGES
    )
    spread = max(max(r["total"] for r in runs) - min(r["total"] for r in runs) for runs in (plain, dagster))
    lines += [
        f"Cost that does not grow with the work (the light stages {', '.join(LIGHT_STAGES)} plus the time "
        f"outside the steps): {fixed:.2f} s, {100 * fixed / p_total:.1f} % of this plain run. The model "
        f"stages differ by {model_diff:+.2f} s in total"
        + (
            f"; runs of the same path differ by up to {spread:.1f} s (other load on the machine)."
            if len(plain) > 1
            else " (one run per path: no run-to-run spread measured)."
        ),
        "",
    ]
    imp = statistics.median(r["import_seconds"] for r in dagster)
    heavy = statistics.median(r["heavy_import_seconds"] for r in plain + dagster)
    lines += [
        f"Not in the totals (before the clock, in both paths): importing torch, transformers, "
        f"sentence-transformers, datasets and onnxruntime, {heavy:.1f} s; Dagster path only: importing "
        f"dagster and the definitions, {imp:.2f} s (once per code-location load, not per run).",
        "",
        "Both paths run the same stage functions (the training-curve PNG included); the Dagster column adds "
        "the event log, the JSON manifests of the IO manager, the metadata conversion and the previous-run "
        "chunk lookup.",
        "",
        "### Peak RSS per stage (MiB, process high-water mark while the stage ran, median)",
        "",
        "| stage | plain | dagster | dagster − plain |",
        "|---|---:|---:|---:|",
    ]
    rows = [("after imports, before the first stage", "baseline_rss_mib")]
    for label, key in rows:
        p = statistics.median(r[key] for r in plain)
        d = statistics.median(r[key] for r in dagster)
        lines.append(f"| {label} | {p:.0f} | {d:.0f} | {d - p:+.0f} |")
    for stage in STAGES:
        p, d = med(plain, stage, "peak_mib"), med(dagster, stage, "peak_mib")
        lines.append(f"| {stage} | {p:.0f} | {d:.0f} | {d - p:+.0f} |")
    p = statistics.median(r["process_peak_mib"] for r in plain)
    d = statistics.median(r["process_peak_mib"] for r in dagster)
    lines += [f"| **whole process** | **{p:.0f}** | **{d:.0f}** | **{d - p:+.0f}** |", ""]
    if not plain[0]["hwm_resettable"]:
        lines += ["_/proc/self/clear_refs is not writable here: peaks are VmRSS samples, not exact._", ""]
    if plain[0]["dagster_imported"]:
        lines += ["_warning: the plain path imported dagster_", ""]
    lines += ["### Same outputs in both paths (first run of each)", "", "| output | plain | dagster |"]
    lines.append("|---|---|---|")
    for key, value in plain[0]["outputs"].items():
        lines.append(f"| {key} | {value} | {dagster[0]['outputs'].get(key, '')} |")
    return [*lines, ""]


def executor_table(plain: list[dict], dagster: list[dict], jobs: dict[str, dict]) -> list[str]:
    """The real job's multiprocess executor (one run per start method) next to the in-process medians."""
    p_total = statistics.median(r["total"] for r in plain)
    p_imports = statistics.median(r["heavy_import_seconds"] for r in plain)
    d_total = statistics.median(r["total"] for r in dagster)
    d_imports = statistics.median(r["heavy_import_seconds"] + r["import_seconds"] for r in dagster)
    base = p_total + p_imports
    names = {
        "spawn": "job, multiprocess, spawn (Dagster's default)",
        "forkserver": "job, multiprocess, forkserver + preload (the project's)",
    }
    lines = [
        "### The job as the UI launches it: multiprocess executor, every step in its own process",
        "",
        "A step process starts by importing what its asset needs; the in-process rows import once, before "
        "the clock, so here they are shown with those imports added. One run per start method.",
        "",
        "| path | wall s incl. imports | vs plain script incl. imports | mined_negatives s | checkpoint s "
        "| beir_metrics s | onnx_model s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def stage_cells(stages: dict[str, dict[str, float]]) -> str:
        return " | ".join(f"{stages[s]['seconds']:.1f}" for s in STAGES[4:])

    def med_stages(runs: list[dict]) -> dict[str, dict[str, float]]:
        return {s: {"seconds": statistics.median(r["stages"][s]["seconds"] for r in runs)} for s in STAGES}

    lines.append(f"| plain script (median) | {base:.1f} | – | {stage_cells(med_stages(plain))} |")
    lines.append(
        f"| dagster, in-process `materialize` (median) | {d_total + d_imports:.1f} | "
        f"{_pct(d_total + d_imports, base)} | {stage_cells(med_stages(dagster))} |"
    )
    for start, run in jobs.items():
        lines.append(
            f"| {names[start]} | {run['total']:.1f} | {_pct(run['total'], base)} | {stage_cells(run['stages'])} |"
        )
    lines += [
        "",
        "nDCG@10 base / fine-tuned per job run (same as the in-process runs): "
        + "; ".join(f"{start} {run['ndcg']}" for start, run in jobs.items())
        + ".",
        "",
    ]
    return lines


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def incremental_table(inc: dict[str, Any], through: str) -> list[str]:
    full = inc["runs"][0]
    edit = inc["edit"]
    lines = [
        f"### Incremental re-materialization (LLM SDG against the loopback stub, {inc['documents']} "
        f"documents, assets {inc['selection'][0]} .. {through})",
        "",
        f"Edited: one sentence of `{edit['doc']}`: “{_clip(edit['old'])}” → “{_clip(edit['new'])}”.",
        "",
        "| run | LLM calls | extraction / generation / judge | % of full run's calls | chunks new "
        "| SDG chunks generated / from cache | LLM answers from the per-call cache | pairs | synthetic_qa s "
        "| run wall s |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in inc["runs"]:
        by_step = " / ".join(str(r["calls_by_step"][s]) for s in LLM_STEPS)
        share = f"{100 * r['calls'] / full['calls']:.1f} %" if full["calls"] else "n/a"
        lines.append(
            f"| {r['run']} | {r['calls']} | {by_step} | {share} | {r['chunks_new']} / {r['chunks']} | "
            f"{r['chunks_generated']} / {r['chunks_reused']} | {r['calls_reused']} | {r['pairs']} | "
            f"{r['stage_seconds'].get('synthetic_qa', float('nan')):.2f} | {r['total']:.2f} |"
        )
    problems = sum(r["repairs"] + r["errors"] for r in inc["runs"])
    lines += [
        "",
        "SDG is cached per document (key: its chunk ids, which are content hashes) and per LLM call; an "
        "edited document is regenerated as a unit, but only its changed bundles (extraction, generation and "
        f"judge calls) reach the LLM. Repair requests and HTTP errors at the stub over all runs: {problems}.",
        "",
    ]
    stage_rows = ["| stage | " + " | ".join(r["run"] for r in inc["runs"]) + " |"]
    stage_rows.append("|---|" + "---:|" * len(inc["runs"]))
    for stage in inc["selection"]:
        stage_rows.append(
            f"| {stage} | "
            + " | ".join(f"{r['stage_seconds'].get(stage, 0):.2f}" for r in inc["runs"])
            + " |"
        )
    return [*lines, "Per-stage seconds (Dagster step times):", "", *stage_rows, ""]


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; defaults come from the stage settings in ``embed_assets/stages/``."""
    from embed_assets.stages.sdg import SDGSettings
    from embed_assets.stages.train import TrainSettings

    training, sdg = TrainSettings(), SDGSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--parts",
        default="overhead,executor,incremental",
        help="comma-separated: 'overhead' (parts 1 and 2: times, peak memory), 'executor' (the job's "
        "multiprocess executor, spawn vs forkserver; needs 'overhead') and/or 'incremental' (part 3)",
    )
    p.add_argument(
        "--corpus", default=None, help="corpus folder (default: CorpusConfig's, the sample corpus)"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="runs per path for (1)/(2), alternating which path goes first"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=BENCH_TRAINING["max_steps"],
        help=f"training steps (TrainingConfig: {training.max_steps}, i.e. by epochs)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=BENCH_TRAINING["batch_size"],
        help=f"training batch per step (TrainingConfig: {training.batch_size})",
    )
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=BENCH_TRAINING["max_seq_length"],
        help=f"training max_seq_length (TrainingConfig: {training.max_seq_length})",
    )
    p.add_argument(
        "--queries-per-chunk",
        type=int,
        default=sdg.queries_per_chunk,
        help="inverse-cloze queries per passage for (1) (SDGConfig default)",
    )
    p.add_argument(
        "--incremental-through",
        default="mined_negatives",
        choices=INCREMENTAL_STAGES[2:],
        help="last asset materialized in (3) (its upstream is always included)",
    )
    p.add_argument("--num-pairs", type=int, default=sdg.num_pairs, help="LLM QA pairs per bundle (SDGConfig)")
    p.add_argument(
        "--bundle-size", type=int, default=sdg.bundle_size, help="LLM chunks per prompt (SDGConfig default)"
    )
    p.add_argument(
        "--edit-doc",
        default="with.txt",
        help="document edited in (3): a path relative to the corpus or a file name (default: 10 passages, "
        "3 LLM bundles)",
    )
    p.add_argument(
        "--instance",
        default="local",
        choices=("local", "ephemeral"),
        help="Dagster instance: a temporary local one (SQLite, like DAGSTER_HOME) or in-memory",
    )
    p.add_argument("--rss-interval", type=float, default=0.05, help="seconds between peak-RSS readings")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (artifacts, Dagster logs)")
    return p.parse_args(argv)


def parse_worker_args(argv: Sequence[str]) -> argparse.Namespace:
    """Arguments of a worker process (internal; parsed without importing Dagster)."""
    p = argparse.ArgumentParser(description="internal: one measured path of benchmarks/pipeline.py")
    p.add_argument(
        "--worker", required=True, choices=("plain", "dagster", "job-spawn", "job-forkserver", "incremental")
    )
    p.add_argument("--worker-spec", required=True)
    p.add_argument("--worker-out", required=True)
    p.add_argument("--worker-progress-fd", type=int, default=None)
    return p.parse_args(argv)


def stage_settings() -> dict[str, type]:
    """The settings class of each compared stage (the fields of its asset's run config)."""
    from embed_assets.stages.evaluate import EvalSettings
    from embed_assets.stages.export import ExportSettings
    from embed_assets.stages.ingest import ChunkSettings, CorpusSettings
    from embed_assets.stages.mine import MiningSettings
    from embed_assets.stages.sdg import SDGSettings
    from embed_assets.stages.split import SplitSettings
    from embed_assets.stages.train import TrainSettings

    return {
        "corpus": CorpusSettings,
        "corpus_chunks": ChunkSettings,
        "synthetic_qa": SDGSettings,
        "split_sets": SplitSettings,
        "mined_negatives": MiningSettings,
        "checkpoint": TrainSettings,
        "beir_metrics": EvalSettings,
        "onnx_model": ExportSettings,
    }


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config overrides per stage and the fully resolved settings (validated by the stage settings)."""
    from embed_assets.defs.resources import EmbeddingModel
    from embed_assets.stages.sdg import SDGSettings

    overrides: dict[str, dict[str, Any]] = {
        "corpus": {"path": str(Path(args.corpus).resolve())} if args.corpus else {},
        "synthetic_qa": {"queries_per_chunk": args.queries_per_chunk},
        "checkpoint": {
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length,
        },
    }
    resolved = {name: cls(**overrides.get(name, {})).model_dump() for name, cls in stage_settings().items()}
    llm_sdg = {"generator": "llm", "num_pairs": args.num_pairs, "bundle_size": args.bundle_size}
    SDGSettings(**llm_sdg)  # validate
    return {
        "overrides": overrides,
        "configs": resolved,
        "model": EmbeddingModel().model_dump(),
        "incremental_overrides": {"synthetic_qa": llm_sdg},
        "incremental_through": args.incremental_through,
        "edit_doc": args.edit_doc,
        "instance": args.instance,
        "rss_interval": args.rss_interval,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected parts and print their Markdown tables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # before parse_args, which imports the Dagster configs
        return worker_main(parse_worker_args(argv))
    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"overhead", "executor", "incremental"}:
        raise SystemExit(f"--parts must name 'overhead', 'executor' and/or 'incremental', got {args.parts!r}")
    if "executor" in parts and "overhead" not in parts:
        raise SystemExit("--parts executor compares with the overhead part's runs: add 'overhead'")
    spec = build_spec(args)
    cfg = spec["configs"]
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    print(f"scratch folder: {scratch}", file=sys.stderr)
    started = time.perf_counter()
    report: dict[str, Any] = {"spec": spec}
    out = [
        f"Corpus `{_shown_path(cfg['corpus']['path'])}`, base model `{spec['model']['base_model']}`, "
        f"{os.cpu_count()} CPU cores, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; Dagster "
        f"instance: {args.instance}, in-process executor (parts 1-3), multiprocess (part 4).",
        "",
    ]
    try:
        if "overhead" in parts:
            ck = cfg["checkpoint"]
            out += [
                f"Settings: inverse-cloze SDG ({cfg['synthetic_qa']['queries_per_chunk']} queries per "
                f"passage), {cfg['mined_negatives']['hard_negatives_to_mine']} mined negatives, training "
                f"{ck['max_steps']} steps x batch {ck['batch_size']} (max_seq_length {ck['max_seq_length']}, "
                f"{ck['negatives_per_row']} negatives per row), ONNX export "
                f"({'fp32 + int8' if cfg['onnx_model']['quantize_int8'] else 'fp32'}) with metric parity; "
                "MLflow tracking off.",
                "",
            ]
            plain, dagster = [], []
            for i in range(args.repeats):
                order = ("plain", "dagster") if i % 2 == 0 else ("dagster", "plain")
                for kind in order:
                    print(f"== {kind} run {i + 1}/{args.repeats}", file=sys.stderr, flush=True)
                    (plain if kind == "plain" else dagster).append(
                        spawn(kind, spec, scratch, f"{kind}-{i + 1}")
                    )
            report["plain"], report["dagster"] = plain, dagster
            out += overhead_tables(plain, dagster)
        if "executor" in parts:
            jobs = {}
            for start in ("spawn", "forkserver"):
                print(f"== job, multiprocess executor, {start}", file=sys.stderr, flush=True)
                jobs[start] = spawn(f"job-{start}", spec, scratch, f"job-{start}")
            report["jobs"] = jobs
            out += executor_table(plain, dagster, jobs)
        if "incremental" in parts:
            print("== incremental LLM SDG", file=sys.stderr, flush=True)
            inc = spawn("incremental", spec, scratch, "incremental")
            report["incremental"] = inc
            out += incremental_table(inc, args.incremental_through)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - started
    out.append(f"Benchmark wall time: {elapsed:.0f} s.")
    print("\n".join(out))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
