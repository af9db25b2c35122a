"""The upstream side against an origin that misbehaves: interim answers, bad lengths, close-delimited
bodies, bytes past the framed answer; and the sidecar end to end: a token call is sent at most once,
and no call ever reads another exchange's bytes, whatever the origin does."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import h11
import pytest

from sidecar.net.http1 import HttpConnection
from sidecar.net.streams import SocketStream, TlsStream
from sidecar.net.upstream import (
    MAX_INTERIM,
    POOL_IDLE_SECONDS,
    Connector,
    SendFailure,
    UpstreamPool,
    read_answer,
)
from sidecar.sim.certs import TestCA, server_context
from sidecar.token.messages import TokenRequest
from sidecar.token.sender import TokenSender, Unsendable, request_events
from tests.harness import SidecarProcess, redeem
from tests.proxy.tunnels import get, https_via
from tests.scripted_origin import ScriptedOrigin, ok, token_body


def json_response(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"\r\n" + body


def early_hints(n: int, head: bytes) -> list[bytes | float]:
    return [b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n", *ok(n, head)]


def close_delimited(n: int, head: bytes) -> list[bytes | float]:
    body = token_body(n)
    return [json_response(body[:20], b"Connection: close\r\n"), 0.2, body[20:], b"<close>"]


def bad_length(n: int, head: bytes) -> list[bytes | float]:
    return [json_response(token_body(n), b"Content-Length: 1, 2\r\n")]


def token_request(port: int) -> TokenRequest:
    return TokenRequest(
        "localhost", port, "POST", b"/services/oauth2/token",
        [(b"Content-Type", b"application/x-www-form-urlencoded"), (b"Connection", b"keep-alive, X-Drop"),
         (b"X-Drop", b"1"), (b"Proxy-Authorization", b"Basic c2VjcmV0"), (b"Keep-Alive", b"timeout=5")],
        b"grant_type=refresh_token&refresh_token=OLD", owner=1)  # one client: its calls share a connection


async def send_twice(origin: ScriptedOrigin, ca: Path) -> list[tuple[int | None, bytes, str | None]]:
    ctx = ssl.create_default_context(cafile=str(ca))
    pool = UpstreamPool(Connector(None, ctx), connect_timeout=3)
    sender = TokenSender(pool, 5, lambda m, f: None, lambda m: None)
    out = []
    for _ in range(2):
        result = await sender.send(token_request(origin.address[1]), None, lambda tried: None)
        answer = result.answer
        out.append((answer.status if answer else None, answer.body if answer else b"", result.detail))
    pool.close_all()
    return out


@pytest.fixture
def origin_cert(test_ca: TestCA) -> tuple[Path, Path]:
    return test_ca.issue(["localhost"], "scripted")


def test_interim_answers_are_skipped_and_do_not_desync_the_pool(origin_cert: tuple[Path, Path], test_ca: TestCA) -> None:
    with ScriptedOrigin(origin_cert, early_hints) as origin:
        results = asyncio.run(send_twice(origin, test_ca.ca_path))
    assert [(status, body) for status, body, _ in results] == [(200, token_body(1)), (200, token_body(2))]


def test_close_delimited_body_is_read_to_the_end(origin_cert: tuple[Path, Path], test_ca: TestCA) -> None:
    with ScriptedOrigin(origin_cert, close_delimited) as origin:
        results = asyncio.run(send_twice(origin, test_ca.ca_path))
    assert [body for _, body, _ in results] == [token_body(1), token_body(2)]


def test_conflicting_length_is_a_failure_after_send(origin_cert: tuple[Path, Path], test_ca: TestCA) -> None:
    with ScriptedOrigin(origin_cert, bad_length) as origin:
        results = asyncio.run(send_twice(origin, test_ca.ca_path))
    assert all(status is None and "Content-Length" in (detail or "") for status, _, detail in results), results


def test_request_for_salesforce_drops_hop_by_hop_and_keeps_the_raw_target() -> None:
    req = token_request(443)
    req.target = b"/services/oauth2/token?x=%E2%82%ac&y=a+b"
    conn = h11.Connection(h11.CLIENT)
    raw = b"".join(conn.send(e) or b"" for e in request_events(req))
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert raw.startswith(b"POST /services/oauth2/token?x=%E2%82%ac&y=a+b HTTP/1.1\r\n")
    for dropped in (b"proxy-authorization", b"x-drop", b"keep-alive", b"connection:"):
        assert dropped not in head
    assert b"host: localhost\r\n" in head + b"\r\n" and b"content-length: 42" in head
    assert raw.endswith(b"refresh_token=OLD")
    req.headers.append((b"Transfer-Encoding", b"chunked"))  # an app's chunked request goes on with a length
    conn = h11.Connection(h11.CLIENT)
    raw = b"".join(conn.send(e) or b"" for e in request_events(req))
    assert b"transfer-encoding" not in raw.lower() and b"Content-Length: 42" in raw
    req.target = b"/services/oauth2/token?x=\xe2\x82\xac"  # raw UTF-8: not HTTP/1.1, refused before sending
    with pytest.raises(Unsendable):
        request_events(req)


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n12345",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 7 + b"\r\n\r\n" + b"a" * 100])
def test_malformed_answers_raise_send_failure(answer: bytes) -> None:
    async def read() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            http = HttpConnection(await SocketStream.attach(a), h11.CLIENT)
            await http.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x"), (b"Content-Length", b"0")]),
                            h11.EndOfMessage())
            b.sendall(answer)
            b.shutdown(socket.SHUT_WR)
            await read_answer(http, b"POST", cap=64)

    with pytest.raises((SendFailure, ConnectionError)):
        asyncio.run(read())


def test_sidecar_never_sends_a_token_call_twice(
    make_sidecar_proc: Callable[..., SidecarProcess], origin_cert: tuple[Path, Path], test_ca: TestCA
) -> None:
    """Whatever breaks while handling a token call, it is never forwarded on its own (direct, a second
    time, past the guard)."""
    with ScriptedOrigin(origin_cert, bad_length) as origin:
        sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})
        url = f"https://localhost:{origin.address[1]}/services/oauth2/token"
        with sc.session() as s:
            resp = redeem(s, "5Aep861OLD", url=url)
            odd = s.post(url + "?x=%E2%82%AC\u20ac", data={"grant_type": "refresh_token", "refresh_token": "OLD2"},
                         timeout=10)
        assert resp.status_code == 502 and resp.json()["sent_to_salesforce"] == "unknown"
        assert odd.status_code == 502
        assert len(origin.requests) == 2, origin.requests
    assert "Traceback" not in sc.log_text() and "Addon error" not in sc.log_text()


# -- a pooled connection is reused only when nothing of another exchange is on it --------------------
def leaky(n: int, head: bytes) -> list[bytes | float]:
    """An origin that sends bytes past the answers it frames, in the same write and a moment later."""
    path = head.split(b" ", 2)[1]
    stray = json_response(b'{"stray":"answer"}', b"Content-Length: 18\r\n")
    if path == b"/services/oauth2/token":
        return ok(n, head)
    if path == b"/no-content":  # a 204 with a body, in the same write
        return [b"HTTP/1.1 204 No Content\r\n\r\n" + stray]
    if path == b"/head":  # a HEAD answer with a body, a moment later
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n", 0.05, b'{"stray":"answer"}']
    if path == b"/twice":  # an unsolicited second response, in the same write
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + stray]
    if path == b"/twice-later":  # an unsolicited second response, a moment later
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0.05, stray]
    return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]


@pytest.mark.parametrize("method,path", [("GET", "/no-content"), ("HEAD", "/head"), ("GET", "/twice"),
                                         ("GET", "/twice-later")])
def test_no_call_ever_reads_another_exchanges_bytes(
    make_sidecar_proc: Callable[..., SidecarProcess], origin_cert: tuple[Path, Path], method: str, path: str
) -> None:
    with ScriptedOrigin(origin_cert, leaky) as origin:
        sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})
        port = origin.address[1]
        url = f"https://localhost:{port}/services/oauth2/token"
        conn = https_via(sc, port)
        try:
            status, body, _ = get(conn, method, path)
            assert status in (200, 204) and b"stray" not in body
        finally:
            conn.close()
        time.sleep(0.3)  # the late stray bytes are on the pooled connection by now: it must not be reused
        with sc.session() as s:  # another client's token calls and REST calls, on the same pool key
            for i in range(3):
                resp = redeem(s, f"5Aep861RT{i}", url=url)
                assert resp.status_code == 200 and b"stray" not in resp.content, resp.content
                assert resp.json()["access_token"].startswith("AT")
                plain = s.get(f"https://localhost:{port}/plain", timeout=10)
                assert (plain.status_code, plain.content) == (200, b"ok")
    calls = sc.log_events()
    assert len(calls) == 3 and all(c["outcome"] == "success" for c in calls)


class _IdleConn:
    def __init__(self, last_used: float) -> None:
        self.last_used = last_used
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_pool_forgets_hosts_it_no_longer_uses() -> None:
    """Idle connections past POOL_IDLE_SECONDS are closed, and a host (or a client) with none left is
    forgotten, even if it is never asked for again (one per org's My Domain would otherwise pile up,
    sockets and all); a client connection that ends takes its idle connections with it."""
    pool = UpstreamPool(Connector(None, ssl.create_default_context()), 1.0)
    now = time.monotonic()
    stale = [_IdleConn(now - POOL_IDLE_SECONDS - 5) for _ in range(3)]
    fresh, spare, gone = _IdleConn(now - 1), _IdleConn(now - POOL_IDLE_SECONDS - 1), _IdleConn(now - 1)
    token_key = ("token", None, "login.salesforce.com", 443, "login.salesforce.com")
    pool._idle[7] = {("other", None, "acme.my.salesforce.com", 443, "acme.my.salesforce.com"): deque(stale),
                     token_key: deque([fresh])}
    pool._idle[None] = {token_key: deque([spare])}
    pool._idle[8] = {token_key: deque([gone])}
    pool._sweep(now)
    assert all(c.closed for c in stale) and spare.closed and not fresh.closed
    assert pool._idle == {7: {token_key: deque([fresh])}, 8: {token_key: deque([gone])}}
    pool.forget(8)
    assert gone.closed and list(pool._idle) == [7]


# -- interim answers and conflicting framing (issue 24) ------------------------------------------------
def interim_flood(n: int, head: bytes) -> list[bytes | float]:
    """More `102 Processing` answers than anyone waits for, then the answer."""
    return [b"HTTP/1.1 102 Processing\r\n\r\n" * (MAX_INTERIM + 1), *ok(n, head)]


def both_lengths(n: int, head: bytes) -> list[bytes | float]:
    """An answer framed two ways at once (a valid chunked body, and a Content-Length): response splitting."""
    return [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]


def test_a_token_call_stops_at_as_many_interim_answers_as_the_forwarder(
    origin_cert: tuple[Path, Path], test_ca: TestCA
) -> None:
    """Was: read_answer skipped every 1xx its loop bound allowed (about a million; 20,000 `102`s were
    measured) while the forwarder stops at MAX_INTERIM. Both now stop there: a failure after send."""
    with ScriptedOrigin(origin_cert, interim_flood) as origin:
        results = asyncio.run(send_twice(origin, test_ca.ca_path))
    assert all(status is None and "interim" in (detail or "") for status, _, detail in results), results


def test_an_answer_with_both_content_length_and_transfer_encoding_is_a_502(
    make_sidecar_proc: Callable[..., SidecarProcess], origin_cert: tuple[Path, Path]
) -> None:
    """Was: h11 reads such an answer by its Transfer-Encoding and the app got it (or, when the body did
    not parse as chunks, a 200 head and nothing). RFC 9112 6.3 calls it response splitting and says it
    ought to be handled as an error: a 502, on the token path and on the forwarder alike."""
    with ScriptedOrigin(origin_cert, both_lengths) as origin:
        sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})
        port = origin.address[1]
        conn = https_via(sc, port)
        try:
            status, body, _ = get(conn, "GET", "/services/data/")
        finally:
            conn.close()
        assert status == 502 and b"Transfer-Encoding" in body and b"hello" not in body, body
        with sc.session() as s:
            resp = redeem(s, "5Aep861BOTH", url=f"https://localhost:{port}/services/oauth2/token")
        assert resp.status_code == 502 and resp.json()["sent_to_salesforce"] == "unknown", resp.text
        assert "Transfer-Encoding" in resp.json()["error_description"]


# -- a late unsolicited answer never reaches another caller (issue 24) --------------------------------
FORGED = b'{"access_token":"FORGED","refresh_token":"FORGED","instance_url":"https://x","token_type":"Bearer"}'


def late_second_answer(n: int, head: bytes) -> list[bytes | float]:
    """The first request is answered, then, 0.6 s later, answered again with a forged 200 nobody asked for
    (the origin reads nothing meanwhile); every later request gets its own answer."""
    answer = ok(n, head) if head.split(b" ", 2)[1] == b"/services/oauth2/token" else \
        [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nA%03d" % n]
    if n == 1:
        return [*answer, 0.6, json_response(FORGED, b"Content-Length: %d\r\n" % len(FORGED))]
    return answer


@pytest.mark.parametrize("path", ["/services/oauth2/token", "/services/data/"])
def test_a_late_unsolicited_answer_never_reaches_another_caller(
    make_sidecar_proc: Callable[..., SidecarProcess], origin_cert: tuple[Path, Path], path: str
) -> None:
    """Was: call A's connection went back to the shared pool; call B (another client) took it at 0.35 s,
    when nothing had arrived on it yet, wrote its request, and read the forged answer the origin sent at
    0.6 s; its own answer, behind it, was thrown away with the connection. Same on the forwarder's pool.
    Checking at the moment of reuse cannot catch bytes that arrive after the request left, so an
    upstream connection now carries one client connection's exchanges only, and a new client gets a
    spare connection that never carried any."""
    with ScriptedOrigin(origin_cert, late_second_answer) as origin:
        sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})
        url = f"https://localhost:{origin.address[1]}{path}"
        token = path.endswith("/token")
        bodies = []
        for i in range(2):  # A, then B on a new client connection, 0.35 s after A's answer
            with sc.session() as s:
                resp = redeem(s, f"5Aep861LATE{i}", url=url) if token else s.get(url, timeout=15)
            assert resp.status_code == 200, resp.text
            bodies.append(resp.content)
            time.sleep(0.35)
    assert b"FORGED" not in bodies[1], bodies
    assert bodies == ([token_body(1), token_body(2)] if token else [b"A001", b"A002"]), bodies
    assert len(set(origin.connection_of)) == 2  # B's request went on a connection of its own


def test_one_client_connection_keeps_reusing_its_own_upstream_connection(
    make_sidecar_proc: Callable[..., SidecarProcess], origin_cert: tuple[Path, Path]
) -> None:
    """Keep-alive is kept where it is safe: a client's calls on one connection share one upstream
    connection (here three token calls, on one origin connection; at most one more is opened, a spare
    for the next client)."""
    with ScriptedOrigin(origin_cert, ok) as origin:
        sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})
        url = f"https://localhost:{origin.address[1]}/services/oauth2/token"
        with sc.session() as s:
            for i in range(3):
                assert redeem(s, f"5Aep861KEEP{i}", url=url).status_code == 200
    assert len(set(origin.connection_of)) == 1 and origin.connections <= 2, (origin.connection_of,
                                                                              origin.connections)


def test_a_tls_connection_that_got_only_session_tickets_is_idle_and_data_is_never_lost(
    origin_cert: tuple[Path, Path], test_ca: TestCA
) -> None:
    """A spare (a connection opened ahead, never used) has TLS 1.3 session tickets waiting on its socket,
    which are TLS's own messages, not data: it is idle and clean (was: "readable", so every spare was
    thrown away). Data that arrives unasked makes it readable, and is kept for the next read."""
    listener = socket.create_server(("127.0.0.1", 0))
    go = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with server_context(*origin_cert).wrap_socket(conn, server_side=True) as tls:
            go.wait(10)
            tls.sendall(b"unasked")
            go.clear()
            go.wait(10)

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    async def run() -> tuple[bool, bool, bytes]:
        sock = socket.create_connection(listener.getsockname(), timeout=5)
        sock.setblocking(False)
        stream = TlsStream.client(await SocketStream.attach(sock), ssl.create_default_context(cafile=str(test_ca.ca_path)),
                                  "localhost")
        try:
            await stream.handshake()
            await asyncio.sleep(0.3)  # the tickets have arrived
            idle = not stream.readable_now()
            go.set()
            for _ in range(50):  # bounded: until the data is there
                if stream.readable_now():
                    break
                await asyncio.sleep(0.05)
            return idle, stream.readable_now(), await stream.recv()
        finally:
            go.set()
            stream.close()

    try:
        assert asyncio.run(run()) == (True, True, b"unasked")
    finally:
        listener.close()
        server.join(5)
