"""The sender against an origin that misbehaves: interim answers, bad lengths, close-delimited bodies,
and the sidecar end to end: a token call is sent at most once, whatever the origin does."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from mitmproxy import http

from sidecar.sim.certs import TestCA
from sidecar.upstream import SendFailure, TokenSender, UpstreamPool, assemble_request, read_response
from tests.harness import SidecarProcess, redeem
from tests.scripted_origin import ScriptedOrigin, ok, token_body


def json_response(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"\r\n" + body


def early_hints(n: int, head: bytes) -> list[bytes | float]:
    return [b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n", *ok(n, head)]


def close_delimited(n: int, head: bytes) -> list[bytes | float]:
    body = token_body(n)
    return [json_response(body[:20], b"Connection: close\r\n"), 0.2, body[20:], b"<close>"]


def bad_length(n: int, head: bytes) -> list[bytes | float]:
    return [json_response(token_body(n), b"Content-Length: 1, 1\r\n")]


def make_request(port: int, path: bytes = b"/services/oauth2/token") -> http.Request:
    return http.Request.make("POST", f"https://localhost:{port}/services/oauth2/token",
                             b"grant_type=refresh_token&refresh_token=OLD",
                             {"Content-Type": "application/x-www-form-urlencoded", "Connection": "keep-alive, X-Drop",
                              "X-Drop": "1", "Proxy-Authorization": "Basic c2VjcmV0", "Keep-Alive": "timeout=5"})


async def send_twice(origin: ScriptedOrigin, ca: Path) -> list[tuple[int | None, bytes, str | None]]:
    ctx = ssl.create_default_context(cafile=str(ca))
    pool = UpstreamPool(None, ctx, connect_timeout=3)
    sender = TokenSender(pool, 5, lambda m, f: None, lambda m: None)
    out = []
    for _ in range(2):
        result = await sender.send(make_request(origin.address[1]), None, lambda tried: None)
        resp = result.response
        out.append((resp.status_code if resp else None, resp.raw_content if resp else b"", result.detail))
    pool.close_all()
    return out


@pytest.fixture
def origin_cert(test_ca: TestCA) -> tuple[Path, Path]:
    return test_ca.issue(["localhost"], "scripted")


def test_interim_answers_are_skipped_and_do_not_desync_the_pool(origin_cert: tuple[Path, Path], test_ca: TestCA) -> None:
    with ScriptedOrigin(origin_cert, early_hints) as origin:
        results = asyncio.run(send_twice(origin, test_ca.ca_path))
    assert [(status, body) for status, body, _ in results] == [(200, token_body(1)), (200, token_body(2))]


def test_close_delimited_body_is_read_to_the_end(origin_cert: tuple[Path, Path], test_ca: TestCA) -> None:
    with ScriptedOrigin(origin_cert, close_delimited) as origin:
        results = asyncio.run(send_twice(origin, test_ca.ca_path))
    assert [body for _, body, _ in results] == [token_body(1), token_body(2)]


def test_ambiguous_length_is_a_failure_after_send(origin_cert: tuple[Path, Path], test_ca: TestCA) -> None:
    with ScriptedOrigin(origin_cert, bad_length) as origin:
        results = asyncio.run(send_twice(origin, test_ca.ca_path))
    assert all(status is None and "invalid Content-Length" in (detail or "") for status, _, detail in results)


def test_request_assembly_drops_hop_by_hop_and_keeps_raw_target() -> None:
    req = make_request(443)
    req.data.path = b"/services/oauth2/token?x=\xe2\x82\xac"
    raw = assemble_request(req)
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert raw.startswith(b"POST /services/oauth2/token?x=\xe2\x82\xac HTTP/1.1\r\n")
    for dropped in (b"proxy-authorization", b"x-drop", b"keep-alive", b"connection:"):
        assert dropped not in head
    assert b"content-length: 42" in head and raw.endswith(b"refresh_token=OLD")


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n12345",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_malformed_responses_raise_send_failure(head: bytes) -> None:
    async def parse() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(head)
        reader.feed_eof()
        await read_response(reader)

    with pytest.raises(SendFailure):
        asyncio.run(parse())


def test_sidecar_never_sends_a_token_call_twice(
    make_sidecar_proc: Callable[..., SidecarProcess], origin_cert: tuple[Path, Path], test_ca: TestCA
) -> None:
    """Whatever breaks while handling a token call, mitmproxy must not forward it on its own (direct,
    a second time, past the guard)."""
    with ScriptedOrigin(origin_cert, bad_length) as origin:
        sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})
        url = f"https://localhost:{origin.address[1]}/services/oauth2/token"
        with sc.session() as s:
            resp = redeem(s, "5Aep861OLD", url=url)
            odd = s.post(url + "?x=%E2%82%AC\u20ac", data={"grant_type": "refresh_token", "refresh_token": "OLD2"},
                         timeout=10)
        assert resp.status_code == 502 and resp.json()["sent_to_salesforce"] == "unknown"
        assert odd.status_code == 502
        assert len(origin.requests) == 2, origin.requests
    assert "Traceback" not in sc.log_text() and "Addon error" not in sc.log_text()
