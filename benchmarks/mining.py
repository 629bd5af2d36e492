"""Benchmark: ``embed_assets.mining.mine_hard_negatives`` vs ``sentence_transformers.util.mine_hard_negatives``.

Both run with the same model, the same inputs and the same settings (TopK-PercPos: ``relative_margin=0.05``,
``sampling_strategy="top"`` by default); the script checks that they mine identical negatives and prints a
Markdown table.

Data: COVID-QA (BEIR folder ../shared/datasets/covidqa). Passages are sentence windows of the articles'
passages (1 sentence first, then 2- to 6-sentence windows at every offset until ``--passages`` is reached);
a query's positive is the window of its gold passage with the largest word overlap with the query. Queries
beyond COVID-QA's 1,380 are the same questions under fixed phrasings ("Question: …", lower-cased, …) with
the same positives. Every text is distinct (both implementations de-duplicate identical texts).

Rows of the table:

- ``sentence-transformers, cold``: ``mine_hard_negatives(..., cache_folder=DIR)``, empty DIR (encodes all).
- ``embed_assets, cold``: ``encode_with_cache`` on an empty cache + ``mine_hard_negatives(corpus_embeddings=…)``.
- ``sentence-transformers, warm``: the same call again; its ``cache_folder`` holds embeddings of exactly this
  corpus and these queries, so it encodes nothing.
- ``embed_assets, warm (corpus cached)``: passages from the per-chunk cache, queries encoded.
- ``embed_assets, warm (corpus + queries cached)``: both from the per-chunk cache, nothing encoded.
- with ``--edit-fraction F`` (default 0.01): F of the passages are edited, then ST (whose cache is keyed by a hash of the whole
  corpus, so it re-encodes everything) vs ours (re-encodes only the edited passages).

Usage::

    python benchmarks/mining.py                                  # 1K queries x 2K passages, ~4 min on 2 cores
    python benchmarks/mining.py --queries 10000 --passages 50000 # the issue's size (about an hour on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASET = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "covidqa"
)  # ../shared beside the checkout
QUERY_TEMPLATES = [
    "{q}",
    "Question: {q}",
    "{lq}",
    "According to the literature, {lq}",
    "COVID-19 research: {q}",
    "Please answer: {q}",
    "I would like to know: {lq}",
    "In the scientific articles, {lq}",
    "Q: {q}",
    "Briefly, {lq}",
]
WORD = re.compile(r"\w+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ------------------------------------------------------------------------------------------------ data
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _windows(text: str, width: int) -> list[str]:
    sentences = [s.strip() for s in SENTENCE_END.split(text) if len(s.strip()) > 20]
    return [" ".join(sentences[i : i + width]) for i in range(0, max(0, len(sentences) - width + 1))]


def _overlap(query: str, text: str) -> int:
    return len(set(WORD.findall(query.lower())) & set(WORD.findall(text.lower())))


def build_data(n_queries: int, n_passages: int, dataset: Path = DATASET) -> dict[str, Any]:
    """Queries, positive ids and a corpus of distinct sentence-window passages from COVID-QA.

    Args:
        n_queries: Number of queries (COVID-QA questions, then re-phrasings of them).
        n_passages: Number of passages (positives first, then 1- to 6-sentence windows).
        dataset: The BEIR folder.

    Returns:
        ``{"queries", "positive_ids", "corpus_ids", "corpus_texts"}``.
    """
    articles = {r["_id"]: r["text"] for r in _read_jsonl(dataset / "corpus.jsonl")}
    questions = {r["_id"]: r["text"] for r in _read_jsonl(dataset / "queries.jsonl")}
    qrels: dict[str, list[str]] = {}
    for split in ("train", "test"):
        with open(dataset / "qrels" / f"{split}.tsv") as f:
            next(f)
            for line in f:
                qid, pid, _ = line.rstrip("\n").split("\t")
                qrels.setdefault(qid, []).append(pid)

    windows: dict[int, dict[str, list[str]]] = {w: {} for w in range(1, 7)}
    for pid, text in articles.items():
        for w in windows:
            windows[w][pid] = _windows(text, w)

    corpus: dict[str, str] = {}  # text -> id (keeps texts distinct)

    def add(text: str, pid: str, w: int, i: int) -> str:
        if text not in corpus:
            corpus[text] = f"{pid}-w{w}-{i:03d}"
        return corpus[text]

    base_queries, base_positives = [], []
    for qid, pids in qrels.items():
        positives = []
        for pid in pids:
            candidates = windows[1][pid] or [articles[pid]]
            best = max(range(len(candidates)), key=lambda i: _overlap(questions[qid], candidates[i]))
            positives.append(add(candidates[best], pid, 1, best))
        base_queries.append(questions[qid])
        base_positives.append(list(dict.fromkeys(positives)))

    queries, positive_ids, seen = [], [], set()
    for template in QUERY_TEMPLATES:
        for q, pos in zip(base_queries, base_positives, strict=True):
            text = template.format(q=q, lq=q[:1].lower() + q[1:])
            if text not in seen and len(queries) < n_queries:
                seen.add(text)
                queries.append(text)
                positive_ids.append(pos)
    if len(queries) < n_queries:
        raise SystemExit(f"only {len(queries)} distinct queries can be built; ask for fewer")

    needed = {pid for pos in positive_ids for pid in pos}
    corpus = {t: i for t, i in corpus.items() if i in needed}
    for w in windows:
        for pid in sorted(windows[w]):
            for i, text in enumerate(windows[w][pid]):
                if len(corpus) >= n_passages:
                    break
                add(text, pid, w, i)
    if len(corpus) < n_passages:
        raise SystemExit(f"only {len(corpus)} distinct passages can be built; ask for fewer")
    items = sorted(corpus.items(), key=lambda kv: kv[1])
    return {
        "queries": queries,
        "positive_ids": positive_ids,
        "corpus_ids": [i for _, i in items],
        "corpus_texts": [t for t, _ in items],
    }


# ------------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds and this process's CPU seconds (all threads; less sensitive to other load)."""

    wall: float
    cpu: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def run_st(data: dict[str, Any], model: Any, settings: dict[str, Any], cache_folder: str) -> list[tuple]:
    """sentence-transformers' mine_hard_negatives (n-tuple output with scores) on the same data."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    text_of = dict(zip(data["corpus_ids"], data["corpus_texts"], strict=True))
    anchors, positives = [], []
    for q, pids in zip(data["queries"], data["positive_ids"], strict=True):
        for pid in pids:
            anchors.append(q)
            positives.append(text_of[pid])
    dataset = Dataset.from_dict({"query": anchors, "answer": positives})
    if settings["sampling_strategy"] == "random":
        random.seed(settings["seed"])
    out = mine_hard_negatives(
        dataset,
        model,
        corpus=list(data["corpus_texts"]),
        num_negatives=settings["num_negatives"],
        relative_margin=settings["relative_margin"],
        absolute_margin=settings["absolute_margin"],
        sampling_strategy=settings["sampling_strategy"],
        batch_size=settings["batch_size"],
        use_faiss=False,
        output_format="n-tuple",
        output_scores=True,
        verbose=False,
        cache_folder=cache_folder,
    )
    k = settings["num_negatives"]
    return [
        (r["query"], r["answer"], *[r[f"negative_{i}"] for i in range(1, k + 1)], *r["scores"]) for r in out
    ]


def run_ours(
    data: dict[str, Any], model: Any, settings: dict[str, Any], cache_dir: str, cache_queries: bool
) -> tuple[list[tuple], Any, dict[str, int]]:
    """Our pipeline path: per-chunk embedding cache for the corpus (and optionally queries), then mining."""
    from embed_assets.embedding_cache import EmbeddingCache
    from embed_assets.mining import mine_hard_negatives

    fingerprint = settings["fingerprint"]
    corpus_cache = EmbeddingCache(cache_dir, fingerprint, task="document")
    corpus_emb = corpus_cache.encode(model, data["corpus_texts"], data["corpus_ids"], settings["batch_size"])
    encoded = {"passages_encoded": corpus_cache.last_stats.n_encoded, "queries_encoded": 0}
    query_emb = None
    if cache_queries:
        query_cache = EmbeddingCache(cache_dir, fingerprint, task="query")
        query_emb = query_cache.encode(model, data["queries"], None, settings["batch_size"])
        encoded["queries_encoded"] = query_cache.last_stats.n_encoded
    result = mine_hard_negatives(
        data["queries"],
        data["positive_ids"],
        data["corpus_ids"],
        data["corpus_texts"],
        model,
        num_negatives=settings["num_negatives"],
        relative_margin=settings["relative_margin"],
        absolute_margin=settings["absolute_margin"],
        sampling_strategy=settings["sampling_strategy"],
        seed=settings["seed"],
        batch_size=settings["batch_size"],
        use_faiss=settings["use_faiss"],
        corpus_embeddings=corpus_emb,
        query_embeddings=query_emb,
    )
    if not cache_queries:
        encoded["queries_encoded"] = result.stats.n_unique_queries
    tuples = [
        (r.query, r.positive_text, *r.negative_texts, r.positive_score, *r.negative_scores)
        for r in result.rows
    ]
    return tuples, result, encoded


def _row(
    name: str, seconds: Timing, passages_encoded: int, queries_encoded: int, res: Any = None
) -> dict[str, Any]:
    """A JSON-able table row (also logged, so partial results survive an interrupted run)."""
    print(f"  -> {name}: wall {seconds.wall:.1f}s, CPU {seconds.cpu:.1f}s", file=sys.stderr, flush=True)
    search = "exact (torch)" if res is None else f"{res.stats.search_backend} {res.stats.search_seconds:.1f}s"
    return {
        "implementation": name,
        "wall": seconds.wall,
        "cpu": seconds.cpu,
        "passages_encoded": passages_encoded,
        "queries_encoded": queries_encoded,
        "search": search,
    }


class Phases:
    """Runs benchmark phases once; with ``--work-dir`` a re-run resumes after the last completed phase.

    Args:
        work_dir: Folder for the caches, the reference output and ``state.json``.
        signature: The settings that the saved state must match.
    """

    def __init__(self, work_dir: Path, signature: dict[str, Any]) -> None:
        self.dir = work_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file = work_dir / "state.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        if state.get("signature") != signature:
            state = {"signature": signature, "done": {}}
            for name in ("st_cache", "our_cache", "reference.pkl"):
                target = work_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.state = state
        self.fresh: list[str] = []  # phases measured by this invocation (the others were resumed)
        self.order: list[str] = []  # phases in the order main() runs them (the report's order)

    def run(self, key: str, fn: Callable[[], tuple[list[dict], list[tuple]]]) -> None:
        self.order.append(key)
        if key in self.state["done"]:
            print(
                f"  (phase {key!r} done in an earlier run; reusing its numbers)", file=sys.stderr, flush=True
            )
            return
        rows, checks = fn()
        self.state["done"][key] = {
            "rows": rows,
            "checks": [list(c) for c in checks],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.fresh.append(key)
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def _done(self) -> list[dict[str, Any]]:
        """Completed phases in run order (a resumed state may hold them in the order they were measured)."""
        return [self.state["done"][k] for k in self.order if k in self.state["done"]]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for phase in self._done() for r in phase["rows"]]

    @property
    def checks(self) -> list[tuple]:
        return [tuple(c) for phase in self._done() for c in phase["checks"]]

    def save_reference(self, out: list[tuple]) -> None:
        with open(self.dir / "reference.pkl", "wb") as f:
            pickle.dump(out, f)

    def reference(self) -> list[tuple]:
        with open(self.dir / "reference.pkl", "rb") as f:
            return pickle.load(f)


def compare(ours: list[tuple], theirs: list[tuple], k: int) -> tuple[bool, int, float]:
    """Same rows with the same negatives in the same order? Returns (identical, differing rows, max |Δscore|)."""
    n_text = 2 + k
    differing = sum(a[:n_text] != b[:n_text] for a, b in zip(ours, theirs, strict=False))
    differing += abs(len(ours) - len(theirs))
    max_diff = max(
        (
            abs(x - y)
            for a, b in zip(ours, theirs, strict=False)
            for x, y in zip(a[n_text:], b[n_text:], strict=True)
        ),
        default=0.0,
    )
    print(f"  -> identical: {differing == 0} ({differing} rows differ)", file=sys.stderr, flush=True)
    return differing == 0, differing, max_diff


def _edit(data: dict[str, Any], fraction: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    positives = {p for pos in data["positive_ids"] for p in pos}
    editable = [i for i, cid in enumerate(data["corpus_ids"]) if cid not in positives]
    chosen = set(rng.sample(editable, k=min(len(editable), max(1, int(fraction * len(data["corpus_ids"]))))))
    texts = [t + " (revised)" if i in chosen else t for i, t in enumerate(data["corpus_texts"])]
    return {**data, "corpus_texts": texts}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--num-negatives", type=int, default=5)
    parser.add_argument("--relative-margin", type=float, default=0.05)
    parser.add_argument("--absolute-margin", type=float, default=None)
    parser.add_argument("--sampling", choices=["top", "random"], default="top")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--use-faiss", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--max-seq-length", type=int, default=None, help="default: the model's (256)")
    parser.add_argument(
        "--edit-fraction",
        type=float,
        default=0.01,
        help="also time re-mining after this share of passages changed (0 = skip)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="cold runs: best of N (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep caches and finished phases here; re-running with the same settings resumes (long runs)",
    )
    args = parser.parse_args(argv)

    import torch

    from embed_assets.embedding_cache import model_fingerprint
    from embed_assets.models import BUNDLED_MODEL, load_sentence_transformer

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    data = build_data(args.queries, args.passages, args.dataset)
    n_pairs = sum(len(p) for p in data["positive_ids"])
    log(
        f"data: {len(data['queries'])} queries ({n_pairs} positive pairs) x {len(data['corpus_ids'])} passages"
    )
    model = load_sentence_transformer(BUNDLED_MODEL, max_seq_length=args.max_seq_length)
    model.encode(["warm-up"] * 8)  # one-time kernel/thread start-up is nobody's cost
    settings = {
        "num_negatives": args.num_negatives,
        "relative_margin": args.relative_margin,
        "absolute_margin": args.absolute_margin,
        "sampling_strategy": args.sampling,
        "seed": 42,
        "batch_size": args.batch_size,
        "use_faiss": args.use_faiss,
        "fingerprint": model_fingerprint(model),
    }
    k = args.num_negatives
    signature = {**vars(args), "dataset": str(args.dataset), "output": None, "work_dir": None}
    with tempfile.TemporaryDirectory() as tmp:
        phases = Phases(args.work_dir or Path(tmp), signature)
        st_cache, our_cache = str(phases.dir / "st_cache"), str(phases.dir / "our_cache")
        n_c, n_q = len(set(data["corpus_texts"])), len(set(data["queries"]))

        def st_cold():
            best = Timing(float("inf"), float("inf"))
            for attempt in range(1, args.repeats + 1):
                shutil.rmtree(st_cache, ignore_errors=True)
                log(f"sentence-transformers, cold ({attempt}/{args.repeats}) ...")
                out, t = timed(lambda: run_st(data, model, settings, st_cache))
                best = min(best, t, key=lambda x: x.wall)
            phases.save_reference(out)
            return [_row("sentence-transformers, cold", best, n_c, n_q)], []

        def ours_cold():
            best = Timing(float("inf"), float("inf"))
            for attempt in range(1, args.repeats + 1):
                shutil.rmtree(our_cache, ignore_errors=True)
                log(f"embed_assets, cold ({attempt}/{args.repeats}) ...")
                (ours, result, enc), t = timed(
                    lambda: run_ours(data, model, settings, our_cache, cache_queries=True)
                )
                best = min(best, t, key=lambda x: x.wall)
            row = _row("embed_assets, cold (empty cache)", best, **enc, res=result)
            return [row], [("embed_assets cold", *compare(ours, phases.reference(), k))]

        def st_warm():
            log("sentence-transformers, warm ...")
            out, t = timed(lambda: run_st(data, model, settings, st_cache))
            row = _row("sentence-transformers, warm (cache_folder hit)", t, 0, 0)
            return [row], [("sentence-transformers warm", *compare(out, phases.reference(), k))]

        def ours_warm(cache_queries: bool):
            what = "corpus + queries cached" if cache_queries else "corpus cached"
            log(f"embed_assets, warm ({what}) ...")
            (ours, result, enc), t = timed(
                lambda: run_ours(data, model, settings, our_cache, cache_queries=cache_queries)
            )
            row = _row(f"embed_assets, warm ({what})", t, **enc, res=result)
            return [row], [(f"embed_assets warm ({what})", *compare(ours, phases.reference(), k))]

        def edit():
            edited = _edit(data, args.edit_fraction, seed=1)
            label = f"{args.edit_fraction:.1%} of passages edited"
            log(f"{label}; sentence-transformers ...")
            st_edit, t = timed(lambda: run_st(edited, model, settings, st_cache))
            rows = [_row(f"sentence-transformers, {label}", t, len(set(edited["corpus_texts"])), 0)]
            log("embed_assets after the edit ...")
            (ours, result, enc), t = timed(
                lambda: run_ours(edited, model, settings, our_cache, cache_queries=True)
            )
            rows.append(_row(f"embed_assets, {label}", t, **enc, res=result))
            return rows, [
                ("after the edit: embed_assets vs sentence-transformers", *compare(ours, st_edit, k))
            ]

        phases.run("st_cold", st_cold)
        phases.run("ours_cold", ours_cold)
        phases.run("st_warm", st_warm)
        phases.run("ours_warm_corpus", lambda: ours_warm(cache_queries=False))
        phases.run("ours_warm_all", lambda: ours_warm(cache_queries=True))
        if args.edit_fraction > 0:
            phases.run("edit", edit)
        rows, checks = phases.rows, phases.checks

        resumed = [
            f"{key} ({phases.state['done'][key].get('finished', 'time not recorded')})"
            for key in phases.order
            if key not in phases.fresh
        ]
    table = render(args, data, n_pairs, rows, checks)
    if resumed:
        table += (
            "\n\nResumed from the work dir (measured by an earlier invocation with the same settings): "
            + ", ".join(resumed)
            + "."
        )
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 0 if all(ok for _, ok, _, _ in checks) else 1


def _same_scenario_peer(implementation: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sentence-transformers row of the same scenario (cold, warm, after the edit) as an embed_assets row."""
    if not implementation.startswith("embed_assets, "):
        return None
    scenario = implementation.removeprefix("embed_assets, ")
    for row in rows:
        name = row["implementation"]
        if not name.startswith("sentence-transformers, "):
            continue
        theirs = name.removeprefix("sentence-transformers, ")
        if theirs.split(" ")[0] == scenario.split(" ")[0]:  # "cold", "warm" or the edit label
            return row
    return None


def render(args, data, n_pairs: int, rows: list[dict[str, Any]], checks: list[tuple]) -> str:
    """The Markdown report."""
    import torch

    lines = [
        f"### Hard-negative mining: {len(data['queries']):,} queries ({n_pairs:,} positive pairs) x "
        f"{len(data['corpus_ids']):,} passages",
        "",
        f"all-MiniLM-L6-v2 (max_seq_length {args.max_seq_length or 'model default'}), "
        f"{torch.get_num_threads()} torch threads, CPU; num_negatives={args.num_negatives}, "
        f"relative_margin={args.relative_margin}, absolute_margin={args.absolute_margin}, "
        f"sampling={args.sampling}, batch_size={args.batch_size}; cold rows: best of {args.repeats}. "
        f"Machine load average at the end: {os.getloadavg()[0]:.1f}.",
        "",
        "| implementation | wall s | CPU s | speed-up vs ST cold (wall) | (CPU) "
        "| vs ST, same scenario (wall) | passages encoded | queries encoded | search |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    st_cold = next(r for r in rows if r["implementation"] == "sentence-transformers, cold")
    for row in rows:
        peer = _same_scenario_peer(row["implementation"], rows)
        vs_peer = f"{peer['wall'] / max(row['wall'], 1e-6):.2f}x" if peer else "–"
        lines.append(
            f"| {row['implementation']} | {row['wall']:.1f} | {row['cpu']:.1f} | "
            f"{st_cold['wall'] / max(row['wall'], 1e-6):.2f}x | {st_cold['cpu'] / max(row['cpu'], 1e-6):.2f}x | "
            f"{vs_peer} | {row['passages_encoded']:,} | {row['queries_encoded']:,} | {row['search']} |"
        )
    lines.append("")
    all_ok = all(ok for _, ok, _, _ in checks)
    lines.append(f"identical negatives: {'yes' if all_ok else 'no'}")
    for name, ok, differing, max_diff in checks:
        lines.append(
            f"- {name}: {'identical' if ok else f'{differing} rows differ'}, max |Δscore| {max_diff:.1e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
