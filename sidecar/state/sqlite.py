"""Where refresh token grants are kept: keyed hashes in SQLite, written off the request path.

Why: the grant tracker (:mod:`sidecar.state.grants`) must remember rotation chains across restarts, but a
token call must never wait for a disk. The tracker keeps its state in memory and hands each change
to this store; one writer thread applies the changes in batches. When the writer's bounded queue is
full a change is dropped and counted, never waited for: memory stays right, and a restart may
forget that change.

Nothing here is a token. Rows hold HMAC-SHA256 hashes (truncated to 128 bits) keyed with a per-install secret
(``grants.key`` in the confdir, mode 0600), so without that key the file cannot be used to find,
test or replay a token.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import queue
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.config import ConfigError, storage_error
from sidecar.logs import event
from sidecar.state.writer import STOP, QueuedWriter, connect_wal

log = logging.getLogger("egress_sidecar.grants")

KEY_FILE = "grants.key"
DB_FILE = "grants.sqlite3"
KEY_BYTES = 32
HASH_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 section 5): half the file and memory, no collisions
GRANT_ID_HEX = 12  # shown grant id: the first 12 hex digits of the chain's first token hash
SCHEMA_VERSION = "1"
_UNREADABLE = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB: a file to move aside, not a disk to fix
QUEUE_SIZE = 10_000  # pending changes; beyond this a change is dropped and counted
COMMIT_WINDOW_SECONDS = 0.05
BATCH = 500  # changes per transaction
_KEY_CHECK = b"egress-sidecar grants.key check"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grants (
    grant_key BLOB PRIMARY KEY,   -- hash of the first refresh token seen in the chain
    current BLOB NOT NULL,        -- hash of the chain's current refresh token
    first_seen REAL NOT NULL,
    last_used REAL NOT NULL,      -- last successful redemption (or issue)
    rotations INTEGER NOT NULL,
    reuses INTEGER NOT NULL,
    last_reuse REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS grants_by_last_used ON grants (last_used);
CREATE TABLE IF NOT EXISTS retired (
    token_hash BLOB PRIMARY KEY,  -- hash of a refresh token rotated away (kept for reuse detection)
    grant_key BLOB NOT NULL,
    retired_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retired_by_grant ON retired (grant_key, retired_at);
CREATE TABLE IF NOT EXISTS grant_identity (
    grant_key BLOB PRIMARY KEY,   -- a grant (grants.grant_key)
    identity BLOB NOT NULL        -- its org and user ids (from a token answer's `id`), sealed (sidecar.state.seal)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evidence_v2 (
    app BLOB NOT NULL,            -- keyed hash of the app's client_id
    label TEXT NOT NULL,          -- the client_id shortened for people (sidecar.egress.evidence.short_client_id)
    subject BLOB NOT NULL,        -- refusals: keyed hash of the org (of the grant while its org is not known);
                                  -- empty for the app's latest successes through the IP
    egress_ip TEXT NOT NULL,
    kind TEXT NOT NULL,           -- refused (that org, through this IP) / allowed (some org, through this IP)
    at REAL NOT NULL,             -- when Salesforce last said it
    retest REAL,                  -- refusals: from when one redemption may test the IP again
    who BLOB,                     -- the org ids involved, sealed (sidecar.state.seal)
    PRIMARY KEY (app, subject, egress_ip)
) WITHOUT ROWID;
"""
# Before the evidence was kept per org it was kept per app: its acceptances still hold (some org redeemed
# through the IP); its refusals named no org, so they are learnt again (with the retry behind the first).
_MIGRATE_EVIDENCE = """
INSERT OR IGNORE INTO evidence_v2 SELECT app, label, x'', egress_ip, 'allowed', at, NULL, NULL FROM evidence
    WHERE kind = 'allowed';
DROP TABLE evidence;
"""


# -- the key --------------------------------------------------------------------------------------
def load_or_create_key(confdir: Path) -> bytes:
    """The per-install HMAC key: ``confdir/grants.key`` (64 hex digits, mode 0600), created once."""
    path = confdir / KEY_FILE
    if not path.exists():
        tmp = confdir / f".{KEY_FILE}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(KEY_BYTES) + "\n")
            os.link(tmp, path)  # atomic, and never replaces a key another process just wrote
        except FileExistsError:
            pass
        except OSError as exc:  # a full disk: no key cut short is left behind
            raise storage_error(path, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        event(log, logging.WARNING, f"{KEY_FILE} was readable by others (mode {mode:o}); set it to 0600", file=str(path))
    text = path.read_text(errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"SIDECAR_CONFDIR: {str(path)!r} is not a key written by egress-sidecar ({KEY_BYTES * 2} hex digits). "
            f"Delete it and restart; the grants tracked in {DB_FILE} are then forgotten."
        )
    return key


def token_hash(key: bytes, token: str) -> bytes:
    """HMAC-SHA256 of a token under the install key (128 bits). The only form in which a token is kept."""
    return hmac.new(key, token.encode("utf-8"), hashlib.sha256).digest()[:HASH_BYTES]


def key_fingerprint(key: bytes) -> str:
    """Identifies the key in the database (so a changed key is noticed) without revealing it."""
    return hmac.new(key, _KEY_CHECK, hashlib.sha256).hexdigest()[:16]


# -- rows -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class GrantRow:
    """One grant: a chain of refresh tokens linked by rotation, known by hashes only."""

    key: bytes  # hash of the first token seen in the chain; stable across rotations
    current: bytes  # hash of the chain's current token
    first_seen: float
    last_used: float
    rotations: int = 0
    reuses: int = 0
    last_reuse: float | None = None
    org: str | None = None  # the customer org and user a token answer named (memory; sealed in grant_identity)
    user: str | None = None

    @property
    def grant_id(self) -> str:
        return self.key.hex()[:GRANT_ID_HEX]

    def values(self) -> tuple[bytes, bytes, float, float, int, int, float | None]:
        return (self.key, self.current, self.first_seen, self.last_used, self.rotations, self.reuses, self.last_reuse)


@dataclass(frozen=True, slots=True)
class Retired:
    token: bytes  # hash of the rotated-away token
    grant: bytes  # key of its grant
    at: float


@dataclass(frozen=True, slots=True)
class Prune:
    """The eviction rule, applied to the file as it is applied in memory (a backstop for dropped writes)."""

    max_grants: int  # beyond this, the least recently redeemed grants are forgotten
    grants_before: float  # grants last redeemed before this are forgotten
    retired_per_grant: int  # rotated-away hashes kept per grant (the most recent ones)
    retired_before: float  # rotated-away hashes older than this are forgotten
    full: bool = True  # also the count rules (memory sends those deletes itself; needed after dropped writes)
    evidence_max: int = 20_000  # evidence rows kept (sidecar.egress.evidence.MAX_FACTS of each kind), the newest


@dataclass(frozen=True, slots=True)
class EvidenceRow:
    """What Salesforce answered for one app through one egress IP (sidecar.egress.evidence): one org's
    latest refusal, or (``subject`` empty) the app's latest successes."""

    app: bytes
    label: str
    subject: bytes
    egress_ip: str
    kind: str
    at: float
    retest: float | None = None
    who: bytes | None = None  # sealed


@dataclass(slots=True)
class Change:
    """What one observation changed. Applied atomically, or dropped whole."""

    grants: list[tuple[bytes, bytes, float, float, int, int, float | None]] = field(default_factory=list)
    retired: list[Retired] = field(default_factory=list)
    drop_grants: list[bytes] = field(default_factory=list)
    drop_retired: list[bytes] = field(default_factory=list)
    prune: Prune | None = None
    evidence: list[EvidenceRow] = field(default_factory=list)
    drop_evidence: list[tuple[bytes, bytes, str]] = field(default_factory=list)  # (app, subject, egress IP)
    identities: list[tuple[bytes, bytes]] = field(default_factory=list)  # (grant key, sealed org and user)

    def __bool__(self) -> bool:
        return bool(self.grants or self.retired or self.drop_grants or self.drop_retired or self.prune
                    or self.evidence or self.drop_evidence or self.identities)




class GrantStore(QueuedWriter):
    """``grants.sqlite3`` (WAL). ``load()`` at start, then ``start()`` the writer and ``submit()`` changes."""

    def __init__(self, path: Path, *, queue_size: int = QUEUE_SIZE, on_drop: Callable[[int], None] | None = None,
                 busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.on_drop = on_drop
        self.dropped = 0
        super().__init__("grant-store-writer", queue_size)
        self._drop_lock = threading.Lock()
        self._last_drop_log = 0.0

    # -- start: blocking, before the proxy listens ---------------------------------------------
    def load(self, fingerprint: str, limits: Prune) -> tuple[list[GrantRow], list[Retired]]:
        """Create or open the file and read what is within ``limits``: grants least recently redeemed
        first, rotated-away hashes oldest first. A file that is not a database (or a corrupt one) is moved
        aside, not fatal; one that cannot be written (a full disk) is a StorageError naming it, and left
        where it is: a full disk is no reason to give up the grants it holds."""
        try:
            return self._load(fingerprint, limits)
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _UNREADABLE:
                raise storage_error(self.path, exc) from None
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            event(log, logging.WARNING, f"{DB_FILE} could not be read ({type(exc).__name__}); moved it to "
                  f"{aside.name} and started with no tracked grants", file=str(aside))
            try:
                return self._load(fingerprint, limits)
            except sqlite3.Error as again:
                raise storage_error(self.path, again) from None

    def _load(self, fingerprint: str, limits: Prune) -> tuple[list[GrantRow], list[Retired]]:
        with contextlib.closing(self._connect()) as db:
            db.executescript(_SCHEMA)
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'evidence'").fetchone():
                db.executescript("BEGIN;" + _MIGRATE_EVIDENCE + "COMMIT;")
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
            if meta.get("key") not in (None, fingerprint):
                n = db.execute("SELECT count(*) FROM grants").fetchone()[0]
                event(log, logging.WARNING, f"{KEY_FILE} is not the key {DB_FILE} was written with, so its {n} "
                      "grants cannot be matched to tokens any more; starting with no tracked grants")
                with db:
                    db.execute("DELETE FROM grants")
                    db.execute("DELETE FROM retired")
            with db:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('key', ?)", (fingerprint,))
            rows = db.execute(
                "SELECT * FROM grants WHERE last_used >= ? ORDER BY last_used DESC LIMIT ?",
                (limits.grants_before, limits.max_grants),
            ).fetchall()
            grants = [GrantRow(*r) for r in reversed(rows)]
            rows = db.execute(
                "SELECT token_hash, grant_key, retired_at FROM (SELECT *, row_number() OVER "
                "(PARTITION BY grant_key ORDER BY retired_at DESC) AS n FROM retired WHERE retired_at >= ?) "
                "WHERE n <= ? ORDER BY retired_at",
                (limits.retired_before, limits.retired_per_grant),
            ).fetchall()
            retired = [Retired(*r) for r in rows]
        return grants, retired

    def load_identities(self) -> dict[bytes, bytes]:
        """Each grant's sealed org and user (after :meth:`load` created the file)."""
        try:
            with contextlib.closing(self._connect()) as db:
                return dict(db.execute("SELECT grant_key, identity FROM grant_identity").fetchall())
        except sqlite3.Error as exc:
            event(log, logging.WARNING, f"{DB_FILE}: the grants' orgs could not be read ({type(exc).__name__}); "
                  "they are learnt again from the next answers")
            return {}

    def load_evidence(self, limit: int) -> list[EvidenceRow]:
        """The newest ``limit`` evidence rows, oldest first (after :meth:`load` created the file)."""
        try:
            with contextlib.closing(self._connect()) as db:
                db.executescript(_SCHEMA)
                rows = db.execute("SELECT * FROM evidence_v2 ORDER BY at DESC LIMIT ?", (limit,)).fetchall()
        except sqlite3.Error as exc:
            event(log, logging.WARNING, f"{DB_FILE}: the evidence could not be read ({type(exc).__name__}); "
                  "starting without it")
            return []
        return [EvidenceRow(*r) for r in reversed(rows)]

    def _connect(self) -> sqlite3.Connection:
        return connect_wal(self.path, self.busy_timeout)

    # -- the writer ---------------------------------------------------------------------------
    def submit(self, change: Change) -> bool:
        """Queue a change without ever blocking; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(change)
            return True
        except queue.Full:
            self._dropped(1, "its queue is full (the disk is slower than the token calls)")
            return False

    def _run(self) -> None:
        db = self._connect()
        try:
            stop = False
            while not stop:
                batch = [self._queue.get()]
                # Gather for a moment before committing: under steady traffic one transaction then
                # covers many token calls. Sleeping through the window (instead of waiting on the queue)
                # means the calls queued meanwhile do not wake this thread one by one, each wake-up
                # taking the GIL from the proxy's event loop.
                if isinstance(batch[0], Change):
                    time.sleep(COMMIT_WINDOW_SECONDS)
                while len(batch) < BATCH and batch[-1] is not STOP and not isinstance(batch[-1], threading.Event):
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                changes = [c for c in batch if isinstance(c, Change)]
                if changes:
                    self._apply(db, changes)
                for item in batch:
                    if isinstance(item, threading.Event):
                        item.set()
                    stop = stop or item is STOP
        finally:
            db.close()

    def _apply(self, db: sqlite3.Connection, changes: list[Change]) -> None:
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                for c in changes:
                    _write(db, c)
        except sqlite3.Error as exc:
            self._dropped(len(changes), f"SQLite failed ({type(exc).__name__}: {exc})")

    def _dropped(self, n: int, why: str) -> None:
        with self._drop_lock:
            self.dropped += n
            now = time.monotonic()
            loud = now - self._last_drop_log >= 60.0 or self._last_drop_log == 0.0
            if loud:
                self._last_drop_log = now
        if self.on_drop is not None:
            self.on_drop(n)
        if loud:  # at most one line a minute; the counter has every drop
            event(log, logging.WARNING, f"{DB_FILE}: {n} grant change(s) not written because {why}; tracking "
                  "in memory is unaffected, a restart may forget them", dropped_total=self.dropped)


def _write(db: sqlite3.Connection, c: Change) -> None:
    if c.drop_evidence:
        db.executemany("DELETE FROM evidence_v2 WHERE app = ? AND subject = ? AND egress_ip = ?", c.drop_evidence)
    if c.evidence:
        db.executemany("INSERT OR REPLACE INTO evidence_v2 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(e.app, e.label, e.subject, e.egress_ip, e.kind, e.at, e.retest, e.who) for e in c.evidence])
    if c.drop_grants:
        db.executemany("DELETE FROM grants WHERE grant_key = ?", [(k,) for k in c.drop_grants])
        db.executemany("DELETE FROM retired WHERE grant_key = ?", [(k,) for k in c.drop_grants])
        db.executemany("DELETE FROM grant_identity WHERE grant_key = ?", [(k,) for k in c.drop_grants])
    if c.identities:
        db.executemany("INSERT OR REPLACE INTO grant_identity VALUES (?, ?)", c.identities)
    if c.drop_retired:
        db.executemany("DELETE FROM retired WHERE token_hash = ?", [(k,) for k in c.drop_retired])
    if c.grants:
        db.executemany("INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?, ?, ?, ?)", c.grants)
    if c.retired:
        db.executemany("INSERT OR REPLACE INTO retired VALUES (?, ?, ?)", [(r.token, r.grant, r.at) for r in c.retired])
    if (p := c.prune) is None:
        return
    db.execute("DELETE FROM retired WHERE grant_key IN (SELECT grant_key FROM grants WHERE last_used < ?)",
               (p.grants_before,))
    db.execute("DELETE FROM grant_identity WHERE grant_key IN (SELECT grant_key FROM grants WHERE last_used < ?)",
               (p.grants_before,))
    db.execute("DELETE FROM grants WHERE last_used < ?", (p.grants_before,))
    db.execute("DELETE FROM retired WHERE retired_at < ?", (p.retired_before,))
    if p.full:
        db.execute(
            "DELETE FROM grants WHERE grant_key IN "
            "(SELECT grant_key FROM grants ORDER BY last_used DESC LIMIT -1 OFFSET ?)",
            (p.max_grants,),
        )
        db.execute("DELETE FROM retired WHERE grant_key NOT IN (SELECT grant_key FROM grants)")
        db.execute("DELETE FROM grant_identity WHERE grant_key NOT IN (SELECT grant_key FROM grants)")
        db.execute(
            "DELETE FROM retired WHERE token_hash IN (SELECT token_hash FROM (SELECT token_hash, row_number() "
            "OVER (PARTITION BY grant_key ORDER BY retired_at DESC) AS n FROM retired) WHERE n > ?)",
            (p.retired_per_grant,),
        )
        db.execute("DELETE FROM evidence_v2 WHERE (app, subject, egress_ip) NOT IN "
                   "(SELECT app, subject, egress_ip FROM evidence_v2 ORDER BY at DESC LIMIT ?)", (p.evidence_max,))


# -- reading, for the CLI (no key needed, nothing secret in the output) ---------------------------
def read_grants(path: Path) -> list[GrantRow]:
    """All grants in ``path``, read-only (the sidecar may be writing). Raises FileNotFoundError, or
    ValueError when the file is not a grants database."""
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)) as db:
            return [GrantRow(*r) for r in db.execute("SELECT * FROM grants ORDER BY last_used")]
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path} is not a grants database written by egress-sidecar ({exc})") from None


def read_identities(path: Path) -> tuple[str | None, dict[bytes, bytes]]:
    """The fingerprint of the key ``path`` was written with, and each grant's sealed org and user (read-only)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)) as db:
            meta = db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
            return (meta[0] if meta else None,
                    dict(db.execute("SELECT grant_key, identity FROM grant_identity").fetchall()))
    except sqlite3.DatabaseError:
        return None, {}


def reader_keys(confdir: Path, redis_key: str | None) -> list[bytes]:
    """The keys a reader of the state may hold: ``grants.key`` (read, never created here) and, with
    ``SIDECAR_REDIS_KEY``, the one derived from it (what the replicas hash and seal with)."""
    keys = []
    with contextlib.suppress(OSError, ValueError):
        key = bytes.fromhex((confdir / KEY_FILE).read_text().strip())
        if len(key) == KEY_BYTES:
            keys.append(key)
    if redis_key:
        from sidecar.config import decode_key
        from sidecar.state.redis import derive

        with contextlib.suppress(ValueError):
            keys.append(derive(decode_key(redis_key), b"token hashes"))
    return keys


def reader_key(fingerprint: str | None, keys: Iterable[bytes]) -> bytes | None:
    """Of the keys a reader has (grants.key, the one derived from SIDECAR_REDIS_KEY), the one a file was
    written with, or None."""
    return next((k for k in keys if fingerprint is not None and key_fingerprint(k) == fingerprint), None)


def count_rows(path: Path) -> tuple[int, int]:
    """(grants, rotated-away hashes) in the file; for tests and diagnostics."""
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        return (db.execute("SELECT count(*) FROM grants").fetchone()[0],
                db.execute("SELECT count(*) FROM retired").fetchone()[0])


def retired_rows(path: Path) -> Iterable[Retired]:
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        return [Retired(*r) for r in db.execute("SELECT * FROM retired ORDER BY retired_at")]
