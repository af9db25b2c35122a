"""Review findings on the allowlist guard's inputs (sidecar/tokencall.py, sidecar/guard.py): found by an
independent review of the data path; each test failed before its fix. Real sidecar, the simulated pair
and Salesforce (which allows only 127.0.0.2), loopback only."""

from __future__ import annotations

from collections.abc import Callable

from tests.harness import CLIENT_ID, CLIENT_SECRET, TOKEN_URL, SidecarProcess, World, redeem, wait_until


def test_a_client_id_sent_twice_still_keeps_refreshes_off_an_ip_salesforce_refused_for_the_app(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Was: the app is read from a client_id given exactly once; one given twice with the same value (in
    the query string and the form, as some OAuth clients send it) made the app unknown, and for an unknown
    app the guard ignores what Salesforce answered: in enforce mode half of those refreshes went out
    through the egress IP Salesforce had just refused for that very app. Salesforce reads one client_id
    whichever copy it takes."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_RETRY_IP_RESTRICTED": "false"})
    assert wait_until(sc.egress_discovered, timeout=10)
    with sc.session() as s:
        for _ in range(2):  # round-robin: one of these goes through 127.0.0.3 and is refused
            redeem(s, world.salesforce.issue_refresh_token())
        assert {(e["egress_ip"], e["evidence"]) for e in sc.status()["evidence"]} >= {("127.0.0.3", "refused")}
        world.salesforce.reset_seen()
        statuses = []
        for _ in range(6):
            resp = s.post(TOKEN_URL, params={"client_id": CLIENT_ID}, timeout=15, data={
                "grant_type": "refresh_token", "refresh_token": world.salesforce.issue_refresh_token(),
                "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
            statuses.append(resp.status_code)
    sources = [r.source_ip for r in world.salesforce.seen if r.path.startswith("/services/oauth2/token")]
    assert sources == ["127.0.0.2"] * 6 and statuses == [200] * 6, (sources, statuses)
