"""Review findings on the allowlist guard's inputs (sidecar/tokencall.py, sidecar/guard.py): found by an
independent review of the data path; each test failed before its fix. Real sidecar, the simulated pair
and Salesforce (which allows only 127.0.0.2), loopback only."""

from __future__ import annotations

from collections.abc import Callable

from tests.harness import CLIENT_ID, CLIENT_SECRET, TOKEN_URL, SidecarProcess, World, redeem, wait_until


def _learn_then_refresh(world: World, sc: SidecarProcess, **extra: object) -> tuple[list[str], list[int]]:
    """Two plain refreshes (round-robin: one goes through 127.0.0.3, which Salesforce refuses), then six
    refreshes shaped by ``extra`` (requests.post keyword arguments merged in); where those six went and what
    the app got."""
    assert wait_until(sc.egress_discovered, timeout=10)
    with sc.session() as s:
        for _ in range(2):
            redeem(s, world.salesforce.issue_refresh_token())
        assert {(e["egress_ip"], e["evidence"]) for e in sc.status()["evidence"]} >= {("127.0.0.3", "refused")}
        world.salesforce.reset_seen()
        statuses = []
        for _ in range(6):
            data: dict[str, str] = {"grant_type": "refresh_token", "refresh_token": world.salesforce.issue_refresh_token(),
                                    "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
            data.update(extra.get("data", {}))  # type: ignore[call-overload]
            resp = s.post(TOKEN_URL, params=extra.get("params"), data=data, timeout=15)
            statuses.append(resp.status_code)
    return [r.source_ip for r in world.salesforce.seen if r.path.startswith("/services/oauth2/token")], statuses


def test_a_client_id_sent_twice_still_keeps_refreshes_off_an_ip_salesforce_refused_for_the_app(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Was: the app is read from a client_id given exactly once; one given twice with the same value (in
    the query string and the form, as some OAuth clients send it) made the app unknown, and for an unknown
    app the guard ignores what Salesforce answered: in enforce mode half of those refreshes went out
    through the egress IP Salesforce had just refused for that very app. Salesforce reads one client_id
    whichever copy it takes."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_RETRY_IP_RESTRICTED": "false"})
    sources, statuses = _learn_then_refresh(world, sc, params={"client_id": CLIENT_ID})
    assert sources == ["127.0.0.2"] * 6 and statuses == [200] * 6, (sources, statuses)


def test_a_form_with_many_fields_is_still_read(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    """Was: the form was parsed with at most 100 fields and dropped whole past that, although the body is
    already capped at 64 KiB: a refresh carrying 150 extra fields (Salesforce reads it as a refresh all
    the same) had no grant type and no app for the sidecar, so the guard ignored what Salesforce had
    answered for the app (and the rotation shield did not cover it)."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_RETRY_IP_RESTRICTED": "false"})
    sources, statuses = _learn_then_refresh(world, sc, data={f"x{i}": "1" for i in range(150)})
    assert sources == ["127.0.0.2"] * 6 and statuses == [200] * 6, (sources, statuses)
    assert [c["grant_type"] for c in sc.log_events()][-6:] == ["refresh_token"] * 6
