"""A fake QuotaGuard Static proxy pair: HTTP forward proxies with Basic auth and a fixed egress IP, and
optionally one load-balanced address in front of them.

Why: QuotaGuard gives each account two proxies whose traffic leaves from two static IPs. A member
here binds every upstream connection to its own egress address (127.0.0.2, 127.0.0.3, ... on Linux
loopback), so the fake Salesforce sees a different TCP source per member, just as the real
allowlist does. Targets are resolved through a `routes` table (there is no DNS here), and only
loopback targets are ever connected to: a workplace safety rule, enforced with 403.

Nothing public says whether QuotaGuard's proxy hostname gives one address per static IP or one
load-balanced address ("Traffic may be routed through either one at any time"; REFERENCE.md), so both
layouts exist here: the members' own addresses, and :class:`FakeQuotaGuardBalancer`, one address that
sends each connection to either member and keeps it there, as a TCP-level balancer does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Self
from urllib.parse import quote, urlsplit

import h11

from ._server import (
    BadRequest,
    HttpRequest,
    HttpServerConnection,
    ThreadedServer,
    close_writer,
    send,
)

Address = tuple[str, int]
_HOP_HEADERS = frozenset({
    "proxy-authorization", "proxy-connection", "connection", "keep-alive", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length",
})
CHUNK = 64 * 1024
_TEXT = {"Content-Type": "text/plain"}


def _check_loopback(ip: str) -> None:
    if not ipaddress.ip_address(ip).is_loopback:
        raise ValueError(f"{ip} is not a loopback address")


def _split_authority(authority: str, default_port: int) -> Address:
    try:
        parts = urlsplit("//" + authority)
        host, port = parts.hostname, parts.port or default_port
    except ValueError:
        raise BadRequest(400, f"bad authority {authority!r}") from None
    if not host or not 0 < port < 65536:
        raise BadRequest(400, f"bad authority {authority!r}")
    return host.lower(), port


class FakeQuotaGuardMember(ThreadedServer):
    """One QuotaGuard Static proxy node (CONNECT + absolute-form HTTP, Basic proxy auth)."""

    def __init__(
        self,
        host: str,
        *,
        port: int = 0,
        egress_ip: str | None = None,
        username: str = "qgUser",
        password: str = "qgPass",
        routes: Mapping[Address, Address] | None = None,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
    ) -> None:
        super().__init__(host, port)
        self.egress_ip = egress_ip or host
        self.username, self.password = username, password
        self.connect_timeout, self.idle_timeout = connect_timeout, idle_timeout
        self.refuse_connect_status: int | None = None  # answer every CONNECT with this status
        # answer a CONNECT that follows another request on the same connection with this status (a proxy that
        # does not allow it; the sidecar must then fall back to connections it cannot verify)
        self.refuse_connect_after_request: int | None = None
        self.connect_delay: float = 0.0  # seconds to stall before answering a CONNECT (slow member)
        self._routes: dict[Address, Address] = {}
        for requested, actual in (routes or {}).items():
            self.set_route(requested, actual)
        self._connects = self._forwards = self._auth_failures = self._bytes = 0
        self._seen_targets: list[Address] = []

    # ---- runtime knobs & counters (thread-safe) ----------------------------------------------
    @property
    def egress_ip(self) -> str:
        return self._egress_ip

    @egress_ip.setter
    def egress_ip(self, ip: str) -> None:
        _check_loopback(ip)
        self._egress_ip = ip  # new upstream connections use it

    def set_route(self, requested: Address, actual: Address | None) -> None:
        """Map a requested (host, port) to a loopback (ip, port); None removes the route."""
        key = (requested[0].lower(), requested[1])
        if actual is not None:
            _check_loopback(actual[0])
        with self._lock:
            if actual is None:
                self._routes.pop(key, None)
            else:
                self._routes[key] = (actual[0], actual[1])

    @property
    def routes(self) -> dict[Address, Address]:
        with self._lock:
            return dict(self._routes)

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{quote(self.username, safe='')}:{quote(self.password, safe='')}@{host}:{port}"

    @property
    def connects(self) -> int:
        with self._lock:
            return self._connects

    @property
    def forwards(self) -> int:
        with self._lock:
            return self._forwards

    @property
    def auth_failures(self) -> int:
        with self._lock:
            return self._auth_failures

    @property
    def bytes_relayed(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def seen_targets(self) -> list[Address]:
        with self._lock:
            return list(self._seen_targets)

    def reset_counters(self) -> None:
        with self._lock:
            self._connects = self._forwards = self._auth_failures = self._bytes = 0
            self._seen_targets.clear()

    # ---- proxy -------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = HttpServerConnection(reader, writer, self.read_timeout)
        served = 0  # requests forwarded on this connection so far
        while (req := await conn.read_request()) is not None:
            if not self._authorized(req):
                with self._lock:
                    self._auth_failures += 1
                headers = {"Proxy-Authenticate": 'Basic realm="QuotaGuard"', "Content-Type": "text/plain"}
                await conn.respond(407, b"Proxy Authentication Required\n", headers)
                if conn.keep_alive:
                    continue
                return
            if req.method == "CONNECT":
                target = _split_authority(req.target, 443)
            elif req.target.lower().startswith("http://"):
                target = _split_authority(urlsplit(req.target).netloc.rpartition("@")[2], 80)
            else:
                raise BadRequest(400, "expected CONNECT or an absolute-form http:// request")
            with self._lock:
                self._seen_targets.append(target)
            if req.method == "CONNECT" and self.refuse_connect_status is not None:
                await conn.respond(self.refuse_connect_status, b"", keep_alive=False)
                return
            if req.method == "CONNECT" and served and self.refuse_connect_after_request is not None:
                await conn.respond(self.refuse_connect_after_request, b"", keep_alive=False)
                return
            if req.method == "CONNECT" and self.connect_delay > 0:
                await asyncio.sleep(min(self.connect_delay, 60.0))
            resolved = self._resolve(*target)
            if resolved is None:
                await conn.respond(403, b"target not allowed (loopback only)\n", _TEXT, keep_alive=False)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(self._open(*resolved), self.connect_timeout)
            except (OSError, TimeoutError) as e:
                await conn.respond(502, f"cannot connect to {target[0]}:{target[1]}: {e!r}\n".encode(), _TEXT,
                                   keep_alive=False)
                return
            self.track(up_writer)
            try:
                if req.method == "CONNECT":
                    with self._lock:
                        self._connects += 1
                    await conn.respond(200)
                    if conn.leftover:  # the client did not wait for the answer
                        up_writer.write(conn.leftover)
                    await self._relay(reader, writer, up_reader, up_writer)
                    return  # the connection was the tunnel
                with self._lock:
                    self._forwards += 1
                await send(up_writer, self._origin_form(req))
                status, headers, body = await self._read_answer(up_reader)
            finally:
                await close_writer(up_writer)
                self.untrack(up_writer)
            # A forwarded request is answered on the client's keep-alive connection, as a real forward proxy
            # does: another request, or a CONNECT, may follow on it.
            await conn.respond(status, body, headers)
            served += 1
            if not conn.keep_alive:
                return

    async def _read_answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        """The origin's whole answer (it was asked to close after it), read with h11."""
        origin = h11.Connection(h11.CLIENT)
        origin.send(h11.Request(method="GET", target="/", headers=[("Host", "origin")]))
        origin.send(h11.EndOfMessage())
        status, headers, body = 502, dict(_TEXT), bytearray()
        for _ in range(100_000):  # bounded: every read brings at least one byte
            event = origin.next_event()
            if event is h11.NEED_DATA:
                origin.receive_data(await asyncio.wait_for(reader.read(CHUNK), self.idle_timeout))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers.raw_items()
                           if k.decode("latin-1").lower() not in _HOP_HEADERS}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return status, headers, bytes(body)

    def _authorized(self, req: HttpRequest) -> bool:
        scheme, _, cred = (req.header("proxy-authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(sep) and hmac.compare_digest(user.encode(), self.username.encode()) and \
            hmac.compare_digest(password.encode(), self.password.encode())

    def _resolve(self, host: str, port: int) -> Address | None:
        with self._lock:
            routed = self._routes.get((host, port))
        ip, real_port = routed or ("127.0.0.1" if host == "localhost" else host, port)
        try:
            return (ip, real_port) if ipaddress.ip_address(ip).is_loopback else None
        except ValueError:  # an unrouted hostname: no DNS, and never leave loopback
            return None

    async def _open(self, ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        egress = self.egress_ip
        if ipaddress.ip_address(egress).version != ipaddress.ip_address(ip).version:
            raise OSError(f"egress {egress} cannot reach {ip} (address family)")
        return await asyncio.open_connection(ip, port, local_addr=(egress, 0))

    @staticmethod
    def _origin_form(req: HttpRequest) -> bytes:
        """The absolute-form request as the origin gets it: origin-form, hop-by-hop headers dropped."""
        url = urlsplit(req.target)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [(k, v) for k, v in req.headers if k.lower() not in _HOP_HEADERS]
        if not any(k.lower() == "host" for k, _ in headers):
            headers.insert(0, ("Host", url.netloc.rpartition("@")[2]))
        headers += [("Content-Length", str(len(req.body))), ("Connection", "close")]
        conn = h11.Connection(h11.CLIENT)
        return b"".join(conn.send(e) or b"" for e in (
            h11.Request(method=req.method, target=path, headers=headers), h11.Data(data=req.body), h11.EndOfMessage()))

    def _count(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        await _pipe(src, dst, self.idle_timeout, self._count)

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                     u_reader: asyncio.StreamReader, u_writer: asyncio.StreamWriter) -> None:
        await _relay(c_reader, c_writer, u_reader, u_writer, self.idle_timeout, self._count)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, idle_timeout: float,
                count: Callable[[int], None]) -> None:
    while data := await asyncio.wait_for(src.read(CHUNK), idle_timeout):
        dst.write(data)
        await asyncio.wait_for(dst.drain(), idle_timeout)
        count(len(data))


async def _relay(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter, u_reader: asyncio.StreamReader,
                 u_writer: asyncio.StreamWriter, idle_timeout: float, count: Callable[[int], None]) -> None:
    """Copy both ways in chunks until either side closes, errors or idles out."""
    tasks = [asyncio.create_task(_pipe(c_reader, u_writer, idle_timeout, count)),
             asyncio.create_task(_pipe(u_reader, c_writer, idle_timeout, count))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


class FakeQuotaGuardBalancer(ThreadedServer):
    """One address in front of the members, as a TCP-level load balancer: each new connection goes to the
    next member in turn (round robin) and stays on it for its whole life; its bytes are copied both ways,
    never read, so the members' own proxy auth and CONNECT apply unchanged. Over several connections a
    client sees both egress IPs; on one connection (a keep-alive proxy connection, a CONNECT tunnel) only
    one. A member that cannot be reached gets its connections closed (no health checks here)."""

    def __init__(self, members: Sequence[FakeQuotaGuardMember], host: str = "127.0.0.1", *, port: int = 0,
                 idle_timeout: float = 60.0) -> None:
        super().__init__(host, port)
        if not members:
            raise ValueError("a balancer needs at least one member")
        self.members = tuple(members)
        self.idle_timeout = idle_timeout
        self._turn = 0
        self._chosen: list[Address] = []

    @property
    def url(self) -> str:
        """The proxy URL through the balancer, with the members' credentials (QUOTAGUARDSTATIC_URL)."""
        first = self.members[0]
        host, port = self.address
        return f"http://{quote(first.username, safe='')}:{quote(first.password, safe='')}@{host}:{port}"

    @property
    def chosen(self) -> list[Address]:
        """The member address each connection was sent to, in order."""
        with self._lock:
            return list(self._chosen)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            member = self.members[self._turn % len(self.members)]
            self._turn += 1
            self._chosen.append(member.address)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*member.address), 5.0)
        except (OSError, TimeoutError):
            return
        self.track(up_writer)
        try:
            await _relay(reader, writer, up_reader, up_writer, self.idle_timeout, lambda n: None)
        finally:
            await close_writer(up_writer)
            self.untrack(up_writer)


class FakeQuotaGuardPair:
    """The two proxies of one QuotaGuard Static account; kwargs go to every member. With ``balanced``, also
    one load-balanced address in front of them (``balancer``, ``balanced_url``)."""

    def __init__(self, hosts: tuple[str, ...] = ("127.0.0.2", "127.0.0.3"), *, balanced: bool = False,
                 **kwargs: Any) -> None:
        self.members = tuple(FakeQuotaGuardMember(h, **kwargs) for h in hosts)
        self.balancer = FakeQuotaGuardBalancer(self.members) if balanced else None

    @property
    def balanced_url(self) -> str:
        if self.balancer is None:
            raise RuntimeError("this pair has no balanced address: FakeQuotaGuardPair(balanced=True)")
        return self.balancer.url

    def url_for(self, i: int) -> str:
        return self.members[i].url

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def set_route(self, requested: Address, actual: Address | None) -> None:
        for member in self.members:
            member.set_route(requested, actual)

    @property
    def _servers(self) -> tuple[ThreadedServer, ...]:
        return (*self.members, *((self.balancer,) if self.balancer is not None else ()))

    def start(self) -> Self:
        started: list[ThreadedServer] = []
        try:
            for server in self._servers:
                started.append(server.start())
        except BaseException:
            for server in started:
                server.stop()
            raise
        return self

    def stop(self) -> None:
        errors = []
        for server in reversed(self._servers):  # the balancer first: nothing new reaches a stopped member
            try:
                server.stop()
            except RuntimeError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[FakeQuotaGuardMember]:
        return iter(self.members)

    def __getitem__(self, i: int) -> FakeQuotaGuardMember:
        return self.members[i]

    def __len__(self) -> int:
        return len(self.members)
