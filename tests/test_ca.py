"""The CA the app trusts: generated or brought by the user (SIDECAR_CA_CERT/KEY), and bad files fail at start."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from sidecar.sim.certs import TestCA
from tests.harness import ROOT, SidecarProcess, World, sidecar_env


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
