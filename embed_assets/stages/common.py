"""What every stage function shares: where it writes, how it reports, the model it works with, and the typed
manifest it returns.

A stage function is Dagster-free: ``run(inputs..., settings, ctx) -> Manifest``. The Dagster assets
(``embed_assets/defs/``), the benchmarks and the CLIs all call the same functions; an asset only resolves its
config and resources into these arguments and turns the manifest's :meth:`Manifest.metadata` into Dagster
metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from embed_assets.models import BUNDLED_MODEL

M = TypeVar("M", bound="Manifest")


class StageLog(Protocol):
    """The part of a logger a stage uses (``logging.Logger`` and Dagster's ``context.log`` both fit)."""

    def info(self, msg: str, *args: Any, **kwargs: Any) -> Any: ...

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> Any: ...


class StageError(RuntimeError):
    """A stage cannot produce its output; ``metadata`` says what it saw (shown with the failure)."""

    def __init__(self, message: str, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metadata = metadata or {}


@dataclass(frozen=True)
class StageContext:
    """Where a stage writes its artifacts and where it reports progress.

    Attributes:
        root: The artifact root (``$EMBED_ASSETS_HOME``): one folder per stage and run, plus ``cache/``.
        run_id: The orchestrator's run id (a Dagster run id, or ``local-…`` for scripts).
        log: Progress and warnings (one line each).
    """

    root: Path
    run_id: str
    log: StageLog = field(default_factory=lambda: logging.getLogger("embed_assets"))

    @classmethod
    def local(cls, root: str | Path, run_id: str | None = None, log: StageLog | None = None) -> StageContext:
        """A context for scripts and benchmarks (a fresh ``local-…`` run id unless given)."""
        return cls(
            Path(root).resolve(),
            run_id or f"local-{uuid.uuid4().hex[:12]}",
            log or logging.getLogger("embed_assets"),
        )

    def out_dir(self, stage: str) -> Path:
        """A folder for one stage's output in this run (earlier runs' outputs stay readable)."""
        path = self.root / stage / self.run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, *paths: str | Path | None) -> int:
        """Store finished artifacts content-addressed (``<root>/objects``): a file whose bytes an earlier run
        wrote already becomes a hard link to that file, so an unchanged re-run adds no disk.

        Returns:
            How many of ``paths`` were unchanged copies (now links).
        """
        from embed_assets.storage import dedupe_file

        return sum(dedupe_file(p, self.root / OBJECTS_DIR) for p in paths if p and Path(p).is_file())

    def cache_dir(self, name: str) -> Path:
        """A cache shared by runs (SDG answers, embeddings, trainer checkpoints)."""
        path = self.root / "cache" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class ModelSpec:
    """The base model a pipeline adapts, and how to address it.

    Attributes:
        base_model: ``bundled:all-MiniLM-L6-v2`` (offline default), a local folder or a Hugging Face id.
        query_prompt: Prefix for queries (e.g. ``"query: "`` for e5 models).
        passage_prompt: Prefix for passages.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:n]"``.
    """

    base_model: str = BUNDLED_MODEL
    query_prompt: str = ""
    passage_prompt: str = ""
    device: str = "auto"

    def path(self) -> str:
        """A local path or hub id that ``SentenceTransformer`` loads."""
        from embed_assets.models import resolve_model_path

        return resolve_model_path(self.base_model)

    def torch_device(self) -> str:
        from embed_assets.models import pick_device

        return pick_device(self.device)

    def prompts(self) -> tuple[str | None, str | None]:
        """``(query_prompt, passage_prompt)`` with empty prompts as ``None`` (sentence-transformers' spelling)."""
        return self.query_prompt or None, self.passage_prompt or None


# ------------------------------------------------------------------------------------- metadata values
@dataclass(frozen=True)
class Table:
    """Rows for a table in the UI (the orchestrator renders it; ``max_rows`` are shown)."""

    columns: list[str]
    rows: list[dict[str, Any]]
    max_rows: int = 10
    max_chars: int = 90


@dataclass(frozen=True)
class Markdown:
    text: str


@dataclass(frozen=True)
class PathRef:
    path: str


@dataclass(frozen=True)
class Url:
    url: str


@dataclass(frozen=True)
class JsonValue:
    value: Any


@dataclass(frozen=True)
class Gate:
    """The outcome of a check a stage runs on its own output (parity, quality, leakage).

    Attributes:
        name: Check name (the Dagster asset check of the same name).
        passed: Whether it passed.
        message: One sentence a person can act on.
        severity: ``"error"`` (a failure is a problem) or ``"warn"`` (advisory).
        blocking: A failed blocking gate stops what is downstream.
        metadata: Numbers behind the verdict.
    """

    name: str
    passed: bool
    message: str = ""
    severity: Literal["error", "warn"] = "error"
    blocking: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- manifests
@dataclass
class Manifest:
    """Base of every stage's typed output: a dataclass of JSON-able fields (paths as strings).

    The Dagster IO manager stores it as readable JSON (:meth:`to_json`), downstream stages read it back with
    :meth:`from_dict`; :meth:`metadata` is what a person sees in the UI.
    """

    #: Fields left out of the UI metadata by default (large lists, internal ids).
    hidden: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)

    @classmethod
    def from_dict(cls: type[M], data: dict[str, Any]) -> M:
        """Rebuild a manifest (nested dataclasses included) from :meth:`to_dict` output."""
        from pydantic import TypeAdapter

        return TypeAdapter(cls).validate_python(data)

    def gates(self) -> list[Gate]:
        """The checks this stage ran (none by default)."""
        return []

    def metadata(self) -> dict[str, Any]:
        """What the UI shows: every scalar field not in :attr:`hidden` (overridden for richer views)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self.hidden and isinstance(getattr(self, f.name), str | int | float | bool)
        }


def reuse_unchanged(
    previous: M | None,
    same_inputs: Callable[[M], bool],
    files: Callable[[M], Iterable[str]],
    ctx: StageContext,
    message: str,
    start: float,
    **changes: Any,
) -> M | None:
    """The last run's manifest as this run's output when its inputs are this run's and its files still exist:
    nothing is read or written again. Shared by the stages whose output is a pure function of their inputs.

    Args:
        previous: The last run's manifest (``None``: none).
        same_inputs: Whether ``previous`` was made of this run's inputs (e.g. equal fingerprints).
        files: The files of ``previous`` that must still exist.
        ctx: Where the log line goes.
        message: The log line saying what was reused.
        start: ``time.monotonic()`` at the stage's start (the reported ``seconds``).
        **changes: Fields to set on the reused manifest (e.g. ``output_reused=True``).

    Returns:
        The reused manifest, or ``None`` when the stage has to run.
    """
    import time

    if previous is None or not same_inputs(previous) or not all(Path(f).exists() for f in files(previous)):
        return None
    ctx.log.info(message)
    return dataclasses.replace(previous, seconds=round(time.monotonic() - start, 2), **changes)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (cache keys, data versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(*paths: str | None) -> str:
    """Hash of the files' bytes: a data version that changes exactly when the content does."""
    digest = hashlib.sha256()
    for path in paths:
        if path:
            with open(path, "rb") as f:  # in blocks: a corpus-sized file is never in memory at once
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------- stored manifests
#: Folder of the artifact root holding each asset's latest manifest.
MANIFESTS_DIR = "manifests"
#: Folder of the artifact root holding every artifact file once, by content hash (:meth:`StageContext.publish`).
OBJECTS_DIR = "objects"
#: Folder of the artifact root holding the outputs of steps that are not assets (per run).
STEPS_DIR = "steps"


def manifest_file(root: Path, asset: str) -> Path:
    """Where the latest manifest of ``asset`` is stored under the artifact root."""
    return root / MANIFESTS_DIR / f"{asset}.json"


def write_manifest(manifest: Manifest, *paths: Path) -> None:
    """Store a manifest as JSON at each of ``paths``, its class recorded next to its fields (what
    :func:`read_manifest` reads)."""
    from embed_assets.storage import write_json

    cls = type(manifest)
    payload = {"manifest_type": f"{cls.__module__}.{cls.__qualname__}", "manifest": manifest.to_dict()}
    for path in paths:
        write_json(path, payload)


def read_manifest(path: Path) -> Manifest:
    """Load a stored manifest (its class is recorded next to its fields)."""
    payload = json.loads(path.read_text(encoding="utf-8"))
    module, _, name = payload["manifest_type"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls.from_dict(payload["manifest"])


def latest_manifest_at(root: Path, asset: str) -> Manifest | None:
    """The latest stored manifest of ``asset`` under the artifact root ``root`` (``None``: none readable)."""
    path = manifest_file(root, asset)
    try:
        return read_manifest(path) if path.is_file() else None
    except (OSError, ValueError, KeyError, AttributeError, ImportError):
        return None  # written by an older version of the code: treated as no previous run


def artifact_root(root: str = "") -> Path:
    """The artifact root: ``root``, else ``$EMBED_ASSETS_HOME``, else ``$DAGSTER_HOME/embed_assets``, else
    ``./.embed_assets`` (created)."""
    import os

    chosen = root or os.environ.get("EMBED_ASSETS_HOME", "")
    if not chosen:
        home = os.environ.get("DAGSTER_HOME")
        chosen = str(Path(home) / "embed_assets") if home else ".embed_assets"
    path = Path(chosen).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
