"""Salesforce's answers are the truth: the guard learns the allowlist from them, a refused refresh is
sent once more through another egress IP, and the verdict never shows green while refreshes fail.

The fake Salesforce allows only 127.0.0.2 (one member of the pair); the sidecar runs against it with
no allowlist, or with one that wrongly lists both IPs (the classic slip). Real sidecar, loopback only."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN_URL,
    SidecarProcess,
    World,
    metric_value,
    redeem,
    wait_until,
)

CALLS = 40


def refresh_many(sc: SidecarProcess, world: World, n: int = CALLS) -> list[int]:
    """``n`` refreshes of one rotating grant, as a correct app makes them (it keeps the new token when
    it gets one, the old one when the call failed); the statuses the app saw."""
    token = world.salesforce.issue_refresh_token()
    statuses = []
    with sc.session() as s:
        for _ in range(n):
            resp = redeem(s, token)
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                token = resp.json()["refresh_token"]
    return statuses


def refusals_at_salesforce(world: World) -> Counter[str]:
    return Counter(r.source_ip for r in world.salesforce.seen if r.status == 400 and r.grant_type == "refresh_token")


@pytest.mark.parametrize("allowlist", [None, "127.0.0.2,127.0.0.3"], ids=["no allowlist", "allowlist lists both"])
def test_forty_refreshes_with_one_ip_allowlisted_all_succeed_and_the_verdict_names_the_refused_ip(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], allowlist: str | None
) -> None:
    env = world.pair_env() | ({"SIDECAR_ALLOWLIST": allowlist} if allowlist else {})
    sc = make_sidecar_proc(env)
    assert wait_until(sc.egress_discovered, timeout=10)
    assert sc.status()["guard"] == "enforce"  # the default whenever a pair is configured
    world.salesforce.reset_seen()
    statuses = refresh_many(sc, world)
    assert statuses == [200] * CALLS  # the retry hid the one refusal from the app
    assert refusals_at_salesforce(world) == {"127.0.0.3": 1}  # learnt once, then kept off
    text = sc.metrics()
    assert metric_value(text, "egress_sidecar_ip_restricted_retries_total", outcome="success") == 1
    assert metric_value(text, "egress_sidecar_egress_ip_refused", egress_ip="127.0.0.3") == 1
    assert metric_value(text, "egress_sidecar_egress_ip_refused", egress_ip="127.0.0.2") == 0
    assert metric_value(text, "egress_sidecar_allowlist_disagreement", egress_ip="127.0.0.3") == (1 if allowlist else 0)
    # The refused first answer is counted where the allowlist alerts look for it.
    assert metric_value(text, "egress_sidecar_token_requests_total", egress_ip="127.0.0.3", outcome="ip_restricted") == 1
    status = sc.status()
    assert status["verdict"]["level"] == "critical"
    (line,) = [x for x in status["verdict"]["lines"] if x.startswith("Salesforce refused")]
    assert "127.0.0.3" in line and "3MVG9demo" in line and " UTC " in line
    assert ("although SIDECAR_ALLOWLIST lists it" in line) == bool(allowlist)
    evidence = {(r["egress_ip"], r["evidence"]) for r in status["evidence"]}
    assert evidence == {("127.0.0.3", "refused"), ("127.0.0.2", "allowed")}
    (retried,) = [c for c in sc.log_events() if c.get("retried_from")]
    assert retried["retried_from"]["egress_ip"] == "127.0.0.3" and retried["egress_ip"] == "127.0.0.2"
    assert "Salesforce refused egress IP 127.0.0.3 for app 3MVG9demo" in sc.log_text()


def test_without_the_retry_the_app_sees_at_most_one_failure(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_RETRY_IP_RESTRICTED": "false"})
    assert wait_until(sc.egress_discovered, timeout=10)
    world.salesforce.reset_seen()
    statuses = refresh_many(sc, world)
    assert statuses.count(400) <= 1 and statuses.count(200) >= CALLS - 1
    assert metric_value(sc.metrics(), "egress_sidecar_ip_restricted_retries_total") == 0
    assert set(refusals_at_salesforce(world)) <= {"127.0.0.3"}


def test_observe_mode_routes_as_quotaguard_would_and_still_says_what_salesforce_refused(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_GUARD": "observe"})
    assert wait_until(sc.egress_discovered, timeout=10)
    statuses = refresh_many(sc, world, 10)
    assert statuses.count(400) == 5  # no retry, no learning applied to routing
    status = sc.status()
    assert status["verdict"]["level"] == "critical"
    assert any(x.startswith("Salesforce refused egress IP 127.0.0.3") for x in status["verdict"]["lines"])


def test_evidence_survives_a_restart_and_a_refusal_holds_until_its_retest_succeeds(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_EVIDENCE_TTL": "4"})
    assert wait_until(sc.egress_discovered, timeout=10)
    assert refresh_many(sc, world, 4) == [200] * 4
    sc.stop()
    sc.start()
    assert wait_until(sc.egress_discovered, timeout=10)
    assert {(r["egress_ip"], r["evidence"]) for r in sc.status()["evidence"]} == {
        ("127.0.0.3", "refused"), ("127.0.0.2", "allowed")}
    world.salesforce.reset_seen()
    assert refresh_many(sc, world, 4) == [200] * 4
    assert not refusals_at_salesforce(world)  # remembered across the restart: .3 not tried again
    # The allowlist gets fixed in Salesforce. Past SIDECAR_EVIDENCE_TTL nothing changes by itself: the
    # refusal holds until a redemption re-tests .3, Salesforce accepts it, and only then the verdict turns green.
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    (refusal,) = [r for r in sc.status()["evidence"] if r["evidence"] == "refused"]
    assert wait_until(lambda: time.time() > refusal["retest"] + 0.5, timeout=10)
    assert sc.status()["verdict"]["level"] == "critical"
    assert metric_value(sc.metrics(), "egress_sidecar_egress_ip_refused", egress_ip="127.0.0.3") == 1
    world.salesforce.reset_seen()
    assert refresh_many(sc, world, 6) == [200] * 6
    assert {r.source_ip for r in world.salesforce.seen} == {"127.0.0.2", "127.0.0.3"}
    assert [c["guard"] for c in sc.log_events()].count("retest") == 1
    assert sc.status()["verdict"]["level"] == "ok"
    assert metric_value(sc.metrics(), "egress_sidecar_egress_ip_refused", egress_ip="127.0.0.3") == 0


def test_a_refused_authorization_code_is_sent_once_more_and_redeemed(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """The web server flow's code redemption is subject to the allowlist too, and Salesforce refuses it
    before redeeming the code (it blocks a request from outside the allowed ranges outright): the
    sidecar sends the refused redemption once more through the other egress IP, and the app gets its
    tokens. docs/failure-handling.md says why that is safe even if a code were spent by a refusal."""
    sc = make_sidecar_proc(world.pair_env())
    assert wait_until(sc.egress_discovered, timeout=10)
    world.salesforce.reset_seen()
    with sc.session() as s:
        for _ in range(6):
            resp = s.post(TOKEN_URL, data={"grant_type": "authorization_code", "code": world.salesforce.issue_auth_code(),
                                           "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                                           "redirect_uri": "https://app.example.com/oauth/callback"}, timeout=15)
            assert resp.status_code == 200, resp.text
            assert resp.json()["refresh_token"]
    answers = [(r.source_ip, r.status) for r in world.salesforce.seen if r.grant_type == "authorization_code"]
    assert ("127.0.0.3", 400) in answers and answers.count(("127.0.0.2", 200)) == 6
    assert metric_value(sc.metrics(), "egress_sidecar_ip_restricted_retries_total", outcome="success") == 1
    (retried,) = [c for c in sc.log_events() if c.get("retried_from")]
    assert retried["grant_type"] == "authorization_code" and retried["outcome"] == "success"
