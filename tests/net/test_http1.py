"""The HTTP/1.1 codec every side shares (sidecar/net/http1.py): h11 plus the checks stricter than h11, over
real sockets (a socketpair), with hypothesis throwing arbitrary bytes at it."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.net.http1 import (
    MAX_HEAD,
    HttpConnection,
    ProtocolError,
    closing_response,
    end_to_end,
    tokens,
)
from sidecar.net.streams import SocketStream


async def _serve(data: bytes, *, role: type[h11.CLIENT] | type[h11.SERVER] = h11.SERVER) -> list[h11.Event]:
    """The events an HttpConnection reads from ``data`` (then EOF)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        conn = HttpConnection(await SocketStream.attach(a), role)
        if role is h11.CLIENT:
            await conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")]), h11.EndOfMessage())
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        events: list[h11.Event] = []
        for _ in range(1000):  # bounded
            event = await asyncio.wait_for(conn.next_event(), 5)
            events.append(event)
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return events


def serve(data: bytes, **kw: object) -> list[h11.Event]:
    return asyncio.run(_serve(data, **kw))  # type: ignore[arg-type]


def test_a_request_and_its_body_in_pieces_chunked_or_not() -> None:
    events = serve(b"POST /t?x=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert isinstance(events[0], h11.Request) and events[0].target == b"/t?x=1"
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"abc"
    events = serve(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello")
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"hello"


def test_bare_lf_heads_are_accepted() -> None:
    (request, end) = serve(b"GET / HTTP/1.1\nHost: h\n\n")
    assert isinstance(request, h11.Request) and isinstance(end, h11.EndOfMessage)


@pytest.mark.parametrize("data,status", [
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n", 400),  # obsolete line folding
    (b"GET / HTTP/1.1\nHost: h\nX: a\n\tfolded\n\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", 431),
    (b"GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 needs a Host
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS where HTTP was expected
])
def test_what_a_careful_server_refuses(data: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        serve(data)
    assert info.value.status == status and info.value.message


def test_a_response_with_folded_headers_from_a_server_is_refused_too() -> None:
    with pytest.raises(ProtocolError):
        serve(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n", role=h11.CLIENT)


def test_a_peer_leaving_mid_message_is_not_a_protocol_error() -> None:
    with pytest.raises(ConnectionError):
        serve(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_events_or_a_clear_error(data: bytes) -> None:
    try:
        serve(data)
    except ProtocolError as exc:
        assert exc.status in (400, 431, 501) and exc.message
    except ConnectionError:
        pass  # the bytes ended in the middle of a message


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"Connection", b"Keep-Alive", b"X-A", b"TE", b"Upgrade", b"Host", b"X-B"]),
                max_size=6), st.sampled_from([b"close", b"X-A", b"x-b, keep-alive", b""]))
def test_end_to_end_never_passes_a_hop_by_hop_header(names: list[bytes], connection: bytes) -> None:
    headers = [(n, b"v") for n in names] + [(b"Connection", connection)]
    kept = end_to_end(headers)
    dropped = {b"connection", b"keep-alive", b"te", b"upgrade"} | tokens(headers, b"connection")
    assert all(k.lower() not in dropped for k, _ in kept)
    assert [k for k, _ in kept] == [n for n in names if n.lower() not in dropped]


def test_the_sidecars_own_answers_are_framed_by_h11() -> None:
    raw = closing_response(503, b"application/json", b"{}")
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Retry-After: 1\r\n" in raw and b"Content-Length: 2\r\n" in raw and b"Connection: close\r\n" in raw
    assert raw.endswith(b"\r\n\r\n{}")


def test_a_connection_with_unread_bytes_is_not_reusable() -> None:
    async def run() -> tuple[bool, bool]:
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            conn = HttpConnection(await SocketStream.attach(a), h11.CLIENT)
            results = []
            for extra in (b"", b"HTTP/1.1 200 OK\r\n"):
                await conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")]), h11.EndOfMessage())
                b.sendall(b"HTTP/1.1 204 No Content\r\n\r\n" + extra)
                for _ in range(5):
                    if isinstance(await conn.next_event(), h11.EndOfMessage):
                        break
                results.append(conn.next_cycle() and conn.reusable())
            return results[0], results[1]

    assert asyncio.run(run()) == (True, False)


def test_a_malformed_body_found_without_reading_is_reported_with_its_details() -> None:
    """buffered_event() (no I/O) meets the bad chunk first; next_event() then says what h11 said of it,
    not h11's vaguer second word ("peer state is ERROR")."""
    async def run() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            conn = HttpConnection(await SocketStream.attach(a), h11.SERVER)
            b.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            assert isinstance(await asyncio.wait_for(conn.next_event(), 5), h11.Request)
            assert conn.buffered_event() is None
            with pytest.raises(ProtocolError) as caught:
                await asyncio.wait_for(conn.next_event(), 5)
            assert caught.value.status == 400 and "chunk" in caught.value.message
            assert "zz" not in caught.value.message  # h11 quotes the bytes; they never reach an answer

    asyncio.run(run())


def test_events_from_parsed_headers_skip_only_the_per_header_check() -> None:
    """request_event/response_event rely on h11's private ``_parsed`` flag (its reader passes it the same way):
    this fails on an h11 that drops or changes it. The bytes written are the same either way; without
    ``parsed`` a bad header is refused as before; with it, framing is still normalised and checked."""
    from sidecar.net.http1 import request_event, response_event

    headers = [(b"Host", b"login.salesforce.com"), (b"Content-Type", b"application/x-www-form-urlencoded"),
               (b"Content-Length", b"3")]
    for parsed in (True, False):
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(request_event(b"POST", b"/services/oauth2/token", headers, parsed=parsed))
        assert out == (b"POST /services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\r\n")
        server = h11.Connection(h11.SERVER)
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        server.next_event()
        out = server.send(response_event(200, b"OK", [(b"X-A", b"1"), (b"Content-Length", b"0")], parsed=parsed))
        assert out == b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(h11.LocalProtocolError):
        request_event(b"POST", b"/", [(b"Host", b"x"), (b"X-A", b"a\r\nX-B: b")], parsed=False)
    with pytest.raises(h11.LocalProtocolError):  # framing is checked even for parsed headers
        response_event(200, b"OK", [(b"Content-Length", b"1"), (b"Content-Length", b"2")], parsed=True)
    with pytest.raises(h11.LocalProtocolError):
        request_event(b"POST", b"/a b", [(b"Host", b"x")], parsed=True)  # and the target


def test_a_token_call_without_a_host_header_gets_one_that_is_checked() -> None:
    from sidecar.token.messages import TokenRequest
    from sidecar.token.sender import Unsendable, request_events

    req = TokenRequest("login.salesforce.com", 443, "POST", b"/services/oauth2/token", [], b"x=1", parsed=True)
    head = request_events(req)[0]
    assert isinstance(head, h11.Request) and (b"host", b"login.salesforce.com") in list(head.headers)
    bad = TokenRequest("login\x00.my.salesforce.com", 443, "POST", b"/services/oauth2/token", [], b"x=1", parsed=True)
    with pytest.raises(Unsendable):
        request_events(bad)


def test_the_bench_times_a_real_exchange_with_the_sidecar_s_own_event_builders() -> None:
    """bench/hotspots.py times h11 on the exchange the lane and the sender or forwarder run, built with
    sidecar.net.http1's builders: each exchange must pass the app's request and the server's answer on byte
    for byte (header names as written, in order), several times over the same connections (keep-alive), and
    the clock must split what it measured into parsing and serialising. No timing is asserted here."""
    import h11

    from bench.hotspots import CODEC_CASES, exchange

    for request, answer in CODEC_CASES.values():
        server, client = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
        clock = [0.0, 0.0]
        for _ in range(3):
            assert exchange(server, client, request, answer, clock) == (request, answer)
        assert clock[0] > 0 and clock[1] > 0  # both halves were timed (a swapped or dropped step shows here)


def test_a_tls_stream_says_end_at_once_after_the_peer_s_close_notify() -> None:
    """The peer sends close_notify but keeps TCP open: the first recv() says b"" and so does every later one,
    at once (not after waiting on a socket that will bring nothing more)."""
    import ssl
    import subprocess
    import tempfile
    from pathlib import Path

    from sidecar.net.streams import TlsStream

    with tempfile.TemporaryDirectory() as tmp:
        key, cert = Path(tmp, "k.pem"), Path(tmp, "c.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
                       check=True, capture_output=True, timeout=30)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context(cafile=str(cert))

        async def run() -> None:
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            with a, b:
                server = TlsStream.server(await SocketStream.attach(a), server_ctx)
                client = TlsStream.client(await SocketStream.attach(b), client_ctx, "localhost")
                await asyncio.wait_for(asyncio.gather(server.handshake(), client.handshake()), 10)
                await client.send(b"hello")
                assert await asyncio.wait_for(server.recv(), 5) == b"hello"
                with contextlib.suppress(ssl.SSLWantReadError):
                    client.obj.unwrap()  # close_notify, the TCP connection stays open
                await client._flush()
                assert await asyncio.wait_for(server.recv(), 5) == b""
                assert await asyncio.wait_for(server.recv(), 1) == b""  # again, at once

        asyncio.run(run())


def test_leftover_and_expects_continue_tell_callers_what_h11_holds() -> None:
    """The bytes past a CONNECT head are the tunnel's (the front door hands them to TLS or a pipe), and a
    request with ``Expect: 100-continue`` waits for an interim answer until its body is read."""
    async def run(first: bytes, then: bytes) -> list[tuple[type, bytes, bool]]:
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            conn = HttpConnection(await SocketStream.attach(a), h11.SERVER)
            try:
                seen = []
                for data in (first, then):
                    b.sendall(data)
                    event = await asyncio.wait_for(conn.next_event(), 5)
                    seen.append((type(event), conn.leftover, conn.expects_continue))
                    if isinstance(event, h11.Request) and event.method == b"CONNECT":
                        break
                return seen
            finally:
                conn.stream.close()

    assert asyncio.run(run(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01hello", b"")) == [
        (h11.Request, b"\x16\x03\x01hello", False)]
    assert asyncio.run(run(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
                           b"ok")) == [(h11.Request, b"", True), (h11.Data, b"", False)]
