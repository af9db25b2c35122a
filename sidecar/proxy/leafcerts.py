"""The sidecar's CA and the leaf certificates for the token hosts it terminates TLS for: mitmproxy's
certificate store (its CA files in the confdir, created on the first start) issues them from the CA the
app trusts, here turned into ready ``ssl.SSLContext`` objects.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import CertStore

CA_BASENAME = "mitmproxy"  # mitmproxy-ca.pem (CA and key), mitmproxy-ca-cert.pem, ... as mitmproxy names them
KEY_SIZE = 2048  # mitmproxy's default for the CA and the leaves
MAX_CONTEXTS = 256  # leaf certificates kept ready (~23 KB each), one per exact token host or pattern


def open_certstore(confdir: Path) -> CertStore:
    """The certificate store on the CA in ``confdir``; the CA is created there when it has none yet (as
    mitmproxy does: ``mitmproxy-ca.pem`` holds the key, ``mitmproxy-ca-cert.pem`` the public part)."""
    return CertStore.from_store(confdir, CA_BASENAME, KEY_SIZE)


class LeafContexts:
    """Server-side ``ssl.SSLContext`` per certificate name, with the leaf certificate mitmproxy's
    certificate store issues for it, bounded LRU. ``name_for`` maps a host to its certificate name:
    with :meth:`TokenHosts.certificate_name`, every host under ``*.my.salesforce.com`` shares one
    wildcard certificate, so an ISV serving thousands of orgs holds one context, not thousands."""

    def __init__(self, certstore: Callable[[], CertStore], workdir: Path,
                 name_for: Callable[[str], str] = lambda host: host) -> None:
        self._certstore = certstore
        self._workdir = workdir
        self._name_for = name_for
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def get(self, host: str) -> ssl.SSLContext:
        name = self._name_for(host)
        ctx = self._cache.get(name)
        if ctx is not None:
            self._cache.move_to_end(name)
            return ctx
        entry = self._certstore().get_cert(name, [x509.DNSName(name)])
        pem = entry.cert.to_pem() + b"".join(c.to_pem() for c in entry.chain_certs if c != entry.cert)
        pem += entry.privatekey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        _load_chain(ctx, pem, self._workdir)
        self._cache[name] = ctx
        if len(self._cache) > MAX_CONTEXTS:
            self._cache.popitem(last=False)
        return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes, workdir: Path) -> None:
    """``load_cert_chain`` only reads files: hand it an anonymous in-memory file where the kernel has
    them (Linux memfd), else a private temporary file in the confdir that is removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("egress-sidecar-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # e.g. no /proc: fall back to a file
        finally:
            os.close(fd)
    fd, name = tempfile.mkstemp(dir=workdir, prefix=".leaf-", suffix=".pem")  # mode 0600
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)
