"""The token lane: serve an app's connection to a Salesforce token host, after the front door
answered its CONNECT (to the host's name, or to an IP literal whose TLS SNI names a token host).

The lane terminates TLS (:mod:`sidecar.net.streams`, with the leaf certificate mitmproxy's certificate
store issues for the host, from the CA the app trusts) and reads HTTP/1.1 requests with h11: a token
call goes to the token core (detect, refuse, guard, send, record); anything else on that host goes to
the :class:`~sidecar.proxy.forward.Forwarder`. This is the engine for nearly all real token traffic, so it
stays small and fast: plain mitmdump burns about twice its CPU per token call (bench/RESULTS.md).
Only HTTP/1.1 is offered (ALPN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

import h11

from sidecar.egress.pair import Member
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.net.http1 import (
    CONTINUE,
    HttpConnection,
    ProtocolError,
    error_events,
    raw_headers,
    reason,
    response_event,
    values,
)
from sidecar.net.streams import (
    PeerClosed,
    SocketStream,
    TlsStream,
    handshake_failure,
    linger,
)
from sidecar.net.upstream import Addresses, describe_error
from sidecar.proxy.forward import ClientGone, Forwarder, Refused, Upstream502
from sidecar.proxy.leafcerts import LeafContexts
from sidecar.proxy.route import Routes
from sidecar.token.core import CLOSE, MAX_TOKEN_REQUEST_BYTES, TokenCore
from sidecar.token.flow import TokenFlow
from sidecar.token.messages import Answer, TokenRequest, origin_path

log = logging.getLogger("egress_sidecar.lane")

MAX_REQUESTS = 1_000_000  # bounded: requests on one keep-alive connection


class Lane:
    def __init__(self, core: TokenCore, routes: Routes, forwarder: Forwarder, contexts: LeafContexts,
                 metrics: Metrics, *, idle_timeout: float, handshake_timeout: float) -> None:
        self.core = core
        self.routes = routes
        self.forwarder = forwarder
        self.contexts = contexts
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout

    async def serve(self, stream: SocketStream, host: str, port: int, prefix: bytes = b"",
                    address: tuple[str, int] | None = None) -> None:
        """Serve one client connection after its CONNECT was answered (``prefix``: bytes the client sent
        right behind the CONNECT head); returns when it is done (the caller closes the stream). ``host``
        is the token host (the CONNECT name or the TLS SNI); ``address``, when the CONNECT named an IP
        literal, is where to connect instead of resolving ``host``."""
        stream.unread(prefix)
        try:
            tls = TlsStream.server(stream, self.contexts.get(host))
        except (ValueError, OSError, ssl.SSLError) as exc:
            event(log, logging.ERROR, f"cannot issue a certificate for {host}: {describe_error(exc)}")
            return
        try:
            await tls.handshake(asyncio.get_running_loop().time() + self.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = handshake_failure(exc)
            self.metrics.client_tls_failed(reason)
            event(log, logging.WARNING,
                  f"client TLS handshake for {host} failed ({describe_error(exc)}); if this is the app, does it "
                  "trust the sidecar's CA (ca.pem, or ca-bundle.pem in its CA bundle variable)?", reason=reason)
            return
        self.metrics.intercepted.inc()
        client = HttpConnection(tls, h11.SERVER)
        owner = self.forwarder.pool.new_owner()  # its upstream connections serve no other client
        try:
            await self._serve(client, host, port, address, owner)
        finally:
            self.forwarder.pool.forget(owner)

    async def _serve(self, client: HttpConnection, host: str, port: int, address: tuple[str, int] | None,
                     owner: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(MAX_REQUESTS):
            try:  # the whole head within the idle timeout, however slowly it trickles
                request = await client.next_event(loop.time() + self.idle_timeout)
                if not isinstance(request, h11.Request):
                    return  # the client closed (or left mid-head)
                if not await self._one(client, request, host, port, address, owner=owner):
                    return
            except ProtocolError as exc:
                event(log, logging.INFO, f"refused a malformed request to {host}: {exc.message}")
                await refuse(client, error_events(exc.status, exc.message), self.idle_timeout)
                return
            except (OSError, TimeoutError, ClientGone):
                return
            if not client.next_cycle():
                return

    async def proxied_token_call(self, client: HttpConnection, request: h11.Request, host: str, port: int,
                                 scheme: str, owner: int | None = None) -> bool:
        """A token call that came as a plain proxy request (``POST http[s]://host/...``, no CONNECT), its head
        read by the front door: over ``http`` it is refused, over ``https`` the core sends it as any other.
        Whether the connection may carry another request."""
        try:
            return await self._one(client, request, host, port, None, scheme, owner=owner)
        except ProtocolError as exc:
            await refuse(client, error_events(exc.status, exc.message), self.idle_timeout)
        except (OSError, TimeoutError, ClientGone):
            pass
        return False

    async def _one(self, client: HttpConnection, request: h11.Request, host: str, port: int,
                   address: tuple[str, int] | None = None, scheme: str = "https", last: bool = False,
                   owner: int | None = None) -> bool:
        """Serve one request; whether the exchange completed (the connection may carry another).
        ``owner``: the client connection, for the upstream pool (None: its upstream connection is used once)."""
        started = time.time()
        if request.method == b"CONNECT" or not (request.target.startswith(b"/") or b"://" in request.target[:10]):
            raise ProtocolError(400, "unsupported request target inside the tunnel")
        flow = self.core.detect(host, request.method.decode("ascii"), origin_path(request.target), started)
        if flow is None:
            return await self.forward(client, request, host, port, self.routes.member_for(True), address, owner=owner)
        headers = raw_headers(request)
        declared = values(request.headers, b"content-length")
        refusal = self.core.refusal(flow, scheme, int(declared[0]) if declared else None)
        if refusal is CLOSE:
            return False
        if isinstance(refusal, Answer):  # the body is left unread: the connection ends with it
            return await self._unsent(client, flow, refusal)
        flow.request = TokenRequest(host, port, request.method.decode("ascii"), request.target, headers,
                                    scheme=scheme, address=address, started=started, parsed=True, owner=owner)
        try:
            body = await self._read_body(client)
        except (PeerClosed, OSError, TimeoutError) as exc:
            why = "it stalled past SIDECAR_IDLE_TIMEOUT" if isinstance(exc, TimeoutError) else describe_error(exc)
            self.core.abandoned(flow, f"the client left before its request was complete: {why} (nothing was sent)")
            return False
        if body is None:
            return await self._unsent(client, flow, self.core.too_large(flow))
        flow.request.body = body
        answer = await self.core.answer(flow)
        try:
            await self._answer(client, answer, close=last)
        except (OSError, TimeoutError):
            return False  # the app left; the call is recorded with what really happened
        finally:
            self.core.finish(flow, answer)
        return True

    async def _unsent(self, client: HttpConnection, flow: TokenFlow, answer: Answer) -> bool:
        """Answer a token call that was not sent anywhere (its body may be unread), record it, and end the
        connection (False) after a lingering close."""
        await self._answer(client, answer, close=True)
        self.core.finish(flow, answer)
        await linger(client.stream)
        return False

    async def _read_body(self, client: HttpConnection) -> bytes | None:
        """The token request's body, read whole (chunked or not); None when it exceeds the cap."""
        if client.expects_continue:  # as mitmproxy does: answered here, not passed on
            await client.send(CONTINUE)
        body = bytearray()
        deadline: float | None = None  # one for the whole body, set at the first wait (a small body came with its head)
        for _ in range(MAX_TOKEN_REQUEST_BYTES + 2):  # bounded: each Data event holds at least one byte
            chunk = client.buffered_event()
            if chunk is None:
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.idle_timeout
                chunk = await client.next_event(deadline)
            if isinstance(chunk, h11.EndOfMessage):
                return bytes(body)
            if not isinstance(chunk, h11.Data):
                raise PeerClosed("the client closed in the middle of a request body")
            body += chunk.data
            if len(body) > MAX_TOKEN_REQUEST_BYTES:
                return None
        return None

    async def _answer(self, client: HttpConnection, answer: Answer, close: bool = False) -> None:
        headers = [(k, v) for k, v in answer.headers
                   if k.lower() not in (b"connection", b"keep-alive", b"transfer-encoding", b"content-length")]
        headers.append((b"Content-Length", b"%d" % len(answer.body)))
        if close:
            headers.append((b"Connection", b"close"))
        await client.send(response_event(answer.status, answer.reason or reason(answer.status), headers,
                                         parsed=answer.parsed), h11.Data(data=answer.body), h11.EndOfMessage(),
                          deadline=asyncio.get_running_loop().time() + self.idle_timeout)  # a client that stops reading is cut

    async def forward(self, client: HttpConnection, request: h11.Request, host: str, port: int,
                      member: Member | None, address: tuple[str, int] | None = None, *, tls: bool = True,
                      addresses: Addresses | None = None, owner: int | None = None) -> bool:
        """Forward a request that is not a token call (on a token host, or a plain proxy request);
        whether the connection may carry another. The sidecar's own refusals end the connection.
        ``owner``: the client connection, for the upstream pool (None: its upstream connection is used once)."""
        try:
            return await self.forwarder.forward(client, request, host, port, member, address, tls=tls,
                                                addresses=addresses, owner=owner)
        except (Upstream502, Refused) as exc:
            status, text = (403, f"refused: {exc}") if isinstance(exc, Refused) else (502, str(exc))
            await refuse(client, error_events(status, text), self.idle_timeout)
        except ProtocolError as exc:
            await refuse(client, error_events(exc.status, exc.message), self.idle_timeout)
        except (OSError, TimeoutError, ClientGone):
            pass
        return False


async def refuse(client: HttpConnection, events: tuple[h11.Event, ...], timeout: float) -> None:
    """Send the sidecar's own closing answer (whatever fails, quietly), then linger: the request may be
    unread (a trickled head, an unread body), and a close would then be a reset that can destroy the
    answer before the client reads it. Every refusal of the front door and the lane ends here."""
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, h11.LocalProtocolError):
        await client.send(*events, deadline=asyncio.get_running_loop().time() + timeout)
    await linger(client.stream)
