"""Fixtures of the reliability suite: child processes that are always cleaned up, the scripted LLM server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embed_assets_tests.openai_stub_server import OpenAIStub

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).with_name("workers.py")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: offline, the checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


class Children:
    """Starts worker processes in their own session and kills whatever is still running at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Run ``workers.py *args``; stdout is a pipe, stderr goes to a log file in ``log_dir``."""
        log = self.log_dir / f"worker-{len(self.procs)}-{args[0]}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(WORKERS), *args],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env or child_env(),
                cwd=str(REPO),
                start_new_session=True,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
        """Run a worker to completion; returns its last stdout line (fails with its log otherwise)."""
        proc = self.start(*args, env=env)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise
        assert proc.returncode == 0, f"worker {args[0]} exited {proc.returncode}:\n{self.log(proc)}"
        return out.strip().splitlines()[-1]

    @staticmethod
    def kill(proc: subprocess.Popen[str]) -> None:
        """SIGKILL the worker's process group (it leads its own session) and reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()

    @staticmethod
    def log(proc: subprocess.Popen[str]) -> str:
        path: Path = proc.log_path  # type: ignore[attr-defined]
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def cleanup(self) -> None:
        for proc in self.procs:
            self.kill(proc)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.cleanup()
        assert all(p.poll() is not None for p in kids.procs)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.005) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll_s)


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server
