"""The sidecar core end to end: real sidecar process, real TLS, real clients, simulated pair and Salesforce."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.sim.certs import TestCA
from sidecar.sim.echo import FakeIPEcho
from tests.harness import (
    CLIENT_SECRET,
    PROXY_PASS,
    ROOT,
    TOKEN_URL,
    SidecarProcess,
    World,
    iter_written_files,
    metric_value,
    redeem,
    redeem_chain,
    sidecar_env,
)

TOKENS_METRIC = "egress_sidecar_token_requests_total"


def test_token_calls_alternate_between_members(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    redeem_chain(sc, world.salesforce, 6)
    sources = Counter(r.source_ip for r in world.salesforce.seen if r.path == "/services/oauth2/token")
    assert sources == {"127.0.0.2": 3, "127.0.0.3": 3}
    calls = sc.log_events()
    assert [c["member"] for c in calls] == [world.members[i % 2] for i in range(6)]
    assert all(c["outcome"] == "success" and c["grant_type"] == "refresh_token" for c in calls)
    assert all(c["route"] == "pair" for c in calls)


def test_partial_allowlist_failures_are_exactly_the_other_member(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    # Salesforce allows only 127.0.0.2; the sidecar observes (no allowlist configured): what an app sees today.
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_GUARD": "observe"})
    results = []
    with sc.session() as s:
        for _ in range(10):
            token = world.salesforce.issue_refresh_token()
            resp = redeem(s, token)
            results.append(resp.status_code)
            if resp.status_code == 400:
                assert resp.json() == {"error": "invalid_grant", "error_description": "ip restricted by app developer"}
    assert Counter(results) == {200: 5, 400: 5}
    seen = [r for r in world.salesforce.seen if r.path == "/services/oauth2/token"]
    assert {r.source_ip for r in seen if r.status == 400} == {"127.0.0.3"}
    assert {r.source_ip for r in seen if r.status == 200} == {"127.0.0.2"}
    good, bad = world.members
    assert metric_value(sc.metrics(), TOKENS_METRIC, member=bad, outcome="ip_restricted") == 5
    assert metric_value(sc.metrics(), TOKENS_METRIC, member=good, outcome="success") == 5
    assert metric_value(sc.metrics(), TOKENS_METRIC, member=good, outcome="ip_restricted") == 0


def test_egress_ip_label_once_discovered(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_GUARD": "observe"})  # round-robin, no retry
    from tests.harness import wait_until

    assert wait_until(sc.egress_discovered, timeout=10)
    with sc.session() as s:
        for _ in range(2):
            redeem(s, world.salesforce.issue_refresh_token())
    text = sc.metrics()
    assert metric_value(text, TOKENS_METRIC, egress_ip="127.0.0.3", outcome="ip_restricted") == 1
    assert metric_value(text, TOKENS_METRIC, egress_ip="127.0.0.2", outcome="success") == 1
    assert metric_value(text, "egress_sidecar_token_request_duration_seconds_count", egress_ip="127.0.0.2") == 1


def test_proxy_password_never_reaches_salesforce_and_no_secret_is_written(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc(world.pair_env())
    secrets_used: list[str] = [PROXY_PASS, CLIENT_SECRET]
    with sc.session() as s:
        for _ in range(4):
            token = world.salesforce.issue_refresh_token()
            secrets_used.append(token)
            resp = redeem(s, token)
            if resp.ok:
                # An access token is ORG_ID!SECRET: the org id is an identifier the sidecar names on /status and in
                # its log on purpose (docs/failure-handling.md); what follows the "!" is the secret.
                secrets_used += [resp.json()["refresh_token"], resp.json()["access_token"].partition("!")[2]]
        s.get("https://login.salesforce.com/services/data/", timeout=10)
    for seen in world.salesforce.seen:
        assert "proxy-authorization" not in seen.headers
        assert PROXY_PASS not in json.dumps(seen.headers)
    state = "".join(p.read_text(errors="replace") for p in iter_written_files(sc.confdir) if p.suffix != ".p12")
    assert world.salesforce.org_id[:12] not in state  # the state names no customer org: sealed there
    written = sc.log_text() + sc.metrics() + json.dumps(sc.status()) + state
    import base64

    basic = base64.b64encode(f"qgUser:{PROXY_PASS}".encode()).decode()
    for secret in [*secrets_used, basic]:
        for probe in (secret, secret[:12]):
            assert probe not in written, f"a secret (prefix {probe[:4]}...) was written by the sidecar"


def test_non_token_tls_passes_through_with_original_certificate(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    other_ca = TestCA(tmp_path / "other-ca", common_name="some other public CA")
    cert, key = other_ca.issue(["localhost", "127.0.0.1"], "other")
    with FakeIPEcho(certfile=cert, keyfile=key) as other:
        sc = make_sidecar_proc(world.pair_env())
        port = other.address[1]
        # The raw tunnel: the certificate the client sees is the origin's own.
        with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as raw:
            raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            ctx = ssl.create_default_context(cafile=str(other_ca.ca_path))
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
        assert der == ssl.PEM_cert_to_DER_cert(cert.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
        # curl through HTTPS_PROXY trusting only the origin's CA: works, so nothing was re-signed.
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", str(other_ca.ca_path), f"https://localhost:{port}/"],
            env=sc.client_env(), capture_output=True, text=True, timeout=20,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["ip"] == "127.0.0.1"  # direct: from this host, not a member
        assert all(h.source_ip == "127.0.0.1" for h in other.hits)
    assert metric_value(sc.metrics(), "egress_sidecar_tunnels_total", route="direct") >= 2
    assert sum(m.connects for m in world.pair.members) == 0  # nothing metered went through the pair


def test_non_token_request_on_token_host_goes_direct_by_default(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    # Salesforce is reached as localhost:PORT here, both direct (from 127.0.0.1) and via a member.
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_TOKEN_HOSTS": "localhost"})
    base = f"https://localhost:{world.salesforce.address[1]}"
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    with sc.session() as s:
        for _ in range(2):
            assert redeem(s, world.salesforce.issue_refresh_token(), url=base + "/services/oauth2/token").ok
            assert s.get(base + "/services/data/", timeout=15).status_code == 200
    by_path = [(r.path, r.source_ip) for r in world.salesforce.seen]
    # Token calls left through the members; the API calls on the same connection went direct,
    # so the token route never leaked onto the next request.
    assert by_path == [
        ("/services/oauth2/token", "127.0.0.2"),
        ("/services/data/", "127.0.0.1"),
        ("/services/oauth2/token", "127.0.0.3"),
        ("/services/data/", "127.0.0.1"),
    ]
    assert [c["member"] for c in sc.log_events()] == world.members


def test_route_salesforce_sends_all_salesforce_traffic_through_pair(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess]
) -> None:
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_ROUTE": "salesforce"})
    with sc.session() as s:
        resp = s.get("https://login.salesforce.com/services/data/", timeout=15)
    assert resp.status_code == 200
    assert [r.source_ip for r in world.salesforce.seen if r.path == "/services/data/"][0] in ("127.0.0.2", "127.0.0.3")


def test_curl_token_call_through_https_proxy(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is required (CI installs it)")
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    token = world.salesforce.issue_refresh_token()
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-d", "grant_type=refresh_token", "-d", f"refresh_token={token}",
         "-d", "client_id=3MVG9demo", "-d", f"client_secret={CLIENT_SECRET}", TOKEN_URL],
        env=sc.client_env(), capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_type"] == "Bearer"
    assert sc.log_events()[0]["outcome"] == "success"


def test_requests_via_environment_only(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    """An unchanged app: only HTTPS_PROXY and REQUESTS_CA_BUNDLE are set for it."""
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    token = world.salesforce.issue_refresh_token()
    app = (
        "import requests,sys\n"
        f"r = requests.post({TOKEN_URL!r}, data={{'grant_type':'refresh_token','refresh_token':sys.argv[1],"
        f"'client_id':'3MVG9demo','client_secret':{CLIENT_SECRET!r}}}, timeout=10)\n"
        "print(r.status_code)\n"
    )
    out = subprocess.run([sys.executable, "-c", app, token], env=sc.client_env(), capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "200", out.stderr


def test_direct_mode_warns_and_still_records(make_sidecar_proc: Callable[..., SidecarProcess], sf_cert: tuple[Path, Path]) -> None:
    from sidecar.sim.salesforce import FakeSalesforce

    with FakeSalesforce(*sf_cert, allowlist=("127.0.0.2",), client_secret=CLIENT_SECRET) as sf:
        sc = make_sidecar_proc({"SIDECAR_TOKEN_HOSTS": "localhost"})
        status = sc.status()
        assert status["mode"] == "direct" and "DIRECT MODE" in status["verdict"]["lines"][0]
        assert "DIRECT MODE" in sc.log_text()
        with sc.session() as s:
            resp = redeem(s, sf.issue_refresh_token(), url=f"https://localhost:{sf.address[1]}/services/oauth2/token")
        assert resp.status_code == 400  # 127.0.0.1 is not allowlisted: the classic rotating-IP failure
        (call,) = sc.log_events()
        assert (call["route"], call["member"], call["outcome"]) == ("direct", "direct", "ip_restricted")
        assert metric_value(sc.metrics(), "egress_sidecar_direct_mode") == 1


def test_admin_endpoints(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    import urllib.request

    sc = make_sidecar_proc(world.pair_env())
    for path, ctype in [("/healthz", "application/json"), ("/readyz", "application/json"),
                        ("/ca.pem", "application/x-pem-file"), ("/metrics", "text/plain"), ("/status", "application/json")]:
        with urllib.request.urlopen(sc.admin_url + path, timeout=5) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith(ctype)
            body = resp.read()
        if path == "/ca.pem":
            assert body == (sc.confdir / "ca.pem").read_bytes()
            assert body in (sc.confdir / "ca-bundle.pem").read_bytes()


def test_bad_config_gives_clear_message(tmp_path: Path, test_ca: TestCA) -> None:
    cases = {
        "SIDECAR_ROUTE": ("sometimes", "SIDECAR_ROUTE"),
        "QUOTAGUARDSTATIC_URL": ("https://user:hunter2pw@proxy:9293", "QUOTAGUARDSTATIC_URL"),
        "SIDECAR_ALLOWLIST": ("10.0.0.0/8x", "SIDECAR_ALLOWLIST"),
    }
    for key, (value, name) in cases.items():
        env = sidecar_env(tmp_path, test_ca.ca_path, {key: value})
        out = subprocess.run([sys.executable, "-m", "sidecar", "run"], env=env, capture_output=True, text=True,
                             timeout=30, cwd=ROOT)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"egress-sidecar: configuration error: {name}"), out.stderr
        assert "Traceback" not in out.stderr and "hunter2pw" not in out.stderr


def test_listen_port_in_use_names_the_setting(tmp_path: Path, test_ca: TestCA) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = sidecar_env(tmp_path, test_ca.ca_path, {"SIDECAR_LISTEN": f"127.0.0.1:{busy.getsockname()[1]}"})
        out = subprocess.run([sys.executable, "-m", "sidecar"], env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2 and "SIDECAR_LISTEN" in out.stderr and "Traceback" not in out.stderr


NODE_CLIENT = r"""
// A real Node client, no packages: CONNECT through HTTPS_PROXY, then TLS trusting NODE_EXTRA_CA_CERTS.
const http = require('http'), tls = require('tls');
const proxy = new URL(process.env.HTTPS_PROXY);
const body = new URLSearchParams({grant_type: 'refresh_token', refresh_token: process.argv[1],
  client_id: '3MVG9demo', client_secret: process.argv[2]}).toString();
const req = http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: 'login.salesforce.com:443'});
req.setTimeout(10000, () => { console.error('timeout'); process.exit(3); });
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.error('CONNECT', res.statusCode); process.exit(2); }
  const s = tls.connect({socket, servername: 'login.salesforce.com'}, () => {
    s.write('POST /services/oauth2/token HTTP/1.1\r\nHost: login.salesforce.com\r\nConnection: close\r\n' +
            'Content-Type: application/x-www-form-urlencoded\r\nContent-Length: ' + Buffer.byteLength(body) + '\r\n\r\n' + body);
  });
  let data = '';
  s.on('data', d => data += d);
  s.on('end', () => { console.log(data.split('\r\n')[0]); process.exit(0); });
  s.on('error', e => { console.error(e.message); process.exit(4); });
});
req.end();
"""


def test_node_client_trusts_extra_ca(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    if shutil.which("node") is None:
        pytest.fail("node is required (CI installs nodejs)")
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    out = subprocess.run(["node", "-e", NODE_CLIENT, world.salesforce.issue_refresh_token(), CLIENT_SECRET],
                         env=sc.client_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "HTTP/1.1 200 OK"
    assert sc.log_events()[0]["outcome"] == "success"


def test_httpx_client_via_environment(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc(world.pair_env())
    app = (
        "import httpx,sys\n"
        f"r = httpx.post({TOKEN_URL!r}, data={{'grant_type':'refresh_token','refresh_token':sys.argv[1],"
        f"'client_id':'3MVG9demo','client_secret':{CLIENT_SECRET!r}}}, timeout=10)\n"
        "print(r.status_code)\n"
    )
    out = subprocess.run([sys.executable, "-c", app, world.salesforce.issue_refresh_token()], env=sc.client_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "200", out.stderr
