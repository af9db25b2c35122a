"""Sealed values: who a grant and Salesforce's evidence belong to, kept so that only the sidecar can read it.

A customer org is an identity, not a secret (an org id is a Salesforce record id, shown in the org's
Setup), but a file or a Redis that lists an ISV's customers should not name them to whoever copies it.
So state keeps orgs as keyed hashes (to find and compare them) and their ids only sealed: AES-GCM under
a key derived (HKDF-SHA256) from the key the state is hashed with (``grants.key``, or with Redis the one
derived from ``SIDECAR_REDIS_KEY``, so every replica opens what another sealed). The context a value is
sealed for (its row or Redis key) is bound in as associated data, so a sealed value moved elsewhere
does not open.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE = 12


class Sealer:
    def __init__(self, key: bytes, purpose: bytes) -> None:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=b"egress-sidecar seal " + purpose).derive(key)
        self._aead = AESGCM(derived)

    def seal(self, plain: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plain, context)

    def open(self, sealed: bytes | None, context: bytes) -> bytes | None:
        """The plain value, or None when it is missing, was sealed under another key or for another
        context, or was tampered with."""
        if not sealed or len(sealed) <= NONCE:
            return None
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], context)
        except (InvalidTag, ValueError):
            return None
