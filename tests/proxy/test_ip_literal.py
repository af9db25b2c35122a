"""Token calls in a tunnel to an IP literal whose TLS SNI is a token host (only a look at the ClientHello
tells it is one): the front door reads the SNI and the lane serves them like any token call, connecting
to the IP with the SNI's name. Detection, guard, sender and record are wired as for a CONNECT to the name."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from sidecar.net.streams import SocketStream
from sidecar.proxy.relay import UnfinishedHello, client_hello_sni
from tests.harness import (
    SF_HOST,
    SidecarProcess,
    World,
    metric_value,
    read_until_closed,
    refresh_form,
    wait_until,
)


def via_ip_literal(sc: SidecarProcess, world: World, hello_after: float = 0.0) -> http.client.HTTPConnection:
    """An HTTPS connection to Salesforce's IP (CONNECT 127.0.0.1:PORT) with SNI login.salesforce.com, its
    ClientHello sent ``hello_after`` seconds after the CONNECT's answer."""
    raw = socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10)
    target = f"127.0.0.1:{world.salesforce.address[1]}"
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(hello_after)
    tls = ssl.create_default_context(cafile=str(sc.ca_bundle)).wrap_socket(raw, server_hostname=SF_HOST)
    conn = http.client.HTTPConnection(SF_HOST, timeout=10)
    conn.sock = tls
    return conn


def post(conn: http.client.HTTPConnection, body: str | list[bytes], chunked: bool = False) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Host": SF_HOST}
    conn.request("POST", "/services/oauth2/token", body=iter(body) if chunked else body, headers=headers,
                 encode_chunked=chunked)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_token_calls_to_an_ip_literal_take_the_core_path(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})  # enforce
    world.salesforce.reset_seen()
    conn = via_ip_literal(sc, world)
    try:
        for _ in range(4):  # the guard keeps every one on the allowlisted member
            status, body = post(conn, refresh_form(world.salesforce.issue_refresh_token()))
            assert status == 200, body
        form = refresh_form(world.salesforce.issue_refresh_token()).encode()
        status, _ = post(conn, [form[:10], form[10:]], chunked=True)  # a streamed body, sent on whole
        assert status == 200
        conn.request("GET", "/services/data/", headers={"Host": SF_HOST})  # not a token call: direct
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
    finally:
        conn.close()
    token_sources = [r.source_ip for r in world.salesforce.seen if r.path == "/services/oauth2/token"]
    assert token_sources == ["127.0.0.2"] * 5
    assert [r.headers.get("content-length") for r in world.salesforce.seen][-2] == str(len(form))
    assert [r.source_ip for r in world.salesforce.seen if r.path == "/services/data/"] == ["127.0.0.1"]
    calls = sc.log_events()
    assert len(calls) == 5 and {(c["egress_ip"], c["outcome"], c["guard"]) for c in calls} == {
        ("127.0.0.2", "success", "allow")}
    assert metric_value(sc.metrics(), "egress_sidecar_token_requests_total", egress_ip="127.0.0.2",
                        outcome="success") == 5


def test_a_late_client_hello_to_an_ip_literal_with_a_token_sni_is_intercepted_and_recorded(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """A client may send its ClientHello well after the CONNECT's answer (a busy process, a slow TLS start):
    the front door waits for it as long as for a request head. Was: after 1 s the tunnel was relayed as
    "server speaks first", and the token call inside left from the host's own IP, unguarded and unrecorded."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})  # enforce
    world.salesforce.reset_seen()
    conn = via_ip_literal(sc, world, hello_after=1.5)
    try:
        status, body = post(conn, refresh_form(world.salesforce.issue_refresh_token()))
    finally:
        conn.close()
    assert status == 200, body
    assert [r.source_ip for r in world.salesforce.seen if r.path == "/services/oauth2/token"] == ["127.0.0.2"]
    assert [(c["route"], c["egress_ip"], c["outcome"]) for c in sc.log_events()] == [("pair", "127.0.0.2", "success")]
    metrics = sc.metrics()
    assert metric_value(metrics, "egress_sidecar_intercepted_connections_total") == 1
    assert metric_value(metrics, "egress_sidecar_tunnels_total") == 0


def test_ip_literal_token_calls_are_blocked_and_reported_like_any_other(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.9"}, wait_ready=False)
    assert wait_until(sc.egress_discovered, timeout=10)  # no member is allowlisted
    conn = via_ip_literal(sc, world)
    try:
        status, body = post(conn, refresh_form(world.salesforce.issue_refresh_token()))
    finally:
        conn.close()
    assert status == 503 and b"egress_not_allowlisted" in body
    assert not [r for r in world.salesforce.seen if r.path == "/services/oauth2/token"]

    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc2 = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.3"})
    world.salesforce.fail_mode = "close_early"
    world.salesforce.reset_seen()
    conn = via_ip_literal(sc2, world)
    try:
        status, body = post(conn, refresh_form(world.salesforce.issue_refresh_token()))
    finally:
        conn.close()
        world.salesforce.fail_mode = None
    assert status == 502 and b"upstream_failed_after_send" in body
    assert len([r for r in world.salesforce.seen if r.path == "/services/oauth2/token"]) == 1  # never resent
    assert [c["outcome"] for c in sc.log_events()] == ["blocked"]
    assert [c["outcome"] for c in sc2.log_events()] == ["upstream_error"]


def test_a_tunnel_to_an_ip_literal_with_another_sni_is_relayed_untouched(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc(world.pair_env())
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as raw:
        target = f"127.0.0.1:{world.salesforce.address[1]}"
        raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        # The fake Salesforce's own certificate, checked against the test CA: not intercepted.
        ctx = ssl.create_default_context(cafile=str(sc.env["SIDECAR_UPSTREAM_CA"]))
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /services/data/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert read_until_closed(tls).startswith(b"HTTP/1.1 200")
    assert not sc.log_events()


# -- found by independent reviews of this module; each test failed before its fix --------------------
CHUNK = 64 * 1024


# Was: mitmproxy read a chunked token body whole before any addon could cap it (2 MiB here, any size in
# fact). The lane answers 413 past 64 KiB.
def test_a_chunked_token_call_to_an_ip_literal_is_cut_at_the_cap_not_read_whole(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """The lane answers 413 once a chunked token request passes 64 KiB (README: "a chunked body is read
    up to the cap"). Through mitmproxy (a tunnel to an IP literal with a token host's SNI) the sidecar
    keeps reading and holding the body: here 2 MiB without an answer (any size: only the idle timeout
    ends it), so a client can make the sidecar hold as much memory as it sends."""
    sc = make_sidecar_proc(world.pair_env())
    conn = via_ip_literal(sc, world)
    tls = conn.sock
    try:
        tls.sendall(b"POST /services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(32):  # 2 MiB, no last chunk
            tls.sendall(b"%x\r\n" % CHUNK + b"a" * CHUNK + b"\r\n")
        tls.settimeout(3.0)  # the lane has answered long before
        try:
            answer = tls.recv(4096)
        except TimeoutError:
            answer = b"<still reading>"
        except (OSError, ssl.SSLError):
            answer = b""
    finally:
        conn.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert not [r for r in world.salesforce.seen if r.path == "/services/oauth2/token"]


# Was: mitmproxy 12 has no head size limit; a head that kept growing was held whole, in memory. The lane
# answers 431 past 64 KiB and closes.
def test_a_request_head_to_an_ip_literal_is_capped_like_everywhere_else(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc(world.pair_env())
    conn = via_ip_literal(sc, world)
    tls = conn.sock
    answer = b"<still reading>"
    try:
        tls.sendall(b"GET /services/data/ HTTP/1.1\r\nHost: login.salesforce.com\r\nX-Pad: ")
        for _ in range(8):  # an 8 MiB header, never finished
            tls.sendall(b"a" * (1 << 20))
        tls.settimeout(3.0)
        answer = tls.recv(4096)
    except TimeoutError:
        pass
    except (OSError, ssl.SSLError):
        answer = b""  # cut: what the lane does past 64 KiB (after its 431)
    finally:
        conn.close()
    assert answer == b"" or answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:200]


# -- issue 24: a short first message that cannot be TLS is relayed at once --------------------------
def _sni_of(first: bytes, deadline: float = 5.0) -> tuple[str | None, bytes] | str:
    """What client_hello_sni makes of a client that sends ``first`` and then waits for an answer."""
    async def look() -> tuple[str | None, bytes] | str:
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            b.sendall(first)
            stream = await SocketStream.attach(a)
            try:
                return await client_hello_sni(stream, b"", deadline)
            except UnfinishedHello:
                return "unfinished"
            finally:
                stream.close()

    return asyncio.run(look())


@pytest.mark.parametrize("first", [b"hi\n", b"\x00", b"\x16\x04", b"\x16\x03\x09", b"PING"])
def test_a_short_message_that_cannot_be_tls_is_relayed_at_once(first: bytes) -> None:
    """Was: fewer than 5 bytes (a TLS record header) were waited on until the head deadline, then the
    tunnel was closed as an unfinished ClientHello: a protocol whose client speaks first with a short
    message (`hi\\n`, a 4-byte `PING`) never got through an IP-literal tunnel. A message whose first
    bytes cannot start a TLS record (0x16, 0x03, 0x00-0x03) is relayed as it came."""
    assert _sni_of(first) == (None, first)


@pytest.mark.parametrize("first", [b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x02"])
def test_a_short_prefix_of_a_tls_record_still_waits_for_the_whole_hello(first: bytes) -> None:
    """A prefix of a valid TLS record header may be a token host's ClientHello sent in pieces: never
    relayed as is (it would leave unguarded), so it waits, and closes at the deadline."""
    assert _sni_of(first, deadline=0.5) == "unfinished"
