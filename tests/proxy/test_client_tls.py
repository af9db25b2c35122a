"""An app that does not trust the sidecar's CA fails before any token call exists: the failed client
TLS handshakes are counted by reason, shown on /status and the status page, and alerted on. Real
clients (Python, curl, Node) that trust only their default roots; loopback only."""

from __future__ import annotations

import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Callable

from tests.harness import (
    SF_HOST,
    SidecarProcess,
    World,
    metric_value,
    require_tool,
    wait_until,
)

FAILURES = "egress_sidecar_client_tls_failures_total"


def tunnel(sc: SidecarProcess, target: str = f"{SF_HOST}:443") -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=10)
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    return raw


def test_failed_client_handshakes_are_counted_by_reason_and_shown(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ALLOWLIST": "127.0.0.2,127.0.0.3"})
    text = sc.metrics()
    for reason in ("unknown_ca", "client_closed", "protocol_error", "other"):  # there from the start, at 0
        assert f'{FAILURES}{{reason="{reason}"}} 0.0' in text
    assert sc.status()["verdict"]["level"] == "ok"

    # Python with its default roots: it rejects the sidecar's certificate (alert unknown_ca).
    with tunnel(sc) as raw:
        try:
            ssl.create_default_context().wrap_socket(raw, server_hostname=SF_HOST)
            raise AssertionError("a client without the sidecar's CA must not complete the handshake")
        except ssl.SSLCertVerificationError:
            pass
    # curl without the CA bundle (the app environment not applied).
    curl = require_tool(("curl",), "CURL", "apt-get install curl")
    env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": sc.proxy_url}
    out = subprocess.run([curl, "-sS", "-o", "/dev/null", "-X", "POST", f"https://{SF_HOST}/services/oauth2/token"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    # Node with its own roots and no NODE_EXTRA_CA_CERTS: it checks the certificate after its side of the
    # handshake and hangs up without an alert, so the sidecar sees the client leave mid-handshake.
    node = require_tool(("node", "nodejs"), "NODE", "apt-get install nodejs")
    script = ("const tls=require('tls'),net=require('net');const s=net.connect(%d,'127.0.0.1',()=>{"
              "s.write('CONNECT %s:443 HTTP/1.1\\r\\nHost: %s:443\\r\\n\\r\\n');s.once('data',()=>{"
              "const t=tls.connect({socket:s,servername:'%s'});t.on('error',e=>{console.log(e.code);process.exit(0)});"
              "t.on('secureConnect',()=>process.exit(3));});});") % (sc.proxy_port, SF_HOST, SF_HOST, SF_HOST)
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "SELF_SIGNED_CERT_IN_CHAIN", out.stdout + out.stderr
    # Not TLS at all inside the tunnel, and a client that leaves in the middle of its ClientHello.
    with tunnel(sc) as raw:
        raw.sendall(b"POST /services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\n\r\n")
        raw.settimeout(10)
        raw.recv(4096)
    with tunnel(sc) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    # Through mitmproxy (an IP-literal tunnel whose SNI is a token host) the same is counted.
    with tunnel(sc, f"127.0.0.1:{world.salesforce.address[1]}") as raw:
        try:
            ssl.create_default_context().wrap_socket(raw, server_hostname=SF_HOST)
        except ssl.SSLCertVerificationError:
            pass

    def counts() -> dict[str, float]:
        text = sc.metrics()
        return {r: metric_value(text, FAILURES, reason=r) for r in ("unknown_ca", "client_closed", "protocol_error")}

    assert wait_until(lambda: counts() == {"unknown_ca": 3, "client_closed": 2, "protocol_error": 1}, timeout=10), \
        counts()
    status = sc.status()
    assert status["client_tls"]["failures"] == {"unknown_ca": 3, "client_closed": 2, "protocol_error": 1}
    assert status["verdict"]["level"] == "warning"
    (line,) = [x for x in status["verdict"]["lines"] if "TLS handshakes" in x]
    assert "unknown ca: 3" in line and "client closed: 2" in line and "ca-bundle.pem" in line
    with urllib.request.urlopen(sc.admin_url + "/", timeout=5) as page:
        assert "client TLS handshakes with the sidecar failed" in page.read().decode()
    assert not world.salesforce.seen  # none of them got as far as a token call
