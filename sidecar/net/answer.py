"""A whole HTTP answer read into memory (:func:`sidecar.net.upstream.read_answer` returns one), and its
body decoded within a bound. It lives in ``net`` because reading answers does: the token core
(sidecar.token.messages re-exports it) hands the same type back to the lane.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import brotli

try:
    from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
except ImportError:
    from backports import zstd

from sidecar.net.http1 import Headers, first

MAX_DECODED_BYTES = 1024 * 1024  # a token answer is ~2 KB; never inflate more than this to read it


@dataclass(slots=True)
class Answer:
    """One whole answer: a server's as read (for a token call, what the app gets), or the sidecar's own
    (``local``)."""

    status: int
    headers: Headers
    body: bytes = b""
    reason: bytes = b""
    local: bool = False
    finished: float = field(default_factory=time.time)
    parsed: bool = False  # headers and reason as h11 read them from Salesforce (checked once, not again)
    _content: bytes | None = field(default=None, repr=False, compare=False)
    memo: object = field(default=None, repr=False, compare=False)  # what the layer above read from it, kept once

    def content(self) -> bytes:
        """The body with its Content-Encoding undone (Salesforce gzips when the app accepts it), at most
        MAX_DECODED_BYTES of it; the raw body when it cannot be decoded. Decoded once: the core classifies
        it and the grant tracking reads the rotated token from it. Never raises."""
        if self._content is None:
            coding = first(self.headers, b"content-encoding")
            self._content = decode_bounded(self.body, coding.decode("latin-1").strip().lower(), MAX_DECODED_BYTES) \
                if coding and self.body else self.body
        return self._content


def decode_bounded(body: bytes, coding: str, limit: int) -> bytes:
    """``body`` decoded from ``coding`` (gzip, deflate, br, zstd), never more than ``limit`` bytes of output
    (a small answer that inflates to gigabytes is cut, not inflated); the raw body for an unknown coding
    or one that fails."""
    try:
        if coding in ("gzip", "x-gzip"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body, limit)
        if coding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some servers send
            try:
                return zlib.decompressobj(zlib.MAX_WBITS).decompress(body, limit)
            except zlib.error:
                return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, limit)
        if coding == "br":
            return brotli.Decompressor().process(body, output_buffer_limit=limit)[:limit]
        if coding == "zstd":
            return zstd.ZstdDecompressor().decompress(body, max_length=limit)
    except (zlib.error, brotli.error, zstd.ZstdError, ValueError):
        return body
    return body
