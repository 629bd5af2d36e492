"""Rendering of stage results as metadata a person can read in the Dagster UI."""

from __future__ import annotations

from collections.abc import Sequence
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
