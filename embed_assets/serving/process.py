"""Start, probe and stop the embedding server as a detached background process.

The server runs in its own session (``start_new_session=True``) so it outlives the process that started it
(e.g. a Dagster run) and can be stopped later by pid from anywhere. API keys travel only through the
environment: :func:`start_server` takes the *name* of a variable, never the key.

A PID alone does not name a process for long: once the server exits, the kernel may give its PID to any other
process. :func:`start_server` therefore records the server's start time (``create_time``, from ``psutil``) and
command line, and :func:`is_alive` / :func:`stop_server` with ``create_time`` check that the PID still belongs
to *that* process before they report it alive or signal it. :func:`stop_recorded_server` goes one step
further for a PID read back from somewhere (e.g. the ``nim_service`` asset's metadata): it only signals a
process whose command line runs ``embed_assets.serving``. From a shell (what ``make stop-service`` runs)::

    python -m embed_assets.serving.process stop --pid 12345 --create-time 1764627415.31

exits 0 when that server is stopped (or was not running any more), 3 when the PID now belongs to another
process (left alone), 1 when the server would not stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil

#: Seconds two readings of a process's start time may differ and still name the same process.
CREATE_TIME_TOLERANCE_S = 0.05
#: What the command line of a server started here contains.
SERVER_MODULE = "embed_assets.serving"


@dataclass
class ServerHandle:
    """A running server started by :func:`start_server`."""

    pid: int
    url: str
    port: int
    log_path: str
    onnx_dir: str | None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    create_time: float | None = None
    cmdline: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``).

        Args:
            timeout: Seconds to wait for a graceful exit.

        Returns:
            True when the process is gone.
        """
        stopped = stop_server(self.pid, timeout=timeout, create_time=self.create_time)
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.wait(timeout=1)  # reap our child so it does not linger as a zombie
        return stopped

    def is_alive(self) -> bool:
        """Whether the server process still runs."""
        if self._process is not None:
            return self._process.poll() is None
        return is_alive(self.pid, self.create_time)

    def as_metadata(self) -> dict[str, Any]:
        """JSON-able description (pid, create_time, url, port, log_path, onnx_dir): what
        :func:`stop_recorded_server` needs to stop this server later, from another process."""
        return {
            "pid": self.pid,
            "create_time": self.create_time,
            "url": self.url,
            "port": self.port,
            "log_path": self.log_path,
            "onnx_dir": self.onnx_dir,
        }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``.

    Args:
        host: Interface to bind.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _package_root() -> str:
    import embed_assets

    return str(Path(embed_assets.__file__).resolve().parent.parent)


def start_server(
    onnx_dir: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    variant: str = "fp32",
    api_key_env: str | None = None,
    log_path: str | None = None,
    ready_timeout: float = 60,
    backend: str = "onnx",
    model_dir: str | None = None,
    max_batch_size: int | None = None,
    extra_args: list[str] | None = None,
) -> ServerHandle:
    """Launch ``python -m embed_assets.serving`` in the background and wait until it is ready.

    Args:
        onnx_dir: Exported ONNX folder (``None`` with ``backend="torch"``).
        host: Interface to listen on.
        port: Port; 0 picks a free one.
        variant: ``"fp32"`` or ``"int8"``.
        api_key_env: Name of the environment variable holding the bearer token (must be set here; the child
            inherits it).
        log_path: Where the server's output goes (default: a new file in the temp folder).
        ready_timeout: Seconds to wait for ``/v1/health/ready``.
        backend: ``"onnx"`` or ``"torch"``.
        model_dir: sentence-transformers folder for ``backend="torch"``.
        max_batch_size: Most inputs per forward pass (default: the server's, per device).
        extra_args: More command-line arguments for the server.

    Returns:
        A :class:`ServerHandle`.

    Raises:
        ValueError: ``api_key_env`` names an unset variable.
        RuntimeError: The process exited before becoming ready (message ends with its log).
        TimeoutError: Not ready within ``ready_timeout`` (the process is stopped).
    """
    if api_key_env and not os.environ.get(api_key_env):
        raise ValueError(f"api_key_env={api_key_env!r}: that environment variable is unset or empty")
    port = port or free_port(host)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"embed-assets-serve-{port}-", suffix=".log")
        os.close(fd)
    cmd = [sys.executable, "-m", "embed_assets.serving", "--host", host, "--port", str(port)]
    cmd += ["--variant", variant, "--backend", backend]
    if max_batch_size:
        cmd += ["--max-batch-size", str(max_batch_size)]
    if onnx_dir:
        cmd += ["--onnx-dir", str(onnx_dir)]
    if model_dir:
        cmd += ["--model-dir", str(model_dir)]
    if api_key_env:
        cmd += ["--api-key-env", api_key_env]
    cmd += list(extra_args or [])
    env = dict(os.environ)
    # Make the package importable in the child even when it is not pip-installed (running from a checkout).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    handle = ServerHandle(proc.pid, f"http://{url_host}:{port}", port, log_path, onnx_dir, proc, cmdline=cmd)
    with contextlib.suppress(psutil.Error):
        handle.create_time = psutil.Process(proc.pid).create_time()
    try:
        ready = wait_ready(handle.url, ready_timeout, process=proc)
    except BaseException:
        handle.stop()
        raise
    if not ready:
        if proc.poll() is not None:
            raise RuntimeError(
                f"embedding server exited with code {proc.returncode} before it was ready; "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        handle.stop()
        raise TimeoutError(
            f"embedding server not ready after {ready_timeout}s; log {log_path}:\n{_tail(log_path)}"
        )
    return handle


def wait_ready(
    url: str, timeout: float = 60.0, *, process: subprocess.Popen[bytes] | None = None, pid: int | None = None
) -> bool:
    """Poll ``{url}/v1/health/ready`` until it answers 200.

    Args:
        url: Server base URL.
        timeout: Seconds to wait.
        process: Stop waiting early when this child process exits.
        pid: Stop waiting early when this pid is gone.

    Returns:
        True when ready, False on timeout or when the process died.
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                return False
            if pid is not None and not is_alive(pid):
                return False
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url.rstrip('/')}/v1/health/ready").status_code == 200:
                    return True
            time.sleep(0.2)
    return False


def is_alive(pid: int, create_time: float | None = None) -> bool:
    """Whether ``pid`` runs (zombies count as gone), and with ``create_time`` whether it is still that process.

    Args:
        pid: Process id.
        create_time: The process's start time as ``psutil`` reported it when it started; a process with the
            same PID but another start time (the PID was reused) counts as gone.

    Returns:
        True when the process exists, is not a zombie and (with ``create_time``) started at that time.
    """
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our exited child
        if done == pid:
            return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or _same_start(proc, create_time)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by someone else


def _same_start(proc: psutil.Process, create_time: float) -> bool:
    return abs(proc.create_time() - float(create_time)) <= CREATE_TIME_TOLERANCE_S


def stop_server(pid: int, timeout: float = 10.0, *, create_time: float | None = None) -> bool:
    """Stop a server started by :func:`start_server`: SIGTERM (graceful), SIGKILL after ``timeout``.

    The signal goes to the server's own process group (it leads a new session), so anything it spawned stops
    too; when ``pid`` is not a group leader only ``pid`` is signalled. With ``create_time`` nothing is
    signalled unless ``pid`` is still the process that started then (see :func:`is_alive`).

    Args:
        pid: The server's pid.
        timeout: Seconds to wait after SIGTERM.
        create_time: The server's start time, to guard against a reused PID.

    Returns:
        True when the process is gone (also when it was already gone, or the PID now names another process).
    """
    if not is_alive(pid, create_time):
        return True
    _signal(pid, signal.SIGTERM, create_time)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid, create_time):
            return True
        time.sleep(0.1)
    _signal(pid, signal.SIGKILL, create_time)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not is_alive(pid, create_time):
            return True
        time.sleep(0.1)
    return not is_alive(pid, create_time)


StopOutcome = Literal["stopped", "not_running", "not_ours", "still_running"]


def stop_recorded_server(pid: int, create_time: float | None = None, timeout: float = 10.0) -> bool:
    """Stop the server a PID was recorded for — only if that PID still runs *our* server.

    Args:
        pid: The recorded PID.
        create_time: The recorded start time (``ServerHandle.create_time``); without it only the command line
            is checked.
        timeout: Seconds to wait for a graceful exit.

    Returns:
        True when that server no longer runs (stopped now, or already gone); False when the PID belongs to
        another process (left alone) or the server would not stop.
    """
    return stop_recorded(pid, create_time, timeout) in ("stopped", "not_running")


def stop_recorded(pid: int, create_time: float | None = None, timeout: float = 10.0) -> StopOutcome:
    """:func:`stop_recorded_server` with the reason (for the command line and the logs).

    Args:
        pid: The recorded PID.
        create_time: The recorded start time, or ``None``.
        timeout: Seconds to wait for a graceful exit.

    Returns:
        ``"stopped"``, ``"not_running"``, ``"not_ours"`` (another process has that PID now) or
        ``"still_running"``.
    """
    if not is_alive(pid):
        return "not_running"
    if create_time is not None and not is_alive(pid, create_time):
        return "not_ours"
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return "not_running"
    except psutil.AccessDenied:
        return "not_ours"
    if SERVER_MODULE not in cmdline and "embed-assets-serve" not in cmdline:
        return "not_ours"
    return "stopped" if stop_server(pid, timeout, create_time=create_time) else "still_running"


def _signal(pid: int, sig: signal.Signals, create_time: float | None = None) -> None:
    if create_time is not None and not is_alive(pid, create_time):
        return  # the PID was reused between the check and now: never signal a stranger
    with contextlib.suppress(ProcessLookupError):
        try:
            is_leader = os.getpgid(pid) == pid
        except ProcessLookupError:
            return
        if is_leader:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _tail(path: str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    """``python -m embed_assets.serving.process stop --pid N [--create-time T]`` (see the module docstring).

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 stopped or not running, 3 the PID is another process (left alone), 1 would not stop.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m embed_assets.serving.process")
    sub = parser.add_subparsers(dest="command", required=True)
    stop = sub.add_parser(
        "stop", help="stop a recorded embedding server, only if the PID is still that server"
    )
    stop.add_argument("--pid", type=int, required=True)
    stop.add_argument("--create-time", type=float, default=None, help="recorded start time (psutil)")
    stop.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    outcome = stop_recorded(args.pid, args.create_time, args.timeout)
    messages = {
        "stopped": f"stopped the embedding server (pid {args.pid})",
        "not_running": f"no embedding server running as pid {args.pid}",
        "not_ours": f"pid {args.pid} is not the recorded embedding server (PID reused?); left it alone",
        "still_running": f"the embedding server (pid {args.pid}) did not stop",
    }
    print(messages[outcome])
    return {"stopped": 0, "not_running": 0, "not_ours": 3, "still_running": 1}[outcome]


if __name__ == "__main__":
    raise SystemExit(main())
