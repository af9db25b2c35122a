"""Review findings on the mitmproxy engine's token path (addons/token_route.py): found by an independent
review of the data path. Real sidecar, the simulated pair and Salesforce, loopback only."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest

from tests.harness import SidecarProcess, World
from tests.test_mitm_path import via_ip_literal

CHUNK = 64 * 1024


# DESIGN QUESTION (not fixed on this branch; see the review report). mitmproxy reads a token call's body
# whole before the `request` hook runs (token calls cannot be streamed: streaming makes mitmproxy send
# the request upstream itself), and with no Content-Length nothing bounds it: the 64 KiB cap is only
# applied once the whole body is in memory. mitmproxy's body_size_limit would bound it, but it also
# refuses any other upload through this engine whose declared length is over the limit (it is checked
# before any addon can mark a flow as streamed). Options: refuse chunked token calls on this engine
# (411), accept that limit for non-token uploads through mitmproxy, or serve IP-literal tunnels whose SNI
# is a token host in the lane (which reads a chunked body only up to the cap).
@pytest.mark.xfail(strict=True, reason="design question: mitmproxy holds a chunked token request body whole")
def test_a_chunked_token_call_through_mitmproxy_is_cut_at_the_cap_not_read_whole(
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


# DESIGN QUESTION (not fixed on this branch; see the review report). mitmproxy 12 has no limit on the size
# of a request head, and its watchdog only ends connections on which nothing moves: a head that keeps
# growing is held whole, in memory, for as long as the client sends it. The front door caps the first
# head at 64 KiB (431) and the lane caps every head; on mitmproxy's connections (tunnels to IP literals
# with a token host's SNI, and every request after the first on a plain-HTTP keep-alive connection)
# nothing does. Options: serve IP-literal tunnels with a token SNI in the lane; keep plain-HTTP
# connections to one request each (the front door reads every head) or serve plain HTTP outside mitmproxy.
@pytest.mark.xfail(strict=True, reason="design question: mitmproxy holds a request head of any size")
def test_a_request_head_through_mitmproxy_is_capped_like_everywhere_else(
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
