"""Retention of old runs' artifacts: ``make gc`` (``python -m embed_assets.retention``).

Every materialization writes its output under ``<artifact root>/<asset>/<run id>/`` and nothing else deletes
them, so the root grows with every run. This removes the run folders no live state refers to, keeping:

- every folder a latest manifest (``<root>/manifests/<asset>.json``) or a frozen evaluation set
  (``<root>/eval_frozen/*.json``) names: what the next run reads, what is served, what the gates compare with;
- the newest ``keep_runs`` run folders of each asset (to inspect or roll back);
- folders younger than ``min_age_hours`` (a run may be writing them right now).

Artifact files are stored once by content (``<root>/objects``, hard-linked from the run folders): an object no
run folder links to any more is removed with its last run folder. Caches (``<root>/cache``), MLflow's store and
the manifests themselves are never touched. Written by hand
because Dagster has no retention for artifacts an asset writes itself (its own retention covers run storage).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from embed_assets.stages.common import MANIFESTS_DIR, OBJECTS_DIR, STEPS_DIR, artifact_root
from embed_assets.stages.split import FROZEN_DIR


class RetentionSettings(BaseModel):
    """How much of old runs' output to keep."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_runs: int = Field(
        default=3, ge=0, description="Newest run folders kept per asset besides live ones."
    )
    min_age_hours: float = Field(
        default=1.0, ge=0, description="Younger run folders are kept (a run may be writing them)."
    )
    dry_run: bool = Field(default=False, description="Report what would be removed; remove nothing.")


@dataclass
class RetentionReport:
    """What :func:`collect_garbage` removed (or would remove) and kept."""

    removed: list[str] = field(default_factory=list)
    kept_live: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    objects_removed: int = 0  # content-addressed artifact files no run folder links to any more
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} {len(self.removed)} run folders and {self.objects_removed} unlinked objects "
            f"({self.freed_bytes / 2**20:.1f} MiB); kept "
            f"{len(self.kept_live)} live and {len(self.kept_recent)} recent"
        )


def live_paths(root: Path) -> set[Path]:
    """Every path under ``root`` that a latest manifest or a frozen evaluation set names."""
    found: set[Path] = set()
    for folder in (root / MANIFESTS_DIR, root / FROZEN_DIR):
        for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            for value in _strings(json.loads(file.read_text(encoding="utf-8"))):
                # Resolved, so a path written through a symlinked root still protects its folder.
                if value.startswith(("/", "~")) and "\n" not in value and len(value) < 4096:
                    path = Path(value).expanduser().resolve()
                    if root in path.parents:
                        found.add(path)
    return found


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def run_folders(root: Path) -> dict[str, list[Path]]:
    """Run folders per asset (assets = those with a manifest, plus the inner steps' folder), newest first."""
    manifests = root / MANIFESTS_DIR
    assets = sorted(p.stem for p in manifests.glob("*.json")) if manifests.is_dir() else []
    assets.append(STEPS_DIR)  # inner steps' outputs (e.g. chunking shards' manifests), one folder per run
    out = {}
    for asset in assets:
        runs = [p for p in (root / asset).iterdir() if p.is_dir()] if (root / asset).is_dir() else []
        out[asset] = sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)
    return out


def collect_garbage(root: str | Path, settings: RetentionSettings) -> RetentionReport:
    """Remove old run folders that nothing live refers to.

    Args:
        root: The artifact root.
        settings: Runs to keep, minimum age, dry run.

    Returns:
        A :class:`RetentionReport`.
    """
    root = Path(root).resolve()
    live = live_paths(root)
    report = RetentionReport(dry_run=settings.dry_run)
    cutoff = time.time() - settings.min_age_hours * 3600
    for runs in run_folders(root).values():
        for rank, run in enumerate(runs):
            if any(p == run or run in p.parents for p in live):
                report.kept_live.append(str(run))
            elif rank < settings.keep_runs or run.stat().st_mtime > cutoff:
                report.kept_recent.append(str(run))
            else:
                # a file linked from the object store frees its bytes only with its last link (below)
                report.freed_bytes += sum(
                    st.st_size for f in run.rglob("*") if f.is_file() and (st := f.stat()).st_nlink == 1
                )
                report.removed.append(str(run))
                if not settings.dry_run:
                    shutil.rmtree(run)
    objects = root / OBJECTS_DIR
    for obj in sorted(objects.iterdir()) if objects.is_dir() and not settings.dry_run else []:
        st = obj.stat()
        if obj.is_file() and st.st_nlink == 1:  # no run folder links to it any more
            report.freed_bytes += st.st_size
            report.objects_removed += 1
            obj.unlink()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="", help="artifact root (default: as the assets resolve it)")
    defaults = RetentionSettings()
    p.add_argument("--keep-runs", type=int, default=defaults.keep_runs, help="newest runs kept per asset")
    p.add_argument(
        "--min-age-hours", type=float, default=defaults.min_age_hours, help="younger runs are kept"
    )
    p.add_argument("--dry-run", action="store_true", help="report only")
    args = p.parse_args(argv)
    settings = RetentionSettings(
        keep_runs=args.keep_runs, min_age_hours=args.min_age_hours, dry_run=args.dry_run
    )
    root = artifact_root(args.root)
    report = collect_garbage(root, settings)
    for path in report.removed:
        print(("would remove " if settings.dry_run else "removed ") + path)
    print(f"{root}: {report.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
