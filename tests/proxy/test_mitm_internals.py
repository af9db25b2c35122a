"""What the sidecar relies on inside mitmproxy (sidecar/proxy/mitm.py; the ClientHello parser sidecar/proxy/relay.py
reads an IP-literal tunnel's SNI with). pyproject pins mitmproxy to the tested major version; these tests
fail on an upgrade that breaks one of them."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.harness import ROOT, SidecarProcess, World, metric_value, read_until_closed


def test_the_sidecar_imports_only_the_mitmproxy_addons_it_uses() -> None:
    code = ("import sys; import sidecar.app.service; "
            "print(sorted(m for m in ('flask', 'ldap3', 'mitmproxy.addons.onboarding', 'mitmproxy.tools') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_new_master_leaves_no_mitmproxy_handler_on_the_root_logger() -> None:
    from mitmproxy import log, options

    from sidecar.proxy.mitm import new_master

    async def build() -> list[logging.Handler]:
        master = new_master(options.Options())
        assert hasattr(master, "_legacy_log_events"), "mitmproxy renamed its log bridge: update sidecar/proxy/mitm.py"
        return list(logging.getLogger().handlers)

    handlers = asyncio.run(build())
    assert not [h for h in handlers if isinstance(h, log.LegacyLogEvents)]


def test_route_all_sends_an_ip_literal_passthrough_through_a_member(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    """An IP-literal tunnel that is not a token host's (here not even TLS) is relayed by the front door,
    through a member with SIDECAR_ROUTE=all."""
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ROUTE": "all"})
    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10) as c:
        target = f"127.0.0.1:{world.echo.address[1]}"
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        c.sendall(b"GET / HTTP/1.1\r\nHost: ip.quotaguard.com\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(c)
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["ip"] in ("127.0.0.2", "127.0.0.3")
    assert metric_value(sc.metrics(), "egress_sidecar_tunnels_total", route="pair") == 1


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl), as it would cross a tunnel."""
    out = ssl.MemoryBIO()
    ctx = ssl.create_default_context()
    ctx.check_hostname = server_name is not None
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_mitmproxys_client_hello_parser_reads_the_sni() -> None:
    from mitmproxy.proxy.layers.tls import parse_client_hello

    hello = client_hello("login.salesforce.com")
    parsed = parse_client_hello(hello)
    assert parsed is not None and parsed.sni == "login.salesforce.com"
    assert parse_client_hello(hello[:-10]) is None  # not complete yet: read on
    without = parse_client_hello(client_hello(None))
    assert without is not None and without.sni is None
    try:
        parse_client_hello(b"GET / HTTP/1.1\r\n\r\n")
        raise AssertionError("not TLS must raise ValueError")
    except ValueError:
        pass


def test_the_ca_made_ahead_of_mitmproxy_is_the_one_mitmproxy_loads(tmp_path: Path) -> None:
    """sidecar/ops/trust.py ensure_ca makes mitmproxy's CA files with CertStore.create_store before mitmproxy
    starts (so a full disk cannot leave a CA cut short); mitmproxy then loads it instead of making its own."""
    from mitmproxy import certs
    from mitmproxy.options import CONF_BASENAME, Options

    from sidecar.ops.trust import MITM_CA, ensure_ca

    confdir = tmp_path
    ensure_ca(confdir)
    made = (confdir / MITM_CA).read_bytes()
    store = certs.CertStore.from_store(confdir, CONF_BASENAME, Options().key_size)
    assert (confdir / MITM_CA).read_bytes() == made and store.default_ca is not None
    assert [p.name for p in confdir.iterdir() if p.name.startswith(".")] == []  # nothing left aside
