"""Tests for sidecar.sim: the fakes must behave like the real services where the sidecar relies on it.

Real sockets and real clients (requests, http.client, curl, node). Source addresses are chosen with
`source_address` or by going through a QuotaGuard member bound to 127.0.0.2 / .3 / .4.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from sidecar.sim import (
    EXPIRED_TOKEN_BODY,
    IP_RESTRICTED_BODY,
    FakeIPEcho,
    FakeQuotaGuardMember,
    FakeQuotaGuardPair,
    FakeSalesforce,
    TestCA,
)
from tests.harness import read_until_closed

SF_HOST = "login.salesforce.com"
ECHO_HOST = "ip.quotaguard.com"
CLIENT = {"client_id": "3MVG9demo", "client_secret": "demo-consumer-secret"}
NO_PROXY_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def sim_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sim-") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(sim_threads())
    yield
    assert set(sim_threads()) - before == set(), "a test left a sim server thread running"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def sf_cert(ca: TestCA) -> tuple[Path, Path]:
    return ca.issue([SF_HOST, "test.salesforce.com", "127.0.0.1"], "salesforce")


@pytest.fixture
def sf(sf_cert: tuple[Path, Path]) -> Iterator[FakeSalesforce]:
    with FakeSalesforce(*sf_cert) as server:
        yield server


@pytest.fixture
def echo() -> Iterator[FakeIPEcho]:
    with FakeIPEcho() as server:
        yield server


@pytest.fixture
def pair(sf: FakeSalesforce, echo: FakeIPEcho) -> Iterator[FakeQuotaGuardPair]:
    routes = {(SF_HOST, 443): sf.address, (ECHO_HOST, 80): echo.address}
    with FakeQuotaGuardPair(routes=routes) as p:
        yield p


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # never pick up a proxy from the environment
        yield s


def token_call(sf: FakeSalesforce, ca: TestCA, form: dict[str, str], *, source: str = "127.0.0.2",
               headers: dict[str, str] | None = None, path: str = "/services/oauth2/token") -> tuple[int, bytes]:
    """POST the token endpoint straight from `source` (no proxy)."""
    conn = http.client.HTTPSConnection(*sf.address, context=ca.client_context(), timeout=5,
                                       source_address=(source, 0))
    try:
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        conn.request("POST", path, urlencode(form), hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def refresh_form(token: str) -> dict[str, str]:
    return {"grant_type": "refresh_token", "refresh_token": token, **CLIENT}


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def proxy_auth(user: str = "qgUser", password: str = "qgPass") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def raw_proxy(member: FakeQuotaGuardMember, request: str) -> bytes:
    with socket.create_connection(member.address, timeout=5) as s:
        s.sendall(request.encode())
        return read_head(s)


# ---- certificates / TLS ---------------------------------------------------------------------
def test_requests_verifies_fake_salesforce_with_test_ca(sf: FakeSalesforce, ca: TestCA, session: requests.Session) -> None:
    url = f"https://127.0.0.1:{sf.address[1]}/services/data/"
    r = session.get(url, verify=str(ca.ca_path), timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json;charset=UTF-8"
    assert {"label", "url", "version"} <= set(r.json()[0])
    with pytest.raises(requests.exceptions.SSLError):
        session.get(url, timeout=5)  # public roots do not trust the test CA


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_verifies_hostname_with_test_ca(sf: FakeSalesforce, ca: TestCA) -> None:
    port = sf.address[1]
    base = ["curl", "-sS", "--noproxy", "*", "--resolve", f"{SF_HOST}:{port}:127.0.0.1"]
    url = f"https://{SF_HOST}:{port}/services/data/"
    ok = subprocess.run([*base, "--cacert", str(ca.ca_path), url], check=False, capture_output=True, timeout=20,
                        env=NO_PROXY_ENV)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["url"].startswith("/services/data/v")
    bad = subprocess.run([*base, url], check=False, capture_output=True, timeout=20, env=NO_PROXY_ENV)
    assert bad.returncode == 60  # peer certificate cannot be authenticated


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_node_accepts_certificate(sf: FakeSalesforce, ca: TestCA) -> None:
    script = (
        f"require('https').get({{host:'127.0.0.1',port:{sf.address[1]},path:'/services/data/',"
        f"servername:'{SF_HOST}',headers:{{Host:'{SF_HOST}'}}}},r=>{{let b='';r.on('data',d=>b+=d);"
        "r.on('end',()=>console.log(r.statusCode+' '+b))}).on('error',e=>{console.log('ERR '+e.code);process.exit(2)})"
    )
    env = {**NO_PROXY_ENV, "NODE_EXTRA_CA_CERTS": str(ca.ca_path)}
    out = subprocess.run(["node", "-e", script], check=False, capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("200 [")


def test_ca_is_reused_and_leaf_has_ip_san(ca: TestCA, sf_cert: tuple[Path, Path]) -> None:
    assert TestCA(ca.directory).ca_path.read_bytes() == ca.ca_path.read_bytes()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(sf_cert[0].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SF_HOST, "test.salesforce.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(sf_cert[1].stat().st_mode & 0o777) == "0o600"


# ---- Salesforce token endpoint --------------------------------------------------------------
def test_refresh_rotation(sf: FakeSalesforce, ca: TestCA) -> None:
    old = sf.issue_refresh_token()
    assert old.startswith("5Aep861") and len(old) == 87
    status, body = token_call(sf, ca, refresh_form(old))
    assert status == 200, body
    data = json.loads(body)
    new = data["refresh_token"]
    assert new != old and new.startswith("5Aep861")
    assert data["token_type"] == "Bearer" and "!" in data["access_token"]
    assert data["id"] == f"https://login.salesforce.com/id/{sf.org_id}/{sf.user_id}"
    assert abs(int(data["issued_at"]) - time.time() * 1000) < 60_000
    assert data["instance_url"] == f"https://127.0.0.1:{sf.address[1]}"
    assert token_call(sf, ca, refresh_form(old)) == (400, EXPIRED_TOKEN_BODY)
    assert token_call(sf, ca, refresh_form(new))[0] == 200
    assert token_call(sf, ca, refresh_form("5Aep861nonsense")) == (400, EXPIRED_TOKEN_BODY)


def test_token_endpoint_under_a_site_path(sf: FakeSalesforce, ca: TestCA) -> None:
    """Experience Cloud sites serve the token endpoint under the site's path; the allowlist applies there too."""
    token = sf.issue_refresh_token()
    path = "/customers/services/oauth2/token"
    assert token_call(sf, ca, refresh_form(token), source="127.0.0.3", path=path) == (400, IP_RESTRICTED_BODY)
    status, body = token_call(sf, ca, refresh_form(token), path=path)
    assert status == 200 and json.loads(body)["refresh_token"] != token
    assert [(r.path, r.status) for r in sf.seen] == [(path, 400), (path, 200)]


def test_allowlist_uses_source_ip_not_headers(sf: FakeSalesforce, ca: TestCA) -> None:
    token = sf.issue_refresh_token()
    spoof = {"X-Forwarded-For": "127.0.0.2", "X-Real-IP": "127.0.0.2"}
    assert token_call(sf, ca, refresh_form(token), source="127.0.0.3", headers=spoof) == (400, IP_RESTRICTED_BODY)
    assert sf.refresh_token_valid(token)  # blocked call did not consume it
    status, body = token_call(sf, ca, refresh_form(token), source="127.0.0.2")
    assert status == 200, body
    assert [(r.source_ip, r.status) for r in sf.seen] == [("127.0.0.3", 400), ("127.0.0.2", 200)]


def test_allowlist_changes_at_runtime(sf: FakeSalesforce, ca: TestCA) -> None:
    sf.set_allowlist(["127.0.0.3"])
    assert token_call(sf, ca, refresh_form(sf.issue_refresh_token()), source="127.0.0.2") == (400, IP_RESTRICTED_BODY)
    assert token_call(sf, ca, refresh_form(sf.issue_refresh_token()), source="127.0.0.3")[0] == 200
    sf.set_allowlist(["127.0.0.4-127.0.0.9", "::1"])  # Salesforce-style start-end range
    assert token_call(sf, ca, refresh_form(sf.issue_refresh_token()), source="127.0.0.5")[0] == 200
    assert token_call(sf, ca, refresh_form(sf.issue_refresh_token()), source="127.0.0.3")[0] == 400
    sf.enforce_allowlist = False
    assert token_call(sf, ca, refresh_form(sf.issue_refresh_token()), source="127.0.0.3")[0] == 200


def test_each_org_is_named_in_its_answers_and_may_restrict_ips_with_the_same_answer(sf: FakeSalesforce, ca: TestCA) -> None:
    """An ISV's app serves many orgs: each answer names the grant's org and user in `id`, across
    rotations and from the web server flow; an org's own IP restriction refuses with exactly the body the
    app's allowlist gives, without consuming the token, and leaves every other org alone."""
    sf.set_allowlist(["127.0.0.2", "127.0.0.3"])
    a, b = sf.add_org(), sf.add_org(ip_ranges=["127.0.0.2"])
    assert a.startswith("00D") and len(a) == 18 and a != b and sf.org_id not in (a, b)
    token_b = sf.issue_refresh_token(b)
    assert token_call(sf, ca, refresh_form(token_b), source="127.0.0.3") == (400, IP_RESTRICTED_BODY)
    assert sf.refresh_token_valid(token_b) and sf.org_of(token_b) == b
    status, body = token_call(sf, ca, refresh_form(token_b), source="127.0.0.2")
    assert status == 200 and json.loads(body)["id"] == f"https://login.salesforce.com/id/{b}/{sf.user_of(b)}"
    rotated = json.loads(body)["refresh_token"]
    assert sf.org_of(rotated) == b  # rotation keeps the grant's org
    token_a = sf.issue_refresh_token(a)
    status, body = token_call(sf, ca, refresh_form(token_a), source="127.0.0.3")  # org A: no restriction
    assert status == 200 and json.loads(body)["id"].endswith(f"/id/{a}/{sf.user_of(a)}")
    code = sf.issue_auth_code(b)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "https://app/cb", **CLIENT}
    assert token_call(sf, ca, form, source="127.0.0.3") == (400, IP_RESTRICTED_BODY)
    status, body = token_call(sf, ca, form, source="127.0.0.2")
    assert status == 200 and f"/id/{b}/" in json.loads(body)["id"]
    assert [(r.source_ip, r.status, r.org_id) for r in sf.seen] == [
        ("127.0.0.3", 400, b), ("127.0.0.2", 200, b), ("127.0.0.3", 200, a), ("127.0.0.3", 400, b), ("127.0.0.2", 200, b)]
    sf.set_org_ip_ranges(b, None)  # the customer lifted its restriction
    assert token_call(sf, ca, refresh_form(rotated), source="127.0.0.3")[0] == 200


def test_authorization_code_single_use_and_allowlisted(sf: FakeSalesforce, ca: TestCA) -> None:
    code = sf.issue_auth_code()
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "https://app/cb", **CLIENT}
    assert token_call(sf, ca, form, source="127.0.0.3") == (400, IP_RESTRICTED_BODY)
    status, body = token_call(sf, ca, form, source="127.0.0.2")
    assert status == 200, body
    assert token_call(sf, ca, refresh_form(json.loads(body)["refresh_token"]))[0] == 200
    assert token_call(sf, ca, form)[0] == 400  # single use


@pytest.mark.parametrize("form", [
    {"grant_type": "client_credentials", **CLIENT},
    {"grant_type": "password", "username": "demo@example.com", "password": "demo-password", **CLIENT},
    {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
     "assertion": "e30." + base64.urlsafe_b64encode(b'{"iss":"3MVG9demo"}').decode().rstrip("=") + ".sig"},
])
def test_other_grants_ignore_allowlist(sf: FakeSalesforce, ca: TestCA, form: dict[str, str]) -> None:
    status, body = token_call(sf, ca, form, source="127.0.0.3")
    assert status == 200, body
    data = json.loads(body)
    assert "access_token" in data and "refresh_token" not in data


@pytest.mark.parametrize(("form", "expected"), [
    ({**refresh_form("x"), "client_id": "wrong"}, b'{"error":"invalid_client_id","error_description":"client identifier invalid"}'),
    ({**refresh_form("x"), "client_secret": "wrong"}, b'{"error":"invalid_client","error_description":"invalid client credentials"}'),
    ({**CLIENT}, b'{"error":"unsupported_grant_type","error_description":"grant type not supported"}'),
    ({"grant_type": "magic", **CLIENT}, b'{"error":"unsupported_grant_type","error_description":"grant type not supported"}'),
    ({"grant_type": "password", "username": "demo@example.com", "password": "no", **CLIENT},
     b'{"error":"invalid_grant","error_description":"authentication failure"}'),
])
def test_token_errors(sf: FakeSalesforce, ca: TestCA, form: dict[str, str], expected: bytes) -> None:
    assert token_call(sf, ca, form) == (400, expected)


def test_basic_client_auth_and_non_form_body(sf: FakeSalesforce, ca: TestCA, session: requests.Session) -> None:
    url = f"https://127.0.0.1:{sf.address[1]}/services/oauth2/token"
    verify = str(ca.ca_path)
    r = session.post(url, data={"grant_type": "client_credentials"}, auth=("3MVG9demo", "demo-consumer-secret"), verify=verify)
    assert r.status_code == 200 and r.json()["token_type"] == "Bearer"
    r = session.post(url, data={"grant_type": "client_credentials"}, auth=("3MVG9demo", "bad"), verify=verify)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_client")
    r = session.post(url, json={"grant_type": "client_credentials", **CLIENT}, verify=verify)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    r = session.get(url, verify=verify)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")


def test_rotation_disabled_keeps_token(sf: FakeSalesforce, ca: TestCA) -> None:
    sf.rotate = False
    token = sf.issue_refresh_token()
    for _ in range(2):
        status, body = token_call(sf, ca, refresh_form(token))
        assert status == 200 and "refresh_token" not in json.loads(body)


def test_chunked_body_keepalive_and_records(sf: FakeSalesforce, ca: TestCA) -> None:
    token = sf.issue_refresh_token()
    conn = http.client.HTTPSConnection(*sf.address, context=ca.client_context(), timeout=5, source_address=("127.0.0.2", 0))
    try:
        body = urlencode(refresh_form(token)).encode()
        conn.request("POST", "/services/oauth2/token", iter([body[:10], body[10:]]), encode_chunked=True,
                     headers={"Content-Type": "application/x-www-form-urlencoded", "X-Test": "1"})
        first = conn.getresponse()
        assert first.status == 200, first.read()
        first.read()
        conn.request("GET", "/nope")
        second = conn.getresponse()
        assert second.status == 404 and second.getheader("Content-Type") == "application/json;charset=UTF-8"
        assert second.read().startswith(b'[{"errorCode":"NOT_FOUND"')
    finally:
        conn.close()
    one, two = sf.seen
    assert one.source_port == two.source_port  # same kept-alive connection
    assert (one.grant_type, one.body, one.headers["transfer-encoding"], one.headers["x-test"]) == (
        "refresh_token", body, "chunked", "1")
    sf.reset_seen()
    assert sf.seen == []


@pytest.mark.parametrize("mode", ["garbage", "close_early", "500", "slow"])
def test_fail_modes(sf: FakeSalesforce, ca: TestCA, session: requests.Session, mode: str) -> None:
    sf.fail_mode = mode
    sf.slow_seconds = 1.0
    url = f"https://127.0.0.1:{sf.address[1]}/services/data/"
    verify = str(ca.ca_path)
    if mode in ("garbage", "close_early"):
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get(url, verify=verify, timeout=5)
        assert sf.seen[-1].status is None
    elif mode == "500":
        r = session.get(url, verify=verify, timeout=5)
        assert (r.status_code, r.json()["error"]) == (500, "server_error")
    else:
        with pytest.raises(requests.exceptions.ReadTimeout):
            session.get(url, verify=verify, timeout=0.3)
        start = time.monotonic()
        assert session.get(url, verify=verify, timeout=5).status_code == 200
        assert time.monotonic() - start >= 0.9
    with pytest.raises(ValueError):
        sf.fail_mode = "explode"


# ---- QuotaGuard members ---------------------------------------------------------------------
def test_proxy_auth_required(pair: FakeQuotaGuardPair, session: requests.Session) -> None:
    member = pair[0]
    head = raw_proxy(member, f"CONNECT {SF_HOST}:443 HTTP/1.1\r\nHost: {SF_HOST}:443\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="QuotaGuard"' in head
    head = raw_proxy(member, f"CONNECT {SF_HOST}:443 HTTP/1.1\r\nHost: {SF_HOST}:443\r\nProxy-Authorization: {proxy_auth(password='x')}\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 ")
    host, port = member.address
    with pytest.raises(requests.exceptions.ProxyError):
        session.get(f"https://{SF_HOST}/", proxies={"https": f"http://{host}:{port}"}, timeout=5)
    r = session.get(f"http://{ECHO_HOST}/", proxies={"http": f"http://{host}:{port}"}, timeout=5)
    assert r.status_code == 407
    assert member.auth_failures == 4 and member.connects == 0
    with socket.create_connection(member.address, timeout=5) as s:  # keep-alive after 407, then auth
        s.sendall(f"CONNECT {SF_HOST}:443 HTTP/1.1\r\nHost: {SF_HOST}:443\r\n\r\n".encode())
        assert read_head(s).startswith(b"HTTP/1.1 407 ")
        s.sendall(f"CONNECT {SF_HOST}:443 HTTP/1.1\r\nHost: {SF_HOST}:443\r\nProxy-Authorization: {proxy_auth()}\r\n\r\n".encode())
        assert read_head(s).startswith(b"HTTP/1.1 200 ")
    assert member.connects == 1


def test_allowlist_through_each_member(pair: FakeQuotaGuardPair, sf: FakeSalesforce, ca: TestCA,
                                       session: requests.Session) -> None:
    token = sf.issue_refresh_token()
    url = f"https://{SF_HOST}/services/oauth2/token"
    blocked = session.post(url, data=refresh_form(token), proxies={"https": pair.url_for(1)}, verify=str(ca.ca_path), timeout=5)
    assert (blocked.status_code, blocked.content) == (400, IP_RESTRICTED_BODY)
    ok = session.post(url, data=refresh_form(token), proxies={"https": pair.url_for(0)}, verify=str(ca.ca_path), timeout=5)
    assert ok.status_code == 200, ok.text
    assert ok.json()["instance_url"] == f"https://{SF_HOST}"
    assert [r.source_ip for r in sf.seen] == ["127.0.0.3", "127.0.0.2"]
    assert all("proxy-authorization" not in r.headers for r in sf.seen)
    assert [(m.connects, m.seen_targets) for m in pair] == [(1, [(SF_HOST, 443)])] * 2
    assert pair[0].bytes_relayed > 1000


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_token_call_through_member(pair: FakeQuotaGuardPair, sf: FakeSalesforce, ca: TestCA) -> None:
    token = sf.issue_refresh_token()
    cmd = ["curl", "-sS", "-x", pair.url_for(0), "--cacert", str(ca.ca_path), "-w", "\n%{http_code}",
           f"https://{SF_HOST}/services/oauth2/token", "--data", urlencode(refresh_form(token))]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20, env=NO_PROXY_ENV)
    body, code = out.stdout.rsplit("\n", 1)
    assert (out.returncode, code) == (0, "200"), out.stderr
    assert json.loads(body)["refresh_token"] != token
    assert sf.seen[-1].source_ip == "127.0.0.2" and "proxy-authorization" not in sf.seen[-1].headers


def test_echo_through_each_member_plain_and_tls(pair: FakeQuotaGuardPair, echo: FakeIPEcho, ca: TestCA,
                                                session: requests.Session) -> None:
    cert, key = ca.issue([ECHO_HOST], "echo")
    with FakeIPEcho(certfile=cert, keyfile=key) as tls_echo:
        pair.set_route((ECHO_HOST, 443), tls_echo.address)
        for i, expected in enumerate(["127.0.0.2", "127.0.0.3"]):
            proxies = {"http": pair.url_for(i), "https": pair.url_for(i)}
            assert session.get(f"http://{ECHO_HOST}/", proxies=proxies, timeout=5).json() == {"ip": expected}
            assert session.get(f"http://{ECHO_HOST}/plain", proxies=proxies, timeout=5).text == expected + "\n"
            r = session.get(f"https://{ECHO_HOST}/", proxies=proxies, verify=str(ca.ca_path), timeout=5)
            assert r.json() == {"ip": expected}
        assert [h.source_ip for h in tls_echo.hits] == ["127.0.0.2", "127.0.0.3"]
    assert [(h.source_ip, h.path) for h in echo.hits] == [
        ("127.0.0.2", "/"), ("127.0.0.2", "/plain"), ("127.0.0.3", "/"), ("127.0.0.3", "/plain")]
    assert all(m.forwards == 2 and m.connects == 1 for m in pair)


def test_echo_direct_and_egress_change(pair: FakeQuotaGuardPair, echo: FakeIPEcho, session: requests.Session) -> None:
    host, port = echo.address
    assert session.get(f"http://{host}:{port}/", timeout=5).json() == {"ip": "127.0.0.1"}
    assert session.get(f"http://{host}:{port}/missing", timeout=5).status_code == 404
    proxies = {"http": pair.url_for(0)}
    assert session.get(f"http://{ECHO_HOST}/", proxies=proxies, timeout=5).json() == {"ip": "127.0.0.2"}
    pair[0].egress_ip = "127.0.0.4"  # "QuotaGuard's IP changed"
    assert session.get(f"http://{ECHO_HOST}/", proxies=proxies, timeout=5).json() == {"ip": "127.0.0.4"}
    with pytest.raises(ValueError):
        pair[0].egress_ip = "10.0.0.1"


def test_balanced_address_spreads_connections_and_keeps_each_on_one_member(
    echo: FakeIPEcho, session: requests.Session
) -> None:
    """QuotaGuard may publish one load-balanced address instead of one per static IP. Through the fake one,
    real clients see both egress IPs over several connections, and one egress IP on each connection (three
    requests in one CONNECT tunnel, with http.client), as with a TCP-level balancer."""
    with FakeQuotaGuardPair(routes={(ECHO_HOST, 80): echo.address}, balanced=True) as pair:
        assert pair.balancer is not None
        proxies = {"http": pair.balanced_url}
        # a new proxy connection per request (the members keep a connection alive across requests, so one
        # keep-alive connection stays on one member, as it would behind a TCP-level balancer)
        per_request = [session.get(f"http://{ECHO_HOST}/", proxies=proxies, headers={"Connection": "close"},
                                   timeout=5).json()["ip"] for _ in range(4)]
        per_tunnel = []
        for _ in range(4):
            conn = http.client.HTTPConnection(*pair.balancer.address, timeout=5)
            conn.set_tunnel(ECHO_HOST, 80, headers={"Proxy-Authorization": proxy_auth()})
            try:
                ips = []
                for _ in range(3):
                    conn.request("GET", "/")
                    ips.append(json.loads(conn.getresponse().read())["ip"])
            finally:
                conn.close()
            per_tunnel.append(ips)
        chosen = pair.balancer.chosen
        member_only = {"http": pair.url_for(0)}  # each member's own address still works beside the balancer
        assert session.get(f"http://{ECHO_HOST}/", proxies=member_only, timeout=5).json() == {"ip": "127.0.0.2"}
    assert set(per_request) == {"127.0.0.2", "127.0.0.3"}
    assert all(len(set(ips)) == 1 for ips in per_tunnel), per_tunnel
    assert {ips[0] for ips in per_tunnel} == {"127.0.0.2", "127.0.0.3"}
    assert len(chosen) == 8 and set(chosen) == {m.address for m in pair}
    assert [h.source_ip for h in echo.hits][:4] == per_request  # the echo saw each member's egress, no balancer's


def test_balanced_address_needs_the_members_credentials(pair: FakeQuotaGuardPair) -> None:
    """The balancer only copies bytes: the member behind it asks for proxy auth as before."""
    balanced = FakeQuotaGuardPair(balanced=True)
    with balanced:
        assert balanced.balancer is not None
        with socket.create_connection(balanced.balancer.address, timeout=5) as s:
            s.sendall(f"CONNECT {ECHO_HOST}:80 HTTP/1.1\r\nHost: {ECHO_HOST}:80\r\n\r\n".encode())
            assert read_head(s).startswith(b"HTTP/1.1 407 ")
    with pytest.raises(RuntimeError, match="balanced"):
        _ = pair.balanced_url


def test_only_loopback_targets(pair: FakeQuotaGuardPair) -> None:
    member, auth = pair[0], f"Proxy-Authorization: {proxy_auth()}\r\n"
    for target in ("10.1.2.3:443", "example.com:443", "[2001:db8::1]:443"):
        assert raw_proxy(member, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").startswith(b"HTTP/1.1 403 "), target
    assert raw_proxy(member, f"GET http://8.8.8.8/ HTTP/1.1\r\nHost: 8.8.8.8\r\n{auth}\r\n").startswith(b"HTTP/1.1 403 ")
    assert member.connects == 0
    with pytest.raises(ValueError):
        member.set_route(("evil.example", 443), ("192.0.2.1", 443))


def test_unreachable_and_refused_connects(pair: FakeQuotaGuardPair, sf: FakeSalesforce) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    member, auth = pair[0], f"Proxy-Authorization: {proxy_auth()}\r\n"
    member.set_route(("dead.example", 443), ("127.0.0.1", dead_port))
    assert raw_proxy(member, f"CONNECT dead.example:443 HTTP/1.1\r\nHost: dead.example:443\r\n{auth}\r\n").startswith(b"HTTP/1.1 502 ")
    member.refuse_connect_status = 503
    assert raw_proxy(member, f"CONNECT {SF_HOST}:443 HTTP/1.1\r\nHost: x\r\n{auth}\r\n").startswith(b"HTTP/1.1 503 ")
    assert member.connects == 0 and sf.seen == []


def test_tunnel_streams_large_body(pair: FakeQuotaGuardPair, sf: FakeSalesforce, ca: TestCA,
                                   session: requests.Session) -> None:
    big = b"grant_type=client_credentials&client_id=3MVG9demo&client_secret=demo-consumer-secret&pad=" + b"x" * 4_000_000
    r = session.post(f"https://{SF_HOST}/services/oauth2/token", data=big, proxies={"https": pair.url_for(0)},
                     headers={"Content-Type": "application/x-www-form-urlencoded"}, verify=str(ca.ca_path), timeout=20)
    assert r.status_code == 200, r.text
    assert sf.seen[-1].body == big and pair[0].bytes_relayed > 4_000_000


# ---- lifecycle --------------------------------------------------------------------------------
def test_restart_on_same_port(echo: FakeIPEcho, session: requests.Session) -> None:
    address = echo.address
    echo.restart()
    assert echo.address == address
    assert session.get(f"http://{address[0]}:{address[1]}/", timeout=5).json() == {"ip": "127.0.0.1"}


def test_stop_closes_connections_and_thread(echo: FakeIPEcho) -> None:
    conn = http.client.HTTPConnection(*echo.address, timeout=5)
    conn.request("GET", "/")
    assert json.loads(conn.getresponse().read()) == {"ip": "127.0.0.1"}
    assert echo.open_connections == 1 and echo.running
    start = time.monotonic()
    echo.stop()
    assert time.monotonic() - start < 5 and not echo.running and echo.open_connections == 0
    assert conn.sock is not None
    try:
        assert conn.sock.recv(1) == b""  # server side closed the kept-alive connection
    except ConnectionResetError:
        pass
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(echo.address, timeout=2).close()
    echo.stop()  # idempotent
    echo.start()  # the fixture stops it again


def test_stop_member_closes_open_tunnel_and_upstream(pair: FakeQuotaGuardPair, echo: FakeIPEcho) -> None:
    member = pair[0]
    with socket.create_connection(member.address, timeout=5) as s:
        s.sendall(f"CONNECT {ECHO_HOST}:80 HTTP/1.1\r\nHost: {ECHO_HOST}:80\r\nProxy-Authorization: {proxy_auth()}\r\n\r\n".encode())
        assert read_head(s).startswith(b"HTTP/1.1 200 ")
        s.sendall(f"GET / HTTP/1.1\r\nHost: {ECHO_HOST}\r\n\r\n".encode())
        assert b'{"ip": "127.0.0.2"}' in s.recv(4096)
        assert echo.open_connections == 1
        member.stop()
        assert s.recv(1) == b""
    deadline = time.monotonic() + 3
    while echo.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert echo.open_connections == 0  # the member's upstream connection was closed too
    member.start()


def test_stop_is_bounded_with_a_stuck_request(sf: FakeSalesforce, ca: TestCA) -> None:
    sf.fail_mode, sf.slow_seconds = "slow", 30.0
    errors: list[BaseException] = []

    def client() -> None:
        try:
            token_call(sf, ca, refresh_form("x"))
        except (OSError, http.client.HTTPException) as e:
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 5
    while sf.open_connections == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    sf.stop()
    assert time.monotonic() - start < 5
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    sf.start()


def test_bind_error_is_raised_in_caller(echo: FakeIPEcho) -> None:
    with pytest.raises(OSError):
        FakeIPEcho(port=echo.address[1]).start()
    with pytest.raises(RuntimeError):
        echo.start()  # already running
    with pytest.raises(ValueError):
        FakeIPEcho(host="0.0.0.0")  # loopback only


def test_tls_handshake_from_plain_client_does_not_hang(sf: FakeSalesforce) -> None:
    with socket.create_connection(sf.address, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        try:
            data = s.recv(100)  # the server drops it (maybe with a TLS alert); a hang raises timeout
        except ConnectionResetError:
            data = b""
        assert not data.startswith(b"HTTP")
    ctx = ssl.create_default_context()
    with socket.create_connection(sf.address, timeout=5) as s, pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(s, server_hostname=SF_HOST)


def test_a_member_answers_a_forwarded_request_on_a_kept_alive_connection_and_a_connect_may_follow(
    echo: FakeIPEcho
) -> None:
    """As a real forward proxy: an absolute-form request, then a CONNECT on the same connection (how the
    sidecar learns the egress IP of the very connection a token call takes); a member configured to refuse
    the CONNECT after another request answers it with that status instead."""
    with FakeQuotaGuardPair(routes={(ECHO_HOST, 80): echo.address}) as pair:
        auth = proxy_auth()
        for refuse in (None, 405):
            pair[0].refuse_connect_after_request = refuse
            with socket.create_connection(pair[0].address, timeout=5) as c:
                c.sendall(f"GET http://{ECHO_HOST}/ HTTP/1.1\r\nHost: {ECHO_HOST}\r\nProxy-Authorization: {auth}\r\n\r\n"
                          .encode())
                first = c.recv(65536)
                assert first.startswith(b"HTTP/1.1 200") and b'"ip": "127.0.0.2"' in first, first
                assert b"connection: close" not in first.lower()
                c.sendall(f"CONNECT {ECHO_HOST}:80 HTTP/1.1\r\nHost: {ECHO_HOST}:80\r\nProxy-Authorization: {auth}\r\n\r\n"
                          .encode())
                answer = c.recv(65536)
                if refuse is None:
                    assert answer.startswith(b"HTTP/1.1 200"), answer
                    c.sendall(b"GET / HTTP/1.1\r\nHost: ip.quotaguard.com\r\nConnection: close\r\n\r\n")
                    assert b'"ip": "127.0.0.2"' in read_until_closed(c)
                else:
                    assert answer.startswith(b"HTTP/1.1 405"), answer
