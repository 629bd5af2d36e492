"""Helpers that turn library results into metadata a person can read in the Dagster UI."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg


def md_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], max_rows: int = 10, max_chars: int = 90
) -> dg.MetadataValue:
    """A Markdown table of the first ``max_rows`` rows, cells shortened to ``max_chars``."""

    def cell(v: Any) -> str:
        s = f"{v:.4f}" if isinstance(v, float) else str(v)
        s = s.replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= max_chars else s[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"\n_{len(rows) - max_rows} more rows not shown_")
    return dg.MetadataValue.md("\n".join(lines))


def histogram_md(values: Sequence[int], bins: Sequence[int]) -> dg.MetadataValue:
    """A Markdown histogram of integer values into ``bins`` (upper edges)."""
    counts = [0] * (len(bins) + 1)
    for v in values:
        idx = next((i for i, edge in enumerate(bins) if v <= edge), len(bins))
        counts[idx] += 1
    labels = [f"≤{b}" for b in bins] + [f">{bins[-1]}"]
    peak = max(counts) or 1
    lines = ["| tokens | passages | |", "|---|---|---|"]
    lines += [
        f"| {lab} | {c} | {'█' * round(20 * c / peak)} |" for lab, c in zip(labels, counts, strict=True)
    ]
    return dg.MetadataValue.md("\n".join(lines))


@contextmanager
def timed(meta: dict[str, Any], key: str = "seconds") -> Iterator[None]:
    """Record the wall time of the block into ``meta[key]``."""
    start = time.monotonic()
    try:
        yield
    finally:
        meta[key] = round(time.monotonic() - start, 2)
