"""Benchmark the NIM-compatible server against infinity-emb serving the same model, in the same run.

Both servers run at the same time on loopback, idle in turn: every load segment goes to one of them, and
the segments alternate (ours, infinity, infinity, ours, ...), so a change in the machine's load (it may be
shared) hits both alike. A throughput segment is a fixed amount of work (N requests from 16 users; texts/s
= its texts / time from the first request to the last answer): requests take seconds on a loaded 2-core
machine, so counting the requests that fall in a time window would be biased by the ones at its edges. Load comes from locust (``FastHttpUser``, closed loop, no think time), in its own
virtual environment, and so does infinity-emb (it pins numpy<2 and sentence-transformers 3): both are created
on first use under ``benchmarks/.work/`` (torch 2.13.0, the CPU build on this disk, is installed first).

Measured:

1. texts/s and latency at 16 clients for 1-text requests, 32-text requests and mixed lengths (1-32 texts of
   5-300 words) — embed_assets vs infinity-emb (ONNX fp32 vs infinity's torch engine, same model and
   256-token window; vectors checked equal);
2. served vs the in-process ONNX limit: ``OnnxEmbedder.encode`` on the 32-text load's texts in this process,
   16 requests' texts per call (what the server has in flight) in length-sorted batches of 32, no HTTP,
   alternating with the served segments;
3. p99 of 1-text requests (4 clients) alone vs while a 256-input request of 120-word passages is in flight
   (sent back to back; the one still running at the end of the segment is abandoned);
4. server RSS before and after a burst of 2 concurrent 256-input requests of long texts (and its peak).

The machine's load average (``os.getloadavg``) is recorded with every segment.

    python benchmarks/serve.py                    # ~9-10 min on 2 cores (plus the venvs the first time)
    python benchmarks/serve.py --seconds 60 --rounds 3        # longer segments
    python benchmarks/serve.py --no-infinity                  # embed_assets alone
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = Path(__file__).resolve().parent / ".work"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INFINITY_PIN = "infinity-emb[server,torch,optimum]==0.0.78"
LOCUST_PIN = "locust==2.47.0"
TORCH_PIN = "torch==2.13.0"  # the CPU build on this disk; an unpinned torch pulls a multi-GB CUDA build
MODEL_NAME = "all-MiniLM-L6-v2"


# --- environments ----------------------------------------------------------------------------------------


def ensure_venv(path: Path, packages: list[list[str]], probe: str) -> Path:
    """Create a virtual environment with ``packages`` (installed in that order) unless it already works.

    Args:
        path: Folder of the environment.
        packages: ``pip install`` argument lists, run one after another (torch first where needed).
        probe: Executable in ``bin/`` whose presence means the environment is complete.

    Returns:
        Its ``bin`` folder.
    """
    bin_dir = path / "bin"
    marker = path / ".complete"
    if marker.exists() and (bin_dir / probe).exists():
        return bin_dir
    print(f"creating {path} (first run only) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    for args in packages:
        subprocess.run([str(bin_dir / "pip"), "install", "-q", *args], check=True)
    marker.write_text(json.dumps(packages))
    return bin_dir


# --- texts and request bodies ----------------------------------------------------------------------------


def corpus_sentences() -> list[str]:
    """Real English sentences from the bundled sample corpus (5-40 words each)."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "sample_corpus").rglob("*.txt")))
    text = re.sub(r"\s+", " ", text)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in sentences if 5 <= len(s.split()) <= 40 and "::=" not in s]


def make_bodies(kind: str, n: int, sentences: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """Request bodies of one load.

    Args:
        kind: ``"1-text"``, ``"32-text"``, ``"mixed"`` (1-32 texts of 5-300 words) or ``"256-long"``
            (256 passages of 120 words, ~150 tokens each).
        n: Number of bodies.
        sentences: Source sentences.
        seed: Random seed.

    Returns:
        JSON-able bodies (``truncate: END`` so long texts are cut like infinity cuts them).
    """
    import random

    rng = random.Random(seed)

    def passage(words: int) -> str:
        out: list[str] = []
        while sum(len(s.split()) for s in out) < words:
            out.append(rng.choice(sentences))
        return " ".join(" ".join(out).split()[:words])

    bodies = []
    for _ in range(n):
        if kind == "1-text":
            inputs = [rng.choice(sentences)]
        elif kind == "32-text":
            inputs = [rng.choice(sentences) for _ in range(32)]
        elif kind == "mixed":
            inputs = [passage(int(5 * 60 ** rng.random())) for _ in range(rng.randint(1, 32))]
        elif kind == "256-long":
            inputs = [passage(120) for _ in range(256)]
        else:
            raise ValueError(kind)
        bodies.append({"input": inputs, "model": MODEL_NAME, "input_type": "query", "truncate": "END"})
    return bodies


# --- servers ---------------------------------------------------------------------------------------------


class Infinity:
    """infinity-emb serving the bundled model folder (torch engine, CPU), as PEERS.md ran it."""

    def __init__(self, bin_dir: Path, model_dir: str, log_path: Path) -> None:
        from embed_assets.serving.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            str(bin_dir / "infinity_emb"),
            "v2",
            "--model-id",
            model_dir,
            "--served-model-name",
            MODEL_NAME,
        ]
        cmd += ["--engine", "torch", "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--no-vector-disk-cache"]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.pid = self.proc.pid
        self.path = "/embeddings"
        self.log_path = log_path

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"infinity not ready after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        from embed_assets.serving.process import stop_server

        stop_server(self.pid)
        self.proc.wait(timeout=30)


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- measurements ----------------------------------------------------------------------------------------


def run_locust(
    bin_dir: Path,
    url: str,
    path: str,
    bodies: list[dict[str, Any]],
    users: int,
    seconds: float,
    scratch: Path,
    total: int = 0,
) -> dict[str, Any]:
    """One closed-loop locust segment: ``total`` requests (fixed work), or ``seconds`` long when 0.

    Returns:
        ``texts_per_s``, ``requests_per_s``, ``p50_ms``, ``p99_ms``, ``requests``, ``failures``, ``load``.
    """
    bodies_file = scratch / "bodies.json"
    bodies_file.write_text(json.dumps(bodies))
    out = scratch / "locust-out.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, EMB_BODIES=str(bodies_file), EMB_PATH=path, EMB_OUT=str(out), EMB_TOTAL=str(total))
    limit = 3600 if total else int(seconds) + WARMUP_S
    cmd = [str(bin_dir / "locust"), "-f", str(Path(__file__).with_name("locust_embeddings.py")), "--headless"]
    cmd += ["-u", str(users), "-r", str(users), "-t", f"{limit}s", "-H", url, "--only-summary"]
    cmd += ["--loglevel", "ERROR", "--stop-timeout", "900"]
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rec = json.loads(out.read_text())
    if total:
        return summarize_fixed(rec["texts"], rec["window"], len(rec["failures"]))
    return summarize(rec["texts"], rec["window"], len(rec["failures"]), WARMUP_S, WARMUP_S + seconds)


def summarize_fixed(texts: list[int], spans: list[list[float]], failures: int) -> dict:
    """A fixed amount of work: texts / (last answer - first request), latencies of all requests."""
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    lat = sorted(1000 * (e - s) for s, e in spans)
    return {
        "texts_per_s": sum(texts) / wall,
        "requests_per_s": len(lat) / wall,
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "requests": len(lat),
        "failures": failures,
        "load": load_avg(),
    }


#: Seconds at the start of a locust segment that are not measured (users connecting, first passes).
WARMUP_S = 2


def summarize(texts: list[int], spans: list[list[float]], failures: int, t0: float, t1: float) -> dict:
    """Throughput and latency of one segment measured over the window ``[t0, t1]`` (seconds from its start).

    Requests take seconds here, so counting whole requests in a window is coarse and biased (the first
    ones started in the warm-up). Each request is credited with the part of its texts that matches the part
    of its duration inside the window (the server shares its passes among the requests in flight), and
    latencies are those of the requests that started inside the window.

    Returns:
        ``texts_per_s``, ``requests_per_s``, ``p50_ms``, ``p99_ms``, ``requests``, ``failures``, ``load``.
    """
    credit = requests = 0.0
    for n, (start, end) in zip(texts, spans, strict=True):
        overlap = max(0.0, min(end, t1) - max(start, t0))
        share = overlap / (end - start) if end > start else float(t0 <= end <= t1)
        credit += n * share
        requests += share
    lat = sorted(1000 * (end - start) for start, end in spans if t0 <= start <= t1)
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {
        "texts_per_s": credit / (t1 - t0),
        "requests_per_s": requests / (t1 - t0),
        "p50_ms": statistics.median(lat) if lat else float("nan"),
        "p99_ms": pick(0.99),
        "requests": len(lat),
        "failures": failures,
        "load": load_avg(),
    }


def in_process(onnx_dir: str, bodies: list[dict[str, Any]], seconds: float, users: int) -> dict[str, Any]:
    """Texts/s of ``OnnxEmbedder.encode`` in this process for about ``seconds``: each call gets the texts of
    ``users`` requests (what the server has in flight at once), sorted by length into batches of 32."""
    from embed_assets.serving.embedder import OnnxEmbedder

    embedder = OnnxEmbedder(onnx_dir, memory_arena=False)  # the server's session settings
    embedder.encode(bodies[0]["input"], truncate="END", batch_size=32)
    done, start = 0, time.perf_counter()
    for i in itertools.count():
        chunk = [t for b in (bodies[(i * users + k) % len(bodies)] for k in range(users)) for t in b["input"]]
        embedder.encode(chunk, truncate="END", batch_size=32)
        done += len(chunk)
        if time.perf_counter() - start >= seconds:
            break
    return {"texts_per_s": done / (time.perf_counter() - start), "load": load_avg()}


def big_requests_in_flight(url: str, path: str, body: dict[str, Any], until: float, log: list) -> None:
    """Send the 256-input body back to back (one in flight at a time) until the monotonic time ``until``;
    the request still running then is abandoned (the client disconnects)."""
    import httpx

    while time.monotonic() < until:
        start = time.monotonic()
        try:
            with httpx.Client(base_url=url, timeout=max(1.0, until - start)) as client:
                status: int | str = client.post(path, json=body).status_code
        except httpx.TimeoutException:
            status = "abandoned"
        log.append((status, time.monotonic() - start))


def wait_idle(server: Any, timeout: float = 600) -> None:
    """Wait until the server has no queued work (ours: its metrics; infinity: its /models queue stats)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if isinstance(server, Ours):
                text = httpx.get(f"{server.url}/v1/metrics", timeout=10).text
                busy = float(re.search(r"^embed_queue_depth (\S+)$", text, re.M).group(1)) > 0
            else:
                stats = httpx.get(f"{server.url}/models", timeout=10).json()["data"][0]["stats"]
                busy = stats["queue_absolute"] > 0 or stats["results_pending"] > 0
        except (httpx.HTTPError, AttributeError, KeyError):
            busy = True
        if not busy:
            return
        time.sleep(0.5)


def latency_under_big_request(
    bin_dir: Path,
    server: Any,
    big: dict[str, Any],
    small: list[dict[str, Any]],
    seconds: float,
    scratch: Path,
) -> dict[str, Any]:
    """p99 of 1-text requests (4 clients) alone, then while a 256-input request is in flight."""
    alone = run_locust(bin_dir, server.url, server.path, small, 4, seconds, scratch)
    log: list = []
    until = time.monotonic() + seconds + 6  # covers locust's start and its 2 s warm-up
    thread = threading.Thread(target=big_requests_in_flight, args=(server.url, server.path, big, until, log))
    thread.start()
    time.sleep(1.0)  # the big request is queued and running before the measured segment starts
    loaded = run_locust(bin_dir, server.url, server.path, small, 4, seconds, scratch)
    thread.join()
    wait_idle(server)
    return {"alone": alone, "loaded": loaded, "big": log}


def rss_burst(server: Any, big: dict[str, Any], concurrency: int = 2) -> dict[str, Any]:
    """RSS before, peak during and 3 s after ``concurrency`` simultaneous 256-input requests."""
    import httpx

    before = rss_mib(server.pid)
    peak = [before]
    statuses: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_mib(server.pid))
            time.sleep(0.2)

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=900) as client:
            statuses.append(client.post(server.path, json=big).status_code)

    sampler = threading.Thread(target=sample)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(concurrency)]
    start = time.monotonic()
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    seconds = time.monotonic() - start
    stop.set()
    sampler.join()
    time.sleep(3)
    return {
        "before": before,
        "peak": max(peak),
        "after": rss_mib(server.pid),
        "statuses": statuses,
        "seconds": seconds,
        "load": load_avg(),
    }


# --- the run ---------------------------------------------------------------------------------------------


class Ours:
    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.url, self.pid, self.path = handle.url, handle.pid, "/v1/embeddings"


def check_same_vectors(ours: Any, infinity: Any, texts: list[str]) -> float:
    """Minimum cosine between the two servers' vectors for ``texts``."""
    import httpx
    import numpy as np

    def get(server: Any) -> np.ndarray:
        body = {"input": texts, "model": MODEL_NAME, "input_type": "query", "truncate": "END"}
        data = httpx.post(server.url + server.path, json=body, timeout=120).json()["data"]
        return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)

    a, b = get(ours), get(infinity)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the Markdown tables."""
    args = parse_args(argv)
    from embed_assets.models import BUNDLED_MODEL, resolve_model_path
    from embed_assets.serving.process import start_server

    model_dir = resolve_model_path(BUNDLED_MODEL)
    WORK.mkdir(parents=True, exist_ok=True)
    locust_bin = ensure_venv(WORK / "locust-venv", [[LOCUST_PIN]], "locust")
    inf_bin = None
    if args.infinity:
        inf_bin = ensure_venv(WORK / "infinity-venv", [[TORCH_PIN], [INFINITY_PIN]], "infinity_emb")
    sentences = corpus_sentences()
    loads = {k: make_bodies(k, 400, sentences, seed=i) for i, k in enumerate(("1-text", "32-text", "mixed"))}
    big = make_bodies("256-long", 1, sentences, seed=9)[0]
    started = time.monotonic()
    cosine = None
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        scratch = Path(tmp)
        onnx_dir = args.onnx_dir or export(model_dir, str(scratch / "onnx"))
        handle = start_server(
            onnx_dir,
            variant=args.variant,
            log_path=str(scratch / "ours.log"),
            ready_timeout=300,
            extra_args=args.server_args.split(),
        )
        servers: dict[str, Any] = {"embed_assets": Ours(handle)}
        try:
            if inf_bin is not None:
                inf = Infinity(inf_bin, model_dir, scratch / "infinity.log")
                servers["infinity-emb"] = inf
                inf.wait_ready()
                cosine = check_same_vectors(
                    servers["embed_assets"], inf, [b["input"][0] for b in loads["mixed"][:32]]
                )
                print(f"same vectors: min cosine {cosine:.6f}", file=sys.stderr)
            results = measure(args, servers, loads, big, onnx_dir, locust_bin, scratch)
        finally:
            for server in servers.values():
                (server.handle if isinstance(server, Ours) else server).stop()
    results["minutes"] = (time.monotonic() - started) / 60
    results["cosine"] = cosine
    print(report(args, results))
    return 0


def measure(
    args: argparse.Namespace,
    servers: dict[str, Any],
    loads: dict,
    big: dict,
    onnx_dir: str,
    locust_bin: Path,
    scratch: Path,
) -> dict[str, Any]:
    """All segments, alternating servers (and in-process runs) round by round."""
    names = list(servers)
    segments: dict[tuple[str, str], list[dict]] = {}
    inproc: list[dict] = []
    served_32: list[dict] = []
    # warm both servers (first requests allocate buffers, infinity compiles nothing on CPU but warms torch)
    for server in servers.values():
        run_locust(locust_bin, server.url, server.path, loads["mixed"][:50], 4, 3, scratch)
    for r in range(args.rounds):
        for load in loads:
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                print(f"round {r + 1}: {load} -> {name}", file=sys.stderr, flush=True)
                total = args.users * args.requests_per_user[load]
                res = run_locust(
                    locust_bin,
                    servers[name].url,
                    servers[name].path,
                    loads[load],
                    args.users,
                    0,
                    scratch,
                    total,
                )
                segments.setdefault((load, name), []).append(res)
                print(
                    f"  {res['texts_per_s']:.1f} texts/s, p99 {res['p99_ms']:.0f} ms, load {res['load']}",
                    file=sys.stderr,
                    flush=True,
                )
                if load == "32-text" and name == "embed_assets":
                    served_32.append(res)
            if load == "32-text":
                print(f"round {r + 1}: in-process ONNX", file=sys.stderr, flush=True)
                inproc.append(in_process(onnx_dir, loads["32-text"], args.seconds / 2, args.users))
    latency = {}
    rss = {}
    for name in names:
        print(f"latency with a 256-input request in flight -> {name}", file=sys.stderr, flush=True)
        latency[name] = latency_under_big_request(
            locust_bin, servers[name], big, loads["1-text"], args.latency_seconds, scratch
        )
        print(f"RSS burst -> {name}", file=sys.stderr, flush=True)
        rss[name] = rss_burst(servers[name], big)
    return {"segments": segments, "inproc": inproc, "served_32": served_32, "latency": latency, "rss": rss}


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    seg = res["segments"]
    names = sorted({n for _, n in seg}, key=lambda n: n != "embed_assets")
    lines = [
        f"### Serving: embed_assets (ONNX {args.variant}) vs infinity-emb 0.0.78 (torch, CPU), same run",
        "",
        f"all-MiniLM-L6-v2, 256-token window, truncate END; {args.users} locust users (closed loop), each "
        f"segment a fixed amount of work (requests per user: "
        + ", ".join(f"{k} {v}" for k, v in args.requests_per_user.items())
        + f"; texts/s = texts / (last answer - first request)), {args.rounds} rounds alternating servers; "
        f"{os.cpu_count()} CPU cores, client on the same machine. Run took {res['minutes']:.1f} min."
        + (f" Same vectors: min cosine {res['cosine']:.6f}." if res.get("cosine") is not None else ""),
        "",
        "| load | server | texts/s (median) | each round | p50 ms | p99 ms | failures | load avg per round |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for load in ("1-text", "32-text", "mixed"):
        for name in names:
            rows = seg.get((load, name), [])
            if not rows:
                continue
            lines.append(
                f"| {load} | {name} | {_median(rows, 'texts_per_s'):.1f} | "
                + ", ".join(f"{r['texts_per_s']:.1f}" for r in rows)
                + f" | {_median(rows, 'p50_ms'):.0f} | {_median(rows, 'p99_ms'):.0f} | "
                f"{sum(r['failures'] for r in rows)} | " + "; ".join(r["load"] for r in rows) + " |"
            )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    if "infinity-emb" in names:
        for load in ("1-text", "32-text", "mixed"):
            ratios = [
                a["texts_per_s"] / b["texts_per_s"]
                for a, b in zip(seg[(load, "embed_assets")], seg[(load, "infinity-emb")], strict=True)
                if b["texts_per_s"]
            ]
            med = statistics.median(ratios)
            goal = "≥ 1.2x infinity" if load != "mixed" else "(no target) vs infinity"
            met = "yes" if med >= 1.2 else "no"
            lines.append(
                f"| {load}: texts/s {goal} | {med:.2f}x (per round: {', '.join(f'{x:.2f}' for x in ratios)}) | "
                f"{met if load != 'mixed' else '–'} |"
            )
    served = [r["texts_per_s"] for r in res["served_32"]]
    inproc = [r["texts_per_s"] for r in res["inproc"]]
    ratio = statistics.median(s / i for s, i in zip(served, inproc, strict=True))
    lines.append(
        f"| served ≥ 0.9x in-process ONNX (32-text texts) | {ratio:.2f}x (served "
        + ", ".join(f"{s:.1f}" for s in served)
        + " vs in-process "
        + ", ".join(f"{i:.1f}" for i in inproc)
        + f" texts/s; load {'; '.join(r['load'] for r in res['inproc'])}) | {'yes' if ratio >= 0.9 else 'no'} |"
    )
    for name in names:
        lat = res["latency"][name]
        a, b = lat["alone"], lat["loaded"]
        big = ", ".join(f"{s} in {t:.1f}s" for s, t in lat["big"])
        x = b["p99_ms"] / a["p99_ms"] if a["p99_ms"] else float("nan")
        if not math.isfinite(x):  # no 1-text request was answered within the segment (+ locust's 120 s)
            lines.append(
                f"| {name}: p99 of 1-text requests with a 256-input request in flight | none of its 1-text "
                f"requests was answered while the 256-input request ran ({a['p99_ms']:.0f} ms alone) | "
                f"{'no' if name == 'embed_assets' else '–'} |"
            )
            continue
        target = " ≤ 10x" if name == "embed_assets" else " (peer, no target)"
        lines.append(
            f"| {name}: p99 of 1-text requests with a 256-input request in flight{target} | {x:.1f}x "
            f"({b['p99_ms']:.0f} ms vs {a['p99_ms']:.0f} ms alone, p50 {b['p50_ms']:.0f} vs {a['p50_ms']:.0f}; "
            f"256-input requests: {big}; load {a['load']} / {b['load']}) | "
            f"{('yes' if x <= 10 else 'no') if name == 'embed_assets' else '–'} |"
        )
    for name in names:
        r = res["rss"][name]
        x = r["after"] / r["before"]
        target = " ≤ 1.5x" if name == "embed_assets" else " (peer, no target)"
        lines.append(
            f"| {name}: RSS 3 s after 2 concurrent 256-input requests vs before{target} | {x:.2f}x "
            f"({r['before']:.0f} -> peak {r['peak']:.0f} -> {r['after']:.0f} MiB; statuses {r['statuses']}, "
            f"{r['seconds']:.0f} s; load {r['load']}) | {('yes' if x <= 1.5 else 'no') if name == 'embed_assets' else '–'} |"
        )
    return "\n".join(lines)


def export(model_dir: str, out_dir: str) -> str:
    """Export the bundled model (fp32 + int8) at its own 256-token window."""
    from embed_assets.export import export_onnx

    print("exporting ONNX ...", file=sys.stderr, flush=True)
    export_onnx(model_dir, out_dir, model_name=MODEL_NAME)
    return out_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (defaults: ~9-10 minutes on 2 cores)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx-dir", default=None, help="exported folder (default: export the bundled model)")
    p.add_argument("--variant", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--users", type=int, default=16, help="concurrent locust users per throughput segment")
    p.add_argument(
        "--requests-per-user",
        default="1-text=40,32-text=3,mixed=2",
        help="fixed work per throughput segment: requests per user for each load",
    )
    p.add_argument("--seconds", type=float, default=20, help="seconds of the in-process segments (x 1/2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of alternating segments")
    p.add_argument("--latency-seconds", type=float, default=20, help="seconds per latency segment")
    p.add_argument("--no-infinity", dest="infinity", action="store_false", help="skip the infinity-emb peer")
    p.add_argument(
        "--server-args", default="", help="extra embed-assets-serve flags, e.g. '--max-batch-tokens 1024'"
    )
    args = p.parse_args(argv)
    args.requests_per_user = {
        k: int(v) for k, v in (kv.split("=") for kv in args.requests_per_user.split(","))
    }
    return args


if __name__ == "__main__":
    raise SystemExit(main())
