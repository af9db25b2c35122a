"""The guard's choice and egress discovery's bookkeeping, without sockets."""

from __future__ import annotations

from collections import Counter

import pytest

from sidecar.allowlist import parse_allowlist
from sidecar.config import load_settings
from sidecar.discovery import Prober, ProbeError, parse_echo_body
from sidecar.guard import Guard
from sidecar.metrics import Metrics
from sidecar.pair import Member, Pair, build_pair
from sidecar.status import verdict

URL = "http://u:p@127.0.0.2:9293"


def make_pair(*ips: str | None) -> Pair:
    settings = load_settings({"QUOTAGUARDSTATIC_URL": URL, "SIDECAR_PAIR": ",".join(f"127.0.0.{i + 2}:9293" for i in range(len(ips)))})
    pair = build_pair(settings)
    for member, ip in zip(pair.members, ips):
        if ip:
            member.samples.extend([ip, ip])
            member.up = True
    return pair


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


def test_enforce_does_not_trust_unverified_or_unstable_members() -> None:
    pair = make_pair(None, "52.0.0.2")
    pair.members[1].samples.append("52.0.0.9")  # disagreeing samples: unstable
    guard = Guard(pair, parse_allowlist("52.0.0.0/24"), "enforce")
    assert pair.members[1].stable is False and pair.members[1].egress_ip is None
    assert guard.choose("refresh_token").blocked


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
