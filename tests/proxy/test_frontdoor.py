"""The front door: CONNECT tunnels to non-token hosts are relayed without mitmproxy, plain proxy requests
are handed to mitmproxy whole; partial heads, failures and idle tunnels are handled."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.net.http1 import parse_authority
from sidecar.sim.certs import TestCA
from sidecar.sim.echo import FakeIPEcho
from tests.harness import (
    SidecarProcess,
    World,
    free_port,
    metric_value,
    read_until_closed,
    redeem,
    redeem_in_background,
)


def read_head(sock: socket.socket) -> bytes:
    data = b""
    for _ in range(50):  # bounded
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and (not data.startswith(b"HTTP/1.1 5") or data.rstrip().endswith((b"}", b")"))):
            break
    return data


def test_parse_authority() -> None:
    assert parse_authority(b"api.stripe.com:443") == ("api.stripe.com", 443)
    assert parse_authority(b"[::1]:8443") == ("::1", 8443)
    assert parse_authority(b"LOGIN.salesforce.com:443") == ("login.salesforce.com", 443)
    for bad in (b"x", b"x:0", b"x:99999", b"x:443/path", b"u@x:443", b":443", b"x:y", b"\xff:1", b""):
        assert parse_authority(bad) is None, bad


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parse_authority_never_raises(target: bytes) -> None:
    result = parse_authority(target)
    assert result is None or (isinstance(result[0], str) and 0 < result[1] < 65536)


def test_tunnel_in_two_segments_and_original_certificate(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    other = TestCA(tmp_path / "other")
    cert, key = other.issue(["localhost"], "origin")
    with FakeIPEcho(certfile=cert, keyfile=key) as origin:
        sc = make_sidecar_proc(world.pair_env())
        port = origin.address[1]
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
            c.sendall(b"CONNECT local")  # the head arrives in pieces
            time.sleep(0.05)
            c.sendall(f"host:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 200")
            with ssl.create_default_context(cafile=str(other.ca_path)).wrap_socket(c, server_hostname="localhost") as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                body = read_until_closed(t)
        assert json.loads(body.split(b"\r\n\r\n", 1)[1])["ip"] == "127.0.0.1"
    assert metric_value(sc.metrics(), "egress_sidecar_tunnels_total", route="direct") == 1
    assert metric_value(sc.metrics(), "egress_sidecar_intercepted_connections_total") == 0


def test_unreachable_target_gets_a_502(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc(world.pair_env())
    closed = free_port()
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
        c.sendall(f"CONNECT localhost:{closed} HTTP/1.1\r\n\r\n".encode())
        answer = read_head(c)
    assert answer.startswith(b"HTTP/1.1 502") and b"connection refused" in answer


def test_idle_tunnel_is_closed_and_the_sidecar_still_serves(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    with FakeIPEcho() as origin:
        sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_IDLE_TIMEOUT": "2"})
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
            c.sendall(f"CONNECT localhost:{origin.address[1]} HTTP/1.1\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            c.settimeout(10)
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass  # an idle tunnel is cut with a reset, so nobody mistakes it for a complete stream
            assert time.monotonic() - started < 9  # closed by the sidecar, not by the 10 s client timeout
        with sc.session() as s:
            assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200


def test_route_all_relays_tunnels_through_a_member(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """SIDECAR_ROUTE=all: tunnels to other hosts leave through the pair (the front door opens a CONNECT
    tunnel through a member, credentials on the CONNECT only)."""
    with FakeIPEcho() as origin:
        sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ROUTE": "all"})
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
            c.sendall(f"CONNECT localhost:{origin.address[1]} HTTP/1.1\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 200")
            c.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            body = read_until_closed(c)
        assert json.loads(body.split(b"\r\n\r\n", 1)[1])["ip"] in ("127.0.0.2", "127.0.0.3")
    assert metric_value(sc.metrics(), "egress_sidecar_tunnels_total", route="pair") == 1


def test_tunnels_to_salesforce_owned_domains_leave_through_the_pair_and_are_counted(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """A tunnel to a Salesforce-owned domain that is not a token host (Lightning here) is relayed raw, not
    decrypted, through a pair member by default: its egress is static. Counted per domain class, never by
    host. Any other host stays direct (SIDECAR_ROUTE=token)."""
    lightning = "acme.lightning.force.com"
    with FakeIPEcho() as origin:
        world.pair.set_route((lightning, 443), origin.address)
        sc = make_sidecar_proc(world.pair_env())
        seen = []
        for host, port in ((lightning, 443), ("localhost", origin.address[1])):
            with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
                c.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                assert read_head(c).startswith(b"HTTP/1.1 200")
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                seen.append(json.loads(read_until_closed(c).split(b"\r\n\r\n", 1)[1])["ip"])
    assert seen[0] in ("127.0.0.2", "127.0.0.3") and seen[1] == "127.0.0.1"
    metrics = sc.metrics()
    assert metric_value(metrics, "egress_sidecar_salesforce_tunnels_total", domain_class="force", route="pair") == 1
    assert metric_value(metrics, "egress_sidecar_salesforce_tunnels_total") == 1
    assert metric_value(metrics, "egress_sidecar_tunnels_total", route="pair") == 1
    assert metric_value(metrics, "egress_sidecar_tunnels_total", route="direct") == 1
    assert lightning not in metrics
    assert metric_value(metrics, "egress_sidecar_intercepted_connections_total") == 0


@pytest.mark.parametrize(("setting", "sources"), [("pair", {"127.0.0.2", "127.0.0.3"}), ("direct", {"127.0.0.1"})])
def test_salesforce_tunnels_to_an_ip_literal_follow_the_sni_and_the_setting(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], setting: str, sources: set[str]
) -> None:
    """An IP-literal tunnel whose SNI names a Salesforce-owned domain (not a token host) is routed as a tunnel to
    that name: through the pair, or direct with SIDECAR_SALESFORCE_TUNNELS=direct. Never decrypted: the app sees
    Salesforce's own certificate."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_SALESFORCE_TUNNELS": setting})
    world.salesforce.reset_seen()
    target = f"127.0.0.1:{world.salesforce.address[1]}"
    ctx = ssl.create_default_context(cafile=sc.env["SIDECAR_UPSTREAM_CA"])  # the fake Salesforce's CA only
    ctx.check_hostname = False  # (its certificate does not name this host: it is not re-signed either)
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert read_head(c).startswith(b"HTTP/1.1 200")
        with ctx.wrap_socket(c, server_hostname="acme--c.vf.force.com") as tls:
            tls.sendall(b"GET /services/data/ HTTP/1.1\r\nHost: acme--c.vf.force.com\r\nConnection: close\r\n\r\n")
            assert read_until_closed(tls).startswith(b"HTTP/1.1 200")
    assert {r.source_ip for r in world.salesforce.seen} <= sources and world.salesforce.seen
    metrics = sc.metrics()
    assert metric_value(metrics, "egress_sidecar_salesforce_tunnels_total", domain_class="force", route=setting) == 1
    assert not sc.log_events()


def test_numeric_host_forms_go_to_mitmproxy_which_sees_the_sni(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """127.1 or 2130706433 are IP addresses to a resolver; only the SNI tells a token call, so they must
    not take the front door's blind relay."""
    sc = make_sidecar_proc(world.pair_env())
    sidecar_ca = (sc.confdir / "ca.pem").read_text()
    port = world.salesforce.address[1]
    for host in ("127.0.0.1", "127.1", "2130706433"):
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as c:
            c.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 200")
            ctx = ssl.create_default_context(cadata=sidecar_ca)  # only the sidecar's CA: proves interception
            with ctx.wrap_socket(c, server_hostname="login.salesforce.com") as t:
                assert t.getpeercert() is not None


def test_slow_steady_download_is_not_cut(make_sidecar_proc: Callable[..., SidecarProcess], world: World) -> None:
    import threading

    total = 3 * 1024 * 1024
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"x" * total)

        t = threading.Thread(target=serve)
        t.start()
        sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_IDLE_TIMEOUT": "1"})
        got = 0
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            c.sendall(f"CONNECT localhost:{server.getsockname()[1]} HTTP/1.1\r\n\r\n".encode())
            head = read_head(c)
            assert head.startswith(b"HTTP/1.1 200")
            got = len(head.split(b"\r\n\r\n", 1)[1])
            started = time.monotonic()
            while got < total and time.monotonic() - started < 30:  # bounded; ~1 MB/s takes ~3 s
                chunk = c.recv(16384)
                if not chunk:
                    break
                got += len(chunk)
                time.sleep(0.015)
        t.join(timeout=10)
    assert got == total  # longer than SIDECAR_IDLE_TIMEOUT, yet never idle: not cut


def test_sigterm_lets_a_token_call_in_flight_finish(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    import signal

    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    world.salesforce.slow_seconds = 1.5
    world.salesforce.fail_mode = "slow"
    t, result = redeem_in_background(sc, world)
    time.sleep(0.5)
    assert sc.proc is not None
    sc.proc.send_signal(signal.SIGTERM)
    t.join(timeout=20)
    assert sc.proc.wait(timeout=20) == 0
    assert result.get("status") == 200, result
    assert [c["outcome"] for c in sc.log_events()] == ["success"]


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (Linux /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_sidecar_listens_on_its_two_ports_only(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Every client connection enters through SIDECAR_LISTEN (the front door counts, limits and times
    them); there is no internal port a local process could dial around it, only the admin server."""
    sc = make_sidecar_proc(world.pair_env())
    assert sc.proc is not None
    assert _listening_ports(sc.proc.pid) == {sc.proxy_port, sc.admin_port}
    with sc.session() as s:
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200


def _trickle(port: int, head: bytes, limit: int = 40) -> tuple[int, bytes]:
    """Send ``head`` one byte per second until the sidecar answers or closes; (bytes sent, answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.setblocking(False)
        for sent in range(min(limit, len(head))):  # bounded: one byte per second
            try:
                answer = c.recv(4096)
                c.setblocking(True)
                c.settimeout(5)
                return sent, answer + read_until_closed(c)
            except BlockingIOError:
                pass
            except OSError:
                return sent, b""
            try:
                c.send(head[sent:sent + 1])
            except OSError:
                return sent, b""
            time.sleep(1.0)
        return len(head), b""


@pytest.mark.parametrize("auth", [None, "app:tr1ckle-pw"])
def test_heads_trickled_byte_by_byte_are_cut_within_the_idle_timeout(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], auth: str | None
) -> None:
    """Whatever would serve it (mitmproxy for plain HTTP, the relay or the lane for CONNECTs), no
    connection is handed over before its first head is complete; a slow one gets 408."""
    env = {**world.pair_env(), "SIDECAR_IDLE_TIMEOUT": "2"}
    if auth:
        env["SIDECAR_PROXY_AUTH"] = auth
    sc = make_sidecar_proc(env)
    heads = (b"GET http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n",
             b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n",
             b"CONNECT api.example.invalid:443 HTTP/1.1\r\nHost: api.example.invalid:443\r\n\r\n")
    for head in heads:
        sent, answer = _trickle(sc.proxy_port, head)
        assert sent < 10, (head[:30], sent)  # ~2 s at one byte per second, far from the whole head
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    with sc.session() as s:
        if auth:
            s.proxies = {"https": f"http://{auth}@127.0.0.1:{sc.proxy_port}"}
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200


def test_bare_lf_head_is_answered_at_once(inproc_front_door: tuple[str, int]) -> None:
    """h11 accepts a head whose lines end in LF alone; it is served, not left waiting for CRLF CRLF (the
    default idle timeout, 300 s, would be the only other way out)."""
    with FakeIPEcho() as origin:
        with socket.create_connection(inproc_front_door, timeout=5) as c:
            c.sendall(b"CONNECT localhost:%d HTTP/1.1\nHost: localhost\n\n" % origin.address[1])
            assert read_head(c).startswith(b"HTTP/1.1 200")
            c.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert b'"ip": "127.0.0.1"' in read_until_closed(c)


@pytest.mark.parametrize("head,status", [
    (b"CONNECT nonsense HTTP/1.1\r\n\r\n", b"400"),
    (b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n", b"400"),
    (b"GET http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"400"),
])
def test_malformed_first_heads_get_clear_errors(inproc_front_door: tuple[str, int], head: bytes,
                                                status: bytes) -> None:
    with socket.create_connection(inproc_front_door, timeout=5) as c:
        with contextlib.suppress(OSError):
            c.sendall(head)
        answer = read_until_closed(c)
    assert answer.startswith(b"HTTP/1.1 " + status) and b"egress-sidecar: " in answer, answer[:120]
    with socket.create_connection(inproc_front_door, timeout=5) as c:  # and it serves on
        c.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_closed(c).startswith(b"HTTP/1.1 400")
