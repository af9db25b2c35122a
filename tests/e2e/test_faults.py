"""Faults and bad input: failover before any byte is sent, a clear 502 after, bounded inputs, and the
sidecar keeps serving through all of it. Every loop is bounded in count and time."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from sidecar.proxy.access import Access
from tests.harness import (
    TOKEN_URL,
    SidecarProcess,
    World,
    metric_value,
    read_until_closed,
    redeem,
    redeem_chain,
    refresh_form,
    wait_until,
)

BOTH = ["127.0.0.2", "127.0.0.3"]


def both_allowlisted(world: World) -> dict[str, str]:
    world.salesforce.set_allowlist(BOTH)
    return {**world.pair_env(), "SIDECAR_ALLOWLIST": ",".join(BOTH)}


def test_refused_member_fails_over_and_is_ejected(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world), "SIDECAR_PROBE_INTERVAL": "30"})
    world.pair.members[1].stop()
    redeem_chain(sc, world.salesforce, 8)
    text = sc.metrics()
    dead = world.members[1]
    assert metric_value(text, "egress_sidecar_member_failures_total", member=dead, reason="refused") == 2
    assert metric_value(text, "egress_sidecar_failovers_total") == 2
    assert f"pair member {dead} ejected for 5s" in sc.log_text()
    assert {r.source_ip for r in world.salesforce.seen} == {"127.0.0.2"}
    moved = [c for c in sc.log_events() if "attempts" in c]
    assert len(moved) == 2 and all(c["attempts"] == [dead, world.members[0]] for c in moved)


def test_connect_error_and_slow_member_fail_over(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world), "SIDECAR_CONNECT_TIMEOUT": "0.5", "SIDECAR_PROBE_INTERVAL": "30"})
    a, b = world.pair.members
    b.refuse_connect_status = 503
    with sc.session() as s:
        assert [redeem(s, world.salesforce.issue_refresh_token()).status_code for _ in range(2)] == [200, 200]
        b.refuse_connect_status = None
        a.connect_delay = 3.0  # accepts TCP, stalls the CONNECT answer past the deadline
        a.restart()  # drops the sidecar's kept-alive connection to a, so the next call must dial it
        started = time.monotonic()
        assert [redeem(s, world.salesforce.issue_refresh_token()).status_code for _ in range(2)] == [200, 200]
        assert time.monotonic() - started < 2.9  # the deadline cut the stalled attempt short
    text = sc.metrics()
    assert metric_value(text, "egress_sidecar_member_failures_total", member=world.members[1], reason="proxy_error") >= 1
    assert metric_value(text, "egress_sidecar_member_failures_total", member=world.members[0], reason="timeout") >= 1


def test_failure_after_send_is_a_clear_502_and_never_retried(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world)})
    for mode in ("close_early", "garbage"):
        world.salesforce.reset_seen()
        world.salesforce.fail_mode = mode
        with sc.session() as s:
            resp = redeem(s, world.salesforce.issue_refresh_token())
        assert resp.status_code == 502
        body = resp.json()
        assert body["error"] == "upstream_failed_after_send" and body["sent_to_salesforce"] == "unknown"
        assert "not retried" in body["error_description"]
        assert len([r for r in world.salesforce.seen if r.path == "/services/oauth2/token"]) == 1
    world.salesforce.fail_mode = None
    with sc.session() as s:
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200  # still serving
    assert metric_value(sc.metrics(), "egress_sidecar_token_requests_total", outcome="upstream_error") == 2
    assert metric_value(sc.metrics(), "egress_sidecar_failovers_total") == 0


def test_no_member_reachable_is_a_502_that_says_nothing_was_sent(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_PROBE_INTERVAL": "30"})
    assert wait_until(sc.egress_discovered, timeout=10)  # both up at the last probe; they stop before the next
    world.pair.stop()
    with sc.session() as s:
        resp = redeem(s, "5Aep861_not_a_real_token")
    assert resp.status_code == 502, resp.text
    body = resp.json()
    assert body["error"] == "upstream_unreachable" and body["sent_to_salesforce"] is False
    assert "safe to retry" in body["error_description"]


def test_bad_token_bodies_are_handled(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world)})
    with sc.session() as s:
        as_json = s.post(TOKEN_URL, json={"grant_type": "refresh_token"}, timeout=10)
        assert as_json.status_code == 400  # forwarded; Salesforce's own answer
        dup = s.post(TOKEN_URL, data="grant_type=refresh_token&grant_type=password", timeout=10,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert dup.status_code == 400
        bad_utf8 = s.post(TOKEN_URL, data=b"grant_type=\xff\xfe&refresh_token=\xc3\x28", timeout=10,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert bad_utf8.status_code == 400
        huge = s.post(TOKEN_URL, data={"grant_type": "refresh_token", "refresh_token": "x" * 100_000}, timeout=10)
        assert huge.status_code == 413 and huge.json()["error"] == "token_request_too_large"
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
    grants = Counter(c["grant_type"] for c in sc.log_events())
    assert grants["other"] >= 3 and grants["refresh_token"] >= 1
    assert not [r for r in world.salesforce.seen if len(r.body) > 90_000]  # the huge one never left


def test_garbage_and_vanishing_clients_do_not_hurt(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world)})
    # Not HTTP at all.
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
        c.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        c.settimeout(5)
        try:
            answer = c.recv(4096)
        except OSError:
            answer = b""
        assert not answer or answer.startswith(b"HTTP/1.1 400")
    # A CONNECT to a token host followed by garbage instead of a TLS ClientHello.
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
        c.sendall(b"CONNECT login.salesforce.com:443 HTTP/1.1\r\nHost: login.salesforce.com:443\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        c.sendall(b"this is not TLS\r\n" * 10)
        c.settimeout(5)
        try:
            c.recv(4096)
        except OSError:
            pass
    # A client that vanishes halfway through a token request body.
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
        c.sendall(b"CONNECT login.salesforce.com:443 HTTP/1.1\r\nHost: login.salesforce.com:443\r\n\r\n")
        c.recv(4096)
        import ssl

        ctx = ssl.create_default_context(cafile=str(sc.ca_bundle))
        with ctx.wrap_socket(c, server_hostname="login.salesforce.com") as tls:
            tls.sendall(b"POST /services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\n"
                        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 500\r\n\r\ngrant_type=ref")
    with sc.session() as s:
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
    assert sc.proc is not None and sc.proc.poll() is None


def test_proxy_auth_required_when_configured(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world), "SIDECAR_PROXY_AUTH": "app:pr0xy-s3cret-pw"})
    with sc.session() as s:
        try:
            s.post(TOKEN_URL, data={"grant_type": "refresh_token"}, timeout=10)
            raise AssertionError("a client without proxy credentials must be refused")
        except requests.exceptions.ProxyError as exc:
            assert "407" in str(exc)
        s.proxies = {"https": f"http://app:wrong-password@127.0.0.1:{sc.proxy_port}"}
        with pytest.raises(requests.exceptions.ProxyError, match="407"):
            s.post(TOKEN_URL, data={"grant_type": "refresh_token"}, timeout=10)
        s.proxies = {"https": f"http://app:pr0xy-s3cret-pw@127.0.0.1:{sc.proxy_port}"}
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
        # A plain-HTTP request without credentials is refused too (mitmproxy checks those).
        plain = requests.get("http://example.invalid/", proxies={"http": sc.proxy_url}, timeout=10)
        assert plain.status_code == 407
    # An authenticated tunnel gets past the credential check; as a shared proxy (SIDECAR_PROXY_AUTH) the
    # sidecar then refuses a loopback destination (a 403 that says why, not a 407).
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
        c.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: x\r\nProxy-Authorization: basic %s\r\n\r\n"
                  % (world.echo.address[1], base64.b64encode(b"app:pr0xy-s3cret-pw")))
        answer = read_until_closed(c)
        assert answer.startswith(b"HTTP/1.1 403") and b"loopback" in answer, answer[:300]
    assert "pr0xy-s3cret-pw" not in sc.log_text() + sc.metrics()


def test_non_loopback_client_is_refused() -> None:
    import asyncio

    import h11

    from addons.client_access import ClientAccess
    from sidecar.proxy.access import Access, is_loopback

    assert is_loopback("127.0.0.9") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.10") and not is_loopback("2001:db8::1") and not is_loopback("nonsense")
    assert not Access(None).admits("192.0.2.10") and Access(None).admits("127.0.0.1")
    assert Access("app:pw").admits("192.0.2.10")  # it must then authenticate

    async def connect(ip: str) -> bool:  # (on the front door's event loop: a refusal's log line is throttled there)
        return ClientAccess(Access(None)).client_connected(ip)

    assert not asyncio.run(connect("192.0.2.10"))
    assert asyncio.run(connect("127.0.0.1"))
    shared = ClientAccess(Access("app:pw"))
    head = h11.Request(method="GET", target="http://example.com/", headers=[("Host", "example.com")])
    refusal = shared.request_head(head)
    assert refusal is not None and isinstance(refusal[0], h11.Response) and refusal[0].status_code == 407
    good = h11.Request(method="GET", target="http://example.com/", headers=[
        ("Host", "example.com"), ("Proxy-Authorization", "Basic " + base64.b64encode(b"app:pw").decode())])
    assert shared.request_head(good) is None


def test_proxy_credentials_are_checked_exactly() -> None:
    access = Access("app:pw")
    good = base64.b64encode(b"app:pw")
    assert access.authorized([(b"Proxy-Authorization", b"Basic " + good)])
    assert access.authorized([(b"proxy-authorization", b"basic " + good)])
    for headers in ([], [(b"Proxy-Authorization", b"Basic " + base64.b64encode(b"app:pw2"))],
                    [(b"Proxy-Authorization", b"Bearer " + good)], [(b"Proxy-Authorization", b"Basic !!!")],
                    [(b"Proxy-Authorization", b"Basic " + good)] * 2):
        assert not access.authorized(headers), headers
    assert Access(None).authorized([])


def test_chaos_member_killed_and_restarted(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    """Steady traffic from 4 clients while member B dies and comes back. No call may fail because of the
    sidecar, except calls already sent through B when it died (each answered with the clear 502)."""
    # Probes every 3 s: traffic meets the dead member first, so passive ejection is what takes it out
    # (a probe that notices first is accepted too: the member is then down, not ejected).
    sc = make_sidecar_proc({**both_allowlisted(world), "SIDECAR_PROBE_INTERVAL": "3"})
    world.salesforce.enforce_allowlist = True
    results: list[tuple[int, dict[str, object] | None]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with sc.session() as s:
            # Steady, paced traffic (an app refreshes now and then, not in a tight loop): the count bound
            # must outlast the whole story (death, ejection, restart, probe, traffic back), whose length
            # is set by the probe interval and the backoff, not by how fast the sidecar answers.
            for _ in range(4000):  # bounded count; also bounded by time through `stop`
                if stop.wait(0.01):
                    return
                try:
                    resp = redeem(s, world.salesforce.issue_refresh_token())
                    body = resp.json() if resp.status_code != 200 else None
                    with lock:
                        results.append((resp.status_code, body))
                except requests.RequestException as exc:
                    with lock:
                        results.append((0, {"error": repr(exc)}))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        world.pair.members[1].stop()
        time.sleep(2.0)
        dead = world.members[1]
        ejected = wait_until(lambda: f"pair member {dead} ejected" in (log := sc.log_text())
                             or f"pair member {dead} is down" in log, timeout=8)
        world.pair.members[1].start()
        readmitted = wait_until(lambda: "re-admitted" in (log := sc.log_text())
                                or f"pair member {dead} is up again" in log, timeout=12)
        before = len(world.salesforce.seen)
        back = wait_until(lambda: any(r.source_ip == "127.0.0.3" for r in world.salesforce.seen[before:]), timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    failures = [(code, body) for code, body in results if code != 200]
    story = f"ejected={ejected} readmitted={readmitted} back={back} calls={len(results)} failures={failures[:5]}"
    assert ejected and readmitted and back, story + "\n" + sc.log_text()[-3000:]
    assert len(results) > 50, story
    for code, body in failures:
        assert code == 502 and body is not None, (code, body, story)
        assert body["error"] == "upstream_failed_after_send", body
        assert dead in str(body["error_description"]), body
    text = sc.metrics()
    if f"pair member {dead} ejected" in sc.log_text():
        assert metric_value(text, "egress_sidecar_member_failures_total", member=dead) >= 2
    assert metric_value(text, "egress_sidecar_pair_member_up", member=dead) == 1  # back up after the probe
    print(f"chaos: {len(results)} calls, {len(failures)} failed after send through the dead member",
          json.dumps(Counter(c for c, _ in results)))


def test_connection_cap_and_idle_timeout(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world), "SIDECAR_MAX_CONNECTIONS": "3", "SIDECAR_IDLE_TIMEOUT": "2"})
    held = [socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as extra:
            extra.sendall(b"CONNECT login.salesforce.com:443 HTTP/1.1\r\nHost: login.salesforce.com:443\r\n\r\n")
            answer = b""
            for _ in range(20):  # bounded: head and body may arrive in separate segments
                chunk = extra.recv(4096)
                answer += chunk
                if not chunk or answer.endswith(b"}"):
                    break
        assert answer.startswith(b"HTTP/1.1 503") and b"SIDECAR_MAX_CONNECTIONS" in answer
        # Clients that never send a whole head get 408 and are closed after SIDECAR_IDLE_TIMEOUT; the slots free up.
        for c in held:
            c.settimeout(10)
            assert read_until_closed(c).startswith(b"HTTP/1.1 408")
    finally:
        for c in held:
            c.close()
    assert wait_until(lambda: _redeem_ok(sc, world), timeout=10)


def _refused_at_cap(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
        extra.sendall(b"CONNECT login.salesforce.com:443 HTTP/1.1\r\nHost: login.salesforce.com:443\r\n\r\n")
        return read_until_closed(extra)


def test_refusals_at_the_cap_are_counted_logged_without_flooding_and_open_connections_shown(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """At SIDECAR_MAX_CONNECTIONS every new client gets 503; each refusal is counted by reason, the log
    says so in one line for a whole burst (a flood of clients cannot flood the log), and a gauge shows
    the connections open."""
    sc = make_sidecar_proc({**both_allowlisted(world), "SIDECAR_MAX_CONNECTIONS": "2"})
    refused = "egress_sidecar_connections_refused_total"
    assert metric_value(sc.metrics(), refused, reason="max_connections") == 0  # at 0 before the first
    held = [socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) for _ in range(2)]
    try:
        assert wait_until(lambda: metric_value(sc.metrics(), "egress_sidecar_client_connections") == 2, timeout=5)
        burst = 30
        for _ in range(burst):
            assert _refused_at_cap(sc.proxy_port).startswith(b"HTTP/1.1 503")
        assert wait_until(lambda: metric_value(sc.metrics(), refused, reason="max_connections") == burst, timeout=5)
        lines = sc.log_events("connections_refused")
        assert 1 <= len(lines) <= 3, lines  # one line, and at most one more per 10 s window the burst took
        first = lines[0]
        assert first["reason"] == "max_connections" and first["limit"] == 2 and first["refused"] >= 1
        assert "SIDECAR_MAX_CONNECTIONS" in first["msg"]
    finally:
        for c in held:
            c.close()
    assert wait_until(lambda: metric_value(sc.metrics(), "egress_sidecar_client_connections") == 0, timeout=5)
    # What the burst's first line did not count is logged when its window ends: nothing is lost.
    assert wait_until(lambda: sum(e["refused"] for e in sc.log_events("connections_refused")) == burst, timeout=15)


def _redeem_ok(sc: SidecarProcess, world: World) -> bool:
    with sc.session() as s:
        return redeem(s, world.salesforce.issue_refresh_token()).status_code == 200


def test_target_errors_fail_over_without_ejecting_the_member(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """A mistyped My Domain makes the members answer the CONNECT with an error; that is not the
    members' fault, so they must stay in service for everyone else's refreshes."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2", "SIDECAR_PROBE_INTERVAL": "30"})
    with sc.session() as s:
        for _ in range(3):
            bad = s.post("https://typo-org.my.salesforce.com/services/oauth2/token",
                         data={"grant_type": "refresh_token", "refresh_token": "x"}, timeout=10)
            assert bad.status_code == 502 and bad.json()["error"] == "upstream_unreachable"
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200
    assert "ejected" not in sc.log_text()
    assert metric_value(sc.metrics(), "egress_sidecar_member_failures_total", reason="proxy_error") == 3


def test_client_leaving_mid_call_does_not_lose_the_record(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    import ssl as ssl_mod

    sc = make_sidecar_proc({**both_allowlisted(world)})
    world.salesforce.slow_seconds = 1.0
    world.salesforce.fail_mode = "slow"
    token = world.salesforce.issue_refresh_token()
    body = refresh_form(token).encode()
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
        c.sendall(b"CONNECT login.salesforce.com:443 HTTP/1.1\r\nHost: login.salesforce.com:443\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        tls = ssl_mod.create_default_context(cafile=str(sc.ca_bundle)).wrap_socket(c, server_hostname="login.salesforce.com")
        tls.sendall(b"POST /services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)
        tls.close()  # the app gives up while Salesforce is still answering
    assert wait_until(lambda: len(sc.log_events()) == 1, timeout=10)
    (call,) = sc.log_events()
    assert call["outcome"] == "success" and call["status"] == 200
    assert metric_value(sc.metrics(), "egress_sidecar_refresh_token_rotations_total", rotated="true") == 1


def test_malformed_token_calls_are_refused_locally(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**both_allowlisted(world), "SIDECAR_ROUTE": "salesforce"})
    with sc.session() as s:
        plain = s.post("http://login.salesforce.com/services/oauth2/token", data={"grant_type": "refresh_token"},
                       timeout=10)
        assert plain.status_code == 400 and plain.json()["error"] == "token_call_not_https"
        chunked_huge = s.post(TOKEN_URL, data=iter([b"grant_type=refresh_token&refresh_token="] + [b"x" * 8192] * 9),
                              timeout=10, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert chunked_huge.status_code == 413 and chunked_huge.json()["error"] == "token_request_too_large"
    assert not [r for r in world.salesforce.seen if r.path.startswith("/services/oauth2/token")]
    calls = sc.log_events()
    assert [c["route"] for c in calls] == ["refused", "refused"]
    assert metric_value(sc.metrics(), "egress_sidecar_token_requests_total", member="none", outcome="client_error") == 2


def test_chunked_token_request_reaches_salesforce_with_a_content_length(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Some Node Salesforce clients always stream the token POST; it is read (bounded) and sent on whole."""
    sc = make_sidecar_proc(both_allowlisted(world))
    token = world.salesforce.issue_refresh_token()
    form = refresh_form(token)
    with sc.session() as s:
        resp = s.post(TOKEN_URL, data=iter([form[:20].encode(), form[20:].encode()]), timeout=10,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200 and resp.json()["refresh_token"] != token
    (seen,) = [r for r in world.salesforce.seen if r.path == "/services/oauth2/token"]
    assert seen.headers["content-length"] == str(len(form)) and "transfer-encoding" not in seen.headers
    assert seen.body == form.encode()
    (call,) = sc.log_events()
    assert (call["grant_type"], call["outcome"]) == ("refresh_token", "success")
