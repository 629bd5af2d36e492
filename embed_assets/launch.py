"""Launch a materialization through the webserver's GraphQL API and wait for it (dagster-graphql client).

Usage::

    python -m embed_assets.launch --host 127.0.0.1 --port 3000 --select corpus,corpus_chunks \\
        --config my_run.yaml --wait

Prints the run id, then (with --wait) its final status, why it failed if it did, and each materialized
asset's metadata as JSON.
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

_FAILURES_QUERY = """
query RunFailures($runId: ID!, $cursor: String) {
  logsForRun(runId: $runId, afterCursor: $cursor, limit: 1000) {
    __typename
    ... on EventConnection {
      cursor
      hasMore
      events {
        __typename
        ... on ExecutionStepFailureEvent {
          stepKey
          message
          error { message errorChain { error { message } } }
        }
        ... on RunFailureEvent { message }
      }
    }
  }
}
"""

_VALUE_FIELDS = ("text", "intValue", "floatValue", "boolValue", "mdStr", "path", "url", "jsonString")


#: Name Dagster gives the repository of a code location defined with ``Definitions``.
DEFINITIONS_REPOSITORY = "__repository__"


def launch(
    host: str,
    port: int,
    job: str = "embed_pipeline",
    assets: list[str] | None = None,
    run_config: dict[str, Any] | None = None,
    location: str | None = None,
) -> str:
    """Submit a run of ``job`` (optionally only ``assets``) and return its run id.

    Args:
        host: Webserver host.
        port: Webserver port.
        job: Job name.
        assets: Asset keys to materialize (``None``: the whole job); ``"a/b"`` is the key ``["a", "b"]``.
        run_config: Run config (``ops``, ``resources``, ...).
        location: Code location name; needed only when several locations have a job named ``job``.

    Returns:
        The run id (the run is queued; see :func:`wait`).
    """
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient(host, port_number=port)
    return client.submit_job_execution(
        job,
        # The client ignores a location given without its repository name.
        repository_location_name=location,
        repository_name=DEFINITIONS_REPOSITORY if location else None,
        run_config=run_config or {},
        asset_selection=[a.split("/") for a in assets] if assets else None,
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


def failures(host: str, port: int, run_id: str) -> list[str]:
    """Why a run failed: its step failures (with the error message) and run failure events."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient(host, port_number=port)
    out: list[str] = []
    cursor = None
    while True:
        logs = client._execute(_FAILURES_QUERY, {"runId": run_id, "cursor": cursor})["logsForRun"]
        if logs["__typename"] != "EventConnection":
            raise LookupError(f"run {run_id}: {logs['__typename']}")
        for event in logs["events"]:
            if event["__typename"] == "ExecutionStepFailureEvent":
                error = event.get("error") or {}
                chain = [error.get("message") or ""]
                chain += [
                    (link.get("error") or {}).get("message") or "" for link in error.get("errorChain") or []
                ]
                detail = " <- ".join(m.strip() for m in chain if m.strip())
                out.append(f"{event['stepKey']}: {detail or event['message']}")
            elif event["__typename"] == "RunFailureEvent":
                out.append(event["message"])
        if not logs["hasMore"]:
            return out
        cursor = logs["cursor"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--job", default="embed_pipeline")
    parser.add_argument("--location", default="", help="code location (when several have the job)")
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
    run_id = launch(args.host, args.port, args.job, assets, run_config, args.location or None)
    print(json.dumps({"run_id": run_id}), flush=True)
    if not args.wait:
        return 0
    status = wait(args.host, args.port, run_id, args.timeout)
    report: dict[str, Any] = {"run_id": run_id, "status": status}
    if status != "SUCCESS":
        report["failures"] = failures(args.host, args.port, run_id)
    report["assets"] = materializations(args.host, args.port, run_id)
    print(json.dumps(report, indent=2))
    return 0 if status == "SUCCESS" else 1


if __name__ == "__main__":
    sys.exit(main())
