"""The admin probes a platform reads: ``/serving`` (the proxy listens and is not draining: what the
Kubernetes readiness probe asks), ``/readyz`` (a refresh could be routed now: for operators) and
``/healthz`` (the process serves). Real sidecar, real pair and Salesforce simulators, loopback only."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from sidecar.state.audit import AUDIT_FILE, count_calls
from tests.harness import (
    SidecarProcess,
    World,
    free_port,
    redeem,
    redeem_in_background,
    wait_until,
)


def probe(sc: SidecarProcess, path: str) -> tuple[int, dict]:
    """(status, JSON body) of an admin probe; (0, {}) when nothing answers any more."""
    try:
        with urllib.request.urlopen(sc.admin_url + path, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def test_serving_stays_200_while_quotaguard_is_down_and_readyz_is_503(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """A QuotaGuard outage (both members refuse connections) makes /readyz 503 with the guard enforcing,
    yet /serving, what the shipped readiness probe asks, stays 200: the app behind the sidecar keeps
    its Service endpoints, since its inbound traffic does not depend on the sidecar's upstream."""
    dead = [f"127.0.0.{i}:{free_port(f'127.0.0.{i}')}" for i in (2, 3)]
    env = {**world.pair_env(), "SIDECAR_PAIR": ",".join(dead), "SIDECAR_GUARD": "enforce"}
    sc = make_sidecar_proc(env, wait_ready=False)
    assert wait_until(lambda: probe(sc, "/status")[0] == 200 and sc.status()["pair"][0]["up"] is False, timeout=20)
    status, body = probe(sc, "/readyz")
    assert status == 503 and body["ready"] is False and body["reason"]
    status, body = probe(sc, "/serving")
    assert (status, body) == (200, {"serving": True, "reason": "ok"})


def test_serving_answers_like_readyz_and_is_listed(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """/serving answers with the same JSON shape as /readyz, and names the endpoint list on a 404."""
    sc = make_sidecar_proc(world.pair_env())
    assert probe(sc, "/serving") == (200, {"serving": True, "reason": "ok"})
    status, body = probe(sc, "/nope")
    assert status == 404 and "/serving" in body["endpoints"]


def test_during_the_sigterm_drain_readyz_and_serving_answer_503_with_a_reason(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """While a SIGTERM drain waits for a token call in flight, both probes say 503 and why, so the
    platform stops sending new traffic; the call in flight still gets its answer."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    assert probe(sc, "/readyz")[0] == 200 and probe(sc, "/serving")[0] == 200
    world.salesforce.slow_seconds = 4.0
    world.salesforce.fail_mode = "slow"
    t, result = redeem_in_background(sc, world)
    try:
        # The sidecar opens a connection to Salesforce only for a token call: one open is one in flight.
        assert wait_until(lambda: world.salesforce.open_connections >= 1, timeout=10)
        assert sc.proc is not None
        sc.proc.send_signal(signal.SIGTERM)
        seen: dict[str, tuple[int, dict]] = {}

        def both_draining() -> bool:
            for path in ("/readyz", "/serving"):
                status, body = probe(sc, path)
                if status == 503:
                    seen[path] = (status, body)
            return len(seen) == 2

        assert wait_until(both_draining, timeout=3, interval=0.05), seen
        assert "draining" in seen["/readyz"][1]["reason"] and seen["/readyz"][1]["ready"] is False
        assert "draining" in seen["/serving"][1]["reason"] and seen["/serving"][1]["serving"] is False
    finally:
        t.join(timeout=20)
    assert sc.proc.wait(timeout=20) == 0
    assert result.get("status") == 200, result



def test_a_sigterm_stop_leaves_every_answered_call_in_the_log_and_the_audit_trail(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Records are applied in batches after the answers (sidecar/token/bookkeeping.py): the real process,
    stopped by SIGTERM right after its last answers (three of them answered during the drain), has written
    one log line and one audit row for every call. (tests/token/test_bookkeeping.py pins the flush itself
    with a batch held an hour.)"""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    with sc.session() as s:
        for _ in range(5):
            assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
    world.salesforce.slow_seconds = 1.5
    world.salesforce.fail_mode = "slow"
    calls = [redeem_in_background(sc, world) for _ in range(3)]
    try:
        assert wait_until(lambda: world.salesforce.open_connections >= 3, timeout=10)
        time.sleep(0.3)  # (the last request on its way: Salesforce holds each for 1.5 s)
        assert sc.proc is not None
        sc.proc.send_signal(signal.SIGTERM)
    finally:
        for t, _ in calls:
            t.join(timeout=20)
    assert sc.proc.wait(timeout=20) == 0
    assert [result.get("status") for _, result in calls] == [200] * 3
    assert [line["outcome"] for line in sc.log_events()] == ["success"] * 8
    assert count_calls(sc.confdir / AUDIT_FILE) == 8
