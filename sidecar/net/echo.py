"""An IP echo (``ip.quotaguard.com``: ``{"ip": "A.B.C.D"}``, or a bare IP), asked through a proxy: how the
sidecar learns which egress IP a pair member's connection leaves from.

Asked as an absolute-form ``GET`` on the proxy connection itself (the credentials on it), the answer
names the egress IP of that very connection, which can then carry a ``CONNECT`` (an HTTP proxy accepts
one after other requests on a keep-alive connection). Asked through a ``CONNECT`` tunnel (an
``https://`` echo), it names the egress of a connection that can carry nothing else.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

MAX_ECHO_BYTES = 64 * 1024


class EchoError(Exception):
    """The echo could not be asked, or its answer names no IP; the message is safe to show (no
    credentials). ``member_down``: the proxy member itself failed (unreachable, or it refused our
    credentials), as opposed to the echo behind it."""

    def __init__(self, message: str, member_down: bool = False) -> None:
        super().__init__(message)
        self.member_down = member_down


def parse_echo_body(body: bytes) -> str:
    """The IP in an echo answer: ``{"ip": "A.B.C.D"}`` JSON or a bare IP. Raises EchoError."""
    text = body.decode("utf-8", errors="replace").strip()
    candidate = text
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise EchoError("echo answer is not valid JSON") from None
        candidate = data.get("ip") if isinstance(data, dict) else None
        if not isinstance(candidate, str):
            raise EchoError('echo JSON has no "ip" string')
    try:
        return str(ipaddress.ip_address(candidate.strip()))
    except ValueError:
        raise EchoError(f"echo answer is not an IP address: {text[:60]!r}") from None


@dataclass(frozen=True)
class EchoTarget:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def from_url(cls, url: str) -> EchoTarget:
        p = urlsplit(url)
        port = p.port or (443 if p.scheme == "https" else 80)
        return cls(p.scheme, p.hostname or "", port, (p.path or "/") + (f"?{p.query}" if p.query else ""))

    @property
    def host_header(self) -> bytes:
        host = self.host.encode("idna")
        if self.port in (80, 443):
            return host
        return (b"[" + host + b"]" if b":" in host else host) + b":%d" % self.port

    def request(self, proxy_authorization: bytes | None, *, close: bool) -> h11.Request:
        """The GET for the echo: absolute-form with the proxy's credentials (asked on the proxy connection),
        or origin-form (``proxy_authorization`` None: inside a tunnel)."""
        headers = [(b"Host", self.host_header), (b"Accept", b"application/json")]
        if close:
            headers.append((b"Connection", b"close"))
        if proxy_authorization is None:
            return h11.Request(method=b"GET", target=self.path.encode(), headers=headers)
        url = b"http://" + self.host_header + self.path.encode()
        return h11.Request(method=b"GET", target=url, headers=[*headers, (b"Proxy-Authorization", proxy_authorization)])


PROXY_407 = "proxy refused the credentials (407): check USER:PASS in QUOTAGUARDSTATIC_URL"
