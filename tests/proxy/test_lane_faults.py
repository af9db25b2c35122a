"""The token lane (sidecar/proxy/lane.py, sidecar/proxy/forward.py) at its edges: each test here failed on the lane as first
written (found by an independent review) and guards the fix. Real sidecar process, real sockets,
loopback only."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sidecar.sim.certs import TestCA
from tests.harness import SidecarProcess, free_port, wait_until
from tests.proxy.tunnels import get, https_via, read_all, tls_tunnel
from tests.scripted_origin import ScriptedOrigin, ok, token_body

TICKS = 6
SMALL = 60_000  # an answer the lane takes its "small answer" path for (<= 64 KiB)


def make_script() -> Callable[[int, bytes], list[bytes | float]]:
    seen: dict[bytes, int] = {}
    lock = threading.Lock()

    def script(n: int, head: bytes) -> list[bytes | float]:
        path = head.split(b" ", 2)[1]
        with lock:
            seen[path] = seen.get(path, 0) + 1
            count = seen[path]
        if path == b"/services/oauth2/token":
            return ok(n, head)
        if path == b"/once":  # the request arrives, is acted on, then the connection drops unanswered
            return [b"<close>"] if count == 1 else [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        if path == b"/ws":  # server push only: the client says nothing after the upgrade
            steps: list[bytes | float] = [(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                           b"Connection: Upgrade\r\n\r\n")]
            for i in range(TICKS):
                steps += [0.4, b"tick%d;" % i]
            return [*steps, b"<close>"]
        if path == b"/trailers":  # a valid chunked answer with 101 trailer fields
            trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(101))
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailers + b"\r\n"]
        if path == b"/close-delimited":
            return [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", b"<close>"]
        if path == b"/small":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SMALL + b"s" * SMALL]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    return script


@pytest.fixture
def origin(test_ca: TestCA) -> Iterator[ScriptedOrigin]:
    with ScriptedOrigin(test_ca.issue(["localhost"], "lane-review-origin"), make_script()) as server:
        yield server


@pytest.fixture
def lane_sidecar(make_sidecar_proc: Callable[..., SidecarProcess]) -> SidecarProcess:
    return make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost", "SIDECAR_IDLE_TIMEOUT": "1"})


def paths(origin: ScriptedOrigin) -> list[bytes]:
    return [req.split(b" ", 2)[1] for _, req in origin.requests]


# -- 1. a non-idempotent request is sent twice --------------------------------------------------------
def test_post_is_not_resent_after_the_origin_dropped_a_reused_connection(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    """Was: tokenlane.py _send_request retries any body-less request that failed on a reused connection,
    even after it was written and the origin read it (here: read, acted on, connection dropped). A
    proxy must not retry a non-idempotent request on its own (RFC 9110 9.2.2, RFC 9112 9.3.1):
    the POST reaches the origin twice."""
    conn = https_via(lane_sidecar, origin.address[1])
    try:
        assert get(conn, "GET", "/plain")[:2] == (200, b"ok")  # leaves a pooled connection behind
        status, _, _ = get(conn, "POST", "/once", headers={"Content-Length": "0"})
    finally:
        conn.close()
    assert paths(origin).count(b"/once") == 1, f"POST /once reached the origin {paths(origin).count(b'/once')}x"
    assert status == 502


# -- 2. an upgraded connection with one-way traffic is cut -----------------------------------------------
def test_upgraded_connection_with_server_push_only_is_not_cut_while_data_flows(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    """Was: tokenlane.py _pipe_upgraded times each direction out on its own: a WebSocket where only the
    server talks (every 0.4 s, idle timeout 1 s) is torn down after 1 s although bytes keep flowing.
    mitmproxy (and the front door's own relay) count activity in either direction."""
    with tls_tunnel(lane_sidecar, origin.address[1]) as tls:
        tls.settimeout(10)
        tls.sendall(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        answer = read_all(tls)
    assert answer.startswith(b"HTTP/1.1 101")
    got = answer.count(b"tick")
    assert got == TICKS, f"only {got} of {TICKS} server messages arrived: {answer[-80:]!r}"


# -- 3. too many trailers: the connection goes back to the shared pool mid-message --------------------
def test_chunked_answer_with_many_trailers_does_not_poison_the_pool_for_token_calls(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    """Was: tokenlane.py _relay_chunked reads at most 100 trailer lines, then treats the answer as complete
    and releases the upstream connection to the pool with the rest of the trailer section unread. The
    pool is the one the TokenSender uses: the next token call on it reads the leftover as its answer,
    after its request reached Salesforce (a refresh consumed, the app told 502)."""
    conn = https_via(lane_sidecar, origin.address[1])
    try:
        status, body, _ = get(conn, "GET", "/trailers")
        assert (status, body) == (200, b"ok")
        form = b"grant_type=refresh_token&refresh_token=RT-review&client_id=cid"
        status, body, _ = get(conn, "POST", "/services/oauth2/token", form,
                              {"Content-Type": "application/x-www-form-urlencoded"})
    finally:
        conn.close()
    # It did reach the origin (which answers it on a connection the sidecar has just closed).
    assert wait_until(lambda: paths(origin).count(b"/services/oauth2/token") == 1, timeout=5), paths(origin)
    assert (status, body) == (200, token_body(2)), (status, body[:200])


def test_chunked_request_with_many_trailers_is_not_split_into_two_requests(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    """Was: tokenlane.py _send_body stops after 100 trailer lines and finishes the body upstream; what is
    left of the trailer section is then parsed as the next request (a framing desync: here a request
    the client never sent as one reaches the origin). Expected: refused (400) or read to its end."""
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(100))
    with tls_tunnel(lane_sidecar, origin.address[1]) as tls:
        tls.settimeout(10)
        tls.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"2\r\nhi\r\n0\r\n" + trailers + b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n")
        time.sleep(0.5)
        tls.sendall(b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        read_all(tls)
    assert b"/smuggled" not in paths(origin), paths(origin)


# -- 4. a token call's size limit is bypassed by a list-form Content-Length -----------------------------
def test_token_call_with_list_form_content_length_is_refused_at_once(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    """Was: TokenRoute.refusal checked the raw Content-Length text (``isdigit``); the lane's body_length accepts
    "N, N". A token call declaring "2000000, 2000000" passes the size checks and the lane starts reading
    the whole body into memory (any N: only SIDECAR_IDLE_TIMEOUT on the whole read stops it). The same
    declared size written plainly is cut at once; mitmproxy answers 400 to the list form."""
    with tls_tunnel(lane_sidecar, origin.address[1]) as tls:
        tls.settimeout(0.8)  # well under the 1 s idle timeout
        tls.sendall(b"POST /services/oauth2/token HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: 2000000, 2000000\r\n\r\n")
        try:
            tls.sendall(b"a" * 200_000)  # the lane keeps on reading and holding it (or has closed already)
            answer = tls.recv(4096)
            closed = True
        except TimeoutError:
            answer, closed = b"", False
        except (OSError, ssl.SSLError):
            answer, closed = b"", True
    assert closed, "the lane was still reading the declared 2 MB token request body"
    assert not origin.requests
    assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), answer[:100]


# -- 5. a client that stops reading is never timed out --------------------------------------------------
def test_client_that_stops_reading_is_cut_after_the_idle_timeout(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    """Was: the small-answer path (and token answers, refusals, 502s) wrote to the client with no deadline:
    a client that stops reading holds its connection, its slot and an upstream connection forever
    (mitmproxy's tcp_timeout watchdog closes it). Pipelined requests for 60 KB answers, nothing read
    for 4x the 1 s idle timeout: the connection should have been cut, so not all answers arrive."""
    n = 200
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", lane_sidecar.proxy_port))
    port = origin.address[1]
    raw.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (port, port))
    head = b""
    for _ in range(50):  # bounded
        head += raw.recv(1)
        if head.endswith(b"\r\n\r\n"):
            break
    ctx = ssl.create_default_context(cafile=str(lane_sidecar.ca_bundle))
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n" * (n - 1)
                    + b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert wait_until(lambda: len(origin.requests) >= 3, timeout=10)
        time.sleep(4.0)  # the client reads nothing
        total = len(read_all(tls, limit=100_000))
    assert total < n * SMALL, f"all {n} answers were delivered after the client had stalled for 4 s"


# -- 6. a 502 before the body was read: the client is reset mid-upload -----------------------------------
def test_upload_to_an_unreachable_origin_gets_the_502_not_a_reset(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
) -> None:
    """Was: tokenlane.py _forward answers 502 and returns at once when the upstream fails, leaving the
    request body unread: the socket is closed with data pending, the kernel resets the connection and
    the client's upload fails with ECONNRESET/EPIPE instead of showing the 502 (the refusal and
    BadRequest paths linger for exactly this reason; mitmproxy reads the body and answers 502)."""
    dead_port = free_port()  # nobody listens there
    conn = https_via(lane_sidecar, dead_port)
    try:
        try:
            conn.request("POST", "/upload", body=b"x" * 8_000_000)
            resp = conn.getresponse()
            outcome: object = (resp.status, resp.read()[:40])
        except OSError as exc:
            outcome = exc
    finally:
        conn.close()
    assert isinstance(outcome, tuple) and outcome[0] == 502, f"the client saw {outcome!r}"
