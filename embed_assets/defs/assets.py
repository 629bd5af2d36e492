"""The pipeline's software-defined assets, in lineage order.

Each asset is thin: it reads its config and upstream manifest, calls one library module, writes its artifact
under the artifact store (path in metadata) and returns a small manifest for downstream assets.
Heavy libraries (torch, sentence-transformers, onnxruntime) are imported inside the bodies so loading the
definitions stays fast for the webserver and the daemon. (No ``from __future__ import annotations`` here:
Dagster reads the config and context annotations at definition time.)
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg

from embed_assets.defs.configs import (
    ChunkingConfig,
    CorpusConfig,
    EvalConfig,
    ExportConfig,
    MiningConfig,
    SDGConfig,
    ServiceConfig,
    SplitConfig,
    TensorRTConfig,
    TrainingConfig,
)
from embed_assets.defs.metadata import histogram_md, md_table, timed
from embed_assets.defs.resources import ArtifactStore, EmbeddingModel, LLMResource, MLflowTracking

GROUP = "embed_pipeline"

#: GPU-heavy steps: the tag marks them for the CUDA executor config, the pool limits their concurrency, and on
#: Kubernetes the op tag turns them into step pods that request a GPU.
GPU_TAGS = {"embed_assets/accelerator": "cuda"}
GPU_OP_TAGS: dict[str, Any] = {
    "embed_assets/accelerator": "cuda",
    "dagster-k8s/config": {
        "container_config": {
            "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
        },
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    },
}
GPU_POOL = "gpu"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_chunks(manifest: dict[str, Any]):
    from embed_assets.records import Chunk
    from embed_assets.storage import read_parquet

    return [Chunk.from_dict(r) for r in read_parquet(manifest["path"])]


def _load_qa(path: str):
    from embed_assets.records import QARecord
    from embed_assets.storage import read_jsonl

    return [QARecord.from_dict(r) for r in read_jsonl(path)]


def _content_version(*paths: str | None) -> dg.DataVersion:
    """Data version = hash of the artifact files, so downstream goes stale exactly when the content changes."""
    digest = hashlib.sha256()
    for path in paths:
        if path:
            digest.update(Path(path).read_bytes())
    return dg.DataVersion(digest.hexdigest()[:16])


def _pool(corpus_chunks: dict[str, Any], synthetic_qa: dict[str, Any]):
    """All passages: the corpus's chunks plus passages that came with user data (bring your own data)."""
    chunks = _load_chunks(corpus_chunks)
    if synthetic_qa.get("extra_chunks_path"):
        known = {c.chunk_id for c in chunks}
        chunks += [
            c for c in _load_chunks({"path": synthetic_qa["extra_chunks_path"]}) if c.chunk_id not in known
        ]
    return chunks


# --------------------------------------------------------------------------------------------------- corpus
@dg.asset(
    group_name=GROUP,
    kinds={"python", "file"},
    code_version="1",
    description="The documents of the corpus folder, with content hashes; data version = hash of all documents.",
)
def corpus(context: dg.AssetExecutionContext, config: CorpusConfig, store: ArtifactStore) -> dg.Output[dict]:
    from embed_assets.corpus import read_corpus
    from embed_assets.storage import write_jsonl

    meta: dict[str, Any] = {}
    with timed(meta):
        scan = read_corpus(config.path, config.extensions, config.exclude_globs, config.max_file_bytes)
        out = store.run_dir("corpus", context.run_id) / "documents.jsonl"
        write_jsonl(out, (d.to_dict() for d in scan.documents))
    for r in scan.rejected:
        context.log.warning(f"rejected {r['path']}: {r['reason']}")
    docs = [{"doc_id": d.doc_id, "bytes": d.n_bytes, "hash": d.content_hash} for d in scan.documents]
    return dg.Output(
        {
            "path": str(out),
            "root": scan.root,
            "n_docs": len(scan.documents),
            "data_version": scan.data_version,
        },
        data_version=dg.DataVersion(scan.data_version),
        metadata={
            "documents": len(scan.documents),
            "bytes": scan.n_bytes,
            "rejected_files": len(scan.rejected),
            "rejected": md_table(scan.rejected, ["path", "reason"], max_rows=50),
            "preview": md_table(docs, ["doc_id", "bytes", "hash"]),
            "corpus_root": dg.MetadataValue.path(scan.root),
            "artifact_path": dg.MetadataValue.path(str(out)),
            "corpus_hash": scan.data_version,
            **meta,
        },
    )


# --------------------------------------------------------------------------------------------------- chunks
@dg.asset(
    group_name=GROUP,
    kinds={"python", "parquet"},
    code_version="1",
    description="Sentence-based passages (≤ passage_max_length tokens); chunk_id = content hash of the text.",
)
def corpus_chunks(
    context: dg.AssetExecutionContext,
    config: ChunkingConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    corpus: dict,
) -> dg.Output[dict]:
    from embed_assets.chunking import chunk_corpus, tokenizer_counter
    from embed_assets.records import Document
    from embed_assets.storage import read_jsonl, write_parquet

    meta: dict[str, Any] = {}
    with timed(meta):
        docs = [Document(**d) for d in read_jsonl(corpus["path"])]
        chunks, dups = chunk_corpus(
            docs, config.sentences_per_chunk, config.passage_max_length, tokenizer_counter(model.model_path())
        )
        out = store.run_dir("corpus_chunks", context.run_id) / "chunks.parquet"
        write_parquet(out, [c.to_dict() for c in chunks])
    prev = _previous_chunk_ids(context)
    reused = sum(c.chunk_id in prev for c in chunks)
    lengths = [c.n_tokens for c in chunks]
    return dg.Output(
        {"path": str(out), "n_chunks": len(chunks)},
        data_version=dg.DataVersion(_fingerprint(sorted(c.chunk_id for c in chunks))),
        metadata={
            "chunks": len(chunks),
            "documents": len({c.doc_id for c in chunks}),
            "duplicate_chunks_dropped": dups,
            "chunks_unchanged_since_last_run": reused,
            "chunks_new": len(chunks) - reused,
            "tokens_mean": round(sum(lengths) / max(len(lengths), 1), 1),
            "tokens_max": max(lengths, default=0),
            "token_histogram": histogram_md(lengths, [32, 64, 128, 256, 384, 512]),
            "preview": md_table([c.to_dict() for c in chunks], ["chunk_id", "doc_id", "n_tokens", "text"]),
            "artifact_path": dg.MetadataValue.path(str(out)),
            **meta,
        },
    )


def _previous_chunk_ids(context: dg.AssetExecutionContext) -> set[str]:
    """Chunk ids of the latest earlier materialization, to show what a re-run reuses."""
    from embed_assets.storage import read_parquet

    event = context.instance.get_latest_materialization_event(dg.AssetKey("corpus_chunks"))
    if event is None or event.asset_materialization is None:
        return set()
    # "artifact_path", not "path": the IO manager writes its own "path" entry (the pickled manifest).
    path = event.asset_materialization.metadata.get("artifact_path")
    try:
        return {r["chunk_id"] for r in read_parquet(path.value)} if path else set()
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return set()


# ---------------------------------------------------------------------------------------------------- SDG
def _make_generator(config: SDGConfig, llm: LLMResource, model: EmbeddingModel, log=None):
    if config.generator == "inverse_cloze":
        from embed_assets.sdg.offline import InverseClozeGenerator, InverseClozeSettings

        return InverseClozeGenerator(
            InverseClozeSettings(
                config.queries_per_chunk, config.min_query_words, config.max_query_words, config.seed
            )
        )
    from embed_assets.sdg.llm import LLMEndpoint, LLMQAGenerator

    # The model *name* (not its resolved path) keeps the cache fingerprint stable across venvs.
    endpoint = LLMEndpoint(llm.base_url, llm.model, llm.api_key)
    return LLMQAGenerator(config, endpoint, embed_model=model.base_model, log=log)


@dg.asset(
    group_name=GROUP,
    kinds={"python", "json"},
    code_version="1",
    description="Synthetic (query, positive passages) pairs: offline inverse cloze by default, an "
    "OpenAI-compatible LLM, or your own pairs. Cached by chunk hash + generator fingerprint.",
)
def synthetic_qa(
    context: dg.AssetExecutionContext,
    config: SDGConfig,
    store: ArtifactStore,
    llm: LLMResource,
    model: EmbeddingModel,
    corpus_chunks: dict,
) -> dg.Output[dict]:
    from embed_assets.storage import write_jsonl, write_parquet

    meta: dict[str, Any] = {}
    out_dir = store.run_dir("synthetic_qa", context.run_id)
    manifest: dict[str, Any] = {"path": str(out_dir / "qa.jsonl")}
    with timed(meta):
        if config.generator == "user_data":
            from embed_assets.byod import load_user_pairs

            # Passages already in the corpus reuse its chunks and documents (keeps the split leak-free).
            records, extra = load_user_pairs(config.user_data_path, corpus=_load_chunks(corpus_chunks))
            write_parquet(out_dir / "user_passages.parquet", [c.to_dict() for c in extra])
            manifest["extra_chunks_path"] = str(out_dir / "user_passages.parquet")
            generator_name, model_name, stats_meta = "user_data", "none", {"user_passages": len(extra)}
        else:
            from embed_assets.sdg.cache import SDGCache
            from embed_assets.sdg.runner import run_generation

            generator = _make_generator(config, llm, model, log=context.log)
            result = run_generation(
                generator,
                _load_chunks(corpus_chunks),
                SDGCache(store.cache_dir("sdg")),
                progress=context.log.info,
            )
            records, generator_name, model_name = result.records, generator.name, generator.model
            stats_meta = result.stats.as_metadata()
            if hasattr(generator, "close"):
                generator.close()  # the LLM generator's HTTP connection pool
            stats_meta["estimated_cost_usd"] = config.estimated_cost_usd(
                result.stats.prompt_tokens, result.stats.completion_tokens
            )
            drops = result.stats.drop_table()
            for row in drops:  # every drop reason in the event log, with one example
                context.log.warning(
                    f"synthetic_qa dropped {row['count']} × {row['reason']}, e.g. {row['example']}"
                )
            if drops:
                stats_meta["drops"] = md_table(
                    drops, ["reason", "count", "example"], max_rows=50, max_chars=300
                )
        write_jsonl(manifest["path"], (r.to_dict() for r in records))
    if not records:
        raise dg.Failure(
            description="synthetic_qa produced no pairs",
            metadata={k: v for k, v in stats_meta.items() if isinstance(v, (int, dg.MetadataValue))},
        )
    manifest.update({"n_pairs": len(records), "generator": generator_name})
    preview = [
        {"query": r.query, "positives": len(r.positive_chunk_ids), "type": r.query_type, "doc": r.doc_id}
        for r in records
    ]
    return dg.Output(
        manifest,
        data_version=_content_version(manifest["path"], manifest.get("extra_chunks_path")),
        metadata={
            "pairs": len(records),
            "generator": generator_name,
            "generator_model": model_name,
            **stats_meta,
            "preview": md_table(preview, ["query", "positives", "type", "doc"]),
            "artifact_path": dg.MetadataValue.path(manifest["path"]),
            **meta,
        },
    )


# -------------------------------------------------------------------------------------------------- split
@dg.asset(
    group_name=GROUP,
    kinds={"python", "json"},
    code_version="1",
    description="Train/val/test split by document (no test document in train) and the frozen BEIR eval folder.",
    check_specs=[dg.AssetCheckSpec("no_document_leakage", asset="split_sets")],
)
def split_sets(
    context: dg.AssetExecutionContext,
    config: SplitConfig,
    store: ArtifactStore,
    corpus_chunks: dict,
    synthetic_qa: dict,
):
    from embed_assets.prep import split_by_document, write_eval_beir
    from embed_assets.storage import read_json, write_json, write_jsonl

    records = _load_qa(synthetic_qa["path"])
    eval_dir = store.root_path() / "eval_beir"
    frozen_file = eval_dir / "embed_assets_eval.json"
    frozen = None if config.regenerate_eval or not frozen_file.exists() else read_json(frozen_file)
    split = split_by_document(
        records,
        ratios=(config.train_ratio, config.val_ratio, config.test_ratio),
        small_data_threshold=config.small_data_threshold,
        seed=config.seed,
        frozen_test_docs=frozen["test_docs"] if frozen else (),
    )
    if frozen is None:
        counts = write_eval_beir(eval_dir, split.test, _pool(corpus_chunks, synthetic_qa))
        # Written last: its presence marks the eval folder as complete and frozen.
        write_json(frozen_file, {"test_docs": split.docs["test"], "created_by_run": context.run_id, **counts})
        context.log.info(f"froze a new eval set in {eval_dir}: {counts}")
    else:
        counts = {k: frozen[k] for k in ("corpus", "queries", "qrels")}
        context.log.info(f"reusing the frozen eval set of run {frozen['created_by_run']} ({eval_dir})")
    out = store.run_dir("split_sets", context.run_id)
    paths = {}
    for name in ("train", "val", "test"):
        paths[name] = str(out / f"{name}.jsonl")
        write_jsonl(paths[name], (r.to_dict() for r in getattr(split, name)))
    leakage = split.leakage()
    yield dg.Output(
        {
            **paths,
            "eval_beir": str(eval_dir),
            "train_docs": split.docs["train"],
            "test_docs": split.docs["test"],
        },
        data_version=_content_version(*paths.values(), str(frozen_file)),
        metadata={
            "train_pairs": len(split.train),
            "val_pairs": len(split.val),
            "test_pairs": len(split.test),
            "documents_train_val_test": f"{len(split.docs['train'])}/{len(split.docs['val'])}/{len(split.docs['test'])}",
            "ratios_used": str(split.ratios),
            "leakage_documents": leakage,
            "eval_frozen_reused": frozen is not None,
            "eval_queries": counts["queries"],
            "eval_corpus_passages": counts["corpus"],
            "eval_beir": dg.MetadataValue.path(str(eval_dir)),
            "artifact_path": dg.MetadataValue.path(str(out)),
        },
    )
    yield dg.AssetCheckResult(
        check_name="no_document_leakage",
        passed=leakage == 0,
        metadata={"documents_in_train_and_eval": leakage},
    )


# ------------------------------------------------------------------------------------------------- mining
@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "faiss"},
    code_version="1",
    tags=GPU_TAGS,
    op_tags=GPU_OP_TAGS,
    pool=GPU_POOL,
    description="Hard negatives for every training query, mined with the base model from non-test passages "
    "(positives and near-copies masked, 'perc' margin), one row per positive (multi-hop unrolled).",
)
def mined_negatives(
    context: dg.AssetExecutionContext,
    config: MiningConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    corpus_chunks: dict,
    synthetic_qa: dict,
    split_sets: dict,
) -> dg.Output[dict]:
    from embed_assets.mining import mine_pool
    from embed_assets.models import load_sentence_transformer
    from embed_assets.storage import write_jsonl

    device = model.torch_device()
    st_model = load_sentence_transformer(model.base_model, device=device)
    test_docs = set(split_sets["test_docs"])
    # Test passages are never training data, not even as negatives.
    pool = [c for c in _pool(corpus_chunks, synthetic_qa) if c.doc_id not in test_docs]
    train = _load_qa(split_sets["train"])
    meta: dict[str, Any] = {}
    with timed(meta, "mining_seconds_total"):
        result = mine_pool(
            st_model,
            train,
            pool,
            store.cache_dir("embeddings"),
            model_fingerprint=_fingerprint(model.base_model, model.passage_prompt),
            query_prompt=model.query_prompt or None,
            passage_prompt=model.passage_prompt or None,
            batch_size=config.batch_size,
            progress=context.log.info,
            num_negatives=config.hard_negatives_to_mine,
            range_min=config.range_min,
            range_max=config.range_max,
            relative_margin=config.relative_margin,
            absolute_margin=config.absolute_margin,
            sampling_strategy=config.sampling_strategy,
            use_faiss=config.use_faiss,
        )
    rows = [r.__dict__ for r in result.rows]
    out = store.run_dir("mined_negatives", context.run_id) / "mined.jsonl"
    write_jsonl(out, rows)
    preview = [
        {
            "query": r["query"],
            "hardest_negative": r["negative_texts"][0] if r["negative_texts"] else "",
            "pos_score": r["positive_score"],
            "neg_score": r["negative_scores"][0] if r["negative_scores"] else "",
        }
        for r in rows
    ]
    return dg.Output(
        {"path": str(out), "n_rows": len(rows)},
        data_version=_content_version(str(out)),
        metadata={
            **result.as_metadata(),
            **meta,
            "candidate_passages": len(pool),
            "device": device,
            "preview": md_table(preview, ["query", "hardest_negative", "pos_score", "neg_score"]),
            "artifact_path": dg.MetadataValue.path(str(out)),
        },
    )


# --------------------------------------------------------------------------------------------- checkpoint
@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "huggingface"},
    code_version="1",
    tags=GPU_TAGS,
    op_tags=GPU_OP_TAGS,
    pool=GPU_POOL,
    description="The fine-tuned sentence-transformers model (MNRL over mined negatives + in-batch negatives). "
    "Resumes from the last trainer checkpoint after an interruption.",
)
def checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    tracking: MLflowTracking,
    corpus_chunks: dict,
    synthetic_qa: dict,
    split_sets: dict,
    mined_negatives: dict,
) -> dg.Output[dict]:
    from dataclasses import asdict

    from embed_assets.storage import read_jsonl
    from embed_assets.tracking import plot_training_curves, png_data_uri, redact_uri
    from embed_assets.training import TrainSettings, last_complete_checkpoint, train, training_rows
    from embed_assets.training_cli import distributed_processes, run_distributed, write_spec

    options = config.model_dump()
    num_gpus = options.pop("num_gpus", 1)
    settings = TrainSettings(**options, query_prompt=model.query_prompt, passage_prompt=model.passage_prompt)
    rows = training_rows(read_jsonl(mined_negatives["path"]), settings.negatives_per_row)
    val = _val_set(split_sets, corpus_chunks, synthetic_qa)
    device = model.torch_device()
    nproc = distributed_processes(num_gpus, device, _cuda_devices(device))
    if num_gpus > 1 and nproc == 1:
        context.log.warning(
            f"num_gpus={num_gpus} but only one usable CUDA device for {device!r}: one process"
        )
    # Stable per (data, model, settings, world size): a killed run resumes from its last trainer checkpoint.
    data_hash = hashlib.sha256(Path(mined_negatives["path"]).read_bytes()).hexdigest()[:16]
    work = store.cache_dir("train") / _fingerprint(
        data_hash, model.base_model, settings.__dict__, *([nproc] if nproc > 1 else [])
    )
    run_dir = store.run_dir("checkpoint", context.run_id)
    out = run_dir / "model"

    tracker = tracking.tracker(store.root_path())
    mlflow_run_id = None
    if tracker is not None:
        try:
            # A training resumed from its trainer checkpoint continues its interrupted MLflow run.
            mlflow_run_id, reopened = tracker.resume_or_start(
                work / "mlflow_run_id.txt",
                resuming=last_complete_checkpoint(work) is not None,
                run_name=f"checkpoint-{context.run_id[:8]}",
                tags={
                    "dagster/run_id": context.run_id,
                    "dagster/asset": "checkpoint",
                    "base_model": model.base_model,
                },
            )
            tracker.log_params(
                mlflow_run_id,
                {
                    **asdict(settings),
                    "base_model": model.base_model,
                    "device": device,
                    "num_processes": nproc,
                    "data/train_rows": len(rows),
                    "data/train_queries": len({r["anchor"] for r in rows}),
                    "data/val_queries": len(val["queries"]) if val else 0,
                    "data/val_passages": len(val["corpus"]) if val else 0,
                    "data/sdg_pairs": synthetic_qa.get("n_pairs"),
                    "data/sdg_generator": synthetic_qa.get("generator"),
                    "data/mined_rows_sha256": data_hash,
                },
            )
        except Exception as e:  # fail before spending compute, with a way out
            raise dg.Failure(
                description=f"MLflow tracking at {redact_uri(tracker.tracking_uri)} failed: {e}. Fix the "
                "tracking resource's tracking_uri, or set resources.tracking.config.enabled: false."
            ) from e
        context.log.info(f"MLflow run {mlflow_run_id} ({tracker!r}){' reopened' if reopened else ''}")
    context.log.info(f"training on {len(rows)} rows on {device} x{nproc}; trainer checkpoints in {work}")
    try:
        if nproc > 1:
            spec = write_spec(
                work / "ddp",
                base_model=model.base_model,
                rows=rows,
                work_dir=work,
                out_dir=out,
                settings=settings,
                device="cuda",
                val=val,
                tracking={
                    "run_id": mlflow_run_id,
                    "experiment": tracker.experiment,
                    "artifact_root": str(store.root_path()),
                }
                if tracker is not None
                else None,
            )
            report = run_distributed(
                spec, nproc, progress=context.log.info, tracking_uri=tracker.tracking_uri if tracker else None
            )
        else:
            report = train(
                model.base_model,
                rows,
                work,
                out,
                settings,
                device=device,
                val=val,
                progress=context.log.info,
                callbacks=[tracker.callback(mlflow_run_id)] if tracker is not None else [],
            )
    except BaseException:
        if tracker is not None:
            _quietly(context, "marking the MLflow run failed", tracker.finish, mlflow_run_id, "FAILED")
        raise
    png = plot_training_curves(
        report.loss_curve,
        report.eval_curve,
        run_dir / "training_curves.png",
        title=f"checkpoint {context.run_id[:8]}",
    )
    mlflow_meta: dict[str, Any] = {}
    if tracker is not None:
        try:
            summary = {
                k: v for k, v in report.as_metadata().items() if k not in ("model_dir", "resumed_from")
            }
            tracker.log_metrics(mlflow_run_id, summary, step=report.steps, prefix="checkpoint/")
            tracker.log_file(mlflow_run_id, png, "plots")
            tracker.log_model_dir(mlflow_run_id, out, "model")
            tracker.finish(mlflow_run_id)
            mlflow_meta = _mlflow_metadata(tracker.link(mlflow_run_id))
        except Exception as e:  # the model is trained and saved: report the tracking problem, keep the result
            context.log.warning(f"MLflow logging after training failed: {e}")
            mlflow_meta = {"mlflow_error": str(e)[:500]}
    curve = [{"step": s, "loss": v} for s, v in report.loss_curve]
    return dg.Output(
        {
            "model_dir": str(out),
            "device": device,
            "base_model": model.base_model,
            "mlflow_run_id": mlflow_run_id,
        },
        metadata={
            **{k: v for k, v in report.as_metadata().items() if v is not None and k != "model_dir"},
            "num_processes": nproc,
            "loss_curve": md_table(curve, ["step", "loss"], max_rows=40),
            "training_curves": dg.MetadataValue.md(f"![loss and eval curves]({png_data_uri(png)})"),
            "training_curves_png": dg.MetadataValue.path(str(png)),
            **mlflow_meta,
            "model_dir": dg.MetadataValue.path(str(out)),
            "trainer_work_dir": dg.MetadataValue.path(str(work)),
        },
    )


def _cuda_devices(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def _quietly(context: dg.AssetExecutionContext, what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        context.log.warning(f"{what}: {e}")


def _mlflow_metadata(link) -> dict[str, Any]:
    """Asset metadata for an MLflow run: id, a clickable URL, and how to open a local store."""
    meta: dict[str, Any] = {
        "mlflow_run_id": link.run_id,
        "mlflow_experiment_id": link.experiment_id,
        "mlflow_tracking_uri": link.tracking_uri,
        "mlflow": dg.MetadataValue.md(link.markdown()),
    }
    if link.url:
        meta["mlflow_run"] = dg.MetadataValue.url(link.url)
    if link.ui_command:
        meta["mlflow_ui_command"] = link.ui_command
    return meta


def _val_set(split_sets: dict, corpus_chunks: dict, synthetic_qa: dict) -> dict[str, Any] | None:
    val = _load_qa(split_sets["val"])
    if not val:
        return None
    test_docs = set(split_sets["test_docs"])
    corpus = {c.chunk_id: c.text for c in _pool(corpus_chunks, synthetic_qa) if c.doc_id not in test_docs}
    return {
        "queries": {r.qa_id: r.query for r in val},
        "corpus": corpus,
        "relevant_docs": {r.qa_id: {c for c in r.positive_chunk_ids if c in corpus} for r in val},
    }


# ------------------------------------------------------------------------------------------------- metrics
@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "json"},
    code_version="1",
    tags=GPU_TAGS,
    op_tags=GPU_OP_TAGS,
    pool=GPU_POOL,
    description="BEIR metrics (nDCG/Recall/Precision/MAP/MRR @1,5,10,100) of the base and fine-tuned models "
    "on the frozen eval set, with deltas.",
    check_specs=[
        dg.AssetCheckSpec(
            "finetuned_not_worse_than_base",
            asset="beir_metrics",
            description="Fails when fine-tuned nDCG@10 is below the base beyond bootstrap noise (95% CI).",
        )
    ],
)
def beir_metrics(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    store: ArtifactStore,
    model: EmbeddingModel,
    tracking: MLflowTracking,
    split_sets: dict,
    checkpoint: dict,
):
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import (
        compare,
        encode_and_search,
        evaluate,
        markdown_table,
        paired_bootstrap,
        per_query_ndcg,
    )
    from embed_assets.models import load_sentence_transformer
    from embed_assets.storage import write_json

    corpus, queries, qrels = load_beir_folder(split_sets["eval_beir"], split="test")
    device = model.torch_device()
    k_max = max(config.k_values)
    results, runs, seconds = {}, {}, {}
    for name, path in (("base", model.base_model), ("finetuned", checkpoint["model_dir"])):
        start = time.monotonic()
        st_model = load_sentence_transformer(path, device=device)
        runs[name], _ = encode_and_search(
            st_model,
            queries,
            corpus,
            top_k=k_max,
            batch_size=config.batch_size,
            query_prompt=model.query_prompt or None,
            corpus_prompt=model.passage_prompt or None,
        )
        results[name] = evaluate(qrels, runs[name], k_values=config.k_values)
        seconds[name] = round(time.monotonic() - start, 2)
    rows = compare(results["base"], results["finetuned"])
    out = store.run_dir("beir_metrics", context.run_id)
    write_json(
        out / "metrics.json", {"base": results["base"], "finetuned": results["finetuned"], "deltas": rows}
    )
    write_json(out / "run_finetuned.json", runs["finetuned"])
    write_json(out / "run_base.json", runs["base"])
    delta, lo, hi = paired_bootstrap(
        per_query_ndcg(qrels, runs["base"], 10),
        per_query_ndcg(qrels, runs["finetuned"], 10),
        n=config.noise_bootstrap_samples,
        seed=0,
    )
    table_md = markdown_table(rows)
    mlflow_meta = _log_beir_to_mlflow(
        context,
        tracking,
        store,
        checkpoint,
        results,
        rows,
        table_md,
        (delta, lo, hi),
        len(queries),
        len(corpus),
    )
    yield dg.Output(
        {"path": str(out / "metrics.json"), "base": results["base"], "finetuned": results["finetuned"]},
        metadata={
            "ndcg@10_base": results["base"]["NDCG@10"],
            "ndcg@10_finetuned": results["finetuned"]["NDCG@10"],
            "ndcg@10_delta": results["finetuned"]["NDCG@10"] - results["base"]["NDCG@10"],
            "recall@10_finetuned": results["finetuned"]["Recall@10"],
            "metrics": dg.MetadataValue.md(table_md),
            "eval_queries": len(queries),
            "eval_passages": len(corpus),
            "device": device,
            "seconds_base": seconds["base"],
            "seconds_finetuned": seconds["finetuned"],
            "artifact_path": dg.MetadataValue.path(str(out / "metrics.json")),
            **mlflow_meta,
        },
    )
    yield dg.AssetCheckResult(
        check_name="finetuned_not_worse_than_base",
        passed=bool(hi >= 0),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"ndcg@10_delta": delta, "ci95_low": lo, "ci95_high": hi},
    )


def _log_beir_to_mlflow(
    context: dg.AssetExecutionContext,
    tracking: MLflowTracking,
    store: ArtifactStore,
    checkpoint: dict,
    results: dict,
    rows: list,
    table_md: str,
    bootstrap: tuple,
    n_queries: int,
    n_passages: int,
) -> dict[str, Any]:
    """Log the BEIR table into the checkpoint's MLflow run (a new run if that one is not in this store)."""
    tracker = tracking.tracker(store.root_path())
    if tracker is None:
        return {}
    try:
        run_id = checkpoint.get("mlflow_run_id")
        if not tracker.run_exists(run_id):
            if run_id:
                context.log.warning(f"the checkpoint's MLflow run {run_id} is not in {tracker!r}: new run")
            run_id = tracker.start_run(
                run_name=f"beir_metrics-{context.run_id[:8]}",
                tags={"dagster/run_id": context.run_id, "model_dir": checkpoint["model_dir"]},
            )
        tracker.set_tags(run_id, {"dagster/beir_metrics_run_id": context.run_id})
        delta, lo, hi = bootstrap
        tracker.log_beir(
            run_id,
            results["base"],
            results["finetuned"],
            rows,
            table_md,
            extra={
                "ndcg_at_10_delta_mean": delta,
                "ndcg_at_10_delta_ci95_low": lo,
                "ndcg_at_10_delta_ci95_high": hi,
                "eval_queries": n_queries,
                "eval_passages": n_passages,
            },
            source=f"dagster run {context.run_id}",
        )
        tracker.finish(run_id)
        return _mlflow_metadata(tracker.link(run_id))
    except Exception as e:  # the metrics are computed and saved; tracking trouble is reported, not fatal
        context.log.warning(f"MLflow logging of the BEIR metrics failed: {e}")
        return {"mlflow_error": str(e)[:500]}


# --------------------------------------------------------------------------------------------------- export
@dg.asset(
    group_name=GROUP,
    kinds={"onnx"},
    code_version="1",
    description="The checkpoint as ONNX (fp32 + int8 dynamic quantization; pooling and normalization in the "
    "graph, dynamic batch/sequence axes), gated by parity with the torch checkpoint: cosine, and BEIR metrics "
    "within NIM's tolerance (0.03 at @1, 0.01 at @5+). int8 is served only if it passes.",
    check_specs=[
        dg.AssetCheckSpec(
            "onnx_fp32_parity",
            asset="onnx_model",
            description="min cosine ≥ 0.999 and metrics within tolerance",
        ),
        dg.AssetCheckSpec(
            "onnx_int8_parity",
            asset="onnx_model",
            description="int8 metrics within tolerance (else not served)",
        ),
    ],
)
def onnx_model(
    context: dg.AssetExecutionContext,
    config: ExportConfig,
    store: ArtifactStore,
    split_sets: dict,
    checkpoint: dict,
    beir_metrics: dict,
):
    from embed_assets.beir_io import load_beir_folder
    from embed_assets.export import export_onnx
    from embed_assets.metrics import evaluate_encoder, metric_parity
    from embed_assets.serving.embedder import OnnxEmbedder

    out = store.run_dir("onnx_model", context.run_id) / "onnx"
    report = export_onnx(
        checkpoint["model_dir"],
        str(out),
        opset=config.opset,
        quantize_int8=config.quantize_int8,
        model_name=config.served_model_name,
    )
    meta = report.as_metadata()
    corpus, queries, qrels = load_beir_folder(split_sets["eval_beir"], split="test")
    reference = beir_metrics["finetuned"]
    k_values = sorted({int(k.rsplit("@", 1)[1]) for k in reference})
    parity: dict[str, tuple[bool, list[dict]]] = {}
    for variant in ["fp32"] + (["int8"] if report.int8_path else []):
        embedder = OnnxEmbedder(str(out), variant=variant)
        metrics, _ = evaluate_encoder(
            lambda texts, kind, e=embedder: e.encode(texts, input_type=kind, truncate="END"),
            corpus,
            queries,
            qrels,
            k_values,
        )
        parity[variant] = metric_parity(reference, metrics)
        meta[f"{variant}_ndcg@10"] = metrics.get("NDCG@10", float("nan"))
    int8_ok = "int8" in parity and parity["int8"][0]
    yield dg.Output(
        {"onnx_dir": str(out), "int8_ok": int8_ok},
        metadata={
            **meta,
            "int8_served_allowed": int8_ok,
            **{
                f"{v}_metric_parity": dg.MetadataValue.md(_parity_md(rows)) for v, (_, rows) in parity.items()
            },
            "onnx_dir": dg.MetadataValue.path(str(out)),
        },
    )
    fp32_ok = meta.get("fp32_cosine_min", 0.0) >= 0.999 and parity["fp32"][0]
    yield dg.AssetCheckResult(
        check_name="onnx_fp32_parity",
        passed=bool(fp32_ok),
        metadata={
            "fp32_cosine_min": meta.get("fp32_cosine_min", 0.0),
            "worst_metric_diff": _worst(parity["fp32"][1]),
        },
    )
    yield dg.AssetCheckResult(
        check_name="onnx_int8_parity",
        passed=bool(int8_ok),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "int8_cosine_min": meta.get("int8_cosine_min", 0.0),
            "worst_metric_diff": _worst(parity["int8"][1]) if "int8" in parity else 0.0,
        },
    )


def _worst(rows: list[dict]) -> float:
    return max((abs(r["diff"]) for r in rows), default=0.0)


def _parity_md(rows: list[dict]) -> str:
    lines = ["| metric | checkpoint | exported | diff | tolerance | ok |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['metric']} | {r['reference']:.4f} | {r['candidate']:.4f} | {r['diff']:+.4f} | {r['tolerance']} | "
        f"{'✅' if r['ok'] else '❌'} |"
        for r in rows
    ]
    return "\n".join(lines)


@dg.asset(
    group_name=GROUP,
    kinds={"tensorrt"},
    code_version="1",
    tags=GPU_TAGS,
    op_tags=GPU_OP_TAGS,
    pool=GPU_POOL,
    output_required=False,
    description="A TensorRT plan (profiles batch 1/16/64, seq 3/128/512). Materialized only where CUDA and "
    "TensorRT exist; otherwise skipped, with the reason recorded as an observation.",
)
def tensorrt_engine(
    context: dg.AssetExecutionContext, config: TensorRTConfig, store: ArtifactStore, onnx_model: dict
):
    from embed_assets.export import build_tensorrt_engine, tensorrt_profiles, tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        context.log.warning(f"tensorrt_engine skipped: {reason}")
        yield dg.AssetObservation(asset_key="tensorrt_engine", metadata={"skipped": True, "reason": reason})
        return
    out = store.run_dir("tensorrt_engine", context.run_id) / "model.plan"
    profiles = tensorrt_profiles()
    start = time.monotonic()
    build_tensorrt_engine(
        str(Path(onnx_model["onnx_dir"]) / "model.onnx"), str(out), fp16=config.fp16, profiles=profiles
    )
    yield dg.Output(
        {"engine_path": str(out)},
        metadata={
            "engine": dg.MetadataValue.path(str(out)),
            "fp16": config.fp16,
            "profiles": dg.MetadataValue.json(profiles),
            "build_seconds": round(time.monotonic() - start, 2),
        },
    )


# -------------------------------------------------------------------------------------------------- service
@dg.asset(
    group_name=GROUP,
    kinds={"fastapi", "onnx"},
    code_version="1",
    description="A running NIM-compatible /v1/embeddings endpoint serving the ONNX model (local default, a "
    "managed background process), or the rendered real NIM deployment (docker / Kubernetes).",
    check_specs=[
        dg.AssetCheckSpec(
            "served_metrics_parity",
            asset="nim_service",
            description="BEIR metrics measured through the endpoint within NIM's tolerance of the checkpoint's.",
        )
    ],
)
def nim_service(
    context: dg.AssetExecutionContext,
    config: ServiceConfig,
    store: ArtifactStore,
    split_sets: dict,
    beir_metrics: dict,
    onnx_model: dict,
):
    from embed_assets.serving.process import start_server, stop_server

    out = store.run_dir("nim_service", context.run_id)
    if config.mode != "local":
        yield from _deploy_nim(context, config, onnx_model, out, split_sets, beir_metrics)
        return
    variant = config.variant
    if variant == "int8" and not onnx_model.get("int8_ok"):
        context.log.warning("int8 model failed its metric parity gate; serving fp32 instead")
        variant = "fp32"
    previous = _previous_service_pid(context)
    if previous:
        stop_server(previous)
        context.log.info(f"stopped the previous server (pid {previous})")
    handle = start_server(
        onnx_model["onnx_dir"],
        host=config.host,
        port=config.port,
        variant=variant,
        api_key_env=config.api_key_env or None,
        log_path=str(out / "server.log"),
    )
    context.log.info(f"serving {variant} at {handle.url} (pid {handle.pid})")
    yield from _served_outputs(
        context,
        config,
        handle.url,
        split_sets,
        beir_metrics,
        {"pid": handle.pid, "variant": variant, "log": str(out / "server.log")},
    )


def _served_outputs(context, config, url: str, split_sets: dict, beir_metrics: dict, extra: dict):
    """Probe the endpoint, evaluate through it, and yield the output and the served-parity check."""
    import os

    import httpx

    from embed_assets.beir_io import load_beir_folder
    from embed_assets.metrics import evaluate_encoder, metric_parity
    from embed_assets.serving.client import EndpointEncoder

    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    client = EndpointEncoder(url, api_key=api_key)
    ready = httpx.get(f"{url}/v1/health/ready", timeout=10).json()
    corpus, queries, qrels = load_beir_folder(split_sets["eval_beir"], split="test")
    reference = beir_metrics["finetuned"]
    start = time.monotonic()
    served, _ = evaluate_encoder(
        client.encode, corpus, queries, qrels, sorted({int(k.rsplit("@", 1)[1]) for k in reference})
    )
    eval_seconds = round(time.monotonic() - start, 2)
    client.close()
    ok, rows = metric_parity(reference, served)
    yield dg.Output(
        {"url": url, "mode": config.mode, "model": client.model, **extra},
        metadata={
            "url": dg.MetadataValue.url(url),
            "served_model": client.model,
            "health": dg.MetadataValue.json(ready),
            "served_ndcg@10": served.get("NDCG@10", float("nan")),
            "served_eval_seconds": eval_seconds,
            "served_metric_parity": dg.MetadataValue.md(_parity_md(rows)),
            **{k: (dg.MetadataValue.path(v) if k == "log" else v) for k, v in extra.items()},
        },
    )
    yield dg.AssetCheckResult(
        check_name="served_metrics_parity", passed=bool(ok), metadata={"worst_metric_diff": _worst(rows)}
    )


def _deploy_nim(context, config, onnx_model: dict, out: Path, split_sets: dict, beir_metrics: dict):
    """Render (and with ``apply`` run) the real NIM container deployment for the exported model."""
    import subprocess

    from embed_assets.serving.deploy import render_nim_manifests

    rendered = render_nim_manifests(onnx_model["onnx_dir"], str(out))
    applied = ""
    if config.apply:
        if config.mode == "docker":
            cmd = ["bash", rendered["docker-run.sh"]]
        else:
            cmd = ["kubectl", "apply", "-f", rendered["kubernetes.yaml"]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise dg.Failure(description=f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        applied = proc.stdout[-2000:]
    context.log.info(f"rendered NIM deployment files: {sorted(rendered)}")
    extra = {"applied": config.apply, "apply_output": applied, **rendered}
    if config.endpoint_url:
        from embed_assets.serving.process import wait_ready

        if not wait_ready(config.endpoint_url, config.ready_timeout_s):
            raise dg.Failure(
                description=f"{config.endpoint_url}/v1/health/ready not ready after {config.ready_timeout_s}s"
            )
        yield from _served_outputs(context, config, config.endpoint_url, split_sets, beir_metrics, extra)
        return
    yield dg.Output(
        {"mode": config.mode, "manifests": rendered},
        metadata={
            "mode": config.mode,
            **{k: (dg.MetadataValue.path(v) if k in rendered else v) for k, v in extra.items()},
        },
    )
    yield dg.AssetCheckResult(
        check_name="served_metrics_parity",
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"not_evaluated": "set endpoint_url to the deployed NIM's URL to evaluate it"},
    )


def _previous_service_pid(context: dg.AssetExecutionContext) -> int | None:
    event = context.instance.get_latest_materialization_event(dg.AssetKey("nim_service"))
    if event is None or event.asset_materialization is None:
        return None
    pid = event.asset_materialization.metadata.get("pid")
    return int(pid.value) if pid is not None else None


ALL_ASSETS = [
    corpus,
    corpus_chunks,
    synthetic_qa,
    split_sets,
    mined_negatives,
    checkpoint,
    beir_metrics,
    onnx_model,
    tensorrt_engine,
    nim_service,
]
