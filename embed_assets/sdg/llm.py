"""Synthetic QA generation with any OpenAI-compatible chat-completions endpoint (DESIGN §2, LLM path).

Per document the chunks are cut into bundles of ``bundle_size`` consecutive chunks; each bundle is one prompt
whose numbered segments map back to chunk ids. Per bundle:

1. artifact extraction (one call),
2. QA generation with query/reasoning types, complexity and the segment ids each pair needs (one call),
3. dedup: question embeddings, cosine > ``dedup_threshold`` within the bundle (before judging, to save
   tokens) and then across the bundles of the same document,
4. quality judge (one call for all the bundle's pairs), keep ``overall >= quality_threshold``.

Every answer is decoded and validated against a strict JSON schema (:mod:`embed_assets.sdg.schemas`); an
invalid answer gets one repair request that sends the validation error back, after which the bundle is
recorded as failed (``dropped["invalid_json"]``) instead of crashing the run. Transport problems are retried
with exponential backoff, honoring ``Retry-After`` on 429/5xx.

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
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
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
    parse_answer,
    schema_text,
)

logger = logging.getLogger(__name__)

#: NVIDIA's hosted OpenAI-compatible API, the documented default provider.
DEFAULT_BASE_URL = "https://integrate.api.nvidia.com/v1"
#: The model of the Nemotron embedding recipe's SDG stage on NVIDIA's API.
DEFAULT_MODEL = "nvidia/llama-3.3-nemotron-super-49b-v1.5"
#: Environment variable the Dagster resource reads the key from by default.
DEFAULT_API_KEY_ENV = "NVIDIA_API_KEY"

STEPS: tuple[str, ...] = ("artifact_extraction", "qa_generation", "quality_judge")
_PROMPT_FILES = {
    "system": "system.txt",
    "artifact_extraction": "extraction.txt",
    "qa_generation": "qa_generation.txt",
    "quality_judge": "judge.txt",
    "repair": "repair.txt",
}
#: HTTP statuses that mean the configuration is wrong (key, model, URL): retrying cannot help.
_FATAL_STATUS = (401, 403, 404)
_MAX_RETRY_AFTER_S = 600.0
_CALL_CACHE_VERSION = "llm-call-v1"
_GENERATOR_VERSION = "llm-qa-v1"

#: Maps a list of texts to L2-normalized embeddings (one row per text).
Embedder = Callable[[list[str]], np.ndarray]


@dataclass
class LLMSettings:
    """Everything that configures the LLM generator (mirrored by the Dagster config).

    ``model`` is used for every step unless a per-step override is set. The API key is not a setting: the
    caller passes its value (read from ``api_key_env``) to :class:`LLMQAGenerator`.
    """

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    extraction_model: str | None = None
    qa_model: str | None = None
    judge_model: str | None = None
    api_key_env: str = DEFAULT_API_KEY_ENV
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int | None = 8192
    json_mode: bool = False  # send response_format={"type": "json_object"} (vLLM, Ollama, OpenAI, llama.cpp)
    system_suffix: str = "/no_think"  # turns off long reasoning on Nemotron / Qwen3; harmless elsewhere
    timeout_s: float = 120.0
    max_parallel_requests: int = 4
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    num_pairs: int = 7
    max_artifacts_per_type: int = 2
    bundle_size: int = 4
    min_complexity: int = 2
    quality_threshold: float = 7.0
    dedup_threshold: float = 0.9  # >= 1.0 disables dedup
    dedup_model: str = "bundled:all-MiniLM-L6-v2"

    def model_for(self, step: str) -> str:
        """The model used for ``step`` (one of :data:`STEPS`)."""
        override = {
            "artifact_extraction": self.extraction_model,
            "qa_generation": self.qa_model,
            "quality_judge": self.judge_model,
        }[step]
        return override or self.model

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first out-of-range setting."""
        checks = [
            (self.max_parallel_requests >= 1, "max_parallel_requests must be >= 1"),
            (self.max_retries >= 0, "max_retries must be >= 0"),
            (self.num_pairs >= 1, "num_pairs must be >= 1"),
            (self.bundle_size >= 1, "bundle_size must be >= 1"),
            (self.max_artifacts_per_type >= 0, "max_artifacts_per_type must be >= 0"),
            (self.timeout_s > 0, "timeout_s must be > 0"),
            (self.dedup_threshold > 0.0, "dedup_threshold must be > 0"),
            (1 <= self.min_complexity <= 5, "min_complexity must be within 1..5"),
            (bool(self.base_url.strip()), "base_url is empty"),
            (all(self.model_for(s).strip() for s in STEPS), "model is empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"LLMSettings: {message}")


class LLMConfigError(RuntimeError):
    """The endpoint rejected the configuration (HTTP 401/403/404): wrong key, model or base_url. Fatal."""


class StepFailed(Exception):
    """One LLM step failed for good; ``reason`` is the ``dropped`` key it is recorded under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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


def api_key_from_env(name: str = DEFAULT_API_KEY_ENV) -> str | None:
    """The API key stored in environment variable ``name`` (``None`` when unset or empty)."""
    import os

    return os.environ.get(name) or None


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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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
    whole documents (``units``) on top of this class's per-call cache.
    """

    name = "llm"

    def __init__(
        self,
        settings: LLMSettings | None = None,
        api_key: str | None = None,
        cache: SDGCache | None = None,
        embedder: Embedder | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        embed_model: str | None = None,
    ) -> None:
        """Create the generator.

        Args:
            settings: Endpoint, models and generation settings (defaults: :class:`LLMSettings`).
            api_key: The key *value* (``None`` for local servers without auth); sent as a Bearer header only.
            cache: Where every finished LLM answer is stored (``None``: no per-call cache).
            embedder: Question embedder for dedup (default: ``settings.dedup_model``, loaded lazily).
            transport: Optional httpx transport (tests, proxies).
            sleep: Used for backoff waits.
            embed_model: Shortcut that overrides ``settings.dedup_model`` (e.g. the base model being adapted).
        """
        self.settings = replace(settings or LLMSettings())
        if embed_model:
            self.settings.dedup_model = embed_model
        self.settings.validate()
        self.model = self.settings.model_for("qa_generation")
        self.max_parallel_units = self.settings.max_parallel_requests
        api_key = (api_key or "").strip() or None  # keys read from .env files often end with a newline
        self._secret = api_key or ""
        self._cache = cache
        self._embed = embedder or sentence_transformer_embedder(self.settings.dedup_model)
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(self.settings.max_parallel_requests)
        self._prompts = {name: load_prompt(name) for name in _PROMPT_FILES}
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            base_url=self.settings.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(self.settings.timeout_s),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"LLMQAGenerator(base_url={self.settings.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> LLMQAGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fingerprint(self) -> str:
        """Hash of everything that shapes the output: prompts, schemas, models, sampling and filter settings.

        Not included: the endpoint URL, the key, timeouts, parallelism and retries.
        """
        s = self.settings
        material = {
            "version": _GENERATOR_VERSION,
            "prompts": self._prompts,
            "schemas": {k: schema_text(v) for k, v in SCHEMAS.items()},
            "models": {step: s.model_for(step) for step in STEPS},
            **{
                k: getattr(s, k)
                for k in (
                    "temperature",
                    "top_p",
                    "max_tokens",
                    "json_mode",
                    "system_suffix",
                    "num_pairs",
                    "max_artifacts_per_type",
                    "bundle_size",
                    "min_complexity",
                    "quality_threshold",
                    "dedup_threshold",
                    "dedup_model",
                )
            },
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]

    def bind_cache(self, cache: SDGCache) -> None:
        """Use ``cache`` for per-call caching unless one was given already (called by ``run_generation``)."""
        if self._cache is None:
            self._cache = cache

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
            Records and statistics. A bundle that failed (transport or invalid answers) puts its chunk ids
            into ``stats.failed_chunk_ids`` and yields no records; the other bundles are unaffected.

        Raises:
            LLMConfigError: The endpoint rejected the key, model or URL (no point in going on).
        """
        docs = units_per_document(chunks)
        jobs = [bundle for doc in docs for bundle in self.bundles(doc)]
        outcomes = self._run_bundles(jobs, ProgressMeter(len(chunks), progress, label="sdg[llm]"))
        stats = SDGStats(chunks_total=len(chunks))
        records: list[QARecord] = []
        start = 0
        for doc in docs:
            n_bundles = len(self.bundles(doc))
            records.extend(self._finish_document(outcomes[start : start + n_bundles], stats))
            start += n_bundles
        stats.pairs_kept = len(records)
        return SDGResult(records=records, stats=stats)

    def _run_bundles(self, jobs: list[list[Chunk]], meter: ProgressMeter) -> list[_BundleOutcome]:
        outcomes: list[_BundleOutcome | None] = [None] * len(jobs)
        pool = ThreadPoolExecutor(
            max_workers=self.settings.max_parallel_requests, thread_name_prefix="sdg-llm"
        )
        try:
            futures = {pool.submit(self._run_bundle, bundle): j for j, bundle in enumerate(jobs)}
            for future in as_completed(futures):
                out = future.result()
                outcomes[futures[future]] = out
                meter.advance(
                    len(out.chunks),
                    cached=not out.failed and out.stats.calls_made == 0,
                    failed=len(out.chunks) if out.failed else 0,
                    note=f"{out.stats.calls_made} calls made, {out.stats.calls_reused} reused",
                )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [o for o in outcomes if o is not None]

    def _finish_document(self, outcomes: list[_BundleOutcome], stats: SDGStats) -> list[QARecord]:
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
                if self._is_duplicate(pair, kept):
                    stats.dropped["dedup"] += 1
                else:
                    kept.append(pair)
        doc_id = outcomes[0].chunks[0].doc_id if outcomes else ""
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

    def _run_bundle(self, bundle: list[Chunk]) -> _BundleOutcome:
        """Steps 1-4 for one bundle; a failed step marks the bundle failed instead of raising."""
        stats = SDGStats()
        segments = format_segments(bundle)
        try:
            artifacts = self._extract(segments, bundle, stats)
            pairs = self._generate_pairs(segments, artifacts, bundle, stats)
            pairs = self._dedup_within(pairs, stats)
            if pairs:
                pairs = self._judge(segments, pairs, bundle, stats)
        except StepFailed as e:
            stats.calls_failed += 1
            stats.dropped[e.reason] += 1
            logger.warning("SDG bundle of %s (%d chunks) failed: %s", bundle[0].doc_id, len(bundle), e)
            return _BundleOutcome(bundle, [], stats, failed=True)
        return _BundleOutcome(bundle, pairs, stats, failed=False)

    # ------------------------------------------------------------------ the steps

    def _extract(
        self, segments: str, bundle: list[Chunk], stats: SDGStats
    ) -> dict[str, list[dict[str, Any]]]:
        step = "artifact_extraction"
        prompt = render(
            self._prompts[step],
            segments=segments,
            max_artifacts_per_type=self.settings.max_artifacts_per_type,
            schema=schema_text(SCHEMAS[step]),
        )
        answer = self._call(step, prompt, bundle, stats)
        limit = self.settings.max_artifacts_per_type
        return {name: answer.get(name, [])[:limit] for name in ARTIFACT_TYPES}

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
            schema=schema_text(SCHEMAS[step]),
        )
        answer = self._call(step, prompt, bundle, stats)
        raw = answer["pairs"]
        stats.pairs_generated += len(raw)
        if len(raw) > s.num_pairs:
            stats.dropped["excess"] += len(raw) - s.num_pairs
        pairs: list[_Pair] = []
        for item in raw[: s.num_pairs]:
            seg_ids = list(dict.fromkeys(item["segment_ids"]))
            if any(not 1 <= i <= len(bundle) for i in seg_ids):
                stats.dropped["unknown_segment"] += 1
                continue
            if item["complexity"] < s.min_complexity:
                stats.dropped["complexity"] += 1
                continue
            pairs.append(
                _Pair(
                    question=_one_line(item["question"]),
                    answer=_one_line(item["answer"]),
                    query_type=item["query_type"],
                    reasoning_type=item["reasoning_type"],
                    complexity=int(item["complexity"]),
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
            if self._is_duplicate(pair, kept):
                stats.dropped["dedup"] += 1
            else:
                kept.append(pair)
        return kept

    def _is_duplicate(self, pair: _Pair, kept: list[_Pair]) -> bool:
        if pair.embedding is None or not kept:
            return False
        others = np.stack([k.embedding for k in kept if k.embedding is not None])
        return bool(others.size) and float(np.max(others @ pair.embedding)) > self.settings.dedup_threshold

    def _judge(self, segments: str, pairs: list[_Pair], bundle: list[Chunk], stats: SDGStats) -> list[_Pair]:
        step = "quality_judge"
        listing = "\n\n".join(
            f"[Pair {k}] segments: {', '.join(map(str, p.segment_ids))}\nQ: {p.question}\nA: {p.answer}"
            for k, p in enumerate(pairs, start=1)
        )
        prompt = render(
            self._prompts[step], segments=segments, pairs=listing, schema=schema_text(SCHEMAS[step])
        )
        answer = self._call(step, prompt, bundle, stats)
        verdicts = {int(e["pair_id"]): e for e in answer["evaluations"]}
        kept: list[_Pair] = []
        for k, pair in enumerate(pairs, start=1):
            verdict = verdicts.get(k)
            if verdict is None:
                stats.dropped["unjudged"] += 1
                continue
            pair.quality = {c: float(verdict[c]) for c in JUDGE_CRITERIA}
            if pair.quality["overall"] < self.settings.quality_threshold:
                stats.dropped["quality"] += 1
                continue
            kept.append(pair)
        return kept

    # ------------------------------------------------------------------ one cached, validated call

    def _call(self, step: str, prompt: str, bundle: list[Chunk], stats: SDGStats) -> dict[str, Any]:
        """One step: cached answer, else request + validation + at most one repair request.

        Raises:
            StepFailed: ``invalid_json`` (still invalid after the repair) or ``request_failed``.
        """
        model = self.settings.model_for(step)
        system = self._prompts["system"].strip()
        if self.settings.system_suffix:
            system = f"{system}\n{self.settings.system_suffix}"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        key = self._call_key(model, messages)
        if self._cache is not None:
            hit = self._cache.get_json(key, _CALL_CACHE_VERSION)
            if hit is not None and isinstance(hit.get("result"), dict):
                stats.calls_reused += 1
                return hit["result"]
        schema = SCHEMAS[step]
        content = self._chat(step, model, messages, stats)
        try:
            result = parse_answer(content, schema)
            repaired = False
        except AnswerError as first:
            repair = render(self._prompts["repair"], error=str(first), schema=schema_text(schema))
            follow_up = [
                *messages,
                {"role": "assistant", "content": content},
                {"role": "user", "content": repair},
            ]
            content = self._chat(step, model, follow_up, stats)
            try:
                result = parse_answer(content, schema)
                repaired = True
            except AnswerError as second:
                raise StepFailed("invalid_json", f"{step}: {second} (after one repair request)") from None
        if self._cache is not None:
            payload = {
                "step": step,
                "model": model,
                "chunk_ids": [c.chunk_id for c in bundle],
                "repaired": repaired,
                "result": result,
            }
            self._cache.put_json(key, _CALL_CACHE_VERSION, payload)
        return result

    def _call_key(self, model: str, messages: list[dict[str, str]]) -> str:
        s = self.settings
        material = {
            "model": model,
            "messages": messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "json_mode": s.json_mode,
        }
        return "call:" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _chat(self, step: str, model: str, messages: list[dict[str, str]], stats: SDGStats) -> str:
        """POST one chat completion with retries; returns the assistant content.

        Raises:
            StepFailed: ``request_failed`` after the retries, or on a non-retryable 4xx.
            LLMConfigError: 401/403/404.
        """
        s = self.settings
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": False,
        }
        if s.max_tokens:
            body["max_tokens"] = s.max_tokens
        if s.json_mode:
            body["response_format"] = {"type": "json_object"}
        problem = "no attempt"
        for attempt in range(s.max_retries + 1):
            wait_s: float | None = None
            with self._slots:
                stats.calls_made += 1
                try:
                    resp = self._client.post("chat/completions", json=body)
                except httpx.TimeoutException:
                    problem = f"timed out after {s.timeout_s:g}s"
                except httpx.TransportError as e:
                    problem = f"transport error ({type(e).__name__})"
                else:
                    answer = self._answer_or_none(resp, step, model, stats)
                    if answer is not None:
                        return answer
                    problem = f"HTTP {resp.status_code}"
                    if resp.status_code == 200:
                        problem = "malformed completion (no choices[0].message)"
                    wait_s = _retry_after(resp.headers.get("retry-after"))
            if attempt < s.max_retries:
                self._sleep(wait_s if wait_s is not None else self._backoff(attempt))
        raise StepFailed("request_failed", f"{step}: {problem} (gave up after {s.max_retries + 1} attempts)")

    def _answer_or_none(self, resp: httpx.Response, step: str, model: str, stats: SDGStats) -> str | None:
        """The content of a 200 answer; ``None`` for retryable problems; raises for the others."""
        code = resp.status_code
        if code in _FATAL_STATUS:
            raise LLMConfigError(
                self._redact(
                    f"{self.settings.base_url} answered HTTP {code} for model {model!r} ({step}): "
                    f"{_snippet(resp)}. Check base_url, the model name and the API key environment variable "
                    f"({self.settings.api_key_env})."
                )
            )
        if code == 429 or code >= 500:
            return None
        if code != 200:
            raise StepFailed("request_failed", self._redact(f"{step}: HTTP {code}: {_snippet(resp)}"))
        try:
            data = resp.json()
            message = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        usage = data.get("usage") or {}
        stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return str(message.get("content") or "") if isinstance(message, dict) else ""

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_base_s * (2**attempt)) * (1.0 + 0.25 * random.random())

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


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


def settings_from_dict(values: dict[str, Any]) -> LLMSettings:
    """Build :class:`LLMSettings` from a mapping (e.g. a Dagster config), ignoring unknown keys."""
    known = {k: v for k, v in values.items() if k in LLMSettings.__dataclass_fields__}
    return LLMSettings(**known)


def settings_as_dict(settings: LLMSettings) -> dict[str, Any]:
    """The settings as a plain dict (safe for metadata: it holds no key)."""
    return asdict(settings)


#: Alias under the name the Dagster wiring uses.
LLMGenerator = LLMQAGenerator
