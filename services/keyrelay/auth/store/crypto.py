"""Tokens at rest: AES-256-GCM with the key id in the blob and the owner as associated data.

Blob layout (bytes)::

    b"k1" | len(kid):u8 | kid | nonce:12 | ciphertext+tag

The associated data binds a blob to what it belongs to (``account:<id>`` or
``flow:<id>``): a blob copied to another account fails to decrypt instead of
handing one account's token to another. The first configured key encrypts;
every configured key decrypts, so keys rotate by prepending a new one and
dropping the old one once every blob has been rewritten (each refresh
rewrites the account's blob).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrelay.auth.config import EncryptionKey

_MAGIC = b"k1"
_NONCE_LEN = 12


class DecryptError(Exception):
    """A blob is corrupt, was made with an unknown key, or belongs to someone else."""


class TokenCipher:
    def __init__(self, keys: Sequence[EncryptionKey]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._encrypt_kid = keys[0].kid.encode()
        self._aeads = {k.kid.encode(): AESGCM(k.key) for k in keys}

    def encrypt(self, owner: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._aeads[self._encrypt_kid].encrypt(nonce, plaintext, owner.encode())
        kid = self._encrypt_kid
        return b"".join((_MAGIC, bytes([len(kid)]), kid, nonce, sealed))

    def decrypt(self, owner: str, blob: bytes) -> bytes:
        if len(blob) < 3 or blob[:2] != _MAGIC:
            raise DecryptError("not a keyrelay token blob")
        kid_len = blob[2]
        kid = blob[3 : 3 + kid_len]
        body = blob[3 + kid_len :]
        aead = self._aeads.get(kid)
        if aead is None:
            raise DecryptError(
                f"blob was encrypted with key id {kid.decode(errors='replace')!r}, which is not "
                "configured; add it back to KEYRELAY_ENCRYPTION_KEYS"
            )
        if len(body) < _NONCE_LEN + 16:
            raise DecryptError("blob is truncated")
        try:
            return aead.decrypt(body[:_NONCE_LEN], body[_NONCE_LEN:], owner.encode())
        except InvalidTag:
            raise DecryptError("blob does not authenticate (corrupt, or another owner's)") from None
