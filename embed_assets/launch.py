"""Launch a materialization through the webserver's GraphQL API and wait for it (dagster-graphql client).

Usage::

    python -m embed_assets.launch --host 127.0.0.1 --port 3000 --select corpus,corpus_chunks \\
        --config my_run.yaml --wait

Prints the run id, its final status and each materialized asset's metadata as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_MATERIALIZATIONS_QUERY = """
query RunMaterializations($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      status
      assetMaterializations {
        assetKey { path }
        metadataEntries {
          __typename
          label
          ... on TextMetadataEntry { text }
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on BoolMetadataEntry { boolValue }
          ... on MarkdownMetadataEntry { mdStr }
          ... on PathMetadataEntry { path }
          ... on UrlMetadataEntry { url }
          ... on JsonMetadataEntry { jsonString }
        }
      }
    }
  }
}
"""

_VALUE_FIELDS = ("text", "intValue", "floatValue", "boolValue", "mdStr", "path", "url", "jsonString")


def launch(
    host: str,
    port: int,
    job: str = "embed_pipeline",
    assets: list[str] | None = None,
    run_config: dict[str, Any] | None = None,
    location: str | None = None,
) -> str:
    """Submit a run of ``job`` (optionally only ``assets``) and return its run id."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient(host, port_number=port)
    return client.submit_job_execution(
        job,
        repository_location_name=location,
        run_config=run_config or {},
        asset_selection=assets or None,
        tags={"embed_assets/trigger": "graphql"},
    )


def wait(host: str, port: int, run_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    """Poll the run until it finishes; return its final status name (e.g. ``SUCCESS``)."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient(host, port_number=port)
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def materializations(host: str, port: int, run_id: str) -> dict[str, dict[str, Any]]:
    """Metadata of every asset the run materialized, read back through GraphQL: ``{asset: {label: value}}``."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient(host, port_number=port)
    data = client._execute(
        _MATERIALIZATIONS_QUERY, {"runId": run_id}
    )  # the client has no public query helper
    run = data["runOrError"]
    if run["__typename"] != "Run":
        raise LookupError(f"run {run_id}: {run['__typename']}")
    out: dict[str, dict[str, Any]] = {}
    for mat in run["assetMaterializations"]:
        key = "/".join(mat["assetKey"]["path"])
        out[key] = {
            e["label"]: next((e[f] for f in _VALUE_FIELDS if f in e), None) for e in mat["metadataEntries"]
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--job", default="embed_pipeline")
    parser.add_argument("--select", default="", help="comma-separated asset keys (default: the whole job)")
    parser.add_argument("--config", default="", help="run config as a YAML or JSON file")
    parser.add_argument("--wait", action="store_true", help="wait for the run and print its metadata")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    run_config = {}
    if args.config:
        import yaml

        run_config = yaml.safe_load(Path(args.config).read_text()) or {}
    assets = [a for a in args.select.split(",") if a] or None
    run_id = launch(args.host, args.port, args.job, assets, run_config)
    print(json.dumps({"run_id": run_id}))
    if not args.wait:
        return 0
    status = wait(args.host, args.port, run_id, args.timeout)
    print(
        json.dumps(
            {"run_id": run_id, "status": status, "assets": materializations(args.host, args.port, run_id)},
            indent=2,
        )
    )
    return 0 if status == "SUCCESS" else 1


if __name__ == "__main__":
    sys.exit(main())
