"""Review findings on the token lane and the front door (sidecar/lane.py, sidecar/frontdoor.py,
sidecar/http1.py): found by an independent review of the data path; each test failed before its fix.
Real sidecar process, real sockets, loopback only."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from sidecar.sim.certs import TestCA
from tests.harness import SidecarProcess, read_until_closed
from tests.scripted_origin import ScriptedOrigin, ok
from tests.test_lane import read_all, tls_tunnel

SECRET = "00DrEvIeWsEcReT!AQ0123456789"


@pytest.fixture
def origin(test_ca: TestCA) -> Iterator[ScriptedOrigin]:
    with ScriptedOrigin(test_ca.issue(["localhost"], "lane-review2-origin"), ok) as server:
        yield server


@pytest.fixture
def lane_sidecar(make_sidecar_proc: Callable[..., SidecarProcess]) -> SidecarProcess:
    return make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})


def test_a_malformed_request_never_puts_its_secrets_in_the_log_or_the_error(
    lane_sidecar: SidecarProcess, origin: ScriptedOrigin
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
        with tls_tunnel(lane_sidecar, origin.address[1]) as tls:
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
    assert not origin.requests


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
