"""State the replicas of one app share on Redis (``SIDECAR_REDIS_URL``): the rotation shield's locks and
answers, and refresh token tracking's grants.

Answers hold tokens, so they are encrypted with AES-GCM under a key derived from ``SIDECAR_REDIS_KEY``
(the Redis key name is bound in as associated data) and expire with the replay window; everything
else is keyed hashes. The same secret derives the key the replicas hash tokens with, so they agree on
them.

**Health, on its own schedule.** A background check runs every HEALTH_SECONDS whether or not token
calls run: ``egress_sidecar_redis_up``, ``/status`` and the log follow Redis within a second or two of
it going away or coming back. Every call, the check's included, has a short deadline, and a call that
fails on a pooled connection (Redis restarted behind it) is retried once on a fresh connection before
Redis counts as down. While Redis is down nothing waits on it: calls fail at once until the check sees
it again.

**One round trip before a redemption, one after its answer.** The rotation shield's look for an answer and
its lock are one script (``_CLAIM``); the publication of the answer and the release of the lock are another
(``_FINISH``), run after the client has its answer (:meth:`SharedState.publish_soon`).

**While Redis is down, never worse than without the sidecar.** Without Redis a replica cannot know
whether another replica is redeeming the same refresh token right now. A redemption that cannot be
coordinated waits for Redis (at most REDIS_WAIT seconds, which rides out a restart or a quick failover:
every caller of one refresh token then gets the same answer); when Redis stays away, redemptions go from
each replica alone, coalesced within it, as they would without the sidecar, and the log,
``egress_sidecar_shield_uncoordinated_total`` and the ``RedisUnreachable`` alert say so.
Refusing them instead would fail every refresh for the length of the outage to prevent a race the app
has without the sidecar too (two of its workers redeeming one token at the same moment). A replica
already waiting on another's redemption never sends while Redis is down: it keeps waiting for that
answer, for as long as the redemption can take.

**A Redis that lost its state** (restarted without persistence, flushed) loses the locks of redemptions
in flight and the answers kept for replay. Every replica notices it at its next check (the
``born`` key it remembers is gone or different) and puts back what it holds: the locks of its redemptions
still in flight, the answers it could not publish while Redis was down, and the replayable answers it
published within the window. No lock is granted until the state is RESTART_GRACE seconds old, so those
come first. Not covered: a replica that cannot reach Redis for all of RESTART_GRACE after the restart
while its redemption is in flight, and a failover to a Redis replica that had not yet received a lock
(asynchronous replication); in both cases another replica may redeem the token too.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.logs import cause, event
from sidecar.metrics import Metrics
from sidecar.state.sqlite import Change, GrantRow, Retired
from sidecar.token.messages import Answer
from sidecar.token.shield import Claim, Unavailable

log = logging.getLogger("egress_sidecar.redis")

PREFIX = "egress-sidecar:"
OP_TIMEOUT = 0.5  # seconds per attempt: a Redis call that takes longer counts as a failure
HEALTH_SECONDS = 1.0  # the health check's period
REDIS_WAIT = 10.0  # how long a redemption waits for an unreachable Redis before it is refused
RESTART_GRACE = 2.5  # after Redis lost its state, no lock is granted this long: holders put theirs back first
MAX_WRITES = 1000  # grant changes queued for Redis; beyond, they are dropped (memory and SQLite keep them)
MAX_KEPT = 1000  # answers kept to publish again after Redis lost its state (as the shield's own bounds)
MAX_KEPT_BYTES = 8 * 1024 * 1024
GRANT_TTL = 90 * 86400  # as grants.Limits.grant_retention
RETIRED_TTL = 30 * 86400  # as grants.Limits.retired_ttl
BORN = PREFIX + "born"  # when this Redis's state began (server time, ms): gone or new after a restart
_NOW_MS = ("local t = redis.call('time') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "
           "local born = redis.call('get', KEYS[1]) "
           "if not born then redis.call('set', KEYS[1], now) born = redis.call('get', KEYS[1]) end ")
# The health check: when the state began (set when missing), in server time.
_HEALTH = _NOW_MS + "return born"
# A redemption's one step before it is sent (KEYS: lock, done, born, replay; ARGV: this redemption's lock
# value, its ttl in ms, the restart grace in ms, 1 when the caller already waits on another's lock):
# {3, answer}: the answer of the redemption the caller waited on (only then: ``done`` may be the answer of an
# earlier redemption); {2, answer}: a replayable answer (the lock is never taken while one exists: a
# replica that found none a moment ago must not redeem the token again); {1}: the lock is taken (or was
# already this redemption's: a retried call), and the answer an earlier redemption left for its waiters is
# dropped in the same step (whoever waits on this lock must get this redemption's answer); {0}: held by
# another; {-1}: the state is too young (holders from before a restart may not have put theirs back yet).
_CLAIM = ("if ARGV[4] == '1' then local d = redis.call('get', KEYS[2]) if d then return {3, d} end end "
          "local r = redis.call('get', KEYS[4]) if r then return {2, r} end "
          "local cur = redis.call('get', KEYS[1]) if cur == ARGV[1] then return {1} end if cur then return {0} end "
          + _NOW_MS.replace("KEYS[1]", "KEYS[3]") + "if now - tonumber(born) < tonumber(ARGV[3]) then return {-1} end "
          "redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) redis.call('del', KEYS[2]) return {1}")
# A redemption's one step after its answer (KEYS: done, replay, lock; ARGV: the sealed answer for ``done`` and
# its ttl in ms, the sealed answer for ``replay`` ('' when not replayable) and its ttl, this replica's lock
# value ('' when it holds none): the answer for the waiters and for replay, and the lock released, at once
# (a waiter never finds the lock free without the answer).
_FINISH = ("redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) "
           "if ARGV[3] ~= '' then redis.call('set', KEYS[2], ARGV[3], 'PX', ARGV[4]) end "
           "if ARGV[5] ~= '' and redis.call('get', KEYS[3]) == ARGV[5] then redis.call('del', KEYS[3]) end return 1")
T = TypeVar("T")


def derive(secret: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose from SIDECAR_REDIS_KEY (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"egress-sidecar " + purpose).derive(secret)


class SharedState:
    def __init__(self, url: str, secret: bytes, metrics: Metrics, *, op_timeout: float = OP_TIMEOUT,
                 health_seconds: float = HEALTH_SECONDS, redis_wait: float = REDIS_WAIT,
                 restart_grace: float = RESTART_GRACE) -> None:
        self.url = url
        self.metrics = metrics
        self.op_timeout = op_timeout
        self.health_seconds = health_seconds
        self.redis_wait = redis_wait
        self.restart_grace = restart_grace
        self.hash_key = derive(secret, b"token hashes")
        self._aead = AESGCM(derive(secret, b"answers"))
        self._owner = os.urandom(12).hex()  # this process, as the owner of the locks it takes
        self._locks = itertools.count()
        self._client: aioredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None  # the event loop's thread
        self._up_event: asyncio.Event | None = None
        self._health: asyncio.Task[None] | None = None
        self.up: bool | None = None  # None: not tried yet
        self._failed_at = float("-inf")  # time.monotonic() of the last failed call
        self.down_since: float | None = None
        self.born: str | None = None  # the state's birth the last check saw
        self._held: dict[bytes, tuple[str, float]] = {}  # locks this replica holds: key -> (value, monotonic expiry)
        self._unpublished: dict[bytes, tuple[Answer, float, float]] = {}  # key -> answer, replay and keep deadline
        self._published: OrderedDict[bytes, tuple[Answer, float]] = OrderedDict()  # replayable: key -> answer, until
        self._published_bytes = 0
        self._writes: set[asyncio.Task[None]] = set()

    # -- lifecycle and health -------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, check once (the sidecar starts either way) and keep checking in the background."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._up_event = asyncio.Event()
        # One retry, on a fresh connection (redis-py drops the connection that failed), and no backoff:
        # a pooled connection Redis closed behind our back fails once, and that is not Redis being down.
        # RESP2: a new connection then needs no HELLO (redis-py 8 speaks RESP3 by default, and with it also
        # asks for maintenance notifications): two round trips fewer each time the pool grows, which happens
        # while token calls wait. Nothing here needs RESP3's types.
        self._client = aioredis.from_url(self.url, socket_timeout=self.op_timeout, protocol=2,
                                         socket_connect_timeout=self.op_timeout, retry=Retry(NoBackoff(), 1))
        await self.check()
        self._health = self._loop.create_task(self._watch(), name="redis-health")

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=2.0)
        if self._client is not None:
            await self._client.aclose()

    def usable(self) -> bool:
        """Redis answered the last call or check (while it is down, nothing waits on it)."""
        return self._client is not None and self.up is True

    async def wait_up(self, timeout: float) -> bool:
        """Whether Redis is up, waiting at most ``timeout`` seconds for the health check to see it back."""
        if self.usable():
            return True
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                if self._up_event is None:  # not started: nothing will set it
                    await asyncio.sleep(timeout)
                await self._up_event.wait()
        except TimeoutError:
            pass
        return self.usable()

    async def _watch(self) -> None:
        for _ in itertools.count():  # until cancelled at close
            await asyncio.sleep(self.health_seconds)
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - the health check must outlive a bug
                event(log, logging.ERROR, f"Redis health check failed ({cause(exc)})", error=type(exc).__name__)

    async def check(self) -> None:
        """One health check, whatever the state: up or down, and whether Redis lost its state since the
        last one (then what this replica holds is put back)."""
        try:
            born = await self._attempt(lambda r: r.eval(_HEALTH, 1, BORN))
        except Unavailable:
            return
        born = born.decode() if isinstance(born, bytes) else str(born)
        lost, self.born = self.born is not None and born != self.born, born
        if lost:
            event(log, logging.WARNING, "Redis lost its state (restarted or flushed): this replica puts back the "
                  "locks of its redemptions in flight and the answers it published", held=len(self._held),
                  answers=len(self._published) + len(self._unpublished))
        await self._restore(relock=lost)

    async def _call(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """One call for the shield or the grants: at once Unavailable while Redis is down."""
        if not self.usable():
            raise Unavailable()
        return await self._attempt(op)

    async def _attempt(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        assert self._client is not None
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.op_timeout * 3):  # two attempts (one retry), each with op_timeout
                result = await op(self._client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise Unavailable() from None
        if started >= self._failed_at:  # an answer to a call sent before the last failure says nothing newer
            self._reachable()
        return result

    def _reachable(self) -> None:
        if self.up is not True:
            if self.up is False:
                event(log, logging.INFO, "Redis is reachable again: the replicas share refresh token state again")
            self.up, self.down_since = True, None
            self.metrics.redis_up.set(1)
            if self._up_event is not None:
                self._up_event.set()

    def _failed(self, exc: BaseException) -> None:
        self._failed_at = time.monotonic()
        if self.up is not False:
            self.down_since = time.time()
            event(log, logging.WARNING, f"Redis is unreachable ({cause(exc)}): refresh token redemptions wait for it "
                  f"(at most {self.redis_wait:g}s), then go from each replica alone (not coordinated with the other "
                  "replicas until Redis is back)", error=type(exc).__name__)
        self.up = False
        self.metrics.redis_up.set(0)
        if self._up_event is not None:
            self._up_event.clear()

    async def _restore(self, *, relock: bool) -> None:
        """Publish what could not be published while Redis was down (then release its lock); after Redis
        lost its state, also take back the locks of redemptions still in flight and publish again the
        answers still within their replay window."""
        now = time.monotonic()
        for key, (answer, replay_until, keep_until) in list(self._unpublished.items()):
            if keep_until <= now:
                self._unpublished.pop(key, None)
                continue
            try:
                await self._finish(key, answer, replay_until - now, keep_until - now)
                self._unpublished.pop(key, None)
            except Unavailable:
                return
        if not relock:
            return
        for key, (value, expires) in list(self._held.items()):
            if expires <= now:  # over (its answer, if still unpublished, releases it)
                if key not in self._unpublished:
                    self._held.pop(key, None)
                continue
            name = self._name("lock", key)
            try:
                back = await self._attempt(lambda r, n=name, v=value, ms=int((expires - now) * 1000): r.set(
                    n, v, nx=True, px=max(1, ms)))
                holder = None if back else await self._attempt(lambda r, n=name: r.get(n))
            except Unavailable:
                return
            if holder is not None and holder.decode() != value:
                event(log, logging.WARNING, "another replica took the lock on a refresh token redemption this replica "
                      "has in flight, before it could put its lock back (Redis lost its state): that token may be "
                      "redeemed twice")
        for key, (answer, until) in list(self._published.items()):
            if until <= now:
                continue  # (dropped by the next _keep)
            name = self._name("replay", key)
            try:
                await self._attempt(lambda r, n=name, a=answer, ms=int((until - now) * 1000): r.set(
                    n, self._seal(n, a), nx=True, px=max(1, ms)))
            except Unavailable:
                return

    # -- answers (encrypted) --------------------------------------------------------------------
    def _seal(self, name: str, answer: Answer) -> bytes:
        plain = json.dumps({
            "status": answer.status, "reason": base64.b64encode(answer.reason).decode(),
            "headers": [[base64.b64encode(k).decode(), base64.b64encode(v).decode()] for k, v in answer.headers],
            "body": base64.b64encode(answer.body).decode(), "local": answer.local,
        }).encode()
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, name.encode())

    def _open(self, name: str, sealed: bytes | None) -> Answer | None:
        if not sealed or len(sealed) < 13:
            return None
        try:
            data = json.loads(self._aead.decrypt(sealed[:12], sealed[12:], name.encode()))
            return Answer(int(data["status"]), [(base64.b64decode(k), base64.b64decode(v)) for k, v in data["headers"]],
                          base64.b64decode(data["body"]), reason=base64.b64decode(data["reason"]),
                          local=bool(data.get("local", False)))
        except Exception:  # noqa: BLE001 - a value we cannot open (another key, tampered) is no answer
            return None

    @staticmethod
    def _name(kind: str, key: bytes) -> str:
        return f"{PREFIX}{kind}:{key.hex()}"

    async def claim(self, key: bytes, ttl: float, waiting: bool = False) -> tuple[Claim, Answer | None]:
        """A redemption's one Redis round trip before it is sent: a replayable answer (``replayed``), or,
        for a caller that already waits on another replica's lock, that redemption's answer
        (``coalesced``); else the lock on it for ``ttl`` seconds: ``taken``, ``held`` by another replica,
        or ``young``: Redis lost its state less than RESTART_GRACE ago, so a holder from before may not have
        put its lock back yet (ask again). ``answered``: a replayable answer that cannot be opened (ask
        again; the lock is not taken while it lasts)."""
        name, done, replay = self._name("lock", key), self._name("done", key), self._name("replay", key)
        value = f"{self._owner}:{next(self._locks)}"  # this redemption's: a retried call finds it its own
        got = await self._call(lambda r: r.eval(_CLAIM, 4, name, done, BORN, replay, value, max(1, int(ttl * 1000)),
                                                int(self.restart_grace * 1000), 1 if waiting else 0))
        code = int(got[0])
        if code in (2, 3):
            answer = self._open(replay if code == 2 else done, got[1])
            if answer is None:
                return "answered", None
            return ("replayed" if code == 2 else "coalesced"), answer
        if code == 1:
            self._held[key] = (value, time.monotonic() + ttl)
            return "taken", None
        return ("held" if code == 0 else "young"), None

    async def publish(self, key: bytes, answer: Answer, replay_for: float, keep_for: float) -> None:
        """A redemption's one Redis round trip after its answer: the answer for whoever waited on the lock
        (``done``, briefly) and, when it may be replayed, for later identical redemptions (``replay``, for
        the window), and this replica's lock on it released, in one step. Raises Unavailable when Redis
        cannot take it now: it is then kept, with the lock, and published as soon as Redis is back (within
        ``keep_for``)."""
        now = time.monotonic()
        if replay_for > 0:
            self._keep(key, answer, now + replay_for, now)
        try:
            await self._finish(key, answer, replay_for, keep_for)
        except Unavailable:
            self._unpublished[key] = (answer, now + replay_for, now + keep_for)
            while len(self._unpublished) > MAX_KEPT:
                self._unpublished.pop(next(iter(self._unpublished)))
            raise

    def publish_soon(self, key: bytes, answer: Answer, replay_for: float, keep_for: float) -> asyncio.Task[None]:
        """:meth:`publish`, after the caller's current step: the shield calls this as the answer goes to the
        client, which gets it first and never waits for Redis. What Redis cannot take is kept (as
        :meth:`publish`); :meth:`close` waits for it."""
        async def run() -> None:
            await asyncio.sleep(0)  # the caller's step (the answer written to the client) goes first
            try:
                await self.publish(key, answer, replay_for, keep_for)
            except Unavailable:
                pass  # kept, with the lock, and published when Redis is back (_restore)

        task = asyncio.get_running_loop().create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    def _keep(self, key: bytes, answer: Answer, until: float, now: float) -> None:
        """Remember a replayable answer to publish again if Redis loses it (bounded as the shield's own)."""
        old = self._published.pop(key, None)
        self._published_bytes -= len(old[0].body) if old else 0
        if len(answer.body) <= MAX_KEPT_BYTES:
            self._published[key] = (answer, until)
            self._published_bytes += len(answer.body)
        while self._published and (len(self._published) > MAX_KEPT or self._published_bytes > MAX_KEPT_BYTES
                                   or next(iter(self._published.values()))[1] <= now):
            self._published_bytes -= len(self._published.popitem(last=False)[1][0].body)

    async def _finish(self, key: bytes, answer: Answer, replay_for: float, keep_for: float) -> None:
        """Write the answer and release this replica's lock on it (if it holds one), in one step."""
        done, replay, lock = self._name("done", key), self._name("replay", key), self._name("lock", key)
        held = self._held.get(key)
        await self._call(lambda r: r.eval(
            _FINISH, 3, done, replay, lock, self._seal(done, answer), max(1, int(keep_for * 1000)),
            self._seal(replay, answer) if replay_for > 0 else b"", max(1, int(replay_for * 1000)),
            held[0] if held is not None else ""))
        if held is not None and self._held.get(key) is held:
            del self._held[key]

    # -- refresh token tracking (keyed hashes only) ---------------------------------------------
    async def grant_state(self, token: bytes) -> tuple[GrantRow | None, list[Retired], bytes | None]:
        """What the replicas know of a token hash: the grant whose current token it is (or whose
        rotated-away token it is), with that grant's rotated-away hashes and its sealed org and user
        (:meth:`identity`). One round trip for a token nobody knows, two for one they do (a token call
        waits for them: it is routed by the grant's org)."""
        current, retired = await self._call(lambda r: r.mget(self._name("current", token), self._name("retired", token)))
        gkey = bytes.fromhex(current.decode()) if current else None
        if gkey is None and retired:
            gkey = bytes.fromhex(json.loads(retired)["grant"])
        if gkey is None:
            return None, [], None
        raw, sealed = await self._call(lambda r: r.mget(self._name("grant", gkey), self._name("identity", gkey)))
        if not raw:
            return None, [], None
        data = json.loads(raw)
        row = GrantRow(gkey, bytes.fromhex(data["current"]), data["first_seen"], data["last_used"], data["rotations"],
                       data["reuses"], data["last_reuse"])
        olds = [Retired(bytes.fromhex(t), gkey, at) for t, at in data.get("retired", [])]
        return row, olds, bytes(sealed) if sealed else None

    def write(self, change: Change, retired_of: Callable[[bytes], list[Retired]]) -> None:
        """Mirror a change of the grant tracker to Redis, off the request path (dropped when Redis is
        down or too far behind: memory and SQLite keep it). Callable from any thread: the write itself
        runs on the event loop. A prune rule is for the file only (Redis keys expire by themselves)."""
        if not (change.grants or change.retired or change.drop_grants or change.drop_retired):
            return
        if not self.usable() or len(self._writes) >= MAX_WRITES or self._loop is None:
            return
        grants = {row[0]: row for row in change.grants}
        olds = {key: [(r.token.hex(), r.at) for r in retired_of(key)] for key in grants}
        if threading.get_ident() == self._thread:
            self._schedule(change, grants, olds)
        else:
            self._loop.call_soon_threadsafe(self._schedule, change, grants, olds)

    def _schedule(self, change: Change, grants: dict[bytes, tuple[Any, ...]],
                  olds: dict[bytes, list[tuple[str, float]]]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._write(change, grants, olds))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, change: Change, grants: dict[bytes, tuple[Any, ...]],
                     olds: dict[bytes, list[tuple[str, float]]]) -> None:
        async def apply(r: aioredis.Redis) -> None:
            async with r.pipeline(transaction=True) as p:
                for key, (_, current, first_seen, last_used, rotations, reuses, last_reuse) in grants.items():
                    p.set(self._name("grant", key), json.dumps({
                        "current": current.hex(), "first_seen": first_seen, "last_used": last_used,
                        "rotations": rotations, "reuses": reuses, "last_reuse": last_reuse, "retired": olds[key],
                    }), ex=GRANT_TTL)
                    p.set(self._name("current", current), key.hex(), ex=GRANT_TTL)
                for r_ in change.retired:
                    p.set(self._name("retired", r_.token), json.dumps({"grant": r_.grant.hex(), "at": r_.at}),
                          ex=RETIRED_TTL)
                for token in change.drop_retired:
                    p.delete(self._name("retired", token))
                for key in change.drop_grants:
                    p.delete(self._name("grant", key))
                await p.execute()

        try:
            await self._call(apply)
        except Unavailable:
            pass

    def status(self) -> dict[str, Any]:
        return {"configured": True, "up": self.up,
                "down_since": None if self.down_since is None else time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.down_since))}

    # -- customer orgs (sealed by their owner, sidecar.state.seal: opaque bytes here) ---------------
    async def identity(self, grant: bytes) -> bytes | None:
        """The sealed org and user of a grant, as a replica that learnt them wrote it."""
        name = self._name("identity", grant)
        value = await self._call(lambda r: r.get(name))
        return bytes(value) if value else None

    def write_identities(self, items: list[tuple[bytes, bytes]], ttl: float) -> None:
        """Mirror grants' sealed orgs and users to Redis, off the request path (as :meth:`write`)."""
        async def apply(r: aioredis.Redis) -> None:
            async with r.pipeline(transaction=False) as p:
                for grant, sealed in items:
                    p.set(self._name("identity", grant), sealed, ex=max(1, int(ttl)))
                await p.execute()

        self.spawn(apply)

    def spawn(self, op: Callable[[aioredis.Redis], Awaitable[Any]]) -> None:
        """Run ``op`` on Redis in the background (on the event loop; dropped when Redis is down or too many
        writes are pending: the caller's memory and SQLite keep what it wrote)."""
        if not self.usable() or len(self._writes) >= MAX_WRITES:
            return

        async def run() -> None:
            try:
                await self._call(op)
            except Unavailable:
                pass

        task = asyncio.get_running_loop().create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # -- Salesforce's evidence per app (sidecar.egress.evidence; values sealed there) -------------------
    def evidence_name(self, app: bytes) -> str:
        return self._name("evidence", app)

    async def evidence(self, app: bytes) -> dict[str, bytes]:
        """Everything the replicas know of one app's evidence: field -> sealed value."""
        name = self.evidence_name(app)
        raw = await self._call(lambda r: r.hgetall(name))
        return {(k.decode() if isinstance(k, bytes) else str(k)): bytes(v) for k, v in raw.items()}

    def write_evidence(self, app: bytes, sets: dict[str, bytes], deletes: list[str], ttl: float) -> None:
        """Change fields of one app's evidence, off the request path; the hash lives ``ttl`` seconds past
        its last change."""
        name = self.evidence_name(app)

        async def apply(r: aioredis.Redis) -> None:
            async with r.pipeline(transaction=True) as p:
                if deletes:
                    p.hdel(name, *deletes)
                if sets:
                    p.hset(name, mapping=sets)  # type: ignore[arg-type]
                p.expire(name, max(1, int(ttl)))
                await p.execute()

        if sets or deletes:
            self.spawn(apply)

    async def evidence_apps(self, limit: int = 1000) -> list[bytes]:
        """The apps the replicas hold evidence for (at start: a new replica knows what the others learnt)."""
        async def scan(r: aioredis.Redis) -> list[bytes]:
            found: list[bytes] = []
            async for key in r.scan_iter(match=f"{PREFIX}evidence:*", count=100):
                text = key.decode() if isinstance(key, bytes) else str(key)
                try:
                    found.append(bytes.fromhex(text.rsplit(":", 1)[1]))
                except ValueError:
                    continue
                if len(found) >= limit:
                    break
            return found

        return await self._call(scan)
