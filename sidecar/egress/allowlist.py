"""Parse and query a copy of Salesforce's Refresh Token IP Allowlist.

``SIDECAR_ALLOWLIST`` holds what the user typed into the External Client App's
Refresh Token IP Allowlist (External Client Apps Manager -> Edit Settings ->
Enforce Refresh Token IP Allowlist). The sidecar uses it to check, before and
after routing a token call, that the egress IP it is about to use (or just used)
is one Salesforce will accept.

Accepted syntax
---------------
Items are separated by commas or newlines; whitespace around items is ignored and
empty items (``"a,,b,"``) are skipped. Each item is one of

* a single address: ``203.0.113.7``, ``2001:db8::1``;
* a CIDR block: ``203.0.113.0/24``, ``2001:db8::/64`` (strict: host bits must be
  zero; ``203.0.113.5/24`` is rejected with a suggestion of ``203.0.113.0/24``);
* a range ``START-END`` (whitespace around the dash is allowed), both ends the
  same IP version and ``START <= END``.

IPv4 and IPv6 are both supported. Zone indexes (``fe80::1%eth0``), brackets and
ports are rejected. Items are numbered from 1 among the non-empty items, and every
:class:`AllowlistError` names the item, its number and the setting.

Salesforce limits and how they are counted here
-----------------------------------------------
Salesforce stores each entry as a start-end range (a single IP is start = end).
Its help page "Set IP Allowlist Ranges for Refresh Tokens"
(help.salesforce.com, article ``xcloud.set_ip_allowlist_for_refresh_tokens.htm``)
says only: "You can create up to 128 IP address ranges, with no more than 256 IP
addresses total." It does not define "range" or "address" more precisely. This
module uses the project's interpretation:

* a **range entry** is any entry whose start != end (a CIDR larger than one
  address, or ``START-END`` with ``START < END``);
* an **address entry** is a single IP (start == end; includes ``/32``, ``/128``
  and ``A-A``);
* limits: ``count(range entries) <= 128`` and ``count(address entries) <= 256``
  (:data:`MAX_RANGES`, :data:`MAX_ADDRESSES`).

Duplicates are not errors, but every entry counts, as it would in Salesforce.

Caveat: the help text can also be read as "at most 128 entries of any kind,
whose ranges together cover at most 256 addresses". Every list that satisfies
that stricter reading also satisfies the rule above, so this module never rejects
a list Salesforce would accept under either reading; it may accept a list that
the stricter reading would not. :attr:`Allowlist.covered` reports the total
number of addresses covered so callers can warn about it.

Matching
--------
:meth:`Allowlist.contains` accepts strings or :mod:`ipaddress` objects, returns
``False`` (never raises) for anything that is not an IP address, and lets an
IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, as a dual-stack socket reports an
IPv4 peer) match the IPv4 entries covering ``a.b.c.d``. The reverse is not done:
a plain IPv4 address never matches an IPv6 entry, because it is not known that
Salesforce would map it; erring this way can only cause a spurious "not on the
allowlist" warning, never a missed one. It is a linear scan over precomputed integer bounds: at most
384 entries, called once per token call. This module is pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv6Address,
    ip_address,
    ip_network,
)

__all__ = [
    "MAX_ADDRESSES",
    "MAX_RANGES",
    "Allowlist",
    "AllowlistError",
    "IPAddress",
    "IPRange",
    "parse_allowlist",
]

IPAddress = IPv4Address | IPv6Address

#: Salesforce: at most this many range entries (start != end).
MAX_RANGES = 128
#: Salesforce: at most this many single-address entries (start == end).
MAX_ADDRESSES = 256

DEFAULT_SETTING = "SIDECAR_ALLOWLIST"

_SEPARATORS = re.compile(r"[,\r\n]")
_EXAMPLES = "expected e.g. 203.0.113.7, 203.0.113.0/24 or 203.0.113.1-203.0.113.9"
_MAX_SHOWN = 80  # longest item text quoted in an error message
_DESCRIBE_SHOWN = 10  # entries listed by Allowlist.describe()


class AllowlistError(ValueError):
    """``SIDECAR_ALLOWLIST`` is invalid; the message is meant for the user."""


def _unmapped(addr: IPAddress) -> int | None:
    """For ``::ffff:a.b.c.d``, the integer of ``a.b.c.d``; otherwise None."""
    if isinstance(addr, IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return int(mapped)
    return None


def _coerce(ip: object) -> IPAddress | None:
    """An address from a string or address object; None if it is not one."""
    if isinstance(ip, IPv4Address | IPv6Address):
        return ip
    if not isinstance(ip, str):
        return None
    return _parse_ip(ip)


@functools.lru_cache(maxsize=256)
def _parse_ip(text: str) -> IPAddress | None:
    """Cached: the guard asks about the same few egress IPs on every token call."""
    try:
        return ip_address(text.strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class IPRange:
    """One allowlist entry as Salesforce stores it: inclusive ``start``-``end``."""

    start: IPAddress
    end: IPAddress

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if not isinstance(getattr(self, name), IPv4Address | IPv6Address):
                raise TypeError(f"IPRange.{name} must be an IPv4Address or IPv6Address")
        if self.start.version != self.end.version:
            raise AllowlistError(
                f"mixed IPv4/IPv6 range {self.start}-{self.end}: "
                "start and end must be the same IP version"
            )
        if int(self.end) < int(self.start):
            raise AllowlistError(
                f"range {self.start}-{self.end} ends before it starts; "
                f"did you mean {self.end}-{self.start}?"
            )

    @classmethod
    def single(cls, ip: IPAddress) -> IPRange:
        return cls(ip, ip)

    @property
    def version(self) -> int:
        return self.start.version

    @property
    def size(self) -> int:
        """Number of addresses in the range (1 for a single address)."""
        return int(self.end) - int(self.start) + 1

    @property
    def is_single(self) -> bool:
        return self.start == self.end

    def __contains__(self, ip: object) -> bool:
        addr = _coerce(ip)
        if addr is None:
            return False
        lo, hi = int(self.start), int(self.end)
        if addr.version == self.version and lo <= int(addr) <= hi:
            return True
        if self.version == 4:
            n = _unmapped(addr)
            return n is not None and lo <= n <= hi
        return False

    def __str__(self) -> str:
        return str(self.start) if self.is_single else f"{self.start}-{self.end}"


@dataclass(frozen=True)
class Allowlist:
    """An ordered tuple of :class:`IPRange` entries (limits are checked by
    :func:`parse_allowlist`, not by the constructor)."""

    ranges: tuple[IPRange, ...] = ()
    _v4: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _v6: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ranges = tuple(self.ranges)
        for r in ranges:
            if not isinstance(r, IPRange):
                raise TypeError(f"Allowlist entries must be IPRange, not {type(r).__name__}")
        object.__setattr__(self, "ranges", ranges)
        bounds: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for r in ranges:
            bounds[r.version].append((int(r.start), int(r.end)))
        object.__setattr__(self, "_v4", tuple(bounds[4]))
        object.__setattr__(self, "_v6", tuple(bounds[6]))

    def contains(self, ip: str | IPAddress) -> bool:
        """True if ``ip`` lies in any entry. Non-IP input gives False, never raises.

        An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) also matches IPv4 entries
        covering ``a.b.c.d``; a plain IPv4 address matches IPv4 entries only.
        """
        addr = _coerce(ip)
        if addr is None:
            return False
        n = int(addr)
        for lo, hi in self._v4 if addr.version == 4 else self._v6:
            if lo <= n <= hi:
                return True
        if addr.version == 6 and self._v4:
            n4 = _unmapped(addr)
            if n4 is not None:
                for lo, hi in self._v4:
                    if lo <= n4 <= hi:
                        return True
        return False

    def __contains__(self, ip: object) -> bool:
        return self.contains(ip)  # type: ignore[arg-type]  # contains() never raises

    def missing(self, ips: Iterable[str]) -> list[str]:
        """The items of ``ips`` not covered by the allowlist, in their order."""
        return [ip for ip in ips if not self.contains(ip)]

    @property
    def counts(self) -> tuple[int, int]:
        """``(range entries, address entries)`` as Salesforce counts them."""
        singles = sum(1 for r in self.ranges if r.is_single)
        return len(self.ranges) - singles, singles

    @property
    def covered(self) -> int:
        """Total addresses spanned by all entries (overlaps counted twice)."""
        return sum(r.size for r in self.ranges)

    def describe(self) -> str:
        """A one-line human summary, e.g. for a startup log line."""
        if not self.ranges:
            return "empty allowlist (no entries)"
        n_ranges, n_addrs = self.counts
        shown = ", ".join(str(r) for r in self.ranges[:_DESCRIBE_SHOWN])
        more = len(self.ranges) - _DESCRIBE_SHOWN
        if more > 0:
            shown += f", ... and {more} more"
        return (
            f"{_plural(len(self.ranges), 'entry', 'entries')} "
            f"({_plural(n_ranges, 'range')} of {MAX_RANGES}, "
            f"{_plural(n_addrs, 'single address', 'single addresses')} of {MAX_ADDRESSES}): "
            f"{shown}"
        )

    def __iter__(self) -> Iterator[IPRange]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        """Comma-separated entries; ``parse_allowlist(str(a)) == a``."""
        return ", ".join(str(r) for r in self.ranges)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _shown(item: str) -> str:
    if len(item) > _MAX_SHOWN:
        item = item[: _MAX_SHOWN - 3] + "..."
    return repr(item)


def _hint(item: str) -> str:
    """A fix for a common mistake in an item that is not an address at all."""
    if any(c.isspace() for c in item):
        return "separate entries with commas or newlines"
    if ";" in item:
        return "separate entries with commas, not semicolons"
    if "%" in item:
        return "remove the zone index (the part from '%'); Salesforce takes plain addresses"
    if item.startswith("[") or item.endswith("]"):
        return "remove the brackets"
    if "://" in item or "@" in item:
        return "give the IP address, not a URL"
    if item.count(":") == 1 and "." in item:
        return "remove the port"
    if any(c.isalpha() for c in item) and ":" not in item:
        return "give the IP address, not a host name"
    if re.search(r"(^|[.])0\d", item) and ":" not in item:
        return "remove leading zeros from the IPv4 octets"
    return _EXAMPLES


def _parse_address(text: str) -> IPAddress:
    if "%" in text:  # ip_address() accepts IPv6 zone indexes; Salesforce does not
        raise ValueError("zone index")
    return ip_address(text)


def _parse_item(item: str, where: str) -> IPRange:
    bad = f"{_shown(item)} is not an IP address, CIDR or START-END range ({where})"
    if "://" in item or "@" in item or ";" in item:  # would be misread as CIDR/range
        raise AllowlistError(f"{bad}; {_hint(item)}")

    if "-" in item:
        parts = item.split("-")
        if len(parts) != 2:
            raise AllowlistError(f"{bad}; a range has exactly one '-': START-END")
        start_text, end_text = (p.strip() for p in parts)
        if not start_text or not end_text:
            which = "start" if not start_text else "end"
            raise AllowlistError(f"range {_shown(item)} has no {which} ({where}); write START-END")
        ends: list[IPAddress] = []
        for side in (start_text, end_text):
            try:
                ends.append(_parse_address(side))
            except ValueError:
                if "/" in side:
                    fix = "both ends of a range must be plain addresses; write a CIDR on its own"
                else:
                    fix = _hint(side)
                    if fix == _EXAMPLES:
                        fix = "each end must be one address, e.g. 203.0.113.7"
                raise AllowlistError(
                    f"{_shown(side)} in range {_shown(item)} is not an IP address ({where}); {fix}"
                ) from None
        start, end = ends
        if start.version != end.version:
            raise AllowlistError(
                f"mixed IPv4/IPv6 range {_shown(item)} ({where}); "
                "start and end must both be IPv4 or both be IPv6"
            )
        if int(end) < int(start):
            raise AllowlistError(
                f"range {start}-{end} ends before it starts ({where}); did you mean {end}-{start}?"
            )
        return IPRange(start, end)

    if "/" in item:
        parts = item.split("/")
        if len(parts) != 2:
            raise AllowlistError(f"{bad}; a CIDR has exactly one '/': ADDRESS/PREFIX")
        addr_text, prefix_text = (p.strip() for p in parts)
        try:
            addr = _parse_address(addr_text)
        except ValueError:
            raise AllowlistError(f"{bad}; {_hint(addr_text)}") from None
        max_prefix = addr.max_prefixlen
        try:
            net = ip_network(f"{addr}/{prefix_text}", strict=False)
        except ValueError:
            raise AllowlistError(
                f"{_shown(item)} has an invalid prefix length ({where}); "
                f"IPv{addr.version} prefixes run from /0 to /{max_prefix}"
            ) from None
        if net.network_address != addr:
            raise AllowlistError(
                f"{_shown(item)} has host bits set ({where}); did you mean {net}? "
                f"(or {addr} alone for just that address)"
            )
        return IPRange(net.network_address, net.broadcast_address)

    try:
        return IPRange.single(_parse_address(item))
    except ValueError:
        raise AllowlistError(f"{bad}; {_hint(item)}") from None


def _check_limits(allowlist: Allowlist, setting: str) -> None:
    n_ranges, n_addrs = allowlist.counts
    problems = []
    if n_ranges > MAX_RANGES:
        problems.append(
            f"allowlist has {n_ranges} ranges; Salesforce allows at most {MAX_RANGES} "
            f"({n_ranges - MAX_RANGES} too many)"
        )
    if n_addrs > MAX_ADDRESSES:
        problems.append(
            f"allowlist has {n_addrs} single addresses; Salesforce allows at most "
            f"{MAX_ADDRESSES} ({n_addrs - MAX_ADDRESSES} too many)"
        )
    if problems:
        raise AllowlistError(
            f"{setting}: "
            + "; ".join(problems)
            + ". Remove duplicates and unused entries, or merge neighbouring entries, "
            "so it matches what Salesforce can store"
        )


def parse_allowlist(text: str | None, *, setting: str = DEFAULT_SETTING) -> Allowlist:
    """Parse ``SIDECAR_ALLOWLIST`` text; None or blank gives an empty Allowlist.

    Raises :class:`AllowlistError` naming the first bad item, or the exceeded
    Salesforce limit (see the module docstring for how limits are counted).
    """
    if text is None:
        return Allowlist(())
    if not isinstance(text, str):
        raise TypeError(f"{setting} must be a string, not {type(text).__name__}")
    items = [s for s in (raw.strip() for raw in _SEPARATORS.split(text)) if s]
    ranges = tuple(
        _parse_item(item, f"item {i} of {setting}") for i, item in enumerate(items, start=1)
    )
    allowlist = Allowlist(ranges)
    _check_limits(allowlist, setting)
    return allowlist
