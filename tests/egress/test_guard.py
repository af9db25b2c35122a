"""The guard's choice and egress discovery's bookkeeping, without sockets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from sidecar.config import load_settings
from sidecar.egress.allowlist import parse_allowlist
from sidecar.egress.discovery import ProbeError, Prober, parse_echo_body
from sidecar.egress.guard import Guard
from sidecar.egress.pair import Member, Pair, build_pair
from sidecar.metrics import Metrics
from sidecar.ops.status import verdict
from tests.egress.pairs import URL, make_pair
from tests.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN_URL,
    SidecarProcess,
    World,
    redeem,
    wait_until,
)


def test_round_robin_over_members() -> None:
    guard = Guard(make_pair("52.0.0.1", "52.0.0.2"), parse_allowlist(None), "observe")
    picks = Counter(guard.choose("refresh_token").member.label for _ in range(10))  # type: ignore[union-attr]
    assert picks == {"127.0.0.2:9293": 5, "127.0.0.3:9293": 5}


def test_observe_flags_but_routes_non_allowlisted() -> None:
    guard = Guard(make_pair("52.0.0.1", "52.0.0.2"), parse_allowlist("52.0.0.1"), "observe")
    verdicts = Counter(guard.choose("refresh_token").verdict for _ in range(4))
    assert verdicts == {"allow": 2, "not_allowlisted": 2}
    assert guard.missing_ips() == ["52.0.0.2"]


def test_enforce_only_allowlisted_for_subject_grants() -> None:
    guard = Guard(make_pair("52.0.0.1", "52.0.0.2"), parse_allowlist("52.0.0.1"), "enforce")
    for grant in ("refresh_token", "authorization_code"):
        assert {guard.choose(grant).member.egress_ip for _ in range(6)} == {"52.0.0.1"}  # type: ignore[union-attr]
    # jwt_bearer is not subject to the allowlist: both members are used.
    assert {guard.choose("jwt_bearer").member.egress_ip for _ in range(6)} == {"52.0.0.1", "52.0.0.2"}  # type: ignore[union-attr]


def test_enforce_blocks_when_no_allowlisted_member() -> None:
    guard = Guard(make_pair("52.0.0.1", "52.0.0.2"), parse_allowlist("198.51.100.7"), "enforce")
    decision = guard.choose("refresh_token")
    assert decision.blocked and decision.member is None
    assert "52.0.0.1, 52.0.0.2" in (decision.reason or "")
    assert not guard.ready()
    assert guard.choose("client_credentials").member is not None


def test_enforce_prefers_what_it_can_judge_and_never_fails_worse_than_the_plain_recipe() -> None:
    """A member whose connections' egress cannot be told (never probed, or probes that disagree, and no
    per-connection verification) carries a refresh only when no member the guard can judge may, and
    never when every IP it has shown is one the app may not use."""
    pair = make_pair("52.0.0.1", None)
    guard = Guard(pair, parse_allowlist("52.0.0.1"), "enforce")
    assert {guard.choose("refresh_token").member.label for _ in range(6)} == {pair.members[0].label}  # type: ignore[union-attr]
    pair.members[0].up = False  # the judged one is down: the unknown one carries it (the plain recipe would)
    assert guard.choose("refresh_token").member is pair.members[1]
    assert guard.choose("refresh_token").verdict == "unverified"
    pair.members[1].samples.extend(["52.0.0.8", "52.0.0.9"])  # it showed two IPs, neither listed
    assert pair.members[1].stable is False and pair.members[1].egress_ip is None
    assert guard.choose("refresh_token").blocked
    pair.members[1].verifies = True  # its connections are verified one by one: each is judged when it opens
    assert guard.choose("refresh_token").member is pair.members[1]
    assert not guard.accepts("refresh_token", "52.0.0.9") and guard.accepts("refresh_token", "52.0.0.1")
    assert guard.accepts("refresh_token", None)  # a connection that could not be asked goes, as it would without us


def test_down_member_is_skipped_and_ready_follows() -> None:
    pair = make_pair("52.0.0.1", "52.0.0.2")
    guard = Guard(pair, parse_allowlist("52.0.0.1"), "enforce")
    assert guard.ready()
    pair.members[0].up = False
    assert not guard.ready()
    assert guard.choose("refresh_token").blocked


def test_direct_mode_never_blocks() -> None:
    pair = build_pair(load_settings({}))
    guard = Guard(pair, parse_allowlist("52.0.0.1"), "enforce")
    assert guard.choose("refresh_token").verdict == "direct"
    assert verdict(pair, guard).level == "warning"


@pytest.mark.parametrize(
    ("content", "ip"),
    [(b'{"ip":"52.1.2.3"}', "52.1.2.3"), (b"52.1.2.3\n", "52.1.2.3"), (b'{"ip": "2001:db8::1"}', "2001:db8::1")],
)
def test_echo_bodies(content: bytes, ip: str) -> None:
    assert parse_echo_body(content) == ip


@pytest.mark.parametrize("content", [b"", b"<html>", b'{"ip": 5}', b'{"addr":"1.2.3.4"}', b"{broken", b"1.2.3.999"])
def test_bad_echo_bodies(content: bytes) -> None:
    with pytest.raises(ProbeError):
        parse_echo_body(content)


def prober_for(pair: Pair, allowlist: str | None = None) -> tuple[Prober, Metrics, Guard]:
    metrics = Metrics()
    guard = Guard(pair, parse_allowlist(allowlist), "enforce" if allowlist else "observe")
    settings = load_settings({"QUOTAGUARDSTATIC_URL": URL})
    return Prober(pair, guard, metrics, settings), metrics, guard


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_egress_change_is_counted_and_followed() -> None:
    pair = make_pair(None, None)
    prober, metrics, guard = prober_for(pair, "52.0.0.1,52.0.0.2")
    m: Member = pair.members[0]
    prober.apply_round(m, ["52.0.0.1"] * 3, None)
    prober.apply_round(pair.members[1], ["52.0.0.2"] * 3, None)
    prober.update_metrics()
    assert m.egress_ip == "52.0.0.1"
    assert value(metrics, "egress_sidecar_pair_member_up", member=m.label, egress_ip="52.0.0.1") == 1
    assert value(metrics, "egress_sidecar_allowlist_coverage_ratio") == 1
    prober.apply_round(m, ["52.0.0.9"] * 3, None)
    prober.update_metrics()
    assert m.egress_ip == "52.0.0.9"
    assert value(metrics, "egress_sidecar_egress_ip_changes_total", member=m.label) == 1
    # The old series is gone, not left stale at 1.
    assert value(metrics, "egress_sidecar_pair_member_up", member=m.label, egress_ip="52.0.0.1") is None
    assert value(metrics, "egress_sidecar_egress_ip_allowlisted", egress_ip="52.0.0.9") == 0
    assert value(metrics, "egress_sidecar_allowlist_coverage_ratio") == 0.5
    assert {guard.choose("refresh_token").member.label for _ in range(4)} == {pair.members[1].label}  # type: ignore[union-attr]


def test_coverage_is_nan_without_an_allowlist() -> None:
    """With no SIDECAR_ALLOWLIST there is nothing to cover: the ratio says so (NaN), instead of a 0 that a
    dashboard shows as a red 0 %."""
    import math

    pair = make_pair(None, None)
    prober, metrics, _ = prober_for(pair)
    prober.apply_round(pair.members[0], ["52.0.0.1"] * 3, None)
    prober.update_metrics()
    coverage = value(metrics, "egress_sidecar_allowlist_coverage_ratio")
    assert coverage is not None and math.isnan(coverage)
    assert value(metrics, "egress_sidecar_egress_ip_allowlisted", egress_ip="52.0.0.1") is None


def test_unstable_member_is_not_claimed() -> None:
    pair = make_pair(None)
    prober, _, _ = prober_for(pair)
    m = pair.members[0]
    prober.apply_round(m, ["52.0.0.1", "52.0.0.2", "52.0.0.1"], None)
    assert m.stable is False and m.egress_ip is None and m.up is True
    assert m.observed_ips == ["52.0.0.1", "52.0.0.2"]


def test_failed_round_marks_down() -> None:
    pair = make_pair("52.0.0.1")
    prober, metrics, _ = prober_for(pair)
    prober.apply_round(pair.members[0], [], "connection refused")
    prober.update_metrics()
    assert pair.members[0].up is False and pair.members[0].last_error == "connection refused"
    assert pair.members[0].egress_ip == "52.0.0.1"  # the last known egress IP is kept
    assert value(metrics, "egress_sidecar_pair_member_up", member=pair.members[0].label, egress_ip="52.0.0.1") == 0


def test_verdict_names_the_missing_ip() -> None:
    pair = make_pair("52.0.0.1", "52.0.0.2")
    v = verdict(pair, Guard(pair, parse_allowlist("52.0.0.1"), "observe"))
    assert v.level == "critical"
    assert "52.0.0.2 is not on the allowlist: about half of refresh token redemptions will fail" in v.text
    ok = verdict(pair, Guard(pair, parse_allowlist("52.0.0.0/30"), "observe"))
    assert ok.level == "ok" and "52.0.0.1, 52.0.0.2" in ok.text


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_echo_parser_fails_only_with_probe_error(content: bytes) -> None:
    try:
        ip = parse_echo_body(content)
    except ProbeError:
        return
    import ipaddress

    assert str(ipaddress.ip_address(ip)) == ip


@settings(max_examples=100, deadline=None)
@given(st.ip_addresses())
def test_echo_parser_round_trips_any_ip(addr: object) -> None:
    assert parse_echo_body(f'{{"ip": "{addr}"}}'.encode()) == str(addr)
    assert parse_echo_body(f"{addr}\n".encode()) == str(addr)


def test_echo_outage_does_not_take_a_member_down() -> None:
    pair = make_pair("52.0.0.1")
    prober, _, guard = prober_for(pair, "52.0.0.1")
    m = pair.members[0]
    prober.apply_round(m, [], "echo answered HTTP 502", member_down=False)
    assert m.up is True and m.egress_ip == "52.0.0.1" and m.last_error == "echo answered HTTP 502"
    assert guard.ready() and guard.choose("refresh_token").member is m
    prober.apply_round(m, [], "cannot connect to the member: connection refused", member_down=True)
    assert m.up is False and not guard.ready()


def test_probe_health_counts_rounds_and_an_echo_outage_never_takes_a_member_down() -> None:
    pair = make_pair(None, None)
    for m in pair.members:
        m.up = None  # not probed yet
    prober, metrics, _ = prober_for(pair)
    prober.update_metrics()
    a, b = pair.members
    # Before the first round there is no member_up series at all: a restart never looks like "down".
    assert value(metrics, "egress_sidecar_pair_member_up", member=a.label, egress_ip="unknown") is None
    assert value(metrics, "egress_sidecar_probes_total", member=a.label, result="member_down") == 0
    for reason in ("refused", "unreachable", "timeout", "proxy_error", "auth_failed", "reset"):  # at 0 from the start
        assert value(metrics, "egress_sidecar_member_failures_total", member=b.label, reason=reason) == 0, reason
    prober.apply_round(a, [], "echo did not answer within 3s", member_down=False)
    prober.apply_round(b, [], "cannot connect to the member: connection refused", member_down=True)
    prober.update_metrics()
    assert a.up is True and b.up is False
    assert value(metrics, "egress_sidecar_pair_member_up", member=a.label, egress_ip="unknown") == 1
    assert value(metrics, "egress_sidecar_pair_member_up", member=b.label, egress_ip="unknown") == 0
    assert value(metrics, "egress_sidecar_probes_total", member=a.label, result="echo_failed") == 1
    assert value(metrics, "egress_sidecar_probes_total", member=a.label, result="member_down") == 0
    assert value(metrics, "egress_sidecar_probes_total", member=b.label, result="member_down") == 1
    prober.apply_round(a, ["52.0.0.1", "52.0.0.2"], None)
    assert value(metrics, "egress_sidecar_probes_total", member=a.label, result="unstable") == 1


# -- found by independent reviews of this module; each test failed before its fix --------------------
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
