"""What the two SQLite files of the state have in common: a WAL connection, and one writer thread fed by a
bounded queue (``grants.sqlite3``: :class:`sidecar.state.sqlite.GrantStore`; ``audit.sqlite3``:
:class:`sidecar.state.audit.AuditStore`). The event loop only ever puts into the queue without waiting;
the thread writes in batches, one transaction each; ``flush`` and ``close`` are for tests and shutdown.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
from pathlib import Path

STOP = object()  # put last by close(): the writer ends after writing what came before it


def connect_wal(path: Path, timeout: float = 5.0, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection to ``path`` (made 0600) in WAL mode with synchronous=NORMAL: a power cut may lose the last
    commits, never corrupt the file."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=check_same_thread)
    os.chmod(path, 0o600)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class QueuedWriter:
    """A writer thread (``_run``, in the subclass) and its bounded queue. The queue carries the subclass's
    items, ``threading.Event`` markers (set once everything before them is written) and :data:`STOP`."""

    def __init__(self, name: str, queue_size: int) -> None:
        self._thread_name = name
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written (tests, shutdown). Not for the request path."""
        return self._mark(threading.Event(), timeout)

    def _mark(self, marker: threading.Event, timeout: float) -> bool:
        """Queue ``marker`` and wait until the writer sets it (False: no writer, a full queue, or too late)."""
        if self._thread is None or not self._thread.is_alive():
            return False
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer (bounded by ``timeout``)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(STOP, timeout=timeout)
        thread.join(timeout)
