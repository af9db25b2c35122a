"""Refresh token hygiene: rotation, reuse of a rotated-away token, and grants going idle.

Why: with Refresh Token Rotation, Salesforce returns a new refresh token on every redemption and
invalidates the old one at once. An app that does not persist the new token breaks its grant on the
next refresh (400 invalid_grant "expired access/refresh token"), and a refresh token unused for 30
days expires. The sidecar sees every token call, so it can tell both early. It follows each grant as
a chain of keyed hashes (never a token), exports what it sees, and never changes a call.

One finished token call goes in (:meth:`GrantTracker.on_call`, from the token route); the decision is
plain code (:meth:`GrantTracker.observe`); memory is the truth, and :mod:`sidecar.state.sqlite` writes
it to disk off the request path.

Eviction rule: at most ``max_grants`` grants (the least recently redeemed is evicted first); a grant
not redeemed for ``grant_retention`` (90 days: expired at Salesforce for 60) is forgotten; for reuse
detection each grant keeps the hashes of its ``retired_per_grant`` (2) most recently rotated-away
tokens, each for at most ``retired_ttl`` (30 days). So at most 50,000 grants and 100,000 old hashes.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sidecar.logs import SCRUBBER, cause, event
from sidecar.metrics import EXPIRY_STATES, Metrics
from sidecar.state.expiry import IdlePolicy
from sidecar.state.redis import SharedState
from sidecar.state.seal import Sealer
from sidecar.state.sqlite import (
    DB_FILE,
    Change,
    GrantRow,
    GrantStore,
    Prune,
    Retired,
    key_fingerprint,
    read_grants,
    read_identities,
    reader_key,
    token_hash,
)
from sidecar.token.call import Identity, TokenCall, single_field
from sidecar.token.messages import Answer, TokenRequest, grant_of
from sidecar.token.shield import Unavailable

log = logging.getLogger("egress_sidecar.grants")

DAY = 86_400.0
# egress_sidecar_grants_idle{window}: grants whose last redemption is older than the window.
WINDOWS: dict[str, float] = {"7d": 7 * DAY, "25d": 25 * DAY, "30d": 30 * DAY}
MAX_BODY = 1_048_576  # token bodies are a few hundred bytes; anything larger is not looked at
QUEUE_SHARED = 10_000  # observations waiting for Redis; beyond, on_call drops them (counted as a dropped write)


@dataclass(frozen=True)
class Limits:
    max_grants: int = 50_000
    grant_retention: float = 90 * DAY
    retired_per_grant: int = 2
    retired_ttl: float = 30 * DAY
    maintenance_interval: float = 60.0  # prune and refresh the idle gauges this often (and at start)


LIMITS = Limits()

Kind = Literal["ignored", "issued", "rotated", "not_rotated", "reuse", "not_redeemed"]
MAX_ORGS_WARNED = 20  # per maintenance round, one log line per org; the rest are counted in one more line


@dataclass(frozen=True, slots=True)
class OrgGrants:
    """One org's grants, judged by its refresh token expiry (SIDECAR_IDLE_POLICY): for /status."""

    grants: int
    expiring: int  # idle past the warning point
    expired: int  # idle past the expiry
    last_used: float  # the latest redemption (or issue) of any of its grants
    longest_idle: float  # of its grants that are expiring or expired (0 when none)


@dataclass(frozen=True)
class Seen:
    """What one token call meant for the grants (for tests; no token in it)."""

    kind: Kind
    grant_id: str | None = None
    new_grant: bool = False


class GrantTracker:
    """Follows refresh token chains, and the customer org and user each grant belongs to (learnt from the
    ``id`` of a successful answer: the guard routes each org's redemptions by it before they are sent).
    Thread-safe; ignores calls until :meth:`open`."""

    def __init__(self, metrics: Metrics, *, clock: Callable[[], float] = time.time, limits: Limits = LIMITS,
                 idle_policy: IdlePolicy | None = None) -> None:
        self.metrics = metrics
        self.clock = clock
        self.limits = limits
        self.idle_policy = idle_policy or IdlePolicy()
        # Per org (None: grants whose org no answer has named yet), refreshed by each maintenance round.
        self.org_summary: dict[str | None, OrgGrants] = {}
        self._warned: dict[bytes, str] = {}  # grant key -> the expiry state the log has said
        self.on_maintained: Callable[[], None] | None = None
        self.store: GrantStore | None = None
        self.shared: SharedState | None = None
        self._pending: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._key: bytes | None = None
        self._sealer: Sealer | None = None  # seals each grant's org and user (grant_identity, Redis)
        self._lock = threading.Lock()
        self._grants: OrderedDict[bytes, GrantRow] = OrderedDict()  # least recently redeemed first
        self._current: dict[bytes, bytes] = {}  # current token hash -> grant key
        self._retired: OrderedDict[bytes, Retired] = OrderedDict()  # rotated-away hash -> grant; oldest first
        self._retired_of: dict[bytes, list[bytes]] = {}  # grant key -> its rotated-away hashes, oldest first
        self._last_tick = 0.0
        self._drops_at_full_prune = -1  # the file gets the full rule at start and after dropped writes
        self._stop = threading.Event()
        self._maintainer: threading.Thread | None = None
        self.rounds = 0  # maintenance rounds that ran to the end

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self, key: bytes, store: GrantStore | None = None, *, background: bool = True) -> None:
        """Load the stored grants and start the writer and the periodic maintenance."""
        SCRUBBER.add(key.hex())
        self._stop.clear()
        self._sealer = Sealer(key, b"identities")
        if store is not None:
            store.on_drop = self._count_drop
            grants, retired = store.load(key_fingerprint(key), self._prune_rule(self.clock()))
            identities = store.load_identities()
            with self._lock:
                for g in grants:
                    self._grants[g.key] = g
                    self._current[g.current] = g.key
                    self._open_identity(g, identities.get(g.key))
                for r in retired:
                    if r.grant in self._grants:
                        self._retire(r, Change())
                self._last_tick = max([g.last_used for g in grants] + [r.at for r in retired] + [0.0])
            store.start()
            self.store = store
        self._key = key
        self.maintain()
        if background:
            self._maintainer = threading.Thread(target=self._maintain_loop, name="grant-maintenance", daemon=True)
            self._maintainer.start()
        event(log, logging.INFO, f"refresh token hygiene: tracking {len(self._grants)} grants"
              + (f" from {DB_FILE}" if store else " in memory only"), grants=len(self._grants))

    def close(self, timeout: float = 5.0) -> None:
        """Stop tracking and write what is queued (bounded). Thread-safe, idempotent."""
        self._key = None
        self._stop.set()
        if self._maintainer is not None:
            self._maintainer.join(timeout)
            self._maintainer = None
        if self.store is not None:
            self.store.close(timeout)
            self.store = None

    def _maintain_loop(self) -> None:
        while not self._stop.wait(self.limits.maintenance_interval):
            try:
                self.maintain()
            except Exception as exc:  # noqa: BLE001 - the proxy must outlive a bug here
                event(log, logging.ERROR, f"grant maintenance failed ({cause(exc)}); the next round is in "
                      f"{self.limits.maintenance_interval:g}s", error=type(exc).__name__)

    def _count_drop(self, n: int) -> None:
        self.metrics.grant_writes_dropped.inc(n)

    # -- the token route's observer (on the event loop: memory only, never the disk) -------------
    def on_call(self, call: TokenCall, req: TokenRequest | None, answer: Answer | None) -> None:
        """The token core's observer: a finished call, its request and the answer the app got (its ``id``
        names the grant's org and user)."""
        if self._key is None or call.outcome is None or call.shielded:
            return  # (an answer the rotation shield gave never reached Salesforce: nothing was redeemed)
        if call.grant_type != "refresh_token" and call.outcome != "success":
            return
        try:
            presented = None
            if call.grant_type == "refresh_token" and req is not None:
                fields = req.fields()
                presented = single_field(fields, "refresh_token")
            issued = identity = None
            if call.outcome == "success" and answer is not None:
                issued, identity = grant_of(answer)
            seen = (call.grant_type, call.outcome, presented, issued, call.status, call.error_code, identity)
            if self.shared is not None:
                try:
                    self._pending.put_nowait(seen)  # in order, after what the other replicas know is read
                except asyncio.QueueFull:
                    self._count_drop(1)
                return
            self.observe(*seen[:4], status=seen[4], sf_error=seen[5], identity=seen[6])
        except Exception as exc:  # noqa: BLE001 - an observer must never break a token call
            event(log, logging.ERROR, f"grant tracking failed ({cause(exc)}); the token call was not affected",
                  error=type(exc).__name__)

    # -- across replicas (SIDECAR_REDIS_URL) --------------------------------------------------------
    def share(self, shared: SharedState) -> None:
        """Track grants with the other replicas: before a token hash this replica does not know is
        judged, what Redis knows of it is read; every change is mirrored there."""
        self.shared = shared
        self._pending = asyncio.Queue(maxsize=QUEUE_SHARED)
        self._consumer = asyncio.get_running_loop().create_task(self._observe_shared(), name="grants-shared")

    async def stop_sharing(self) -> None:
        """Judge what is still queued (bounded), then stop reading from Redis."""
        if self._consumer is None:
            return
        for _ in range(200):  # bounded: at most ~2 s
            if self._pending.empty():
                break
            await asyncio.sleep(0.01)
        self._consumer.cancel()
        await asyncio.gather(self._consumer, return_exceptions=True)
        self._consumer = None

    async def _observe_shared(self) -> None:
        assert self.shared is not None and self._key is not None
        for _ in itertools.count():  # one observation at a time, in the order the calls finished
            grant_type, outcome, presented, issued, status, sf_error, identity = await self._pending.get()
            try:
                if presented:
                    await self._hydrate(token_hash(self._key, presented))
                self.observe(grant_type, outcome, presented, issued, status=status, sf_error=sf_error, identity=identity)
            except Exception as exc:  # noqa: BLE001 - tracking must outlive a bad observation
                event(log, logging.ERROR, f"grant tracking failed ({cause(exc)}); the token call was not affected",
                      error=type(exc).__name__)

    async def _hydrate(self, h: bytes) -> None:
        with self._lock:
            known = h in self._current or h in self._retired
        if known or self.shared is None or not self.shared.usable():
            return
        try:
            row, olds, sealed = await self.shared.grant_state(h)
        except Unavailable:
            return
        if row is not None:
            self._adopt(row, olds, sealed)

    def _adopt(self, row: GrantRow, olds: list[Retired], sealed: bytes | None = None) -> None:
        """Take in a grant another replica tracked (the newer view of it wins), with its org when known."""
        change = Change()
        with self._lock:
            mine = self._grants.get(row.key)
            if mine is not None and mine.org is not None:
                row.org, row.user = mine.org, mine.user
            elif sealed is not None and self._open_identity(row, sealed):
                change.identities.append((row.key, sealed))
                if mine is not None:
                    mine.org, mine.user = row.org, row.user
            if mine is None or mine.last_used < row.last_used:
                self._take(row, olds, mine, change)
        if self.store is not None and change:
            self.store.submit(change)  # (not back to Redis: it came from there)

    def _take(self, row: GrantRow, olds: list[Retired], mine: GrantRow | None, change: Change) -> None:
        """Replace this replica's view of a grant with ``row`` (called under the lock)."""
        if mine is None:
            while len(self._grants) >= self.limits.max_grants:
                change.drop_grants.append(self._forget_oldest_grant())
        else:
            self._current.pop(mine.current, None)
        self._grants[row.key] = replace(row)
        self._grants.move_to_end(row.key)
        self._current[row.current] = row.key
        for r in olds:
            if r.token not in self._retired and r.token != row.current:
                self._retire(r, change)
        change.grants.append(row.values())
        self.metrics.grants_tracked.set(len(self._grants))

    # -- the grant's org and user ---------------------------------------------------------------
    def token_key(self, token: str) -> bytes | None:
        """The keyed hash this tracker (and every replica sharing its key) knows a token by."""
        return token_hash(self._key, token) if self._key is not None else None

    def grant_of(self, h: bytes) -> tuple[bytes, Identity | None] | None:
        """The grant whose current (or a rotated-away) token hashes to ``h``, and its org and user when an
        answer named them; None for a token this replica has not seen."""
        with self._lock:
            gkey = self._current.get(h)
            if gkey is None:
                old = self._retired.get(h)
                gkey = old.grant if old is not None else None
            grant = self._grants.get(gkey) if gkey is not None else None
            if grant is None:
                return None
            return grant.key, Identity(grant.org, grant.user or "") if grant.org else None

    async def grant_shared(self, h: bytes) -> tuple[bytes, Identity | None] | None:
        """As :meth:`grant_of`, after asking the replicas (Redis) when this replica does not know the token
        or the org of its grant (another replica may have rotated it, or learnt the org). Bounded by
        Redis's deadline; on any failure, what this replica knows."""
        mine = self.grant_of(h)
        if (mine is not None and mine[1] is not None) or self.shared is None or not self.shared.usable():
            return mine
        if mine is None:
            await self._hydrate(h)
            return self.grant_of(h)
        try:
            sealed = await self.shared.identity(mine[0])
        except Unavailable:
            return mine
        if sealed is not None:
            with self._lock:
                grant = self._grants.get(mine[0])
                learnt = grant is not None and grant.org is None and self._open_identity(grant, sealed)
            if learnt and self.store is not None:
                self.store.submit(Change(identities=[(mine[0], sealed)]))
        return self.grant_of(h)

    def _learn_identity(self, grant: GrantRow, identity: Identity | None, change: Change) -> None:
        """A successful answer named the grant's org and user (called under the lock)."""
        if identity is None or self._sealer is None or (grant.org, grant.user) == (identity.org, identity.user):
            return
        grant.org, grant.user = identity.org, identity.user
        change.identities.append((grant.key, self._sealer.seal(f"{identity.org}/{identity.user}".encode(),
                                                               _identity_context(grant.key))))

    def _open_identity(self, grant: GrantRow, sealed: bytes | None) -> bool:
        """Set the grant's org and user from their sealed form; False when it does not open."""
        return self._sealer is not None and open_identity(self._sealer, grant, sealed)

    # -- the decision -------------------------------------------------------------------------
    def observe(
        self,
        grant_type: str,
        outcome: str,
        presented: str | None,
        issued: str | None,
        *,
        status: int | None = None,
        sf_error: str | None = None,
        identity: Identity | None = None,
    ) -> Seen:
        """Account for one finished token call: ``presented`` is the refresh token the app sent (for
        ``refresh_token`` calls), ``issued`` the refresh token in a successful response, if any, and
        ``identity`` the org and user that response named."""
        key = self._key
        if key is None:
            return Seen("ignored")
        if grant_type == "refresh_token":
            rotated = outcome == "success" and bool(issued) and issued != presented
            if outcome == "success":
                self.metrics.rotations.labels("true" if rotated else "false").inc()
            if not presented:
                return Seen("ignored")
            h = token_hash(key, presented)
            if outcome == "success":
                return self._redeemed(h, token_hash(key, issued) if rotated and issued else None, identity)
            return self._failed(h, outcome, status, sf_error)
        if outcome == "success" and issued:  # a new grant: web server flow, device flow, ...
            return self._issued(token_hash(key, issued), identity)
        return Seen("ignored")

    def _redeemed(self, h: bytes, new: bytes | None, identity: Identity | None = None) -> Seen:
        change = Change()
        with self._lock:
            now = self._tick()
            grant = self._grant_for_current(h, change)
            created = grant is None
            if grant is None:
                grant = self._add_grant(h, now, change)
            else:
                self._grants.move_to_end(grant.key)
            grant.last_used = now
            if new is not None:
                del self._current[grant.current]
                self._retire(Retired(grant.current, grant.key, now), change)
                grant.current = new
                self._current[new] = grant.key
                grant.rotations += 1
            self._learn_identity(grant, identity, change)
            change.grants.append(grant.values())
            self.metrics.grants_tracked.set(len(self._grants))
            gid = grant.grant_id
        self._submit(change)
        return Seen("rotated" if new else "not_rotated", gid, created)

    def _tick(self) -> float:
        """The clock, made strictly increasing (called under the lock): the order of grants and of
        rotated-away hashes in memory is then the order of their times in the file."""
        now = max(self.clock(), self._last_tick + 1e-6)
        self._last_tick = now
        return now

    def _grant_for_current(self, h: bytes, change: Change) -> GrantRow | None:
        gkey = self._current.get(h)
        if gkey is not None:
            return self._grants[gkey]
        # Salesforce accepted a token we saw rotated away (our view was behind, e.g. rotation
        # turned off): Salesforce decides, and the chain continues from this token.
        old = self._retired.get(h)
        if old is not None:
            self._unretire(old)
            change.drop_retired.append(h)
            grant = self._grants[old.grant]
        elif h in self._grants:  # the chain's first token, no longer among its kept hashes
            grant = self._grants[h]
        else:
            return None
        self._current.pop(grant.current, None)
        grant.current = h
        self._current[h] = grant.key
        return grant

    def _add_grant(self, h: bytes, now: float, change: Change) -> GrantRow:
        while len(self._grants) >= self.limits.max_grants:
            change.drop_grants.append(self._forget_oldest_grant())
        grant = GrantRow(key=h, current=h, first_seen=now, last_used=now)
        self._grants[h] = grant
        self._current[h] = h
        return grant

    def _forget_oldest_grant(self) -> bytes:
        """Drop the least recently redeemed grant with its rotated-away hashes; returns its key."""
        key, grant = self._grants.popitem(last=False)
        self._current.pop(grant.current, None)
        for token in self._retired_of.pop(key, ()):
            self._retired.pop(token, None)
        return key

    def _retire(self, r: Retired, change: Change) -> None:
        self._retired[r.token] = r
        self._retired.move_to_end(r.token)
        change.retired.append(r)
        mine = self._retired_of.setdefault(r.grant, [])
        mine.append(r.token)
        while len(mine) > self.limits.retired_per_grant:
            token = mine.pop(0)
            self._retired.pop(token, None)
            change.drop_retired.append(token)

    def _unretire(self, r: Retired) -> None:
        self._retired.pop(r.token, None)
        mine = self._retired_of.get(r.grant, [])
        if r.token in mine:
            mine.remove(r.token)
        if not mine:
            self._retired_of.pop(r.grant, None)

    def _issued(self, h: bytes, identity: Identity | None = None) -> Seen:
        change = Change()
        with self._lock:
            now = self._tick()
            gkey = self._current.get(h)
            grant = self._grants[gkey] if gkey is not None else self._add_grant(h, now, change)
            grant.last_used = now
            self._learn_identity(grant, identity, change)
            self._grants.move_to_end(grant.key)
            change.grants.append(grant.values())
            self.metrics.grants_tracked.set(len(self._grants))
            gid = grant.grant_id
        self._submit(change)
        return Seen("issued", gid, gkey is None)

    def _failed(self, h: bytes, outcome: str, status: int | None, sf_error: str | None) -> Seen:
        change = Change()
        with self._lock:
            now = self.clock()
            old = self._retired.get(h)
            if old is None:
                gkey = self._current.get(h)
                return Seen("not_redeemed", None if gkey is None else self._grants[gkey].grant_id)
            grant = self._grants.get(old.grant)
            if grant is not None:
                grant.reuses += 1
                grant.last_reuse = now
                change.grants.append(grant.values())
            ago = max(0.0, now - old.at)
            gid = old.grant.hex()[:12]
        self.metrics.reuse.inc()
        self._submit(change)
        event(log, logging.WARNING, reuse_message(gid, ago, outcome, status, sf_error),
              event="refresh_token_reuse", grant=gid, rotated_away_seconds=round(ago), outcome=outcome,
              status=status, sf_error=sf_error)
        return Seen("reuse", gid)

    def _submit(self, change: Change) -> None:
        if self.store is not None and change:
            self.store.submit(change)
        # To Redis only what it holds (a prune has nothing for it: its keys expire by themselves, and the
        # maintenance thread that prunes has no event loop to write with).
        if self.shared is not None and (change.grants or change.retired or change.drop_grants or change.drop_retired):
            self.shared.write(change, self._retired_rows)
            if change.identities:
                self.shared.write_identities(change.identities, self.limits.grant_retention)

    def _retired_rows(self, grant: bytes) -> list[Retired]:
        return [self._retired[t] for t in self._retired_of.get(grant, ()) if t in self._retired]

    # -- maintenance: eviction by age, the idle gauges ------------------------------------------
    def _prune_rule(self, now: float, full: bool = True) -> Prune:
        lim = self.limits
        return Prune(lim.max_grants, now - lim.grant_retention, lim.retired_per_grant, now - lim.retired_ttl, full)

    def maintain(self) -> None:
        """Forget what the eviction rule says is too old, then refresh the gauges. Runs in the maintenance
        thread (and once at start), never on the event loop: it touches memory and the store's queue only
        (Redis expires what it holds by itself, so nothing of a round goes there)."""
        change = Change()
        dropped = self.store.dropped if self.store is not None else 0
        full, self._drops_at_full_prune = dropped != self._drops_at_full_prune, dropped
        with self._lock:
            rule = self._prune_rule(self.clock(), full)
            while self._grants and next(iter(self._grants.values())).last_used < rule.grants_before:
                self._forget_oldest_grant()
            while self._retired and (r := next(iter(self._retired.values()))).at < rule.retired_before:
                self._unretire(r)
        try:
            if self.store is not None:
                change.prune = rule  # the same rule, applied to the file
                self.store.submit(change)
        finally:
            self.update_gauges()
        self.rounds += 1

    def update_gauges(self) -> None:
        for window, n in self.idle_counts().items():
            self.metrics.grants_idle.labels(window).set(n)
        self.metrics.grants_tracked.set(len(self._grants))
        self._judge_expiry()
        if self.on_maintained is not None:
            self.on_maintained()

    def _judge_expiry(self) -> None:
        """Each grant against its org's refresh token expiry: the gauges, the per-org summary, and one log line
        per org whose grants became expiring or expired since the last round."""
        now, policy = self.clock(), self.idle_policy
        counts = dict.fromkeys(EXPIRY_STATES, 0)
        summary: dict[str | None, list[float]] = {}  # org -> [grants, expiring, expired, last_used, longest idle]
        news: dict[tuple[str | None, str], list[float]] = {}  # (org, state) -> idle times of grants newly there
        warned: dict[bytes, str] = {}
        with self._lock:
            for g in self._grants.values():
                idle = max(0.0, now - g.last_used)
                state = policy.state(g.org, idle)
                row = summary.setdefault(g.org, [0, 0, 0, 0.0, 0.0])
                row[0] += 1
                row[3] = max(row[3], g.last_used)
                if state is None:
                    continue
                counts[state] += 1
                row[1 if state == "expiring" else 2] += 1
                row[4] = max(row[4], idle)
                warned[g.key] = state
                if self._warned.get(g.key) != state:
                    news.setdefault((g.org, state), []).append(idle)
            self._warned = warned
        for state, n in counts.items():
            self.metrics.grants_expiry.labels(state).set(n)
        self.org_summary = {org: OrgGrants(int(r[0]), int(r[1]), int(r[2]), r[3], r[4]) for org, r in summary.items()}
        for i, ((org, state), idles) in enumerate(sorted(news.items(), key=lambda kv: (kv[0][1], str(kv[0][0])))):
            if i == MAX_ORGS_WARNED:
                rest = sum(len(v) for v in list(news.values())[i:])
                event(log, logging.WARNING, f"... and {rest} more grants of {len(news) - i} more orgs became idle close "
                      "to or past their refresh token expiry: see the org table of /status or egress-sidecar grants",
                      event="grants_idle", grants=rest)
                break
            event(log, logging.WARNING, idle_message(org, state, idles, policy), event="grants_idle", org=org,
                  state=state, grants=len(idles), expiry=policy.describe(org), longest_idle_seconds=round(max(idles)))

    # -- reading ------------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[GrantRow], list[Retired]]:
        """Copies of the grants (least recently redeemed first) and rotated-away hashes."""
        with self._lock:
            return [replace(g) for g in self._grants.values()], list(self._retired.values())

    def idle_counts(self) -> dict[str, int]:
        """Grants per window whose last redemption is older than the window."""
        with self._lock:
            now = self.clock()
            last = [g.last_used for g in self._grants.values()]
        return idle_counts(last, now)


# -- words --------------------------------------------------------------------------------------
def _identity_context(grant_key: bytes) -> bytes:
    return b"grant identity " + grant_key


def open_identity(sealer: Sealer, grant: GrantRow, sealed: bytes | None) -> bool:
    """Set a grant's org and user from their sealed form; False when it does not open."""
    plain = sealer.open(sealed, _identity_context(grant.key))
    if plain is None:
        return False
    org, _, user = plain.decode("utf-8", "replace").partition("/")
    grant.org, grant.user = org, user or None
    return True


def reuse_message(grant_id: str, ago: float, outcome: str, status: int | None, sf_error: str | None) -> str:
    if outcome == "invalid_grant":
        answer = f"Salesforce answered {status} {sf_error} (expired access/refresh token)"
    else:
        answer = (f"this call ended as {outcome}; when it reaches Salesforce it fails with 400 invalid_grant "
                  "(expired access/refresh token)")
    return (
        f"refresh token reuse on grant {grant_id}: the app redeemed a refresh token that was rotated away "
        f"{human_age(ago)} ago; {answer}. With Refresh Token Rotation every redemption returns a new "
        "refresh_token and invalidates the old one, so the app did not persist the new token. Fix: save the "
        "refresh_token of every token response before anything else runs (before using the access token), "
        "and let only one worker refresh a grant at a time. Unless another worker saved the new token, this "
        "grant is lost and its user must authorize the app again."
    )


def idle_message(org: str | None, state: str, idles: list[float], policy: IdlePolicy) -> str:
    who, whose = (f"org {org}", "the org's") if org else ("grants whose org is not known yet", "the default")
    expiry = f"{whose} refresh token expiry ({policy.describe(org)}, SIDECAR_IDLE_POLICY; the longest idle for " \
        f"{human_age(max(idles))})"
    if state == "expired":
        return (f"{who}: {len(idles)} refresh token grant(s) went unused for longer than {expiry}: Salesforce has "
                "expired them, and their users must authorize the app again")
    return (f"{who}: {len(idles)} refresh token grant(s) idle close to {expiry}: redeem them once (a refresh restarts "
            "the window) or their users must authorize the app again")


def human_age(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def idle_counts(last_used: list[float], now: float) -> dict[str, int]:
    last_used = sorted(last_used)  # already (nearly) sorted: least recently redeemed first
    return {w: bisect.bisect_left(last_used, now - s) for w, s in WINDOWS.items()}


def grant_state(g: GrantRow, now: float, policy: IdlePolicy | None = None) -> str:
    """``expired`` or ``expiring`` by its org's refresh token expiry (SIDECAR_IDLE_POLICY), ``reused``,
    ``idle>7d`` or ``ok``."""
    idle = now - g.last_used
    judged = (policy or IdlePolicy()).state(g.org, idle)
    if judged == "expired":
        return "expired"
    if g.last_reuse is not None and g.last_reuse > g.last_used:
        return "reused"
    if judged == "expiring":
        return "expiring"
    if idle > WINDOWS["7d"]:
        return "idle>7d"
    return "ok"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def read_grants_named(path: Path, keys: list[bytes]) -> list[GrantRow]:
    """The grants in ``path`` with their orgs and users, opened with whichever of ``keys`` wrote them."""
    rows = read_grants(path)
    fingerprint, sealed = read_identities(path)
    key = reader_key(fingerprint, keys)
    if key is not None:
        sealer = Sealer(key, b"identities")
        for g in rows:
            open_identity(sealer, g, sealed.get(g.key))
    return rows


def grants_report(confdir: Path, now: float | None = None, policy: IdlePolicy | None = None,
                  keys: list[bytes] | None = None) -> dict[str, Any]:
    """What ``egress-sidecar grants`` shows: hashes' prefixes, times and counts, each grant's org and user
    (opened with whichever of ``keys`` the file was written with); no secret. Grouped by org, most idle
    first. Raises FileNotFoundError when the confdir has no grants file."""
    now = time.time() if now is None else now
    policy = policy or IdlePolicy()
    rows = read_grants_named(confdir / DB_FILE, keys or [])
    states = {g.key: grant_state(g, now, policy) for g in rows}
    expiry = {g.key: policy.state(g.org, now - g.last_used) for g in rows}  # (a reused grant may expire too)
    orgs: dict[str | None, list[GrantRow]] = {}
    for g in rows:  # (least recently redeemed first: each org's list too, and the orgs by their most idle grant)
        orgs.setdefault(g.org, []).append(g)
    return {
        "tracked": len(rows),
        "idle": idle_counts([g.last_used for g in rows], now),
        "expiry": {state: sum(1 for v in expiry.values() if v == state) for state in EXPIRY_STATES},
        "orgs": [
            {
                "org": org,
                "expiry": policy.describe(org),
                "grants": len(grants),
                **{state: sum(1 for g in grants if expiry[g.key] == state) for state in EXPIRY_STATES},
                "last_redeemed": _iso(max(g.last_used for g in grants)),
            }
            for org, grants in orgs.items()
        ],
        "grants": [
            {
                "grant_id": g.grant_id,
                "org": g.org,
                "user": g.user,
                "first_seen": _iso(g.first_seen),
                "last_redeemed": _iso(g.last_used),
                "idle_seconds": round(max(0.0, now - g.last_used)),
                "rotations": g.rotations,
                "reuses": g.reuses,
                "last_reuse": _iso(g.last_reuse),
                "state": states[g.key],
            }
            for grants in orgs.values() for g in grants
        ],
    }


def format_report(report: dict[str, Any]) -> str:
    idle, expiry = report["idle"], report.get("expiry") or {}
    n_orgs = len([o for o in report.get("orgs", []) if o["org"]])
    lines = [
        (f"{report['tracked']} grants tracked; idle over 7d: {idle['7d']}, over 25d: {idle['25d']}, "
         f"over 30d (expired): {idle['30d']}"),
        (f"{n_orgs} customer orgs; by each org's refresh token expiry (SIDECAR_IDLE_POLICY): "
         f"{expiry.get('expiring', 0)} expiring, {expiry.get('expired', 0)} expired"),
    ]
    if not report["grants"]:
        return lines[0]
    header = ("GRANT", "USER", "LAST REDEEMED", "AGE", "ROTATIONS", "REUSES", "STATE")
    rows = [(g["grant_id"], g.get("user") or "-", g["last_redeemed"], human_age(g["idle_seconds"]), str(g["rotations"]),
             str(g["reuses"]), g["state"]) for g in report["grants"]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    by_org: dict[str | None, list[tuple[str, ...]]] = {}
    for g, r in zip(report["grants"], rows, strict=True):
        by_org.setdefault(g.get("org"), []).append(r)
    for o in report.get("orgs") or [{"org": None, "expiry": "30d", "grants": len(rows)}]:
        who = f"org {o['org']}" if o["org"] else "org not known yet (no answer has named it)"
        flags = "".join(f", {o[s]} {s}" for s in EXPIRY_STATES if o.get(s))
        lines += ["", f"{who}: {o['grants']} grant{'s' if o['grants'] != 1 else ''}, expiry {o['expiry']}{flags}",
                  line(header)]
        lines += [line(r) for r in by_org.get(o["org"], [])]
    return "\n".join(lines)
