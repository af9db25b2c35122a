"""Egress verified per connection (sidecar/egress/verify.py): the egress IP of each connection a token call
takes is asked on that very connection, so the guard works whatever QuotaGuard's layout: one address per
static IP, or one load-balanced address in front of both. And when an assumption behind it fails, the
sidecar says so and sends the call as the plain recipe would. Real sidecar, loopback simulators."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.sim.certs import TestCA
from sidecar.sim.quotaguard import FakeQuotaGuardBalancer
from tests.harness import (
    ECHO_HOST,
    ROOT,
    SidecarProcess,
    World,
    metric_value,
    redeem,
    sidecar_env,
    wait_until,
)

TOKEN = "/services/oauth2/token"


@pytest.fixture
def balancer(world: World) -> Iterator[FakeQuotaGuardBalancer]:
    with FakeQuotaGuardBalancer(world.pair.members) as lb:
        yield lb


def balanced_env(lb: FakeQuotaGuardBalancer, **extra: str) -> dict[str, str]:
    return {"QUOTAGUARDSTATIC_URL": lb.url, "SIDECAR_ECHO_URL": f"http://{ECHO_HOST}/", **extra}


def refused(world: World) -> list[str]:
    return [r.source_ip for r in world.salesforce.seen if r.path == TOKEN and r.status == 400]


def test_one_load_balanced_address_works_like_a_pair(
    world: World, balancer: FakeQuotaGuardBalancer, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Salesforce allows only .2; QUOTAGUARDSTATIC_URL is one address that balances each connection to
    either static IP; SIDECAR_ALLOWLIST=127.0.0.2: every refresh succeeds, Salesforce sees no refusal,
    and every call's log line names the egress IP verified on its own connection."""
    sc = make_sidecar_proc(balanced_env(balancer, SIDECAR_ALLOWLIST="127.0.0.2"))
    world.salesforce.reset_seen()
    with sc.session() as s:
        for _ in range(20):
            token = world.salesforce.issue_refresh_token()
            assert redeem(s, token).status_code == 200
            s.close()  # a new client connection each time, so the sidecar's pool is asked again
    assert refused(world) == []
    assert wait_until(lambda: len(sc.log_events()) == 20, timeout=10)
    calls = sc.log_events()
    assert all((c["egress_ip"], c["egress"], c["outcome"]) == ("127.0.0.2", "verified", "success")
                         for c in calls), calls
    # the balancer sent some of the sidecar's connections to .3: those were turned down, not used
    assert {h.source_ip for h in world.echo.hits} == {"127.0.0.2", "127.0.0.3"}
    text = sc.metrics()
    assert metric_value(text, "egress_sidecar_egress_checks_total", result="verified") >= 1
    assert metric_value(text, "egress_sidecar_egress_verified", member=f"{balancer.address[0]}:{balancer.address[1]}") == 1
    [member] = sc.status()["pair"]
    assert member["verification"]["mode"] == "per_connection"
    assert member["verification"]["egress_ips_seen"] == ["127.0.0.2", "127.0.0.3"]


def test_a_load_balanced_address_learns_the_allowlist_from_salesforce_without_a_typed_one(
    world: World, balancer: FakeQuotaGuardBalancer, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """No allowlist typed: the first refusal through .3 (retried at once through a .2 connection, so the app
    sees no failure) teaches the guard; later calls never leave from .3 again."""
    sc = make_sidecar_proc(balanced_env(balancer, SIDECAR_GUARD="enforce"))
    world.salesforce.reset_seen()
    with sc.session() as s:
        for _ in range(16):
            assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
            s.close()
    assert len(refused(world)) <= 1 and set(refused(world)) <= {"127.0.0.3"}
    assert wait_until(lambda: len(sc.log_events()) == 16, timeout=10)
    calls = sc.log_events()
    assert Counter(c["egress_ip"] for c in calls) == Counter({"127.0.0.2": 16})


def test_the_pooled_connection_pays_the_question_once(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Two members, each its own IP: a kept-alive connection is verified when it is opened, never again (the
    count does not grow with the calls: one connection per member, and the spare opened ahead for the
    next client)."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.3"})
    assert wait_until(sc.egress_discovered, timeout=10)
    checks = []
    with sc.session() as s:
        for _ in range(2):
            for _ in range(5):
                assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
            time.sleep(0.3)  # the spares opened in the background are in
            checks.append(metric_value(sc.metrics(), "egress_sidecar_egress_checks_total", result="verified"))
    assert 1 <= checks[0] <= 4 and checks[1] == checks[0], checks
    assert wait_until(lambda: len(sc.log_events()) == 10, timeout=10)
    calls = sc.log_events()
    assert {c["egress"] for c in calls} == {"verified"}


def test_a_member_that_refuses_a_connect_after_a_request_falls_back_to_unverified(
    world: World, balancer: FakeQuotaGuardBalancer, make_sidecar_proc: Callable[..., SidecarProcess],
    tmp_path: Path, test_ca: TestCA
) -> None:
    """The assumption fails (the proxy will not open a tunnel on a connection that carried the question):
    the call is sent all the same, as plain HTTPS_PROXY would, with the safe retry behind it; the log,
    /status, the metric and check say the egress is unverified. Never a 503 the plain recipe would not give."""
    for member in world.pair.members:
        member.refuse_connect_after_request = 405
    # (probes only at start: a probe connection between a refused call and its retry would take the balancer's
    # next turn, and the retry, blind, could land on the refused IP again)
    sc = make_sidecar_proc(balanced_env(balancer, SIDECAR_ALLOWLIST="127.0.0.2", SIDECAR_PROBE_INTERVAL="600"))
    world.salesforce.reset_seen()
    statuses = []
    with sc.session() as s:
        for _ in range(6):
            statuses.append(redeem(s, world.salesforce.issue_refresh_token()).status_code)
            s.close()
    assert 503 not in statuses  # never a refusal the plain recipe would not give
    assert statuses.count(200) >= 3, statuses
    label = f"{balancer.address[0]}:{balancer.address[1]}"
    assert wait_until(lambda: metric_value(sc.metrics(), "egress_sidecar_egress_verified", member=label) == 0, timeout=5)
    assert metric_value(sc.metrics(), "egress_sidecar_egress_checks_total", member=label, result="connect_refused") >= 1
    assert "egress unverified" in sc.log_text()
    assert wait_until(lambda: len(sc.log_events()) == 6, timeout=10)
    calls = sc.log_events()
    assert {c["egress"] for c in calls} == {"unverified"} and {c["egress_ip"] for c in calls} == {"unverified"}
    # a refusal through an unverified connection is sent once more on another connection (which may leave
    # from the other IP): the safe retry behind every call
    assert all(c.get("retried_from") for c in calls if c["outcome"] != "success"), calls
    [member] = sc.status()["pair"]
    assert member["verification"]["mode"] == "unverified" and "tunnel" in member["verification"]["reason"]
    out = run_check(tmp_path, test_ca, balanced_env(balancer), "--admin-url", sc.admin_url)
    assert "unverified" in out.stdout, out.stdout


def run_check(tmp_path: Path, test_ca: TestCA, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "check", *args], env=sidecar_env(tmp_path, test_ca.ca_path, env),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_check_says_which_layout_it_found(
    world: World, balancer: FakeQuotaGuardBalancer, tmp_path: Path, test_ca: TestCA
) -> None:
    for env, expected in ((world.pair_env(), "one address per egress IP"), (balanced_env(balancer), "load-balanced")):
        report = json.loads(run_check(tmp_path, test_ca, env, "--json").stdout)
        assert expected in report["layout"], report
