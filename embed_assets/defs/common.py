"""What every asset shares: the group, the GPU tags and pool, the manifest IO manager, and the two steps around
a stage call (build its :class:`~embed_assets.stages.common.StageContext`; turn its manifest into an output,
Dagster metadata and asset-check results)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from embed_assets.defs.resources import ArtifactStore
from embed_assets.stages.common import (
    OBJECTS_DIR,
    STEPS_DIR,
    Gate,
    JsonValue,
    Manifest,
    Markdown,
    PathRef,
    StageError,
    Table,
    Url,
    latest_manifest_at,
    manifest_file,
    read_manifest,
    write_manifest,
)
from embed_assets.storage import dedupe_file

GROUP = "embed_pipeline"

#: GPU-heavy steps: the tag marks them for the CUDA executor config, the pool limits their concurrency, and on
#: Kubernetes the op tag turns them into step pods that request a GPU.
GPU_TAGS = {"embed_assets/accelerator": "cuda"}
GPU_OP_TAGS: dict[str, Any] = {
    "embed_assets/accelerator": "cuda",
    "dagster-k8s/config": {
        "container_config": {
            "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
        },
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    },
}
GPU_POOL = "gpu"
#: Keyword arguments that make an asset a GPU step (tag, k8s pod config, pool).
GPU_STEP: dict[str, Any] = {"tags": GPU_TAGS, "op_tags": GPU_OP_TAGS, "pool": GPU_POOL}
#: A chunking shard's pod on Kubernetes: one core (the tokenizer runs single-threaded per document batch) and
#: memory for one shard's documents and passages, not the corpus's.
SHARD_OP_TAGS: dict[str, Any] = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
        }
    }
}


# --------------------------------------------------------------------------------------- manifest storage
class ManifestIOManager(dg.ConfigurableIOManager):
    """Stores each asset's manifest as readable JSON: ``<root>/manifests/<asset>.json`` (the latest, which
    downstream steps read) and a copy in the run's folder of the asset (``<asset>/<run_id>/manifest.json``).

    The outputs of a graph-backed asset's inner ops (e.g. one manifest per chunking shard) are JSON files under
    ``<root>/steps/<run_id>/``, so steps in other processes or pods read them from the shared artifact root;
    one with the bytes of an earlier run's is a hard link to it (``<root>/objects``).
    """

    store: ArtifactStore

    def handle_output(self, context: dg.OutputContext, obj: Manifest | None) -> None:
        if obj is None:  # an asset that yielded no output (e.g. a skipped TensorRT build)
            return
        if not context.has_asset_key:
            path = self._step_file(context)
            write_manifest(obj, path)
            # content-addressed: an unchanged corpus's shard plan (~100 bytes a document) costs no disk again
            dedupe_file(path, self.store.root_path() / OBJECTS_DIR)
            return
        asset = context.asset_key.to_python_identifier()
        copy = self.store.run_dir(asset, context.run_id) / "manifest.json"
        write_manifest(obj, copy, manifest_file(self.store.root_path(), asset))
        context.add_output_metadata({"manifest": dg.MetadataValue.path(str(copy))})

    def load_input(self, context: dg.InputContext) -> Manifest:
        upstream = context.upstream_output
        if upstream is not None and not upstream.has_asset_key:
            return read_manifest(self._step_file(upstream))
        path = manifest_file(self.store.root_path(), context.asset_key.to_python_identifier())
        if not path.is_file():
            raise dg.Failure(
                f"no stored manifest for {context.asset_key.to_user_string()} at {path}: materialize it first"
            )
        return read_manifest(path)

    def _step_file(self, context: dg.OutputContext) -> Path:
        """``<root>/steps/<run_id>/<step key>.<output>.json`` (a mapped step's key names its shard)."""
        name = f"{context.step_key}.{context.name}" + (
            f"[{context.mapping_key}]" if context.mapping_key else ""
        )
        return self.store.root_path() / STEPS_DIR / context.run_id / f"{name}.json"


def latest_manifest(store: ArtifactStore, asset: str) -> Manifest | None:
    """The manifest of the latest materialization of ``asset`` (before this run writes a new one)."""
    return latest_manifest_at(store.root_path(), asset)


# ------------------------------------------------------------------------------------------ around a stage
def to_metadata(values: dict[str, Any]) -> dict[str, dg.MetadataValue | Any]:
    """Turn a manifest's :meth:`~embed_assets.stages.common.Manifest.metadata` into Dagster metadata values."""

    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue  # not every metadata sink accepts null
        if isinstance(value, Table):
            out[key] = table_value(value)
        elif isinstance(value, Markdown):
            out[key] = dg.MetadataValue.md(value.text)
        elif isinstance(value, PathRef):
            out[key] = dg.MetadataValue.path(value.path)
        elif isinstance(value, Url):
            out[key] = dg.MetadataValue.url(value.url)
        elif isinstance(value, JsonValue | dict | list):
            out[key] = dg.MetadataValue.json(value.value if isinstance(value, JsonValue) else value)
        elif isinstance(value, float):
            out[key] = headline(value)
        else:
            out[key] = value
    return out


def headline(value: float) -> float:
    """A number as the UI shows it: 4 significant digits (0.845163 -> 0.8452, 1e-05 stays 1e-05)."""
    return float(f"{value:.4g}") if value == value else value  # NaN stays NaN


def _column_type(kinds: set[type]) -> str:
    if kinds == {bool}:
        return "bool"
    if kinds == {int}:
        return "int"
    if kinds and kinds <= {int, float}:
        return "float"
    return "string"


def table_value(table: Table) -> dg.MetadataValue:
    """A table the asset page shows inline (first ``max_rows`` rows; long text cut to ``max_chars``)."""

    def cell(v: Any) -> Any:
        if isinstance(v, bool | int) or v is None:
            return v
        if isinstance(v, float):
            return headline(v)
        text = str(v).replace("\n", " ")
        return text if len(text) <= table.max_chars else text[: table.max_chars - 1] + "…"

    rows = [{c: cell(r.get(c)) for c in table.columns} for r in table.rows[: table.max_rows]]
    kinds = {c: {type(r[c]) for r in rows if r[c] is not None} for c in table.columns}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _column_type(kinds[c])) for c in table.columns])
    return dg.MetadataValue.table([dg.TableRecord(r) for r in rows], schema=schema)


def check_result(gate: Gate, asset: str) -> dg.AssetCheckResult:
    """An asset-check result for one of the stage's gates."""
    return dg.AssetCheckResult(
        check_name=gate.name,
        asset_key=asset,
        passed=bool(gate.passed),
        severity=dg.AssetCheckSeverity.WARN if gate.severity == "warn" else dg.AssetCheckSeverity.ERROR,
        description=gate.message or None,
        metadata=to_metadata(gate.metadata),
    )


def emit(manifest: Manifest, asset: str, data_version: str | None = None) -> Iterator[Any]:
    """Yield the asset's output (metadata included) and one check result per gate the stage ran.

    A failed blocking gate then fails the step with the gate's own message (which gate, by how much, how to
    override), after the output and the check results are recorded: the asset is materialized (its numbers are
    facts), nothing downstream of it runs, and the run fails.
    """
    yield dg.Output(
        manifest,
        data_version=dg.DataVersion(data_version) if data_version else None,
        metadata=to_metadata(manifest.metadata()),
    )
    gates = manifest.gates()
    for gate in gates:
        yield check_result(gate, asset)
    stopped = [g for g in gates if g.blocking and not g.passed and g.severity == "error"]
    if stopped:
        raise dg.Failure(
            description="; ".join(f"blocking gate {g.name} failed: {g.message}" for g in stopped),
            metadata={g.name: dg.MetadataValue.json(g.metadata) for g in stopped},
        )


@contextmanager
def stage_errors() -> Iterator[None]:
    """Turn a stage's :class:`~embed_assets.stages.common.StageError` into a Dagster failure (its message and
    what it saw, as metadata) instead of a stack trace."""
    try:
        yield
    except StageError as e:
        raise dg.Failure(description=str(e), metadata=to_metadata(e.metadata)) from e
