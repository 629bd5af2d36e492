"""The fine-tuned model's card (``README.md`` in its folder): what it is, what it was tuned on, how it scores.

sentence-transformers writes a card on ``save()`` whose widget and dataset sections quote training pairs
verbatim, which publishes a private corpus the moment the model is shared. This card replaces it and states
facts only: the base model, the data in counts, generator and content hashes (never its text, unless the user
opts in with ``TrainSettings.model_card_examples``), the training settings, and, once ``beir_metrics`` has run,
the base / fine-tuned (/ merged) metrics and the guard results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
#: The facts the card was rendered from (so a later stage can add metrics without re-deriving them).
FACTS_FILE = "embed_assets_card.json"


def write_card(model_dir: str | Path, facts: Mapping[str, Any]) -> Path:
    """Write ``README.md`` and the facts it came from into ``model_dir``.

    Args:
        model_dir: A saved sentence-transformers folder.
        facts: See :func:`render_card`.

    Returns:
        The card's path.
    """
    from embed_assets.storage import write_json

    folder = Path(model_dir)
    write_json(folder / FACTS_FILE, dict(facts))
    path = folder / CARD_FILE
    path.write_text(render_card(facts), encoding="utf-8")
    return path


def update_card(model_dir: str | Path, **more: Any) -> Path:
    """Add facts (e.g. ``metrics``) to the card already in ``model_dir`` and re-render it."""
    folder = Path(model_dir)
    facts_file = folder / FACTS_FILE
    facts = json.loads(facts_file.read_text(encoding="utf-8")) if facts_file.is_file() else {}
    facts.update(more)
    return write_card(folder, facts)


def render_card(facts: Mapping[str, Any]) -> str:
    """The Markdown card.

    Args:
        facts: ``base_model``, ``data`` (counts, generator, hashes), ``training`` (settings), optionally
            ``examples`` (opted-in training pairs), ``metrics`` (``{set: {"base", "finetuned", ...}}``),
            ``guard`` and ``merge`` (see :mod:`embed_assets.stages.evaluate`).

    Returns:
        The card text (YAML front matter for model hubs, then Markdown).
    """
    base = facts.get("base_model", "unknown")
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, embed-assets, domain-adaptation]",
        f"base_model: {base}",
        "---",
        "",
        f"# Domain-adapted embedding model (from `{base}`)",
        "",
        "Fine-tuned by embed_assets on a private corpus. This card states counts and hashes of the training "
        "data, not its text.",
        "",
        "## Training data",
        "",
        *_kv(facts.get("data", {})),
        "",
        "## Training",
        "",
        *_kv(facts.get("training", {})),
    ]
    metrics = facts.get("metrics") or {}
    if metrics:
        lines += ["", "## Evaluation (nDCG@10 and Recall@10, same test set and window for every model)", ""]
        lines += _metrics_table(metrics)
    if facts.get("gates"):
        lines += ["", "## Gates", ""]
        lines += [
            f"- {name}: {'passed' if g['passed'] else 'FAILED'} ({g['result']})"
            for name, g in facts["gates"].items()
        ]
    if facts.get("merge"):
        lines += ["", "## Model merging", "", *_kv(facts["merge"])]
    examples = facts.get("examples") or []
    if examples:
        lines += ["", "## Examples from the training data (included because the user opted in)", ""]
        lines += [f"- **{e['anchor']}** → {e['positive']}" for e in examples]
    else:
        lines += ["", "No training text is included in this card (`model_card_examples: 0`)."]
    return "\n".join(lines) + "\n"


def _kv(values: Mapping[str, Any]) -> list[str]:
    return [f"- {k}: {_fmt(v)}" for k, v in values.items()]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(_fmt(v) for v in value)
    return f"`{value}`" if isinstance(value, str) and value and " " not in value else str(value)


def _metrics_table(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    models = sorted(
        {m for per_set in metrics.values() for m in per_set}, key=("base", "finetuned", "merged").index
    )
    lines = ["| set | " + " | ".join(f"{m} nDCG@10 | {m} R@10" for m in models) + " |"]
    lines.append("|---|" + "---:|" * (2 * len(models)))
    for name, per_set in metrics.items():
        cells = []
        for m in models:
            values = per_set.get(m, {})
            cells += [
                f"{values.get('NDCG@10', float('nan')):.4f}",
                f"{values.get('Recall@10', float('nan')):.4f}",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
