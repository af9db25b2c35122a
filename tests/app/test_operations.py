"""What an operator sees: probe health when the IP echo is out, the log lines at start and stop, and
one log line per token call. The real sidecar, loopback only."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.harness import SidecarProcess, World, metric_value, redeem, wait_until


def test_an_echo_outage_at_start_is_probe_trouble_not_members_down(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.echo.stop()
    sc = make_sidecar_proc(world.pair_env(), wait_ready=False)
    assert wait_until(lambda: metric_value(sc.metrics(), "egress_sidecar_probes_total", result="echo_failed") >= 2,
                      timeout=15)
    text = sc.metrics()
    for member in world.members:
        assert metric_value(text, "egress_sidecar_pair_member_up", member=member) == 1, member
        assert metric_value(text, "egress_sidecar_probes_total", member=member, result="member_down") == 0
    assert all(m["up"] is True and "502" in (m["last_error"] or "") for m in sc.status()["pair"])
    # Without an allowlist the guard routes on (Salesforce will say which IP it refuses).
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    with sc.session() as s:
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
    world.echo.start()


def test_log_lines_at_start_and_stop(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})
    assert wait_until(sc.egress_discovered, timeout=10)
    lines = [json.loads(x) for x in sc.log_text().splitlines() if x.startswith("{")]
    (not_listed,) = [x for x in lines if "leaves from 127.0.0.3" in x["msg"]]
    assert not_listed["level"] == "warning" and "not on SIDECAR_ALLOWLIST" in not_listed["msg"]
    (listed,) = [x for x in lines if "leaves from 127.0.0.2" in x["msg"]]
    assert listed["level"] == "info"
    with sc.session() as s:
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
    assert sc.stop() == 0
    (stopping,) = [json.loads(x) for x in sc.log_text().splitlines() if '"stopping: ' in x]
    assert stopping["msg"].startswith("stopping: 0 of 0 token call(s) in flight finished")
    assert (stopping["drained"], stopping["abandoned"]) == (0, 0)


def test_observe_mode_says_it_once_per_call(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2", "SIDECAR_GUARD": "observe"})
    assert wait_until(sc.egress_discovered, timeout=10)
    with sc.session() as s:
        for _ in range(4):
            redeem(s, world.salesforce.issue_refresh_token())
    assert wait_until(lambda: len(sc.log_events()) == 4, timeout=5)
    through_3 = [c for c in sc.log_events() if c["egress_ip"] == "127.0.0.3"]
    assert len(through_3) == 2 and all(c["level"] == "warning" and c["guard"] == "not_allowlisted" for c in through_3)
    lines = [json.loads(x) for x in sc.log_text().splitlines() if x.startswith("{")]
    per_call = [x for x in lines if x["level"] == "warning" and x.get("logger", "").startswith("egress_sidecar.route")]
    assert per_call == []  # no second warning line per call: the token_call line says it
