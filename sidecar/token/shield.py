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
MAX_ANSWERS = 1000  # replayable answers kept in memory
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # and their bodies together
POLL_SECONDS = 0.025  # how often a waiter looks for another replica's answer
_CONTEXT = b"egress-sidecar shield"
log = logging.getLogger("egress_sidecar.shield")


class SharedAnswers(Protocol):
    """What the shield needs from shared state (sidecar.state.redis.SharedState); every call but
    ``wait_up`` may raise ``Unavailable``."""

    redis_wait: float  # how long a redemption waits for unreachable shared state before it goes alone

    async def wait_up(self, timeout: float) -> bool: ...
    async def replay(self, key: bytes) -> Answer | None: ...
    async def lock(self, key: bytes, ttl: float) -> Literal["taken", "held", "young", "answered"]: ...
    async def done(self, key: bytes) -> Answer | None: ...
    async def publish(self, key: bytes, answer: Answer, replay_for: float, keep_for: float) -> None: ...
    async def unlock(self, key: bytes) -> None: ...


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
        await self.end(got, answer)
        return answer, "sent"

    async def begin(self, key: bytes) -> tuple[Answer, How] | Lead:
        """Before a redemption is sent: another's answer for it (replayed, or coalesced on one in flight,
        here or on another replica), or the :class:`Lead`: this call sends it, and every identical one
        waits for its :meth:`end` (or :meth:`abort`). Raises Contended when another replica holds the
        redemption past the longest one can take."""
        cached = self._replayable(key)
        if cached is not None:
            return self._shielded(cached, "replayed")
        leader = self._in_flight.get(key)
        if leader is not None:  # as long as the leader may take: waiting for Redis, for another replica, its send
            longest = (self.shared.redis_wait + self.wait_limit if self.shared is not None else 0.0) + self.wait_limit
            answer = await asyncio.wait_for(asyncio.shield(leader), longest)
            return self._shielded(answer, "coalesced")
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

    async def end(self, lead: Lead, answer: Answer) -> None:
        """The redemption this call led was answered: every waiter (here and, through Redis, on the other
        replicas) gets the answer, and a success is kept for replay."""
        shared = lead.shared
        if shared is not None:
            try:
                ok = 200 <= answer.status < 300
                await shared.publish(lead.key, answer, self.window if ok else 0.0, self.wait_limit)
                if lead.locked:
                    await shared.unlock(lead.key)
            except Unavailable:
                pass  # kept, with the lock, and published when Redis is back (sidecar.state.redis)
        self._settle(lead, answer)
        if 200 <= answer.status < 300:
            self._keep(lead.key, answer)

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
            try:
                if waiting_since is not None:
                    answer = await shared.done(key)
                    if answer is not None:
                        return answer, "coalesced"
                answer = await shared.replay(key)
                if answer is not None:
                    self._keep(key, answer)
                    return answer, "replayed"
                claim = await shared.lock(key, self.wait_limit)
                if claim == "answered":  # a replayable answer appeared since the look above: never a second redemption
                    answer = await shared.replay(key)
                    if answer is not None:
                        self._keep(key, answer)
                        return answer, "replayed"
                    continue
                if claim == "taken":  # (also after the holder vanished without an answer: it crashed)
                    lead.shared, lead.locked = shared, True
                    return None
                if claim == "held" and waiting_since is None:
                    waiting_since = self.clock()
            except Unavailable:
                pass  # Redis is being reconnected: wait for it (a replica waiting on a lock keeps waiting)
            now = self.clock()
            if waiting_since is not None and now >= waiting_since + self.wait_limit:
                with contextlib.suppress(Unavailable):
                    answer = await shared.done(key)  # (published just before the lock went)
                    if answer is not None:
                        return answer, "coalesced"
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
