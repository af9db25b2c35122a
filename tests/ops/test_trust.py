"""The CA the app trusts: generated or brought by the user (SIDECAR_CA_CERT/KEY), bad files fail at start, and the
trust files apps get (ca-bundle.pem = system store + certifi + CA, each once; truststore.p12 that Java trusts)."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning

from sidecar.ops.trust import (
    MITM_CA_CERT,
    TRUSTSTORE_PASSWORD,
    client_env,
    export_ca,
    java_non_proxy_hosts,
    java_tool_options,
    shell_assignments,
    system_store,
)
from sidecar.sim.certs import TestCA
from sidecar.sim.salesforce import FakeSalesforce
from tests.clients.helpers import JAVA_CLIENT, ConnectionCounter, java, sf_env
from tests.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    ROOT,
    SidecarProcess,
    World,
    redeem,
    require_tool,
    sidecar_env,
)


def presented_issuer(sc: SidecarProcess, cafile: Path) -> x509.Name:
    import socket

    with socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) as raw:
        raw.sendall(b"CONNECT login.salesforce.com:443 HTTP/1.1\r\nHost: login.salesforce.com:443\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(cafile))  # only the user's CA: verification proves the chain
        with ctx.wrap_socket(raw, server_hostname="login.salesforce.com") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).issuer


def test_given_ca_is_the_one_the_app_sees(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    users_ca = TestCA(tmp_path / "users-ca", common_name="ACME egress CA")
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_CA_CERT": str(users_ca.ca_path),
                            "SIDECAR_CA_KEY": str(users_ca.directory / "ca-key.pem")})
    issuer = presented_issuer(sc, users_ca.ca_path)
    assert issuer.rfc4514_string() == "CN=ACME egress CA"
    assert (sc.confdir / "ca.pem").read_bytes() == users_ca.ca_path.read_bytes()
    assert users_ca.ca_path.read_bytes() in (sc.confdir / "ca-bundle.pem").read_bytes()


def test_generated_ca_persists_across_restarts(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    sc = make_sidecar_proc(world.pair_env())
    first = (sc.confdir / "ca.pem").read_bytes()
    sc.stop()
    sc.start()
    assert (sc.confdir / "ca.pem").read_bytes() == first
    presented_issuer(sc, sc.confdir / "ca.pem")


def run_with(tmp_path: Path, test_ca: TestCA, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "run"], env=sidecar_env(tmp_path, test_ca.ca_path, env),
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_bad_ca_files_fail_at_start(tmp_path: Path, test_ca: TestCA) -> None:
    one, other = TestCA(tmp_path / "one"), TestCA(tmp_path / "other")
    leaf, leaf_key = one.issue(["example.com"], "leaf")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    cases = [
        ({"SIDECAR_CA_CERT": str(one.ca_path), "SIDECAR_CA_KEY": str(other.directory / "ca-key.pem")},
         "SIDECAR_CA_CERT and SIDECAR_CA_KEY do not match"),
        ({"SIDECAR_CA_CERT": str(leaf), "SIDECAR_CA_KEY": str(leaf_key)}, "is not a CA certificate"),
        ({"SIDECAR_CA_CERT": str(garbage), "SIDECAR_CA_KEY": str(leaf_key)}, "SIDECAR_CA_CERT"),
        ({"SIDECAR_CA_CERT": str(one.ca_path)}, "SIDECAR_CA_CERT and SIDECAR_CA_KEY go together"),
        ({"SIDECAR_CA_CERT": str(one.ca_path), "SIDECAR_CA_KEY": str(garbage)}, "SIDECAR_CA_KEY"),
    ]
    for env, message in cases:
        out = run_with(tmp_path, test_ca, env)
        assert out.returncode == 2, (env, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


# ---- the trust files apps get: ca-bundle.pem and truststore.p12 ---------------------------------
def ders(pem: bytes) -> list[bytes]:
    """The DER bytes of each PEM certificate block (decoded here, not by the code under test)."""
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", pem, re.S)
    return [base64.b64decode(b"".join(block.split())) for block in blocks]


def confdir_with_ca(path: Path, ca: TestCA) -> Path:
    """A confdir as mitmproxy leaves it: the CA's public certificate in mitmproxy-ca-cert.pem."""
    path.mkdir(parents=True)
    (path / MITM_CA_CERT).write_bytes(ca.ca_path.read_bytes())
    return path


def test_bundle_is_system_store_plus_certifi_plus_ca_each_once(tmp_path: Path, test_ca: TestCA) -> None:
    corp = TestCA(tmp_path / "corp", common_name="ACME corporate root")
    certifi_pem = Path(certifi.where()).read_bytes()
    # A public root as a system store may write it: 76-column lines, CRLF line ends; a different text.
    b64 = base64.b64encode(ders(certifi_pem)[5]).decode()
    lines = ["-----BEGIN CERTIFICATE-----", *textwrap.wrap(b64, 76), "-----END CERTIFICATE-----", ""]
    public_again = "\r\n".join(lines).encode()
    assert public_again not in certifi_pem
    system = tmp_path / "system-ca-certificates.crt"
    not_a_certificate = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    system.write_bytes(b"# ACME\n" + corp.ca_path.read_bytes() + b"# dup\n" + public_again
                       + test_ca.ca_path.read_bytes() + not_a_certificate)
    confdir = confdir_with_ca(tmp_path / "confdir", test_ca)

    files = export_ca(confdir, tmp_path / "trust", system=system)

    assert files.ca_bundle == tmp_path / "trust" / "ca-bundle.pem" and not (confdir / "ca-bundle.pem").exists()
    bundle = ders(files.ca_bundle.read_bytes())
    corp_der, ca_der = ders(corp.ca_path.read_bytes())[0], ders(test_ca.ca_path.read_bytes())[0]
    assert len(bundle) == len(set(bundle)), "a certificate is in the bundle twice"
    assert bundle.count(corp_der) == 1, "the root only the system store has is missing"
    assert bundle.count(ca_der) == 1
    assert set(bundle) == set(ders(certifi_pem)) | {corp_der, ca_der}
    assert files.ca_pem.read_bytes() == test_ca.ca_path.read_bytes()
    # The truststore holds exactly the bundle's certificates, the sidecar's CA under its own alias.
    with warnings.catch_warnings():  # certifi has roots with a zero serial
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        store = pkcs12.load_pkcs12(files.truststore.read_bytes(), TRUSTSTORE_PASSWORD.encode())
    assert store.key is None and store.cert is None
    in_store = [c.certificate.public_bytes(serialization.Encoding.DER) for c in store.additional_certs]
    assert sorted(in_store) == sorted(bundle)
    assert [c.friendly_name for c in store.additional_certs if c.friendly_name == b"egress-sidecar-ca"]

    without = ders(export_ca(confdir, tmp_path / "no-system", system=None).ca_bundle.read_bytes())
    assert corp_der not in without and set(without) == set(ders(certifi_pem)) | {ca_der}


def test_system_store_is_the_machines() -> None:
    debian = Path("/etc/ssl/certs/ca-certificates.crt")
    found = system_store()
    if debian.is_file():
        assert found is not None and found.resolve() == debian.resolve()
    elif found is not None:
        assert x509.load_pem_x509_certificates(found.read_bytes())


def test_sidecar_bundle_keeps_the_system_roots(world: World, make_sidecar_proc: Callable[..., SidecarProcess]) -> None:
    system = system_store()
    if system is None:
        pytest.skip("this machine has no system trust store file")
    sc = make_sidecar_proc(world.pair_env())
    bundle = set(ders((sc.confdir / "ca-bundle.pem").read_bytes()))
    assert set(ders(system.read_bytes())) <= bundle
    assert ders((sc.confdir / "ca.pem").read_bytes())[0] in bundle
    assert (sc.confdir / "truststore.p12").is_file()


def test_client_env_paths_are_absolute_and_proxies_in_both_cases(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for given, expected in ((Path("~/.egress-sidecar"), tmp_path / "home" / ".egress-sidecar"),
                            (Path("rel/../conf"), tmp_path / "conf")):
        env = client_env(given, "http://127.0.0.1:3128")
        bundle = str(expected / "ca-bundle.pem")
        assert env["REQUESTS_CA_BUNDLE"] == env["SSL_CERT_FILE"] == env["CURL_CA_BUNDLE"] == bundle
        assert env["NODE_EXTRA_CA_CERTS"] == str(expected / "ca.pem")
        assert f"-Djavax.net.ssl.trustStore={expected / 'truststore.p12'} " in env["JAVA_TOOL_OPTIONS"]
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
            assert env[name] == env[name.lower()]
    assert java_non_proxy_hosts("localhost,127.0.0.1,::1,.svc,.cluster.local") == \
        "localhost|127.0.0.1|[::1]|*.svc|*.cluster.local"
    spaced = java_tool_options("http://[::1]:3128", Path("/a b/truststore.p12"))
    assert spaced.startswith("-Dhttps.proxyHost=::1 -Dhttps.proxyPort=3128 ")
    assert '"-Djavax.net.ssl.trustStore=/a b/truststore.p12"' in spaced
    assert shell_assignments({"A": "x y", "B": "p|q", "C": "plain"}) == "A='x y' B='p|q' C=plain"


def test_java_trusts_the_truststore_and_not_a_plain_pkcs12(tmp_path: Path, test_ca: TestCA,
                                                            sf_cert: tuple[Path, Path]) -> None:
    """A real JVM (the matrix's Java client, configured only by JAVA_TOOL_OPTIONS) trusts what the
    truststore holds, in a directory whose path has a space. The same certificates exported by
    `openssl pkcs12 -export -nokeys` (no trusted-certificate attribute) are trusted by nothing."""
    openssl = require_tool(("openssl",), "OPENSSL", "apt-get install openssl")
    files = export_ca(confdir_with_ca(tmp_path / "confdir", test_ca), tmp_path / "trust dir", system=None)
    plain = tmp_path / "plain.p12"
    subprocess.run([openssl, "pkcs12", "-export", "-nokeys", "-in", str(files.ca_bundle), "-out", str(plain),
                    "-passout", f"pass:{TRUSTSTORE_PASSWORD}"], check=True, capture_output=True, timeout=60)
    with FakeSalesforce(*sf_cert, allowlist=("127.0.0.1",), client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as sf, \
            ConnectionCounter() as proxy:
        # localhost is in http.nonProxyHosts: the JVM must go straight to the local Salesforce.
        url = f"https://localhost:{sf.address[1]}/services/oauth2/token"
        base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and "JAVA" not in k}

        def run(truststore: Path) -> subprocess.CompletedProcess[str]:
            env = {**base, **sf_env(sf.issue_refresh_token(), url),
                   "JAVA_TOOL_OPTIONS": java_tool_options(proxy.url, truststore)}
            return subprocess.run([java(), str(JAVA_CLIENT)], env=env, capture_output=True, text=True, timeout=120)

        trusted = run(files.truststore)
        assert trusted.returncode == 0, trusted.stderr
        assert json.loads(trusted.stdout.strip().splitlines()[-1])["token_status"] == 200
        untrusted = run(plain)
        # Java found no trusted entry at all in the plain store.
        assert untrusted.returncode != 0, untrusted.stdout
        assert "trustAnchors parameter must be non-empty" in untrusted.stderr, untrusted.stderr
        assert proxy.count == 0


def test_trust_files_go_to_sidecar_trust_dir_and_keys_stay_in_the_confdir(
    world: World, make_sidecar_proc: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    """Kubernetes mounts SIDECAR_TRUST_DIR into the app container; the confdir (CA key, grants.key) never."""
    trust = tmp_path / "trust"
    world.salesforce.set_allowlist(["127.0.0.2", "127.0.0.3"])
    sc = make_sidecar_proc({**world.pair_env(), "SIDECAR_TRUST_DIR": str(trust)})
    assert sorted(p.name for p in trust.iterdir()) == ["ca-bundle.pem", "ca.pem", "truststore.p12"]
    assert not (sc.confdir / "ca-bundle.pem").exists() and (sc.confdir / "mitmproxy-ca.pem").exists()
    assert not [p for p in trust.iterdir() if b"PRIVATE KEY" in p.read_bytes()]
    env_line = next(line for line in sc.log_text().splitlines() if "app environment" in line)
    assert f"REQUESTS_CA_BUNDLE={trust}/ca-bundle.pem" in env_line and str(sc.confdir) not in env_line
    with sc.session() as s:
        s.verify = str(trust / "ca-bundle.pem")
        assert redeem(s, world.salesforce.issue_refresh_token()).status_code == 200


def test_an_unusable_trust_dir_fails_at_start_naming_the_setting(tmp_path: Path, test_ca: TestCA) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = run_with(tmp_path, test_ca, {"SIDECAR_TRUST_DIR": str(blocker / "trust")})
    assert out.returncode == 2 and "SIDECAR_TRUST_DIR" in out.stderr and "Traceback" not in out.stderr, out.stderr
