"""A fake Salesforce token endpoint that enforces the Refresh Token IP Allowlist and rotation.

Why: the sidecar exists because Salesforce rejects refresh-token and web-server-flow calls whose
TCP source address is not allowlisted, and rotates refresh tokens on every redemption. Tests and
the demo need a server that does exactly that, judged on the real peer address (never a header),
with the exact error bodies (REFERENCE.md), the same token shapes, and fault knobs for chaos tests.

One External Client App serves many customer orgs (an ISV's case): every grant belongs to an org
(:meth:`FakeSalesforce.add_org`), every successful answer names it (``id`` =
``https://login.salesforce.com/id/ORG_ID/USER_ID``), and an org may restrict the IPs its users log in
from (a profile's Login IP Ranges, or the app's IP relaxation policy set to Enforce in that org:
:meth:`FakeSalesforce.set_org_ip_ranges`). Such a customer-side refusal gets the very same
``invalid_grant`` / "ip restricted" answer as the app's allowlist: Salesforce does not document the
wording for the allowlist, and public code shows "ip restricted" texts for customer-side restrictions
(REFERENCE.md), so the sidecar cannot tell the two apart by the text, and neither can the tests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from ._server import HttpRequest, HttpServerConnection, ThreadedServer, send
from .certs import server_context

REFRESH = "refresh_token"
AUTH_CODE = "authorization_code"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_CREDENTIALS = "client_credentials"
PASSWORD = "password"
GRANT_TYPES = frozenset({REFRESH, AUTH_CODE, JWT_BEARER, CLIENT_CREDENTIALS, PASSWORD})
ALLOWLISTED_GRANTS = frozenset({REFRESH, AUTH_CODE})  # only these flows are subject to the allowlist
FAIL_MODES = (None, "garbage", "close_early", "slow", "500")
TOKEN_PATH = "/services/oauth2/token"
JSON_TYPE = "application/json;charset=UTF-8"
_TOKEN_CHARS = string.ascii_letters + string.digits + "._"
_ID_CHARS = string.ascii_letters + string.digits


def error_body(error: str, description: str) -> bytes:
    """Compact JSON, byte-identical to what Salesforce sends."""
    return json.dumps({"error": error, "error_description": description}, separators=(",", ":")).encode()


IP_RESTRICTED_BODY = error_body("invalid_grant", "ip restricted by app developer")
EXPIRED_TOKEN_BODY = error_body("invalid_grant", "expired access/refresh token")
INVALID_CLIENT_ID_BODY = error_body("invalid_client_id", "client identifier invalid")
INVALID_CLIENT_BODY = error_body("invalid_client", "invalid client credentials")
UNSUPPORTED_GRANT_BODY = error_body("unsupported_grant_type", "grant type not supported")


def _record_id(prefix: str) -> str:
    """An 18-character Salesforce record id as Salesforce makes them: 15 characters, then one checksum letter per
    block of 5 (bit i set when character i is an upper case letter), so the id survives case-insensitive use."""
    short = prefix + _rand(12, _ID_CHARS)
    blocks = (short[i:i + 5] for i in (0, 5, 10))
    return short + "".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[int("".join("1" if c.isupper() else "0"
                                                                         for c in reversed(b)), 2)] for b in blocks)


def _rand(n: int, alphabet: str = _TOKEN_CHARS) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _parse_allow_entry(entry: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """'1.2.3.4', 'start-end' (Salesforce's range form) or a CIDR network -> (first, last)."""
    entry = entry.strip()
    if "-" in entry:
        lo, hi = (ipaddress.ip_address(p.strip()) for p in entry.split("-", 1))
    elif "/" in entry:
        net = ipaddress.ip_network(entry, strict=False)
        lo, hi = net[0], net[-1]
    else:
        lo = hi = ipaddress.ip_address(entry)
    if lo.version != hi.version or lo > hi:  # type: ignore[operator]
        raise ValueError(f"bad allowlist range {entry!r}")
    return lo, hi


Range = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]


def _in_ranges(ranges: list[Range], ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(lo.version == addr.version and lo <= addr <= hi for lo, hi in ranges)  # type: ignore[operator]


@dataclass(slots=True)
class Org:
    """A customer org of the app: its id, its one user, and its own IP restrictions (None: none)."""

    org_id: str
    user_id: str
    ranges: list[Range] | None = None


@dataclass(frozen=True, slots=True)
class SeenRequest:
    source_ip: str
    source_port: int
    method: str
    path: str
    grant_type: str | None
    status: int | None  # None when no response was sent (fault modes)
    headers: dict[str, str]  # lowercase names
    body: bytes
    at: float = field(default_factory=time.time)
    org_id: str | None = None  # the org of the grant redeemed, when the server knew it


class FakeSalesforce(ThreadedServer):
    """TLS HTTP/1.1 server for POST /services/oauth2/token, also under a site's path as Experience Cloud
    sites serve it (/customers/services/oauth2/token), plus GET /services/data/."""

    def __init__(
        self,
        certfile: str | Path,
        keyfile: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allowlist: Iterable[str] = ("127.0.0.2",),
        client_id: str = "3MVG9demo",
        client_secret: str = "demo-consumer-secret",
        enforce_allowlist: bool = True,
        rotate: bool = True,
        require_secret: bool = True,
        instance_url: str | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        super().__init__(host, port, ssl_context=server_context(certfile, keyfile))
        self.client_id = client_id
        self.client_secret = client_secret
        self.enforce_allowlist = enforce_allowlist
        self.rotate = rotate
        self.require_secret = require_secret  # False: refresh/auth-code may omit the secret
        self.instance_url = instance_url  # None: https://<Host header>
        self.users = dict(users or {"demo@example.com": "demo-password"})
        self.org_id = _record_id("00D")  # the org of grants issued without naming one
        self.user_id = _record_id("005")
        self._orgs: dict[str, Org] = {self.org_id: Org(self.org_id, self.user_id)}
        self.slow_seconds = 3.0  # for fail_mode "slow"; capped at 30 s
        self._fail_mode: str | None = None
        self._allow: tuple[str, ...] = ()
        self._ranges: list[Range] = []
        self.set_allowlist(allowlist)
        self._refresh_tokens: dict[str, str] = {}  # token -> its grant's org id
        self._auth_codes: dict[str, str] = {}  # code -> the org id of the user who authorised it
        self._seen: list[SeenRequest] = []

    # ---- runtime knobs & state (thread-safe) -------------------------------------------------
    @property
    def fail_mode(self) -> str | None:
        return self._fail_mode

    @fail_mode.setter
    def fail_mode(self, mode: str | None) -> None:
        if mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}")
        self._fail_mode = mode

    @property
    def allowlist(self) -> tuple[str, ...]:
        return self._allow

    def set_allowlist(self, entries: Iterable[str]) -> None:
        entries = tuple(entries)
        ranges = [_parse_allow_entry(e) for e in entries]
        with self._lock:
            self._allow, self._ranges = entries, ranges

    def ip_allowed(self, ip: str) -> bool:
        with self._lock:
            return _in_ranges(self._ranges, ip)

    # ---- customer orgs ---------------------------------------------------------------------------
    def add_org(self, ip_ranges: Iterable[str] | None = None) -> str:
        """A new customer org of this app (with one user); its id. ``ip_ranges``: see set_org_ip_ranges."""
        org = Org(_record_id("00D"), _record_id("005"))
        with self._lock:
            self._orgs[org.org_id] = org
        self.set_org_ip_ranges(org.org_id, ip_ranges)
        return org.org_id

    def set_org_ip_ranges(self, org_id: str, entries: Iterable[str] | None) -> None:
        """The IPs the org's own restrictions let its grants be redeemed from (None: any). A redemption
        from outside gets the same "ip restricted" answer as the app's allowlist gives."""
        ranges = None if entries is None else [_parse_allow_entry(e) for e in entries]
        with self._lock:
            self._orgs[org_id].ranges = ranges

    def user_of(self, org_id: str) -> str:
        with self._lock:
            return self._orgs[org_id].user_id

    def issue_refresh_token(self, org_id: str | None = None) -> str:
        token = "5Aep861" + _rand(80)
        with self._lock:
            self._refresh_tokens[token] = self._org(org_id).org_id
        return token

    def issue_auth_code(self, org_id: str | None = None) -> str:
        code = "aPrx" + _rand(60, _ID_CHARS) + "=="
        with self._lock:
            self._auth_codes[code] = self._org(org_id).org_id
        return code

    def org_of(self, token_or_code: str) -> str | None:
        """The org of a refresh token or authorization code this server issued (and has not consumed)."""
        with self._lock:
            return self._refresh_tokens.get(token_or_code) or self._auth_codes.get(token_or_code)

    def refresh_token_valid(self, token: str) -> bool:
        with self._lock:
            return token in self._refresh_tokens

    def _org(self, org_id: str | None) -> Org:
        return self._orgs[org_id or self.org_id]  # (under the lock)

    def _org_refuses(self, org_id: str | None, ip: str) -> bool:
        with self._lock:
            org = self._orgs.get(org_id or "")
            return org is not None and org.ranges is not None and not _in_ranges(org.ranges, ip)

    @property
    def seen(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def reset_seen(self) -> None:
        with self._lock:
            self._seen.clear()

    # ---- HTTP --------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip, port = writer.get_extra_info("peername")[:2]
        conn = HttpServerConnection(reader, writer, self.read_timeout)
        while (req := await conn.read_request()) is not None:
            mode = self._fail_mode
            if mode == "garbage":
                self._record(req, ip, port, None, None)
                await send(writer, b"\x00\x15\x03garbage, not HTTP\r\n\r\n")
                return
            if mode == "close_early":
                self._record(req, ip, port, None, None)
                return
            if mode == "slow":
                await asyncio.sleep(min(max(self.slow_seconds, 0.0), 30.0))
            path = urlsplit(req.target).path
            org: str | None = None
            if mode == "500":
                status, body, grant = 500, error_body("server_error", "internal server error"), None
            elif path.endswith(TOKEN_PATH):  # also under an Experience Cloud site's path (/customers/services/...)
                status, body, grant, org = self._token(req, ip)
            elif path in ("/services/data", "/services/data/") and req.method == "GET":
                status, body, grant = 200, self._versions(), None
            else:
                body = b'[{"errorCode":"NOT_FOUND","message":"The requested resource does not exist"}]'
                status, grant = 404, None
            self._record(req, ip, port, grant, status, org)
            headers = {"Content-Type": JSON_TYPE, "Cache-Control": "no-cache,must-revalidate,max-age=0,no-store,private"}
            await conn.respond(status, body, headers)
            if not conn.keep_alive:
                return

    def _record(self, req: HttpRequest, ip: str, port: int, grant: str | None, status: int | None,
                org: str | None = None) -> None:
        rec = SeenRequest(ip, port, req.method, req.target, grant, status, req.header_map, req.body, org_id=org)
        with self._lock:
            self._seen.append(rec)

    @staticmethod
    def _versions() -> bytes:
        versions = [("Spring '25", "63.0"), ("Summer '25", "64.0"), ("Winter '26", "65.0")]
        return json.dumps([{"label": lb, "url": f"/services/data/v{v}", "version": v} for lb, v in versions]).encode()

    def _token(self, req: HttpRequest, ip: str) -> tuple[int, bytes, str | None, str | None]:
        """(status, body, grant type, the org of the grant when known)."""
        if req.method != "POST":
            return 400, error_body("invalid_request", "must use HTTP POST"), None, None
        form = dict(parse_qsl(urlsplit(req.target).query, keep_blank_values=True))
        ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
        if req.body:
            if ctype != "application/x-www-form-urlencoded":
                return 400, error_body("invalid_request", "invalid content type"), None, None
            try:
                form.update(parse_qsl(req.body.decode("utf-8"), keep_blank_values=True, strict_parsing=True))
            except (UnicodeDecodeError, ValueError):
                return 400, error_body("invalid_request", "malformed form body"), None, None
        grant = form.get("grant_type")
        if grant not in GRANT_TYPES:
            return 400, UNSUPPORTED_GRANT_BODY, grant, None
        if grant == JWT_BEARER:
            return (*self._jwt_grant(form.get("assertion", "")), grant, self.org_id)
        org = self.org_of(form.get("refresh_token" if grant == REFRESH else "code", "")) \
            if grant in ALLOWLISTED_GRANTS else self.org_id
        status, body = self._token_grant(req, ip, form, grant, org)
        return status, body, grant, org

    def _token_grant(self, req: HttpRequest, ip: str, form: dict[str, str], grant: str,
                     org: str | None) -> tuple[int, bytes]:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = req.header("authorization") or ""
        if auth[:6].lower() == "basic ":
            try:
                client_id, _, secret = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
                client_id, secret = unquote_plus(client_id), unquote_plus(secret)
            except (binascii.Error, UnicodeDecodeError):
                return 400, INVALID_CLIENT_BODY
        if client_id != self.client_id:
            return 400, INVALID_CLIENT_ID_BODY
        secret_optional = not self.require_secret and grant in ALLOWLISTED_GRANTS and not secret
        if not secret_optional and not hmac.compare_digest((secret or "").encode(), self.client_secret.encode()):
            return 400, INVALID_CLIENT_BODY
        # Allowlist before touching the token, so a blocked call never consumes/rotates it; the org's own
        # restriction likewise, with the same answer.
        if grant in ALLOWLISTED_GRANTS and self.enforce_allowlist and not self.ip_allowed(ip):
            return 400, IP_RESTRICTED_BODY
        if grant in ALLOWLISTED_GRANTS and self._org_refuses(org, ip):
            return 400, IP_RESTRICTED_BODY
        host = req.header("host") or f"{self.host}:{self._port}"
        if grant == REFRESH:
            old = form.get("refresh_token", "")
            with self._lock:
                if old not in self._refresh_tokens:
                    return 400, EXPIRED_TOKEN_BODY
                if self.rotate:
                    del self._refresh_tokens[old]
            new = self.issue_refresh_token(org) if self.rotate else None
            return 200, self._token_response(host, new, "refresh_token api", org)
        if grant == AUTH_CODE:
            with self._lock:
                code = form.get("code", "")
                if code not in self._auth_codes:
                    return 400, error_body("invalid_grant", "invalid authorization code")
                del self._auth_codes[code]
            return 200, self._token_response(host, self.issue_refresh_token(org), "refresh_token api", org)
        if grant == PASSWORD and self.users.get(form.get("username", "")) != form.get("password"):
            return 400, error_body("invalid_grant", "authentication failure")
        return 200, self._token_response(host, None, "api")

    def _jwt_grant(self, assertion: str) -> tuple[int, bytes]:
        """Checks shape and `iss` only; the signature is not verified (no app certificate here)."""
        try:
            payload = assertion.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            iss = claims["iss"]
        except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
            return 400, error_body("invalid_grant", "invalid assertion")
        if iss != self.client_id:
            return 400, INVALID_CLIENT_ID_BODY
        return 200, self._token_response(None, None, "api")

    def _token_response(self, host: str | None, refresh_token: str | None, scope: str, org_id: str | None = None) -> bytes:
        with self._lock:
            org = self._org(org_id)
        identity = f"https://login.salesforce.com/id/{org.org_id}/{org.user_id}"
        issued_at = str(int(time.time() * 1000))
        # Salesforce's signature: base64(HMAC-SHA256(client_secret, id + issued_at)).
        mac = hmac.new(self.client_secret.encode(), (identity + issued_at).encode(), hashlib.sha256)
        out = {
            "access_token": f"{org.org_id[:15]}!AQ{_rand(4, _ID_CHARS)}{_rand(105)}",
            "signature": base64.b64encode(mac.digest()).decode(),
            "scope": scope,
            "instance_url": self.instance_url or f"https://{host or f'{self.host}:{self._port}'}",
            "id": identity,
            "token_type": "Bearer",
            "issued_at": issued_at,
        }
        if refresh_token:
            out["refresh_token"] = refresh_token
        return json.dumps(out, separators=(",", ":")).encode()
