"""Prometheus metrics of the embedding server (``GET /v1/metrics``), built with ``prometheus_client``.

Each app has its own ``CollectorRegistry`` (never the process-global one), so several apps in one process —
tests, benchmarks — keep separate counts. Exposed series (text format 0.0.4):

=========================================== ======== =========================================================
name                                        type     meaning
=========================================== ======== =========================================================
``embed_model_info{model,backend,variant,   gauge    1; the served model, its variant and where it came from
source,checkpoint_run_id}``                          (``embed_assets_model.json``; ``unknown`` without it)
``embed_http_requests_total{method,path,    counter  HTTP requests answered (``path`` is a route or ``other``;
status}``                                            499 = client went away before the answer)
``embed_request_duration_seconds``          hist.    ``POST /v1/embeddings`` latency, parse to last byte
``embed_inputs_total``                      counter  inputs embedded (successful requests only)
``embed_prompt_tokens_total``               counter  their tokens (prefix and special tokens included)
``embed_batches_total``                     counter  forward passes (one per length group)
``embed_batch_size``                        hist.    inputs per forward pass
``embed_batch_size_max``                    gauge    largest forward pass so far
``embed_batch_padded_tokens_total``         counter  tokens fed to the model, padding included
``embed_batch_real_tokens_total``           counter  the real tokens among them (padding = the difference)
``embed_inference_duration_seconds``        hist.    forward-pass latency
``embed_queue_depth``                       gauge    inputs waiting for a forward pass
``embed_inflight_tokens``                   gauge    tokens of accepted requests not yet answered
``embed_rejected_total{reason}``            counter  requests refused by a limit (``too_many_tokens``: 413,
                                                     ``server_busy``: 429)
``process_*``                               various  this process: RSS, CPU seconds, open fds (``ProcessCollector``)
=========================================== ======== =========================================================
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

#: Content type of ``GET /v1/metrics`` (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROUTE_PATHS = frozenset(
    {
        "/v1/embeddings",
        "/v1/models",
        "/v1/health/ready",
        "/v1/health/live",
        "/v1/metrics",
        "/embeddings",
        "/models",
        "/openapi.json",
    }
)


class ServerMetrics:
    """The server's counters, gauges and histograms in a registry of its own.

    Args:
        info: Labels of ``embed_model_info`` (model, backend, variant, source, checkpoint_run_id).
    """

    def __init__(self, info: dict[str, str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        labels = sorted(info)
        Gauge("embed_model_info", "Served model (value 1).", labels, registry=r).labels(**info).set(1)
        self.requests = Counter(
            "embed_http_requests",
            "HTTP requests by method, path and status.",
            ["method", "path", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "embed_request_duration_seconds",
            "POST /v1/embeddings latency.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.inputs = Counter("embed_inputs", "Inputs embedded.", registry=r)
        self.prompt_tokens = Counter("embed_prompt_tokens", "Tokens embedded.", registry=r)
        self.batches = Counter("embed_batches", "Forward passes run.", registry=r)
        self.batch_size = Histogram(
            "embed_batch_size", "Inputs per forward pass.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_size_max = Gauge("embed_batch_size_max", "Largest forward pass so far.", registry=r)
        self.padded_tokens = Counter(
            "embed_batch_padded_tokens", "Tokens fed to the model, padding included.", registry=r
        )
        self.real_tokens = Counter("embed_batch_real_tokens", "Real tokens fed to the model.", registry=r)
        self.inference_seconds = Histogram(
            "embed_inference_duration_seconds", "Forward pass latency.", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("embed_queue_depth", "Inputs waiting for a forward pass.", registry=r)
        self.inflight_tokens = Gauge(
            "embed_inflight_tokens", "Tokens of accepted requests not answered yet.", registry=r
        )
        self.rejected = Counter("embed_rejected", "Requests refused by a limit.", ["reason"], registry=r)
        self._largest = 0

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        """Count one HTTP request and, for embeddings, its latency.

        Args:
            method: HTTP method.
            path: Request path (unknown paths are counted as ``other``, so scanners cannot grow the label set).
            status: Response status.
            seconds: Time from the first byte in to the last byte out.
        """
        if path in _ROUTE_PATHS:
            label = path
        elif path.startswith(("/v1/models/", "/models/")):
            label = path[: path.index("/models/")] + "/models/{id}"
        else:
            label = "other"
        self.requests.labels(method if len(method) <= 10 else "other", label, str(status)).inc()
        if label in ("/v1/embeddings", "/embeddings"):
            self.request_seconds.observe(seconds)

    def observe_pass(self, size: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        """Count one forward pass.

        Args:
            size: Inputs in the pass.
            padded_tokens: ``size`` x the longest input.
            real_tokens: Sum of the inputs' lengths.
            seconds: Its duration.
        """
        self.batches.inc()
        self.batch_size.observe(size)
        if size > self._largest:
            self._largest = size
            self.batch_size_max.set(size)
        self.padded_tokens.inc(padded_tokens)
        self.real_tokens.inc(real_tokens)
        self.inference_seconds.observe(seconds)

    def observe_embeddings(self, inputs: int, tokens: int) -> None:
        """Count the inputs and tokens of one successful request."""
        self.inputs.inc(inputs)
        self.prompt_tokens.inc(tokens)

    def render(self) -> bytes:
        """The registry in Prometheus text format 0.0.4."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, Any] | None = None) -> float | None:
        """Current value of one sample (for tests and benchmarks in the same process).

        Args:
            name: Sample name, e.g. ``embed_batches_total``.
            labels: Its labels.

        Returns:
            The value, or ``None`` when there is no such sample.
        """
        return self.registry.get_sample_value(name, {k: str(v) for k, v in (labels or {}).items()})
