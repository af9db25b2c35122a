"""What the sidecar takes from mitmproxy: its certificate store (sidecar/proxy/leafcerts.py) and its TLS
ClientHello parser (sidecar/proxy/relay.py reads an IP-literal tunnel's SNI with it), and nothing of its
proxy server, master, options or flows. pyproject pins mitmproxy to the tested major version; these tests
fail on an upgrade that breaks what the sidecar uses."""

from __future__ import annotations

import ast
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.harness import ROOT, SidecarProcess, World, metric_value, read_until_closed

MITMPROXY_USED = {"mitmproxy.certs", "mitmproxy.proxy.layers.tls"}


def test_the_sidecar_uses_mitmproxy_for_certificates_and_the_client_hello_only() -> None:
    """No module of the sidecar imports mitmproxy's proxy server, master, options, addons or flow API: the
    data path is the sidecar's own; mitmproxy issues the certificates and parses the ClientHello."""
    imported: dict[str, set[str]] = {}
    for path in [*ROOT.glob("sidecar/**/*.py"), *ROOT.glob("addons/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name == "mitmproxy" or name.startswith("mitmproxy."):
                    imported.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert set(imported) == MITMPROXY_USED, imported
    code = ("import sys; import sidecar.app.service; "
            "print(sorted(m for m in ('flask', 'ldap3', 'mitmproxy.addons', 'mitmproxy.master', 'mitmproxy.tools', "
            "'mitmproxy.proxy.server', 'mitmproxy.addonmanager') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


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
