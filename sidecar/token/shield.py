"""The rotation shield: one redemption per refresh token, its answer given to everyone who asked.

Under Refresh Token Rotation every redemption returns a new refresh token and invalidates the old one.
Two workers that redeem the same token at once, an app whose client timed out while Salesforce was
answering, or one that crashed before it stored the new token: each ends with a spent token and a
customer who must authorise again. The sidecar sees every redemption, so it can do better:

- **coalescing**: while a redemption of a refresh token is in flight, an identical one waits for it and
  gets the same answer (status and body, the rotated token included);
- **replay**: a redemption that succeeded less than ``SIDECAR_REPLAY_WINDOW`` seconds ago is answered
  again, from memory, instead of being sent (Salesforce would refuse it as a reuse).

"Identical" means the same request as far as Salesforce is concerned: the same token host, the same
form fields (grant, refresh token, client credentials, scope...) and the same HTTP Basic credentials,
compared as a keyed hash; a caller without the app's credentials never gets another caller's answer. Only ``refresh_token``
redemptions are shielded and only successful answers are replayed. Answers live in memory, bounded in
count and bytes, dropped when they expire, never logged or written to disk; with ``SIDECAR_REDIS_URL`` the
replicas share them through Redis, encrypted (:mod:`sidecar.state.redis`), and a redemption is sent once
this replica holds the Redis lock on it. While Redis cannot be reached a redemption waits for it (up to
``redis_wait``: a restart is ridden out); when it stays away, redemptions go from each replica alone, as
they would without the sidecar, and the log and ``egress_sidecar_shield_uncoordinated_total``
say so.

**Redis round trips.** A redemption with nothing to coalesce costs one before it is sent: one script
looks for a replayable answer and, finding none, takes the lock (:meth:`SharedState.claim
<sidecar.state.redis.SharedState.claim>`). After Salesforce's answer the client gets it first, then one more
publishes it and releases the lock in one step (:meth:`Shield.end`). The one before the send cannot be
skipped, not even with replay off and no other replica seen holding the key: whether another replica is
redeeming the same refresh token at this very moment is known only to Redis. Two replicas deciding from
what each knew locally (a lease handed out earlier, or a copy of the other replicas' locks kept fresh by
Redis's invalidation messages or pub/sub, which arrive after the lock they report) could both find the
key free in the same instant and both redeem the token: one app would end with a dead refresh token.
Mutual exclusion needs one atomic step at the arbiter the replicas share, per redemption.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.token.messages import Answer

How = Literal["sent", "coalesced", "replayed"]
Claim = Literal["taken", "held", "young", "answered", "replayed", "coalesced"]  # (sidecar.state.redis.claim)
MAX_ANSWERS = 1000  # replayable answers kept in memory
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # and their bodies together
POLL_SECONDS = 0.025  # how often a waiter looks for another replica's answer
MAX_ROUNDS = 100  # a redemption waits for this replica's earlier ones of the same key at most this often
_CONTEXT = b"egress-sidecar shield"
log = logging.getLogger("egress_sidecar.shield")


class SharedAnswers(Protocol):
    """What the shield needs from shared state (sidecar.state.redis.SharedState); every call but
    ``wait_up`` may raise ``Unavailable``."""

    redis_wait: float  # how long a redemption waits for unreachable shared state before it goes alone

    async def wait_up(self, timeout: float) -> bool: ...
    async def claim(self, key: bytes, ttl: float, waiting: bool = False) -> tuple[Claim, Answer | None]: ...
    def publish_soon(self, key: bytes, answer: Answer, replay_for: float, keep_for: float) -> asyncio.Future[None]: ...


class Unavailable(Exception):
    """Shared state cannot be reached right now."""


class Contended(Exception):
    """Another replica still holds the lock on this redemption after the longest a redemption takes
    (it crashed and a third one took over, or clocks disagree): nothing was sent, and sending now could
    redeem the refresh token twice."""


def request_key(hash_key: bytes, fields: dict[str, list[str]], authorization: str | None, host: str = "") -> bytes:
    """The keyed hash that identifies one redemption: the token host it goes to (the same credentials
    sent to login and to test are two redemptions), every form field and the Basic credentials."""
    parts = [_CONTEXT, b"\0h", host.lower().rstrip(".").encode("utf-8", "surrogatepass")]
    for name in sorted(fields):
        encoded = name.encode("utf-8", "surrogatepass")
        for value in fields[name]:
            parts += (b"\0f", encoded, b"\0", value.encode("utf-8", "surrogatepass"))
    parts += (b"\0a", (authorization or "").encode("latin-1", "replace"))
    return hmac.digest(hash_key, b"".join(parts), "sha256")[:16]  # one call: the same MAC as update() by update()


@dataclass(eq=False)
class Lead:
    """A redemption this call sends for everyone who asks for the same one meanwhile."""

    key: bytes
    future: asyncio.Future[Answer]
    shared: SharedAnswers | None = None  # the Redis it holds the lock on, if any
    locked: bool = False


class Shield:
    def __init__(self, metrics: Metrics, window: float, wait_limit: float, shared: SharedAnswers | None = None,
                 *, clock: Callable[[], float] = time.monotonic, max_answers: int = MAX_ANSWERS,
                 max_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.metrics = metrics
        self.window = window  # SIDECAR_REPLAY_WINDOW; 0: no replay
        self.wait_limit = wait_limit  # the longest a redemption can take (service.longest_redemption)
        self.shared = shared
        self.clock = clock
        self.max_answers = max_answers
        self.max_bytes = max_bytes
        self.hash_key: bytes | None = None  # the key requests are hashed with (set once it is loaded)
        self._answers: OrderedDict[bytes, tuple[float, Answer]] = OrderedDict()  # key -> (expires, answer)
        self._bytes = 0
        self._in_flight: dict[bytes, asyncio.Future[Answer]] = {}
        self._publishing: dict[bytes, asyncio.Future[None]] = {}  # answers on their way to Redis, by key
        self._alone_said = -1e9

    @property
    def cached(self) -> int:
        return len(self._answers)

    async def redeem(self, key: bytes, send: Callable[[], Awaitable[Answer]]) -> tuple[Answer, How]:
        """``send()`` the redemption unless an identical one is in flight (wait for its answer) or
        succeeded within the window (its answer again): :meth:`begin`, the send, :meth:`end`."""
        got = await self.begin(key)
        if not isinstance(got, Lead):
            return got
        try:
            answer = await send()
        except BaseException as exc:
            self.abort(got, exc)
            raise
        self.end(got, answer)
        return answer, "sent"

    async def begin(self, key: bytes) -> tuple[Answer, How] | Lead:
        """Before a redemption is sent: another's answer for it (replayed, or coalesced on one in flight,
        here or on another replica), or the :class:`Lead`: this call sends it, and every identical one
        waits for its :meth:`end` (or :meth:`abort`). Raises Contended when another replica holds the
        redemption past the longest one can take."""
        for _ in range(MAX_ROUNDS):  # bounded: each round, an earlier redemption of this key was published
            cached = self._replayable(key)
            if cached is not None:
                return self._shielded(cached, "replayed")
            leader = self._in_flight.get(key)
            if leader is not None:  # as long as the leader may take: waiting for Redis, for another replica, its send
                longest = (self.shared.redis_wait + self.wait_limit if self.shared is not None else 0.0) + self.wait_limit
                answer = await asyncio.wait_for(asyncio.shield(leader), longest)
                return self._shielded(answer, "coalesced")
            publishing = self._publishing.get(key)
            if publishing is None or publishing.done():
                break
            # This replica's previous redemption of it was answered and is being published (its lock still
            # held): this one is a new redemption, so it asks Redis once that one is out (bounded by Redis's
            # deadline), and is not handed the previous answer as if it had waited for it.
            await asyncio.wait([publishing])
        lead = Lead(key, asyncio.get_running_loop().create_future())
        self._in_flight[key] = lead.future
        try:
            remote = await self._remote_begin(lead)
        except BaseException as exc:
            self.abort(lead, exc)
            raise
        if remote is None:
            return lead
        self._settle(lead, remote[0])
        return self._shielded(*remote)

    def end(self, lead: Lead, answer: Answer) -> None:
        """The redemption this call led was answered: every waiter here gets the answer now, a success is
        kept for replay, and, with Redis, the answer is published for the other replicas (and this
        replica's lock released) in one round trip that starts after the current step: the client gets its
        answer first and never waits for Redis. Until it is published the lock stays held, so a replica
        waiting on it keeps waiting and then gets this answer; when Redis cannot take it, it is kept, with
        the lock, and published when Redis is back (sidecar.state.redis)."""
        ok = 200 <= answer.status < 300
        shared = lead.shared
        if shared is not None and lead.locked:
            task = shared.publish_soon(lead.key, answer, self.window if ok else 0.0, self.wait_limit)
            self._publishing[lead.key] = task
            task.add_done_callback(lambda t, key=lead.key: self._published(key, t))
        self._settle(lead, answer)
        if ok:
            self._keep(lead.key, answer)

    def _published(self, key: bytes, task: asyncio.Future[None]) -> None:
        if self._publishing.get(key) is task:
            del self._publishing[key]

    def abort(self, lead: Lead, exc: BaseException) -> None:
        """The redemption this call led ended without an answer: its waiters get the failure."""
        if self._in_flight.get(lead.key) is lead.future:
            del self._in_flight[lead.key]
        if not lead.future.done():
            lead.future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("the redemption was cancelled"))
            lead.future.exception()  # retrieved: no "never retrieved" warning when nobody waited

    def _settle(self, lead: Lead, answer: Answer) -> None:
        if self._in_flight.get(lead.key) is lead.future:
            del self._in_flight[lead.key]
        if not lead.future.done():
            lead.future.set_result(answer)

    async def _remote_begin(self, lead: Lead) -> tuple[Answer, How] | None:
        """With Redis: another replica's answer (replayed, or coalesced after waiting for the replica
        redeeming it), or None to send it: with this replica holding the Redis lock on it, or, when Redis
        stayed unreachable for ``redis_wait`` and no other replica's lock was seen, alone (as the plain
        recipe would; said in the log). Raises Contended when another replica's lock outlives the longest
        a redemption takes."""
        shared = self.shared
        if shared is None:
            return None
        key = lead.key
        give_up = self.clock() + shared.redis_wait
        waiting_since: float | None = None  # another replica's lock on this redemption was seen then
        for _ in range(int((shared.redis_wait + self.wait_limit) / POLL_SECONDS) + 2):  # bounded in count and time
            try:  # one round trip: the answer, or the lock (sidecar.state.redis._CLAIM)
                claim, answer = await shared.claim(key, self.wait_limit, waiting_since is not None)
                if answer is not None:
                    if claim == "replayed":
                        self._keep(key, answer)
                    return answer, "replayed" if claim == "replayed" else "coalesced"
                if claim == "taken":  # (also after the holder vanished without an answer: it crashed)
                    lead.shared, lead.locked = shared, True
                    return None
                if claim == "held" and waiting_since is None:
                    waiting_since = self.clock()
                # "young", "answered" (a replayable answer this replica cannot open): ask again
            except Unavailable:
                pass  # Redis is being reconnected: wait for it (a replica waiting on a lock keeps waiting)
            now = self.clock()
            if waiting_since is not None and now >= waiting_since + self.wait_limit:
                with contextlib.suppress(Unavailable):
                    claim, answer = await shared.claim(key, self.wait_limit, True)  # (published just before the lock went)
                    if answer is not None:
                        return answer, "replayed" if claim == "replayed" else "coalesced"
                    if claim == "taken":  # the holder vanished without an answer: as above
                        lead.shared, lead.locked = shared, True
                        return None
                raise Contended()
            if waiting_since is None and now >= give_up:
                self._alone()
                return None
            deadline = give_up if waiting_since is None else waiting_since + self.wait_limit
            if await shared.wait_up(min(1.0, max(POLL_SECONDS, deadline - now))):  # (while down: waits for it)
                await asyncio.sleep(POLL_SECONDS)
        raise Contended()  # pragma: no cover - the deadlines end the loop first

    def _alone(self) -> None:
        """A redemption goes without the other replicas' word: Redis stayed unreachable. Counted, and said
        in the log at most once a minute."""
        self.metrics.shield_uncoordinated.inc()
        now = self.clock()
        if now - self._alone_said >= 60.0:
            self._alone_said = now
            event(log, logging.WARNING, f"Redis stayed unreachable for {self.shared.redis_wait if self.shared else 0:g}s: "
                  "refresh token redemptions go from this replica alone, as without the sidecar (a token redeemed "
                  "by two replicas at once is not coalesced until Redis is back)", event="shield_uncoordinated")

    def _shielded(self, answer: Answer, how: How) -> tuple[Answer, How]:
        self.metrics.shield_answers.labels(how).inc()
        return replace(answer, finished=time.time()), how

    # -- the replayable answers, in memory --------------------------------------------------------
    def _replayable(self, key: bytes) -> Answer | None:
        if self.window <= 0:
            return None
        entry = self._answers.get(key)
        if entry is None:
            return None
        if self.clock() >= entry[0]:
            self._drop(key)
            return None
        return entry[1]

    def _keep(self, key: bytes, answer: Answer) -> None:
        if self.window <= 0 or len(answer.body) > self.max_bytes:
            return
        self._drop(key)
        self._answers[key] = (self.clock() + self.window, answer)
        self._bytes += len(answer.body)
        now = self.clock()
        while self._answers and (len(self._answers) > self.max_answers or self._bytes > self.max_bytes
                                 or next(iter(self._answers.values()))[0] <= now):
            self._drop(next(iter(self._answers)))

    def _drop(self, key: bytes) -> None:
        entry = self._answers.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1].body)
