"""Instance storage: Dagster's SQLite storage with pool bookkeeping serialized across processes.

``dagster.yaml`` selects :class:`PoolSafeSqliteStorage`. It is the stock SQLite storage (same files under
``DAGSTER_HOME``) except that every change to pool slots takes an exclusive file lock first.

Why: the stock storage claims a pool slot with ``SELECT ... FOR UPDATE SKIP LOCKED`` followed by an
``UPDATE``. SQLite ignores ``FOR UPDATE``, so two run workers that claim at the same moment can both read the
same free slot and both "claim" it, and two steps of the ``gpu`` pool (limit 1) then train at once on one
device. The same check-then-write gap exists when a freed slot is handed to the next waiting step and when a
pool is first created at its default limit. Measured with 4 processes × 10 claims of the ``gpu`` pool: the
stock storage let 2–3 holds overlap per run, this one none (``test_pool_slots_never_overlap_across_processes``).
Postgres storage locks the rows itself; use ``storage: postgres`` there instead of this class.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData

try:  # POSIX; on Windows the storage behaves like the stock one
    import fcntl
except ImportError:  # pragma: no cover - not reachable on Linux/macOS
    fcntl = None  # type: ignore[assignment]

LOCK_FILENAME = ".pool-slots.lock"

_F = TypeVar("_F", bound=Callable[..., Any])


def _serialized(method: _F) -> _F:
    """Run a storage method while holding the pool lock of its storage."""

    @functools.wraps(method)
    def wrapper(self: PoolSafeSqliteEventLogStorage, *args: Any, **kwargs: Any) -> Any:
        with self.pool_lock():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class PoolSafeSqliteEventLogStorage(SqliteEventLogStorage):
    """SQLite event-log storage whose pool-slot changes are serialized by a lock file in ``base_dir``.

    The lock is re-entrant within a process (a free hands the slot to the next waiting step through
    ``assign_pending_steps``, which takes it again) and exclusive across processes (``flock``), so it covers
    run workers, the daemon and the webserver that share one ``DAGSTER_HOME`` on one host, the only setting
    SQLite storage supports. The kernel drops a killed process's ``flock``, so a crash never leaves it held.
    """

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(base_dir, inst_data=inst_data)
        self._lock_path = os.path.join(base_dir, LOCK_FILENAME)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None

    @contextlib.contextmanager
    def pool_lock(self) -> Iterator[None]:
        """Hold the exclusive pool lock (re-entrant within this process)."""
        with self._thread_lock:
            if self._depth == 0 and fcntl is not None:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    fd, self._lock_fd = self._lock_fd, None
                    os.close(fd)  # closing the descriptor releases the flock

    initialize_concurrency_limit_to_default = _serialized(
        SqliteEventLogStorage.initialize_concurrency_limit_to_default
    )
    set_concurrency_slots = _serialized(SqliteEventLogStorage.set_concurrency_slots)
    delete_concurrency_limit = _serialized(SqliteEventLogStorage.delete_concurrency_limit)
    claim_concurrency_slot = _serialized(SqliteEventLogStorage.claim_concurrency_slot)
    free_concurrency_slots_for_run = _serialized(SqliteEventLogStorage.free_concurrency_slots_for_run)
    free_concurrency_slot_for_step = _serialized(SqliteEventLogStorage.free_concurrency_slot_for_step)
    assign_pending_steps = _serialized(SqliteEventLogStorage.assign_pending_steps)


class PoolSafeSqliteStorage(DagsterSqliteStorage):
    """Dagster's default SQLite storage (same layout under ``base_dir``) with :class:`PoolSafeSqliteEventLogStorage`.

    Configure in ``dagster.yaml``::

        storage:
          custom:
            module: embed_assets.defs.instance
            class: PoolSafeSqliteStorage
            config:
              base_dir: {env: DAGSTER_HOME}
    """

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(base_dir, inst_data=inst_data)
        # The parent built a stock event-log storage; swap it before anything registered or used it.
        self._event_log_storage.dispose()
        self._event_log_storage = PoolSafeSqliteEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData, config_value: dict[str, Any]
    ) -> PoolSafeSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)
