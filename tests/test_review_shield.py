"""Review findings on the rotation shield (sidecar/shield.py, its wiring in sidecar/service.py): found by
an independent review of the data path; each test failed before its fix. Real sidecars, a real
redis-server, the simulated pair and Salesforce; loopback only."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import requests

from sidecar.messages import Answer
from sidecar.metrics import Metrics
from sidecar.shared import SharedState
from sidecar.shield import Shield, request_key
from tests.harness import SidecarProcess, World, redeem, wait_until
from tests.test_shield import REDIS_KEY, RedisServer, redis_server  # noqa: F401 - the fixture

SLOW = 4.0  # seconds the fake Salesforce takes for every answer


def test_a_leader_slowed_by_the_ip_restricted_retry_keeps_its_lock_and_the_token_is_redeemed_once(
    make_world: Callable[..., World], make_sidecar_proc: Callable[..., SidecarProcess],
    redis_server: Callable[[], RedisServer],  # noqa: F811
) -> None:
    """Was: the shield's Redis lock lives ``connect + response timeout + 1 s``, but a leader may legitimately
    take longer: failover over members and, in enforce mode, the one retry of an "ip restricted" refusal
    (two whole sends). When the lock expired under a leader still in flight, a waiting replica took the
    lock and sent the same refresh token again (and a waiter that could not get the lock sent anyway):
    Salesforce saw the token twice and that caller got ``invalid_grant`` instead of the rotated token.

    Salesforce allows only 127.0.0.3 and answers in 4 s; sidecar A's first choice is 127.0.0.2 (refused,
    then retried through 127.0.0.3: ~8 s), B gets the identical redemption 1 s after A."""
    world = make_world(allowlist=("127.0.0.3",))
    env = {**world.pair_env(), "SIDECAR_REDIS_URL": redis_server().url, "SIDECAR_REDIS_KEY": REDIS_KEY,
           "SIDECAR_CONNECT_TIMEOUT": "1", "SIDECAR_RESPONSE_TIMEOUT": "6"}
    a, b = make_sidecar_proc(env, name="a"), make_sidecar_proc(env, name="b")
    assert wait_until(a.egress_discovered, timeout=10) and wait_until(b.egress_discovered, timeout=10)
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

    def usable(self) -> bool:
        return True

    async def replay(self, key: bytes) -> None:
        return None

    async def lock(self, key: bytes, ttl: float) -> bool:
        return False

    async def locked(self, key: bytes) -> bool:
        return True

    async def done(self, key: bytes) -> None:
        return None

    async def publish(self, *args: object) -> None:
        raise AssertionError("nothing was sent, nothing to publish")

    async def unlock(self, key: bytes) -> None:
        raise AssertionError("never locked")


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

    asyncio.run(run())
    assert sent == [], "the redemption was sent while another replica held its lock"


def test_a_waiting_replica_gets_the_answer_in_flight_not_an_earlier_one(
    redis_server: Callable[[], RedisServer],  # noqa: F811
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
    redis_server: Callable[[], RedisServer],  # noqa: F811
) -> None:
    """Was: an answer shared through Redis lost its "local" mark (the sidecar's own answer, not
    Salesforce's), so the replica that coalesced on the sidecar's own 502 (Salesforce did not answer in
    time) recorded it as Salesforce's: outcome ``server_error``, the outcome the Salesforce-side alerts
    count, instead of ``upstream_error``."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    env = {**world.pair_env(), "SIDECAR_REDIS_URL": redis_server().url, "SIDECAR_REDIS_KEY": REDIS_KEY,
           "SIDECAR_RESPONSE_TIMEOUT": "2"}
    a, b = make_sidecar_proc(env, name="a"), make_sidecar_proc(env, name="b")
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
