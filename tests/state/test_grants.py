"""Refresh token hygiene at unit level: the tracker's decisions, its eviction rule and idle gauges
under an injected clock, the store (persistence, concurrency, a full queue, a bad file), the key,
the token route adapter and the ``grants`` command."""

from __future__ import annotations

import gzip as gzip_mod
import itertools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import cli
from sidecar.config import ConfigError
from sidecar.metrics import Metrics
from sidecar.state.expiry import parse_idle_policy
from sidecar.state.grants import (
    DAY,
    LIMITS,
    GrantTracker,
    Limits,
    Seen,
    format_report,
    grants_report,
    human_age,
)
from sidecar.state.sqlite import (
    DB_FILE,
    KEY_FILE,
    GrantStore,
    count_rows,
    load_or_create_key,
    read_grants,
    retired_rows,
    token_hash,
)
from sidecar.token.call import Identity, TokenCall
from sidecar.token.messages import Answer, TokenRequest
from tests.harness import metric_value

KEY = bytes(range(32))
T0 = 1_750_000_000.0
FORM = "application/x-www-form-urlencoded"


class Clock:
    """An injected clock: time passes only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tracker(tmp_path: Path | None = None, clock: Clock | None = None, limits: Limits = LIMITS,
            key: bytes = KEY) -> GrantTracker:
    t = GrantTracker(Metrics(), clock=clock or Clock(), limits=limits)
    t.open(key, GrantStore(tmp_path / DB_FILE) if tmp_path else None, background=False)
    return t


def metric(t: GrantTracker, name: str, **labels: str) -> float:
    return metric_value(t.metrics.render().decode(), name, **labels)


def redeem(t: GrantTracker, presented: str, issued: str | None) -> Seen:
    return t.observe("refresh_token", "success", presented, issued, status=200)


def expired(t: GrantTracker, presented: str) -> Seen:
    return t.observe("refresh_token", "invalid_grant", presented, None, status=400, sf_error="invalid_grant")


def reopen(t: GrantTracker, tmp_path: Path, clock: Clock | None = None, limits: Limits = LIMITS) -> GrantTracker:
    t.close()
    return tracker(tmp_path, clock, limits)


# -- rotation and reuse -------------------------------------------------------------------------
def test_a_client_that_persists_each_new_token_shows_rotations_and_no_reuse() -> None:
    t = tracker()
    seen = [redeem(t, f"tok{i}", f"tok{i + 1}") for i in range(5)]
    assert [s.kind for s in seen] == ["rotated"] * 5
    assert [s.new_grant for s in seen] == [True, False, False, False, False]
    assert len({s.grant_id for s in seen}) == 1  # one chain, one stable grant id
    assert seen[0].grant_id == token_hash(KEY, "tok0").hex()[:12]  # id: keyed hash of the FIRST token
    (grant,), retired = t.snapshot()
    assert grant.rotations == 5 and grant.reuses == 0
    assert grant.current == token_hash(KEY, "tok5")
    assert [r.token for r in retired] == [token_hash(KEY, "tok3"), token_hash(KEY, "tok4")]  # 2 kept per grant
    assert metric(t, "egress_sidecar_refresh_token_rotations_total", rotated="true") == 5
    assert metric(t, "egress_sidecar_refresh_token_rotations_total", rotated="false") == 0
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 0
    assert metric(t, "egress_sidecar_grants_tracked") == 1


def test_a_client_that_keeps_its_first_token_counts_one_reuse_per_extra_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = tracker()
    first = redeem(t, "first-token-AAAAAAAAAAAA", "second-token-BBBBBBBBBBBB")
    with caplog.at_level(logging.WARNING, logger="egress_sidecar.grants"):
        again = [expired(t, "first-token-AAAAAAAAAAAA") for _ in range(3)]
    assert [s.kind for s in again] == ["reuse"] * 3
    assert {s.grant_id for s in again} == {first.grant_id}
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 3
    assert t.snapshot()[0][0].reuses == 3
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "refresh_token_reuse"]
    assert len(lines) == 3  # one warning line per attempt
    text = lines[0].getMessage()
    assert first.grant_id in text and "did not persist the new token" in text
    assert "400 invalid_grant (expired access/refresh token)" in text
    assert "save the refresh_token of every token response before anything else" in text
    assert "first-token" not in text and "second-token" not in text


def test_retrying_the_current_token_after_a_failure_is_not_reuse() -> None:
    t = tracker()
    redeem(t, "a", "b")
    for outcome in ("ip_restricted", "upstream_error", "blocked", "server_error"):
        assert t.observe("refresh_token", outcome, "b", None).kind == "not_redeemed"
    assert redeem(t, "b", "c").kind == "rotated"  # the failed calls consumed nothing
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 0
    assert t.snapshot()[0][0].rotations == 2


def test_an_unknown_token_that_fails_creates_nothing() -> None:
    t = tracker()
    assert expired(t, "never-seen").kind == "not_redeemed"
    assert t.snapshot() == ([], [])
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 0


def test_reuse_of_a_rotated_token_is_counted_whatever_ended_the_call() -> None:
    t = tracker()
    redeem(t, "a", "b")
    assert t.observe("refresh_token", "blocked", "a", None, status=503).kind == "reuse"
    assert t.observe("refresh_token", "ip_restricted", "a", None, status=400).kind == "reuse"
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 2


def test_no_rotation_is_counted_as_rotated_false() -> None:
    t = tracker()
    assert redeem(t, "a", None).kind == "not_rotated"
    assert redeem(t, "a", "a").kind == "not_rotated"  # the same token back is not a new one
    assert metric(t, "egress_sidecar_refresh_token_rotations_total", rotated="false") == 2
    (grant,), retired = t.snapshot()
    assert grant.rotations == 0 and grant.current == token_hash(KEY, "a") and retired == []


def test_salesforce_accepting_a_rotated_token_continues_the_chain_not_reuse() -> None:
    t = tracker()
    redeem(t, "a", "b")
    assert redeem(t, "a", "c").kind == "rotated"  # Salesforce decides; our view was behind
    (grant,), _ = t.snapshot()
    assert grant.current == token_hash(KEY, "c") and grant.rotations == 2
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 0
    assert t.snapshot()[0][0].key == token_hash(KEY, "a")


def test_a_grant_issued_by_the_web_server_flow_is_tracked_from_issue() -> None:
    clock = Clock()
    t = tracker(clock=clock)
    issued = t.observe("authorization_code", "success", None, "rt-1")
    assert issued.kind == "issued" and issued.new_grant
    clock.advance(60)
    assert redeem(t, "rt-1", "rt-2").grant_id == issued.grant_id
    assert metric(t, "egress_sidecar_refresh_token_rotations_total", rotated="true") == 1  # only redemptions
    assert t.observe("client_credentials", "success", None, None).kind == "ignored"
    assert t.observe("authorization_code", "invalid_grant", None, None).kind == "ignored"


def test_a_closed_or_unopened_tracker_ignores_calls() -> None:
    t = GrantTracker(Metrics())
    assert redeem(t, "a", "b").kind == "ignored"
    t = tracker()
    t.close()
    assert redeem(t, "a", "b").kind == "ignored"


# -- idle gauges and the eviction rule, with an injected clock --------------------------------------
def test_idle_gauges_move_when_the_clock_is_advanced() -> None:
    clock = Clock()
    t = tracker(clock=clock)
    for name in ("a", "b", "c"):
        redeem(t, f"{name}0", f"{name}1")

    def idle() -> dict[str, float]:
        t.update_gauges()
        return {w: metric(t, "egress_sidecar_grants_idle", window=w) for w in ("7d", "25d", "30d")}

    assert idle() == {"7d": 0, "25d": 0, "30d": 0}
    clock.advance(8 * DAY)
    assert idle() == {"7d": 3, "25d": 0, "30d": 0}
    redeem(t, "c1", "c2")  # a redemption resets c's idle time (sliding window)
    assert idle() == {"7d": 2, "25d": 0, "30d": 0}
    clock.advance(17 * DAY + 1)  # a, b: 25d + 1s; c: 17d + 1s
    assert idle() == {"7d": 3, "25d": 2, "30d": 0}
    clock.advance(5 * DAY)
    assert idle() == {"7d": 3, "25d": 2, "30d": 2}
    assert metric(t, "egress_sidecar_grants_tracked") == 3


def test_grants_idle_past_retention_and_old_rotated_hashes_are_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    t = tracker(tmp_path, clock)
    redeem(t, "a0", "a1")
    redeem(t, "b0", "b1")
    clock.advance(31 * DAY)
    redeem(t, "b1", "b2")
    t.maintain()
    # a0 was rotated away 31 days ago: past the 30 day TTL, no longer a reuse (Salesforce expired it anyway).
    assert expired(t, "a0").kind == "not_redeemed"
    assert expired(t, "b1").kind == "reuse"
    clock.advance(60 * DAY)  # a: 91 days idle (> 90 day retention); b: 60 days
    t.maintain()
    grants, _ = t.snapshot()
    assert [g.key for g in grants] == [token_hash(KEY, "b0")]
    assert t.store is not None and t.store.flush()
    assert count_rows(tmp_path / DB_FILE) == (1, 0)  # the same rule applied to the file
    t.close()


def test_at_most_max_grants_least_recently_redeemed_evicted_first(tmp_path: Path) -> None:
    clock = Clock()
    limits = Limits(max_grants=3)
    t = tracker(tmp_path, clock, limits)
    for name in ("a", "b", "c"):
        clock.advance(1)
        redeem(t, f"{name}0", f"{name}1")
    clock.advance(1)
    redeem(t, "a1", "a2")  # a is now the most recently redeemed
    clock.advance(1)
    redeem(t, "d0", "d1")  # evicts b, the least recently redeemed
    grants, retired = t.snapshot()
    assert [g.key for g in grants] == [token_hash(KEY, n) for n in ("c0", "a0", "d0")]
    assert token_hash(KEY, "b0") not in {r.token for r in retired}  # its hashes went with it
    t = reopen(t, tmp_path, clock, limits)
    assert [g.key for g in t.snapshot()[0]] == [token_hash(KEY, n) for n in ("c0", "a0", "d0")]
    assert count_rows(tmp_path / DB_FILE) == (3, 4)
    t.close()


def test_file_is_bounded_even_when_it_holds_more_than_memory(tmp_path: Path) -> None:
    """Changes can be dropped; the file is still pruned by the same rule at every maintenance."""
    clock = Clock()
    t = tracker(tmp_path, clock, Limits(max_grants=100))
    for i in range(20):
        clock.advance(1)
        redeem(t, f"g{i}-0", f"g{i}-1")
        redeem(t, f"g{i}-1", f"g{i}-2")
        redeem(t, f"g{i}-2", f"g{i}-3")
    t = reopen(t, tmp_path, clock, Limits(max_grants=5, retired_per_grant=1))
    assert t.store is not None and t.store.flush()
    assert count_rows(tmp_path / DB_FILE) == (5, 5)
    assert [g.key for g in t.snapshot()[0]] == [token_hash(KEY, f"g{i}-0") for i in range(15, 20)]
    t.close()


# -- persistence ---------------------------------------------------------------------------------
def test_state_survives_reopen_and_the_chain_continues(tmp_path: Path) -> None:
    clock = Clock()
    t = tracker(tmp_path, clock)
    gid = redeem(t, "x0", "x1").grant_id
    redeem(t, "x1", "x2")
    before = t.snapshot()
    t = reopen(t, tmp_path, clock)
    assert t.snapshot() == before
    assert metric(t, "egress_sidecar_grants_tracked") == 1
    assert expired(t, "x1").kind == "reuse"  # rotated away before the restart
    assert redeem(t, "x2", "x3").grant_id == gid
    t.close()


ORG_A, USER_A = "00D5e000000AbCdEAA", "0055e000001XyZwAAC"


def test_the_org_and_user_of_each_grant_follow_it_across_rotations_and_restarts_sealed(tmp_path: Path) -> None:
    """A successful answer's `id` names the grant's org and user: the tracker keeps them with the grant,
    finds them from any of its tokens (the guard routes by it before a redemption is sent), and writes them
    sealed, so the file names no customer."""
    from sidecar.token.call import Identity

    clock = Clock()
    t = tracker(tmp_path, clock)
    assert t.grant_of(token_hash(KEY, "o0")) is None  # never seen
    t.observe("refresh_token", "success", "o0", "o1", status=200)  # an answer without `id`: org unknown
    assert t.grant_of(token_hash(KEY, "o1")) == (token_hash(KEY, "o0"), None)
    who = Identity(ORG_A, USER_A)
    t.observe("refresh_token", "success", "o1", "o2", status=200, identity=who)
    t.observe("refresh_token", "success", "o2", "o3", status=200, identity=who)
    gkey = token_hash(KEY, "o0")
    assert t.grant_of(token_hash(KEY, "o3")) == (gkey, who)
    assert t.grant_of(token_hash(KEY, "o2")) == (gkey, who)  # a rotated-away token still names its grant
    t.observe("authorization_code", "success", None, "n1", status=200, identity=Identity("00D000000000001", "005000000000001"))
    assert t.grant_of(token_hash(KEY, "n1")) == (token_hash(KEY, "n1"), Identity("00D000000000001", "005000000000001"))
    assert t.store is not None and t.store.flush()
    t = reopen(t, tmp_path, clock)
    assert t.grant_of(token_hash(KEY, "o3")) == (gkey, who)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert ORG_A.encode() not in raw and USER_A.encode() not in raw and b"00D000000000001" not in raw
    t.close()
    other = tracker(tmp_path, clock, key=bytes(range(1, 33)))  # another key: the grants (and orgs) are gone
    assert other.grant_of(token_hash(bytes(range(1, 33)), "o3")) is None
    other.close()


def test_on_call_learns_the_org_from_the_answer() -> None:
    t = tracker()
    ok = json.dumps({"refresh_token": "RT-2", "id": f"https://login.salesforce.com/id/{ORG_A}/{USER_A}"}).encode()
    t.on_call(_call("refresh_token", "success"), *_flow(b"grant_type=refresh_token&refresh_token=RT-1", ok))
    grant = t.grant_of(token_hash(KEY, "RT-2"))
    assert grant is not None and grant[1] is not None and (grant[1].org, grant[1].user) == (ORG_A, USER_A)


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    path = tmp_path / KEY_FILE
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(tmp_path) == key
    os.chmod(path, 0o644)
    assert load_or_create_key(tmp_path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"SIDECAR_CONFDIR: .*grants.key.*Delete it"):
        load_or_create_key(tmp_path)


def test_a_different_key_starts_empty_instead_of_mismatching(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    redeem(t, "a", "b")
    t.close()
    t = tracker(tmp_path, key=b"\x01" * 32)
    assert t.snapshot() == ([], [])
    t.close()


def test_a_corrupt_file_is_moved_aside_and_tracking_starts_fresh(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not an SQLite database" * 200)
    t = tracker(tmp_path)
    redeem(t, "a", "b")
    t.close()
    assert len(read_grants(tmp_path / DB_FILE)) == 1
    assert len(list(tmp_path.glob(f"{DB_FILE}.corrupt-*"))) == 1


def test_file_is_wal_and_private(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    redeem(t, "a", "b")
    t.close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE((tmp_path / DB_FILE).stat().st_mode) == 0o600


def test_a_full_write_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    t = GrantTracker(Metrics(), clock=Clock())
    store = GrantStore(tmp_path / DB_FILE, queue_size=4, busy_timeout=30.0)
    t.open(KEY, store, background=False)
    assert store.flush()
    blocker = sqlite3.connect(tmp_path / DB_FILE, timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the disk "hangs": the writer waits for this lock
    slowest, n = 0.0, 0
    try:
        for n in range(1, 2001):  # bounded
            started = time.perf_counter()
            redeem(t, f"q{n}-0", f"q{n}-1")
            slowest = max(slowest, time.perf_counter() - started)
            if store.dropped >= 10:
                break
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.dropped >= 10, "the queue never filled"
    assert slowest < 0.25, f"an observation waited {slowest:.3f}s for the disk"
    assert metric(t, "egress_sidecar_grant_store_writes_dropped_total") == store.dropped
    assert len(t.snapshot()[0]) == n  # memory is right regardless
    t.close()
    assert count_rows(tmp_path / DB_FILE)[0] == n - store.dropped


# -- concurrency -----------------------------------------------------------------------------------
def _consistent(t: GrantTracker, per_grant: int = 2) -> None:
    grants, retired = t.snapshot()
    currents = [g.current for g in grants]
    assert len(set(currents)) == len(currents)
    keys = {g.key for g in grants}
    assert {r.grant for r in retired} <= keys
    assert not set(currents) & {r.token for r in retired}
    for k in keys:
        assert sum(1 for r in retired if r.grant == k) <= per_grant


def test_concurrent_redemptions_from_many_threads_leave_the_store_consistent(tmp_path: Path) -> None:
    ticks = itertools.count()
    clock = Clock()
    t = GrantTracker(Metrics(), clock=lambda: clock.now + next(ticks) * 0.001)
    t.open(KEY, GrantStore(tmp_path / DB_FILE), background=False)
    threads_n, per_thread = 8, 25
    start = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            start.wait(timeout=10)
            for j in range(per_thread):
                assert redeem(t, f"c{i}-{j}", f"c{i}-{j + 1}").kind == "rotated"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not errors and not any(w.is_alive() for w in workers)
    grants, retired = t.snapshot()
    assert len(grants) == threads_n and len(retired) == threads_n * 2
    assert {g.key: (g.current, g.rotations) for g in grants} == {
        token_hash(KEY, f"c{i}-0"): (token_hash(KEY, f"c{i}-{per_thread}"), per_thread) for i in range(threads_n)
    }
    assert metric(t, "egress_sidecar_refresh_token_rotations_total", rotated="true") == threads_n * per_thread
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 0
    _consistent(t)
    assert t.store is not None and t.store.dropped == 0
    before = t.snapshot()
    t = reopen(t, tmp_path)
    assert t.snapshot() == before  # the file holds exactly what memory held
    t.close()


def test_threads_racing_on_one_grant_count_exactly_the_stale_redemptions(tmp_path: Path) -> None:
    """8 workers × 25 share one grant and race to refresh it (the multi-worker form of the bug).
    A model Salesforce rotates under a lock; the tracker sees calls in Salesforce's order, as the
    proxy's event loop does. Every failed call presented a token rotated away 1..n rotations ago:
    reuse is counted for those still kept (the grant's last 2)."""
    t = tracker(tmp_path)
    wire = threading.Lock()
    chain = ["r0"]  # every token Salesforce issued, in order; the last is valid
    shared = {"token": "r0"}  # the app's token storage (written after a success)
    stale_kept = 0
    successes = 0
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        nonlocal stale_kept, successes
        start.wait(timeout=10)
        for j in range(25):
            presented = shared["token"]
            with wire:
                if presented == chain[-1]:
                    chain.append(f"r{len(chain)}")
                    seen = redeem(t, presented, chain[-1])
                    assert seen.kind == "rotated"
                    shared["token"] = chain[-1]
                    successes += 1
                else:
                    behind = len(chain) - 1 - chain.index(presented)
                    seen = expired(t, presented)
                    assert seen.kind == ("reuse" if behind <= 2 else "not_redeemed")
                    stale_kept += behind <= 2

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    (grant,), _ = t.snapshot()
    assert grant.rotations == successes == len(chain) - 1
    assert grant.reuses == stale_kept == metric(t, "egress_sidecar_refresh_token_reuse_total")
    assert successes + stale_kept <= 200
    _consistent(t)
    before = t.snapshot()
    t = reopen(t, tmp_path)
    assert t.snapshot() == before
    t.close()


_op = st.tuples(
    st.sampled_from(["redeem_current", "redeem_rotate", "reuse", "unknown", "advance", "maintain", "issue"]),
    st.integers(0, 5),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_op, max_size=60))
def test_any_sequence_keeps_the_invariants_and_the_file_equal_to_memory(tmp_path_factory: pytest.TempPathFactory,
                                                                       ops: list[tuple[str, int]]) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    clock = Clock()
    limits = Limits(max_grants=4, retired_per_grant=2)
    t = tracker(tmp, clock, limits)
    current: dict[int, str] = {}
    counter = itertools.count()
    for op, n in ops:
        if op == "redeem_rotate" or (op == "redeem_current" and n not in current):
            old = current.get(n, f"app{n}-{next(counter)}")
            current[n] = f"app{n}-{next(counter)}"
            redeem(t, old, current[n])
        elif op == "redeem_current":
            redeem(t, current[n], None)
        elif op == "reuse":
            expired(t, f"app{n}-{n}")
        elif op == "unknown":
            expired(t, f"nobody-{next(counter)}")
        elif op == "issue":
            current[n] = f"app{n}-{next(counter)}"
            t.observe("authorization_code", "success", None, current[n])
        elif op == "advance":
            clock.advance(n * 20 * DAY)
        else:
            t.maintain()
        _consistent(t)
        assert len(t.snapshot()[0]) <= limits.max_grants
    t.maintain()  # loading applies the age rule too
    before = t.snapshot()
    t = reopen(t, tmp, clock, limits)
    after = t.snapshot()
    t.close()
    assert {g.key: g for g in after[0]} == {g.key: g for g in before[0]}
    assert set(after[1]) == set(before[1])


# -- the token core's observer ------------------------------------------------------------------
def _flow(request_body: bytes, response_body: bytes | None, status: int = 200,
          gzip: bool = False) -> tuple[TokenRequest, Answer | None]:
    req = TokenRequest("login.salesforce.com", 443, "POST", b"/services/oauth2/token",
                       [(b"Content-Type", FORM.encode())], request_body)
    if response_body is None:
        return req, None
    headers = [(b"Content-Type", b"application/json")]
    if gzip:
        response_body = gzip_mod.compress(response_body)
        headers.append((b"Content-Encoding", b"gzip"))
    return req, Answer(status, headers, response_body)


def _call(grant: str, outcome: str, status: int | None = 200) -> TokenCall:
    return TokenCall(started=0.0, host_class="login", grant_type=grant, outcome=outcome, status=status)  # type: ignore[arg-type]


def test_on_call_reads_the_tokens_from_the_exchange_even_gzipped() -> None:
    t = tracker()
    ok = json.dumps({"access_token": "00D!x", "refresh_token": "RT-2", "token_type": "Bearer"}).encode()
    t.on_call(_call("refresh_token", "success"), *_flow(b"grant_type=refresh_token&refresh_token=RT-1", ok, gzip=True))
    (grant,), _ = t.snapshot()
    assert grant.key == token_hash(KEY, "RT-1") and grant.current == token_hash(KEY, "RT-2")
    bad = json.dumps({"error": "invalid_grant", "error_description": "expired access/refresh token"}).encode()
    t.on_call(_call("refresh_token", "invalid_grant", 400), *_flow(b"grant_type=refresh_token&refresh_token=RT-1", bad, status=400))
    assert metric(t, "egress_sidecar_refresh_token_reuse_total") == 1
    # The web server flow starts a grant; an upstream error (no response) is not a redemption.
    t.on_call(_call("authorization_code", "success"), *_flow(b"grant_type=authorization_code&code=c", ok.replace(b"RT-2", b"RT-9")))
    t.on_call(_call("refresh_token", "upstream_error", None), *_flow(b"grant_type=refresh_token&refresh_token=RT-2", None))
    assert len(t.snapshot()[0]) == 2
    assert metric(t, "egress_sidecar_refresh_token_rotations_total") == 1


def test_on_call_ignores_what_it_cannot_read_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    t = tracker()
    ok = json.dumps({"refresh_token": "n"}).encode()
    for body in (b"grant_type=refresh_token", b"refresh_token=a&refresh_token=b", b"\xff\xfe", b""):
        t.on_call(_call("refresh_token", "success"), *_flow(body, ok))
    t.on_call(_call("refresh_token", "success"), *_flow(b"refresh_token=a", b"not json"))  # tracked, not rotated
    with caplog.at_level(logging.ERROR, logger="egress_sidecar.grants"):
        t.on_call(_call("refresh_token", "success"), object(), object())  # type: ignore[arg-type]  # broken: logged
    assert any("grant tracking failed" in r.getMessage() for r in caplog.records)
    assert len(t.snapshot()[0]) == 1
    # Every successful redemption is counted, even when its request could not be read.
    assert metric(t, "egress_sidecar_refresh_token_rotations_total", rotated="true") == 4
    assert metric(t, "egress_sidecar_refresh_token_rotations_total", rotated="false") == 1


# -- the grants command ----------------------------------------------------------------------------
def _seed(confdir: Path) -> tuple[str, str, str]:
    """Three grants: redeemed now (rotated twice), 10 days ago, and 26 days ago then reused. The first two are
    of org A (its users named by the answers), the last of no org named yet."""
    now = time.time()
    clock = Clock(now - 26 * DAY)
    t = GrantTracker(Metrics(), clock=clock)
    t.open(load_or_create_key(confdir), GrantStore(confdir / DB_FILE), background=False)
    old = redeem(t, "o0", "o1").grant_id
    clock.now = now - 10 * DAY
    mid = t.observe("refresh_token", "success", "m0", "m1", status=200, identity=Identity(ORG_A, USER_A)).grant_id
    clock.now = now - 1 * DAY
    expired(t, "o0")
    clock.now = now
    fresh = t.observe("refresh_token", "success", "f0", "f1", status=200, identity=Identity(ORG_A, USER_B)).grant_id
    redeem(t, "f1", "f2")
    t.close()
    return old, mid, fresh


ORG_A, USER_A, USER_B = "00D000000000001AAA", "005000000000001AAA", "005000000000002AAA"


def test_grants_command_groups_by_org_in_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    old, mid, fresh = _seed(tmp_path)
    monkeypatch.setenv("SIDECAR_IDLE_POLICY", f"30d,{ORG_A}=12d")  # org A's grants expire after 12 idle days
    assert cli.main(["grants", "--confdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "3 grants tracked; idle over 7d: 2, over 25d: 1, over 30d (expired): 0"
    assert lines[1] == "1 customer orgs; by each org's refresh token expiry (SIDECAR_IDLE_POLICY): 2 expiring, 0 expired"
    # Grouped by org, the org of the most idle grant first, most idle first within each.
    assert lines[2:5] == ["", "org not known yet (no answer has named it): 1 grant, expiry 30d, 1 expiring",
                          lines[4]]
    assert lines[4].split() == ["GRANT", "USER", "LAST", "REDEEMED", "AGE", "ROTATIONS", "REUSES", "STATE"]
    assert lines[5].split()[0] == old and lines[5].split()[3:] == ["26d", "0h", "1", "1", "reused"]
    assert lines[6:8] == ["", f"org {ORG_A}: 2 grants, expiry 12d, 1 expiring"]
    rows = [line.split() for line in lines[9:]]
    assert [r[0] for r in rows] == [mid, fresh]
    assert rows[0][1] == USER_A and rows[0][3:] == ["10d", "0h", "1", "0", "expiring"]  # 10 days of 12: past 10
    assert rows[1][1] == USER_B and rows[1][4:] == ["2", "0", "ok"]
    monkeypatch.setenv("SIDECAR_CONFDIR", str(tmp_path))
    monkeypatch.delenv("SIDECAR_IDLE_POLICY")
    assert cli.main(["grants", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tracked"] == 3 and report["idle"] == {"7d": 2, "25d": 1, "30d": 0}
    assert report["expiry"] == {"expiring": 1, "expired": 0}  # by the default 30d: the 26-day-old one
    first = report["grants"][0]
    assert first["grant_id"] == old and first["reuses"] == 1 and first["state"] == "reused" and first["org"] is None
    assert set(first) == {"grant_id", "org", "user", "first_seen", "last_redeemed", "idle_seconds", "rotations",
                          "reuses", "last_reuse", "state"}
    assert [(g["grant_id"], g["org"], g["user"], g["state"]) for g in report["grants"][1:]] == [
        (mid, ORG_A, USER_A, "idle>7d"), (fresh, ORG_A, USER_B, "ok")]
    assert [(o["org"], o["grants"], o["expiry"]) for o in report["orgs"]] == [(None, 1, "30d"), (ORG_A, 2, "30d")]
    key_hex = (tmp_path / KEY_FILE).read_text().strip()
    assert key_hex[:12] not in out and all(g["grant_id"] not in key_hex for g in report["grants"])
    # Without the key that sealed them, the orgs cannot be named: the grants are still listed.
    (tmp_path / KEY_FILE).unlink()
    assert cli.main(["grants", "--json"]) == 0
    blind = json.loads(capsys.readouterr().out)
    assert [g["grant_id"] for g in blind["grants"]] == [old, mid, fresh] and {g["org"] for g in blind["grants"]} == {None}


def test_grants_command_without_a_grants_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["grants", "--confdir", str(tmp_path / "nowhere")]) == 1
    assert "no grants file" in capsys.readouterr().err
    (tmp_path / DB_FILE).write_bytes(b"")  # an empty file is a database without the table
    assert cli.main(["grants", "--confdir", str(tmp_path)]) == 1
    assert "is not a grants database" in capsys.readouterr().err


def test_report_of_an_empty_store(tmp_path: Path) -> None:
    tracker(tmp_path).close()
    assert format_report(grants_report(tmp_path)) == "0 grants tracked; idle over 7d: 0, over 25d: 0, over 30d (expired): 0"


def test_idle_grants_are_judged_by_their_orgs_expiry_with_one_log_line_per_org(caplog: pytest.LogCaptureFixture) -> None:
    """SIDECAR_IDLE_POLICY: org A keeps the default 30 days, org B's admin set 10 days, org C's never expire. The
    gauges count by each org's expiry, /status gets a summary per org, and the log says it once per org as grants
    cross (again only when a grant crosses anew, e.g. after a redemption)."""
    org_a, org_b, org_c = "00D000000000001EAA", "00D000000000002EAA", "00D000000000003EAA"
    clock = Clock()
    t = GrantTracker(Metrics(), clock=clock, idle_policy=parse_idle_policy(f"30d,{org_b}=10d,{org_c}=never"))
    t.open(KEY, background=False)
    for i, org in enumerate((org_a, org_a, org_b, org_c)):
        t.observe("refresh_token", "success", f"t{i}", f"t{i}x", status=200, identity=Identity(org, USER_A))
    redeem(t, "u0", "u1")  # a grant whose org no answer named: the default expiry
    clock.advance(9 * DAY)
    with caplog.at_level(logging.WARNING, logger="egress_sidecar.grants"):
        t.maintain()  # 9 days of B's 10: expiring (10 - 10/6 = 8.3 days)
        assert metric(t, "egress_sidecar_grants_expiry", state="expiring") == 1
        assert metric(t, "egress_sidecar_grants_expiry", state="expired") == 0
        t.maintain()  # nothing new: said once
        clock.advance(17 * DAY)  # 26 days: A's two and the unnamed one are expiring, B's has expired, C's never
        t.maintain()
    assert metric(t, "egress_sidecar_grants_expiry", state="expiring") == 3
    assert metric(t, "egress_sidecar_grants_expiry", state="expired") == 1
    assert metric(t, "egress_sidecar_grants_idle", window="25d") == 5  # (the absolute windows are unchanged)
    summary = t.org_summary
    assert (summary[org_a].grants, summary[org_a].expiring, summary[org_a].expired) == (2, 2, 0)
    assert (summary[org_b].expiring, summary[org_b].expired) == (0, 1)
    assert (summary[org_c].grants, summary[org_c].expiring, summary[org_c].expired) == (1, 0, 0)
    assert summary[None].expiring == 1 and summary[org_a].longest_idle == 26 * DAY
    said = [(r.__dict__["fields"]["org"], r.__dict__["fields"]["state"], r.__dict__["fields"]["grants"])
            for r in caplog.records if r.__dict__.get("fields", {}).get("event") == "grants_idle"]
    assert said == [(org_b, "expiring", 1), (org_b, "expired", 1), (org_a, "expiring", 2), (None, "expiring", 1)]
    text = " ".join(r.getMessage() for r in caplog.records)
    assert f"org {org_b}: 1 refresh token grant(s) went unused for longer than the org's refresh token expiry (10d, SIDECAR_IDLE_POLICY" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="egress_sidecar.grants"):
        t.observe("refresh_token", "success", "t0x", "t0y", status=200)  # one of A's is redeemed: fine again
        t.maintain()
        clock.advance(26 * DAY)
        t.maintain()  # ... and idle again for 26 days: said again; the others expired meanwhile; C's never
    said = [(r.__dict__["fields"]["org"], r.__dict__["fields"]["state"], r.__dict__["fields"]["grants"])
            for r in caplog.records if r.__dict__.get("fields", {}).get("event") == "grants_idle"]
    assert sorted(said, key=str) == sorted([(org_a, "expired", 1), (None, "expired", 1), (org_a, "expiring", 1)], key=str)
    t.close()


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59, "59s"), (61, "1m"), (3 * 3600 + 120, "3h 2m"),
                                               (26 * 86400 + 3600, "26d 1h")])
def test_human_age(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


def test_retired_rows_helper_reads_back(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    redeem(t, "a", "b")
    t.close()
    assert [r.token for r in retired_rows(tmp_path / DB_FILE)] == [token_hash(KEY, "a")]


def test_with_redis_the_periodic_maintenance_still_refreshes_the_idle_gauges(tmp_path: Path, redis_server) -> None:  # noqa: ANN001
    """Was: with SIDECAR_REDIS_URL the maintenance thread handed its prune to the Redis mirror, which needs
    the event loop: it raised in the thread every minute ("grant maintenance failed"), before the idle
    gauges were refreshed, so SalesforceRefreshTokenIdle never saw a grant go idle. A prune has nothing to
    mirror (Redis keys expire by themselves)."""
    import asyncio

    from sidecar.state.redis import SharedState

    clock = Clock()
    t = tracker(tmp_path, clock)
    redeem(t, "idle0", "idle1")

    async def run() -> None:
        shared = SharedState(redis_server().url, KEY, Metrics())
        await shared.start()
        t.share(shared)
        try:
            clock.advance(26 * DAY)
            await asyncio.to_thread(t.maintain)  # as the maintenance thread runs it
        finally:
            await t.stop_sharing()
            await shared.close()

    asyncio.run(run())
    assert metric(t, "egress_sidecar_grants_idle", window="25d") == 1
    t.close()
