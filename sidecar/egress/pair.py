"""The QuotaGuard pair: its members, and what is known about each member's egress IP.

QuotaGuard gives every account two load-balanced static IPs. Whether its proxy hostname resolves to
one address per node, and whether each node always leaves from the same IP, is not confirmed, so
the mapping member → egress IP is learnt by probing (see ``sidecar.egress.discovery``) or pinned by hand,
and a member whose samples disagree is reported as unstable instead of being guessed.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass, field

from sidecar.config import ConfigError, HostPort, Settings, Upstream
from sidecar.net.resolver import numeric_infos

SAMPLE_HISTORY = 12
# Passive health (like Squid's connect-fail-limit and Envoy's outlier detection): after this many
# consecutive connect failures a member is ejected, for a time that doubles with each ejection.
EJECT_AFTER_FAILURES = 2
EJECT_BASE_SECONDS = 5.0
EJECT_MAX_SECONDS = 300.0


@dataclass
class Member:
    """One proxy node of the pair, addressed by IP:port."""

    address: HostPort
    pinned_ip: str | None = None
    up: bool | None = None  # None: not probed yet
    samples: deque[str] = field(default_factory=lambda: deque(maxlen=SAMPLE_HISTORY))
    last_probe: float | None = None
    last_error: str | None = None
    ejected_until: float = 0.0
    consecutive_failures: int = 0
    ejections: int = 0
    verifies: bool = False  # each new connection's egress IP is asked on it (sidecar.egress.verify)

    @property
    def label(self) -> str:
        return str(self.address)

    @property
    def stable(self) -> bool | None:
        """True when the recent samples agree, False when they disagree, None without samples."""
        if not self.samples:
            return None
        return len(set(self.samples)) == 1

    @property
    def egress_ip(self) -> str | None:
        """The one egress IP this member's probes agree on (or pinned), else None: not probed yet, or an
        address that shows several (load-balanced: each connection's own IP is verified on it)."""
        if self.pinned_ip:
            return self.pinned_ip
        if self.stable:
            return self.samples[-1]
        return None

    @property
    def observed_ips(self) -> list[str]:
        return sorted(set(self.samples) | ({self.pinned_ip} if self.pinned_ip else set()))

    def record_connect_failure(self, now: float | None = None) -> float | None:
        """Count a failed connect; returns the ejection's length when this failure ejects the member."""
        now = time.monotonic() if now is None else now
        self.consecutive_failures += 1
        if self.consecutive_failures < EJECT_AFTER_FAILURES or now < self.ejected_until:
            return None
        length = min(EJECT_BASE_SECONDS * 2**self.ejections, EJECT_MAX_SECONDS)
        self.ejections += 1
        self.ejected_until = now + length
        return length

    def record_connect_success(self) -> None:
        self.consecutive_failures = 0
        self.ejections = 0

    def readmit(self) -> bool:
        """A successful probe brings an ejected member back; True if it was ejected."""
        was = self.ejected_until > time.monotonic()
        self.ejected_until = 0.0
        self.consecutive_failures = 0
        return was

    @property
    def ejected(self) -> bool:
        return time.monotonic() < self.ejected_until

    def available(self, now: float | None = None) -> bool:
        """Not known to be down and not ejected by passive health checks."""
        now = time.monotonic() if now is None else now
        return self.up is not False and now >= self.ejected_until


@dataclass
class Pair:
    upstream: Upstream | None
    members: list[Member]

    @property
    def direct(self) -> bool:
        return self.upstream is None

    def member_at(self, address: tuple[str, int]) -> Member | None:
        for m in self.members:
            if m.address.address == (address[0], address[1]):
                return m
        return None

    def egress_ips(self) -> list[str]:
        """Every egress IP observed or pinned, over all members."""
        return sorted({ip for m in self.members for ip in m.observed_ips})


def resolve_members(upstream: Upstream) -> list[HostPort]:
    """The addresses the upstream hostname resolves to (A and AAAA), each with the upstream port."""
    return _lookup(upstream.host, upstream.port,
                   f"QUOTAGUARDSTATIC_URL: cannot resolve proxy host {upstream.host!r} ({{cause}}). Check the URL, DNS, or "
                   "list the members in SIDECAR_PAIR=HOST:PORT,HOST:PORT.")


def member_address(hp: HostPort) -> HostPort:
    """A member as an IP literal: token calls and probes connect to members without any name lookup
    (sidecar.net.resolver), so a name in SIDECAR_PAIR is looked up once, here, at start."""
    if numeric_infos(hp.host, hp.port) is not None:
        return hp
    return _lookup(hp.host, hp.port, f"SIDECAR_PAIR: cannot resolve member {hp.host!r} ({{cause}}). Check the name "
                   "and DNS, or list the members by IP address.")[0]


def _lookup(host: str, port: int, failure: str) -> list[HostPort]:
    """Every address of ``host`` (A and AAAA) with ``port``, in order, each once; at start only (it blocks).
    Raises ConfigError(``failure`` with its ``{cause}``) when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(failure.format(cause=exc.strerror or exc)) from None
    return list(dict.fromkeys(HostPort(str(sockaddr[0]), port) for _, _, _, _, sockaddr in infos))


def build_pair(settings: Settings) -> Pair:
    upstream = settings.upstream
    if upstream is None:
        if settings.pair:
            raise ConfigError("SIDECAR_PAIR is set but QUOTAGUARDSTATIC_URL is not: set the upstream URL too.")
        return Pair(upstream=None, members=[])
    addresses = settings.pair_members or resolve_members(upstream)
    pinned = settings.pinned_egress
    unknown = [str(hp) for hp in pinned if hp not in addresses]
    if unknown:
        raise ConfigError(
            f"SIDECAR_EGRESS_IPS names {unknown[0]}, which is not a pair member "
            f"(members: {', '.join(str(a) for a in addresses)}). Use MEMBER=IP with a member address."
        )
    return Pair(upstream=upstream, members=[Member(address=member_address(a), pinned_ip=pinned.get(a))
                                            for a in addresses])
