"""Start and stop a real Dagster deployment (``dagster-webserver`` + ``dagster-daemon``) for tests.

The deployment uses a temporary ``DAGSTER_HOME`` whose ``dagster.yaml`` is the project's own (queued runs, the
``gpu`` pool, run monitoring, retries) and the project's ``workspace.yaml``, so what the tests drive is what
``make dev`` gives a user. Every process is started in its own session (process group); the webserver's and
the daemon's code servers, run workers and step subprocesses inherit that group, so stopping the group stops
everything the test started, and :func:`processes_in_group` lets tests assert that nothing was left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCATION = "embed_assets"  # location_name in workspace.yaml

_WORKSPACE_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""

_DAEMON_QUERY = """
{
  instance {
    daemonHealth {
      daemonStatus(daemonType: "QUEUED_RUN_COORDINATOR") { healthy }
    }
  }
}
"""


class GraphQLError(RuntimeError):
    """The webserver answered a GraphQL request with an HTTP error or GraphQL errors."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dagster_home(path: Path) -> Path:
    """Create ``path`` as a DAGSTER_HOME holding a copy of the project's ``dagster.yaml``, storage initialized.

    The storage is created here, once: processes started together on a fresh home (webserver and daemon, or
    two runs) would otherwise race to create the same SQLite schema.
    """
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", path / "dagster.yaml")
    with instance_at(path):
        pass
    return path


@contextlib.contextmanager
def instance_at(home: Path) -> Iterator[Any]:
    """The Dagster instance of ``home``; the project's ``dagster.yaml`` reads its storage dir from DAGSTER_HOME."""
    import dagster as dg

    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = saved


def deployment_env(home: Path, artifacts: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the deployment's processes: this one's, plus the instance, artifacts and offline hub."""
    env = dict(os.environ)
    env.pop("NVIDIA_API_KEY", None)  # never reach a hosted LLM from tests
    env.update(
        {
            "DAGSTER_HOME": str(home),
            "EMBED_ASSETS_HOME": str(artifacts),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def processes_in_group(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose process group is ``pgid`` (Linux ``/proc``)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


@dataclass
class ManagedProcess:
    """One process started in its own session, with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session=True: the leader's pid is the group id

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> list[int]:
        """Stop the whole process group (SIGTERM, then SIGKILL); return the PIDs that needed SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.popen.poll()
            if not processes_in_group(self.pgid):
                break
            time.sleep(0.2)
        killed = processes_in_group(self.pgid)
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        return killed


def start_process(name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> ManagedProcess:
    """Start ``args`` in a new session with stdout+stderr to ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            args,
            cwd=REPO,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name, popen, log_path)


@dataclass
class DagsterDeployment:
    """A running webserver (and daemon) on 127.0.0.1."""

    home: Path
    artifacts: Path
    port: int
    processes: list[ManagedProcess] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} ({p.log_path}) -----\n{p.log_tail()}" for p in self.processes)

    def check_alive(self) -> None:
        """Raise with the logs if a process of the deployment exited."""
        for p in self.processes:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}\n{self.logs()}")

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout_s: float = 60) -> dict:
        """POST a GraphQL query to the webserver; return ``data`` (raise on GraphQL errors)."""
        resp = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout_s
        )
        if resp.status_code >= 400:
            raise GraphQLError(f"GraphQL HTTP {resp.status_code}: {resp.text[:3000]}")
        body = resp.json()
        if body.get("errors"):
            raise GraphQLError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def wait_ready(self, timeout_s: float, daemon: bool) -> None:
        """Wait until the webserver answers, the code location is loaded and (optionally) the daemon is healthy."""
        deadline = time.monotonic() + timeout_s
        stage = "webserver /server_info"
        last_error = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if stage == "webserver /server_info":
                    httpx.get(f"{self.url}/server_info", timeout=5).raise_for_status()
                    stage = "code location"
                if stage == "code location":
                    entries = self.graphql(_WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
                    entry = next((e for e in entries if e["name"] == LOCATION), None)
                    if entry is not None and entry["loadStatus"] == "LOADED":
                        loaded = entry["locationOrLoadError"]
                        if loaded["__typename"] == "PythonError":
                            raise RuntimeError(f"code location failed to load: {loaded['message']}")
                        stage = "daemon" if daemon else "ready"
                if stage == "daemon":
                    health = self.graphql(_DAEMON_QUERY)["instance"]["daemonHealth"]["daemonStatus"]
                    if health["healthy"]:
                        stage = "ready"
                if stage == "ready":
                    return
            except (httpx.HTTPError, GraphQLError, KeyError, TypeError) as e:
                last_error = repr(e)
            time.sleep(1.0)
        raise TimeoutError(
            f"deployment not ready after {timeout_s:.0f}s (waiting for {stage}; last error {last_error})\n"
            f"{self.logs()}"
        )

    def stop(self) -> dict[str, list[int]]:
        """Stop every process (daemon first, so it launches nothing new); return PIDs that needed SIGKILL."""
        return {p.name: p.stop() for p in reversed(self.processes)}


@contextlib.contextmanager
def dagster_deployment(
    root: Path,
    *,
    daemon: bool = True,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> Iterator[DagsterDeployment]:
    """Run ``dagster-webserver`` (and ``dagster-daemon run``) on the project's workspace until the block exits.

    Args:
        root: A scratch folder: ``dagster_home/``, ``artifacts/`` and ``logs/`` are created in it.
        daemon: Also run the daemon (needed to dequeue runs: the instance uses the QueuedRunCoordinator).
        env: Extra environment variables for the processes.
        timeout_s: How long to wait for the deployment to be ready.

    Yields:
        The running deployment; every process it started is stopped on exit, also on errors.
    """
    home = make_dagster_home(root / "dagster_home")
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    full_env = deployment_env(home, artifacts, env)
    workspace = str(REPO / "workspace.yaml")
    dep = DagsterDeployment(home=home, artifacts=artifacts, port=free_port())
    try:
        dep.processes.append(
            start_process(
                "webserver",
                [str(BIN / "dagster-webserver"), "-h", dep.host, "-p", str(dep.port), "-w", workspace],
                full_env,
                root / "logs",
            )
        )
        if daemon:
            dep.processes.append(
                start_process(
                    "daemon", [str(BIN / "dagster-daemon"), "run", "-w", workspace], full_env, root / "logs"
                )
            )
        dep.wait_ready(timeout_s, daemon)
        yield dep
    finally:
        dep.stop()
