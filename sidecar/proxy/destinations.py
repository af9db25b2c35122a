"""Where the sidecar may connect on a client's behalf.

Never to itself: a client that asks for the sidecar's own proxy, admin or internal (mitmproxy) port,
on a loopback address or on the address it listens on (any address of this host when it listens on
all of them), is refused (a loop, or a way around the admin server's loopback binding). And when it serves as a shared proxy (``SIDECAR_PROXY_AUTH`` set, so clients
may come from other hosts), not to loopback, link-local (169.254.0.0/16, fe80::/10: cloud metadata
services live there), unspecified addresses, and, unless ``SIDECAR_ALLOW_PRIVATE_DESTINATIONS`` is set,
private ranges. Checked on the addresses a name resolves to, before any connection is opened, and on
the IPv4 address an IPv6 one carries (NAT64, 6to4, Teredo, SIIT, IPv4-compatible): a translator or tunnel
on the way delivers there (local-use NAT64, whose IPv4 address cannot be located, is refused).
"""

from __future__ import annotations

import ipaddress
import socket

from sidecar.net.resolver import (
    CLIENT_LOOKUPS,
    AddrInfo,
    DestinationRefused,
    IPAddress,
    Resolver,
    parse_ip,
)

__all__ = ["DestinationRefused", "Destinations", "embedded_ipv4", "is_ip", "parse_ip"]
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the well-known prefix, IPv4 in the last 32 bits
# RFC 8215 local-use NAT64: where its IPv4 address sits (RFC 6052 2.2) depends on a prefix length only its
# operator knows, so what it leads to cannot be judged.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 7915 IPv4-translated (::ffff:0:a.b.c.d)
_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291 2.5.5.1 IPv4-compatible (deprecated; ::a.b.c.d)


def is_ip(host: str) -> bool:
    """An IP literal, including the shorthand forms resolvers accept (127.1, 2130706433, 0x7f.1):
    for those only the TLS SNI can tell whether it is a token call."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        last = host.rstrip(".").rsplit(".", 1)[-1]
        return not any(c.isalpha() for c in last) or last.lower().startswith("0x")
    return True


class Destinations:
    def __init__(self, *, shared_proxy: bool, allow_private: bool = False, resolver: Resolver | None = None) -> None:
        self.shared_proxy = shared_proxy  # SIDECAR_PROXY_AUTH is set
        self.allow_private = allow_private  # SIDECAR_ALLOW_PRIVATE_DESTINATIONS
        # Looks up the destinations clients ask for; never the one token calls use (sidecar.net.resolver).
        self.resolver = resolver or Resolver("client", CLIENT_LOOKUPS)
        self.own_ports: set[int] = set()  # the proxy, admin and internal ports, once they listen
        self.own_hosts: set[IPAddress] = set()  # the addresses they listen on (besides loopback)
        self.every_interface = False  # one of them listens on 0.0.0.0 / ::: every address of this host is its

    def listening(self, host: str, port: int) -> None:
        """Register an address the sidecar listens on."""
        self.own_ports.add(port)
        ip = parse_ip(host)
        if ip is not None and not ip.is_unspecified:
            self.own_hosts.add(ip)
        elif ip is not None:
            self.every_interface = True

    def refusal(self, ip: IPAddress, port: int) -> str | None:
        """Why a connection to ip:port is refused, or None. An IPv6 address that carries an IPv4 address
        a translator or tunnel delivers to (:func:`embedded_ipv4`) is refused when either is."""
        why = self._refusal(ip, port)
        for inner in embedded_ipv4(ip) if why is None else ():
            if (inner_why := self._refusal(inner, port)) is not None:
                return f"{_show(ip, port)} carries the IPv4 address {inner}: {inner_why}"
        return why

    def _refusal(self, ip: IPAddress, port: int) -> str | None:
        if port in self.own_ports and (ip.is_loopback or ip.is_unspecified or ip in self.own_hosts
                                       or (self.every_interface and _is_local(ip))):
            return f"{_show(ip, port)} is the sidecar itself; it does not connect to its own ports"
        if not self.shared_proxy:
            return None
        if ip.is_loopback or ip.is_unspecified:
            return (f"{_show(ip, port)} is on this host; as a shared proxy (SIDECAR_PROXY_AUTH) the sidecar does not "
                    "connect to loopback destinations")
        if ip in _NAT64_LOCAL:
            return (f"{_show(ip, port)} is a local-use NAT64 address (64:ff9b:1::/48), whose IPv4 destination cannot "
                    "be told from it; as a shared proxy the sidecar never connects there")
        if ip.is_link_local:
            return (f"{_show(ip, port)} is link-local (cloud metadata services live there); as a shared proxy the "
                    "sidecar never connects there")
        if (ip.is_private or ip in _CGNAT) and not self.allow_private and not ip.is_global:
            return (f"{_show(ip, port)} is in a private range; as a shared proxy (SIDECAR_PROXY_AUTH) the sidecar "
                    "only connects there with SIDECAR_ALLOW_PRIVATE_DESTINATIONS=true")
        return None

    def check_literal(self, host: str, port: int) -> None:
        """Raise DestinationRefused when ``host`` is an IP literal the rules refuse (names pass)."""
        ip = parse_ip(host)
        if ip is not None and (why := self.refusal(ip, port)) is not None:
            raise DestinationRefused(why)

    async def check_route(self, host: str, port: int, through_member: bool) -> None:
        """Raise DestinationRefused when a request to host:port is refused. Through a pair member only an
        IP literal is checked (the member resolves names itself); direct, the name is resolved and every
        address checked (OSError when it does not resolve)."""
        if through_member:
            self.check_literal(host, port)
        else:
            await self.resolve(host, port)

    async def resolve(self, host: str, port: int, resolver: Resolver | None = None) -> list[AddrInfo]:
        """The addresses of host:port (an IP literal's own, a name's looked up by ``resolver``, by default
        the clients' one), every one checked; raises DestinationRefused when the rules refuse one of them
        (a name that also points somewhere refused is not half-trusted), OSError when the name does not
        resolve (in time)."""
        infos = await (resolver or self.resolver).getaddrinfo(host, port)
        for _, _, _, addr in infos:
            ip = parse_ip(str(addr[0]))
            if ip is not None and (why := self.refusal(ip, port)) is not None:
                raise DestinationRefused(why if parse_ip(host) is not None else f"{host} resolves to {why}")
        return infos


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address hands packets on to, judged with it: IPv4-mapped and -compatible,
    SIIT-translated (::ffff:0:0:0/96), NAT64 (64:ff9b::/96), 6to4 (2002::/16) and Teredo (2001::/32: its
    server and its client). Empty for an IPv4 address and for any other IPv6 one."""
    if ip.version == 4:
        return []
    assert isinstance(ip, ipaddress.IPv6Address)
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _COMPATIBLE or ip in _SIIT or ip in _NAT64:
        found.append(ipaddress.IPv4Address(ip.packed[12:]))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found += ip.teredo
    return found


def _is_local(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this host: only those can be bound to."""
    try:
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def _show(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
