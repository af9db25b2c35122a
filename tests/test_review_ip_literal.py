"""Review findings on IP-literal token tunnels, which mitmproxy used to serve: it bounded neither a request
head nor a chunked token body it had to hold whole. Both now go to the lane (its caps apply), and plain
HTTP keeps one request per mitmproxy connection (tests/test_engines.py). Found by an independent review
of the data path. Real sidecar, the simulated pair and Salesforce, loopback only."""

from __future__ import annotations

import ssl
from collections.abc import Callable


from tests.harness import SidecarProcess, World
from tests.test_ip_literal import via_ip_literal

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
