"""State the replicas of one app share on Redis (``SIDECAR_REDIS_URL``): the rotation shield's locks and
answers, and refresh token tracking's grants.

Answers hold tokens, so they are encrypted with AES-GCM under a key derived from ``SIDECAR_REDIS_KEY``
(the Redis key name is bound in as associated data) and expire with the replay window; everything
else is keyed hashes. The same secret derives the key the replicas hash tokens with, so they agree on
them. Redis is never on the critical path: every call has a short deadline, and when Redis cannot be
reached the sidecar serves on its local state, says so once in the log, in
``egress_sidecar_redis_up`` and on ``/status``, and tries Redis again a few seconds later.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.state.sqlite import Change, GrantRow, Retired
from sidecar.token.messages import Answer
from sidecar.token.shield import Unavailable

log = logging.getLogger("egress_sidecar.redis")

PREFIX = "egress-sidecar:"
OP_TIMEOUT = 0.5  # seconds: a Redis call that takes longer counts as Redis being unreachable
RETRY_SECONDS = 5.0  # after a failure, Redis is left alone this long
MAX_WRITES = 1000  # grant changes queued for Redis; beyond, they are dropped (memory and SQLite keep them)
GRANT_TTL = 90 * 86400  # as grants.Limits.grant_retention
RETIRED_TTL = 30 * 86400  # as grants.Limits.retired_ttl
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# Take the lock and, in the same step, drop the answer an earlier redemption left for its waiters: whoever
# waits on this lock must get this redemption's answer, not the one before.
_LOCK = ("if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then redis.call('del', KEYS[2]) return 1 "
         "else return 0 end")
T = TypeVar("T")


def derive(secret: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose from SIDECAR_REDIS_KEY (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"egress-sidecar " + purpose).derive(secret)


class SharedState:
    def __init__(self, url: str, secret: bytes, metrics: Metrics, *, op_timeout: float = OP_TIMEOUT,
                 retry_seconds: float = RETRY_SECONDS) -> None:
        self.url = url
        self.metrics = metrics
        self.op_timeout = op_timeout
        self.retry_seconds = retry_seconds
        self.hash_key = derive(secret, b"token hashes")
        self._aead = AESGCM(derive(secret, b"answers"))
        self._owner = os.urandom(12).hex()  # this process, as the owner of the locks it takes
        self._client: aioredis.Redis | None = None
        self.up: bool | None = None  # None: not tried yet
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._writes: set[asyncio.Task[None]] = set()

    # -- lifecycle and health -------------------------------------------------------------------
    async def start(self) -> None:
        self._client = aioredis.from_url(self.url, socket_timeout=self.op_timeout,
                                         socket_connect_timeout=self.op_timeout, retry_on_timeout=False)
        try:
            await self._call(lambda r: r.ping())
        except Unavailable:
            pass  # logged; the sidecar starts on local state

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=2.0)
        if self._client is not None:
            await self._client.aclose()

    def usable(self) -> bool:
        return self._client is not None and (self.up is not False or time.monotonic() >= self._retry_at)

    async def _call(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        if not self.usable():
            raise Unavailable()
        assert self._client is not None
        try:
            async with asyncio.timeout(self.op_timeout * 2):
                result = await op(self._client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise Unavailable() from None
        if self.up is not True:
            if self.up is False:
                event(log, logging.INFO, "Redis is reachable again: the replicas share refresh token state again")
            self.up, self.down_since = True, None
            self.metrics.redis_up.set(1)
        return result

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.retry_seconds
        if self.up is not False:
            self.down_since = time.time()
            event(log, logging.WARNING, f"Redis is unreachable ({type(exc).__name__}): serving on this replica's "
                  "own state; coalescing, replay and reuse detection do not reach the other replicas until it "
                  "is back", error=type(exc).__name__)
        self.up = False
        self.metrics.redis_up.set(0)

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

    async def replay(self, key: bytes) -> Answer | None:
        name = self._name("replay", key)
        return self._open(name, await self._call(lambda r: r.get(name)))

    async def done(self, key: bytes) -> Answer | None:
        name = self._name("done", key)
        return self._open(name, await self._call(lambda r: r.get(name)))

    async def lock(self, key: bytes, ttl: float) -> bool:
        name, done = self._name("lock", key), self._name("done", key)
        return bool(await self._call(lambda r: r.eval(_LOCK, 2, name, done, self._owner, max(1, int(ttl * 1000)))))

    async def locked(self, key: bytes) -> bool:
        name = self._name("lock", key)
        return bool(await self._call(lambda r: r.exists(name)))

    async def unlock(self, key: bytes) -> None:
        name = self._name("lock", key)
        await self._call(lambda r: r.eval(_UNLOCK, 1, name, self._owner))

    async def publish(self, key: bytes, answer: Answer, replay_for: float, keep_for: float) -> None:
        """The answer for whoever waited on the lock (``done``, briefly) and, when it may be replayed, for
        later identical redemptions (``replay``, for the window)."""
        done, replay = self._name("done", key), self._name("replay", key)

        async def write(r: aioredis.Redis) -> None:
            async with r.pipeline(transaction=False) as p:
                p.set(done, self._seal(done, answer), px=max(1, int(keep_for * 1000)))
                if replay_for > 0:
                    p.set(replay, self._seal(replay, answer), px=max(1, int(replay_for * 1000)))
                await p.execute()

        await self._call(write)

    # -- refresh token tracking (keyed hashes only) ---------------------------------------------
    async def grant_state(self, token: bytes) -> tuple[GrantRow | None, list[Retired]]:
        """What the replicas know of a token hash: the grant whose current token it is (or whose
        rotated-away token it is), with that grant's rotated-away hashes."""
        async def read(r: aioredis.Redis) -> tuple[Any, Any]:
            return await r.get(self._name("current", token)), await r.get(self._name("retired", token))

        current, retired = await self._call(read)
        gkey = bytes.fromhex(current.decode()) if current else None
        if gkey is None and retired:
            gkey = bytes.fromhex(json.loads(retired)["grant"])
        if gkey is None:
            return None, []
        raw = await self._call(lambda r: r.get(self._name("grant", gkey)))
        if not raw:
            return None, []
        data = json.loads(raw)
        row = GrantRow(gkey, bytes.fromhex(data["current"]), data["first_seen"], data["last_used"], data["rotations"],
                       data["reuses"], data["last_reuse"])
        olds = [Retired(bytes.fromhex(t), gkey, at) for t, at in data.get("retired", [])]
        return row, olds

    def write(self, change: Change, retired_of: Callable[[bytes], list[Retired]]) -> None:
        """Mirror a change of the grant tracker to Redis, off the request path (dropped when Redis is
        down or too far behind: memory and SQLite keep it)."""
        if not change or not self.usable() or len(self._writes) >= MAX_WRITES:
            return
        grants = {row[0]: row for row in change.grants}
        olds = {key: [(r.token.hex(), r.at) for r in retired_of(key)] for key in grants}
        task = asyncio.get_running_loop().create_task(self._write(change, grants, olds))
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
