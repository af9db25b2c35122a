"""Plain proxy requests (``GET http://host/...``, no CONNECT), served by the sidecar's own forwarder: bodies
streamed both ways on keep-alive connections, along the route ``SIDECAR_ROUTE`` gives them, to the very
addresses the destination rules approved. Real sidecar, real clients, loopback only."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import ipaddress
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from sidecar.app.demo import BackgroundSidecar
from sidecar.app.service import Sidecar
from sidecar.config import load_settings
from sidecar.sim._server import HttpServerConnection, ThreadedServer
from sidecar.sim.echo import FakeIPEcho
from tests.harness import SidecarProcess, World, read_until_closed

MB = 1024 * 1024


class HashingOrigin(ThreadedServer):
    """A plain HTTP origin that says what it received: method, path, body length and SHA-256, and from where."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername")[0])
        conn = HttpServerConnection(reader, writer, self.read_timeout)
        while (req := await conn.read_request()) is not None:
            body = json.dumps({"method": req.method, "target": req.target, "length": len(req.body),
                               "sha256": hashlib.sha256(req.body).hexdigest(), "from": peer,
                               "chunked": (req.header("transfer-encoding") or "").lower() == "chunked"}).encode()
            await conn.respond(200, body, {"Content-Type": "application/json"})
            if not conn.keep_alive:
                return


@pytest.fixture
def origin() -> Iterator[HashingOrigin]:
    with HashingOrigin() as server:
        yield server


def session_via(sc: SidecarProcess) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # this proxy, whatever the test machine's NO_PROXY says
    s.proxies = {"http": sc.proxy_url, "https": sc.proxy_url}
    return s


def test_a_plain_get_and_a_1mb_chunked_post_go_through_the_sidecar(
    world: World, origin: HashingOrigin, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """With SIDECAR_ROUTE=all the origin sees the pair member's address: the requests went through the
    sidecar and its route, on one keep-alive client connection; the chunked upload arrives whole."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ROUTE": "all"})
    url = f"http://127.0.0.1:{origin.address[1]}"
    payload = bytes(range(256)) * (MB // 256)

    def chunks() -> Iterator[bytes]:  # a generator body: requests sends it chunked
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i:i + 64 * 1024]

    with session_via(sc) as s:
        got = s.get(f"{url}/first?x=1", timeout=20).json()
        assert (got["method"], got["target"], got["length"]) == ("GET", "/first?x=1", 0)
        assert got["from"] in ("127.0.0.2", "127.0.0.3")
        sent = s.post(f"{url}/upload", data=chunks(), timeout=30).json()
    assert (sent["method"], sent["length"], sent["chunked"]) == ("POST", MB, True)
    assert sent["sha256"] == hashlib.sha256(payload).hexdigest()
    assert sent["from"] in ("127.0.0.2", "127.0.0.3")
    assert sc.proc is not None and sc.proc.poll() is None


def test_plain_requests_go_direct_by_default(
    world: World, origin: HashingOrigin, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc(world.pair_env())
    with session_via(sc) as s:
        got = s.get(f"http://127.0.0.1:{origin.address[1]}/d", timeout=20).json()
    assert got["from"] == "127.0.0.1"  # not QuotaGuard's metered bandwidth


def test_a_request_without_an_absolute_url_is_refused(make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({})
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        c.sendall(b"GET /status HTTP/1.1\r\nHost: example.test\r\n\r\n")
        answer = read_until_closed(c)
    assert answer.startswith(b"HTTP/1.1 400") and b"absolute URL" in answer


# -- DNS rebinding --------------------------------------------------------------------------------------
REBIND = "rebind.test"
UNREACHABLE = "93.184.215.14"  # a public address (the rules approve it); the test refuses every connect to it


def test_a_name_that_answers_differently_the_second_time_cannot_reach_a_loopback_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared mode (SIDECAR_PROXY_AUTH): a resolver that answers a public address first and 127.0.0.1 after
    that. The destination rules approve the first answer, and the sidecar connects to exactly that
    address: it resolves once, so the loopback service behind the second answer is never reached (with
    mitmproxy resolving again to connect, it was)."""
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def rebinding(host: object, port: object, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        if host == REBIND:
            lookups.append(host)
            ip = UNREACHABLE if len(lookups) == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]

    connects: list[str] = []
    real_connect = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def no_packet_off_loopback(self: object, sock: socket.socket, address: tuple) -> None:  # type: ignore[type-arg]
        connects.append(str(address[0]))
        if not ipaddress.ip_address(address[0]).is_loopback:  # as an unreachable network would answer
            raise OSError(errno.ENETUNREACH, "network is unreachable")
        await real_connect(self, sock, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", no_packet_off_loopback)
    settings = load_settings({"SIDECAR_LISTEN": "127.0.0.1:0", "SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
                              "SIDECAR_CONFDIR": str(tmp_path / "confdir"), "SIDECAR_PROXY_AUTH": "app:rebind-pw"})
    auth = "Basic " + base64.b64encode(b"app:rebind-pw").decode()
    with FakeIPEcho("127.0.0.1") as secret, BackgroundSidecar(Sidecar(settings)) as bg:
        assert bg.sidecar.proxy_address is not None
        target = f"{REBIND}:{secret.address[1]}"
        with socket.create_connection(bg.sidecar.proxy_address, timeout=10) as c:
            c.sendall(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {auth}\r\n\r\n".encode())
            answer = read_until_closed(c)
        assert answer.startswith(b"HTTP/1.1 502") and b"cannot connect" in answer, answer[:300]
        assert secret.hits == []
    assert lookups == [REBIND]  # one resolution, the one the rules judged
    assert connects == [UNREACHABLE]  # and the connection went to what it said, nowhere else
