"""What Salesforce answered per app, customer org and egress IP (sidecar/egress/evidence.py), and how the
guard and the verdict follow it: plain code, a fake clock, a real SQLite file for the restart."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.egress.allowlist import parse_allowlist
from sidecar.egress.evidence import (
    MAX_APPS_CACHED,
    MAX_FACTS,
    STORE_EVERY,
    Evidence,
    Finding,
    Org,
    short_client_id,
)
from sidecar.egress.guard import Guard
from sidecar.metrics import Metrics
from sidecar.ops.status import verdict
from sidecar.state.sqlite import GrantStore, Prune
from sidecar.token.call import Identity
from tests.egress.pairs import make_pair
from tests.harness import metric_value

KEY = bytes(range(32))
IP, OTHER_IP = "52.0.0.2", "52.0.0.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def evidence(allowlist: str | None = None, ttl: float = 900.0, app_orgs: int = 2) -> tuple[Evidence, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    ev = Evidence(metrics, ttl, parse_allowlist(allowlist), clock=clock, app_orgs=app_orgs)
    ev.open(KEY)
    return ev, clock, metrics


def org(ev: Evidence, n: int) -> Org:
    return ev.org(Identity(f"00D00000000000{n}AAA", f"00500000000000{n}AAA"))


def started_store(tmp_path: Path) -> GrantStore:
    """grants.sqlite3 in ``tmp_path``, loaded and its writer started (the caller closes it)."""
    store = GrantStore(tmp_path / "grants.sqlite3")
    store.load("fp", Prune(max_grants=10, grants_before=0, retired_per_grant=2, retired_before=0))
    store.start()
    return store


def restarted(tmp_path: Path, clock: Clock, ttl: float = 900, max_facts: int = MAX_FACTS) -> Evidence:
    """What a restarted sidecar knows: a new Evidence opened on the same file."""
    again = Evidence(Metrics(), ttl, parse_allowlist(None), clock=clock, max_facts=max_facts)
    again.open(KEY, GrantStore(tmp_path / "grants.sqlite3"))
    return again


def gauge(metrics: Metrics, name: str, ip: str) -> float:
    return metric_value(metrics.render().decode(), name, egress_ip=ip)


def test_apps_and_orgs_are_known_by_keyed_hashes_and_labels() -> None:
    ev, _, _ = evidence()
    a, b = ev.app("3MVG9LongConsumerKeyOfTheApp_Xq"), ev.app("3MVG9OtherApp")
    assert a is not None and b is not None and a.key != b.key and len(a.key) == 16
    assert a.label == "3MVG9L…p_Xq" == short_client_id("3MVG9LongConsumerKeyOfTheApp_Xq")
    assert ev.app(None) is None and ev.app("") is None
    assert Evidence(Metrics(), 900, parse_allowlist(None)).app("x") is None  # not opened: learns nothing
    one, again = org(ev, 1), ev.org(Identity("00D00000000000" + "1AAA", "005x"))
    assert one.key == again.key and len(one.key) == 16 and one.id not in one.key.hex() and one.known
    assert one.label == "org 00D000000000001AAA" and org(ev, 2).key != one.key
    grant = ev.grant(bytes(range(16)))
    assert not grant.known and grant.label == "grant 000102030405"


def test_a_refusal_lasts_past_the_ttl_until_a_success_and_schedules_one_retest_per_ttl() -> None:
    ev, clock, metrics = evidence(ttl=60)
    app, a = ev.app("3MVG9demo"), org(ev, 1)
    assert ev.record(app, a, IP, "refused")  # news
    assert not ev.record(app, a, IP, "refused")  # the same again: not news
    said = ev.said(app, a, IP)
    assert said is not None and (said.kind, said.scope, said.due) == ("refused", "unproven", False)
    assert ev.said(app, a, OTHER_IP) is None and ev.said(ev.app("another-app"), a, IP) is None  # per app and IP
    assert not ev.claim(app, a, IP)  # not due yet
    clock.now += 61
    assert ev.said(app, a, IP).due  # type: ignore[union-attr]
    assert ev.claim(app, a, IP) and not ev.claim(app, a, IP)  # one re-test, then the next is a TTL away
    assert ev.said(app, a, IP).kind == "refused"  # type: ignore[union-attr]
    ev.record(app, a, IP, "refused")  # the re-test was refused: still refused, next re-test from now
    clock.now += 10 * 86400  # long past the TTL: never forgotten that quickly
    ev.update_metrics()
    assert ev.said(app, a, IP).kind == "refused"  # type: ignore[union-attr]
    assert gauge(metrics, "egress_sidecar_egress_ip_refused", IP) == 1
    (finding,) = [f for f in ev.findings() if f.kind == "refused"]
    assert finding.retest is not None and finding.retest <= clock.now and finding.orgs == ("org 00D000000000001AAA",)
    assert ev.record(app, a, IP, "allowed")  # the allowlist was fixed: a success disproves it
    assert ev.said(app, a, IP).kind == "allowed"  # type: ignore[union-attr]
    assert gauge(metrics, "egress_sidecar_egress_ip_refused", IP) == 0


def test_refusals_of_enough_orgs_with_no_success_since_refuse_the_ip_for_the_app() -> None:
    ev, clock, metrics = evidence(ttl=60)
    app, (a, b, c) = ev.app("3MVG9demo"), (org(ev, i) for i in (1, 2, 3))
    ev.record(app, a, IP, "refused")
    assert ev.said(app, b, IP) is None  # one org's refusal leaves the IP to the others
    ev.record(app, b, IP, "refused")
    said = ev.said(app, c, IP)
    assert said is not None and (said.kind, said.scope, said.due) == ("refused", "app", False)
    assert ev.said(app, a, IP).scope == "app"  # type: ignore[union-attr]
    assert gauge(metrics, "egress_sidecar_egress_ip_refused", IP) == 1
    assert gauge(metrics, "egress_sidecar_egress_ip_org_refused", IP) == 0
    clock.now += 61
    # The app-wide re-test goes to an org that is not refused on its own; a refused org's own re-test waits.
    assert ev.said(app, c, IP).due and ev.claim(app, c, IP) and not ev.said(app, a, IP).due  # type: ignore[union-attr]
    assert ev.record(app, c, IP, "allowed")  # the re-test succeeded: the app's allowlist admits the IP
    assert ev.said(app, c, IP).kind == "allowed"  # type: ignore[union-attr]
    for refused in (a, b):  # their refusals were part of the app-wide one: each re-tests on its next redemption
        said = ev.said(app, refused, IP)
        assert said is not None and (said.kind, said.scope, said.due) == ("refused", "org", True)
    assert gauge(metrics, "egress_sidecar_egress_ip_refused", IP) == 0
    assert gauge(metrics, "egress_sidecar_egress_ip_org_refused", IP) == 2


def test_how_many_orgs_make_it_app_wide_is_configurable() -> None:
    ev, _, _ = evidence(app_orgs=3)
    app = ev.app("3MVG9demo")
    for i in (1, 2):
        ev.record(app, org(ev, i), IP, "refused")
    assert ev.said(app, org(ev, 9), IP) is None
    ev.record(app, org(ev, 3), IP, "refused")
    assert ev.said(app, org(ev, 9), IP).scope == "app"  # type: ignore[union-attr]
    one, _, _ = evidence(app_orgs=1)  # 1: every refusal is the app's, as before orgs were known
    one_app = one.app("3MVG9demo")
    one.record(one_app, org(one, 1), IP, "refused")
    assert one.said(one_app, org(one, 2), IP).scope == "app"  # type: ignore[union-attr]


def test_one_org_refused_where_another_succeeds_is_that_orgs_own_restriction() -> None:
    ev, _, metrics = evidence()
    app, a, b = ev.app("3MVG9demo"), org(ev, 1), org(ev, 2)
    ev.record(app, a, IP, "allowed")
    ev.record(app, b, IP, "refused")
    assert ev.said(app, b, IP).scope == "org"  # type: ignore[union-attr]
    assert ev.said(app, a, IP).kind == "allowed" and ev.said(app, org(ev, 3), IP).kind == "allowed"  # type: ignore[union-attr]
    assert gauge(metrics, "egress_sidecar_egress_ip_refused", IP) == 0
    assert gauge(metrics, "egress_sidecar_egress_ip_org_refused", IP) == 1
    (found,) = [f for f in ev.findings() if f.kind == "refused"]
    assert (found.scope, found.orgs) == ("org", (b.label,))
    # Its own earlier success does not make a later refusal of the same org "its own restriction".
    solo, _, _ = evidence()
    solo_app = solo.app("3MVG9demo")
    solo.record(solo_app, org(solo, 1), IP, "allowed")
    solo.record(solo_app, org(solo, 1), IP, "refused")
    assert solo.said(solo_app, org(solo, 1), IP).scope == "unproven"  # type: ignore[union-attr]


def test_grants_whose_org_is_unknown_count_only_for_themselves_until_an_answer_names_it() -> None:
    ev, _, _ = evidence()
    app = ev.app("3MVG9demo")
    g1, g2 = ev.grant(b"\x01" * 16), ev.grant(b"\x02" * 16)
    ev.record(app, g1, IP, "refused")
    ev.record(app, g2, IP, "refused")  # two grants, maybe of one org: never the app's on their own
    assert ev.said(app, org(ev, 3), IP) is None  # a known org keeps the IP
    assert ev.said(app, g1, IP).kind == "refused"  # type: ignore[union-attr]
    # Another grant whose org is not known may be of the refused org: it keeps off the IP, and it never
    # takes a re-test that is another org's.
    said = ev.said(app, ev.grant(b"\x03" * 16), IP)
    assert said is not None and (said.kind, said.scope, said.due) == ("refused", "unproven", False)
    a = org(ev, 1)
    ev.learnt(app, g1, a)  # g1's retry succeeded and named its org: the refusal is the org's
    assert ev.said(app, a, IP).kind == "refused" and not [f for f in ev.findings() if "grant 010101010101" in f.orgs]  # type: ignore[union-attr]
    ev.learnt(app, g2, org(ev, 2))
    assert ev.said(app, org(ev, 3), IP).scope == "app"  # type: ignore[union-attr]  # now two known orgs


def test_disagreements_with_the_typed_allowlist() -> None:
    ev, _, metrics = evidence("52.0.0.1,52.0.0.2,52.0.0.7")
    app = ev.app("3MVG9demo")
    ev.record(app, org(ev, 1), "52.0.0.1", "allowed")
    ev.record(app, org(ev, 1), "52.0.0.2", "refused")  # listed, refused, nothing proves it one org's: the slip
    ev.record(app, org(ev, 1), "52.0.0.9", "allowed")  # not listed, accepted
    ev.record(app, org(ev, 1), "52.0.0.8", "refused")  # not listed, refused: agreement
    ev.record(app, org(ev, 1), "52.0.0.7", "allowed")
    ev.record(app, org(ev, 2), "52.0.0.7", "refused")  # listed, refused for one org only: its own restriction
    found = {(d.finding.egress_ip, d.listed) for d in ev.disagreements()}
    assert found == {("52.0.0.2", True), ("52.0.0.9", False)}
    text = metrics.render().decode()
    for ip, value in (("52.0.0.1", 0), ("52.0.0.2", 1), ("52.0.0.9", 1), ("52.0.0.8", 0), ("52.0.0.7", 0)):
        assert metric_value(text, "egress_sidecar_allowlist_disagreement", egress_ip=ip) == value, ip


def test_facts_are_bounded_and_survive_a_restart_without_any_client_id_or_org_id(tmp_path: Path) -> None:
    store = started_store(tmp_path)
    clock = Clock()
    ev = Evidence(Metrics(), 900, parse_allowlist(None), clock=clock, max_facts=3)
    ev.open(KEY, store)
    ids = [f"3MVG9ConsumerKeyNumber{i}xyz" for i in range(5)]
    for i, client_id in enumerate(ids):
        clock.now += 1
        ev.record(ev.app(client_id), org(ev, i), IP, "refused")
    labels = [short_client_id(c) for c in ids]
    assert [f.app for f in ev.findings()] == labels[:1:-1]  # the newest three, in memory
    assert store.flush()
    store.close()
    again = restarted(tmp_path, clock, max_facts=3)
    assert [(f.app, f.orgs) for f in again.findings()] == [(labels[i], (org(ev, i).label,)) for i in (4, 3, 2)]
    assert again.said(again.app(ids[3]), org(again, 3), IP).kind == "refused"  # type: ignore[union-attr]
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert not [c for c in ids if c.encode() in raw]  # only keyed hashes and short labels are written
    assert not [i for i in range(5) if org(ev, i).id.encode() in raw]  # type: ignore[union-attr]  # org ids: sealed


def test_the_same_answer_again_is_written_at_most_every_store_every_seconds(tmp_path: Path) -> None:
    """Every successful refresh repeats "allowed": memory follows each one, the file only news and one
    refresh per STORE_EVERY (a write per token call would cost every call a queue hand-off and a commit)."""
    store = started_store(tmp_path)
    written: list[float] = []
    submit = store.submit
    store.submit = lambda change: written.extend(r.at for r in change.evidence) or submit(change)  # type: ignore[method-assign]
    clock = Clock()
    ev = Evidence(Metrics(), 900, parse_allowlist(None), clock=clock)
    ev.open(KEY, store)
    app, a = ev.app("3MVG9demo"), org(ev, 1)
    start = clock.now
    for _ in range(20):  # twenty refreshes within a few seconds: one write
        clock.now += 0.25
        ev.record(app, a, IP, "allowed")
    assert written == [start + 0.25]
    assert ev.findings()[0].at == clock.now  # memory has the latest
    clock.now = start + 0.25 + STORE_EVERY
    ev.record(app, a, IP, "allowed")  # STORE_EVERY later: written again
    clock.now += 1
    ev.record(app, org(ev, 2), IP, "refused")  # news: written at once
    ev.record(app, a, IP, "allowed")  # a success after a newer refusal: written at once too
    assert written == [start + 0.25, start + 0.25 + STORE_EVERY, clock.now, clock.now]
    assert store.flush()
    store.close()
    again = restarted(tmp_path, clock)
    assert again.said(again.app("3MVG9demo"), org(again, 2), IP).scope == "org"  # type: ignore[union-attr]


def test_at_shutdown_each_answer_is_written_with_its_latest_time(tmp_path: Path) -> None:
    store = started_store(tmp_path)
    clock = Clock()
    ev = Evidence(Metrics(), 900, parse_allowlist(None), clock=clock)
    ev.open(KEY, store)
    app = ev.app("3MVG9demo")
    for _ in range(5):
        clock.now += 2
        ev.record(app, org(ev, 1), IP, "allowed")  # written once, at the first
    latest = clock.now
    ev.flush()
    ev.flush()  # nothing new: nothing written twice
    assert store.flush()
    store.close()
    assert [f.at for f in restarted(tmp_path, clock).findings()] == [latest]


def test_an_app_is_hashed_once_per_key() -> None:
    ev, _, _ = evidence()
    first = ev.app("3MVG9demo")
    assert ev.app("3MVG9demo") is first  # cached: not hashed again on every call
    ev.open(bytes(range(1, 33)))  # another key: another hash
    other = ev.app("3MVG9demo")
    assert other is not None and first is not None and other.key != first.key
    for i in range(MAX_APPS_CACHED + 5):  # made-up ids do not grow the cache without bound
        ev.app(f"made-up-{i}")
    assert len(ev._apps) <= MAX_APPS_CACHED
    ev._apps.clear()
    huge = "x" * 65536  # a client_id as long as a token body allows: hashed, never kept
    assert ev.app(huge) == ev.app(huge) and not ev._apps


def test_a_repeated_refusal_is_written_with_its_next_retest_and_survives_a_restart(tmp_path: Path) -> None:
    """A refusal Salesforce keeps repeating (each re-test) is written at least every half TTL with when the
    next re-test may go: after a restart it is refused still, and its re-test is not due before its time."""
    store = started_store(tmp_path)
    clock = Clock()
    ev = Evidence(Metrics(), 20, parse_allowlist(None), clock=clock)
    ev.open(KEY, store)
    app = ev.app("3MVG9demo")
    for _ in range(8):  # refused again every 5 s for 40 s
        ev.record(app, org(ev, 1), IP, "refused")
        clock.now += 5
    assert store.flush()
    store.close()
    again = restarted(tmp_path, clock, ttl=20)
    said = again.said(again.app("3MVG9demo"), org(again, 1), IP)
    assert said is not None and said.kind == "refused" and not said.due
    clock.now += 20
    assert again.said(again.app("3MVG9demo"), org(again, 1), IP).due  # type: ignore[union-attr]


def test_the_evidence_kept_per_app_before_orgs_is_migrated(tmp_path: Path) -> None:
    """A grants.sqlite3 written before the evidence was per org: its acceptances still hold (some org
    redeemed through the IP); its refusals named no org and are learnt again."""
    path = tmp_path / "grants.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE evidence (app BLOB NOT NULL, label TEXT NOT NULL, egress_ip TEXT NOT NULL, "
                   "kind TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (app, egress_ip)) WITHOUT ROWID")
        ev, clock, _ = evidence()
        app = ev.app("3MVG9demo")
        assert app is not None
        db.execute("INSERT INTO evidence VALUES (?, ?, ?, 'allowed', ?)", (app.key, app.label, OTHER_IP, clock.now))
        db.execute("INSERT INTO evidence VALUES (?, ?, ?, 'refused', ?)", (app.key, app.label, IP, clock.now))
    store = started_store(tmp_path)
    store.close()
    again = restarted(tmp_path, clock)
    assert {(f.egress_ip, f.kind) for f in again.findings()} == {(OTHER_IP, "allowed")}
    with sqlite3.connect(path) as db:
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'evidence'").fetchone()


def test_findings_read_back_from_status_as_they_were() -> None:
    ev, _, _ = evidence()
    app = ev.app("3MVG9demo")
    ev.record(app, org(ev, 1), IP, "refused")
    ev.record(app, org(ev, 2), OTHER_IP, "allowed")
    findings = ev.findings()
    assert [Finding.from_dict(f.as_dict()) for f in findings] == findings
    assert Finding.from_dict({"evidence": "maybe"}) is None and Finding.from_dict({}) is None


# -- the guard ---------------------------------------------------------------------------------------
def test_the_guard_keeps_an_org_off_the_ip_salesforce_refused_it_and_leaves_it_to_the_others() -> None:
    pair = make_pair(OTHER_IP, IP)
    ev, _, _ = evidence()
    guard = Guard(pair, parse_allowlist(None), "enforce", ev)
    app, a, b = ev.app("3MVG9demo"), org(ev, 1), org(ev, 2)

    def ips(grant: str = "refresh_token", who: Org | None = a) -> set[str]:
        return {guard.choose(grant, app=app, org=who).member.egress_ip for _ in range(6)}  # type: ignore[union-attr]

    # Nothing known: both members, round-robin.
    assert Counter(guard.choose("refresh_token", app=app, org=a).member.egress_ip for _ in range(4)) == {  # type: ignore[union-attr]
        OTHER_IP: 2, IP: 2}
    ev.record(app, a, IP, "refused")
    assert ips() == {OTHER_IP}
    assert ips(who=b) == {OTHER_IP, IP}  # another org keeps both
    assert ips("jwt_bearer") == {OTHER_IP, IP}
    assert guard.may_redeem(IP, "refresh_token", app, b) and not guard.may_redeem(IP, "refresh_token", app, a)
    assert guard.standing_ip(IP, app, a) == "refused" and guard.standing_ip(IP, app, b) == "unknown"
    # The retry goes to a different, not-refused egress IP, or nowhere.
    refused = pair.members[1]
    assert guard.retry_member(app, refused, org=a) is pair.members[0]
    ev.record(app, a, OTHER_IP, "refused")
    assert guard.retry_member(app, refused, org=a) is None
    decision = guard.choose("refresh_token", app=app, org=a)
    assert decision.blocked and f"Salesforce refused egress IP(s) {OTHER_IP}, {IP} for this app" in (decision.reason or "")
    # Observe mode routes as QuotaGuard would, whatever Salesforce said.
    observe = Guard(pair, parse_allowlist(None), "observe", ev)
    assert {observe.choose("refresh_token", app=app, org=a).member.egress_ip for _ in range(6)} == {OTHER_IP, IP}  # type: ignore[union-attr]


def test_the_guard_sends_one_redemption_through_a_refused_ip_per_ttl() -> None:
    pair = make_pair(OTHER_IP, IP)
    ev, clock, _ = evidence(ttl=60)
    guard = Guard(pair, parse_allowlist(None), "enforce", ev)
    app, (a, b, c) = ev.app("3MVG9demo"), (org(ev, i) for i in (1, 2, 3))
    ev.record(app, a, IP, "refused")
    ev.record(app, b, IP, "refused")  # refused for the app
    assert {guard.choose("refresh_token", app=app, org=c).member.egress_ip for _ in range(6)} == {OTHER_IP}  # type: ignore[union-attr]
    clock.now += 61
    decisions = [guard.choose("refresh_token", app=app, org=c) for _ in range(6)]
    assert [(d.member.egress_ip, d.verdict) for d in decisions][:2] == [(IP, "retest"), (OTHER_IP, "allow")]  # type: ignore[union-attr]
    assert sum(d.verdict == "retest" for d in decisions) == 1
    assert guard.choose("client_credentials", app=app, org=c).verdict != "retest"  # never for an exempt grant
    ev.record(app, c, IP, "refused")  # the re-test was refused too: the next one in a TTL
    clock.now += 30
    assert all(guard.choose("refresh_token", app=app, org=c).verdict != "retest" for _ in range(4))


def test_salesforce_beats_the_typed_allowlist_both_ways() -> None:
    pair = make_pair("52.0.0.1", "52.0.0.2")
    ev, _, _ = evidence("52.0.0.1")  # the typed list names only .1, Salesforce really allows only .2
    guard = Guard(pair, parse_allowlist("52.0.0.1"), "enforce", ev)
    app, a = ev.app("3MVG9demo"), org(ev, 1)
    assert {guard.choose("refresh_token", app=app, org=a).member.egress_ip for _ in range(4)} == {"52.0.0.1"}  # type: ignore[union-attr]
    ev.record(app, a, "52.0.0.1", "refused")
    # The retry may use the unlisted IP: Salesforce just proved the typed list wrong.
    assert guard.retry_member(app, pair.members[0], org=a) is pair.members[1]
    ev.record(app, a, "52.0.0.2", "allowed")
    assert {guard.choose("refresh_token", app=app, org=a).member.egress_ip for _ in range(4)} == {"52.0.0.2"}  # type: ignore[union-attr]
    lines = verdict(pair, guard).lines
    assert any(x.startswith("Salesforce refused egress IP 52.0.0.1 for app 3MVG9demo") and "although SIDECAR_ALLOWLIST"
               " lists it" in x for x in lines)
    assert any(x.startswith("Salesforce accepted a redemption through egress IP 52.0.0.2") for x in lines)
    assert verdict(pair, guard).level == "critical"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from([1, 2, 3]),
                          st.sampled_from([OTHER_IP, IP]), st.sampled_from(["allowed", "refused"]),
                          st.sampled_from([0.0, 1000.0])), max_size=30))
def test_enforce_sends_through_a_refused_ip_only_its_retest(events: list[tuple[str, int, str, str, float]]) -> None:
    pair = make_pair(OTHER_IP, IP)
    ev, clock, _ = evidence()
    guard = Guard(pair, parse_allowlist(None), "enforce", ev)
    for app_id, n, ip, kind, later in events:
        clock.now += later
        ev.record(ev.app(app_id), org(ev, n), ip, kind)  # type: ignore[arg-type]
    for app_id in ("a", "b", "c"):
        app = ev.app(app_id)
        for n in (1, 2, 3, 4):
            for _ in range(4):
                due = {m.egress_ip for m in pair.members if (s := ev.said(app, org(ev, n), m.egress_ip)) and s.due}
                decision = guard.choose("refresh_token", app=app, org=org(ev, n))
                if decision.member is None:
                    assert all(ev.said(app, org(ev, n), m.egress_ip).kind == "refused" for m in pair.members)  # type: ignore[union-attr]
                elif decision.verdict == "retest":
                    assert decision.member.egress_ip in due
                else:
                    said = ev.said(app, org(ev, n), decision.member.egress_ip)
                    assert said is None or said.kind == "allowed"


def test_replicas_share_refusals_successes_and_retests_through_a_real_redis(redis_server) -> None:  # noqa: ANN001
    """Two Evidence objects, as two replicas, on one redis-server: what one learns the other reads before its
    next call is routed (a refusal, a re-test taken, the success that disproves it), sealed in Redis."""
    import asyncio

    from sidecar.state.redis import SharedState
    from tests.redis_server import redis_dump

    url = redis_server().url

    async def run() -> None:
        clock = Clock()
        shared = [SharedState(url, KEY, Metrics()) for _ in range(2)]
        one, two = (Evidence(Metrics(), 60, parse_allowlist(None), clock=clock, monotonic=lambda: clock.now)
                    for _ in range(2))
        for ev, sh in zip((one, two), shared, strict=True):
            await sh.start()
            ev.open(sh.hash_key)
            ev.share(sh)
        try:
            app, a, b = one.app("3MVG9demo"), org(one, 1), org(one, 2)
            one.record(app, a, IP, "refused")
            one.record(app, b, IP, "refused")  # refused for the app
            await asyncio.sleep(0.2)  # (the write is off the request path)
            await two.pull(app)
            assert two.said(app, org(two, 3), IP) == one.said(app, org(one, 3), IP)
            assert two.said(app, org(two, 3), IP).scope == "app"  # type: ignore[union-attr]
            clock.now += 61
            assert two.claim(app, org(two, 3), IP)  # replica two takes the re-test...
            await asyncio.sleep(0.2)
            clock.now += 3  # (past PENDING: what Redis says counts)
            await one.pull(app)
            assert not one.said(app, org(one, 3), IP).due  # type: ignore[union-attr]  # ...so replica one does not
            two.record(app, org(two, 3), IP, "allowed")  # and it succeeded: the app's allowlist admits the IP
            await asyncio.sleep(0.2)
            clock.now += 3
            await one.pull(app)
            assert one.said(app, org(one, 3), IP).kind == "allowed"  # type: ignore[union-attr]
            assert one.said(app, a, IP).scope == "org" and one.said(app, a, IP).due  # type: ignore[union-attr]
            two.record(app, a, IP, "allowed")  # org A's own re-test succeeded too: its refusal goes everywhere
            await asyncio.sleep(0.2)
            clock.now += 3
            await one.pull(app)
            assert one.said(app, a, IP).kind == "allowed"  # type: ignore[union-attr]
            assert [f.orgs for f in one.findings() if f.kind == "refused"] == [(b.label,)]
            dumped = b"\n".join(redis_dump(url))
            assert dumped and a.id.encode() not in dumped and b"3MVG9demo" not in dumped  # type: ignore[union-attr]
        finally:
            for sh in shared:
                await sh.close()

    asyncio.run(run())


def test_the_verdict_says_what_must_be_fixed_before_what_is_worth_knowing() -> None:
    """A FAIL of `check` prints the verdict's first line after "FAIL:": it must be a reason to fail, not a
    note about one org's own restriction that happened to be found first."""
    pair = make_pair(OTHER_IP, IP)
    ev, _, _ = evidence(OTHER_IP)
    guard = Guard(pair, parse_allowlist(OTHER_IP), "enforce", ev)
    app = ev.app("3MVG9demo")
    ev.record(app, org(ev, 1), OTHER_IP, "allowed")
    ev.record(app, org(ev, 2), OTHER_IP, "refused")  # org 2's own restriction: a warning
    v = verdict(pair, guard)  # and IP is not on SIDECAR_ALLOWLIST: critical
    assert v.level == "critical" and len(v.lines) == 2
    assert v.lines[0].startswith(f"Egress IP {IP} is not on the allowlist") and "only" in v.lines[1]


def test_before_routing_the_org_and_the_apps_evidence_are_asked_of_redis_at_once(redis_server) -> None:  # noqa: ANN001
    """Issue 22 item 4: before a redemption is routed, the evidence addon asks Redis which org the refresh
    token's grant belongs to (the grant tracker) and what the replicas learnt of the app. Was: one after
    the other, two round trips' wait on the token call's critical path; now both are on their way before
    either is answered: with Redis 0.2 s away (a proxy holding each command), the second question reaches
    the proxy before the first was passed on to Redis."""
    import asyncio

    from addons.evidence import Evidence as EvidenceAddon
    from sidecar.state.grants import GrantTracker
    from sidecar.state.redis import SharedState
    from sidecar.token.call import TokenCall
    from sidecar.token.flow import TokenFlow
    from sidecar.token.messages import TokenRequest
    from tests.redis_proxy import RedisProxy

    redis = redis_server()

    async def run(proxy: RedisProxy) -> list[object]:
        shared = SharedState(proxy.url, KEY, Metrics(), health_seconds=3600)
        await shared.start()
        facts = Evidence(Metrics(), 900.0, parse_allowlist(None))
        facts.open(shared.hash_key)
        facts.share(shared)
        grants = GrantTracker(Metrics())
        grants.open(shared.hash_key, background=False)
        grants.share(shared)
        req = TokenRequest("login.salesforce.com", 443, "POST", b"/services/oauth2/token",
                           [(b"Content-Type", b"application/x-www-form-urlencoded")],
                           body=b"grant_type=refresh_token&refresh_token=5Aep861rt&client_id=3MVG9app")
        flow = TokenFlow(TokenCall(started=0.0, host_class="login", grant_type="refresh_token"), request=req)
        flow.fields = req.fields()
        try:
            await asyncio.gather(shared.identity(b"a"), shared.identity(b"b"))  # two pooled connections, as in use
            mark = proxy.mark()
            await EvidenceAddon(facts, grants).request(flow)
            return proxy.since(mark, b"egress-sidecar:current:", b"egress-sidecar:evidence:")  # type: ignore[return-value]
        finally:
            await grants.stop_sharing()
            grants.close()
            await shared.close()

    with RedisProxy(redis.port, delay=0.2) as proxy:
        turns = asyncio.run(run(proxy))
    assert len(turns) == 2, turns
    first, second = sorted(turns, key=lambda t: t.arrived)  # type: ignore[attr-defined]
    assert second.arrived < first.forwarded  # type: ignore[attr-defined]
