"""A throwaway certificate authority for the simulated HTTPS services.

Why: the fake Salesforce must be reached by real clients (Python ssl, curl/OpenSSL 3, Node) with
full verification switched ON, under the real hostnames (login.salesforce.com, ...), so the tests
exercise the same trust path as production. The leaf profile (SAN, AKI/SKI, KeyUsage, serverAuth
EKU, critical BasicConstraints) satisfies OpenSSL's strict mode, which Python 3.13 enables.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_KEY_USAGE_OFF = {
    "content_commitment": False, "data_encipherment": False, "key_agreement": False,
    "encipher_only": False, "decipher_only": False,
}


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)


def server_context(certfile: str | Path, keyfile: str | Path) -> ssl.SSLContext:
    """TLS server context speaking HTTP/1.1 only (ALPN), as the fakes do not implement h2."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(certfile), str(keyfile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class TestCA:
    """Self-signed EC P-256 CA kept in `directory` (ca.pem, ca-key.pem); reused if already there."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: str | Path, *, common_name: str = "egress-sidecar test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = self.directory / "ca.pem", self.directory / "ca-key.pem"
        if cert_path.exists() and key_path.exists():
            self._cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key")
            self._key = key
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              key_encipherment=False, **_KEY_USAGE_OFF),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        _write_key(key_path, self._key)
        cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def issue(self, hostnames: Sequence[str], name: str = "server") -> tuple[Path, Path]:
        """Write `<name>.pem` and `<name>-key.pem`; IP-address entries become IP SANs."""
        if not hostnames:
            raise ValueError("at least one hostname is required")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad certificate name {name!r}")
        sans: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:64])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                              key_encipherment=False, **_KEY_USAGE_OFF),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def client_context(self) -> ssl.SSLContext:
        """Verifying client context that trusts only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))
