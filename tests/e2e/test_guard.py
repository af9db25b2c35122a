"""The allowlist guard and egress discovery end to end, plus the `check` preflight."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sidecar.sim.certs import TestCA
from tests.harness import (
    CLIENT_SECRET,
    ROOT,
    SidecarProcess,
    World,
    metric_value,
    redeem,
    redeem_chain,
    sidecar_env,
    wait_until,
)

TOKENS = "egress_sidecar_token_requests_total"


def test_discovery_finds_both_egress_ips(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2", "SIDECAR_GUARD": "observe"})
    assert wait_until(sc.egress_discovered, timeout=10)
    pair = {m["member"]: m for m in sc.status()["pair"]}
    a, b = world.members
    assert (pair[a]["egress_ip"], pair[a]["stable"], pair[a]["allowlisted"]) == ("127.0.0.2", True, True)
    assert (pair[b]["egress_ip"], pair[b]["stable"], pair[b]["allowlisted"]) == ("127.0.0.3", True, False)
    text = sc.metrics()
    assert metric_value(text, "egress_sidecar_egress_ip_allowlisted", egress_ip="127.0.0.2") == 1
    assert metric_value(text, "egress_sidecar_egress_ip_allowlisted", egress_ip="127.0.0.3") == 0
    assert metric_value(text, "egress_sidecar_allowlist_coverage_ratio") == 0.5
    assert metric_value(text, "egress_sidecar_pair_member_up", member=b, egress_ip="127.0.0.3") == 1
    assert sc.status()["missing_from_allowlist"] == ["127.0.0.3"]
    assert world.echo.hits and {h.source_ip for h in world.echo.hits} == {"127.0.0.2", "127.0.0.3"}


def test_enforce_100_refreshes_all_succeed_through_allowlisted_member(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})  # enforce by default
    assert sc.status()["guard"] == "enforce" and sc.status()["ready"]
    token = world.salesforce.issue_refresh_token()
    world.salesforce.reset_seen()
    with sc.session() as s:
        for _ in range(100):
            resp = redeem(s, token)
            assert resp.status_code == 200, resp.text
            token = resp.json()["refresh_token"]
    sources = Counter(r.source_ip for r in world.salesforce.seen if r.path == "/services/oauth2/token")
    assert sources == {"127.0.0.2": 100}
    assert metric_value(sc.metrics(), TOKENS, egress_ip="127.0.0.2", outcome="success") == 100
    assert metric_value(sc.metrics(), TOKENS, outcome="ip_restricted") == 0


def test_enforce_with_nothing_allowlisted_answers_503_and_sends_nothing(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "198.51.100.7"}, wait_ready=False)
    assert wait_until(sc.egress_discovered, timeout=10)
    world.salesforce.reset_seen()
    with sc.session() as s:
        resp = redeem(s, world.salesforce.issue_refresh_token())
        # Grants outside the allowlist's scope are still routed.
        cc = s.post("https://login.salesforce.com/services/oauth2/token",
                    data={"grant_type": "client_credentials", "client_id": "3MVG9demo"}, timeout=10)
    assert resp.status_code == 503
    body = resp.json()
    assert body["error"] == "egress_not_allowlisted" and body["sent_to_salesforce"] is False
    assert body["missing_from_allowlist"] == ["127.0.0.2", "127.0.0.3"]
    assert "127.0.0.2, 127.0.0.3" in body["error_description"]
    assert [r.grant_type for r in world.salesforce.seen] == ["client_credentials"]
    assert cc.status_code != 503
    assert metric_value(sc.metrics(), TOKENS, outcome="blocked", member="none") == 1
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(sc.admin_url + "/readyz", timeout=5)
        raise AssertionError("/readyz must not be ready while enforcing with no allowlisted member")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503


def test_observe_metrics_show_the_per_ip_split(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2", "SIDECAR_GUARD": "observe"})
    assert wait_until(sc.egress_discovered, timeout=10)
    with sc.session() as s:
        for _ in range(8):
            redeem(s, world.salesforce.issue_refresh_token())
    text = sc.metrics()
    assert metric_value(text, TOKENS, egress_ip="127.0.0.2", outcome="success") == 4
    assert metric_value(text, TOKENS, egress_ip="127.0.0.3", outcome="ip_restricted") == 4
    # One line per call, and each call from the IP that is not allowlisted says so, as a warning.
    calls = [json.loads(line) for line in sc.log_text().splitlines() if '"token call ' in line]
    warned = [c for c in calls if "which is not allowlisted" in c["msg"]]
    assert len(calls) == 8 and len(warned) == 4
    assert all(w["egress_ip"] == "127.0.0.3" and w["level"] == "warning" for w in warned)


def test_egress_change_is_detected_and_the_guard_follows(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.4"])
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.4"}, wait_ready=False)
    assert wait_until(sc.egress_discovered, timeout=10)
    a, b = world.members
    # Member a's egress moves from an allowlisted IP to one that is not; member b's moves onto the allowlist.
    world.pair.members[0].egress_ip = "127.0.0.5"
    world.pair.members[1].egress_ip = "127.0.0.4"
    assert wait_until(lambda: {m["member"]: m["egress_ip"] for m in sc.status()["pair"]} == {a: "127.0.0.5", b: "127.0.0.4"}, timeout=15)
    text = sc.metrics()
    assert metric_value(text, "egress_sidecar_egress_ip_changes_total", member=a) == 1
    assert metric_value(text, "egress_sidecar_egress_ip_changes_total", member=b) == 1
    assert "changed from 127.0.0.2 to 127.0.0.5" in sc.log_text()
    world.salesforce.reset_seen()
    redeem_chain(sc, world.salesforce, 6)
    assert {r.source_ip for r in world.salesforce.seen} == {"127.0.0.4"}


def run_check(tmp_path: Path, test_ca: TestCA, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = sidecar_env(tmp_path, test_ca.ca_path, env)
    return subprocess.run([sys.executable, "-m", "sidecar", "check", *args], env=full, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_check_exit_codes(world: World, tmp_path: Path, test_ca: TestCA) -> None:
    partial = run_check(tmp_path, test_ca, {**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})
    assert partial.returncode == 1, partial.stdout + partial.stderr
    # Judged with the guard these settings start (enforce, with a pair): it keeps refreshes off the IP.
    assert "FAIL: Egress IP 127.0.0.3 is not on the allowlist: the guard keeps refresh token redemptions off it" \
        in partial.stdout
    observe = run_check(tmp_path, test_ca, {**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2", "SIDECAR_GUARD": "observe"})
    assert "about half of refresh token redemptions will fail" in observe.stdout
    lines = partial.stdout.splitlines()
    assert lines[0].split() == ["MEMBER", "EGRESS", "IP", "STABLE", "REACHABLE", "ALLOWLISTED", "SALESFORCE"]
    row_b = next(line for line in lines if line.startswith(world.members[1]))
    assert row_b.split()[1:] == ["127.0.0.3", "yes", "yes", "no", "unknown"]
    assert "No running sidecar answered at http://127.0.0.1:" in partial.stdout  # said, not silently skipped

    both = run_check(tmp_path, test_ca, {**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2-127.0.0.3"}, "--json")
    assert both.returncode == 0, both.stdout + both.stderr
    report = json.loads(both.stdout)
    assert report["ok"] is True and {r["egress_ip"] for r in report["pair"]} == {"127.0.0.2", "127.0.0.3"}

    malformed = run_check(tmp_path, test_ca, {**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2/33"})
    assert malformed.returncode == 2 and "SIDECAR_ALLOWLIST" in malformed.stderr
    too_many = ",".join(f"10.0.{i // 250}.{i % 250}" for i in range(257))
    over = run_check(tmp_path, test_ca, {**world.pair_env(), "SIDECAR_ALLOWLIST": too_many})
    assert over.returncode == 2 and "256" in over.stderr and "1 too many" in over.stderr


def test_check_fails_on_a_salesforce_domain_in_no_proxy(world: World, tmp_path: Path, test_ca: TestCA) -> None:
    """Everything else passes, but the app's NO_PROXY lists a Salesforce domain: its clients would send
    token calls straight to Salesforce from this host's IP, around the sidecar. The check fails and says
    which entry."""
    both = {**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2-127.0.0.3"}
    out = run_check(tmp_path, test_ca, {**both, "NO_PROXY": "localhost,127.0.0.1,.salesforce.com",
                                        "no_proxy": "localhost,127.0.0.1"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "NO_PROXY lists .salesforce.com: " in out.stdout and "no_proxy lists" not in out.stdout
    report = json.loads(run_check(tmp_path, test_ca, {**both, "no_proxy": "login.salesforce.com"}, "--json").stdout)
    assert report["ok"] is False and report["verdict"]["lines"][0].startswith("no_proxy lists login.salesforce.com")
    fine = run_check(tmp_path, test_ca, {**both, "NO_PROXY": "localhost,127.0.0.1,::1,.svc,.cluster.local"})
    assert fine.returncode == 0, fine.stdout + fine.stderr


def test_check_reports_unreachable_member(world: World, tmp_path: Path, test_ca: TestCA) -> None:
    world.pair.members[1].stop()
    out = run_check(tmp_path, test_ca, {**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2-127.0.0.3",
                                        "SIDECAR_PROBE_SAMPLES": "2"})
    assert out.returncode == 1
    assert f"Pair member {world.members[1]} is unreachable (cannot connect to the member: connection refused)" in out.stdout


def test_enforce_reads_the_grant_from_the_query_string_too(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})
    with sc.session() as s:
        for _ in range(4):
            token = world.salesforce.issue_refresh_token()
            resp = s.post(f"https://login.salesforce.com/services/oauth2/token?grant_type=refresh_token&"
                          f"refresh_token={token}&client_id=3MVG9demo&client_secret={CLIENT_SECRET}", timeout=10)
            assert resp.status_code == 200, resp.text
        # A grant type the sidecar cannot read is routed as if it were subject to the allowlist.
        for _ in range(4):
            s.post("https://login.salesforce.com/services/oauth2/token", data=b"grant_type=refresh_token&grant_type=x",
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert {r.source_ip for r in world.salesforce.seen} == {"127.0.0.2"}
    assert Counter(c["grant_type"] for c in sc.log_events()) == {"refresh_token": 4, "other": 4}


def test_direct_mode_with_an_allowlist_observes_and_explicit_enforce_is_refused(tmp_path: Path, test_ca: TestCA) -> None:
    from sidecar.config import ConfigError, load_settings

    assert load_settings({"SIDECAR_ALLOWLIST": "52.1.2.3"}).guard_mode == "observe"
    try:
        load_settings({"SIDECAR_ALLOWLIST": "52.1.2.3", "SIDECAR_GUARD": "enforce"})
        raise AssertionError("enforce without a pair must be refused")
    except ConfigError as exc:
        assert str(exc).startswith("SIDECAR_GUARD=enforce needs QUOTAGUARDSTATIC_URL")


def test_token_path_lookalikes_pass_the_guard_like_the_token_path(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Forms of the token path a server may route to the token endpoint are token calls: enforced,
    recorded, and never forwarded around the guard (Salesforce saw each of them from 127.0.0.2 only)."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})
    forms = ("//services/oauth2/token", "/services/./oauth2/token", "/services/oauth2/%74oken",
             "/Services/OAuth2/Token", "/services/oauth2/token;x=1")
    world.salesforce.reset_seen()
    with sc.session() as s:
        for form in forms:
            redeem(s, world.salesforce.issue_refresh_token(), url=f"https://login.salesforce.com{form}")
    seen = world.salesforce.seen
    assert len(seen) == len(forms) and {r.source_ip for r in seen} == {"127.0.0.2"}
    calls = sc.log_events()
    assert len(calls) == len(forms) and {c["egress_ip"] for c in calls} == {"127.0.0.2"}
    assert all(c["guard"] == "allow" and c["grant_type"] == "refresh_token" for c in calls)


def test_check_includes_what_salesforce_answered_a_running_sidecar(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path, test_ca: TestCA
) -> None:
    """SIDECAR_ALLOWLIST wrongly lists both IPs: the probes alone would pass; the running sidecar knows
    Salesforce refused 127.0.0.3, and `check` says so and fails."""
    both = {**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.3"}
    sc = make_sidecar_proc(both)
    assert wait_until(sc.egress_discovered, timeout=10)
    redeem_chain(sc, world.salesforce, 6)  # one of them is refused through .3 and retried through .2
    out = run_check(tmp_path, test_ca, {**both, "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{sc.admin_port}"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Salesforce refused egress IP 127.0.0.3 for app 3MVG9demo" in out.stdout
    report = json.loads(run_check(tmp_path, test_ca, both, "--json", "--admin-url", sc.admin_url).stdout)
    assert report["running_sidecar"] == sc.admin_url and report["ok"] is False
    assert {(r["egress_ip"], r["evidence"]) for r in report["evidence"]} == {("127.0.0.3", "refused"),
                                                                            ("127.0.0.2", "allowed")}
    # No sidecar at the admin URL: the probes alone decide, they pass, and the check says what it did not see.
    alone = run_check(tmp_path, test_ca, both, "--admin-url", "http://127.0.0.1:9")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "No running sidecar answered at http://127.0.0.1:9: this check judged the probe and SIDECAR_ALLOWLIST " \
        "alone" in alone.stdout


def test_check_judges_with_the_running_sidecars_guard_and_never_contradicts_itself(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path, test_ca: TestCA
) -> None:
    """Was: check judged as if the guard observed ("the guard observes" against an enforcing sidecar), a
    FAIL also printed "every egress IP ... is on the allowlist", and with no SIDECAR_ALLOWLIST it failed even
    when Salesforce had accepted both IPs."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())  # enforce, no allowlist typed
    assert wait_until(sc.egress_discovered, timeout=10)
    before = run_check(tmp_path, test_ca, world.pair_env(), "--admin-url", sc.admin_url)
    assert before.returncode == 1  # nothing confirms either IP yet
    assert "FAIL: Egress IP 127.0.0.2 is not confirmed" in before.stdout and "observes" not in before.stdout
    redeem_chain(sc, world.salesforce, 4)  # round-robin: both IPs accepted
    after = run_check(tmp_path, test_ca, world.pair_env(), "--admin-url", sc.admin_url)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "PASS: All 2 pair members are up" in after.stdout and "Salesforce accepted redemptions through" in after.stdout
    assert "Judged with the guard mode (enforce) and the evidence of the running sidecar" in after.stdout
    assert "observes" not in after.stdout
    # Salesforce now refuses .3 for the app (two orgs): the verdict fails, and nothing says all is well.
    world.salesforce.set_allowlist(["127.0.0.2"])
    for org in (world.salesforce.add_org(), world.salesforce.add_org()):
        token = world.salesforce.issue_refresh_token(org)
        with sc.session() as s:
            for _ in range(4):
                resp = redeem(s, token)
                token = resp.json()["refresh_token"] if resp.status_code == 200 else token
    failed = run_check(tmp_path, test_ca, world.pair_env(), "--admin-url", sc.admin_url, "--json")
    report = json.loads(failed.stdout)
    assert failed.returncode == 1 and report["ok"] is False and report["guard"] == "enforce"
    assert report["verdict"]["lines"][0].startswith("Salesforce refused egress IP 127.0.0.3 for app 3MVG9demo: 2 orgs")
    assert not [x for x in report["verdict"]["lines"] if "is on the allowlist" in x or "refused none" in x]
