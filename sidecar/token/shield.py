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
replicas share them through Redis, encrypted (:mod:`sidecar.state.redis`), and a redemption is sent only
once this replica holds the Redis lock on it: while Redis cannot say that no other replica is redeeming
the same token, none is sent (:mod:`sidecar.state.redis` explains that trade-off).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Literal, Protocol

from sidecar.metrics import Metrics
from sidecar.token.messages import Answer

How = Literal["sent", "coalesced", "replayed"]
MAX_ANSWERS = 1000  # replayable answers kept in memory
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # and their bodies together
POLL_SECONDS = 0.025  # how often a waiter looks for another replica's answer
_CONTEXT = b"egress-sidecar shield"


class SharedAnswers(Protocol):
    """What the shield needs from shared state (sidecar.state.redis.SharedState); every call but
    ``wait_up`` may raise ``Unavailable``."""

    redis_wait: float  # how long a redemption waits for unreachable shared state before it is refused

    async def wait_up(self, timeout: float) -> bool: ...
    async def replay(self, key: bytes) -> Answer | None: ...
    async def lock(self, key: bytes, ttl: float) -> Literal["taken", "held", "young"]: ...
    async def done(self, key: bytes) -> Answer | None: ...
    async def publish(self, key: bytes, answer: Answer, replay_for: float, keep_for: float) -> None: ...
    async def unlock(self, key: bytes) -> None: ...


class Unavailable(Exception):
    """Shared state cannot be reached right now."""


class Contended(Exception):
    """Another replica still holds the lock on this redemption after the longest a redemption takes
    (it crashed and a third one took over, or clocks disagree): nothing was sent, and sending now could
    redeem the refresh token twice."""


class SharedStateDown(Exception):
    """Shared state (Redis) stayed unreachable for as long as a redemption waits for it: nothing was sent,
    since another replica could be redeeming the same refresh token."""


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

    @property
    def cached(self) -> int:
        return len(self._answers)

    async def redeem(self, key: bytes, send: Callable[[], Awaitable[Answer]]) -> tuple[Answer, How]:
        """``send()`` the redemption unless an identical one is in flight (wait for its answer) or
        succeeded within the window (its answer again)."""
        cached = self._replayable(key)
        if cached is not None:
            return self._shielded(cached, "replayed")
        leader = self._in_flight.get(key)
        if leader is not None:  # as long as the leader may take: waiting for Redis, for another replica, its send
            longest = (self.shared.redis_wait + self.wait_limit if self.shared is not None else 0.0) + self.wait_limit
            answer = await asyncio.wait_for(asyncio.shield(leader), longest)
            return self._shielded(answer, "coalesced")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            answer, how = await self._lead(key, send)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("the redemption was cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            self._in_flight.pop(key, None)
        future.set_result(answer)
        if how == "sent" and 200 <= answer.status < 300:
            self._keep(key, answer)
        return (answer, how) if how == "sent" else self._shielded(answer, how)

    async def _lead(self, key: bytes, send: Callable[[], Awaitable[Answer]]) -> tuple[Answer, How]:
        shared = self.shared
        if shared is None:
            return await send(), "sent"
        found = await self._claim(shared, key)
        if found is not None:
            return found
        answer = await send()
        ok = 200 <= answer.status < 300
        try:
            await shared.publish(key, answer, self.window if ok else 0.0, self.wait_limit)
            await shared.unlock(key)
        except Unavailable:
            pass  # kept, with the lock, and published when Redis is back (sidecar.state.redis)
        return answer, "sent"

    async def _claim(self, shared: SharedAnswers, key: bytes) -> tuple[Answer, How] | None:
        """Before a redemption is sent: None once this replica holds the lock on it, or the answer another
        replica has for it (replayed, or coalesced after waiting for the replica redeeming it). Raises
        SharedStateDown when Redis stays unreachable for ``redis_wait`` and no lock was seen; Contended
        when another replica's lock outlives the longest a redemption takes. Never returns None while
        Redis cannot say that no other replica is redeeming this token."""
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
                if claim == "taken":  # (also after the holder vanished without an answer: it crashed)
                    return None
                if claim == "held" and waiting_since is None:
                    waiting_since = self.clock()
            except Unavailable:
                pass  # never sent without Redis: wait for it (a replica waiting on a lock keeps waiting)
            now = self.clock()
            if waiting_since is not None and now >= waiting_since + self.wait_limit:
                with contextlib.suppress(Unavailable):
                    answer = await shared.done(key)  # (published just before the lock went)
                    if answer is not None:
                        return answer, "coalesced"
                raise Contended()
            if waiting_since is None and now >= give_up:
                raise SharedStateDown()
            deadline = give_up if waiting_since is None else waiting_since + self.wait_limit
            if await shared.wait_up(min(1.0, max(POLL_SECONDS, deadline - now))):  # (while down: waits for it)
                await asyncio.sleep(POLL_SECONDS)
        raise Contended()  # pragma: no cover - the deadlines end the loop first

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
