"""Token-budget batching: the inputs of concurrent requests share forward passes capped by padded tokens.

Why: a forward pass costs its *padded* tokens (inputs x the longest input), not its input count. Passes of
64 inputs in arrival order padded short texts to the longest one in the pass (3.0-3.8x the work of
length-sorted passes), and one request of 256 long inputs held the single inference thread for tens of
seconds while one-text requests waited behind it.

How a pass is planned (:func:`plan_pass`), each time the inference thread is free:

1. Every request's pending inputs are kept sorted by length.
2. The oldest request puts one input in the pass (so nothing waits forever); then requests are served
   shortest-remaining-work first — a one-text request arriving while a 256-input request runs goes into the
   very next pass — until the pass reaches ``max_batch_tokens`` (each input costs its length rounded up to a
   length bucket) or ``max_batch_size`` inputs. A large request is thereby split into micro-batches.
3. The chosen inputs are grouped by length bucket (:func:`group_by_length`) and each group runs as one
   forward pass padded only to its own longest input, shortest group first; each group's vectors are handed
   back as soon as it finishes, so short inputs are answered before the long ones of the same pass.

Defaults (:func:`default_budgets`): 2,048 padded tokens per pass on CPU, 16,384 on GPU. On CPU the cost per
token is nearly flat from a few inputs per pass up (measured on 2 cores: 800-1,600 tokens/s per pass from
4 to 64 inputs of 16-256 tokens, on a loaded machine), so small passes cost little throughput, and a short
request waits about one pass at most.

When the queue runs dry after at least :data:`TRIM_AFTER_TOKENS` padded tokens, the worker returns freed
heap to the OS (:func:`release_free_memory`), so RSS comes back down after a burst.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Length buckets (tokens): an input costs its bucket's size in the budget; a group shares one bucket.
LENGTH_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192)
#: Padding (tokens) worth one extra forward pass: smaller groups are merged into the next one.
GROUP_MERGE_TOKENS = 64
#: Padded tokens run since the last trim after which an idle worker hands freed heap back to the OS.
TRIM_AFTER_TOKENS = 16_384


def release_free_memory() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    glibc keeps memory freed by a burst (request bodies, token arrays, activations of long passes) in its
    arenas, so RSS would stay near the burst's peak; trimming when the server goes idle brings it back.

    Returns:
        True when memory was released.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def default_budgets(device: str) -> tuple[int, int]:
    """Sensible ``(max_batch_tokens, max_batch_size)`` for a device.

    Args:
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        The padded-token budget of one pass and its most inputs.
    """
    return (16_384, 256) if device == "cuda" else (2_048, 64)


def bucket(length: int) -> int:
    """The length bucket of an input of ``length`` tokens (its cost in the budget)."""
    i = bisect.bisect_left(LENGTH_BUCKETS, length)
    return LENGTH_BUCKETS[i] if i < len(LENGTH_BUCKETS) else length


@dataclass(eq=False)
class Job:
    """The pending inputs of one request.

    Attributes:
        encodings: The request's tokenized inputs.
        future: Resolves to the ``(n, dim)`` vectors in request order.
        seq: Arrival number (older first on ties).
    """

    encodings: Sequence[Any]
    future: asyncio.Future[np.ndarray]
    seq: int
    pending: list[int] = field(default_factory=list)  # input indices, longest first (pop() = shortest)
    remaining_cost: int = 0
    left: int = 0  # inputs not embedded yet
    out: np.ndarray | None = None
    tokens: int = 0

    def __post_init__(self) -> None:
        lengths = [len(e.ids) for e in self.encodings]
        self.pending = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        self.remaining_cost = sum(bucket(n) for n in lengths)
        self.left = len(lengths)
        self.tokens = sum(lengths)

    def next_length(self) -> int:
        return len(self.encodings[self.pending[-1]].ids)


def plan_pass(jobs: Sequence[Job], max_tokens: int, max_inputs: int) -> list[tuple[Job, int]]:
    """Choose the inputs of the next pass (see the module docstring).

    Args:
        jobs: Requests with pending inputs, in arrival order.
        max_tokens: Budget in bucketed tokens.
        max_inputs: Most inputs.

    Returns:
        ``(job, input index)`` pairs, removed from the jobs' pending lists.
    """
    chosen: list[tuple[Job, int]] = []
    cost = 0
    live = [j for j in jobs if j.pending and not j.future.done()]
    if not live:
        return chosen

    def take(job: Job) -> bool:
        nonlocal cost
        c = bucket(job.next_length())
        if chosen and (cost + c > max_tokens or len(chosen) >= max_inputs):
            return False
        i = job.pending.pop()
        job.remaining_cost -= c
        cost += c
        chosen.append((job, i))
        return True

    take(live[0])  # the oldest always advances: no request starves behind a stream of small ones
    for job in sorted(live, key=lambda j: (j.remaining_cost, j.seq)):
        while job.pending and take(job):
            pass
        if cost >= max_tokens or len(chosen) >= max_inputs:
            break
    return chosen


def group_by_length(lengths: Sequence[int]) -> list[list[int]]:
    """Split inputs into forward passes of similar length, shortest first.

    Inputs of one length bucket form a group; a group whose merge into the next costs fewer padding tokens
    than :data:`GROUP_MERGE_TOKENS` (the price of an extra pass) is merged into it.

    Args:
        lengths: Token lengths of the inputs.

    Returns:
        Lists of positions into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups = [list(g) for _, g in itertools.groupby(order, key=lambda i: bucket(lengths[i]))]
    merged: list[list[int]] = []
    for group in groups:
        if merged:
            prev = merged[-1]
            extra = len(prev) * (lengths[group[-1]] - lengths[prev[-1]])
            if extra < GROUP_MERGE_TOKENS:
                prev.extend(group)
                continue
        merged.append(group)
    return merged


class TokenBudgetBatcher:
    """Schedules the inputs of concurrent requests into token-budgeted forward passes on one thread.

    Args:
        embed_fn: Runs one forward pass over a list of encodings (padded to the longest), returns float32
            ``(n, dim)``.
        dimension: Embedding size.
        max_batch_tokens: Padded-token budget of one pass (bucketed lengths, see :func:`bucket`).
        max_batch_size: Most inputs per pass.
        batch_wait_ms: How long an idle worker waits for more requests once one arrived.
        on_pass: Called with ``(size, padded_tokens, real_tokens, seconds)`` after each forward pass (from
            the inference thread).
        on_queue: Called with the number of queued inputs when it changes (from the event loop).
    """

    def __init__(
        self,
        embed_fn: Callable[[list[Any]], np.ndarray],
        dimension: int,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        batch_wait_ms: float = 2.0,
        on_pass: Callable[[int, int, int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        self._embed_fn = embed_fn
        self.dimension = dimension
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = max(1, int(max_batch_size))
        self._wait_s = max(0.0, batch_wait_ms / 1000.0)
        self._on_pass = on_pass or (lambda *_: None)
        self._on_queue = on_queue or (lambda _: None)
        # One inference thread: passes run one after another (onnxruntime uses every core per pass) while the
        # event loop keeps accepting, tokenizing and answering requests.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-infer")
        self._jobs: list[Job] = []
        self._seq = itertools.count()
        self._since_trim = 0  # padded tokens run since the last release_free_memory()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.queued_inputs = 0

    def _ensure_started(self) -> asyncio.Event:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="embed-batcher")
        assert self._wakeup is not None
        return self._wakeup

    async def submit(self, encodings: Sequence[Any]) -> np.ndarray:
        """Queue the inputs of one request and wait for their vectors.

        Cancelling the caller (e.g. the client disconnected) drops the request's inputs that have not run.

        Args:
            encodings: Tokenized inputs (``.ids`` / ``.type_ids``), at most ``max_batch_tokens`` long each.

        Returns:
            ``(len(encodings), dim)`` float32 array in request order.
        """
        if not encodings:
            return np.zeros((0, self.dimension), dtype=np.float32)
        wakeup = self._ensure_started()
        job = Job(encodings, asyncio.get_running_loop().create_future(), next(self._seq))
        job.out = np.empty((len(encodings), self.dimension), dtype=np.float32)
        self._jobs.append(job)
        self._queued(len(encodings))
        wakeup.set()
        try:
            return await job.future
        finally:
            if not job.future.done():
                job.future.cancel()
            if job in self._jobs:
                self._jobs.remove(job)
                self._queued(-len(job.pending))
                job.pending.clear()

    def _queued(self, delta: int) -> None:
        self.queued_inputs += delta
        self._on_queue(self.queued_inputs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not any(j.pending for j in self._jobs):
                if self._since_trim >= TRIM_AFTER_TOKENS:  # idle after a lot of work: give memory back
                    self._since_trim = 0
                    await loop.run_in_executor(self._executor, release_free_memory)
                    continue  # requests may have arrived meanwhile
                self._wakeup.clear()
                await self._wakeup.wait()
                if self._wait_s > 0:
                    await asyncio.sleep(self._wait_s)  # let concurrent requests join the first pass
            chosen = plan_pass(self._jobs, self.max_batch_tokens, self.max_batch_size)
            if not chosen:
                self._jobs = [j for j in self._jobs if not j.future.done()]
                continue
            self._queued(-len(chosen))
            try:
                await loop.run_in_executor(self._executor, self._run_pass, loop, chosen)
            except Exception as exc:  # never let one bad pass kill the worker
                for job in {job for job, _ in chosen}:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _run_pass(self, loop: asyncio.AbstractEventLoop, chosen: list[tuple[Job, int]]) -> None:
        """Inference thread: run the chosen inputs as length groups, hand each group's rows back at once."""
        encodings = [job.encodings[i] for job, i in chosen]
        lengths = [len(e.ids) for e in encodings]
        for group in group_by_length(lengths):
            live = [k for k in group if not chosen[k][0].future.done()]
            if not live:
                continue
            start = time.perf_counter()
            vectors = self._embed_fn([encodings[k] for k in live])
            seconds = time.perf_counter() - start
            longest = max(lengths[k] for k in live)
            self._since_trim += len(live) * longest
            self._on_pass(len(live), len(live) * longest, sum(lengths[k] for k in live), seconds)
            loop.call_soon_threadsafe(self._deliver, [chosen[k] for k in live], vectors)

    def _deliver(self, items: list[tuple[Job, int]], vectors: np.ndarray) -> None:
        """Event loop: store rows; resolve every request whose last input just ran."""
        for (job, i), row in zip(items, vectors, strict=True):
            if job.future.done():
                continue
            assert job.out is not None
            job.out[i] = row
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job.out)
                with contextlib.suppress(ValueError):
                    self._jobs.remove(job)

    async def close(self) -> None:
        """Stop the worker and the inference thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for job in self._jobs:
            if not job.future.done():
                job.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
