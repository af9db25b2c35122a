"""Which hosts are Salesforce token hosts (and so get their TLS intercepted), and which other hosts are
Salesforce's own (relayed as raw bytes, through the pair unless ``SIDECAR_SALESFORCE_TUNNELS=direct``).

Patterns are host names where a leading ``*.`` stands for one DNS label, as in TLS certificates:
``*.my.salesforce.com`` matches ``acme.my.salesforce.com`` but not ``x.sandbox.my.salesforce.com``
(that is what ``*.sandbox.my.salesforce.com`` is for).

Sources for the default token hosts (``DEFAULT_TOKEN_HOSTS`` in sidecar/config.py) and for
:data:`SALESFORCE_DOMAINS`, each with what it says:

- Salesforce Help, "OAuth Endpoints"
  (https://help.salesforce.com/s/articleView?id=xcloud.remoteaccess_oauth_endpoints.htm&type=5): the token
  endpoint is ``https://hostname/services/oauth2/token`` on ``login.salesforce.com``, a My Domain URL
  (``MyCompany.my.salesforce.com``), an Experience Cloud site URL (``MyDomainName.my.site.com``) or a
  custom URL; for sandboxes ``test.salesforce.com`` or ``MyDomainName--SandboxName.sandbox.my.salesforce.com``.
- Salesforce Help, "Enable CORS for OAuth Endpoints"
  (https://help.salesforce.com/s/articleView?id=xcloud.remoteaccess_oauth_endpoints_cors.htm&type=5):
  ``/services/oauth2/token`` is served on "My Domain or Experience Cloud site URLs".
- Connect REST API Developer Guide, "Connect to Experience Cloud Sites"
  (https://developer.salesforce.com/docs/atlas.en-us.chatterapi.meta/chatterapi/quickstart_communities.htm):
  "To use OAuth to connect to an Experience Cloud site, use the full path to the site URL", e.g.
  ``https://MyDomainName.my.site.com/services/oauth2/token``; its API 29.0 edition
  (https://developer.salesforce.com/docs/atlas.en-us.188.0.chatterapi.meta/chatterapi/quickstart_communities.htm)
  shows a site on its legacy domain with a path prefix: ``https://acme.force.com/customers/services/oauth2/token``.
  Hence ``*.force.com`` (one label: legacy Experience Cloud site domains, which the Apex ``DomainCreator``
  reference also names, ``ExperienceCloudSitesSubdomainName.force.com``) is a token host by default.
- Salesforce Help, "What Determines Your URL Formats"
  (https://help.salesforce.com/s/articleView?id=sf.domain_name_url_formats_what_determines.htm&type=5):
  enhanced domains (enforced in Winter '24) put the My Domain name in every hostname; partitioned domains
  add a word for the org type to non-production orgs' hostnames (``develop``, ``scratch``, ``patch``,
  ``demo``, ``trailblaze``, ``sandbox``), for My Domain and Experience Cloud sites alike.
- Salesforce Help, "My Domain Considerations"
  (https://help.salesforce.com/s/articleView?id=xcloud.domain_name_considerations.htm&type=5): users can
  also log in through the org's instance URL (``https://InstanceName.salesforce.com``) unless an admin
  prevents it, which Salesforce does not recommend. Instance names follow no pattern a ``*.`` can express,
  so they are not token hosts by default (add yours to ``SIDECAR_TOKEN_HOSTS``); as ``salesforce.com``
  hosts they are relayed through the pair.
- Salesforce's own Mobile SDK for Android (forcedotcom/SalesforceMobileSDK-Android,
  ``libs/SalesforceSDK/src/com/salesforce/androidsdk/auth/AuthenticationUtilities.kt``,
  ``isSalesforceUrl``), a list it says it took from Salesforce Help "My Domain URL Formats"
  (https://help.salesforce.com/s/articleView?id=sf.domain_name_url_formats.htm&type=5): ``salesforce.com``,
  ``force.com``, ``sfdcopens.com``, ``site.com``, ``lightning.com``, ``salesforce-sites.com``,
  ``force-user-content.com``, ``salesforce-experience.com``, ``salesforce-scrt.com``. Experience Builder's
  preview is ``MyDomainName.preview.salesforce-experience.com`` (Salesforce CMS Connect prerequisites,
  https://developer.salesforce.com/docs/platform/cms/guide/cms-connect-prerequisites.html).
- Public code only (not in a Salesforce page we could read; as REFERENCE.md says of these clouds):
  ``visualforce.com``, ``documentforce.com`` (``NAME--c.documentforce.com`` file links),
  ``cloudforce.com``, ``salesforce-setup.com`` (``NAME.my.salesforce-setup.com``); Government Cloud Plus
  on ``.mil`` domains (browser extensions' host permissions for ``*.my.salesforce.mil``,
  ``*.lightning.force.mil``, ``*.lightning.crmforce.mil``, ``cloudforce.mil``, ``visualforce.mil``; OAuth
  clients that accept ``https://NAME.my.salesforce.mil`` as a login URL); Salesforce in China on
  ``sfcrmapps.cn`` and ``sfcrmproducts.cn``. So ``*.my.salesforce.mil`` is a default token host *by
  analogy* with ``*.my.salesforce.com`` (its sandbox and partitioned forms are not assumed: add them if
  you have them), and China's login hosts are not (public code disagrees on them); both clouds' domains
  are Salesforce-owned for routing.
- Not included: the domains only some list names without any Salesforce source we could read (e.g.
  ``salesforce-communities.com``); the "Allow the Required Domains" help article itself was not readable
  here. Add any host to ``SIDECAR_TOKEN_HOSTS`` to intercept it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Salesforce-owned domains (a host is one of them, or ends in "." + one), each with its bounded class:
# the only thing a metric label ever says about such a host. Token hosts are matched first and never
# looked up here.
SALESFORCE_DOMAINS: tuple[tuple[str, str], ...] = (
    ("salesforce.com", "salesforce"),  # instances (InstanceName.salesforce.com), api.salesforce.com, ...
    ("force.com", "force"),  # Lightning (NAME.lightning.force.com), Visualforce (NAME--pkg.vf.force.com), files
    ("site.com", "site"),  # Experience Cloud site forms not intercepted, Site.com
    ("salesforce-sites.com", "salesforce_sites"),  # Salesforce Sites (NAME.my.salesforce-sites.com)
    ("salesforce-experience.com", "experience"),  # Experience Builder and its previews
    ("visualforce.com", "visualforce"),
    ("documentforce.com", "content"),
    ("force-user-content.com", "content"),
    ("salesforce-setup.com", "setup"),
    ("cloudforce.com", "salesforce"),
    ("lightning.com", "other"),
    ("sfdcopens.com", "other"),
    ("salesforce-scrt.com", "other"),
    ("salesforce.mil", "government"),
    ("force.mil", "government"),
    ("crmforce.mil", "government"),
    ("cloudforce.mil", "government"),
    ("visualforce.mil", "government"),
    ("sfcrmapps.cn", "china"),
    ("sfcrmproducts.cn", "china"),
)
DOMAIN_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(cls for _, cls in SALESFORCE_DOMAINS))
_SALESFORCE_RE = re.compile(
    r"^(?:[^.]+\.)*(" + "|".join(re.escape(d) for d, _ in SALESFORCE_DOMAINS) + r")\.?$", re.I)
_CLASS_OF = dict(SALESFORCE_DOMAINS)


def salesforce_domain_class(host: str) -> str | None:
    """The class of a Salesforce-owned host (one of :data:`DOMAIN_CLASSES`), or None for any other host."""
    m = _SALESFORCE_RE.match(host)
    return _CLASS_OF[m.group(1).lower()] if m else None


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
