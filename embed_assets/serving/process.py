"""Start, probe and stop the embedding server as a detached background process.

The server runs in its own session (``start_new_session=True``) so it outlives the process that started it
(e.g. a Dagster run) and can be stopped later by pid from anywhere. API keys travel only through the
environment: :func:`start_server` takes the *name* of a variable, never the key.
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
from typing import Any

import httpx


@dataclass
class ServerHandle:
    """A running server started by :func:`start_server`."""

    pid: int
    url: str
    port: int
    log_path: str
    onnx_dir: str | None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``).

        Args:
            timeout: Seconds to wait for a graceful exit.

        Returns:
            True when the process is gone.
        """
        stopped = stop_server(self.pid, timeout=timeout)
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.wait(timeout=1)  # reap our child so it does not linger as a zombie
        return stopped

    def is_alive(self) -> bool:
        """Whether the server process still runs."""
        if self._process is not None:
            return self._process.poll() is None
        return is_alive(self.pid)

    def as_metadata(self) -> dict[str, Any]:
        """JSON-able description (pid, url, port, log_path, onnx_dir)."""
        return {
            "pid": self.pid,
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
    max_batch_size: int = 64,
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
        max_batch_size: Most inputs per forward pass.
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
    cmd += ["--variant", variant, "--backend", backend, "--max-batch-size", str(max_batch_size)]
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
    handle = ServerHandle(proc.pid, f"http://{url_host}:{port}", port, log_path, onnx_dir, proc)
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


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (zombies count as gone).

    Args:
        pid: Process id.

    Returns:
        True when the process exists and is not a zombie.
    """
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our exited child
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def stop_server(pid: int, timeout: float = 10.0) -> bool:
    """Stop a server started by :func:`start_server`: SIGTERM (graceful), SIGKILL after ``timeout``.

    The signal goes to the server's own process group (it leads a new session), so anything it spawned stops
    too; when ``pid`` is not a group leader only ``pid`` is signalled.

    Args:
        pid: The server's pid.
        timeout: Seconds to wait after SIGTERM.

    Returns:
        True when the process is gone (also when it was already gone).
    """
    if not is_alive(pid):
        return True
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.1)
    _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.1)
    return not is_alive(pid)


def _signal(pid: int, sig: signal.Signals) -> None:
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
