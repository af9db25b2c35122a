"""The audit trail: one record per token call in ``SIDECAR_CONFDIR/audit.sqlite3``, written off the request path.

Why: an ISV answering Salesforce's security review, or a customer's auditor, must show which IP redeemed
which grant for which org, and that none left from elsewhere. The audit addon (:mod:`addons.audit`) hands
each finished call's record to :meth:`AuditStore.submit`, which never waits: a bounded queue, written in
batches by one thread. A record that cannot be written (the queue is full, SQLite fails, the disk is
full) is counted in ``egress_sidecar_audit_writes_dropped_total`` and logged (at most once a minute, a
full disk once until it is writable again): never lost silently, never a delay for the app.

What a record holds: the time, the app, the org and user, the grant (the id ``egress-sidecar grants``
shows: a keyed hash of its first token, never a token), the grant type, the token host, the egress IP
and whether it was verified on the call's own connection, the member, the outcome, Salesforce's error
code, and whether it was retried, coalesced or replayed. No token, client secret or code ever reaches
it (the addon hands over none).

Names are kept as in ``grants.sqlite3``: a file that lists an ISV's customers should not name them to
whoever copies it. Each app (``client_id``), org id, user id and token host (a My Domain names its
customer) is a keyed hash in the call's row and, once, sealed in ``names`` (AES-GCM under a key derived
from the state's key, ``grants.key`` or the one derived from ``SIDECAR_REDIS_KEY``); the app's short label
is kept in clear, as in the evidence. ``egress-sidecar audit`` (:mod:`sidecar.ops.audit`) opens them with
that key.

Bounds: records older than ``SIDECAR_AUDIT_RETENTION`` and beyond the newest ``SIDECAR_AUDIT_MAX_ROWS``
are pruned every ``PRUNE_SECONDS`` and whenever a tenth of the bound was written since the last prune.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import storage_error
from sidecar.logs import cause, event
from sidecar.state.seal import Sealer
from sidecar.state.sqlite import key_fingerprint
from sidecar.state.writer import STOP, QueuedWriter, connect_wal

log = logging.getLogger("egress_sidecar.audit")

AUDIT_FILE = "audit.sqlite3"
SCHEMA_VERSION = "1"
QUEUE_SIZE = 20_000  # records waiting for the writer; beyond, a record is dropped and counted
COMMIT_WINDOW_SECONDS = 0.1  # the writer gathers records this long before a transaction
BATCH = 1_000  # records per transaction
PRUNE_SECONDS = 600.0  # retention and the size bound are applied this often (and at start)
PRUNE_CHUNK = 20_000  # rows deleted per statement (the writer stays responsive during a large prune)
PRUNE_STATEMENTS = 500  # at most this many chunks per prune (the rest waits for the next one)
NAME_REFRESH = 86_400.0  # a name's last_seen is rewritten at most this often
MAX_CACHED_NAMES = 100_000
DROP_LOG_SECONDS = 60.0
NAME_KINDS = ("app", "org", "user", "host")
_FULL = 13  # SQLITE_FULL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS names (
    key BLOB PRIMARY KEY,     -- keyed hash of an app's client_id, an org id, a user id or a token host
    kind TEXT NOT NULL,       -- app / org / user / host
    label TEXT,               -- apps: the client_id shortened for people (as in the log line)
    sealed BLOB NOT NULL,     -- the value, sealed (sidecar.state.seal), bound to its key
    last_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,   -- in the order the calls finished
    at REAL NOT NULL,         -- when the call began (Unix time)
    app BLOB,                 -- names.key of the client_id
    org BLOB,                 -- names.key of the org id (from the grant, or the answer's id)
    user BLOB,                -- names.key of the user id
    grant_id TEXT,            -- the grant (12 hex digits of a keyed hash, as `egress-sidecar grants` shows)
    grant_type TEXT NOT NULL,
    host BLOB,                -- names.key of the token host
    host_class TEXT NOT NULL,
    egress_ip TEXT NOT NULL,  -- the IP the call left from (`none`: not sent; `unknown`: direct mode)
    egress TEXT,              -- how it is known: verified (on the call's connection), probed, unverified
    member TEXT NOT NULL,
    route TEXT NOT NULL,
    guard TEXT,
    outcome TEXT NOT NULL,
    status INTEGER,
    sf_error TEXT,
    retried_from TEXT,        -- the egress IP Salesforce refused first ("ip restricted"), when retried
    shield TEXT,              -- coalesced / replayed: answered by the rotation shield, nothing sent
    duration_ms REAL
);
CREATE INDEX IF NOT EXISTS calls_by_time ON calls (at);
CREATE INDEX IF NOT EXISTS calls_by_org ON calls (org, at);
"""
COLUMNS = ("at", "app", "org", "user", "grant_id", "grant_type", "host", "host_class", "egress_ip", "egress",
           "member", "route", "guard", "outcome", "status", "sf_error", "retried_from", "shield", "duration_ms")
_INSERT = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


@dataclass(slots=True)
class Entry:
    """One finished token call, as the audit addon hands it over: plain identifiers, never a secret."""

    at: float
    client_id: str | None
    app_label: str | None
    org: str | None
    user: str | None
    grant: str | None
    grant_type: str
    host: str | None
    host_class: str
    egress_ip: str
    egress: str | None
    member: str
    route: str
    guard: str | None
    outcome: str
    status: int | None
    sf_error: str | None
    retried_from: str | None
    shield: str | None
    duration_ms: float | None


class Names:
    """Keyed hashes and sealed values of the names a trail holds (apps, orgs, users, hosts)."""

    def __init__(self, key: bytes) -> None:
        self._hash_key = hmac.digest(key, b"egress-sidecar audit names", "sha256")
        self._sealer = Sealer(key, b"audit names")

    def key(self, kind: str, value: str) -> bytes:
        return hmac.digest(self._hash_key, f"{kind}:{value}".encode(), hashlib.sha256)[:16]

    def seal(self, key: bytes, value: str) -> bytes:
        return self._sealer.seal(value.encode(), key)

    def open(self, key: bytes, sealed: bytes) -> str | None:
        plain = self._sealer.open(sealed, key)
        return plain.decode("utf-8", "replace") if plain is not None else None




class AuditStore(QueuedWriter):
    """``audit.sqlite3`` (WAL). :meth:`open` at start (a full disk is a StorageError naming the file), then
    :meth:`start` the writer and :meth:`submit` records."""

    def __init__(self, path: Path, key: bytes, *, retention: float, max_rows: int,
                 on_drop: Callable[[str, int], None] | None = None, clock: Callable[[], float] = time.time,
                 queue_size: int = QUEUE_SIZE, prune_seconds: float = PRUNE_SECONDS) -> None:
        self.path = path
        self.retention = retention
        self.max_rows = max_rows
        self.on_drop = on_drop
        self.clock = clock
        self.prune_seconds = prune_seconds
        self.names = Names(key)
        self.fingerprint = key_fingerprint(key)
        self.dropped = 0
        self.written = 0
        self.prunes = 0
        super().__init__("audit-writer", queue_size)
        self._keys: dict[tuple[str, str], bytes] = {}
        self._named: dict[bytes, float] = {}  # names written, and when their last_seen was
        self._since_prune = 0
        self._full_since: float | None = None  # the disk is full: said once, until a write succeeds
        self._drop_lock = threading.Lock()
        self._last_drop_log = 0.0
        self._held = 0  # drops since the last line about them

    # -- start: blocking, before the proxy listens ----------------------------------------------
    def open(self) -> None:
        """Create or open the file. A file written under another key keeps its records (their names can no
        longer be opened with this key: said once); a full disk raises StorageError naming the file."""
        try:
            with contextlib.closing(self._connect()) as db:
                db.executescript(_SCHEMA)
                meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
                if meta.get("key") not in (None, self.fingerprint):
                    event(log, logging.WARNING, f"{AUDIT_FILE} was written under another key (grants.key or "
                          "SIDECAR_REDIS_KEY changed): its records stay, but the apps, orgs and users they name can "
                          "only be read with the key they were written with", file=str(self.path))
                with db:
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('key', ?)", (self.fingerprint,))
        except sqlite3.Error as exc:
            raise storage_error(self.path, exc) from None

    def _connect(self) -> sqlite3.Connection:
        return connect_wal(self.path, check_same_thread=False)

    # -- the request path: never blocks --------------------------------------------------------
    def submit(self, entry: Entry) -> bool:
        """Queue a record; False (counted and logged) when the queue is full."""
        try:
            self._queue.put_nowait(entry)
            return True
        except queue.Full:
            self._dropped("queue_full", 1, "the writer's queue is full (the disk is slower than the token calls)")
            return False

    def lost(self, why: str) -> None:
        """A record that could not even be made (counted as write_failed, and said)."""
        self._dropped("write_failed", 1, why)

    # -- the writer ------------------------------------------------------------------------------
    def prune_now(self, timeout: float = 30.0) -> bool:
        """Apply retention and the size bound now, in the writer (tests, diagnostics)."""
        return self._mark(_Prune(), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer (bounded by ``timeout``)."""
        super().close(timeout)
        if self._held:
            self._log_drops(0, "")

    def _run(self) -> None:
        try:
            db = self._connect()
        except sqlite3.Error as exc:  # (open() succeeded a moment ago: the volume went away)
            event(log, logging.ERROR, f"{AUDIT_FILE}: the audit writer cannot open the file ({exc}); records are "
                  "dropped (counted in egress_sidecar_audit_writes_dropped_total)", file=str(self.path))
            db = None
        next_prune = time.monotonic()
        try:
            stop = False
            while not stop:
                if db is not None and time.monotonic() >= next_prune:
                    self._prune(db)
                    next_prune = time.monotonic() + self.prune_seconds
                try:
                    first = self._queue.get(timeout=max(0.01, next_prune - time.monotonic()))
                except queue.Empty:
                    continue
                if isinstance(first, Entry):
                    # Gather for a moment: under steady traffic one transaction covers many calls, and the
                    # calls queued meanwhile do not wake this thread one by one (each wake-up takes the GIL
                    # from the proxy's event loop).
                    time.sleep(COMMIT_WINDOW_SECONDS)
                batch = [first]
                while len(batch) < BATCH and isinstance(batch[-1], Entry):
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                entries = [e for e in batch if isinstance(e, Entry)]
                if entries:
                    if db is None:
                        self._dropped("write_failed", len(entries), "the file could not be opened")
                    else:
                        try:
                            self._write(db, entries)
                        except Exception as exc:  # noqa: BLE001 - the writer must outlive a bad record
                            self._dropped("write_failed", len(entries), f"the writer failed ({cause(exc)})")
                for item in batch:
                    if isinstance(item, _Prune) and db is not None:
                        self._prune(db)
                        next_prune = time.monotonic() + self.prune_seconds
                    if isinstance(item, threading.Event):
                        item.set()
                    stop = stop or item is STOP
                if db is not None and self._since_prune >= max(1000, self.max_rows // 10):
                    next_prune = time.monotonic()  # a burst: keep the bound close
        finally:
            if db is not None:
                db.close()

    def _write(self, db: sqlite3.Connection, entries: list[Entry]) -> None:
        now = self.clock()
        names: dict[bytes, tuple[str, str | None, bytes]] = {}  # key -> (kind, label, sealed value)
        rows = []
        for e in entries:
            try:
                rows.append((e.at, self._name(names, "app", e.client_id, e.app_label, now),
                             self._name(names, "org", e.org, None, now), self._name(names, "user", e.user, None, now),
                             e.grant, e.grant_type, self._name(names, "host", e.host, None, now), e.host_class,
                             e.egress_ip, e.egress, e.member, e.route, e.guard, e.outcome, e.status, e.sf_error,
                             e.retried_from, e.shield, e.duration_ms))
            except Exception as exc:  # noqa: BLE001 - one bad record (a bug upstream) costs only itself
                self._dropped("write_failed", 1, f"a record could not be read ({cause(exc)})")
        if not rows:
            return
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                if names:
                    db.executemany(
                        "INSERT INTO names VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                        "last_seen = excluded.last_seen",
                        [(k, kind, label, sealed, now) for k, (kind, label, sealed) in names.items()])
                db.executemany(_INSERT, rows)
        except sqlite3.Error as exc:
            for k in names:  # (not written: written again with the next record that names it)
                self._named.pop(k, None)
            full = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == _FULL or "full" in str(exc)
            if full:
                self._disk_full(len(entries))
            else:
                self._dropped("write_failed", len(entries), f"SQLite failed ({type(exc).__name__}: {exc})")
            return
        self.written += len(rows)
        self._since_prune += len(rows)
        if self._full_since is not None:
            event(log, logging.WARNING, f"{AUDIT_FILE}: writes succeed again after the disk was full since "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self._full_since))}; the records dropped "
                  "meanwhile are counted in egress_sidecar_audit_writes_dropped_total{reason=\"disk_full\"}",
                  file=str(self.path), dropped_total=self.dropped)
            self._full_since = None

    def _name(self, names: dict[bytes, tuple[str, str | None, bytes]], kind: str, value: str | None,
              label: str | None, now: float) -> bytes | None:
        """The keyed hash of a name; a name not written lately joins ``names`` (to be written with the batch)."""
        if not value:
            return None
        k = self._keys.get((kind, value))
        if k is None:
            k = self.names.key(kind, value)
            if len(self._keys) >= MAX_CACHED_NAMES:
                self._keys.clear()
            self._keys[(kind, value)] = k
        seen = self._named.get(k)
        if seen is None or now - seen >= NAME_REFRESH:
            names[k] = (kind, label, self.names.seal(k, value))
            if len(self._named) >= MAX_CACHED_NAMES:
                self._named.clear()
            self._named[k] = now
        return k

    def _prune(self, db: sqlite3.Connection) -> int:
        """Retention, then the size bound, in chunks (bounded); returns the rows deleted."""
        cutoff = self.clock() - self.retention
        deleted = 0
        try:
            for _ in range(PRUNE_STATEMENTS):
                n = db.execute("DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE at < ? ORDER BY at LIMIT ?)",
                               (cutoff, PRUNE_CHUNK)).rowcount
                deleted += n
                if n < PRUNE_CHUNK:
                    break
            row = db.execute("SELECT id FROM calls ORDER BY id DESC LIMIT 1 OFFSET ?", (self.max_rows,)).fetchone()
            if row is not None:  # everything up to this id is beyond the newest max_rows
                for _ in range(PRUNE_STATEMENTS):
                    n = db.execute("DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE id <= ? ORDER BY id "
                                   "LIMIT ?)", (row[0], PRUNE_CHUNK)).rowcount
                    deleted += n
                    if n < PRUNE_CHUNK:
                        break
            # A name is kept while a record within retention may name it (last_seen is rewritten daily).
            db.execute("DELETE FROM names WHERE last_seen < ?", (cutoff - 2 * NAME_REFRESH,))
        except sqlite3.Error as exc:
            event(log, logging.WARNING, f"{AUDIT_FILE}: pruning failed ({type(exc).__name__}: {exc}); retried in "
                  f"{self.prune_seconds:g}s", file=str(self.path))
        self._since_prune = 0
        self.prunes += 1
        if deleted:
            event(log, logging.INFO, f"{AUDIT_FILE}: pruned {deleted} audit records (older than "
                  f"SIDECAR_AUDIT_RETENTION, or beyond SIDECAR_AUDIT_MAX_ROWS={self.max_rows})", pruned=deleted)
        return deleted

    # -- drops: counted, and said ----------------------------------------------------------------
    def _disk_full(self, n: int) -> None:
        first = self._full_since is None
        if first:
            self._full_since = self.clock()
        self._count(n, "disk_full")
        if first:
            event(log, logging.ERROR, f"{AUDIT_FILE}: the disk is full; audit records are dropped (counted in "
                  "egress_sidecar_audit_writes_dropped_total{reason=\"disk_full\"}) until it has space again. Free "
                  f"space on the volume of {self.path.parent}; token calls are not affected", file=str(self.path))

    def _dropped(self, reason: str, n: int, why: str) -> None:
        self._count(n, reason)
        with self._drop_lock:
            self._held += n
            now = time.monotonic()
            loud = self._last_drop_log == 0.0 or now - self._last_drop_log >= DROP_LOG_SECONDS
            if loud:
                self._last_drop_log = now
        if loud:
            self._log_drops(n, why)

    def _count(self, n: int, reason: str) -> None:
        with self._drop_lock:
            self.dropped += n
        if self.on_drop is not None:
            self.on_drop(reason, n)

    def _log_drops(self, n: int, why: str) -> None:
        with self._drop_lock:
            held, self._held = self._held, 0
        if not held:
            return
        because = f" because {why}" if why else ""
        event(log, logging.WARNING, f"{AUDIT_FILE}: {held} audit record(s) not written{because}; token calls are not "
              "affected, the log line of each call still carries its record. At most one such line a minute",
              dropped=held, dropped_total=self.dropped)


class _Prune(threading.Event):
    """A request to prune now, answered when done."""


# -- reading (the CLI; read-only, while the sidecar writes or not) --------------------------------
def connect_readonly(path: Path) -> sqlite3.Connection:
    """The trail, read-only. Raises FileNotFoundError, or ValueError when it is not an audit trail."""
    if not path.is_file():
        raise FileNotFoundError(path)
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        db.execute("SELECT count(*) FROM calls WHERE 0").fetchone()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise ValueError(f"{path} is not an audit trail written by egress-sidecar ({exc})") from None
    return db


def fingerprint_of(db: sqlite3.Connection) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
    return row[0] if row else None


def count_calls(path: Path) -> int:
    with contextlib.closing(connect_readonly(path)) as db:
        return int(db.execute("SELECT count(*) FROM calls").fetchone()[0])


def names_of(db: sqlite3.Connection, names: Names | None, keys: Iterable[bytes]) -> dict[bytes, str | None]:
    """The plain values of ``keys`` (None: sealed under another key, or no key)."""
    out: dict[bytes, str | None] = {}
    for k in keys:
        row = db.execute("SELECT sealed FROM names WHERE key = ?", (k,)).fetchone()
        out[k] = names.open(k, row[0]) if row is not None and names is not None else None
    return out
