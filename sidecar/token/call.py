"""What a token call is, and how its request and response are classified. Pure code, no I/O.

A token call is ``POST /services/oauth2/token`` (or ``POST /SITE-PATH/services/oauth2/token`` on an
Experience Cloud site) on an intercepted Salesforce host. Its grant type and
its outcome are reduced to small fixed sets, so they can be metric labels and log fields without
ever carrying a token, a secret or a customer's identity.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, unquote_plus

TOKEN_PATH = "/services/oauth2/token"

GrantType = Literal["refresh_token", "authorization_code", "jwt_bearer", "client_credentials", "password", "other"]
Outcome = Literal[
    "success", "ip_restricted", "invalid_grant", "client_error", "server_error", "upstream_error", "blocked"
]

# Grants that Salesforce checks against the Refresh Token IP Allowlist.
ALLOWLISTED_GRANTS: frozenset[str] = frozenset({"refresh_token", "authorization_code"})
# Grants known NOT to be checked. Anything else (including a grant type we could not read) is treated
# as subject to the allowlist: routing it through an allowlisted member costs nothing.
EXEMPT_GRANTS: frozenset[str] = frozenset({"jwt_bearer", "client_credentials", "password"})


def subject_to_allowlist(grant: str) -> bool:
    return grant not in EXEMPT_GRANTS

_GRANTS: dict[str, GrantType] = {
    "refresh_token": "refresh_token",
    "authorization_code": "authorization_code",
    "urn:ietf:params:oauth:grant-type:jwt-bearer": "jwt_bearer",
    "client_credentials": "client_credentials",
    "password": "password",
}
# Salesforce error codes we pass through to logs; anything else is reported as "other".
KNOWN_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client_id",
        "invalid_client_credentials",
        "invalid_client",
        "invalid_request",
        "unsupported_grant_type",
        "invalid_scope",
        "inactive_user",
        "inactive_org",
        "rate_limit_exceeded",
        "unsupported_response_type",
        "invalid_app_access",
        "server_error",
    }
)
_IP_RESTRICTED = re.compile(r"ip\s+restricted", re.IGNORECASE)


def is_token_request(method: str, path: str) -> bool:
    """True for a POST to the token endpoint in any form a server may route there: the query string,
    repeated or trailing slashes, dot segments, percent-encoded characters, path parameters
    (``;jsessionid=``), backslashes and letter case do not matter. Any path that *ends* in the endpoint
    counts: Experience Cloud sites serve it under the site's path (``/customers/services/oauth2/token``;
    Salesforce: "use the full path to the site URL"). A lookalike is treated as a token call (it then
    passes the guard like any other); it is never forwarded around it."""
    return method.upper() == "POST" and normalized_path(path).endswith(TOKEN_PATH)


def normalized_path(path: str) -> str:
    """``path`` (no query) as a lenient server would resolve it: decoded once, dot segments removed,
    empty segments and path parameters dropped, lower case."""
    # An app asks for a handful of paths over and over: each is worked out once (a long made-up one is
    # not kept).
    return _normalized_cached(path) if len(path) <= MAX_CACHED_PATH else _normalized(path)


MAX_CACHED_PATH = 1024


def _normalized(path: str) -> str:
    segments: list[str] = []
    for segment in unquote(path.partition("?")[0]).replace("\\", "/").split("/"):
        segment = segment.partition(";")[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return ("/" + "/".join(segments)).lower()


_normalized_cached = functools.lru_cache(maxsize=512)(_normalized)


def request_fields(content_type: str | None, body: bytes, query: str = "") -> dict[str, list[str]]:
    """The parameters of a token request, from the query string and a form body together, as Salesforce
    reads them. A body that is not form-encoded contributes nothing. Never raises."""
    fields: dict[str, list[str]] = {}
    sources = [query]
    if not content_type or "application/x-www-form-urlencoded" in content_type.lower():
        try:
            sources.append(body.decode("utf-8", errors="strict"))
        except UnicodeDecodeError:
            pass
    for source in sources:
        try:
            # No field limit: a token request's body is capped (64 KiB) before it is read, and dropping a
            # long form whole would hide the grant and the app Salesforce reads in it.
            parsed = parse_qs(source, keep_blank_values=True)
        except ValueError:
            continue
        for name, values in parsed.items():
            fields.setdefault(name, []).extend(values)
    return fields


def single_field(fields: dict[str, list[str]], name: str) -> str | None:
    """The value of a parameter, not empty; None when absent or ambiguous. A parameter given more than once
    with the same value (in the query string and the form, as some clients send ``client_id``) is not
    ambiguous: Salesforce reads that value whichever copy it takes."""
    values = set(fields.get(name, []))
    return values.pop() if len(values) == 1 and "" not in values else None


def grant_type(content_type: str | None, body: bytes, query: str = "") -> GrantType:
    """The grant type of a token request, reduced to the fixed set. Absent or ambiguous is ``other``."""
    return grant_of(request_fields(content_type, body, query))


def grant_of(fields: dict[str, list[str]]) -> GrantType:
    value = single_field(fields, "grant_type")
    return _GRANTS.get(value.strip(), "other") if value else "other"


def client_id(fields: dict[str, list[str]], authorization: str | None) -> str | None:
    """The app a token request is for, as Salesforce sees it: HTTP Basic client credentials (form-encoded,
    RFC 6749 2.3.1) or the ``client_id`` parameter. None when absent or ambiguous. Never raises."""
    if authorization and authorization[:6].lower() == "basic ":
        try:
            user = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8").partition(":")[0]
        except (ValueError, UnicodeDecodeError):
            user = ""
        if user:
            return unquote_plus(user)
    return single_field(fields, "client_id")


@dataclass(frozen=True)
class Classified:
    outcome: Outcome
    error_code: str | None = None


def classify_response(status: int, body: bytes) -> Classified:
    """Reduce a token endpoint response to an outcome. Never raises, whatever the body holds."""
    error, description = _error_fields(body) if status >= 400 else (None, None)
    code = (error if error in KNOWN_ERRORS else "other") if error else None
    if 200 <= status < 300:
        return Classified("success")
    if status >= 500:
        return Classified("server_error", code)
    if error == "invalid_grant":
        if description and _IP_RESTRICTED.search(description):
            return Classified("ip_restricted", code)
        return Classified("invalid_grant", code)
    return Classified("client_error", code)


def _error_fields(body: bytes) -> tuple[str | None, str | None]:
    try:
        data = json.loads(body[:65536])
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    error, description = data.get("error"), data.get("error_description")
    return (
        error if isinstance(error, str) else None,
        description if isinstance(description, str) else None,
    )


def issued_refresh_token(body: bytes) -> str | None:
    """The refresh token in a successful token response (rotated or newly issued), if there is one."""
    return answer_grant(body)[0]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a successful token answer was for: the customer org and the user (Salesforce record ids,
    ``00D...`` and ``005...``; identifiers, not secrets)."""

    org: str
    user: str


# `id` = https://HOST/id/ORG_ID/USER_ID (REFERENCE.md: "Each successful token answer names the org and user"),
# each id 15 or 18 characters.
_IDENTITY_URL = re.compile(r"https://[^/\s]+/id/(00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?)/"
                           r"(005[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?)/?")


def answer_grant(body: bytes) -> tuple[str | None, Identity | None]:
    """What a successful token answer says about its grant: the refresh token it carries (rotated or newly
    issued) and the org and user its ``id`` names; each None when absent or malformed. Never raises."""
    try:
        data = json.loads(body[:1_048_576])
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    token, url = data.get("refresh_token"), data.get("id")
    found = _IDENTITY_URL.fullmatch(url) if isinstance(url, str) and len(url) < 512 else None
    return (token if isinstance(token, str) and token else None,
            Identity(found.group(1), found.group(2)) if found else None)


def answer_identity(body: bytes) -> Identity | None:
    """The org and user a successful token answer names, or None."""
    return answer_grant(body)[1]


def host_class(host: str) -> str:
    """A bounded name for the kind of Salesforce host (for logs; never the host itself)."""
    host = host.lower().rstrip(".")
    if host == "login.salesforce.com":
        return "login"
    if host == "test.salesforce.com":
        return "test"
    if host.endswith(".sandbox.my.salesforce.com"):
        return "sandbox_my_domain"
    if host.endswith(".my.salesforce.com"):
        return "my_domain"
    if host.endswith(".my.site.com") or (host.endswith(".force.com") and host.count(".") == 2):
        return "experience_cloud"  # (NAME.force.com: a legacy site domain)
    if host.endswith(".salesforce.mil"):
        return "government"
    return "custom"


@dataclass
class TokenCall:
    """One token call, produced once and used twice: the canonical log line and the metrics."""

    started: float
    host_class: str
    grant_type: GrantType
    member: str = "direct"
    egress_ip: str = "unknown"
    route: str = "direct"
    guard: str = "allow"
    outcome: Outcome | None = None
    status: int | None = None
    error_code: str | None = None
    duration: float | None = None
    detail: str | None = None
    attempts: list[str] = field(default_factory=list)
    local: bool = False  # the sidecar answered the app itself (blocked, refused, upstream failure)
    in_flight: bool = False  # being routed and sent (the client may leave meanwhile)
    client_gone: bool = False
    app: str | None = None  # the client_id, shortened (sidecar.egress.evidence.short_client_id)
    retried_from: tuple[str, str] | None = None  # (member, egress IP) Salesforce refused as "ip restricted"
    shielded: str | None = None  # "coalesced" / "replayed": the rotation shield answered, nothing was sent
    egress: str | None = None  # how egress_ip is known: "verified" (on its connection), "probed", "unverified"
    failovers: int = 0  # moves to another member before any byte was sent
    retry_outcome: str | None = None  # the outcome of a retry through another egress IP, when one was made
    # The audit trail's names (addons/audit.py, before the log line is written): the customer org and user (Salesforce
    # record ids, not secrets) and the grant (12 hex digits of a keyed hash, as `egress-sidecar grants` shows it).
    org: str | None = None
    user: str | None = None
    grant: str | None = None

    def log_fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "event": "token_call",
            "host_class": self.host_class,
            "grant_type": self.grant_type,
            "route": self.route,
            "member": self.member,
            "egress_ip": self.egress_ip,
            "egress": self.egress,
            "guard": self.guard,
            "outcome": self.outcome,
            "status": self.status,
            "sf_error": self.error_code,
            "duration_ms": None if self.duration is None else round(self.duration * 1000, 2),
        }
        if self.app:
            out["app"] = self.app
        if self.org:
            out["org"] = self.org
        if self.user:
            out["user"] = self.user
        if self.grant:
            out["grant"] = self.grant
        if self.shielded:
            out["shield"] = self.shielded
        if self.retried_from:
            out["retried_from"] = {"member": self.retried_from[0], "egress_ip": self.retried_from[1],
                                   "outcome": "ip_restricted"}
        if len(self.attempts) > 1:
            out["attempts"] = self.attempts
        if self.detail:
            out["detail"] = self.detail
        return out
