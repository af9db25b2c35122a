"""Which hosts are Salesforce token hosts (and so get their TLS intercepted).

Patterns are host names where a leading ``*.`` stands for one DNS label, as in TLS certificates:
``*.my.salesforce.com`` matches ``acme.my.salesforce.com`` but not ``x.sandbox.my.salesforce.com``
(that is what ``*.sandbox.my.salesforce.com`` is for).
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _pattern_regex(pattern: str) -> str:
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        return r"[^.:/\s]+\." + re.escape(pattern[2:])
    return re.escape(pattern)


class TokenHosts:
    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._host_re = re.compile("^(?:" + "|".join(_pattern_regex(p) for p in self.patterns) + r")\.?$", re.I)
        self._each = [(p.strip().lower().rstrip("."), re.compile("^" + _pattern_regex(p) + r"\.?$", re.I))
                      for p in self.patterns]

    def matches(self, host: str) -> bool:
        return bool(self._host_re.match(host))

    def certificate_name(self, host: str) -> str:
        """The name the lane's certificate for ``host`` is issued to: the matching ``*.`` pattern (one
        wildcard certificate serves every org's My Domain, as Salesforce's own does), else the host."""
        host = host.lower().rstrip(".")
        for pattern, regex in self._each:
            if pattern.startswith("*.") and regex.match(host):
                return pattern
        return host
