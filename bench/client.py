"""The one client every contender is measured with.

Token calls use the standard library's ``http.client`` (the HTTP layer under urllib; keep-alive
through an HTTPS proxy via ``set_tunnel``, which sends CONNECT and then starts TLS), so the client
costs the same for every contender and adds little of its own. Passthrough uses a socket with h11
for the heads: CONNECT, TLS, one GET, then the body counted with ``recv_into`` into a fixed buffer. Time is client-side wall time from
``time.perf_counter_ns``.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import h11

from tests.harness import CLIENT_ID, CLIENT_SECRET, SF_HOST

TOKEN_PATH = "/services/oauth2/token"
TIMEOUT = 15.0
Address = tuple[str, int]


@dataclass(frozen=True)
class Route:
    """How the client reaches login.salesforce.com (or the bulk server) for one contender.

    ``proxies`` empty: straight to ``origin`` (no proxy). Several proxies: each new connection goes
    to the next one, as QuotaGuard's load balancer spreads connections over the pair.
    """

    name: str
    ca_file: str
    proxies: tuple[Address, ...] = ()
    proxy_auth: str | None = None  # Proxy-Authorization header value
    origin: Address | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a hostname that has no DNS here: connect to ``address``, verify as ``host``."""

    def __init__(self, host: str, address: Address, **kwargs: object) -> None:
        super().__init__(host, 443, **kwargs)  # type: ignore[arg-type]
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class TokenClient:
    """Opens connections for one route; ``n`` picks the proxy (round-robin over the pair)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.ctx = route.context()
        self._n = 0
        self._lock = threading.Lock()

    def connect(self) -> http.client.HTTPSConnection:
        r = self.route
        if not r.proxies:
            assert r.origin is not None
            conn: http.client.HTTPSConnection = _PinnedHTTPSConnection(
                SF_HOST, r.origin, context=self.ctx, timeout=TIMEOUT)
        else:
            with self._lock:
                host, port = r.proxies[self._n % len(r.proxies)]
                self._n += 1
            conn = http.client.HTTPSConnection(host, port, context=self.ctx, timeout=TIMEOUT)
            conn.set_tunnel(SF_HOST, 443, headers={"Proxy-Authorization": r.proxy_auth} if r.proxy_auth else None)
        conn.connect()
        return conn


class TokenSource:
    """Fresh refresh tokens from the world process (thread-safe, fetched in batches)."""

    def __init__(self, fetch: Callable[[int], list[str]]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._tokens: list[str] = []

    def take(self) -> str:
        with self._lock:
            if not self._tokens:
                self._tokens = self._fetch(200)
            return self._tokens.pop()


@dataclass
class Chain:
    """One app's refresh token, rotated on every successful redemption."""

    source: TokenSource
    token: str = ""

    def __post_init__(self) -> None:
        self.token = self.token or self.source.take()

    def body(self) -> bytes:
        return urlencode({
            "grant_type": "refresh_token", "refresh_token": self.token,
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        }).encode()


HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}


@dataclass
class Samples:
    """Latencies in nanoseconds and the errors seen while collecting them."""

    ns: list[int] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def extend(self, other: Samples) -> None:
        self.ns.extend(other.ns)
        self.errors += other.errors
        for k, v in other.error_kinds.items():
            self.error_kinds[k] = self.error_kinds.get(k, 0) + v


def _redeem(conn: http.client.HTTPSConnection, chain: Chain) -> tuple[int, int, bytes]:
    """One token call on an open connection: (status, elapsed ns, body). Body built before the clock."""
    body = chain.body()
    t0 = time.perf_counter_ns()
    conn.request("POST", TOKEN_PATH, body, HEADERS)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, time.perf_counter_ns() - t0, data


def _rotate(chain: Chain, status: int, data: bytes, out: Samples) -> None:
    if status != 200:
        out.error(f"HTTP {status}: {data[:120].decode('latin-1', 'replace')}")
        chain.token = chain.source.take()  # the chain may be broken: start a fresh one
        return
    try:
        chain.token = json.loads(data)["refresh_token"]
    except (ValueError, KeyError):
        out.error("200 without a refresh_token")
        chain.token = chain.source.take()


class KeepAliveRunner:
    """Token calls on one kept-alive connection; reconnects (and counts an error) if it drops."""

    def __init__(self, client: TokenClient, chain: Chain) -> None:
        self.client = client
        self.chain = chain
        self.conn: http.client.HTTPSConnection | None = None

    def run(self, n: int, out: Samples | None = None) -> Samples:
        out = out if out is not None else Samples()
        for _ in range(n):
            try:
                if self.conn is None:
                    self.conn = self.client.connect()
                status, ns, data = _redeem(self.conn, self.chain)
            except (OSError, http.client.HTTPException) as exc:
                out.error(type(exc).__name__)
                self.close()
                continue
            out.ns.append(ns)
            _rotate(self.chain, status, data, out)
        return out

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class RequestsRunner:
    """Token calls with Python ``requests`` on one ``Session`` (keep-alive), through the route's first
    proxy, as an app with ``HTTPS_PROXY`` set would make them."""

    def __init__(self, route: Route, chain: Chain) -> None:
        import requests  # a test dependency; only this phase needs it

        self.chain = chain
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = route.ca_file
        host, port = route.proxies[0]
        userinfo = ""
        if route.proxy_auth:
            userinfo = base64.b64decode(route.proxy_auth.split(" ", 1)[1]).decode() + "@"
        self.session.proxies = {"https": f"http://{userinfo}{host}:{port}"}
        self._errors = (requests.RequestException, OSError)

    def run(self, n: int, out: Samples | None = None) -> Samples:
        out = out if out is not None else Samples()
        url = f"https://{SF_HOST}{TOKEN_PATH}"
        for _ in range(n):
            body = self.chain.body()
            try:
                t0 = time.perf_counter_ns()
                resp = self.session.post(url, data=body, headers=HEADERS, timeout=TIMEOUT)
                ns = time.perf_counter_ns() - t0
            except self._errors as exc:
                out.error(type(exc).__name__)
                continue
            out.ns.append(ns)
            _rotate(self.chain, resp.status_code, resp.content, out)
        return out

    def close(self) -> None:
        self.session.close()


def new_connection_calls(client: TokenClient, chain: Chain, n: int, out: Samples | None = None) -> Samples:
    """Token calls each on a new connection: TCP, CONNECT, TLS, request, response, close."""
    out = out if out is not None else Samples()
    for _ in range(n):
        body = chain.body()
        t0 = time.perf_counter_ns()
        conn = None
        try:
            conn = client.connect()
            conn.request("POST", TOKEN_PATH, body, HEADERS)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            conn.close()
            ns = time.perf_counter_ns() - t0
        except (OSError, http.client.HTTPException) as exc:
            out.error(type(exc).__name__)
            if conn is not None:
                conn.close()
            continue
        out.ns.append(ns)
        _rotate(chain, status, data, out)
    return out


def concurrent_calls(client: TokenClient, source: TokenSource, clients: int, per_client: int,
                     deadline_s: float) -> tuple[Samples, float]:
    """``clients`` threads, each with its own keep-alive connection and chain, ``per_client`` calls each.

    Returns the samples and the wall time from the common start to the last answer.
    """
    chains = [Chain(source) for _ in range(clients)]
    results = [Samples() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        runner = KeepAliveRunner(client, chains[i])
        try:
            barrier.wait(30)
            runner.run(per_client, results[i])
        except threading.BrokenBarrierError:
            results[i].error("start barrier broken")
        finally:
            runner.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait(30)
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(0.0, deadline_s - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    total = Samples()
    for i, r in enumerate(results):
        total.extend(r)
        if threads[i].is_alive():
            total.error("client still running at the deadline")
    return total, wall


# ---- passthrough -------------------------------------------------------------------------------

def _head(sock: socket.socket | ssl.SSLSocket, conn: h11.Connection) -> h11.Response:
    """Read until h11 has the response head (at most 64 KiB); what follows stays in ``conn``."""
    for _ in range(64):  # bounded: 64 reads of at least one byte... or the head is too large
        event = conn.next_event()
        if isinstance(event, h11.Response):
            return event
        if event is not h11.NEED_DATA:
            raise OSError(f"expected a response head, got {event!r}")
        data = sock.recv(65536)
        if not data:
            raise OSError("connection closed before the end of the response head")
        conn.receive_data(data)
    raise OSError("response head too large")


def open_tunnel(route: Route, target: Address, server_hostname: str = "localhost",
                ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """A TLS connection to ``target``, through the route's first proxy (CONNECT) or direct."""
    ctx = ctx or route.context()
    addr = route.proxies[0] if route.proxies else target
    sock = socket.create_connection(addr, TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if route.proxies:
            # By name, as an app's HTTPS_PROXY client does (the URL's host goes into the CONNECT).
            authority = f"{server_hostname}:{target[1]}".encode()
            headers = [(b"Host", authority)]
            if route.proxy_auth:
                headers.append((b"Proxy-Authorization", route.proxy_auth.encode()))
            conn = h11.Connection(h11.CLIENT)
            sock.sendall(conn.send(h11.Request(method=b"CONNECT", target=authority, headers=headers))
                         + conn.send(h11.EndOfMessage()))
            head = _head(sock, conn)
            if head.status_code != 200:
                raise OSError(f"CONNECT refused: {head.status_code}")
            if conn.trailing_data[0]:  # a proxy answers CONNECT and nothing else before the client speaks
                raise OSError("unexpected bytes after a CONNECT answer")
        return ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


def _get(path: bytes) -> tuple[h11.Connection, bytes]:
    conn = h11.Connection(h11.CLIENT)
    return conn, conn.send(h11.Request(method=b"GET", target=path, headers=[(b"Host", b"localhost")])) + \
        conn.send(h11.EndOfMessage())


def bulk_fetch(route: Route, target: Address, nbytes: int) -> float:
    """Seconds from sending ``GET /bulk`` to the last of ``nbytes`` body bytes (TLS already set up). h11
    reads the head; the body is counted into a fixed buffer, so the client costs the same for everyone."""
    tls = open_tunnel(route, target)
    try:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        conn, request = _get(b"/bulk?bytes=%d" % nbytes)
        t0 = time.perf_counter()
        tls.sendall(request)
        head = _head(tls, conn)
        if head.status_code != 200:
            raise OSError(f"bulk server answered {head.status_code}")
        got = len(conn.trailing_data[0])
        while got < nbytes:
            n = tls.recv_into(view)
            if not n:
                raise OSError(f"closed after {got} of {nbytes} bytes")
            got += n
        return time.perf_counter() - t0
    finally:
        tls.close()


def small_request(tls: ssl.SSLSocket) -> None:
    """``GET /small`` on an open tunnel, leaving the connection open (for the RSS measurement)."""
    conn, request = _get(b"/small")
    tls.sendall(request)
    _head(tls, conn)
    for _ in range(8):  # bounded: a two-byte body
        event = conn.next_event()
        if isinstance(event, h11.EndOfMessage):
            return
        if event is h11.NEED_DATA:
            data = tls.recv(4096)
            if not data:
                raise OSError("closed during /small")
            conn.receive_data(data)
    raise OSError("no end of /small")


def percentile(sorted_ns: list[int], q: float) -> float:
    """Linear-interpolated percentile of sorted nanoseconds, in milliseconds."""
    if not sorted_ns:
        return float("nan")
    pos = q * (len(sorted_ns) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ns) - 1)
    return (sorted_ns[lo] + (sorted_ns[hi] - sorted_ns[lo]) * (pos - lo)) / 1e6
