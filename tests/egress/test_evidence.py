"""What Salesforce answered per app and egress IP (sidecar/egress/evidence.py), and how the guard and the
verdict follow it: plain code, a fake clock, a real SQLite file for the restart."""

from __future__ import annotations

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
    short_client_id,
)
from sidecar.egress.guard import Guard
from sidecar.metrics import Metrics
from sidecar.ops.status import verdict
from sidecar.state.sqlite import GrantStore, Prune
from tests.egress.pairs import make_pair
from tests.harness import metric_value

KEY = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def evidence(allowlist: str | None = None, ttl: float = 900.0) -> tuple[Evidence, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    ev = Evidence(metrics, ttl, parse_allowlist(allowlist), clock=clock)
    ev.open(KEY)
    return ev, clock, metrics


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


def test_apps_are_known_by_a_keyed_hash_and_a_short_label() -> None:
    ev, _, _ = evidence()
    a, b = ev.app("3MVG9LongConsumerKeyOfTheApp_Xq"), ev.app("3MVG9OtherApp")
    assert a is not None and b is not None and a.key != b.key and len(a.key) == 16
    assert a.label == "3MVG9L…p_Xq" == short_client_id("3MVG9LongConsumerKeyOfTheApp_Xq")
    assert ev.app(None) is None and ev.app("") is None
    assert Evidence(Metrics(), 900, parse_allowlist(None)).app("x") is None  # not opened: learns nothing


def test_a_refusal_holds_for_the_ttl_and_the_latest_answer_wins() -> None:
    ev, clock, metrics = evidence(ttl=60)
    app = ev.app("3MVG9demo")
    assert ev.record(app, "52.0.0.2", "refused") is not None  # news
    assert ev.record(app, "52.0.0.2", "refused") is None  # the same again: not news
    assert ev.state(app, "52.0.0.2") == "refused" and ev.state(app, "52.0.0.1") is None
    assert ev.state(ev.app("another-app"), "52.0.0.2") is None  # per app
    assert metric_value(metrics.render().decode(), "egress_sidecar_egress_ip_refused", egress_ip="52.0.0.2") == 1
    clock.now += 61
    assert ev.state(app, "52.0.0.2") is None and ev.facts() == []
    ev.update_metrics()
    assert metric_value(metrics.render().decode(), "egress_sidecar_egress_ip_refused", egress_ip="52.0.0.2") == 0
    ev.record(app, "52.0.0.2", "refused")
    ev.record(app, "52.0.0.2", "allowed")  # the allowlist was fixed in Salesforce
    assert ev.state(app, "52.0.0.2") == "allowed"
    clock.now += 10 * 86400
    assert ev.state(app, "52.0.0.2") == "allowed"  # an acceptance does not expire; a refusal replaces it


def test_disagreements_with_the_typed_allowlist() -> None:
    ev, _, metrics = evidence("52.0.0.1,52.0.0.2")
    app = ev.app("3MVG9demo")
    ev.record(app, "52.0.0.1", "allowed")
    ev.record(app, "52.0.0.2", "refused")  # listed, refused: the classic slip
    ev.record(app, "52.0.0.9", "allowed")  # not listed, accepted
    ev.record(app, "52.0.0.8", "refused")  # not listed, refused: agreement
    found = {(d.fact.egress_ip, d.listed) for d in ev.disagreements()}
    assert found == {("52.0.0.2", True), ("52.0.0.9", False)}
    text = metrics.render().decode()
    for ip, value in (("52.0.0.1", 0), ("52.0.0.2", 1), ("52.0.0.9", 1), ("52.0.0.8", 0)):
        assert metric_value(text, "egress_sidecar_allowlist_disagreement", egress_ip=ip) == value, ip


def test_facts_are_bounded_and_survive_a_restart_without_the_client_id(tmp_path: Path) -> None:
    store = started_store(tmp_path)
    clock = Clock()
    ev = Evidence(Metrics(), 900, parse_allowlist(None), clock=clock, max_facts=3)
    ev.open(KEY, store)
    ids = [f"3MVG9ConsumerKeyNumber{i}xyz" for i in range(5)]
    for i, client_id in enumerate(ids):
        clock.now += 1
        ev.record(ev.app(client_id), "52.0.0.2", "refused" if i % 2 else "allowed")
    labels = [short_client_id(c) for c in ids]
    assert [f.app.label for f in ev.facts()] == labels[:1:-1]  # the newest three, in memory
    assert store.flush()
    store.close()
    again = restarted(tmp_path, clock, max_facts=3)
    assert {(f.app.label, f.kind) for f in again.facts()} == {(labels[4], "allowed"), (labels[3], "refused"),
                                                              (labels[2], "allowed")}
    assert again.state(again.app(ids[3]), "52.0.0.2") == "refused"
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert not [c for c in ids if c.encode() in raw]  # only keyed hashes and short labels are written


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
    app = ev.app("3MVG9demo")
    start = clock.now
    for _ in range(20):  # twenty refreshes within a few seconds: one write
        clock.now += 0.25
        ev.record(app, "52.0.0.2", "allowed")
    assert written == [start + 0.25]
    assert ev.facts()[0].at == clock.now  # memory has the latest
    clock.now = start + 0.25 + STORE_EVERY
    ev.record(app, "52.0.0.2", "allowed")  # STORE_EVERY later: written again
    clock.now += 1
    ev.record(app, "52.0.0.2", "refused")  # news: written at once
    ev.record(ev.app("3MVG9other"), "52.0.0.2", "allowed")  # another app's first answer: news
    assert written == [start + 0.25, start + 0.25 + STORE_EVERY, clock.now, clock.now]
    assert store.flush()
    store.close()
    again = restarted(tmp_path, clock)
    assert again.state(again.app("3MVG9demo"), "52.0.0.2") == "refused"


def test_at_shutdown_each_answer_is_written_with_its_latest_time(tmp_path: Path) -> None:
    store = started_store(tmp_path)
    clock = Clock()
    ev = Evidence(Metrics(), 900, parse_allowlist(None), clock=clock)
    ev.open(KEY, store)
    app = ev.app("3MVG9demo")
    for _ in range(5):
        clock.now += 2
        ev.record(app, "52.0.0.2", "allowed")  # written once, at the first
    latest = clock.now
    ev.flush()
    ev.flush()  # nothing new: nothing written twice
    assert store.flush()
    store.close()
    assert [f.at for f in restarted(tmp_path, clock).facts()] == [latest]


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


def test_a_repeated_refusal_is_written_often_enough_to_survive_a_restart(tmp_path: Path) -> None:
    """With SIDECAR_EVIDENCE_TTL under STORE_EVERY, a refusal that Salesforce keeps repeating is written at
    least every half TTL: after a restart it is still live, as it was in memory."""
    store = started_store(tmp_path)
    clock = Clock()
    ev = Evidence(Metrics(), 20, parse_allowlist(None), clock=clock)
    ev.open(KEY, store)
    app = ev.app("3MVG9demo")
    for _ in range(8):  # refused again every 5 s for 40 s: live in memory all along
        ev.record(app, "52.0.0.2", "refused")
        clock.now += 5
    assert ev.state(app, "52.0.0.2") == "refused"
    assert store.flush()
    store.close()
    again = restarted(tmp_path, clock, ttl=20)
    assert again.state(again.app("3MVG9demo"), "52.0.0.2") == "refused"


def test_the_guard_keeps_an_app_off_the_ip_salesforce_refused_it() -> None:
    pair = make_pair("52.0.0.1", "52.0.0.2")
    ev, _, _ = evidence()
    guard = Guard(pair, parse_allowlist(None), "enforce", ev)
    app, other = ev.app("3MVG9demo"), ev.app("3MVG9other")
    # Nothing known: both members, round-robin.
    assert Counter(guard.choose("refresh_token", app=app).member.egress_ip for _ in range(4)) == {  # type: ignore[union-attr]
        "52.0.0.1": 2, "52.0.0.2": 2}
    ev.record(app, "52.0.0.2", "refused")
    assert {guard.choose("refresh_token", app=app).member.egress_ip for _ in range(6)} == {"52.0.0.1"}  # type: ignore[union-attr]
    assert {guard.choose("refresh_token", app=other).member.egress_ip for _ in range(6)} == {"52.0.0.1", "52.0.0.2"}  # type: ignore[union-attr]
    assert {guard.choose("jwt_bearer", app=app).member.egress_ip for _ in range(6)} == {"52.0.0.1", "52.0.0.2"}  # type: ignore[union-attr]
    # The retry goes to a different, not-refused egress IP, or nowhere.
    refused = pair.members[1]
    assert guard.retry_member(app, refused) is pair.members[0]
    ev.record(app, "52.0.0.1", "refused")
    assert guard.retry_member(app, refused) is None
    decision = guard.choose("refresh_token", app=app)
    assert decision.blocked and "Salesforce refused egress IP(s) 52.0.0.1, 52.0.0.2" in (decision.reason or "")
    # Observe mode routes as QuotaGuard would, whatever Salesforce said.
    observe = Guard(pair, parse_allowlist(None), "observe", ev)
    assert {observe.choose("refresh_token", app=app).member.egress_ip for _ in range(6)} == {"52.0.0.1", "52.0.0.2"}  # type: ignore[union-attr]


def test_salesforce_beats_the_typed_allowlist_both_ways() -> None:
    pair = make_pair("52.0.0.1", "52.0.0.2")
    ev, _, _ = evidence("52.0.0.1")  # the typed list names only .1, Salesforce really allows only .2
    guard = Guard(pair, parse_allowlist("52.0.0.1"), "enforce", ev)
    app = ev.app("3MVG9demo")
    assert {guard.choose("refresh_token", app=app).member.egress_ip for _ in range(4)} == {"52.0.0.1"}  # type: ignore[union-attr]
    ev.record(app, "52.0.0.1", "refused")
    # The retry may use the unlisted IP: Salesforce just proved the typed list wrong.
    assert guard.retry_member(app, pair.members[0]) is pair.members[1]
    ev.record(app, "52.0.0.2", "allowed")
    assert {guard.choose("refresh_token", app=app).member.egress_ip for _ in range(4)} == {"52.0.0.2"}  # type: ignore[union-attr]
    lines = verdict(pair, guard).lines
    assert any(x.startswith("Salesforce refused egress IP 52.0.0.1 for app 3MVG9demo") and "although SIDECAR_ALLOWLIST"
               " lists it" in x for x in lines)
    assert any(x.startswith("Salesforce accepted a redemption through egress IP 52.0.0.2") for x in lines)
    assert verdict(pair, guard).level == "critical"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["52.0.0.1", "52.0.0.2"]),
                          st.sampled_from(["allowed", "refused"])), max_size=30))
def test_enforce_never_routes_a_subject_grant_through_a_refused_ip(events: list[tuple[str, str, str]]) -> None:
    pair = make_pair("52.0.0.1", "52.0.0.2")
    ev, _, _ = evidence()
    guard = Guard(pair, parse_allowlist(None), "enforce", ev)
    for app_id, ip, kind in events:
        ev.record(ev.app(app_id), ip, kind)  # type: ignore[arg-type]
    for app_id in ("a", "b", "c"):
        app = ev.app(app_id)
        for _ in range(4):
            decision = guard.choose("refresh_token", app=app)
            if decision.member is not None:
                assert ev.state(app, decision.member.egress_ip) != "refused"
            else:
                assert all(ev.state(app, m.egress_ip) == "refused" for m in pair.members)
