"""Review findings on the destination rules (sidecar/destinations.py, sidecar/frontdoor.py): found by an
independent review of the data path; each test failed before its fix. Real sidecar, loopback only."""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable

import pytest

from sidecar.destinations import Destinations, parse_ip
from tests.harness import SidecarProcess, World, read_until_closed

AUTH = "app:d3st-pw"
# The shorthand IPv4 forms resolvers accept (inet_aton): each one is 127.0.0.1.
LOOPBACK_SPELLINGS = ("127.1", "0177.0.0.1", "2130706433", "0x7f.0.0.1", "0x7f000001", "127.000.000.001")


def connect(sc: SidecarProcess, target: str, auth: str | None = None) -> bytes:
    header = f"Proxy-Authorization: Basic {base64.b64encode(auth.encode()).decode()}\r\n" if auth else ""
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{header}\r\n".encode())
        head = c.recv(4096)
        if head.startswith(b"HTTP/1.1 200"):  # show what the tunnel reached
            c.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head += read_until_closed(c)[:200]
        return head


def test_shorthand_ip_literals_do_not_get_around_the_destination_rules(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """Was: the front door checks IP literals with ``ipaddress``, which reads none of these forms, and hands
    them to mitmproxy (they are IP literals), which relays the tunnel untouched to what the resolver makes
    of them: 127.0.0.1. A shared proxy (SIDECAR_PROXY_AUTH) then reached loopback (here: its own admin
    server, whose /status answered through the tunnel) and, spelled 2852039166, the cloud metadata
    service; without SIDECAR_PROXY_AUTH the sidecar connected to its own ports."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_PROXY_AUTH": AUTH})
    reached = {}
    for spelling in LOOPBACK_SPELLINGS:
        own = connect(sc, f"{spelling}:{sc.admin_port}", AUTH)
        other = connect(sc, f"{spelling}:{world.echo.address[1]}", AUTH)
        if not (own.startswith(b"HTTP/1.1 403") and b"its own ports" in own
                and other.startswith(b"HTTP/1.1 403") and b"loopback" in other):
            reached[spelling] = (own[:120], other[:120])
    assert not reached, reached
    assert all(h.source_ip != "127.0.0.1" for h in world.echo.hits)  # (the probes come from the members)


def _local_address() -> str:
    """A non-loopback address of this host (the source address it would use towards TEST-NET-1; a UDP
    connect sends nothing), or skip."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = str(s.getsockname()[0])
    except OSError:
        address = ""
    if not address or address.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address")
    return address


@pytest.mark.parametrize("shared", [False, True], ids=["loopback clients", "shared proxy"])
def test_listening_on_every_interface_the_sidecar_knows_all_its_own_addresses(shared: bool) -> None:
    """Was: listening on 0.0.0.0 (the admin server's default; SIDECAR_LISTEN in Docker) registered no
    address, so only loopback and 0.0.0.0 counted as the sidecar itself: CONNECT <pod IP>:9464 reached the
    admin server, CONNECT <pod IP>:3128 looped into the proxy (with SIDECAR_ALLOW_PRIVATE_DESTINATIONS as
    well). No connection is made: the rules are asked about this host's own address."""
    rules = Destinations(shared_proxy=shared, allow_private=True)
    rules.listening("127.0.0.1", 3128)
    rules.listening("0.0.0.0", 9464)
    own = parse_ip(_local_address())
    assert own is not None
    why = rules.refusal(own, 9464)
    assert why is not None and "its own ports" in why, why
    assert rules.refusal(own, 9465) is None  # another port on this host: a local service, not the sidecar
