"""Where the sidecar connects on a client's behalf (sidecar/proxy/destinations.py): never to its own ports;
as a shared proxy (SIDECAR_PROXY_AUTH) not to loopback, link-local or private destinations. Loopback
clients and loopback targets only: a refused destination is refused before anything connects."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Callable

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.proxy.destinations import DestinationRefused, Destinations, parse_ip
from tests.harness import SidecarProcess, World, read_until_closed, redeem

AUTH = "app:d3st-pw"


@pytest.mark.parametrize("ip,port,shared,private,refused", [
    ("127.0.0.1", 3128, False, False, True),  # itself
    ("0.0.0.0", 9464, False, False, True),
    ("::1", 3128, False, False, True),
    ("127.0.0.1", 8080, False, False, False),  # a local service, for a sidecar serving its own pod only
    ("127.0.0.5", 8080, True, False, True),
    ("169.254.169.254", 80, True, True, True),  # cloud metadata: never, even with private allowed
    ("fe80::1", 80, True, True, True),
    ("10.1.2.3", 443, True, False, True),
    ("10.1.2.3", 443, True, True, False),
    ("192.168.0.9", 443, True, False, True),
    ("100.64.1.1", 443, True, False, True),
    ("fd00::5", 443, True, False, True),
    ("::ffff:127.0.0.1", 443, True, True, True),  # an IPv4-mapped loopback is loopback
    ("52.1.2.3", 443, True, False, False),
    ("2600:1f18::1", 443, True, False, False),
])
def test_the_rules(ip: str, port: int, shared: bool, private: bool, refused: bool) -> None:
    rules = Destinations(shared_proxy=shared, allow_private=private)
    rules.listening("127.0.0.1", 3128)
    rules.listening("0.0.0.0", 9464)
    rules.listening("127.0.0.1", 41234)  # mitmproxy's internal port
    parsed = parse_ip(ip)  # as the sidecar reads an address (an IPv4-mapped one as IPv4)
    assert parsed is not None and (rules.refusal(parsed, port) is not None) is refused


# Was: IPv6 forms that carry an IPv4 address a translator or tunnel reaches were judged as IPv6 only, and
# all of them are global: a shared proxy connected to the cloud metadata service or loopback through them.
TEREDO_TO_METADATA = "2001:0:4136:e378:8000:63bf:5601:5601"  # Teredo, client 169.254.169.254 (bits inverted)


@pytest.mark.parametrize("host,private,refused", [
    ("[::a9fe:a9fe]", True, True),  # IPv4-compatible ::169.254.169.254
    ("[64:ff9b::a9fe:a9fe]", True, True),  # NAT64 well-known prefix
    ("[64:ff9b:1::a9fe:a9fe]", True, True),  # NAT64 local-use prefix (RFC 8215): where its IPv4 address
    ("[64:ff9b:1:a9fe:a9:fe00::]", True, True),  # sits depends on the operator's prefix length (RFC 6052 2.2)
    ("[64:ff9b:1::3401:203]", True, True),  # so none of it is reached
    ("[2002:a9fe:a9fe::1]", True, True),  # 6to4
    ("[::ffff:0:7f00:1]", True, True),  # SIIT IPv4-translated 127.0.0.1
    (f"[{TEREDO_TO_METADATA}]", True, True),
    ("[64:ff9b::a01:203]", False, True),  # 10.1.2.3: private
    ("[64:ff9b::a01:203]", True, False),
    ("[2002:a01:203::1]", False, True),
    ("[64:ff9b::3401:203]", False, False),  # 52.1.2.3: global, as is the IPv6 address
    ("[2002:3401:203::1]", False, False),
    ("[2600:1f18::a9fe:a9fe]", False, False),  # an ordinary global address that happens to end like one
])
def test_an_ipv4_address_embedded_in_ipv6_is_judged_too(host: str, private: bool, refused: bool) -> None:
    rules = Destinations(shared_proxy=True, allow_private=private)
    ip = parse_ip(host)
    assert ip is not None
    why = rules.refusal(ip, 443)
    assert (why is not None) is refused, why
    if refused:
        with pytest.raises(DestinationRefused, match="carries the IPv4 address|local-use NAT64"):
            rules.check_literal(host, 443)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.integers(1, 65535))
def test_a_shared_proxy_reaches_only_global_addresses(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                      port: int) -> None:
    rules = Destinations(shared_proxy=True)
    why = rules.refusal(ip, port)
    if why is None:
        assert ip.is_global or not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def test_a_name_is_judged_by_what_it_resolves_to() -> None:
    rules = Destinations(shared_proxy=True)
    with pytest.raises(DestinationRefused, match="localhost resolves to 127.0.0.1:80"):
        asyncio.run(rules.resolve("localhost", 80))
    rules.check_literal("example.invalid", 443)  # a name passes the literal check: it is resolved later


def connect(sc: SidecarProcess, target: str, auth: str | None = None) -> bytes:
    header = f"Proxy-Authorization: Basic {base64.b64encode(auth.encode()).decode()}\r\n" if auth else ""
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{header}\r\n".encode())
        return read_until_closed(c)


def test_the_sidecar_never_connects_to_its_own_ports(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc(world.pair_env())
    for target in (f"127.0.0.1:{sc.admin_port}", f"localhost:{sc.admin_port}", f"localhost:{sc.proxy_port}"):
        answer = connect(sc, target)
        assert answer.startswith(b"HTTP/1.1 403") and b"does not connect to its own ports" in answer, (target, answer)
    plain = requests.get(f"http://127.0.0.1:{sc.admin_port}/status", proxies={"http": sc.proxy_url}, timeout=10)
    assert plain.status_code == 403 and "its own ports" in plain.text
    with sc.session() as s:  # and it still serves
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code in (200, 400)


def test_a_shared_proxy_refuses_loopback_link_local_and_private_destinations(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_PROXY_AUTH": AUTH})
    echo = world.echo.address
    for target, why in ((f"localhost:{echo[1]}", b"loopback"), (f"127.0.0.1:{echo[1]}", b"loopback"),
                        ("169.254.169.254:80", b"link-local"), ("10.1.2.3:443", b"SIDECAR_ALLOW_PRIVATE_DESTINATIONS"),
                        ("[fe80::1]:443", b"link-local")):
        answer = connect(sc, target, AUTH)
        assert answer.startswith(b"HTTP/1.1 403") and why in answer, (target, answer)
    plain = requests.get(f"http://127.0.0.1:{echo[1]}/", proxies={"http": f"http://{AUTH}@127.0.0.1:{sc.proxy_port}"},
                         timeout=10)
    assert plain.status_code == 403 and "loopback" in plain.text
    assert not world.echo.hits or all(h.source_ip != "127.0.0.1" for h in world.echo.hits)  # nothing reached it
    # Token calls still leave through the pair (a configured member is not a client's destination).
    with sc.session() as s:
        s.proxies = {"https": f"http://{AUTH}@127.0.0.1:{sc.proxy_port}"}
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200


# -- found by independent reviews of this module; each test failed before its fix --------------------
AUTH = "app:d3st-pw"
# The shorthand IPv4 forms resolvers accept (inet_aton): each one is 127.0.0.1.
LOOPBACK_SPELLINGS = ("127.1", "0177.0.0.1", "2130706433", "0x7f.0.0.1", "0x7f000001", "127.000.000.001")


def connect_and_peek(sc: SidecarProcess, target: str, auth: str | None = None) -> bytes:
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
        own = connect_and_peek(sc, f"{spelling}:{sc.admin_port}", AUTH)
        other = connect_and_peek(sc, f"{spelling}:{world.echo.address[1]}", AUTH)
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
