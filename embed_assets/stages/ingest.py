"""Stage 1 — ingest and chunk: a folder of documents becomes content-hashed passages.

:func:`read_documents` (asset ``corpus``) scans the folder, rejecting unusable files with a reason;
:func:`chunk_documents` (asset ``corpus_chunks``) cuts every document into sentence-based passages of at most
``passage_max_length`` tokens of the base model's tokenizer. ``chunk_id`` is a hash of the text, so a passage
keeps its id across runs as long as its text does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from embed_assets.stages.common import (
    Manifest,
    Markdown,
    ModelSpec,
    PathRef,
    StageContext,
    Table,
    file_digest,
    fingerprint,
    reuse_unchanged,
)

#: The bundled sample corpus (Python Language Reference topics, PSF License v2).
SAMPLE_CORPUS = str(Path(__file__).resolve().parents[2] / "sample_corpus")
#: Documents listed in the corpus manifest itself (all of them are in its index file).
PREVIEW_DOCS = 10
#: A progress line every this many documents read.
PROGRESS_DOCS = 10_000
#: Upper edges of the token-length histogram in the ``corpus_chunks`` metadata.
TOKEN_BINS = (32, 64, 128, 256, 384, 512)


class CorpusSettings(BaseModel):
    """Which files of a folder make the corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(default=SAMPLE_CORPUS, description="Folder of documents, read recursively.")
    extensions: list[str] = Field(default=[".txt", ".md"], description="File suffixes to read.")
    exclude_globs: list[str] = Field(
        default=["README.md", "LICENSE*"],
        description="File-name patterns to skip (not reported as rejected).",
    )
    max_file_bytes: int = Field(
        default=5_000_000, gt=0, description="Larger files are rejected with a reason."
    )


class ChunkSettings(BaseModel):
    """How documents are cut into passages (the passage length has its one owner here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sentences_per_chunk: int = Field(default=5, ge=1, description="Consecutive sentences per passage.")
    passage_max_length: int = Field(
        default=512, ge=16, description="Max tokens per passage (model tokenizer)."
    )
    documents_per_shard: int = Field(
        default=5000,
        ge=1,
        description="Documents per chunking shard: each shard is one step (a process under the multiprocess "
        "executor, a pod under k8s), and an unchanged shard is not cut again. A step costs about a second to "
        "start, and 5,000 documents of ~1,500 words take about 30 s of one core and under 1 GiB, so the start "
        "stays a few percent of a shard's work; lower it for more parallel pods on a cluster.",
    )
    max_shards: int = Field(default=64, ge=1, description="At most this many shards (parallel steps).")
    step_min_changed_documents: int = Field(
        default=250,
        ge=0,
        description="A changed shard gets a step of its own only when more than this many of its documents are "
        "new or edited (on a first run, all are); one with fewer is cut inside the merge step. Cutting a document "
        "takes ~5 ms of one core, starting a step ~1 s (tens of seconds as a pod), so an edit of 1 % of a large "
        "corpus, which touches every shard, re-cuts its few documents per shard in one step instead of starting "
        "a step per shard. 0: every changed shard is a step.",
    )


@dataclass
class CorpusManifest(Manifest):
    """The scanned corpus: ``path`` holds one JSON line per document (id, text, hash, bytes)."""

    path: str
    root: str
    n_docs: int
    n_bytes: int
    data_version: str
    rejected: list[dict[str, str]] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)  # the first few: id, bytes, hash (no text)
    index_path: str = ""  # Parquet: doc_id, bytes, hash, offset of every document (the manifest stays small)
    seconds: float = 0.0

    def index(self) -> list[tuple[str, str]]:
        """``(doc_id, content hash)`` of every document, in corpus order."""
        if not self.index_path:  # a manifest of an older version lists every document itself
            return [(d["doc_id"], d["hash"]) for d in self.documents]
        import pyarrow.parquet as pq

        table = pq.read_table(self.index_path, columns=["doc_id", "hash"])
        return list(zip(table.column("doc_id").to_pylist(), table.column("hash").to_pylist(), strict=True))

    def offsets(self) -> list[int]:
        """Each document's byte offset in ``documents.jsonl``, in corpus order (empty for a manifest of an older
        version, whose index has none)."""
        import pyarrow.parquet as pq

        if not self.index_path or "offset" not in pq.read_schema(self.index_path).names:
            return []
        return pq.read_table(self.index_path, columns=["offset"]).column("offset").to_pylist()

    def metadata(self) -> dict[str, Any]:
        return {
            "documents": self.n_docs,
            "bytes": self.n_bytes,
            "rejected_files": len(self.rejected),
            "rejected": Table(["path", "reason"], self.rejected, max_rows=50),
            "preview": Table(["doc_id", "bytes", "hash"], self.documents),
            "corpus_root": PathRef(self.root),
            "corpus_hash": self.data_version,
            "artifact_path": PathRef(self.path),
            "seconds": self.seconds,
        }


@dataclass
class ChunksManifest(Manifest):
    """The passages: ``path`` is a Parquet file of chunk_id, doc_id, text, sentence span, n_tokens."""

    path: str
    n_chunks: int
    n_docs: int
    corpus_root: str
    data_version: str
    duplicates_dropped: int = 0
    unchanged_since_last_run: int = 0
    documents_chunked: int = 0  # documents cut in this run (new or changed content)
    # documents whose chunks came from the chunk cache (same content, same settings)
    documents_reused: int = 0
    documents_from_shard_output: int = 0  # of those: rows taken as they were from the shard's last output
    cache_evicted: int = 0  # cached documents no longer in the corpus, removed from the cache
    shards: int = 1  # parallel chunking steps (ChunkSettings.documents_per_shard)
    shards_unchanged: int = 0  # shards whose output of an earlier run was used as it is
    shards_cut_in_merge: int = 0  # changed shards cut in the merge step (too few changes for a step)
    shard_fingerprints: list[str] = field(default_factory=list)  # what the passages were made of, by shard
    tokens_mean: float = 0.0
    tokens_max: int = 0
    token_histogram: list[int] = field(default_factory=list)  # passages per TOKEN_BINS bucket
    preview: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {
            "chunks": self.n_chunks,
            "documents": self.n_docs,
            "duplicate_chunks_dropped": self.duplicates_dropped,
            "chunks_unchanged_since_last_run": self.unchanged_since_last_run,
            "chunks_new": self.n_chunks - self.unchanged_since_last_run,
            "documents_chunked": self.documents_chunked,
            "documents_reused_from_cache": self.documents_reused,
            "documents_from_last_shard_output": self.documents_from_shard_output,
            "chunk_cache_evicted": self.cache_evicted,
            "shards": self.shards,
            "shards_unchanged": self.shards_unchanged,
            "shards_cut_in_merge_step": self.shards_cut_in_merge,
            "tokens_mean": self.tokens_mean,
            "tokens_max": self.tokens_max,
            "token_histogram": Markdown(histogram_md(self.token_histogram, TOKEN_BINS)),
            "preview": Table(["chunk_id", "doc_id", "n_tokens", "text"], self.preview),
            "artifact_path": PathRef(self.path),
            "seconds": self.seconds,
        }

    def load(self) -> list[Any]:
        """The chunks as :class:`embed_assets.records.Chunk` objects."""
        return load_chunks(self.path)

    def batches(self) -> Iterator[list[Any]]:
        """The chunks in batches of whole documents (:func:`iter_chunk_batches`)."""
        return iter_chunk_batches(self.path)


def load_chunks(path: str) -> list[Any]:
    """Read a chunks Parquet file (this stage's, or passages that came with user data)."""
    from embed_assets.records import Chunk
    from embed_assets.storage import read_parquet

    return [Chunk.from_dict(r) for r in read_parquet(path)]


#: Passages per batch when a stage streams the chunks file (about 15 MB of Python objects).
CHUNK_BATCH_ROWS = 10_000


def iter_chunk_batches(path: str, batch_rows: int = CHUNK_BATCH_ROWS) -> Iterator[list[Any]]:
    """Stream a chunks Parquet file as lists of :class:`embed_assets.records.Chunk`, about ``batch_rows`` each,
    never cutting through a document (a document's passages are consecutive in this stage's file).

    Args:
        path: A chunks Parquet file.
        batch_rows: Rows read at a time.

    Yields:
        Batches of chunks, in file order.
    """
    import pyarrow.parquet as pq

    from embed_assets.records import Chunk

    carry: list[Any] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        chunks = carry + [Chunk.from_dict(r) for r in batch.to_pylist()]
        last_doc = chunks[-1].doc_id
        cut = len(chunks)
        while cut > 0 and chunks[cut - 1].doc_id == last_doc:
            cut -= 1
        if cut == 0:  # one document so far: keep reading
            carry = chunks
            continue
        yield chunks[:cut]
        carry = chunks[cut:]
    if carry:
        yield carry


def read_documents(settings: CorpusSettings, ctx: StageContext) -> CorpusManifest:
    """Scan the corpus folder.

    Args:
        settings: Folder, extensions, excludes, size limit.
        ctx: Where to write ``documents.jsonl``.

    Returns:
        A :class:`CorpusManifest`; rejected files are listed with their reason (and logged).

    Raises:
        FileNotFoundError: the folder does not exist.
        embed_assets.corpus.EmptyCorpusError: no usable document.
    """
    import json
    import time

    from embed_assets.corpus import corpus_version, empty_corpus_error, scan_documents
    from embed_assets.storage import atomic_path, write_parquet

    start = time.monotonic()
    out = ctx.out_dir("corpus") / "documents.jsonl"
    # id, size, hash and byte offset in documents.jsonl of every document: no text is kept
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    with atomic_path(out) as tmp, tmp.open("wb") as f:  # one document in memory at a time
        offset = 0
        for d in scan_documents(
            settings.path,
            settings.extensions,
            settings.exclude_globs,
            settings.max_file_bytes,
            rejected=rejected,
        ):
            line = (json.dumps(d.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            rows.append({"doc_id": d.doc_id, "bytes": d.n_bytes, "hash": d.content_hash, "offset": offset})
            offset += len(line)
            if len(rows) % PROGRESS_DOCS == 0:
                ctx.log.info(f"corpus: {len(rows)} documents read")
    root = Path(settings.path).expanduser()
    if not rows:
        raise empty_corpus_error(root, rejected, settings.extensions)
    index = out.with_name("index.parquet")
    write_parquet(index, rows)
    ctx.publish(out, index)
    for r in rejected:
        ctx.log.warning(f"rejected {r['path']}: {r['reason']}")
    return CorpusManifest(
        path=str(out),
        root=str(root),
        n_docs=len(rows),
        n_bytes=sum(r["bytes"] for r in rows),
        data_version=corpus_version((r["doc_id"], r["hash"]) for r in rows),
        rejected=rejected,
        documents=[{k: r[k] for k in ("doc_id", "bytes", "hash")} for r in rows[:PREVIEW_DOCS]],
        index_path=str(index),
        seconds=round(time.monotonic() - start, 2),
    )


@dataclass
class ShardPlan(Manifest):
    """One shard of the corpus for :func:`chunk_shard`: which documents, and a fingerprint of their content.

    Attributes:
        index: Shard number (``0 … n_shards-1``); a document's shard is a stable hash of its id.
        n_shards: How many shards the corpus was cut into.
        fingerprint: Hash of the chunking settings, the tokenizer and the shard's (doc id, content hash) list:
            the name of the shard's output, so an unchanged shard is never cut or written again.
        doc_ids: The shard's documents, in corpus order.
        positions: Their lines in the corpus's ``documents.jsonl``.
        offsets: Their byte offsets in it (only those lines are read: a shard step never scans the corpus).
        hashes: Their content hashes (a document whose hash is unchanged keeps its rows of the shard's last
            output).
    """

    index: int
    n_shards: int
    fingerprint: str
    doc_ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)

    def subset(self, keep: Callable[[str], bool]) -> ShardPlan:
        """The plan restricted to the documents ``keep`` accepts (same shard, same fingerprint)."""
        import dataclasses

        rows = [i for i, d in enumerate(self.doc_ids) if keep(d)]

        def pick(values: list[Any]) -> list[Any]:
            return [values[i] for i in rows] if values else []

        return dataclasses.replace(
            self,
            doc_ids=pick(self.doc_ids),
            positions=pick(self.positions),
            offsets=pick(self.offsets),
            hashes=pick(self.hashes),
        )

    @property
    def mapping_key(self) -> str:
        """The shard's name in Dagster (its step is ``chunk_shard[<mapping_key>]``)."""
        return f"shard_{self.index:03d}"


@dataclass
class ShardPlanSet(Manifest):
    """Every shard of the corpus (what the merge step combines; only changed shards get a step)."""

    shards: list[ShardPlan] = field(default_factory=list)


@dataclass
class ShardManifest(Manifest):
    """One shard's passages: ``path`` is a Parquet file named by the shard's fingerprint."""

    index: int
    fingerprint: str
    path: str
    n_docs: int
    n_chunks: int
    documents_chunked: int = 0
    documents_reused: int = 0
    documents_from_shard_output: int = 0  # unchanged documents whose rows came from the shard's last output
    output_reused: bool = False  # the shard was unchanged: its file from an earlier run was used as it is
    cut_in_merge: bool = False  # too few changed documents for a step of its own (step_min_changed_documents)
    seconds: float = 0.0


def shard_of(doc_id: str, n_shards: int) -> int:
    """A document's shard: a stable hash of its id (the same across runs, processes and machines)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") % n_shards


def _chunk_namespace(settings: ChunkSettings, model: ModelSpec) -> str:
    """Cache namespace of chunks cut under these settings with this tokenizer."""
    tokenizer = Path(model.path()) / "tokenizer.json"
    chunking = settings.model_dump(include={"sentences_per_chunk", "passage_max_length"})
    return fingerprint(chunking, model.base_model, file_digest(str(tokenizer)) if tokenizer.is_file() else "")


def plan_shards(corpus: CorpusManifest, settings: ChunkSettings, model: ModelSpec) -> list[ShardPlan]:
    """Cut the corpus into ``ceil(documents / documents_per_shard)`` shards (at most ``max_shards``).

    Args:
        corpus: The scanned corpus (its manifest lists every document's id and content hash).
        settings: The chunking settings (shard size included).
        model: The base model (its tokenizer is part of each shard's fingerprint).

    Returns:
        The non-empty shards, by index.
    """
    import math

    n_shards = max(1, min(settings.max_shards, math.ceil(corpus.n_docs / settings.documents_per_shard)))
    namespace = _chunk_namespace(settings, model)
    members: list[list[tuple[str, str]]] = [[] for _ in range(n_shards)]
    positions: list[list[int]] = [[] for _ in range(n_shards)]
    offsets: list[list[int]] = [[] for _ in range(n_shards)]
    starts = corpus.offsets()
    for line, (doc_id, content_hash) in enumerate(corpus.index()):
        shard = shard_of(doc_id, n_shards)
        members[shard].append((doc_id, content_hash))
        positions[shard].append(line)
        if starts:
            offsets[shard].append(starts[line])
    return [
        ShardPlan(
            i,
            n_shards,
            fingerprint(namespace, docs),
            [doc_id for doc_id, _ in docs],
            positions[i],
            offsets[i],
            [content_hash for _, content_hash in docs],
        )
        for i, docs in enumerate(members)
        if docs
    ]


def pending_shards(
    plans: list[ShardPlan], settings: ChunkSettings, model: ModelSpec, ctx: StageContext
) -> list[ShardPlan]:
    """The shards that need a step of their own: no output under their fingerprint yet, and more than
    ``settings.step_min_changed_documents`` documents that the shard's last output does not hold as they are
    (the others are cut by :func:`finish_shards` in the merge step)."""
    done = ctx.cache_dir("chunk_shards")
    namespace = _chunk_namespace(settings, model)
    out = []
    for p in plans:
        if (done / f"{p.fingerprint}.parquet").is_file():
            continue
        _, kept = _last_output(done / _slot_name(namespace, p), p)
        if len(p.doc_ids) - len(kept) > settings.step_min_changed_documents:
            out.append(p)
    return out


def finish_shards(
    corpus: CorpusManifest,
    plan: list[ShardPlan],
    stepped: list[ShardManifest],
    settings: ChunkSettings,
    model: ModelSpec,
    ctx: StageContext,
) -> list[ShardManifest]:
    """Every shard's output, for :func:`merge_shards`: those of the shard steps (``stepped``), the unchanged
    shards' earlier outputs (looked up), and the shards :func:`pending_shards` left to the merge step, cut here
    (``cut_in_merge``), on as many threads as the step has cores (the tokenizer and Parquet release the GIL)."""
    import dataclasses
    import os
    from concurrent.futures import ThreadPoolExecutor

    ran = {s.index: s for s in stepped}
    left = [p for p in plan if p.index not in ran]

    def cut(p: ShardPlan) -> ShardManifest:
        manifest = chunk_shard(corpus, p, settings, model, ctx)
        return manifest if manifest.output_reused else dataclasses.replace(manifest, cut_in_merge=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(len(left), cores))  # sched_getaffinity: the cores a pod or taskset grants (Linux)
    with ThreadPoolExecutor(workers, thread_name_prefix="chunk-shard") as pool:
        ran.update((m.index, m) for m in pool.map(cut, left))
    return [ran[p.index] for p in plan]


def _slot_name(namespace: str, shard: ShardPlan) -> str:
    """The file naming a shard's last output (its fingerprint) and that output's documents and hashes."""
    return f"slot-{namespace}-{shard.n_shards}-{shard.index:03d}.json"


def chunk_shard(
    corpus: CorpusManifest, shard: ShardPlan, settings: ChunkSettings, model: ModelSpec, ctx: StageContext
) -> ShardManifest:
    """Cut one shard's documents into passages (the ``chunk_shard`` step; :func:`chunk_documents` runs all).

    A document whose content was cut before under the same settings and tokenizer takes its chunks from the
    chunk cache (``ctx.cache_dir("chunks")``, one SQLite file keyed by content hash); a shard whose fingerprint
    has an output already is not cut at all. Only the shard's documents are held in memory (the corpus file is
    streamed).

    Args:
        corpus: The scanned corpus.
        shard: Which documents (from :func:`plan_shards`).
        settings: Sentences per passage and the passage length limit.
        model: The base model (its tokenizer measures passage length).
        ctx: The chunk cache and the shard outputs live in its caches.

    Returns:
        A :class:`ShardManifest`.
    """
    import time

    from embed_assets.chunking import chunk_documents_batched, tokenizer_counter
    from embed_assets.kvstore import KVStore
    from embed_assets.records import Chunk, Document
    from embed_assets.storage import write_json

    start = time.monotonic()
    out = ctx.cache_dir("chunk_shards") / f"{shard.fingerprint}.parquet"
    if out.is_file():
        import pyarrow.parquet as pq

        return ShardManifest(
            shard.index, shard.fingerprint, str(out), len(shard.doc_ids), pq.read_metadata(out).num_rows,
            documents_reused=len(shard.doc_ids), documents_from_shard_output=len(shard.doc_ids), output_reused=True,
            seconds=round(time.monotonic() - start, 2),
        )  # fmt: skip
    namespace = _chunk_namespace(settings, model)
    slot = ctx.cache_dir("chunk_shards") / _slot_name(namespace, shard)
    last_path, kept = _last_output(slot, shard)
    docs = [Document(**d) for d in _read_lines(corpus.path, shard.subset(lambda d: d not in kept))]
    with KVStore(ctx.cache_dir("chunks") / "chunks.sqlite") as cache:
        cached = cache.get_many(namespace, (d.content_hash for d in docs))
        # Each new content is cut once, as its first document (a later document with the same text only adds
        # duplicate chunks, which the merge drops).
        todo, seen = [], set(cached)
        for d in docs:
            if d.content_hash not in seen:
                seen.add(d.content_hash)
                todo.append(d)
        count_tokens = tokenizer_counter(model.path()) if todo else None
        cut = {
            d.content_hash: chunks
            for d, chunks in zip(
                todo,
                chunk_documents_batched(
                    todo, settings.sentences_per_chunk, settings.passage_max_length, count_tokens
                )
                if todo
                else [],
                strict=True,
            )
        }
        cache.put_many(
            namespace,
            {
                h: [{k: v for k, v in c.to_dict().items() if k != "doc_id"} for c in cs]
                for h, cs in cut.items()
            },
        )
    # Every row names its own document (a copy of another document's text included).
    rows = [
        {**c.to_dict(), "doc_id": d.doc_id}
        if d.content_hash in cut
        else Chunk.from_dict({**c, "doc_id": d.doc_id}).to_dict()
        for d in docs
        for c in cut.get(d.content_hash, cached.get(d.content_hash, ()))
    ]
    n_rows = _write_shard_file(out, rows, last_path, kept, shard.doc_ids)
    write_json(
        slot, {"fingerprint": shard.fingerprint, "docs": dict(zip(shard.doc_ids, shard.hashes, strict=True))}
    )
    return ShardManifest(
        shard.index, shard.fingerprint, str(out), len(shard.doc_ids), n_rows,
        documents_chunked=len(todo), documents_reused=len(shard.doc_ids) - len(todo),
        documents_from_shard_output=len(kept), seconds=round(time.monotonic() - start, 2),
    )  # fmt: skip


def _last_output(slot: Path, shard: ShardPlan) -> tuple[Path | None, set[str]]:
    """The shard's last output (from its slot record) and the documents of ``shard`` it holds unchanged.

    A slot names the shard (settings, tokenizer, shard count, index); its record lists the documents and content
    hashes of the last output written for it, so a shard with a few edited documents re-reads and re-builds only
    those.
    """
    import pyarrow.parquet as pq

    from embed_assets.records import Chunk

    record = _slot_record(slot) if shard.hashes else None
    if record is None:
        return None, set()
    path = slot.with_name(f"{record['fingerprint']}.parquet")
    if not path.is_file() or set(pq.read_schema(path).names) != set(Chunk.__dataclass_fields__):
        return None, set()  # gone, or written by a version with other columns
    last: dict[str, str] = record["docs"]
    kept = {d for d, h in zip(shard.doc_ids, shard.hashes, strict=True) if last.get(d) == h}
    return (path, kept) if kept else (None, set())


def _slot_record(slot: Path) -> dict[str, Any] | None:
    """A shard slot's record (``fingerprint`` and ``docs``), or ``None`` when absent or unreadable."""
    from embed_assets.storage import read_json

    try:
        record = read_json(slot)
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("fingerprint"), str)
        and isinstance(record.get("docs"), dict)
    )
    return record if ok else None


def _write_shard_file(
    out: Path, rows: list[dict[str, Any]], last_path: Path | None, kept: set[str], doc_order: list[str]
) -> int:
    """Write the shard's rows (new ``rows`` plus the ``kept`` documents' rows of ``last_path``) in corpus order.

    Returns:
        How many rows were written.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from embed_assets.storage import atomic_path, write_parquet

    if last_path is None:
        write_parquet(out, rows)
        return len(rows)
    last = pq.read_table(last_path)
    last = last.filter(pc.is_in(last.column("doc_id"), value_set=pa.array(sorted(kept), pa.string())))
    table = pa.concat_tables([last, pa.Table.from_pylist(rows, schema=last.schema)]) if rows else last
    # A document's rows are all old or all new, each in their order: a stable sort by document keeps them.
    position = pc.index_in(table.column("doc_id"), value_set=pa.array(doc_order, pa.string())).to_numpy(
        zero_copy_only=False
    )
    table = table.take(pa.array(np.argsort(position, kind="stable")))
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def _read_lines(path: str, shard: ShardPlan) -> list[dict[str, Any]]:
    """The shard's documents from ``documents.jsonl``: read at their byte offsets (only their lines are read), or
    with a plan of an older version by line number or id."""
    import json

    from embed_assets.storage import iter_jsonl

    out: list[dict[str, Any]] = []
    if shard.offsets:
        with open(path, "rb") as f:
            for offset in shard.offsets:
                f.seek(offset)
                out.append(json.loads(f.readline()))
    elif shard.positions:
        wanted_lines = set(shard.positions)
        with open(path, "rb") as f:
            out = [json.loads(raw) for line, raw in enumerate(f) if line in wanted_lines]
    else:
        wanted = set(shard.doc_ids)
        out = [d for d in iter_jsonl(path) if d["doc_id"] in wanted]
    if [d["doc_id"] for d in out] != shard.doc_ids:
        raise ValueError(f"{path} does not match the shard plan (was the corpus re-read in between?)")
    return out


def merge_shards(
    corpus: CorpusManifest,
    shards: list[ShardManifest],
    settings: ChunkSettings,
    model: ModelSpec,
    ctx: StageContext,
    previous: ChunksManifest | None = None,
    seconds: float | None = None,
) -> ChunksManifest:
    """Concatenate the shards' passages in corpus order, each chunk text once (its first document).

    Columnar throughout (Arrow tables, never a Python object per passage). Removes the chunk-cache entries and
    shard outputs no current document uses.

    Args:
        corpus: The scanned corpus (its document order is the passages' order).
        shards: Every shard's output.
        settings: The chunking settings (the chunk cache's namespace).
        model: The base model (the chunk cache's namespace).
        ctx: Where to write ``chunks.parquet``.
        previous: The last run's chunks, to report how many passages are unchanged.
        seconds: Wall time to report (default: this merge's).

    Returns:
        A :class:`ChunksManifest`; its ``data_version`` is a hash of the sorted chunk ids.
    """
    import dataclasses
    import time

    import pyarrow.compute as pc

    from embed_assets.kvstore import KVStore

    start = time.monotonic()
    shards = sorted(shards, key=lambda s: s.index)
    fingerprints = [s.fingerprint for s in shards]
    # Nothing changed: the last run's passages are this run's (not read, not written again).
    reused = reuse_unchanged(
        previous,
        lambda p: (
            p.shard_fingerprints == fingerprints
            and p.corpus_root == corpus.root
            and all(s.output_reused for s in shards)
        ),
        lambda p: [p.path],
        ctx,
        f"chunking: all {len(shards)} shards unchanged, passages of the last run reused",
        start,
        unchanged_since_last_run=previous.n_chunks if previous else 0,
        documents_chunked=0,
        documents_reused=corpus.n_docs,
        documents_from_shard_output=corpus.n_docs,
        cache_evicted=0,
        shards_unchanged=len(shards),
    )
    if reused is not None:
        return dataclasses.replace(reused, seconds=round(seconds, 2)) if seconds is not None else reused
    index = corpus.index()
    out = ctx.out_dir("corpus_chunks") / "chunks.parquet"
    merged = _merge_shard_files([s.path for s in shards], [doc_id for doc_id, _ in index], out)
    ctx.publish(out)
    with KVStore(ctx.cache_dir("chunks") / "chunks.sqlite") as cache:
        evicted = cache.evict(_chunk_namespace(settings, model), {h for _, h in index})
    live = {s.fingerprint for s in shards}
    for stale in ctx.cache_dir("chunk_shards").glob("*.parquet"):
        if stale.stem not in live:
            stale.unlink(missing_ok=True)
    for slot in ctx.cache_dir("chunk_shards").glob("slot-*.json"):
        record = _slot_record(slot)
        if record is None or not slot.with_name(f"{record['fingerprint']}.parquet").is_file():
            slot.unlink(missing_ok=True)  # its output was evicted (another shard count or settings)
    chunked = sum(s.documents_chunked for s in shards)
    ctx.log.info(
        f"chunking: {chunked} documents cut, {corpus.n_docs - chunked} reused from the chunk cache, "
        f"{sum(s.output_reused for s in shards)}/{len(shards)} shards unchanged, "
        f"{sum(s.cut_in_merge for s in shards)} cut in the merge step"
        + (f", {evicted} stale cache entries evicted" if evicted else "")
    )
    before = _chunk_ids(previous)
    lengths = merged.n_tokens
    return ChunksManifest(
        path=str(out),
        n_chunks=len(merged.chunk_ids),
        n_docs=merged.n_docs,
        corpus_root=corpus.root,
        data_version=_ids_version(merged.chunk_ids),
        duplicates_dropped=int(sum(s.n_chunks for s in shards) - len(merged.chunk_ids)),
        unchanged_since_last_run=int(pc.sum(pc.is_in(merged.chunk_ids, value_set=before)).as_py() or 0)
        if before is not None and len(before)
        else 0,
        documents_chunked=chunked,
        documents_reused=corpus.n_docs - chunked,
        documents_from_shard_output=sum(s.documents_from_shard_output for s in shards),
        cache_evicted=evicted,
        shards=len(shards),
        shards_unchanged=sum(s.output_reused for s in shards),
        shards_cut_in_merge=sum(s.cut_in_merge for s in shards),
        shard_fingerprints=fingerprints,
        tokens_mean=round(float(lengths.mean()), 1) if len(lengths) else 0.0,
        tokens_max=int(lengths.max()) if len(lengths) else 0,
        token_histogram=bucket_counts(lengths, TOKEN_BINS),
        preview=merged.preview,
        seconds=round(seconds if seconds is not None else time.monotonic() - start, 2),
    )


@dataclass
class _Merged:
    chunk_ids: Any  # pyarrow Array of the written chunk ids, in file order
    n_tokens: Any  # numpy array, in file order
    n_docs: int
    preview: list[dict[str, Any]]


#: Rows a merge window writes at once (and the batch size shard files are read in).
MERGE_WINDOW_ROWS = 50_000


def _merge_shard_files(paths: list[str], doc_order: list[str], out: Path) -> _Merged:
    """Write the shards' rows in corpus order, each chunk id once (its first row), holding only the id columns
    of the whole corpus and one window of texts.

    Custom because neither pyarrow nor Dagster merges sorted Parquet files: every shard file is in corpus order
    already (a shard lists its documents in corpus order), so the output is a k-way merge by document position,
    written window by window (``MERGE_WINDOW_ROWS``) through one ``ParquetWriter``.

    Args:
        paths: The shard files (any order).
        doc_order: Every document id in corpus order.
        out: The merged file (written atomically).

    Returns:
        What the manifest reports about the written rows.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from embed_assets.storage import atomic_path

    opened = [(p, pq.ParquetFile(p)) for p in paths]
    paths = [p for p, f in opened if f.metadata.num_rows]
    files = [f for _, f in opened if f.metadata.num_rows]
    corpus_ids = pa.array(doc_order, type=pa.string())
    # Only the id columns of the whole corpus are in memory: the document position and chunk id of every row.
    ids = [f.read(columns=["doc_id", "chunk_id", "n_tokens"]) for f in files]
    positions = [
        _corpus_positions(t.column("doc_id"), corpus_ids, p) for t, p in zip(ids, paths, strict=True)
    ]
    sizes = np.array([len(p) for p in positions], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    all_pos = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    order = np.argsort(all_pos, kind="stable")  # corpus order; a document's rows stay in their order
    chunk_col = pa.chunked_array([t.column("chunk_id") for t in ids], type=pa.string()) if ids else None
    keep = np.zeros(len(all_pos), dtype=bool)
    if len(all_pos):
        codes = pc.dictionary_encode(chunk_col.take(pa.array(order))).combine_chunks().indices.to_numpy()
        _, first = np.unique(codes, return_index=True)  # each chunk id's first row in corpus order
        keep[order[first]] = True
    tokens_all = (
        np.concatenate([t.column("n_tokens").to_numpy() for t in ids]) if ids else np.zeros(0, dtype=np.int64)
    )
    doc_all = pa.chunked_array([t.column("doc_id") for t in ids], type=pa.string()) if ids else None
    del ids

    readers = [_ShardReader(f) for f in files]
    kept_order = order[keep[order]]
    sorted_pos = all_pos[order]
    preview: list[dict[str, Any]] = []
    schema = (
        files[0].schema_arrow
        if files
        else pa.schema([("chunk_id", pa.string()), ("doc_id", pa.string()), ("n_tokens", pa.int64())])
    )
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        start_doc, n_docs = 0, len(doc_order)
        while start_doc < n_docs:
            end_doc = _window_end(sorted_pos, start_doc, n_docs)
            # The window's rows of each shard are the next rows of its file (files are in corpus order).
            parts, part_keep, part_pos = [], [], []
            for s, reader in enumerate(readers):
                rows = positions[s]
                lo, hi = np.searchsorted(rows, start_doc), np.searchsorted(rows, end_doc)
                if hi > lo:
                    parts.append(reader.take(int(hi - lo)))
                    part_keep.append(keep[offsets[s] + lo : offsets[s] + hi])
                    part_pos.append(rows[lo:hi])
            start_doc = end_doc
            if not parts:
                continue
            window = pa.concat_tables(parts)
            w_order = np.argsort(np.concatenate(part_pos), kind="stable")
            w_order = w_order[np.concatenate(part_keep)[w_order]]
            window = window.take(pa.array(w_order))
            writer.write_table(window)
            if len(preview) < 10:
                preview += window.slice(0, 10 - len(preview)).to_pylist()
    written_ids = chunk_col.take(pa.array(kept_order)) if chunk_col is not None else pa.array([], pa.string())
    return _Merged(
        chunk_ids=written_ids,
        n_tokens=tokens_all[kept_order],
        n_docs=len(pc.unique(doc_all.take(pa.array(kept_order)))) if doc_all is not None else 0,
        preview=preview,
    )


def _corpus_positions(doc_ids: Any, corpus_ids: Any, path: str) -> Any:
    """Each row's document position in the corpus (the rows of a shard file are in corpus order)."""
    import numpy as np
    import pyarrow.compute as pc

    found = pc.index_in(doc_ids, value_set=corpus_ids)
    if found.null_count:
        raise ValueError(f"{path} holds documents that are not in the corpus (was it re-read in between?)")
    positions = found.to_numpy(zero_copy_only=False).astype(np.int64)
    if len(positions) > 1 and bool(np.any(np.diff(positions) < 0)):
        raise ValueError(f"{path} is not in corpus order (a shard file of another corpus?)")
    return positions


def _window_end(sorted_pos: Any, start_doc: int, n_docs: int) -> int:
    """The first document position after a window of about ``MERGE_WINDOW_ROWS`` rows from ``start_doc``."""
    import numpy as np

    first = int(np.searchsorted(sorted_pos, start_doc))
    last = first + MERGE_WINDOW_ROWS
    if last >= len(sorted_pos):
        return n_docs
    return max(int(sorted_pos[last]), start_doc + 1)


class _ShardReader:
    """The next ``n`` rows of a Parquet file, read batch by batch (holds at most one batch beyond them)."""

    def __init__(self, file: Any) -> None:
        import pyarrow as pa

        self._batches = file.iter_batches(batch_size=8192)
        self._buffer = pa.Table.from_batches([], schema=file.schema_arrow)

    def take(self, n: int) -> Any:
        import pyarrow as pa

        parts = [self._buffer]
        have = self._buffer.num_rows
        while have < n:
            batch = next(self._batches)
            parts.append(pa.Table.from_batches([batch]))
            have += batch.num_rows
        table = pa.concat_tables(parts)
        self._buffer = table.slice(n)
        return table.slice(0, n)


def _ids_version(chunk_ids: Any) -> str:
    """A hash of the sorted chunk ids (the passages' data version), fed in batches."""
    import hashlib

    import pyarrow.compute as pc

    h = hashlib.sha256()
    ids = pc.take(chunk_ids, pc.sort_indices(chunk_ids))
    for i in range(0, len(ids), MERGE_WINDOW_ROWS):
        h.update("\n".join(ids.slice(i, MERGE_WINDOW_ROWS).to_pylist()).encode() + b"\n")
    return h.hexdigest()[:16]


def chunk_documents(
    corpus: CorpusManifest,
    settings: ChunkSettings,
    model: ModelSpec,
    ctx: StageContext,
    previous: ChunksManifest | None = None,
) -> ChunksManifest:
    """Cut every document into passages, counting tokens with the base model's tokenizer: every shard of
    :func:`plan_shards` through :func:`chunk_shard` in this process, then :func:`merge_shards` (the asset runs
    the shards as parallel steps instead).

    Args:
        corpus: The scanned corpus.
        settings: Sentences per passage, the passage length limit, the shard size.
        model: The base model (its tokenizer measures passage length).
        ctx: Where to write ``chunks.parquet``.
        previous: The last run's chunks, to report how many passages are unchanged.

    Returns:
        A :class:`ChunksManifest`; its ``data_version`` is a hash of the sorted chunk ids.
    """
    import time

    start = time.monotonic()
    shards = [
        chunk_shard(corpus, plan, settings, model, ctx) for plan in plan_shards(corpus, settings, model)
    ]
    return merge_shards(corpus, shards, settings, model, ctx, previous, seconds=time.monotonic() - start)


def chunks_from_beir(folder: str | Path, ctx: StageContext, doc_id_from: str = "id_prefix") -> ChunksManifest:
    """A BEIR corpus as this pipeline's passages (for benchmarks, or a user whose corpus is already cut).

    Each passage becomes one chunk whose text is BEIR's encoding of it (``title + " " + text``), whose
    ``source_id`` is its BEIR id, and whose document is, with ``doc_id_from="id_prefix"``, the id without its
    last ``-suffix`` (``covidqa-630-000`` → ``covidqa-630``), so the split keeps a document's passages together;
    ``"id"`` makes every passage its own document. Identical texts are kept once (first id wins).

    Args:
        folder: A BEIR folder (only ``corpus.jsonl`` is read).
        ctx: Where to write ``chunks.parquet``.
        doc_id_from: ``"id_prefix"`` or ``"id"``.

    Returns:
        A :class:`ChunksManifest` (``corpus_root`` = the folder).
    """
    import time

    from embed_assets.beir_io import CORPUS_FILE, _load_corpus
    from embed_assets.metrics import document_text
    from embed_assets.records import Chunk, content_hash
    from embed_assets.storage import write_parquet

    if doc_id_from not in ("id_prefix", "id"):
        raise ValueError(f"doc_id_from must be 'id_prefix' or 'id', got {doc_id_from!r}")
    start = time.monotonic()
    root = Path(folder).resolve()
    chunks, seen = [], set()
    for pid, doc in _load_corpus(root / CORPUS_FILE).items():
        text = document_text(doc)
        cid = content_hash(text)
        if cid in seen:
            continue
        seen.add(cid)
        doc_id = pid.rsplit("-", 1)[0] if doc_id_from == "id_prefix" and "-" in pid else pid
        title = " ".join(str(doc.get("title") or "").split())
        chunks.append(Chunk(cid, doc_id, text, 0, 0, n_tokens=len(text.split()), source_id=pid, title=title))
    out = ctx.out_dir("corpus_chunks") / "chunks.parquet"
    write_parquet(out, [c.to_dict() for c in chunks])
    return ChunksManifest(
        path=str(out),
        n_chunks=len(chunks),
        n_docs=len({c.doc_id for c in chunks}),
        corpus_root=str(root),
        data_version=fingerprint(sorted(seen)),
        preview=[c.to_dict() for c in chunks[:10]],
        seconds=round(time.monotonic() - start, 2),
    )


def _chunk_ids(previous: ChunksManifest | None) -> Any:
    """Chunk ids of an earlier run as a pyarrow array (``None`` when there is none or its file is gone)."""
    if previous is None:
        return None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(previous.path, columns=["chunk_id"]).column("chunk_id").combine_chunks()
    except (OSError, ValueError, KeyError):  # pyarrow's ArrowInvalid is a ValueError
        return None


def bucket_counts(values: Any, bins: tuple[int, ...]) -> list[int]:
    """How many values fall at or below each upper edge of ``bins`` (and above the last)."""
    import numpy as np

    where = np.searchsorted(np.asarray(bins), np.asarray(values, dtype=np.int64), side="left")
    return np.bincount(where, minlength=len(bins) + 1).tolist()


def histogram_md(counts: list[int], bins: tuple[int, ...]) -> str:
    """A Markdown histogram of :func:`bucket_counts` output."""
    labels = [f"≤{b}" for b in bins] + [f">{bins[-1]}"]
    peak = max(counts) or 1
    lines = ["| tokens | passages | |", "|---|---|---|"]
    lines += [
        f"| {lab} | {c} | {'█' * round(20 * c / peak)} |" for lab, c in zip(labels, counts, strict=True)
    ]
    return "\n".join(lines)
