"""The token lane (sidecar/proxy/lane.py, sidecar/proxy/forward.py): connections to token host names are served
without mitmproxy's per-request machinery. Token calls must stay visible on every connection; everything
else on those hosts must pass through as a proxy should (streamed, framed right, errors clear)."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.sim.certs import TestCA
from tests.harness import (
    SidecarProcess,
    World,
    free_port,
    metric_value,
    read_until_closed,
    redeem,
    wait_until,
)
from tests.proxy.tunnels import get, https_via, read_all, tls_tunnel
from tests.scripted_origin import ScriptedOrigin, ok, token_body

BIG = 16 * 1024 * 1024


# -- end to end: a direct-mode sidecar with token host "localhost" in front of a scripted origin -------
def by_path(n: int, head: bytes) -> list[bytes | float]:
    path = head.split(b" ", 2)[1]
    if path == b"/services/oauth2/token":
        return ok(n, head)
    if path == b"/chunked":
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Origin: 1\r\n\r\n5\r\nhello\r\n",
                0.05, b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"]
    if path == b"/head":
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"]
    if path == b"/empty":
        return [b"HTTP/1.1 204 No Content\r\n\r\n"]
    if path == b"/big":
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG, b"z" * BIG]
    if path == b"/echo-length":
        body = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body]
    if path == b"/close-delimited":
        return [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil", 0.05, b" the end", b"<close>"]
    if path == b"/garbage":
        return [b"SPDY/9 lol\r\n\r\n"]
    if path == b"/hangup":
        return [b"<close>"]
    if path == b"/then-close":  # keep-alive answer, then the server drops the connection anyway
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0.1, b"<close>"]
    if path == b"/upgrade":
        return [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nserver-hello",
                b"<close>"]
    return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]


@pytest.fixture
def origin(test_ca: TestCA) -> Iterator[ScriptedOrigin]:
    with ScriptedOrigin(test_ca.issue(["localhost"], "lane-origin"), by_path) as server:
        yield server


@pytest.fixture
def lane_sidecar(make_sidecar_proc: Callable[..., SidecarProcess]) -> SidecarProcess:
    return make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})


def test_token_calls_stay_visible_among_other_requests_on_one_connection(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    sc, port = lane_sidecar, origin.address[1]
    conn = https_via(sc, port)
    try:
        status, body, resp = get(conn, "GET", "/chunked")
        assert (status, body, resp.getheader("X-Origin")) == (200, b"hello world", "1"), body
        status, body, resp = get(conn, "HEAD", "/head")
        assert (status, body, resp.getheader("Content-Length")) == (200, b"", "1234")
        assert get(conn, "GET", "/empty")[:2] == (204, b"")
        form = b"grant_type=refresh_token&refresh_token=RT-lane-secret&client_id=cid"
        status, body, _ = get(conn, "POST", "/services/oauth2/token", form,
                              {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200 and body == token_body(4)
        assert get(conn, "GET", "/plain")[:2] == (200, b"ok")
    finally:
        conn.close()
    paths = [req.split(b" ", 2)[1] for _, req in origin.requests]
    assert paths == [b"/chunked", b"/head", b"/empty", b"/services/oauth2/token", b"/plain"]
    (call,) = sc.log_events()
    assert (call["grant_type"], call["route"], call["outcome"]) == ("refresh_token", "direct", "success")
    # One client connection served all five requests, and it was the lane's (mitmproxy counts its own).
    assert metric_value(sc.metrics(), "egress_sidecar_intercepted_connections_total") == 1
    assert "RT-lane-secret" not in sc.log_text() + sc.metrics()
    token_head = origin.requests[3][1]
    assert b"Proxy-Connection" not in token_head and b"\r\nHost: localhost:%d\r\n" % port in token_head


def test_large_bodies_stream_both_ways(lane_sidecar: SidecarProcess, origin: ScriptedOrigin) -> None:
    sc, port = lane_sidecar, origin.address[1]
    conn = https_via(sc, port)
    try:
        status, body, _ = get(conn, "GET", "/big")
        assert status == 200 and len(body) == BIG and body.count(b"z") == BIG
        upload = [bytes([i % 251]) * 65536 for i in range(64)]  # 4 MiB, sent chunked
        conn.request("POST", "/upload", body=iter(upload), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok")
    finally:
        conn.close()
    received = origin.requests[-1][1].split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(received).digest() == hashlib.sha256(b"".join(upload)).digest()


def test_expect_continue_close_delimited_and_upgrade(lane_sidecar: SidecarProcess, origin: ScriptedOrigin) -> None:
    sc, port = lane_sidecar, origin.address[1]
    with tls_tunnel(sc, port) as tls:
        tls.sendall(b"POST /echo-length HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                    b"Expect: 100-continue\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        tls.sendall(b"hello")
        answer = b""
        for _ in range(20):  # bounded
            answer += tls.recv(4096)
            if answer.endswith(b"\r\n\r\n") or b"Content-Length: 0" in answer:
                break
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"Expect" not in origin.requests[-1][1]
        # A close-delimited answer reaches the client re-framed (chunked), so its connection can live on.
        tls.sendall(b"GET /close-delimited HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = read_all(tls)
        assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
        assert b"Transfer-Encoding: chunked" in answer and answer.endswith(b"5\r\nuntil\r\n8\r\n the end\r\n0\r\n\r\n")
    with tls_tunnel(sc, port) as tls:
        tls.sendall(b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        answer = read_all(tls)
        assert answer.startswith(b"HTTP/1.1 101") and answer.endswith(b"server-hello")
    assert b"Upgrade: websocket" in origin.requests[-1][1]


def test_heads_split_across_records_and_pipelined_requests(lane_sidecar: SidecarProcess,
                                                           origin: ScriptedOrigin) -> None:
    """Each sendall is its own TLS record: a head in pieces must be put together (a regression: the
    lane once spun on its own buffer here, freezing the whole sidecar), and two requests in one
    record must both be answered, in order."""
    sc, port = lane_sidecar, origin.address[1]
    with tls_tunnel(sc, port) as tls:
        for piece in (b"GET /pla", b"in HTTP/1.1\r\nHo", b"st: localhost\r\n", b"\r\n"):
            tls.sendall(piece)
            time.sleep(0.05)
        tls.sendall(b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n"
                    b"GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = read_all(tls)
    assert answer.count(b"HTTP/1.1 200 OK") == 3 and answer.endswith(b"ok"), answer
    assert len(origin.requests) == 3


def test_origin_failures_are_clear_502s_and_the_lane_keeps_serving(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    sc, port = lane_sidecar, origin.address[1]
    for path in ("/garbage", "/hangup"):
        conn = https_via(sc, port)
        try:
            status, body, _ = get(conn, "GET", path)
        finally:
            conn.close()
        assert status == 502 and body.startswith(b"egress-sidecar: "), (path, body)
    # A keep-alive connection the server drops behind our back is replaced, not reported to the app.
    conn = https_via(sc, port)
    try:
        for _ in range(3):
            assert get(conn, "GET", "/then-close")[:2] == (200, b"ok")
            time.sleep(0.3)
    finally:
        conn.close()
    assert sum(1 for _, r in origin.requests if b"/then-close" in r) == 3
    # Nothing is left to a port nobody listens on.
    dead_port = free_port()  # nobody listens there
    conn = https_via(sc, dead_port)
    try:
        status, body, _ = get(conn, "GET", "/")
    finally:
        conn.close()
    assert status == 502 and b"cannot connect" in body
    assert sc.proc is not None and sc.proc.poll() is None


def test_malformed_requests_get_clear_errors(lane_sidecar: SidecarProcess, origin: ScriptedOrigin) -> None:
    sc, port = lane_sidecar, origin.address[1]
    cases = [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", b"400"),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400"),
    ]
    for request, status in cases:
        with tls_tunnel(sc, port) as tls:
            tls.sendall(request)
            answer = read_all(tls)
        assert answer.startswith(b"HTTP/1.1 " + status), (request[:40], answer[:80])
        assert b"egress-sidecar: " in answer
    # The chunked one was on its way when its framing broke; no other request reached the origin.
    assert all(b"/x" in r for _, r in origin.requests)
    conn = https_via(sc, port)
    try:
        assert get(conn, "GET", "/plain")[:2] == (200, b"ok")
    finally:
        conn.close()


def test_client_that_does_not_trust_the_ca_is_explained_in_the_log(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin, tmp_path: Path, test_ca: TestCA
) -> None:
    other = TestCA(tmp_path / "other-ca")
    conn = https_via(lane_sidecar, origin.address[1], ca=other.ca_path)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("GET", "/plain")
    finally:
        conn.close()
    assert wait_until(lambda: "trust the sidecar's CA" in lane_sidecar.log_text(), timeout=5)
    assert not origin.requests


def test_idle_lane_connection_is_closed(make_sidecar_proc: Callable[..., SidecarProcess],
                                        origin: ScriptedOrigin) -> None:
    sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost", "SIDECAR_IDLE_TIMEOUT": "1"})
    with tls_tunnel(sc, origin.address[1]) as tls:
        tls.sendall(b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        for _ in range(10):  # bounded: head and body may come in separate records
            answer += tls.recv(4096)
            if answer.endswith(b"ok"):
                break
        assert answer.endswith(b"ok")
        tls.settimeout(10)
        started = time.monotonic()
        assert read_all(tls) == b""
        assert time.monotonic() - started < 8


def test_token_call_abandoned_mid_body_is_recorded_as_the_clients_error(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    sc, port = lane_sidecar, origin.address[1]
    with tls_tunnel(sc, port) as tls:
        tls.sendall(b"POST /services/oauth2/token HTTP/1.1\r\nHost: localhost\r\nContent-Length: 300\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\n\r\ngrant_type=refresh_token&refresh_t")
        time.sleep(0.2)
    assert wait_until(lambda: len(sc.log_events()) == 1, timeout=10)
    (call,) = sc.log_events()
    assert (call["outcome"], call["route"], call["member"]) == ("client_error", "refused", "none")
    assert "nothing was sent" in call["detail"]
    assert not origin.requests
    # Oversized token requests are refused on the lane too, declared or chunked, before any byte leaves.
    chunked_body = b"".join(b"%x\r\n%s\r\n" % (8192, b"x" * 8192) for _ in range(9)) + b"0\r\n\r\n"
    for extra, body in ((b"Content-Length: 70000\r\n", b""), (b"Transfer-Encoding: chunked\r\n", chunked_body)):
        with tls_tunnel(sc, port) as tls:
            tls.sendall(b"POST /services/oauth2/token HTTP/1.1\r\nHost: localhost\r\n" + extra + b"\r\n" + body)
            answer = read_all(tls)
        assert answer.startswith(b"HTTP/1.1 413") and b"Connection: close" in answer, answer[:200]
    assert not origin.requests
    assert wait_until(lambda: len(sc.log_events()) == 3, timeout=10)


def test_certificate_name_shares_one_wildcard_per_pattern() -> None:
    from sidecar.token.hosts import TokenHosts

    hosts = TokenHosts(["login.salesforce.com", "*.my.salesforce.com", "*.sandbox.my.salesforce.com"])
    assert hosts.certificate_name("acme.my.salesforce.com") == "*.my.salesforce.com"
    assert hosts.certificate_name("Other.My.Salesforce.Com.") == "*.my.salesforce.com"
    assert hosts.certificate_name("acme--dev.sandbox.my.salesforce.com") == "*.sandbox.my.salesforce.com"
    assert hosts.certificate_name("login.salesforce.com") == "login.salesforce.com"


def test_every_org_my_domain_is_served_under_one_wildcard_certificate(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    orgs = ("acme.my.salesforce.com", "globex.my.salesforce.com")
    for org in orgs:  # both orgs' My Domains lead to the one fake Salesforce
        world.pair.set_route((org, 443), world.salesforce.address)
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    leaves = []
    for org in orgs:
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as raw:
            raw.sendall(f"CONNECT {org}:443 HTTP/1.1\r\nHost: {org}:443\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            ctx = ssl.create_default_context(cafile=str(sc.ca_bundle))
            with ctx.wrap_socket(raw, server_hostname=org) as tls:  # verifies the name against the wildcard
                leaves.append(tls.getpeercert(binary_form=True))
        with sc.session() as s:
            assert redeem(s, world.salesforce.issue_refresh_token(), url=f"https://{org}/services/oauth2/token").ok
    assert leaves[0] == leaves[1]
    assert [c["host_class"] for c in sc.log_events()] == ["my_domain", "my_domain"]


def test_a_token_call_under_an_experience_cloud_site_path_leaves_from_the_pair_and_is_recorded(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Experience Cloud sites serve OAuth under the site's path (``/customers/services/oauth2/token``): such a
    call is a token call like any other (guarded, sent through the pair, recorded), never forwarded as an
    ordinary request from the host's own IP."""
    site = "acme.my.site.com"
    world.pair.set_route((site, 443), world.salesforce.address)
    # SIDECAR_ROUTE=salesforce only so that, were the call not recognised, its ordinary forward would still
    # go through the pair (a direct one would look the name up in real DNS); token calls ignore the setting.
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2", "SIDECAR_ROUTE": "salesforce"})
    world.salesforce.reset_seen()
    paths = ["/customers/services/oauth2/token", "/s/services/oauth2/token"]
    with sc.session() as s:
        for path in paths:
            resp = redeem(s, world.salesforce.issue_refresh_token(), url=f"https://{site}{path}")
            assert resp.status_code == 200, resp.text
    assert [(r.path, r.source_ip) for r in world.salesforce.seen] == [(p, "127.0.0.2") for p in paths]
    calls = sc.log_events()
    assert [(c["host_class"], c["route"], c["egress_ip"], c["outcome"]) for c in calls] == [
        ("experience_cloud", "pair", "127.0.0.2", "success")] * 2
    assert metric_value(sc.metrics(), "egress_sidecar_token_requests_total", egress_ip="127.0.0.2",
                        outcome="success") == 2


# -- found by independent reviews of this module; each test failed before its fix --------------------
SECRET = "00DrEvIeWsEcReT!AQ0123456789"


@pytest.fixture
def ok_origin(test_ca: TestCA) -> Iterator[ScriptedOrigin]:
    with ScriptedOrigin(test_ca.issue(["localhost"], "lane-review2-origin"), ok) as server:
        yield server


def test_a_malformed_request_never_puts_its_secrets_in_the_log_or_the_error(
    lane_sidecar: SidecarProcess, ok_origin: ScriptedOrigin
) -> None:
    """Was: a request h11 refuses is answered and logged with h11's message, which quotes the offending
    line whole: an access token in the query string of a bad request line, or in a header line without
    its colon, went into the sidecar's log (and back into the 400)."""
    malformed = (
        b"GET /services/data/v64.0/sobjects?access_token=%s HTTP/1.1 x\r\nHost: localhost\r\n\r\n",
        b"GET /services/data/v64.0/ HTTP/1.1\r\nHost: localhost\r\nAuthorization Bearer %s\r\n\r\n",
        b"GET /services/data/v64.0/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\x00\r\n\r\n",
    )
    for head in malformed:
        with tls_tunnel(lane_sidecar, ok_origin.address[1]) as tls:
            tls.settimeout(10)
            tls.sendall(head % SECRET.encode())
            answer = read_all(tls)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert SECRET.encode() not in answer, answer
    # The first head, read by the front door: the proxy password of a malformed Proxy-Authorization line.
    with socket.create_connection(("127.0.0.1", lane_sidecar.proxy_port), timeout=10) as c:
        c.sendall(b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\nProxy-Authorization Basic %s\r\n\r\n"
                  % SECRET.encode())
        answer = read_until_closed(c)
    assert answer.startswith(b"HTTP/1.1 400") and SECRET.encode() not in answer, answer
    assert "refused a malformed request" in lane_sidecar.log_text()  # (the lane did log them)
    assert SECRET not in lane_sidecar.log_text()
    assert not ok_origin.requests


def test_a_connect_to_a_host_name_no_resolver_accepts_gets_an_answer(
    make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Was: a label over 63 characters or an empty one (``ex..ample.com``) made the resolver raise
    UnicodeError, which nothing caught: the client's CONNECT got no answer at all (a bare close) and the
    sidecar logged an unexpected error. On a token host (``*.my.salesforce.com``) the same name reached
    the lane, whose token calls were answered "sent: unknown" although nothing had been sent."""
    sc = make_sidecar_proc({})
    for target in ("a" * 64 + ".example.com:443", "ex..ample.com:443", "a" * 64 + ".my.salesforce.com:443"):
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
            c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            answer = read_until_closed(c)
        assert answer.startswith(b"HTTP/1.1 400"), (target, answer)
    assert "UnicodeError" not in sc.log_text()
