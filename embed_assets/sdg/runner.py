"""A generic, cache-aware driver for any :class:`~embed_assets.sdg.base.QAGenerator`.

``run_generation`` cuts the chunks into *units* (one chunk per unit by default; a generator may define
``units(chunks)``, e.g. one unit per document), looks every unit up in the :class:`SDGCache` under
``(hash of the unit's chunk ids, generator.fingerprint)``, calls the generator only for the missing units and
stores each unit's records as soon as that unit is done. Re-running after one document changed therefore only
calls the generator for the units that contain its changed chunks, and an interrupted run resumes where it
stopped.

Optional generator attributes understood here (none is required by the protocol):

- ``units(chunks) -> list[list[Chunk]]``: how to group chunks into independently generated units. Records of a
  unit must only depend on that unit's chunks.
- ``max_parallel_units: int``: how many units may be generated concurrently (threads; default 1).
- ``bind_cache(cache)``: receives the runner's cache, for finer-grained caching inside the generator (the LLM
  generator caches every finished call there, so a partially finished unit keeps its finished calls).
- ``prepare() -> SDGStats | None``: called once before the first unit that is not cached (the LLM generator
  checks its endpoint there); returned counters are added to the run's statistics, exceptions abort the run.
- ``observe(batches)``: sees every chunk once before any unit is generated (corpus statistics); called by
  :func:`stream_generation`, which holds one batch of chunks at a time.

Units whose generation reported a failed chunk are not cached, so the next run retries them.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import fields

from embed_assets.records import Chunk, QARecord
from embed_assets.sdg.base import ProgressFn, QAGenerator, SDGResult, SDGStats
from embed_assets.sdg.cache import SDGCache

#: Counters a unit's stats add to the run's; the chunk counters are the runner's own bookkeeping.
_ADDITIVE = tuple(
    f.name for f in fields(SDGStats) if f.type in ("int", int) and not f.name.startswith("chunks_")
)


class ProgressMeter:
    """Turns "n more items done" into throttled progress lines with rate and ETA.

    Thread-safe. The rate counts only work actually done in this run (cached items are reported but do not
    inflate the rate).
    """

    def __init__(
        self,
        total: int,
        progress: ProgressFn | None,
        label: str = "sdg",
        unit: str = "chunks",
        every_s: float = 2.0,
    ) -> None:
        """Create a meter.

        Args:
            total: Number of items expected.
            progress: Where lines go (``None``: nowhere).
            label: Prefix of every line.
            unit: Name of the items, for the line.
            every_s: Minimum seconds between two lines (the last line is always emitted).
        """
        self.total, self.progress, self.label, self.unit, self.every_s = total, progress, label, unit, every_s
        self.done = self.cached = self.failed = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def advance(self, n: int, *, cached: bool = False, failed: int = 0, note: str = "") -> None:
        """Record ``n`` finished items and maybe emit a line.

        Args:
            n: Items finished (including failed ones).
            cached: Whether they came from the cache.
            failed: How many of them failed.
            note: Extra text appended to the line.
        """
        with self._lock:
            self.done += n
            self.failed += failed
            if cached:
                self.cached += n
            now = time.monotonic()
            final = self.done >= self.total
            if self.progress is None or (not final and now - self._last < self.every_s):
                return
            self._last = now
            line = self.line(now) + (f" | {note}" if note else "")
        self.progress(line)

    def line(self, now: float | None = None) -> str:
        """The current progress line."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        worked = self.done - self.cached
        rate = worked / elapsed
        remaining = max(self.total - self.done, 0)
        eta = "0s" if remaining == 0 else (_fmt_duration(remaining / rate) if rate > 0 else "?")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%, {self.cached} cached, "
            f"{self.failed} failed) | {rate:.2f} {self.unit}/s | elapsed {_fmt_duration(elapsed)} | ETA {eta}"
        )


def _fmt_duration(secs: float) -> str:
    seconds = round(secs)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def default_units(chunks: Sequence[Chunk]) -> list[list[Chunk]]:
    """One chunk per unit (the default when a generator does not define ``units``)."""
    return [[c] for c in chunks]


def units_per_document(chunks: Sequence[Chunk]) -> list[list[Chunk]]:
    """Group chunks per document (first-appearance order of documents; chunks ordered by ``sent_start``).

    Args:
        chunks: Chunks of any number of documents.

    Returns:
        One list of chunks per document.
    """
    groups: dict[str, list[Chunk]] = {}
    for c in chunks:
        groups.setdefault(c.doc_id, []).append(c)
    return [sorted(g, key=lambda c: c.sent_start) for g in groups.values()]


def unit_key(unit: Sequence[Chunk]) -> str:
    """Content-derived cache key of a unit: its documents and chunk ids (chunk ids are content hashes)."""
    h = hashlib.sha256()
    for c in unit:
        h.update(f"{c.doc_id}\x00{c.chunk_id}\x01".encode())
    return "unit:" + h.hexdigest()


def merge_stats(into: SDGStats, other: SDGStats) -> None:
    """Add the bundle, call, token, pair and drop counters of ``other`` to ``into`` (not the chunk counters).

    The first example of each drop reason is kept.
    """
    for name in _ADDITIVE:
        setattr(into, name, getattr(into, name) + getattr(other, name))
    into.dropped.update(other.dropped)
    for reason, example in other.drop_examples.items():
        into.drop_examples.setdefault(reason, example)


def run_generation(
    generator: QAGenerator,
    chunks: Sequence[Chunk],
    cache: SDGCache | None,
    progress: ProgressFn | None = None,
    evict: bool = False,
) -> SDGResult:
    """Generate QA records for ``chunks`` held in memory (:func:`stream_generation` on one batch).

    Args:
        generator: Any generator implementing the protocol (``fingerprint`` keys the cache).
        chunks: All chunks of the corpus.
        cache: Where unit results are stored (``None``: no caching).
        progress: Receives progress lines (rate, ETA).
        evict: After the run, remove cache entries that no chunk of ``chunks`` uses (when ``chunks`` is the
            whole corpus).

    Returns:
        Records in unit order and the statistics of :func:`stream_generation`.
    """
    records: list[QARecord] = []
    stats = stream_generation(
        generator, lambda: [chunks], cache, records.extend, progress, evict, len(chunks)
    )
    return SDGResult(records=records, stats=stats)


def stream_generation(
    generator: QAGenerator,
    batches: Callable[[], Iterable[Sequence[Chunk]]],
    cache: SDGCache | None,
    sink: Callable[[list[QARecord]], None],
    progress: ProgressFn | None = None,
    evict: bool = False,
    total_chunks: int | None = None,
) -> SDGStats:
    """Generate QA records batch by batch, reusing cached units: only one batch of chunks and its records are
    in memory at a time.

    A generator with ``observe(batches)`` first sees every batch once (corpus statistics, e.g. the document
    frequencies of keyword queries); then each batch is cut into units, looked up in the cache in one query,
    the missing units are generated (on threads when ``max_parallel_units`` > 1) and the batch's records go to
    ``sink`` in unit order.

    Args:
        generator: Any generator implementing the protocol (``fingerprint`` keys the cache).
        batches: Returns a fresh iterable of chunk batches each time it is called; a document's chunks must
            be in one batch (units never span batches).
        cache: Where unit results are stored (``None``: no caching).
        sink: Receives each batch's records, in order.
        progress: Receives progress lines (rate, ETA).
        evict: After the run, remove cache entries that no chunk of the batches uses (when they are the
            whole corpus).
        total_chunks: How many chunks the batches hold (for the progress line's ETA).

    Returns:
        Honest statistics: ``chunks_reused`` counts chunks of cached units plus chunks the generator itself
        served entirely from its own cache; ``chunks_generated`` the others that did not fail.

    Raises:
        Whatever the generator raises for a fatal problem (finished units are already cached then).
    """
    bind = getattr(generator, "bind_cache", None)
    if cache is not None and callable(bind):
        bind(cache)
    observe = getattr(generator, "observe", None)
    if callable(observe):
        observe(batches())
    units_fn = getattr(generator, "units", None)
    fingerprint = generator.fingerprint
    stats = SDGStats()
    meter = ProgressMeter(total_chunks or 0, progress, label=f"sdg[{generator.name}]")
    workers = max(1, int(getattr(generator, "max_parallel_units", 1) or 1))
    live_keys: list[str] = []
    prepare = getattr(generator, "prepare", None)
    prepared = False
    lock = threading.Lock()

    for batch in batches():
        units = units_fn(batch) if callable(units_fn) else default_units(batch)
        stats.chunks_total += sum(len(u) for u in units)
        if total_chunks is None:
            meter.total = stats.chunks_total
        keys = [unit_key(unit) for unit in units]
        live_keys += keys
        per_unit: list[list[QARecord] | None] = [None] * len(units)
        pending: list[int] = []
        hits = cache.get_many(keys, fingerprint) if cache is not None else {}
        for i, unit in enumerate(units):
            cached = hits.get(keys[i])
            if cached is None:
                pending.append(i)
                continue
            per_unit[i] = cached
            stats.chunks_reused += len(unit)
            stats.pairs_kept += len(cached)
            meter.advance(len(unit), cached=True)
        del hits

        if pending and not prepared and callable(prepare):
            prepared = True
            checked = prepare()  # e.g. the LLM endpoint check; a fatal problem raises before any unit runs
            if isinstance(checked, SDGStats):
                merge_stats(stats, checked)

        def work(i: int, units: list[list[Chunk]] = units, keys: list[str] = keys, out=per_unit) -> None:
            unit = units[i]
            result = generator.generate(unit, progress=None)
            ids = {c.chunk_id for c in unit}
            failed = [cid for cid in dict.fromkeys(result.stats.failed_chunk_ids) if cid in ids]
            if not failed and cache is not None:
                cache.put(keys[i], fingerprint, result.records)
            reused = min(result.stats.chunks_reused, len(unit) - len(failed))
            with lock:
                out[i] = result.records
                merge_stats(stats, result.stats)
                stats.chunks_failed += len(failed)
                stats.failed_chunk_ids.extend(failed)
                stats.chunks_reused += reused
                stats.chunks_generated += len(unit) - len(failed) - reused
            meter.advance(len(unit), cached=reused == len(unit), failed=len(failed))

        _run_all(work, pending, workers)
        sink([r for recs in per_unit if recs for r in recs])
    if evict and cache is not None:
        stats.cache_evicted = cache.evict(live_keys, (c.chunk_id for batch in batches() for c in batch))
    return stats


def _run_all(work, indices: list[int], workers: int) -> None:
    """Run ``work(i)`` for every index, inline or on a thread pool; the first exception cancels the rest."""
    if workers == 1 or len(indices) <= 1:
        for i in indices:
            work(i)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdg-unit") as pool:
        futures: list[Future[None]] = [pool.submit(work, i) for i in indices]
        done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        for f in not_done:
            f.cancel()
        for f in done:
            exc = f.exception()
            if exc is not None:
                raise exc
