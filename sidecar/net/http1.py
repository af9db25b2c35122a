"""HTTP/1.1 for every side of the sidecar that speaks it, framed by h11.

h11 is sans-IO (as httpcore and uvicorn use it): it turns bytes into ``Request``, ``Response``,
``Data`` and ``EndOfMessage`` events and back, and runs the HTTP/1.1 state machine; a connection may
carry another exchange only when both sides are back in ``IDLE``. This module adds the I/O (any
:mod:`sidecar.net.streams` stream), the head size limit, and the few checks that are stricter than h11's:
obsolete line folding and ``Transfer-Encoding`` together with ``Content-Length`` in a request or a
response (the classic request smuggling and response splitting shapes) are refused instead of being
repaired.

h11 parses as well as writes: a second parser (httptools, llhttp) was measured on the lane's and the
forwarder's hot paths and saved nothing measurable, since h11's events and state machine stay while h11
writes the replies (docs/development.md, "The HTTP/1.1 codec").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import NoReturn
from urllib.parse import urlsplit

import h11

from sidecar.net.streams import CHUNK, PeerClosed, Stream

MAX_HEAD = 64 * 1024  # request and response heads
MAX_EVENTS = 1_000_000  # bounded: events read while waiting for one (each read brings at least one byte)
Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"proxy-connection", b"proxy-authorization", b"keep-alive", b"transfer-encoding", b"te",
     b"upgrade", b"trailer", b"proxy-authenticate"}
)
_OBS_FOLD = re.compile(rb"\n[ \t]")
CONTINUE = h11.InformationalResponse(status_code=100, reason=b"Continue", headers=[])


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; ``status`` is the answer a server gives for it (400, 413, 431, 501)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpConnection:
    """One HTTP/1.1 connection over a stream, as ``h11.CLIENT`` or ``h11.SERVER``."""

    def __init__(self, stream: Stream, role: type[h11.CLIENT] | type[h11.SERVER], *, max_head: int = MAX_HEAD) -> None:
        self.stream = stream
        self.h11 = h11.Connection(role, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self._server = role is h11.SERVER
        self._head: bytearray | None = None  # bytes of the head being read, for the obs-fold check
        self._eof = False
        self._error: h11.RemoteProtocolError | None = None  # found by buffered_event()

    @property
    def leftover(self) -> bytes:
        """The bytes received past the last event read: what a tunnel, a TLS handshake or a pipe that takes
        the connection over after a head must see first."""
        return bytes(self.h11.trailing_data[0])

    @property
    def expects_continue(self) -> bool:
        """The peer sent ``Expect: 100-continue`` and waits for an interim ``100`` (or the final answer)
        before it sends the body."""
        return self.h11.they_are_waiting_for_100_continue

    def _reading_head(self) -> bool:
        return self.h11.their_state is (h11.IDLE if self._server else h11.SEND_RESPONSE)

    async def next_event(self, deadline: float | None = None) -> h11.Event:
        """The peer's next event (``ConnectionClosed`` at a clean end); reads as needed, by ``deadline`` (the
        event loop's clock: TimeoutError past it). Raises ProtocolError for anything malformed, PeerClosed
        when the peer left in the middle of a message, OSError from the stream."""
        if self._error is not None:
            self._fail(self._error)
        for _ in range(MAX_EVENTS):
            head = self._reading_head()
            if head and self._head is None:
                self._head = bytearray(self.h11.trailing_data[0])
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc)
            if event is h11.NEED_DATA:
                data = await self.stream.recv(CHUNK, deadline)
                self._eof = not data
                if head and self._head is not None:
                    self._head += data
                self.h11.receive_data(data)
                continue
            if event is h11.PAUSED:
                return event
            if self._head is not None and isinstance(event, (h11.Request, h11.Response, h11.InformationalResponse)):
                self._check_head(event)
            return event
        raise ProtocolError(400, "too many reads for one HTTP event")

    def _fail(self, exc: h11.RemoteProtocolError) -> NoReturn:
        self._error = None
        if self._eof:
            raise PeerClosed("the peer closed the connection in the middle of a message") from None
        raise ProtocolError(exc.error_status_hint, _describe(exc)) from None

    def buffered_event(self) -> h11.Event | None:
        """The next event if the bytes already received hold it (no I/O; never a head), else None."""
        if self._reading_head():
            return None
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            self._error = exc  # next_event() raises it, with h11's details (h11 repeats only a vaguer one)
            return None
        return None if event is h11.NEED_DATA else event

    def _check_head(self, event: h11.Request | h11.Response | h11.InformationalResponse) -> None:
        assert self._head is not None
        consumed = len(self._head) - len(self.h11.trailing_data[0])
        head, self._head = self._head[:consumed], None
        if consumed > self.max_head:  # h11 only bounds a head still incomplete
            raise ProtocolError(431, f"head larger than {self.max_head} bytes")
        if _OBS_FOLD.search(head):
            raise ProtocolError(400, "obsolete line folding in the headers")
        if has(event.headers, b"transfer-encoding") and has(event.headers, b"content-length"):
            # RFC 9112 6.3: smuggling (a request) or response splitting (an answer); "ought to be handled
            # as an error". h11 would read either by its Transfer-Encoding.
            raise ProtocolError(400, "both Transfer-Encoding and Content-Length in one "
                                + ("request" if isinstance(event, h11.Request) else "response"))

    async def send(self, *events: h11.Event, deadline: float | None = None) -> None:
        """Frame the events and write them in one go (waiting, by ``deadline``, only for a peer that does not
        read)."""
        data = b"".join(self.h11.send(e) or b"" for e in events)
        if data:
            await self.stream.send(data, deadline)

    def next_cycle(self) -> bool:
        """After a complete exchange: ready for the next one (False when the connection must close)."""
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        return True

    def reusable(self) -> bool:
        """Idle on both sides with nothing unread: nothing of another exchange can leak into the next."""
        return (self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE
                and not self.h11.trailing_data[0] and not self.stream.readable_now())


def _describe(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:
        return f"head larger than {MAX_HEAD} bytes"
    return h11_message(exc)


_QUOTED = re.compile(r":?\s*(?:bytearray\()?b['\"].*", re.S)


def h11_message(exc: h11.ProtocolError) -> str:
    """h11's description of what is wrong, without the bytes it quotes: h11 repeats the offending request
    line, header line or value whole, and a token or a password may be in it. For logs and answers."""
    return _QUOTED.sub("", str(exc))[:200] or "malformed HTTP/1.1"


# -- headers ----------------------------------------------------------------------------------------
def values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The values of ``name`` (lower case) in h11 headers or raw (name, value) pairs."""
    return [v for k, v in headers if k.lower() == name]


def has(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(k.lower() == name for k, _ in headers)


def first(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = values(headers, name)
    return b", ".join(found) if found else None


def tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The comma-separated tokens of a header (``Connection``, ``Expect``), lower case."""
    return {t.strip().lower() for v in values(headers, name) for t in v.split(b",") if t.strip()}


def end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()) -> Headers:
    """The headers a proxy passes on: hop-by-hop ones (and those the ``Connection`` header names) dropped,
    and any in ``drop``; names keep their case."""
    pairs = list(headers)
    gone = HOP_BY_HOP | tokens(pairs, b"connection") | set(drop)
    return [(k, v) for k, v in pairs if k.lower() not in gone]


def request_event(method: bytes, target: bytes, headers: Headers, *, parsed: bool) -> h11.Request:
    """``h11.Request``. ``parsed``: every header name and value was read by h11 from a peer (so checked by it)
    or is the sidecar's own of a fixed form, and h11's per-header regex check is not run again; the
    framing headers are still normalised and the method and target checked. This is h11's private
    ``_parsed`` flag, which its own reader passes the same way (h11 pinned in pyproject.toml;
    tests/net/test_http1.py fails on an h11 without it)."""
    return h11.Request(method=method, target=target, headers=headers, _parsed=parsed)


def response_event(status: int, reason: bytes, headers: Headers, *, parsed: bool) -> h11.Response:
    """``h11.Response``; ``parsed`` as for :func:`request_event` (the reason too was read by h11, or is a
    standard phrase)."""
    return h11.Response(status_code=status, reason=reason, headers=headers, _parsed=parsed)


def raw_headers(event: h11.Request | h11.Response | h11.InformationalResponse) -> Headers:
    """Header names as the peer wrote them (h11 lower-cases ``event.headers``)."""
    return [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def closing_events(status: int, content_type: bytes, body: bytes,
                   extra: Iterable[tuple[bytes, bytes]] = ()) -> tuple[h11.Event, ...]:
    """A complete answer of the sidecar's own after which the connection closes (503s say when to retry)."""
    headers: Headers = [(b"Content-Type", content_type), *extra, (b"Content-Length", b"%d" % len(body)),
                        (b"Connection", b"close")]
    if status == 503 and not has(headers, b"retry-after"):
        headers.insert(1, (b"Retry-After", b"1"))
    return h11.Response(status_code=status, reason=reason(status), headers=headers), h11.Data(data=body), \
        h11.EndOfMessage()


def closing_response(status: int, content_type: bytes, body: bytes, extra: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """:func:`closing_events` as bytes, for a connection no :class:`HttpConnection` serves (yet)."""
    conn = h11.Connection(h11.SERVER)
    return b"".join(conn.send(e) or b"" for e in closing_events(status, content_type, body, extra))


def error_events(status: int, message: str) -> tuple[h11.Event, ...]:
    return closing_events(status, b"text/plain; charset=utf-8", f"egress-sidecar: {message}\n".encode())


def parse_authority(target: bytes) -> tuple[str, int] | None:
    """``(host, port)`` of a CONNECT target ``host:port`` / ``[v6]:port``, else None (a host name no resolver
    would accept included)."""
    try:
        parts = urlsplit("//" + target.decode("ascii"))
        host, port = parts.hostname, parts.port
    except (UnicodeDecodeError, ValueError):
        return None
    if not host or port is None or not 0 < port < 65536 or parts.path or parts.query or parts.username:
        return None
    try:  # what a resolver will accept: no empty label, none over 63 characters
        host.encode("idna")
    except UnicodeError:
        return None
    return host.lower(), port


def absolute_target(target: bytes) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a plain proxy request's absolute-form target (``http://host/...`` or
    ``https://...``), else None."""
    try:
        parts = urlsplit(target.decode("latin-1"))
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in ("http", "https") or not host:
        return None
    return scheme, host, port or (443 if scheme == "https" else 80)
