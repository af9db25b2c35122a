"""The token core's own request and answer: what the engine serving a token call (the lane) hands the
core and gets back. Plain data, no engine types, so the core is written and tested once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sidecar.net.answer import MAX_DECODED_BYTES, Answer, decode_bounded, zstd
from sidecar.net.http1 import Headers, first
from sidecar.token.call import Identity, answer_grant, request_fields

__all__ = ["MAX_DECODED_BYTES", "Answer", "TokenRequest", "decode_bounded", "grant_of", "origin_path", "origin_target",
           "zstd"]


@dataclass(slots=True)
class TokenRequest:
    """A token call as the app sent it (its body read whole: it is small and capped)."""

    host: str  # the token host the app asked for: the CONNECT name, or the TLS SNI
    port: int
    method: str
    target: bytes  # as the app sent it, origin-form (path and query)
    headers: Headers  # names as sent, in order
    body: bytes = b""
    scheme: str = "https"
    address: tuple[str, int] | None = None  # where to connect, when not (host, port): an IP-literal CONNECT
    started: float = field(default_factory=time.time)
    parsed: bool = False  # headers as h11 read them from the app (checked once, not again when sent on)
    owner: int | None = None  # the client connection it came on: only its calls reuse their upstream connection
    _fields: dict[str, list[str]] | None = field(default=None, repr=False, compare=False)

    def fields(self) -> dict[str, list[str]]:
        """The request's parameters (form body and query), parsed once: the core, the shield and the grant
        observer all read them."""
        if self._fields is None:
            self._fields = request_fields(self.content_type, self.body, self.query)
        return self._fields

    def header(self, name: bytes) -> bytes | None:
        """A header's value (``name`` in lower case); repeated ones joined with commas."""
        return first(self.headers, name)

    @property
    def path(self) -> str:
        return origin_path(self.target)

    @property
    def query(self) -> str:
        return self.target.decode("latin-1").partition("?")[2].partition("#")[0]

    @property
    def content_type(self) -> str | None:
        value = first(self.headers, b"content-type")
        return value.decode("latin-1") if value is not None else None

    @property
    def destination(self) -> tuple[str, int]:
        return self.address or (self.host, self.port)


def grant_of(answer: Answer) -> tuple[str | None, Identity | None]:
    """What a token answer says about its grant (:func:`sidecar.token.call.answer_grant`), parsed once per
    answer: the evidence, the audit trail and the grant tracking all read it."""
    if answer.memo is None:
        answer.memo = answer_grant(answer.content())
    return answer.memo  # type: ignore[return-value]


def origin_path(target: bytes) -> str:
    """The path of a request target, origin-form or absolute-form, without query or fragment."""
    text = target.decode("latin-1")
    if not text.startswith("/") and "://" in text[:10]:
        try:
            text = urlsplit(text).path or "/"
        except ValueError:
            return text
    return text.partition("?")[0].partition("#")[0]


def origin_target(target: bytes) -> bytes:
    """An absolute-form target (``https://host/path?q``) as origin-form (``/path?q``); others as they are."""
    if target.startswith(b"/") or b"://" not in target[:10]:
        return target
    try:
        parts = urlsplit(target.decode("latin-1"))
    except ValueError:
        return target
    out = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return out.encode("latin-1")
