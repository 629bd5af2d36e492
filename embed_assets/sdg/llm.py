"""Synthetic QA generation with any OpenAI-compatible chat-completions endpoint (DESIGN §2, LLM path).

Per document the chunks are cut into bundles of ``bundle_size`` consecutive chunks; each bundle is one prompt
whose numbered segments map back to chunk ids. Per bundle:

1. artifact extraction (one call),
2. QA generation with query/reasoning types, complexity and the segment ids each pair needs (one call),
3. dedup: question embeddings, cosine > ``dedup_threshold`` within the bundle (before judging, to save
   tokens) and then across the bundles of the same document,
4. quality judge (one call for all the bundle's pairs), keep ``overall >= quality_threshold``.

Protocol (what a real server needs, not only the scripted stub):

- Every answer is decoded and validated against its pydantic model (:mod:`embed_assets.sdg.schemas`). An
  invalid answer gets one *repair* request that holds only the validation error, a bounded excerpt of the
  bad answer and the schema (never the whole conversation again, so it fits wherever the first prompt fit);
  after that the bundle is dropped (``invalid_json``) instead of crashing the run.
- Each step has its own completion budget (``max_tokens_*``). When the server rejects a request for
  exceeding its context, the budget shrinks to what the context leaves (when the error says how much) and
  the request is sent again; when the prompt alone is too long, the bundle is split in halves and each half
  is generated on its own; a single chunk that still does not fit is dropped (``context_overflow``).
- Requests are streamed (SSE) by default: on a client timeout the connection is closed, which makes
  servers such as llama.cpp, vLLM and Ollama stop generating instead of finishing an answer nobody reads.
  A stream that ends before its first event is asked once more without streaming, because
  llama-cpp-python reports errors (a context overflow) only on non-streamed requests.
- At start, ``GET /v1/models`` checks that the configured models are served (an error names the served
  ones) and a 1-token request for a non-existent model tells whether the server ignores model names (it
  then answers every request with whatever it loaded: logged as a warning).
- Transport problems (429, 5xx, timeouts, broken streams) are retried with exponential backoff, honoring
  ``Retry-After``. HTTP 401/403/404 stop the run (wrong key, model or URL).
- Every dropped item is counted under a reason with one example (:meth:`SDGStats.drop_table`), bundle
  drops are logged as warnings on the logger passed in (the Dagster asset passes ``context.log``).

Every validated answer is cached immediately under a hash of the exact request (model, messages, sampling
settings), so re-runs and interrupted runs never repeat a finished call. The API key is sent as a Bearer
header only; it is never part of a cache key, a cache entry, a log line, the statistics or an exception.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import httpx
import numpy as np

from embed_assets.records import Chunk, QARecord, content_hash
from embed_assets.sdg.base import ProgressFn, SDGResult, SDGStats
from embed_assets.sdg.cache import SDGCache
from embed_assets.sdg.runner import ProgressMeter, merge_stats, units_per_document
from embed_assets.sdg.schemas import (
    ARTIFACT_TYPES,
    JUDGE_CRITERIA,
    SCHEMAS,
    AnswerError,
    ExtractionAnswer,
    JudgeAnswer,
    QAAnswer,
    parse_answer,
    schema_text,
    validate_answer,
)
from embed_assets.sdg.settings import SDGSettings

logger = logging.getLogger(__name__)

#: NVIDIA's hosted OpenAI-compatible API, the documented default provider.
DEFAULT_BASE_URL = "https://integrate.api.nvidia.com/v1"
#: The model of the Nemotron embedding recipe's SDG stage on NVIDIA's API.
DEFAULT_MODEL = "nvidia/llama-3.3-nemotron-super-49b-v1.5"

STEPS: tuple[str, ...] = ("artifact_extraction", "qa_generation", "quality_judge")
_PROMPT_FILES = {
    "system": "system.txt",
    "artifact_extraction": "extraction.txt",
    "qa_generation": "qa_generation.txt",
    "quality_judge": "judge.txt",
    "repair": "repair.txt",
}
#: The first words of the model-name probe (one 1-token request at start).
MODEL_CHECK_PROMPT = "embed_assets model-name check: reply with OK."
#: HTTP statuses that mean the configuration is wrong (key, model or URL): retrying cannot help.
_FATAL_STATUS = (401, 403, 404)
_MAX_RETRY_AFTER_S = 600.0
#: Retries with a smaller completion budget after context overflows, per request.
_MAX_SHRINKS = 2
#: Smallest completion budget worth sending after a shrink (below it the prompt is what must shrink).
_MIN_COMPLETION_TOKENS = 128
_CALL_CACHE_VERSION = "llm-call-v2"
_GENERATOR_VERSION = "llm-qa-v2"
#: The settings that shape the generated records (part of the fingerprint). Every other SDGSettings field
#: is listed in _NOT_OUTPUT_FIELDS; a test keeps the two lists complete.
_OUTPUT_FIELDS: tuple[str, ...] = (
    "num_pairs",
    "max_artifacts_per_type",
    "bundle_size",
    "min_complexity",
    "quality_threshold",
    "dedup_threshold",
    "temperature",
    "top_p",
    "max_tokens_extraction",
    "max_tokens_qa",
    "max_tokens_judge",
    "json_mode",
    "system_prompt_as_user",
    "system_suffix",
    "repair_excerpt_chars",
)
_NOT_OUTPUT_FIELDS: tuple[str, ...] = (
    "generator",
    "user_data_path",
    "corpus_queries_per_pair",
    "queries_per_chunk",
    "min_query_words",
    "max_query_words",
    "seed",
    "offline_queries",  # the offline generator's options: not the LLM's output
    "keyword_terms",
    "cloze_mask_rate",
    "dedup_model",  # resolved (with embed_model) and fingerprinted as such
    "extraction_model",  # resolved per step and fingerprinted as such
    "qa_model",
    "judge_model",
    "stream",
    "timeout_s",
    "max_parallel_requests",
    "max_retries",
    "backoff_base_s",
    "backoff_max_s",
    "check_model",
    "usd_per_1m_prompt_tokens",
    "usd_per_1m_completion_tokens",
)

#: Maps a list of texts to L2-normalized embeddings (one row per text).
Embedder = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class LLMEndpoint:
    """Where the generator sends its requests (the Dagster ``llm`` resource holds these three values).

    Attributes:
        base_url: OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8080/v1``.
        model: The chat model of every step without a per-step override in :class:`SDGSettings`.
        api_key: The key *value* (``None`` for local servers without auth); sent as a Bearer header only.
    """

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url.strip():
            raise ValueError("LLMEndpoint: base_url is empty")
        if not self.model.strip():
            raise ValueError("LLMEndpoint: model is empty")


@dataclass
class EndpointCheck:
    """What the check at start found out.

    Attributes:
        served_models: The ids ``GET /v1/models`` listed (``None``: the server does not list them).
        ignores_model_names: ``True`` when the server answered a request for a model it does not serve,
            ``False`` when it refused it, ``None`` when the probe was inconclusive.
    """

    served_models: list[str] | None = None
    ignores_model_names: bool | None = None


class LLMConfigError(RuntimeError):
    """The endpoint rejected the configuration (HTTP 401/403/404, or the model is not served). Fatal."""


class StepFailed(Exception):
    """One LLM step failed for good; ``reason`` is the ``dropped`` key it is recorded under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ContextOverflow(StepFailed):
    """The prompt does not fit the server's context even with the smallest completion budget."""

    def __init__(self, message: str) -> None:
        super().__init__("context_overflow", message)


class _EmptyStream(Exception):
    """A 200 event stream that ended before its first event (how llama-cpp-python reports errors in streams)."""


class _Retryable(Exception):
    def __init__(self, problem: str, wait_s: float | None = None, timed_out: bool = False) -> None:
        super().__init__(problem)
        self.problem, self.wait_s, self.timed_out = problem, wait_s, timed_out


@dataclass(eq=False)  # exceptions stay hashable
class _Overflow(Exception):
    """A context-overflow answer; the numbers are ``None`` when the server's message does not give them."""

    message: str
    context_tokens: int | None = None
    prompt_tokens: int | None = None


@dataclass
class _Completion:
    content: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def load_prompt(name: str) -> str:
    """Read a prompt template shipped in ``embed_assets/sdg/prompts``.

    Args:
        name: ``"system"``, a step name or ``"repair"``.

    Returns:
        The template text (placeholders look like ``{{name}}``).
    """
    return (
        resources.files("embed_assets.sdg")
        .joinpath("prompts", _PROMPT_FILES[name])
        .read_text(encoding="utf-8")
    )


def render(template: str, **values: Any) -> str:
    """Fill ``{{name}}`` placeholders; a placeholder without a value raises ``KeyError``.

    Args:
        template: The template text.
        **values: Placeholder values (converted with ``str``).

    Returns:
        The rendered prompt.
    """
    out = template
    for name, value in values.items():
        out = out.replace("{{" + name + "}}", str(value))
    start = out.find("{{")
    if start >= 0:
        raise KeyError(f"unfilled placeholder {out[start : out.find('}}', start) + 2]!r}")
    return out


def sentence_transformer_embedder(
    model_name: str = "bundled:all-MiniLM-L6-v2", device: str = "cpu"
) -> Embedder:
    """An :data:`Embedder` backed by a sentence-transformers model, loaded on first use (thread-safe).

    Args:
        model_name: Anything :func:`embed_assets.models.load_sentence_transformer` accepts.
        device: Torch device.

    Returns:
        The embedding function.
    """
    lock = threading.Lock()
    holder: dict[str, Any] = {}

    def embed(texts: list[str]) -> np.ndarray:
        with lock:
            if "model" not in holder:
                from embed_assets.models import load_sentence_transformer

                holder["model"] = load_sentence_transformer(model_name, device=device)
            vectors = holder["model"].encode(
                texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)

    return embed


def format_segments(bundle: Sequence[Chunk]) -> str:
    """Render a bundle's chunks as ``[Segment N]`` blocks (N is 1-based and maps back to the chunk)."""
    return "\n\n".join(f"[Segment {i}]\n{c.text.strip()}" for i, c in enumerate(bundle, start=1))


def excerpt(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` characters, else its start and end joined by a marker.

    Both ends matter for a repair: the start shows the structure, the end where a cut-off answer stopped.
    """
    text = text or ""
    if len(text) <= limit:
        return text
    head = (2 * limit) // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters left out ...]\n{text[-tail:]}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _short(text: str, limit: int = 80) -> str:
    line = _one_line(text)
    return line if len(line) <= limit else line[: limit - 1] + "…"


_CONTEXT_LIMIT = re.compile(r"(?:maximum context length|context (?:window|length|size))\D{0,20}(\d+)", re.I)
_PROMPT_TOKENS = re.compile(
    r"(\d+) in the messages|has (\d+) input tokens|(\d+) (?:prompt|input) tokens", re.I
)
_OVERFLOW_WORDS = re.compile(
    r"context_length_exceeded|exceed_context_size|maximum context length|exceeds? (?:the )?"
    r"(?:available )?context|context (?:window|length|size)",
    re.I,
)


def parse_context_overflow(status: int, text: str) -> _Overflow | None:
    """Recognize a server's "prompt + max_tokens exceed the context" answer.

    Understood: OpenAI's and llama-cpp-python's ``context_length_exceeded`` (``This model's maximum context
    length is 2048 tokens. However, you requested 2592 tokens (2080 in the messages, 512 in the
    completion)``), vLLM's wordings of it and llama.cpp ``llama-server``'s ``exceed_context_size_error``
    (``n_prompt_tokens``, ``n_ctx``).

    Args:
        status: The HTTP status (only 400 and 413 can be an overflow).
        text: The response body.

    Returns:
        The overflow with the context size and prompt tokens when the message gives them, else ``None``.
    """
    if status not in (400, 413) or not _OVERFLOW_WORDS.search(text or ""):
        return None
    context = prompt = None
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            context = err.get("n_ctx")
            prompt = err.get("n_prompt_tokens")
            message = str(err.get("message") or text)
        else:
            message = str(err or text)
    except (ValueError, AttributeError):
        message = text
    found = _CONTEXT_LIMIT.search(message)
    if context is None and found:
        context = int(found.group(1))
    found = _PROMPT_TOKENS.search(message)
    if prompt is None and found:
        prompt = int(next(g for g in found.groups() if g))
    return _Overflow(_one_line(message)[:300], _int_or_none(context), _int_or_none(prompt))


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class _Pair:
    question: str
    answer: str
    query_type: str
    reasoning_type: str
    complexity: int
    segment_ids: list[int]
    chunk_ids: list[str]
    quality: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None


@dataclass
class _BundleOutcome:
    chunks: list[Chunk]
    pairs: list[_Pair]
    stats: SDGStats
    failed: bool


class LLMQAGenerator:
    """The LLM synthetic-QA generator (implements :class:`~embed_assets.sdg.base.QAGenerator`).

    Usable directly (``generate``) or through :func:`embed_assets.sdg.runner.run_generation`, which caches
    whole documents (``units``) on top of this class's per-call cache and calls :meth:`prepare` first.
    """

    name = "llm"

    def __init__(
        self,
        settings: SDGSettings | None = None,
        endpoint: LLMEndpoint | None = None,
        embed_model: str | None = None,
        cache: SDGCache | None = None,
        embedder: Embedder | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        log: logging.Logger | None = None,
    ) -> None:
        """Create the generator.

        Args:
            settings: Generation settings (``generator`` itself is not looked at; default: all defaults).
            endpoint: URL, model and key (default: NVIDIA's API without a key).
            embed_model: Dedup embedding model when ``settings.dedup_model`` is empty (e.g. the base model
                being adapted); else the bundled all-MiniLM-L6-v2.
            cache: Where every finished LLM answer is stored (``None``: no per-call cache).
            embedder: Question embedder for dedup (default: the dedup model, loaded lazily).
            transport: Optional httpx transport (tests, proxies).
            sleep: Used for backoff waits.
            log: Receives the endpoint check's warnings, every dropped bundle (warning) and every dropped
                pair (debug); the Dagster asset passes ``context.log``. Default: this module's logger.
        """
        self.settings = settings or SDGSettings(generator="llm")
        self.endpoint = endpoint or LLMEndpoint()
        self.dedup_model = self.settings.dedup_model or embed_model or "bundled:all-MiniLM-L6-v2"
        self.model = self.model_for("qa_generation")
        self.max_parallel_units = self.settings.max_parallel_requests
        api_key = (self.endpoint.api_key or "").strip() or None  # keys from .env files often end with \n
        self._secret = api_key or ""
        self._cache = cache
        self._embed = embedder or sentence_transformer_embedder(self.dedup_model)
        self._sleep = sleep
        self._log = log or logger
        self._slots = threading.BoundedSemaphore(self.settings.max_parallel_requests)
        self._prompts = {name: load_prompt(name) for name in _PROMPT_FILES}
        self._check_lock = threading.Lock()
        self.endpoint_check: EndpointCheck | None = None
        headers = {"Accept": "application/json, text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            base_url=self.endpoint.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(self.settings.timeout_s),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"LLMQAGenerator(base_url={self.endpoint.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> LLMQAGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model_for(self, step: str) -> str:
        """The model used for ``step`` (one of :data:`STEPS`): the per-step override or the endpoint's."""
        override = {
            "artifact_extraction": self.settings.extraction_model,
            "qa_generation": self.settings.qa_model,
            "quality_judge": self.settings.judge_model,
        }[step]
        return override.strip() or self.endpoint.model

    @property
    def fingerprint(self) -> str:
        """Hash of everything that shapes the output: prompts, schemas, models, sampling and filter settings.

        Not included: the endpoint URL, the key, timeouts, streaming, parallelism, retries and prices.
        """
        material = {
            "version": _GENERATOR_VERSION,
            "prompts": self._prompts,
            "schemas": {k: schema_text(v) for k, v in SCHEMAS.items()},
            "models": {step: self.model_for(step) for step in STEPS},
            "dedup_model": self.dedup_model,
            **{k: getattr(self.settings, k) for k in _OUTPUT_FIELDS},
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]

    def bind_cache(self, cache: SDGCache) -> None:
        """Use ``cache`` for per-call caching unless one was given already (called by ``run_generation``)."""
        if self._cache is None:
            self._cache = cache

    # ------------------------------------------------------------------ the endpoint check

    def prepare(self) -> SDGStats:
        """Check the endpoint once (called by ``run_generation`` before the first uncached unit).

        Returns:
            The check's request counts (``check_requests``).

        Raises:
            LLMConfigError: A configured model is not among the served ones, or the key was rejected.
        """
        stats = SDGStats()
        with self._check_lock:
            if self.endpoint_check is None:
                self.endpoint_check = (
                    self._check_endpoint(stats) if self.settings.check_model else EndpointCheck()
                )
        return stats

    def _check_endpoint(self, stats: SDGStats) -> EndpointCheck:
        url = self.endpoint.base_url
        wanted = sorted({self.model_for(step) for step in STEPS})
        served = self._served_models(stats)
        if served is None:
            self._log.warning(
                f"SDG endpoint check: {url} does not list its models (GET /models); cannot check that "
                f"{', '.join(wanted)} is served."
            )
        else:
            missing = [m for m in wanted if not _is_served(m, served)]
            if missing:
                raise LLMConfigError(
                    f"{url} does not serve model(s) {', '.join(map(repr, missing))}; it serves: "
                    f"{', '.join(map(repr, served)) or 'nothing'}. Set the llm resource's model (or "
                    "extraction_model / qa_model / judge_model of the synthetic_qa config) to a served one."
                )
        ignores = self._probe_model_names(stats)
        if ignores:
            loaded = f" (it lists {', '.join(map(repr, served))})" if served else ""
            self._log.warning(
                f"SDG endpoint check: {url} ignores model names: it answered a request for a model it "
                f"does not serve{loaded}, so every step runs on the model it has loaded whatever "
                "extraction_model / qa_model / judge_model say, and a misspelt name goes unnoticed."
            )
        return EndpointCheck(served, ignores)

    def _served_models(self, stats: SDGStats) -> list[str] | None:
        stats.check_requests += 1
        try:
            resp = self._client.get("models", timeout=min(self.settings.timeout_s, 30.0))
        except httpx.HTTPError as e:
            self._log.warning(f"SDG endpoint check: GET models failed ({type(e).__name__}); going on.")
            return None
        if resp.status_code in (401, 403):
            raise LLMConfigError(
                self._redact(
                    f"{self.endpoint.base_url} answered HTTP {resp.status_code} to GET /models: "
                    f"{_snippet(resp)}. Check the API key."
                )
            )
        try:
            data = resp.json()["data"]
            return [str(m["id"]) for m in data] if resp.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            return None

    def _probe_model_names(self, stats: SDGStats) -> bool | None:
        """Ask a model that does not exist for one token: a 200 means the server ignores model names."""
        stats.check_requests += 1
        body = {
            "model": f"embed-assets-no-such-model-{uuid.uuid4().hex[:8]}",
            "messages": [{"role": "user", "content": MODEL_CHECK_PROMPT}],
            "max_tokens": 1,
            "stream": False,
        }
        try:
            resp = self._client.post(
                "chat/completions", json=body, timeout=min(self.settings.timeout_s, 60.0)
            )
        except httpx.HTTPError:
            return None
        if resp.status_code in (401, 403):
            raise LLMConfigError(
                self._redact(
                    f"{self.endpoint.base_url} answered HTTP {resp.status_code}: {_snippet(resp)}. "
                    "Check the API key."
                )
            )
        if resp.status_code == 200:
            return True
        return False if 400 <= resp.status_code < 500 else None

    # ------------------------------------------------------------------ units and bundles

    def units(self, chunks: Sequence[Chunk]) -> list[list[Chunk]]:
        """One unit per document (dedup works within a document), for :func:`run_generation`."""
        return units_per_document(chunks)

    def bundles(self, doc_chunks: Sequence[Chunk]) -> list[list[Chunk]]:
        """Cut one document's chunks (in order) into bundles of at most ``bundle_size`` consecutive chunks."""
        size = self.settings.bundle_size
        return [list(doc_chunks[i : i + size]) for i in range(0, len(doc_chunks), size)]

    # ------------------------------------------------------------------ generation

    def generate(self, chunks: Sequence[Chunk], progress: ProgressFn | None = None) -> SDGResult:
        """Generate QA records for ``chunks`` (any number of documents).

        Args:
            chunks: The chunks; positives of the records refer to their ids.
            progress: Receives progress lines (rate, ETA) as bundles finish.

        Returns:
            Records and statistics. A bundle that failed (transport, invalid answers, context) puts its
            chunk ids into ``stats.failed_chunk_ids`` and yields no records; the other bundles are unaffected.

        Raises:
            LLMConfigError: The endpoint rejected the key, model or URL (no point in going on).
        """
        stats = SDGStats(chunks_total=len(chunks))
        merge_stats(stats, self.prepare())  # no request when run_generation prepared already
        docs = units_per_document(chunks)
        jobs = [(d, bundle) for d, doc in enumerate(docs) for bundle in self.bundles(doc)]
        per_job = self._run_jobs([b for _, b in jobs], ProgressMeter(len(chunks), progress, label="sdg[llm]"))
        records: list[QARecord] = []
        for d, doc in enumerate(docs):
            outcomes = [o for (dj, _), outs in zip(jobs, per_job, strict=True) if dj == d for o in outs]
            records.extend(self._finish_document(outcomes, doc[0].doc_id, stats))
        stats.pairs_kept = len(records)
        return SDGResult(records=records, stats=stats)

    def _run_jobs(self, jobs: list[list[Chunk]], meter: ProgressMeter) -> list[list[_BundleOutcome]]:
        results: list[list[_BundleOutcome]] = [[] for _ in jobs]
        pool = ThreadPoolExecutor(
            max_workers=self.settings.max_parallel_requests, thread_name_prefix="sdg-llm"
        )
        try:
            futures = {pool.submit(self._run_bundle, bundle): j for j, bundle in enumerate(jobs)}
            for future in as_completed(futures):
                outs = future.result()
                results[futures[future]] = outs
                made = sum(o.stats.calls_made for o in outs)
                meter.advance(
                    sum(len(o.chunks) for o in outs),
                    cached=made == 0 and not any(o.failed for o in outs),
                    failed=sum(len(o.chunks) for o in outs if o.failed),
                    note=f"{made} calls made, {sum(o.stats.calls_reused for o in outs)} reused",
                )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def _finish_document(
        self, outcomes: list[_BundleOutcome], doc_id: str, stats: SDGStats
    ) -> list[QARecord]:
        """Merge one document's bundle outcomes: stats, cross-bundle dedup, records."""
        kept: list[_Pair] = []
        for out in outcomes:
            merge_stats(stats, out.stats)
            ids = [c.chunk_id for c in out.chunks]
            if out.failed:
                stats.chunks_failed += len(ids)
                stats.failed_chunk_ids.extend(ids)
                continue
            if out.stats.calls_made == 0:
                stats.chunks_reused += len(ids)
            else:
                stats.chunks_generated += len(ids)
            for pair in out.pairs:
                twin = self._duplicate_of(pair, kept)
                if twin is None:
                    kept.append(pair)
                else:
                    self._drop(
                        stats, "dedup", f"{pair.question!r} duplicates {twin.question!r} (other bundle)"
                    )
        return [self._record(p, doc_id) for p in kept]

    def _record(self, pair: _Pair, doc_id: str) -> QARecord:
        qa_id = content_hash(f"{doc_id}\x00{pair.question}\x00{','.join(pair.chunk_ids)}")
        return QARecord(
            qa_id=qa_id,
            query=pair.question,
            positive_chunk_ids=pair.chunk_ids,
            doc_id=doc_id,
            answer=pair.answer,
            query_type=pair.query_type,
            reasoning_type=pair.reasoning_type,
            complexity=pair.complexity,
            quality=dict(pair.quality),
            generator=self.name,
            model=self.model,
        )

    def _run_bundle(self, bundle: list[Chunk]) -> list[_BundleOutcome]:
        """Steps 1-4 for one bundle. A failed step drops the bundle instead of raising; a prompt too long
        for the server's context splits the bundle in halves, each generated on its own."""
        stats = SDGStats(bundles_total=1)
        segments = format_segments(bundle)
        where = f"{bundle[0].doc_id} ({len(bundle)} chunk{'s' if len(bundle) > 1 else ''})"
        try:
            artifacts = self._extract(segments, bundle, stats)
            pairs = self._generate_pairs(segments, artifacts, bundle, stats)
            pairs = self._dedup_within(pairs, stats)
            if pairs:
                pairs = self._judge(segments, pairs, bundle, stats)
        except ContextOverflow as e:
            if len(bundle) > 1:
                stats.bundles_split += 1
                half = (len(bundle) + 1) // 2
                self._log.info(f"SDG bundle of {where} split in halves: {e}")
                unjudged = stats.pairs_generated - sum(stats.dropped.values())
                if unjudged > 0:  # the judge's prompt overflowed: the halves generate their own pairs
                    stats.drop(
                        "superseded_by_split", f"{where}: {unjudged} pair(s) not judged: {e}", n=unjudged
                    )
                first, second = self._run_bundle(bundle[:half]), self._run_bundle(bundle[half:])
                # the calls of the too-large bundle stay counted, with the halves' outcomes
                return [_BundleOutcome([], [], stats, failed=False), *first, *second]
            return [self._failed(bundle, where, stats, e)]
        except StepFailed as e:
            return [self._failed(bundle, where, stats, e)]
        return [_BundleOutcome(bundle, pairs, stats, failed=False)]

    def _failed(self, bundle: list[Chunk], where: str, stats: SDGStats, e: StepFailed) -> _BundleOutcome:
        stats.bundles_failed += 1
        message = self._redact(str(e))
        stats.drop(e.reason, f"{where}: {message}")
        self._log.warning(f"SDG dropped the bundle of {where} [{e.reason}]: {message}")
        return _BundleOutcome(bundle, [], stats, failed=True)

    def _drop(self, stats: SDGStats, reason: str, example: str) -> None:
        stats.drop(reason, example)
        self._log.debug(f"SDG dropped a pair [{reason}]: {example}")

    # ------------------------------------------------------------------ the steps

    def _extract(
        self, segments: str, bundle: list[Chunk], stats: SDGStats
    ) -> dict[str, list[dict[str, Any]]]:
        step = "artifact_extraction"
        prompt = render(
            self._prompts[step],
            segments=segments,
            max_artifacts_per_type=self.settings.max_artifacts_per_type,
            schema=schema_text(ExtractionAnswer),
        )
        answer = self._call(step, prompt, bundle, stats)
        limit = self.settings.max_artifacts_per_type
        return {name: [a.model_dump() for a in getattr(answer, name)[:limit]] for name in ARTIFACT_TYPES}

    def _generate_pairs(
        self, segments: str, artifacts: dict[str, Any], bundle: list[Chunk], stats: SDGStats
    ) -> list[_Pair]:
        step = "qa_generation"
        s = self.settings
        prompt = render(
            self._prompts[step],
            segments=segments,
            artifacts=json.dumps(artifacts, ensure_ascii=False),
            num_pairs=s.num_pairs,
            min_complexity=s.min_complexity,
            schema=schema_text(QAAnswer),
        )
        answer: QAAnswer = self._call(step, prompt, bundle, stats)  # type: ignore[assignment]
        raw = answer.pairs
        stats.pairs_generated += len(raw)
        for extra in raw[s.num_pairs :]:
            self._drop(stats, "excess", f"pair beyond num_pairs={s.num_pairs}: {extra.question!r}")
        pairs: list[_Pair] = []
        for item in raw[: s.num_pairs]:
            seg_ids = list(dict.fromkeys(item.segment_ids))
            if any(not 1 <= i <= len(bundle) for i in seg_ids):
                self._drop(
                    stats,
                    "unknown_segment",
                    f"segment_ids {seg_ids} not in 1..{len(bundle)}: {item.question!r}",
                )
                continue
            if item.complexity < s.min_complexity:
                self._drop(
                    stats,
                    "complexity",
                    f"complexity {item.complexity} < min_complexity {s.min_complexity}: {item.question!r}",
                )
                continue
            pairs.append(
                _Pair(
                    question=_one_line(item.question),
                    answer=_one_line(item.answer),
                    query_type=item.query_type,
                    reasoning_type=item.reasoning_type,
                    complexity=item.complexity,
                    segment_ids=seg_ids,
                    chunk_ids=[bundle[i - 1].chunk_id for i in seg_ids],
                )
            )
        return pairs

    def _dedup_within(self, pairs: list[_Pair], stats: SDGStats) -> list[_Pair]:
        """Embed the questions and drop near-duplicates inside the bundle (before paying for the judge)."""
        if not pairs or self.settings.dedup_threshold >= 1.0:
            return pairs
        vectors = self._embed([p.question for p in pairs])
        kept: list[_Pair] = []
        for pair, vec in zip(pairs, vectors, strict=True):
            pair.embedding = vec
            twin = self._duplicate_of(pair, kept)
            if twin is None:
                kept.append(pair)
            else:
                self._drop(stats, "dedup", f"{pair.question!r} duplicates {twin.question!r}")
        return kept

    def _duplicate_of(self, pair: _Pair, kept: list[_Pair]) -> _Pair | None:
        """The kept pair whose question is closer than ``dedup_threshold`` to ``pair``'s, if any."""
        others = [k for k in kept if k.embedding is not None]
        if pair.embedding is None or not others:
            return None
        sims = np.stack([k.embedding for k in others]) @ pair.embedding
        best = int(np.argmax(sims))
        return others[best] if float(sims[best]) > self.settings.dedup_threshold else None

    def _judge(self, segments: str, pairs: list[_Pair], bundle: list[Chunk], stats: SDGStats) -> list[_Pair]:
        step = "quality_judge"
        listing = "\n\n".join(
            f"[Pair {k}] segments: {', '.join(map(str, p.segment_ids))}\nQ: {p.question}\nA: {p.answer}"
            for k, p in enumerate(pairs, start=1)
        )
        prompt = render(
            self._prompts[step], segments=segments, pairs=listing, schema=schema_text(JudgeAnswer)
        )
        answer: JudgeAnswer = self._call(step, prompt, bundle, stats)  # type: ignore[assignment]
        verdicts = {e.pair_id: e for e in answer.evaluations}
        kept: list[_Pair] = []
        threshold = self.settings.quality_threshold
        for k, pair in enumerate(pairs, start=1):
            verdict = verdicts.get(k)
            if verdict is None:
                self._drop(stats, "unjudged", f"the judge gave no evaluation for pair {k}: {pair.question!r}")
                continue
            pair.quality = {c: float(getattr(verdict, c)) for c in JUDGE_CRITERIA}
            if pair.quality["overall"] < threshold:
                self._drop(
                    stats,
                    "quality",
                    f"overall {pair.quality['overall']:g} < {threshold:g}: {pair.question!r}",
                )
                continue
            kept.append(pair)
        return kept

    # ------------------------------------------------------------------ one cached, validated call

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = self._prompts["system"].strip()
        if self.settings.system_suffix:
            system = f"{system}\n{self.settings.system_suffix}"
        if self.settings.system_prompt_as_user:  # for chat templates that drop system messages
            return [{"role": "user", "content": f"{system}\n\n{prompt}"}]
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]

    def _call(self, step: str, prompt: str, bundle: list[Chunk], stats: SDGStats) -> Any:
        """One step: cached answer, else request + validation + at most one (bounded) repair request.

        Raises:
            StepFailed: ``invalid_json`` (still invalid after the repair), ``request_failed`` or
                ``context_overflow``.
        """
        model = self.model_for(step)
        schema = SCHEMAS[step]
        messages = self._messages(prompt)
        key = self._call_key(step, model, messages)
        if self._cache is not None:
            hit = self._cache.get_json(key, _CALL_CACHE_VERSION)
            if hit is not None:
                try:
                    answer = validate_answer(hit.get("result"), schema)
                    stats.calls_reused += 1
                    return answer
                except AnswerError:
                    pass  # an entry from an older schema: ask again
        completion = self._chat(step, model, messages, stats)
        try:
            answer, repaired = parse_answer(completion.content, schema), False
        except AnswerError as first:
            stats.calls_invalid += 1
            repair = self._repair_prompt(step, first, completion)
            stats.calls_repair += 1
            second_completion = self._chat(step, model, self._messages(repair), stats)
            try:
                answer, repaired = parse_answer(second_completion.content, schema), True
            except AnswerError as second:
                stats.calls_invalid += 1
                raise StepFailed(
                    "invalid_json",
                    f"{step}: {self._explain(second, second_completion)} (after one repair request; "
                    f"the answer began {_short(second_completion.content)!r})",
                ) from None
        if self._cache is not None:
            payload = {
                "step": step,
                "model": model,
                "chunk_ids": [c.chunk_id for c in bundle],
                "repaired": repaired,
                "result": answer.model_dump(mode="json"),
            }
            self._cache.put_json(key, _CALL_CACHE_VERSION, payload)
        return answer

    def _explain(self, error: AnswerError, completion: _Completion) -> str:
        text = str(error)
        if completion.finish_reason == "length":
            text += " (the answer stopped at the completion budget: finish_reason=length)"
        return text

    def _repair_prompt(self, step: str, error: AnswerError, completion: _Completion) -> str:
        """The repair request: the error, a bounded excerpt of the bad answer and the schema, nothing else."""
        hint = ""
        if completion.finish_reason == "length":
            hint = (
                "Your answer was cut off at the length limit: write a shorter one (fewer and shorter items), "
                "and make sure the JSON object is complete.\n"
            )
        return render(
            self._prompts["repair"],
            step=step,
            error=_short(self._explain(error, completion), 800),
            excerpt=excerpt(completion.content, self.settings.repair_excerpt_chars),
            hint=hint,
            schema=schema_text(SCHEMAS[step]),
        )

    def _call_key(self, step: str, model: str, messages: list[dict[str, str]]) -> str:
        s = self.settings
        material = {
            "model": model,
            "messages": messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens_for(step),
            "json_mode": s.json_mode,
        }
        return "call:" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _chat(self, step: str, model: str, messages: list[dict[str, str]], stats: SDGStats) -> _Completion:
        """POST one chat completion with retries and context-overflow shrinking; returns the answer.

        Raises:
            StepFailed: ``request_failed`` after the retries, or on a non-retryable 4xx.
            ContextOverflow: The prompt does not fit the server's context.
            LLMConfigError: 401/403/404.
        """
        s = self.settings
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": s.stream,
        }
        if s.stream:
            body["stream_options"] = {"include_usage": True}
        if s.max_tokens_for(step):
            body["max_tokens"] = s.max_tokens_for(step)
        if s.json_mode:
            body["response_format"] = {"type": "json_object"}
        problem, attempt, shrinks = "no attempt", 0, 0
        while True:
            wait_s: float | None = None
            with self._slots:
                try:
                    completion = self._attempt(body, step, model, stats)
                except _Retryable as r:
                    stats.calls_failed += 1
                    stats.calls_timed_out += int(r.timed_out)
                    problem, wait_s = r.problem, r.wait_s
                except _Overflow as ov:
                    stats.calls_failed += 1
                    stats.context_overflows += 1
                    budget = self._shrunk_budget(ov, body.get("max_tokens"))
                    if budget is None or shrinks >= _MAX_SHRINKS:
                        raise ContextOverflow(self._redact(f"{step}: {ov.message}")) from None
                    shrinks += 1
                    stats.max_tokens_shrunk += 1
                    self._log.info(
                        f"SDG {step}: context overflow, max_tokens {body.get('max_tokens')} -> {budget}"
                    )
                    body["max_tokens"] = budget
                    continue  # at once: nothing is wrong with the server
                else:
                    stats.prompt_tokens += completion.prompt_tokens
                    stats.completion_tokens += completion.completion_tokens
                    stats.calls_cut_off += int(completion.finish_reason == "length")
                    return completion
            if attempt >= s.max_retries:
                raise StepFailed(
                    "request_failed",
                    self._redact(f"{step}: {problem} (gave up after {attempt + 1} attempts)"),
                )
            self._sleep(wait_s if wait_s is not None else self._backoff(attempt))
            attempt += 1

    def _attempt(self, body: dict[str, Any], step: str, model: str, stats: SDGStats) -> _Completion:
        """One request; a stream that ends before its first event is asked once more without streaming.

        llama-cpp-python starts an event stream (HTTP 200) before it looks at the prompt, so a prompt that
        exceeds its context ends the stream silently; the same request without streaming gets the HTTP 400
        ``context_length_exceeded`` that the overflow handling needs.
        """
        stats.calls_made += 1
        try:
            return self._send(body, step, model)
        except _EmptyStream:
            stats.calls_failed += 1
            stats.calls_made += 1
            plain = {k: v for k, v in body.items() if k != "stream_options"}
            return self._send({**plain, "stream": False}, step, model)

    @staticmethod
    def _shrunk_budget(ov: _Overflow, current: int | None) -> int | None:
        """The completion budget that fits after an overflow, or ``None`` when the prompt must shrink."""
        if ov.context_tokens is not None and ov.prompt_tokens is not None:
            room = ov.context_tokens - ov.prompt_tokens - 16  # chat templates add a few tokens
            if room < _MIN_COMPLETION_TOKENS or (current is not None and room >= current):
                return None
            return room
        if current is not None and current // 2 >= _MIN_COMPLETION_TOKENS:
            return current // 2  # the server did not say how much fits: halve
        return None

    def _send(self, body: dict[str, Any], step: str, model: str) -> _Completion:
        """One HTTP request (streamed or not).

        Raises:
            _Retryable: 429/5xx, timeouts, transport errors, broken envelopes or streams.
            _Overflow: A context overflow.
            StepFailed: Another 4xx.
            LLMConfigError: 401/403/404.
        """
        timeout = self.settings.timeout_s
        try:
            if not body["stream"]:
                return self._plain_answer(self._client.post("chat/completions", json=body), step, model)
            deadline = time.monotonic() + timeout
            # leaving the block closes the connection, also on a timeout: the server sees the client go away.
            # One connection per stream: one that ended early (llama-cpp-python's silent errors) is not
            # reused for the next request, which would then fail with "Server disconnected".
            headers = {"Connection": "close"}
            with self._client.stream("POST", "chat/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200 or "text/event-stream" not in resp.headers.get("content-type", ""):
                    resp.read()
                    return self._plain_answer(resp, step, model)
                return self._read_stream(resp, deadline)
        except httpx.TimeoutException:
            raise _Retryable(f"timed out after {timeout:g}s", timed_out=True) from None
        except httpx.TransportError as e:
            raise _Retryable(f"transport error ({type(e).__name__}: {_short(str(e), 120)})") from None

    def _read_stream(self, resp: httpx.Response, deadline: float) -> _Completion:
        """Collect an SSE chat-completion stream (``data: {chunk}`` lines up to ``data: [DONE]``)."""
        parts: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        events = 0
        for line in resp.iter_lines():
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("stream deadline")
            if not line.startswith("data:"):
                continue  # comments (": ping"), event names, blank separators
            data = line[5:].strip()
            events += 1
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise _Retryable(f"malformed stream event {_short(data)!r}") from None
            if not isinstance(event, dict):
                continue
            if event.get("error"):  # some servers report failures inside the stream
                text = json.dumps(event)
                overflow = parse_context_overflow(400, text)
                if overflow is not None:
                    raise overflow
                raise _Retryable(f"error in the stream: {_short(self._redact(text), 200)}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                parts.append(str(delta.get("content") or ""))
                finish = choice.get("finish_reason") or finish
        if events == 0:
            raise _EmptyStream
        if finish is None:
            # llama-cpp-python ends a stream early (no finish_reason) when it interrupts it for another request
            raise _Retryable("the stream ended without a finish_reason (interrupted by the server?)")
        return _Completion(
            "".join(parts),
            finish,
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )

    def _plain_answer(self, resp: httpx.Response, step: str, model: str) -> _Completion:
        """The answer of a non-streamed response; raises for everything else (see :meth:`_send`)."""
        code = resp.status_code
        if code in _FATAL_STATUS:
            raise LLMConfigError(
                self._redact(
                    f"{self.endpoint.base_url} answered HTTP {code} for model {model!r} ({step}): "
                    f"{_snippet(resp)}. Check base_url, the model name and the API key."
                )
            )
        if code == 429 or code >= 500:
            raise _Retryable(f"HTTP {code}", _retry_after(resp.headers.get("retry-after")))
        if code != 200:
            overflow = parse_context_overflow(code, _snippet(resp, 2000))
            if overflow is not None:
                raise overflow
            raise StepFailed("request_failed", self._redact(f"{step}: HTTP {code}: {_snippet(resp)}"))
        try:
            data = resp.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed completion (no choices[0].message)") from None
        usage = data.get("usage") or {}
        return _Completion(
            str(message.get("content") or "") if isinstance(message, dict) else "",
            choice.get("finish_reason") if isinstance(choice, dict) else None,
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_base_s * (2**attempt)) * (1.0 + 0.25 * random.random())

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _is_served(model: str, served: list[str]) -> bool:
    """Whether ``model`` is listed (Ollama also answers ``name`` for ``name:latest``)."""
    return model in served or (":" not in model and f"{model}:latest" in served)


def _snippet(resp: httpx.Response, limit: int = 200) -> str:
    try:
        text = resp.text
    except Exception:  # undecodable body
        return "<unreadable body>"
    return _one_line(text)[:limit] or "<empty body>"


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), capped at 10 minutes."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)
