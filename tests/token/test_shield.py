"""The rotation shield: one redemption per refresh token, its answer given to every identical caller,
within one sidecar and across sidecars that share a real redis-server. Loopback only; the tests start
and stop their Redis."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from sidecar.metrics import Metrics
from sidecar.state.redis import SharedState
from sidecar.token.messages import Answer
from sidecar.token.shield import Contended, Shield, Unavailable, request_key
from tests.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN_URL,
    SidecarProcess,
    World,
    iter_written_files,
    metric_value,
    redeem,
    wait_until,
)
from tests.redis_proxy import RedisProxy
from tests.redis_server import REDIS_KEY, RedisServer, redis_dump, settled

BOTH = ["127.0.0.2", "127.0.0.3"]


# -- the shield on its own: plain code, a fake clock ---------------------------------------------------
class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def answer(status: int = 200, token: str = "RT2") -> Answer:
    return Answer(status, [(b"Content-Type", b"application/json")], json.dumps({"refresh_token": token}).encode())


def test_identical_redemptions_in_flight_share_one_send_and_its_answer() -> None:
    async def run() -> tuple[list[str], int]:
        shield = Shield(Metrics(), 60, 5)
        sent = 0
        gate = asyncio.Event()

        async def send() -> Answer:
            nonlocal sent
            sent += 1
            await gate.wait()
            return answer()

        key = request_key(b"k" * 32, {"grant_type": ["refresh_token"], "refresh_token": ["RT1"]}, None)
        tasks = [asyncio.create_task(shield.redeem(key, send)) for _ in range(6)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert {a.body for a, _ in results} == {answer().body}
        return sorted(how for _, how in results), sent

    hows, sent = asyncio.run(run())
    assert sent == 1 and hows == ["coalesced"] * 5 + ["sent"]


def test_replay_only_of_successes_only_within_the_window_and_bounded() -> None:
    async def run() -> None:
        clock = Clock()
        shield = Shield(Metrics(), 30, 5, clock=clock, max_answers=2)
        calls: list[int] = []

        def sender(status: int) -> Callable[[], asyncio.Future[Answer]]:
            async def send() -> Answer:
                calls.append(status)
                return answer(status)
            return send  # type: ignore[return-value]

        k1, k2, k3, bad = (bytes([i]) * 16 for i in range(4))
        assert (await shield.redeem(k1, sender(200)))[1] == "sent"
        assert (await shield.redeem(k1, sender(200)))[1] == "replayed"
        assert (await shield.redeem(bad, sender(400)))[1] == "sent"
        assert (await shield.redeem(bad, sender(400)))[1] == "sent"  # a failure is never replayed
        clock.now += 31
        assert (await shield.redeem(k1, sender(200)))[1] == "sent"  # expired
        await shield.redeem(k2, sender(200))
        await shield.redeem(k3, sender(200))
        assert shield.cached == 2  # bounded: the oldest went
        assert (await shield.redeem(k1, sender(200)))[1] == "sent"
        off = Shield(Metrics(), 0, 5)
        await off.redeem(k1, sender(200))
        assert (await off.redeem(k1, sender(200)))[1] == "sent" and off.cached == 0  # window 0: no replay

    asyncio.run(run())


def test_a_failure_of_the_leader_reaches_every_waiter() -> None:
    async def run() -> list[BaseException | tuple[Answer, str]]:
        shield = Shield(Metrics(), 60, 5)

        async def send() -> Answer:
            await asyncio.sleep(0.05)
            raise ConnectionError("boom")

        return await asyncio.gather(*(shield.redeem(b"k" * 16, send) for _ in range(3)), return_exceptions=True)

    assert [type(r) for r in asyncio.run(run())] == [ConnectionError] * 3


def test_the_key_separates_callers_without_the_same_credentials() -> None:
    k = b"k" * 32
    base = {"grant_type": ["refresh_token"], "refresh_token": ["RT1"], "client_id": ["app"]}
    one = request_key(k, {**base, "client_secret": ["s1"]}, None)
    assert one == request_key(k, {"client_secret": ["s1"], **base}, None)  # field order does not matter
    assert one != request_key(k, {**base, "client_secret": ["s2"]}, None)
    assert request_key(k, base, "Basic YXBwOnMx") != request_key(k, base, "Basic YXBwOnMy")
    assert one != request_key(b"j" * 32, {**base, "client_secret": ["s1"]}, None)
    login = request_key(k, base, None, "login.salesforce.com")
    assert login == request_key(k, base, None, "LOGIN.salesforce.com.")  # one host, however it is written
    assert login != request_key(k, base, None, "test.salesforce.com")  # login and sandbox: two redemptions


def test_the_key_is_stable_across_versions() -> None:
    """Replicas of two versions share Redis during a rolling update: the key must not change with the code.
    The expected value is the HMAC-SHA256 (truncated to 16 bytes) of the documented layout."""
    fields = {"refresh_token": ["RT1"], "grant_type": ["refresh_token"], "client_id": ["a", "b"]}
    layout = (b"egress-sidecar shield" + b"\0h" + b"login.salesforce.com" + b"\0fclient_id\0a" + b"\0fclient_id\0b"
              + b"\0fgrant_type\0refresh_token" + b"\0frefresh_token\0RT1" + b"\0aBasic eA==")
    expected = hmac.new(b"k" * 32, layout, hashlib.sha256).digest()[:16]
    assert request_key(b"k" * 32, fields, "Basic eA==", "Login.Salesforce.com.") == expected
    assert expected.hex() == "6fa17b3ab6c85c809a3cf36c46cdab1a"


# -- end to end ------------------------------------------------------------------------------------------
def concurrent_redemptions(sidecars: list[SidecarProcess], token: str, n: int) -> list[requests.Response]:
    """``n`` redemptions of one refresh token released at once, spread over ``sidecars``."""
    barrier = threading.Barrier(n)
    out: list[requests.Response | BaseException] = [RuntimeError("not run")] * n

    def worker(i: int) -> None:
        with sidecars[i % len(sidecars)].session() as s:
            try:
                barrier.wait(10)
                out[i] = redeem(s, token)
            except BaseException as exc:  # noqa: BLE001 - reported below
                out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, requests.Response) for r in out), out
    return out  # type: ignore[return-value]


def redemptions_of(world: World, token: str) -> int:
    return sum(1 for r in world.salesforce.seen if r.grant_type == "refresh_token" and token.encode() in r.body)


def test_six_concurrent_redemptions_then_one_more_get_the_same_rotated_token(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(BOTH)
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": ",".join(BOTH)})
    token = world.salesforce.issue_refresh_token()
    answers = concurrent_redemptions([sc], token, 6)
    time.sleep(1.0)
    with sc.session() as s:
        answers.append(redeem(s, token))
    assert [r.status_code for r in answers] == [200] * 7, [r.text for r in answers]
    rotated = {r.json()["refresh_token"] for r in answers}
    assert len(rotated) == 1 and world.salesforce.refresh_token_valid(rotated.pop())
    assert redemptions_of(world, token) == 1  # Salesforce saw exactly one
    text = sc.metrics()
    coalesced = metric_value(text, "egress_sidecar_shield_answers_total", kind="coalesced")
    replayed = metric_value(text, "egress_sidecar_shield_answers_total", kind="replayed")
    assert coalesced + replayed == 6 and replayed >= 1
    assert metric_value(text, "egress_sidecar_refresh_token_reuse_total") == 0  # none of them was a reuse
    shields = Counter(c.get("shield") for c in sc.log_events())
    assert shields[None] == 1 and shields["coalesced"] + shields["replayed"] == 6
    status = sc.status()["shield"]
    assert status["coalesced"] + status["replayed"] == 6 and status["redis"] == {"configured": False}
    log = sc.log_text()
    assert token not in log and not [r.json()["access_token"] for r in answers if r.json()["access_token"] in log]


def test_two_sidecars_sharing_redis_redeem_a_token_once_for_everyone(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], redis_server: Callable[[], RedisServer]
) -> None:
    world.salesforce.set_allowlist(BOTH)
    url = redis_server().url
    env = {**world.pair_env(), "SIDECAR_ALLOWLIST": ",".join(BOTH), "SIDECAR_REDIS_URL": url,
           "SIDECAR_REDIS_KEY": REDIS_KEY}
    a, b = make_sidecar_proc(env, name="a"), make_sidecar_proc(env, name="b")
    token = world.salesforce.issue_refresh_token()
    answers = concurrent_redemptions([a, b], token, 6)
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    rotated = {r.json()["refresh_token"] for r in answers}
    assert len(rotated) == 1
    assert redemptions_of(world, token) == 1
    served = {name: sum(1 for c in sc.log_events() if c.get("shield")) for name, sc in (("a", a), ("b", b))}
    assert sum(served.values()) == 5
    assert all(metric_value(sc.metrics(), "egress_sidecar_redis_up") == 1 for sc in (a, b))
    assert a.status()["shield"]["redis"]["up"] is True
    # A redemption of the same token a second later, through the sidecar that did not send it: replayed.
    sender = a if not served["a"] else b
    other = b if sender is a else a
    with other.session() as s:
        again = redeem(s, token)
    assert again.status_code == 200 and again.json()["refresh_token"] in rotated
    assert redemptions_of(world, token) == 1
    # Nothing in Redis or on either disk is a raw token: answers are sealed, the rest are keyed hashes.
    secrets = {token, *rotated, *(r.json()["access_token"] for r in answers), CLIENT_SECRET}
    dumped = b"\n".join(redis_dump(url))
    assert dumped and not [t for t in secrets if t.encode() in dumped]
    for sc in (a, b):
        written = b"".join(p.read_bytes() for p in iter_written_files(sc.confdir))
        assert not [t for t in secrets if t.encode() in written]
        assert REDIS_KEY not in sc.log_text()


def test_a_reuse_through_another_replica_is_seen_through_redis(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], redis_server: Callable[[], RedisServer]
) -> None:
    """Replay off, so the second redemption of a rotated-away token reaches Salesforce (and fails):
    the replica that sees it knows the token was rotated away by the other one."""
    world.salesforce.set_allowlist(BOTH)
    env = {**world.pair_env(), "SIDECAR_ALLOWLIST": ",".join(BOTH), "SIDECAR_REDIS_URL": redis_server().url,
           "SIDECAR_REDIS_KEY": REDIS_KEY, "SIDECAR_REPLAY_WINDOW": "0"}
    a, b = make_sidecar_proc(env, name="a"), make_sidecar_proc(env, name="b")
    token = world.salesforce.issue_refresh_token()
    with a.session() as s:
        assert redeem(s, token).status_code == 200
    time.sleep(0.3)  # A's change reaches Redis off the request path
    with b.session() as s:
        stale = redeem(s, token)
    assert stale.status_code == 400 and stale.json()["error_description"] == "expired access/refresh token"
    assert wait_until(lambda: metric_value(b.metrics(), "egress_sidecar_refresh_token_reuse_total") == 1, timeout=5)
    assert "refresh token reuse" in b.log_text()


def test_with_redis_down_refreshes_wait_then_go_alone_and_other_grants_keep_working(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], redis_server: Callable[[], RedisServer]
) -> None:
    """With Redis gone a refresh waits for it (a restart is ridden out), then goes from this replica alone, as
    it would without the sidecar (never worse than the plain recipe), coalesced within the replica: three
    identical redemptions send one and all get its answer; other grants are not held up; the health check
    reports Redis down and back without any token call, and the uncoordinated send is counted."""
    world.salesforce.set_allowlist(BOTH)
    redis = redis_server()
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": ",".join(BOTH), "SIDECAR_REDIS_URL": redis.url,
                            "SIDECAR_REDIS_KEY": REDIS_KEY})
    token = world.salesforce.issue_refresh_token()
    with sc.session() as s:
        resp = redeem(s, token)
        assert resp.status_code == 200
        token = resp.json()["refresh_token"]
    # Its publication follows the answer: in Redis before Redis goes (a kill racing it is another test's).
    assert wait_until(lambda: not [k for k in redis_dump(redis.url) if k.startswith(b"egress-sidecar:lock:")], timeout=5)
    redis.kill()
    assert wait_until(lambda: metric_value(sc.metrics(), "egress_sidecar_redis_up") == 0, timeout=5)
    status = sc.status()
    assert status["shield"]["redis"]["up"] is False and status["verdict"]["level"] == "warning"
    assert any("Redis (SIDECAR_REDIS_URL) is unreachable" in line for line in status["verdict"]["lines"])
    world.salesforce.reset_seen()
    with sc.session() as s:
        code = s.post(TOKEN_URL, data={"grant_type": "authorization_code", "code": world.salesforce.issue_auth_code(),
                                       "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, timeout=15)
        assert code.status_code == 200, code.text  # not a refresh: not shielded, not held up
        answers = concurrent_redemptions([sc], token, 3)
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert len({r.json()["refresh_token"] for r in answers}) == 1  # one redemption, its answer for all three
    assert len([r for r in world.salesforce.seen if r.grant_type == "refresh_token"]) == 1
    assert metric_value(sc.metrics(), "egress_sidecar_shield_uncoordinated_total") == 1
    redis.restart()
    assert wait_until(lambda: metric_value(sc.metrics(), "egress_sidecar_redis_up") == 1, timeout=5)
    assert sc.status()["shield"]["redis"]["up"] is True
    log = sc.log_text()
    assert log.count("Redis is unreachable") == 1 and log.count("Redis is reachable again") == 1  # said once each


def _callers(sidecars: list[SidecarProcess], token: str, n: int) -> tuple[threading.Thread, list[requests.Response]]:
    """``n`` identical redemptions spread over ``sidecars``, running in the background."""
    out: list[requests.Response] = []
    runner = threading.Thread(target=lambda: out.extend(concurrent_redemptions(sidecars, token, n)))
    runner.start()
    return runner, out


def test_a_redis_killed_and_restarted_mid_run_leaves_every_caller_of_one_refresh_token_with_the_same_answer(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], redis_server: Callable[[], RedisServer]
) -> None:
    """Issue 24's done-when, on two real replicas and one real redis-server without persistence:
    1. a redemption in flight on one replica when Redis dies and comes back empty (its lock gone): the
       callers waiting on the other replica never send; the holder puts its lock back, then its answer;
    2. callers on both replicas arriving while Redis is down: they wait, then one redemption for all;
    3. Redis restarted again, empty: the answer is replayed to a later caller on the replica that did not
       send it (the sender publishes it again), instead of the token going to Salesforce a second time.
    Was: a stale pooled connection failed once, the replica ignored Redis for 5 s and sent the same
    redemption again; the other replica's caller got 400 "expired access/refresh token"."""
    world.salesforce.set_allowlist(BOTH)
    redis = redis_server()
    env = {**world.pair_env(), "SIDECAR_ALLOWLIST": ",".join(BOTH), "SIDECAR_REDIS_URL": redis.url,
           "SIDECAR_REDIS_KEY": REDIS_KEY}
    a, b = make_sidecar_proc(env, name="a"), make_sidecar_proc(env, name="b")
    assert wait_until(a.egress_discovered, timeout=10) and wait_until(b.egress_discovered, timeout=10)

    def redis_up_on_both(value: int) -> bool:
        return all(metric_value(sc.metrics(), "egress_sidecar_redis_up") == value for sc in (a, b))

    first = world.salesforce.issue_refresh_token()
    world.salesforce.slow_seconds = 3.0  # the redemption is in flight while Redis goes and comes back
    world.salesforce.fail_mode = "slow"
    try:
        runner, answers = _callers([a, b], first, 6)
        time.sleep(1.0)
        redis.kill()
        time.sleep(0.5)
        redis.restart()
        runner.join(40)
    finally:
        world.salesforce.fail_mode = None
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    assert len({r.json()["refresh_token"] for r in answers}) == 1 and redemptions_of(world, first) == 1

    second = world.salesforce.issue_refresh_token()
    redis.kill()
    assert wait_until(lambda: redis_up_on_both(0), timeout=5)
    runner, answers = _callers([a, b], second, 6)
    time.sleep(1.0)  # every caller is waiting for Redis
    redis.restart()
    runner.join(40)
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    rotated = {r.json()["refresh_token"] for r in answers}
    assert len(rotated) == 1 and redemptions_of(world, second) == 1

    redis.kill()
    redis.restart()
    assert wait_until(lambda: redis_up_on_both(1), timeout=5)
    sender = a if any(c.get("shield") is None and c["outcome"] == "success" and c["grant_type"] == "refresh_token"
                      for c in a.log_events()[-6:]) else b
    other = b if sender is a else a
    with other.session() as s:
        again = redeem(s, second)
    assert again.status_code == 200 and again.json()["refresh_token"] in rotated, again.text
    assert redemptions_of(world, second) == 1
    for sc in (a, b):
        assert "Traceback" not in sc.log_text()


# -- found by independent reviews of this module; each test failed before its fix --------------------
SLOW = 4.0  # seconds the fake Salesforce takes for every answer


def test_a_leader_slowed_by_the_ip_restricted_retry_keeps_its_lock_and_the_token_is_redeemed_once(
    make_world: Callable[..., World], make_sidecar_proc: Callable[..., SidecarProcess],
    redis_server: Callable[[], RedisServer],
) -> None:
    """Was: the shield's Redis lock lives ``connect + response timeout + 1 s``, but a leader may legitimately
    take longer: failover over members and, in enforce mode, the one retry of an "ip restricted" refusal
    (two whole sends). When the lock expired under a leader still in flight, a waiting replica took the
    lock and sent the same refresh token again (and a waiter that could not get the lock sent anyway):
    Salesforce saw the token twice and that caller got ``invalid_grant`` instead of the rotated token.

    Salesforce allows only 127.0.0.3 and answers in 4 s; sidecar A's first choice is 127.0.0.2 (refused,
    then retried through 127.0.0.3: ~8 s), B gets the identical redemption 1 s after A."""
    world = make_world(allowlist=("127.0.0.3",))
    url = redis_server().url
    env = {**world.pair_env(), "SIDECAR_REDIS_URL": url, "SIDECAR_REDIS_KEY": REDIS_KEY,
           "SIDECAR_CONNECT_TIMEOUT": "1", "SIDECAR_RESPONSE_TIMEOUT": "6"}
    a, b = make_sidecar_proc(env, name="a"), make_sidecar_proc(env, name="b")
    assert wait_until(a.egress_discovered, timeout=10) and wait_until(b.egress_discovered, timeout=10)
    assert settled(url)  # A's lock is granted at once, so A leads
    token = world.salesforce.issue_refresh_token()
    world.salesforce.slow_seconds = SLOW
    world.salesforce.fail_mode = "slow"
    out: dict[str, requests.Response | BaseException] = {}

    def call(name: str, sc: SidecarProcess) -> None:
        with sc.session() as s:
            try:
                out[name] = redeem(s, token)
            except BaseException as exc:  # noqa: BLE001 - reported below
                out[name] = exc

    first = threading.Thread(target=call, args=("a", a))
    second = threading.Thread(target=call, args=("b", b))
    try:
        first.start()
        time.sleep(1.0)  # A holds the lock and is sending
        second.start()
        first.join(40)
        second.join(40)
    finally:
        world.salesforce.fail_mode = None
    got = {name: (r.status_code, r.json().get("refresh_token")) if isinstance(r, requests.Response) else r
           for name, r in out.items()}
    assert isinstance(out.get("a"), requests.Response) and got["a"][0] == 200, got
    sent_for_token = [r for r in world.salesforce.seen if r.grant_type == "refresh_token" and token.encode() in r.body]
    # A: one refusal through 127.0.0.2, one redemption through 127.0.0.3; B must send nothing.
    assert len(sent_for_token) == 2, [(r.source_ip, r.status) for r in sent_for_token]
    assert got["b"] == got["a"], got  # B gets A's answer, the rotated token included


class _AlwaysLocked:
    """Shared state in which another replica holds the lock for good and never publishes an answer."""

    redis_wait = 0.1

    async def wait_up(self, timeout: float) -> bool:
        return True

    async def claim(self, key: bytes, ttl: float, waiting: bool = False) -> tuple[str, None]:
        return "held", None

    def publish_soon(self, *args: object) -> None:
        raise AssertionError("nothing was sent, nothing to publish")


def test_a_waiter_that_never_gets_the_lock_does_not_send() -> None:
    """Was: after waiting its longest, a replica that still could not take the lock sent the redemption
    anyway, while the replica holding the lock may be sending the very same refresh token."""
    sent: list[int] = []

    async def send() -> Answer:
        sent.append(1)
        return Answer(200, [], b"{}")

    async def run() -> object:
        shield = Shield(Metrics(), 60, 0.1, _AlwaysLocked())  # type: ignore[arg-type]
        try:
            return await shield.redeem(b"k" * 16, send)
        except Exception as exc:  # noqa: BLE001 - the shield may refuse; it must not send
            return exc

    assert isinstance(asyncio.run(run()), Contended)  # 503 redemption_in_flight
    assert sent == [], "the redemption was sent while another replica held its lock"


def test_a_waiting_replica_gets_the_answer_in_flight_not_an_earlier_one(
    redis_server: Callable[[], RedisServer],
) -> None:
    """Was: the answer a redemption publishes for the replicas waiting on it (``done``) outlives the
    redemption by the longest one may take, and a waiter looks for it first: a redemption that failed
    (here a 502) and was sent again at once left its failure behind, and a replica waiting on the second
    redemption was handed the first one's failure at once instead of the answer in flight (the rotated
    token). Two shields on a real redis-server, as two replicas."""
    url = redis_server().url
    key = request_key(bytes.fromhex(REDIS_KEY), {"grant_type": ["refresh_token"], "refresh_token": ["RT1"]}, None)

    async def run() -> tuple[Answer, str]:
        replicas = [SharedState(url, bytes.fromhex(REDIS_KEY), Metrics()) for _ in range(2)]
        for shared in replicas:
            await shared.start()
        a, b = (Shield(Metrics(), 60, 5.0, shared) for shared in replicas)
        gate = asyncio.Event()

        async def failed() -> Answer:
            return Answer(502, [], b'{"error":"upstream_failed_after_send"}')

        async def rotated() -> Answer:
            await gate.wait()
            return Answer(200, [], b'{"refresh_token":"RT2"}')

        async def never() -> Answer:
            raise AssertionError("the waiting replica sent the redemption")

        try:
            await a.redeem(key, failed)  # the first redemption fails; its answer is published
            leader = asyncio.create_task(a.redeem(key, rotated))  # sent again, in flight
            await asyncio.sleep(0.2)
            waiter = asyncio.create_task(b.redeem(key, never))
            await asyncio.sleep(0.5)
            gate.set()
            await leader
            return await asyncio.wait_for(waiter, 10)
        finally:
            for shared in replicas:
                await shared.close()

    answer, how = asyncio.run(run())
    assert (answer.status, answer.body, how) == (200, b'{"refresh_token":"RT2"}', "coalesced"), (answer, how)


def test_a_replica_that_coalesced_on_the_sidecars_own_answer_records_it_as_such(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess],
    redis_server: Callable[[], RedisServer],
) -> None:
    """Was: an answer shared through Redis lost its "local" mark (the sidecar's own answer, not
    Salesforce's), so the replica that coalesced on the sidecar's own 502 (Salesforce did not answer in
    time) recorded it as Salesforce's: outcome ``server_error``, the outcome the Salesforce-side alerts
    count, instead of ``upstream_error``."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    url = redis_server().url
    env = {**world.pair_env(), "SIDECAR_REDIS_URL": url, "SIDECAR_REDIS_KEY": REDIS_KEY,
           "SIDECAR_RESPONSE_TIMEOUT": "2"}
    a, b = make_sidecar_proc(env, name="a"), make_sidecar_proc(env, name="b")
    assert settled(url)  # A's lock is granted at once, so A leads
    token = world.salesforce.issue_refresh_token()
    world.salesforce.slow_seconds = 4.0  # past the response deadline
    world.salesforce.fail_mode = "slow"
    statuses: dict[str, int] = {}

    def call(name: str, sc: SidecarProcess) -> None:
        with sc.session() as s:
            statuses[name] = redeem(s, token).status_code

    threads = [threading.Thread(target=call, args=("a", a)), threading.Thread(target=call, args=("b", b))]
    try:
        threads[0].start()
        time.sleep(0.5)  # A holds the lock and waits for Salesforce
        threads[1].start()
        for t in threads:
            t.join(30)
    finally:
        world.salesforce.fail_mode = None
    assert statuses == {"a": 502, "b": 502}, statuses
    (leader,), (waiter,) = a.log_events(), b.log_events()
    assert waiter.get("shield") == "coalesced", waiter
    assert (leader["outcome"], waiter["outcome"]) == ("upstream_error", "upstream_error"), (leader, waiter)


class _Down:
    """Shared state that cannot be reached, for as long as the test runs."""

    redis_wait = 0.3

    async def wait_up(self, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False

    async def claim(self, *args: object) -> None:
        raise Unavailable()

    def publish_soon(self, *args: object) -> None:
        raise AssertionError("went alone: nothing to publish")


def test_without_redis_a_redemption_waits_for_it_then_goes_alone_once() -> None:
    """Redis unreachable past the wait: the redemption is sent by this replica alone (as without the
    sidecar), once for all its identical callers, and counted."""
    sent: list[int] = []

    async def send() -> Answer:
        sent.append(1)
        return Answer(200, [], b"{}")

    async def run() -> tuple[list[object], Metrics]:
        metrics = Metrics()
        shield = Shield(metrics, 60, 5.0, _Down())  # type: ignore[arg-type]
        return list(await asyncio.gather(*(shield.redeem(b"k" * 16, send) for _ in range(3)))), metrics

    results, metrics = asyncio.run(run())
    assert [how for _, how in results] == ["sent", "coalesced", "coalesced"]  # type: ignore[misc]
    assert sent == [1]
    assert metric_value(metrics.render().decode(), "egress_sidecar_shield_uncoordinated_total") == 1


# -- Redis off the critical path (issue 22 item 4) ---------------------------------------------------------
@pytest.mark.parametrize("window", [60.0, 0.0])
def test_a_redemption_with_nothing_to_coalesce_makes_one_redis_round_trip_before_its_answer(
    redis_server: Callable[[], RedisServer], window: float,
) -> None:
    """Was: four round trips on the critical path (look for a replayable answer, take the lock, then
    after Salesforce's answer publish it and let go of the lock): 0.82 s per redemption with Redis 0.2 s
    away. Now one before the send (the answer, or the lock: one script) and one after the answer has been
    handed over (publish and let go, at once). Counted by a proxy in front of a real redis-server; the
    replica's health check is held off (an hour), so every round trip seen is the redemption's."""
    redis = redis_server()
    key = request_key(bytes.fromhex(REDIS_KEY), {"grant_type": ["refresh_token"], "refresh_token": ["RT1"]}, None)

    async def run(proxy: RedisProxy) -> tuple[int, int, int, object, int]:
        shared = SharedState(proxy.url, bytes.fromhex(REDIS_KEY), Metrics(), health_seconds=3600, restart_grace=0.0)
        other = SharedState(redis.url, bytes.fromhex(REDIS_KEY), Metrics(), health_seconds=3600, restart_grace=0.0)
        await shared.start()
        await other.start()
        try:
            shield = Shield(Metrics(), window, 5.0, shared)
            mark = proxy.mark()
            at_send: list[int] = []

            async def send() -> Answer:
                at_send.append(len(proxy.since(mark)))
                return Answer(200, [], b'{"refresh_token":"RT2"}')

            assert (await shield.redeem(key, send))[1] == "sent"
            answered = len(proxy.since(mark))  # the answer goes to the client now
            if shared._writes:  # the publication, after the answer
                await asyncio.wait(list(shared._writes), timeout=5)
            after = len(proxy.since(mark))
            assert other._client is not None
            lock = await other._client.get(other._name("lock", key))
            replayable = await other._client.exists(other._name("replay", key))
            return at_send[0], answered, after, lock, replayable
        finally:
            await shared.close()
            await other.close()

    with RedisProxy(redis.port) as proxy:
        at_send, answered, after, lock, replayable = asyncio.run(run(proxy))
    assert (at_send, answered) == (1, 1)  # the lock was held before the send; nothing more before the answer
    assert after == 2 and lock is None  # published and let go, in one round trip
    assert replayable == (1 if window else 0)


def test_the_client_gets_its_answer_before_the_shield_publishes_it(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], redis_server: Callable[[], RedisServer],
) -> None:
    """The answer first: a real sidecar whose Redis is 0.15 s away (a proxy that holds every command that
    long) hands the rotated token to the app, and only then does its publication (and the release of
    the lock) reach Redis. Before the answer, exactly one of the shield's round trips reached Redis (the
    lock and the look for an answer, in one). Was: four, the last two between Salesforce's answer and the
    app (two of them name the lock, as counted here)."""
    world.salesforce.set_allowlist(BOTH)
    redis = redis_server()
    # (not slower: a new connection's handshake is 4 round trips, within the 1.5 s a Redis call may take)
    with RedisProxy(redis.port, delay=0.15) as proxy:
        sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": ",".join(BOTH), "SIDECAR_REDIS_URL": proxy.url,
                                "SIDECAR_REDIS_KEY": REDIS_KEY})
        assert settled(redis.url)
        token = world.salesforce.issue_refresh_token()
        mark = proxy.mark()
        with sc.session() as s:
            resp = redeem(s, token)
        answered = time.monotonic()
        assert resp.status_code == 200, resp.text
        shield_turns = lambda: proxy.since(mark, b"egress-sidecar:lock:")  # noqa: E731 - the shield's own
        before = [t for t in shield_turns() if 0 < t.forwarded < answered]  # reached Redis before the answer
        assert wait_until(lambda: len(shield_turns()) == 2 and shield_turns()[1].forwarded > 0, timeout=10), \
            shield_turns()
        publish = shield_turns()[1]
    assert len(before) == 1, [bytes(t.data[:80]) for t in before]
    assert publish.forwarded > answered  # it reached Redis after the app had its answer
    assert redemptions_of(world, token) == 1


def test_a_replica_waiting_while_the_answer_is_being_published_gets_it_and_never_sends(
    redis_server: Callable[[], RedisServer],
) -> None:
    """The rotation moment with the publication after the answer: replica A has its answer (the rotated
    token) and its client has it, but A's Redis is slow, so its lock is still held and nothing published
    yet. Replica B, waiting on that lock, keeps waiting, then gets A's answer (coalesced) and never
    redeems the refresh token itself."""
    redis = redis_server()
    key = request_key(bytes.fromhex(REDIS_KEY), {"grant_type": ["refresh_token"], "refresh_token": ["RT1"]}, None)

    async def run(proxy: RedisProxy) -> tuple[list[str], tuple[Answer, str]]:
        a_state = SharedState(proxy.url, bytes.fromhex(REDIS_KEY), Metrics(), health_seconds=3600, restart_grace=0.0)
        b_state = SharedState(redis.url, bytes.fromhex(REDIS_KEY), Metrics(), health_seconds=3600, restart_grace=0.0)
        await a_state.start()
        await b_state.start()
        events: list[str] = []
        gate = asyncio.Event()
        try:
            a, b = Shield(Metrics(), 60, 5.0, a_state), Shield(Metrics(), 60, 5.0, b_state)

            async def rotated() -> Answer:
                await gate.wait()
                return Answer(200, [], b'{"refresh_token":"RT2"}')

            async def never() -> Answer:
                events.append("b sent")
                return Answer(400, [], b'{"error":"invalid_grant"}')

            leader = asyncio.create_task(a.redeem(key, rotated))
            for _ in range(500):  # bounded: until A holds the lock (its Redis is slow: a loaded machine, slower)
                if a_state._held:
                    break
                await asyncio.sleep(0.02)
            assert a_state._held, "replica A never took the lock"
            waiter = asyncio.create_task(b.redeem(key, never))
            await asyncio.sleep(0.2)  # B found the lock held and waits
            gate.set()
            await leader
            events.append("a answered")
            got = await asyncio.wait_for(waiter, 10)
            events.append("b answered")
            return events, got
        finally:
            await a_state.close()
            await b_state.close()

    with RedisProxy(redis.port, delay=0.15) as proxy:
        events, (answer, how) = asyncio.run(run(proxy))
    assert events == ["a answered", "b answered"]  # B never sent
    assert (answer.body, how) == (b'{"refresh_token":"RT2"}', "coalesced")
