"""An ISV's app: one External Client App, many customer orgs. Salesforce's "ip restricted" answer does not
say whether the app's allowlist or the org's own restrictions refused the IP, so the sidecar keeps the
evidence per org, concludes "refused for the app" only when orgs agree, keeps a refusal until a success
disproves it, and shares it through Redis with every replica.

The simulated Salesforce names each grant's org in its answers and lets an org restrict the IPs its
grants are redeemed from, with the same answer the app's allowlist gives. Real sidecar processes, a
real redis-server, the guard enforcing with no SIDECAR_ALLOWLIST (the default with a pair)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sidecar.sim.certs import TestCA
from sidecar.sim.salesforce import FakeSalesforce
from tests.harness import (
    ROOT,
    SidecarProcess,
    World,
    metric_value,
    redeem,
    sidecar_env,
    wait_until,
)
from tests.redis_server import REDIS_KEY, RedisServer, redis_dump

GOOD, BAD = "127.0.0.2", "127.0.0.3"
BOTH = [GOOD, BAD]


class Grant:
    """One org's grant, redeemed as a correct app does (it keeps the rotated token, or the old one on a failure)."""

    def __init__(self, salesforce: FakeSalesforce, org: str) -> None:
        self.org, self.token = org, salesforce.issue_refresh_token(org)
        self.statuses: list[int] = []

    def redeem(self, sc: SidecarProcess) -> int:
        with sc.session() as s:
            resp = redeem(s, self.token)
        if resp.status_code == 200:
            self.token = resp.json()["refresh_token"]
        self.statuses.append(resp.status_code)
        return resp.status_code


def through(world: World, org: str) -> Counter[tuple[str, int | None]]:
    """What Salesforce saw of one org's redemptions: (source IP, status) counts."""
    return Counter((r.source_ip, r.status) for r in world.salesforce.seen if r.org_id == org and r.grant_type == "refresh_token")


def refused_rows(sc: SidecarProcess) -> list[dict[str, object]]:
    return [r for r in sc.status()["evidence"] if r["evidence"] == "refused"]


def test_one_orgs_own_restriction_costs_that_org_at_most_one_failure_and_leaves_the_ip_to_the_others(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sf = world.salesforce
    sf.set_allowlist(BOTH)  # the app's allowlist has both IPs; org B's own Login IP Ranges refuse 127.0.0.3
    a, b = sf.add_org(), sf.add_org(ip_ranges=[GOOD])
    sc = make_sidecar_proc(world.pair_env())
    assert wait_until(sc.egress_discovered, timeout=10)
    grant_a, grant_b = Grant(sf, a), Grant(sf, b)
    for i in range(30):  # (B redeems more often, so the round-robin sends it through both IPs)
        grant_a.redeem(sc)
        grant_b.redeem(sc)
        if i % 3 == 0:
            grant_b.redeem(sc)
    assert grant_b.statuses.count(400) <= 1 and grant_b.statuses.count(200) >= 39, grant_b.statuses
    assert grant_a.statuses == [200] * 30
    seen_a, seen_b = through(world, a), through(world, b)
    assert seen_a[(BAD, 200)] >= 5, seen_a  # org A keeps using both IPs
    assert seen_b[(BAD, 400)] == 1 and not seen_b[(BAD, 200)], seen_b  # B was refused once, then kept off .3
    status = sc.status()
    (row,) = refused_rows(sc)
    assert (row["egress_ip"], row["scope"], row["orgs"]) == (BAD, "org", [f"org {b}"])
    assert status["verdict"]["level"] == "warning"
    (line,) = [x for x in status["verdict"]["lines"] if x.startswith(f"Salesforce refused egress IP {BAD}")]
    assert f"org {b} only" in line and "customer's side" in line and a not in line
    (bad_row,) = [r for r in status["pair"] if r["egress_ip"] == BAD]
    assert bad_row["salesforce"] == {"says": "accepted", "apps_refused": [], "orgs_refused": [f"org {b}"]}
    text = sc.metrics()
    assert metric_value(text, "egress_sidecar_egress_ip_refused", egress_ip=BAD) == 0
    assert metric_value(text, "egress_sidecar_egress_ip_org_refused", egress_ip=BAD) == 1
    assert metric_value(text, "egress_sidecar_allowlist_disagreement", egress_ip=BAD) == 0
    assert f"org {b}" in sc.log_text() and "the fix is on the customer's side" in sc.log_text()


def test_a_partial_app_allowlist_seen_by_two_orgs_is_reported_for_the_app(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sf = world.salesforce  # the app's allowlist holds only 127.0.0.2
    a, b, c = sf.add_org(), sf.add_org(), sf.add_org()
    sc = make_sidecar_proc(world.pair_env())
    assert wait_until(sc.egress_discovered, timeout=10)
    grant_a, grant_b = Grant(sf, a), Grant(sf, b)
    for _ in range(6):
        grant_a.redeem(sc)
        grant_b.redeem(sc)
    assert grant_a.statuses == grant_b.statuses == [200] * 6  # each refusal was sent again through .2
    assert through(world, a)[(BAD, 400)] == 1 and through(world, b)[(BAD, 400)] == 1
    (row,) = refused_rows(sc)
    assert (row["egress_ip"], row["scope"], sorted(row["orgs"])) == (BAD, "app", sorted([f"org {a}", f"org {b}"]))
    status = sc.status()
    assert status["verdict"]["level"] == "critical"
    (line,) = [x for x in status["verdict"]["lines"] if x.startswith(f"Salesforce refused egress IP {BAD} for app")]
    assert "2 orgs were refused through it" in line and "Refresh Token IP Allowlist" in line
    assert metric_value(sc.metrics(), "egress_sidecar_egress_ip_refused", egress_ip=BAD) == 1
    # Refused for the app: a third org never tries it.
    grant_c = Grant(sf, c)
    for _ in range(8):
        grant_c.redeem(sc)
    assert grant_c.statuses == [200] * 8 and set(through(world, c)) == {(GOOD, 200)}


def test_a_refusal_is_still_reported_nine_seconds_after_a_five_second_ttl(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path, test_ca: TestCA
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_EVIDENCE_TTL": "5"})
    assert wait_until(sc.egress_discovered, timeout=10)
    grant = Grant(world.salesforce, world.salesforce.org_id)
    for _ in range(4):
        assert grant.redeem(sc) == 200
    (last,) = [r.at for r in world.salesforce.seen if r.status == 400]
    assert wait_until(lambda: time.time() >= last + 9, timeout=15, interval=0.2)
    status = sc.status()
    assert status["verdict"]["level"] != "ok"
    assert any(f"egress IP {BAD}" in line and "re-test goes with the next redemption" in line
               for line in status["verdict"]["lines"]), status["verdict"]["lines"]
    assert metric_value(sc.metrics(), "egress_sidecar_egress_ip_refused", egress_ip=BAD) == 1
    env = sidecar_env(tmp_path, test_ca.ca_path, world.pair_env())
    out = subprocess.run([sys.executable, "-m", "sidecar", "check", "--admin-url", sc.admin_url], env=env,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"FAIL: Salesforce refused egress IP {BAD}" in out.stdout
    assert "is on the allowlist" not in out.stdout and "PASS" not in out.stdout
    # The re-test: the next redemptions send one through .3 (refused again, sent again through .2), no more.
    world.salesforce.reset_seen()
    for _ in range(4):
        assert grant.redeem(sc) == 200
    assert Counter((r.source_ip, r.status) for r in world.salesforce.seen) == {(GOOD, 200): 4, (BAD, 400): 1}
    assert [c["guard"] for c in sc.log_events()].count("retest") == 1


def test_two_replicas_on_one_redis_share_what_salesforce_refused(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], redis_server: Callable[[], RedisServer]
) -> None:
    sf = world.salesforce  # the app's allowlist holds only 127.0.0.2
    url = redis_server().url
    env = {**world.pair_env(), "SIDECAR_REDIS_URL": url, "SIDECAR_REDIS_KEY": REDIS_KEY}
    one, two = make_sidecar_proc(env, name="one"), make_sidecar_proc(env, name="two")
    assert wait_until(one.egress_discovered, timeout=10) and wait_until(two.egress_discovered, timeout=10)
    a, b, c = sf.add_org(), sf.add_org(), sf.add_org()
    grant_a = Grant(sf, a)
    for _ in range(4):
        grant_a.redeem(one)
    assert through(world, a)[(BAD, 400)] == 1  # replica one met the refusal (org A's, not proven the app's)
    # Replica two continues org A's grant (rotated by replica one): nothing through the refused IP.
    sf.reset_seen()
    for _ in range(8):
        assert grant_a.redeem(two) == 200
    assert set(through(world, a)) == {(GOOD, 200)}
    # A second org refused through replica one makes the IP refused for the app, on every replica.
    grant_b = Grant(sf, b)
    for _ in range(4):
        grant_b.redeem(one)
    assert through(world, b)[(BAD, 400)] == 1
    sf.reset_seen()
    grant_c = Grant(sf, c)
    for _ in range(8):
        assert grant_c.redeem(two) == 200
    assert set(through(world, c)) == {(GOOD, 200)}
    assert not [line for line in two.log_text().splitlines() if "Salesforce refused" in line]  # two met none itself
    (row,) = refused_rows(two)
    assert (row["egress_ip"], row["scope"]) == (BAD, "app")
    assert metric_value(two.metrics(), "egress_sidecar_egress_ip_refused", egress_ip=BAD) == 1
    # A replica started now knows it at once.
    three = make_sidecar_proc(env, name="three")
    assert [(r["egress_ip"], r["scope"]) for r in refused_rows(three)] == [(BAD, "app")]
    # Sealed: Redis holds no org id or user id in clear.
    dumped = b"\n".join(redis_dump(url))
    assert not [o for o in (a, b, c) if o.encode() in dumped]
    assert not [u for u in (sf.user_of(a), sf.user_of(b)) if u.encode() in dumped]
    assert json.dumps(one.status()).count(a) >= 1  # (the status page names them)
