"""Benchmark the NIM-compatible server: torch vs ONNX fp32 vs ONNX int8, served on loopback.

Each backend runs as a real server process (``embed_assets.serving.process.start_server``, one at a time) and
is loaded by N concurrent HTTP clients; the table also shows in-process throughput of the same embedder
(no HTTP, large batches), the limit a server can approach. Clients run on the same machine, so on a small
machine they take CPU from the server: compare rows with each other rather than with a dedicated host.

    python benchmarks/serve.py                       # ~1-2 min on 2 cores, exports the bundled MiniLM first
    python benchmarks/serve.py --onnx-dir DIR --model-dir CKPT --concurrency 16 --requests 400
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The in-process torch peer gets the same OpenMP setting as the torch server (see embed_assets.serving.cli).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WORDS = [
    "embedding",
    "retrieval",
    "passage",
    "query",
    "model",
    "vector",
    "index",
    "search",
    "document",
    "token",
    "latency",
    "batch",
    "server",
    "throughput",
    "cosine",
    "similarity",
    "kubernetes",
    "deployment",
    "container",
    "gpu",
    "quantization",
    "precision",
    "recall",
    "ranking",
    "negative",
    "positive",
    "training",
    "dataset",
    "corpus",
    "chunk",
    "sentence",
    "paragraph",
    "language",
    "network",
]


def make_texts(n: int, words: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences of ``words // 2`` to ``words`` words.

    Args:
        n: Number of texts.
        words: Maximum words per text.
        seed: Random seed.

    Returns:
        The texts.
    """
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(max(1, words // 2), words))) + "." for _ in range(n)]


def load_test(url: str, texts: list[str], *, concurrency: int, inputs_per_request: int) -> dict[str, float]:
    """Send every text once (``inputs_per_request`` per request) from ``concurrency`` client threads.

    Args:
        url: Server base URL.
        texts: Inputs.
        concurrency: Client threads, each with its own connection.
        inputs_per_request: Texts per request.

    Returns:
        ``requests_per_s``, ``texts_per_s``, ``p50_ms``, ``p99_ms``, ``errors``.
    """
    import httpx

    bodies = [texts[i : i + inputs_per_request] for i in range(0, len(texts), inputs_per_request)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    cursor = iter(range(len(bodies)))
    barrier = threading.Barrier(concurrency + 1)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            c.get("/v1/health/ready")  # open the connection before the clock starts
            barrier.wait()
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                start = time.perf_counter()
                resp = c.post("/v1/embeddings", json={"input": bodies[i], "truncate": "END"})
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors[0] += resp.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests_per_s": len(bodies) / wall,
        "texts_per_s": len(texts) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors[0],
    }


def in_process_throughput(embedder: Any, texts: list[str], batch_size: int) -> float:
    """Texts/s of ``embedder.encode`` in this process (the serving limit).

    Args:
        embedder: An embedder from ``embed_assets.serving.embedder``.
        texts: Inputs.
        batch_size: Batch size.

    Returns:
        Texts per second.
    """
    embedder.encode(texts[:batch_size], truncate="END", batch_size=batch_size)
    start = time.perf_counter()
    embedder.encode(texts, truncate="END", batch_size=batch_size)
    return len(texts) / (time.perf_counter() - start)


def run_backend(name: str, args: argparse.Namespace, onnx_dir: str, texts: list[str]) -> dict[str, Any]:
    """Serve one backend, load it, stop it, then measure the same embedder in-process."""
    from embed_assets.serving.embedder import OnnxEmbedder, TorchEmbedder
    from embed_assets.serving.process import start_server

    log_path = str(Path(args.log_dir) / f"{name}.log")
    common = {"max_batch_size": args.max_batch_size, "ready_timeout": 180, "log_path": log_path}
    if name == "torch":
        extra = ["--max-seq-length", str(args.max_seq_length)]
        handle = start_server(None, backend="torch", model_dir=args.model_dir, extra_args=extra, **common)
    else:
        handle = start_server(onnx_dir, variant=name.removeprefix("onnx-"), **common)
    try:
        load_test(
            handle.url, texts[: args.concurrency * 2], concurrency=args.concurrency, inputs_per_request=1
        )
        served = load_test(
            handle.url, texts, concurrency=args.concurrency, inputs_per_request=args.inputs_per_request
        )
    finally:
        handle.stop()
    if name == "torch":
        embedder: Any = TorchEmbedder(args.model_dir, "cpu", max_seq_length=args.max_seq_length)
    else:
        embedder = OnnxEmbedder(onnx_dir, variant=name.removeprefix("onnx-"))
    served["in_process_texts_per_s"] = in_process_throughput(embedder, texts, args.max_batch_size)
    return served


def markdown_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """Render the results with ratios to the torch server and to the in-process limit."""
    base = results.get("torch", {}).get("texts_per_s")
    lines = [
        f"{args.requests} requests x {args.inputs_per_request} text(s) ({args.words} words max, "
        f"max_seq_length {args.max_seq_length}), {args.concurrency} concurrent clients, loopback, "
        f"{os.cpu_count()} CPU cores",
        "",
        "| backend | req/s | texts/s | p50 ms | p99 ms | errors | in-process texts/s | served / in-process "
        "| texts/s vs torch server |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        ratio = r["texts_per_s"] / r["in_process_texts_per_s"]
        vs_torch = f"{r['texts_per_s'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"| {name} | {r['requests_per_s']:.1f} | {r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {r['in_process_texts_per_s']:.1f} | {ratio:.2f} | {vs_torch} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (small defaults: ~1-2 minutes on 2 cores)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="bundled:all-MiniLM-L6-v2", help="sentence-transformers model")
    p.add_argument(
        "--onnx-dir", default=None, help="exported folder (default: export --model-dir to a temp dir)"
    )
    p.add_argument("--backends", default="torch,onnx-fp32,onnx-int8", help="comma-separated subset")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--inputs-per-request", type=int, default=1)
    p.add_argument("--words", type=int, default=40, help="maximum words per text")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=64)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the Markdown table."""
    args = parse_args(argv)
    from embed_assets.models import resolve_model_path

    args.model_dir = resolve_model_path(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        args.log_dir = scratch  # server logs and the temporary export go away with the run
        onnx_dir = args.onnx_dir or export_for_benchmark(args, str(Path(scratch) / "onnx"))
        texts = make_texts(args.requests * args.inputs_per_request, args.words)
        results = {}
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            results[name] = run_backend(name, args, onnx_dir, texts)
    print(markdown_table(results, args))
    return 0


def export_for_benchmark(args: argparse.Namespace, out_dir: str) -> str:
    """Export ``--model-dir`` (fp32 + int8) into ``out_dir`` and print its parity summary."""
    from embed_assets.export import export_onnx

    report = export_onnx(args.model_dir, out_dir, max_seq_length=args.max_seq_length)
    print(
        f"exported: fp32 {report.fp32_bytes / 1e6:.1f} MB (cos min {report.fp32_cosine_min:.6f}), "
        f"int8 {report.int8_bytes / 1e6:.1f} MB (cos min {report.int8_cosine_min:.4f} "
        f"mean {report.int8_cosine_mean:.4f})",
        file=sys.stderr,
    )
    return out_dir


if __name__ == "__main__":
    raise SystemExit(main())
