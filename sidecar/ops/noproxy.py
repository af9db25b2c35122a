"""A Salesforce domain in ``NO_PROXY`` silently sends token calls around the sidecar.

Every client that reads the proxy variables also reads ``NO_PROXY``/``no_proxy`` and connects directly
to the hosts it lists: a token call then leaves from the host's own IP, not the allowlisted static one,
with nothing in the sidecar's log or metrics. ``egress-sidecar check`` fails on it and
``egress-sidecar exec`` warns about it.

An entry is judged the way curl, Python's requests and urllib, Go and undici read it: ``*`` matches
every host; ``example.com``, ``.example.com`` and ``*.example.com`` match ``example.com`` and every name
under it; a ``:port`` suffix is ignored (it still matches port 443). An entry is flagged when it would
match a token host (``SIDECAR_TOKEN_HOSTS``) or any host under a Salesforce domain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Salesforce's own domains (production, sandboxes, Experience Cloud and Visualforce sites, government
# cloud, the China partner cloud): a token host or a REST host of any org lives under one of them.
SALESFORCE_DOMAINS = (
    "salesforce.com", "force.com", "site.com", "cloudforce.com", "database.com", "visualforce.com",
    "salesforce-sites.com", "salesforce.mil", "sfcrmapps.cn",
)
VARIABLES = ("NO_PROXY", "no_proxy")


def _entry_domain(entry: str) -> str:
    """The domain a NO_PROXY entry stands for: lower case, without ``*.``/``.``, brackets, port or final dot."""
    entry = entry.strip().lower()
    if entry.startswith("["):  # [::1]:8080
        return entry[1:].partition("]")[0]
    if entry.count(":") == 1:
        entry = entry.partition(":")[0]
    return entry.removeprefix("*.").lstrip(".").rstrip(".")


def _names(token_hosts: Iterable[str]) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower().removeprefix("*.").rstrip(".") for h in token_hosts if h.strip())
    return SALESFORCE_DOMAINS + hosts


def salesforce_entries(no_proxy: str, token_hosts: Iterable[str] = ()) -> list[str]:
    """The entries of a NO_PROXY value that would make a client skip the proxy for a Salesforce host."""
    names = _names(token_hosts)
    found = []
    for raw in re.split(r"[,\s]+", no_proxy):
        domain = _entry_domain(raw)
        if not domain:
            continue
        # "*", the name itself or a parent domain of it ("com"), or a host under it.
        if raw.strip() == "*" or any(n == domain or n.endswith("." + domain) or domain.endswith("." + n)
                                     for n in names):
            found.append(raw.strip())
    return found


def other_entries(environ: Mapping[str, str], token_hosts: Iterable[str] = ()) -> list[str]:
    """The entries of ``environ``'s NO_PROXY and no_proxy (both, in order, once each) that name no Salesforce
    host: the app's own exceptions (``.svc.cluster.local``, an internal API), which a wrapped command keeps."""
    hosts = tuple(token_hosts)
    kept: list[str] = []
    for name in VARIABLES:
        value = environ.get(name, "")
        refused = set(salesforce_entries(value, hosts))
        for raw in re.split(r"[,\s]+", value):
            entry = raw.strip()
            if entry and entry not in refused and entry not in kept:
                kept.append(entry)
    return kept


def bypass_warnings(environ: Mapping[str, str], token_hosts: Iterable[str] = ()) -> list[str]:
    """One sentence per NO_PROXY variable of ``environ`` that lists a Salesforce host, naming the entries."""
    hosts = tuple(token_hosts)
    out = []
    for name in VARIABLES:
        entries = salesforce_entries(environ.get(name, ""), hosts)
        if entries:
            out.append(
                f"{name} lists {', '.join(entries)}: clients that read it skip the proxy for Salesforce hosts "
                "and send token calls directly, from this host's IP instead of an allowlisted static one, and "
                f"the sidecar never sees them. Remove {'them' if len(entries) > 1 else 'it'} from {name}."
            )
    return out
