"""Which path serves what, and that no request gets past the front door's limits on the way: token
calls only ever by the core (whether they came as a CONNECT to a name, to an IP literal with a token
SNI, or as a plain proxy request), plain non-token requests forwarded request by request on a keep-alive
connection whose every head the front door reads under the same cap and deadline. Real sidecar, the
simulated pair and Salesforce, loopback only."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from sidecar.sim.certs import TestCA
from tests.harness import (
    SF_HOST,
    SidecarProcess,
    World,
    metric_value,
    read_until_closed,
    refresh_form,
    wait_until,
)


def refresh_body(world: World) -> bytes:
    return refresh_form(world.salesforce.issue_refresh_token()).encode()


def token_posts(world: World) -> list[str]:
    return [r.source_ip for r in world.salesforce.seen if r.path == "/services/oauth2/token"]


def test_plain_http_keeps_alive_and_the_front_door_reads_every_head(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Plain proxy requests share a keep-alive connection, and every head on it is read by the front door
    with the same cap as the first: here the third request's endless header gets 431 and the close."""
    sc = make_sidecar_proc(world.pair_env())
    echo = f"127.0.0.1:{world.echo.address[1]}"
    request = f"GET http://{echo}/ HTTP/1.1\r\nHost: {echo}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(request + request)
        answer = b""
        for _ in range(100):  # bounded: until both answers are in
            answer += c.recv(65536)
            if answer.count(b"HTTP/1.1 200") == 2 and answer.endswith(b"}"):
                break
        assert answer.count(b"HTTP/1.1 200") == 2, answer
        assert json.loads(answer.rpartition(b"\r\n\r\n")[2])["ip"] == "127.0.0.1"
        try:
            c.sendall(b"GET http://" + echo.encode() + b"/ HTTP/1.1\r\nX-Pad: " + b"a" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert read_until_closed(c).startswith(b"HTTP/1.1 431")
    assert sc.proc is not None and sc.proc.poll() is None


def test_a_token_call_pipelined_behind_a_plain_request_is_served_by_the_core(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """A token call on a plain keep-alive connection, behind another request, is detected and sent by the
    core through the allowlisted member, like any token call."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})
    world.salesforce.reset_seen()
    echo = f"127.0.0.1:{world.echo.address[1]}"
    body = refresh_body(world)
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"GET http://{echo}/ HTTP/1.1\r\nHost: {echo}\r\n\r\n".encode()
                  + b"POST https://login.salesforce.com/services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = read_until_closed(c)
    assert answer.count(b"HTTP/1.1 200") == 2 and b"refresh_token" in answer, answer[:300]
    assert token_posts(world) == ["127.0.0.2"]
    assert wait_until(lambda: [(e["outcome"], e["route"]) for e in sc.log_events()] == [("success", "pair")])


def test_a_plain_proxy_request_for_an_https_token_url_is_served_by_the_core(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """``POST https://login.salesforce.com/...`` sent to the proxy without a CONNECT (some HTTP libraries
    can): the sidecar sends it over TLS like any token call, through the allowlisted member; over
    ``http://`` it is refused without being sent."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2"})
    world.salesforce.reset_seen()
    for scheme, status in (("https", 200), ("http", 400)):
        body = refresh_body(world)
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
            c.sendall(f"POST {scheme}://login.salesforce.com/services/oauth2/token HTTP/1.1\r\nHost: {SF_HOST}\r\n"
                      "Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n".encode()
                      + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            answer = read_until_closed(c)
        assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:300]
        assert b"\r\nconnection: close" in answer.partition(b"\r\n\r\n")[0].lower()
        if status == 200:
            assert b"refresh_token" in answer and token_posts(world) == ["127.0.0.2"]
        else:
            assert b"token_call_not_https" in answer and token_posts(world) == ["127.0.0.2"]
    assert [(c["outcome"], c["route"]) for c in sc.log_events()] == [("success", "pair"), ("client_error", "refused")]


@contextmanager
def speaks_first(greeting: bytes) -> Iterator[tuple[str, int]]:
    """A server that talks before the client does (as SMTP or SSH do), then echoes one line."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.sendall(greeting)
            try:
                conn.sendall(b"echo: " + conn.recv(1024))
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[:2]
    finally:
        server.close()
        thread.join(timeout=10)


def test_a_tunnel_to_an_ip_literal_whose_server_speaks_first_is_relayed(
    make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """The front door waits for a TLS ClientHello as long as for a request head (min(30 s,
    SIDECAR_IDLE_TIMEOUT), here 2 s); a client that sends nothing first in that time is relayed then."""
    sc = make_sidecar_proc({"SIDECAR_IDLE_TIMEOUT": "2"})
    with speaks_first(b"220 hello\r\n") as (host, port), \
            socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = c.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")
        greeting = head.partition(b"\r\n\r\n")[2] or c.recv(4096)
        assert greeting == b"220 hello\r\n"
        c.sendall(b"EHLO me\r\n")
        assert c.recv(4096) == b"echo: EHLO me\r\n"
    assert metric_value(sc.metrics(), "egress_sidecar_tunnels_total", route="direct") == 1


@pytest.mark.parametrize("first", [b"HI\r\n", b"\x16", b"\x16\x01", b"EHLO me\r\n"])
def test_a_tunnel_to_an_ip_literal_whose_first_bytes_cannot_be_tls_is_relayed_at_once(
    make_sidecar_proc: Callable[..., SidecarProcess], first: bytes
) -> None:
    """First bytes that cannot begin a TLS record, however few, are relayed at once: only a possible
    ClientHello is waited for (up to 20 s here; the client gives up after 10). A lone 0x16 could still be
    TLS: it is relayed once the next byte says otherwise."""
    sc = make_sidecar_proc({"SIDECAR_IDLE_TIMEOUT": "20"})
    with speaks_first(b"") as (host, port), \
            socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        c.sendall(first)
        if first == b"\x16":
            time.sleep(0.2)  # (the front door waits: this may yet be TLS)
            c.sendall(b"\x02")
            first += b"\x02"
        assert read_until_closed(c) == b"echo: " + first
    assert metric_value(sc.metrics(), "egress_sidecar_tunnels_total", route="direct") == 1


def test_an_unfinished_client_hello_to_an_ip_literal_is_closed_not_relayed(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Relayed as it came, a token host's ClientHello finished later would reach Salesforce unguarded: a
    ClientHello not finished within the head deadline closes the tunnel, and nothing is connected."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_IDLE_TIMEOUT": "2"})
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    ctx = ssl.create_default_context()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SF_HOST)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert len(hello) > 20
    target = f"127.0.0.1:{world.salesforce.address[1]}"
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        c.sendall(hello[:-10])  # all but the end of the ClientHello, then nothing
        started = time.monotonic()
        assert read_until_closed(c) == b""
        assert time.monotonic() - started < 8
    assert metric_value(sc.metrics(), "egress_sidecar_tunnels_total", route="direct") == 0
    assert "did not finish" not in sc.log_text() and "no whole TLS ClientHello" in sc.log_text()


def test_a_tunnel_to_an_ip_literal_with_a_token_sni_gets_the_lanes_certificate(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path
) -> None:
    """The lane issues the leaf for the SNI (the CONNECT named only an IP); the app checks it against the
    sidecar's CA, as for a CONNECT to the name."""
    sc = make_sidecar_proc(world.pair_env())
    target = f"127.0.0.1:{world.salesforce.address[1]}"
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        with ssl.create_default_context(cafile=str(sc.ca_bundle)).wrap_socket(c, server_hostname=SF_HOST) as tls:
            cert = tls.getpeercert()
    assert ("DNS", SF_HOST) in cert["subjectAltName"]
    other = TestCA(tmp_path / "other-ca")  # a CA the sidecar did not use: its leaf must not verify there
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        try:
            ssl.create_default_context(cafile=str(other.ca_path)).wrap_socket(c, server_hostname=SF_HOST)
            raise AssertionError("the lane's leaf verified against another CA")
        except ssl.SSLCertVerificationError:
            pass
    assert metric_value(sc.metrics(), "egress_sidecar_intercepted_connections_total") == 1
