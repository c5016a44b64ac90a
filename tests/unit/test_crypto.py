"""Tokens at rest: AES-256-GCM blobs bound to their owner, with rotating keys."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.auth.config import EncryptionKey
from keyrelay.auth.store.crypto import DecryptError, TokenCipher

KEY_A = EncryptionKey("ka", bytes(range(32)))
KEY_B = EncryptionKey("kb", bytes(range(100, 132)))
OWNER = "account:alice"
PLAINTEXT = b'{"access_token":"at-SECRET-1234567890","refresh_token":"rt-SECRET-0987654321"}'


@pytest.fixture
def cipher() -> TokenCipher:
    return TokenCipher([KEY_A])


@pytest.fixture
def blob(cipher: TokenCipher) -> bytes:
    return cipher.encrypt(OWNER, PLAINTEXT)


def test_round_trip(cipher: TokenCipher, blob: bytes) -> None:
    assert cipher.decrypt(OWNER, blob) == PLAINTEXT


def test_empty_plaintext_round_trips(cipher: TokenCipher) -> None:
    assert cipher.decrypt(OWNER, cipher.encrypt(OWNER, b"")) == b""


def test_blob_layout_names_the_key_id(blob: bytes) -> None:
    assert blob[:2] == b"k1"
    assert blob[2] == len(b"ka")
    assert blob[3:5] == b"ka"
    # magic + kid length + kid + nonce + ciphertext + tag
    assert len(blob) == 2 + 1 + 2 + 12 + len(PLAINTEXT) + 16


def test_blob_of_another_owner_does_not_decrypt(cipher: TokenCipher, blob: bytes) -> None:
    with pytest.raises(DecryptError, match="does not authenticate"):
        cipher.decrypt("account:mallory", blob)
    with pytest.raises(DecryptError):
        cipher.decrypt("flow:alice", blob)
    with pytest.raises(DecryptError):
        cipher.decrypt("", blob)


def test_every_single_byte_tamper_fails(cipher: TokenCipher, blob: bytes) -> None:
    for position in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(blob)
            tampered[position] ^= flip
            with pytest.raises(DecryptError):
                cipher.decrypt(OWNER, bytes(tampered))


def test_every_truncation_fails(cipher: TokenCipher, blob: bytes) -> None:
    for length in range(len(blob)):
        with pytest.raises(DecryptError):
            cipher.decrypt(OWNER, blob[:length])


def test_appended_bytes_fail(cipher: TokenCipher, blob: bytes) -> None:
    with pytest.raises(DecryptError):
        cipher.decrypt(OWNER, blob + b"\x00")


def test_not_a_blob(cipher: TokenCipher) -> None:
    for junk in (b"", b"k", b"xx", b"plain text token", b"\x00" * 64):
        with pytest.raises(DecryptError):
            cipher.decrypt(OWNER, junk)


def test_unknown_key_id_is_named(cipher: TokenCipher) -> None:
    other = TokenCipher([EncryptionKey("retired-2023", os.urandom(32))])
    blob = other.encrypt(OWNER, PLAINTEXT)
    with pytest.raises(DecryptError, match="'retired-2023'") as info:
        cipher.decrypt(OWNER, blob)
    assert "KEYRELAY_ENCRYPTION_KEYS" in str(info.value)


def test_rotation_old_blobs_still_decrypt_and_new_blobs_use_the_new_key() -> None:
    old = TokenCipher([KEY_A]).encrypt(OWNER, PLAINTEXT)
    rotated = TokenCipher([KEY_B, KEY_A])
    assert rotated.decrypt(OWNER, old) == PLAINTEXT

    new = rotated.encrypt(OWNER, PLAINTEXT)
    assert new[3 : 3 + new[2]] == b"kb"
    assert rotated.decrypt(OWNER, new) == PLAINTEXT
    # Only B can open it: A alone does not know that key id.
    with pytest.raises(DecryptError, match="'kb'"):
        TokenCipher([KEY_A]).decrypt(OWNER, new)
    assert TokenCipher([KEY_B]).decrypt(OWNER, new) == PLAINTEXT


def test_after_dropping_the_old_key_its_blobs_are_unreadable() -> None:
    old = TokenCipher([KEY_A]).encrypt(OWNER, PLAINTEXT)
    with pytest.raises(DecryptError, match="'ka'"):
        TokenCipher([KEY_B]).decrypt(OWNER, old)


def test_same_kid_with_a_different_key_fails_to_authenticate() -> None:
    blob = TokenCipher([KEY_A]).encrypt(OWNER, PLAINTEXT)
    impostor = TokenCipher([EncryptionKey("ka", bytes(32))])
    with pytest.raises(DecryptError, match="does not authenticate"):
        impostor.decrypt(OWNER, blob)


def test_nonces_differ_between_encryptions(cipher: TokenCipher) -> None:
    blobs = [cipher.encrypt(OWNER, PLAINTEXT) for _ in range(20)]
    nonces = {b[5:17] for b in blobs}
    assert len(nonces) == 20
    assert len(set(blobs)) == 20


def test_plaintext_never_appears_in_the_blob(cipher: TokenCipher, blob: bytes) -> None:
    assert PLAINTEXT not in blob
    for secret in (b"at-SECRET", b"rt-SECRET", b"access_token", b"SECRET"):
        assert secret not in blob
    # Nor the owner (it is associated data, authenticated but not stored).
    assert OWNER.encode() not in blob


def test_no_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TokenCipher([])


@settings(max_examples=60, deadline=None)
@given(
    owner=st.text(max_size=40),
    plaintext=st.binary(max_size=200),
    data=st.data(),
)
def test_property_round_trip_and_single_byte_flip(
    owner: str, plaintext: bytes, data: st.DataObject
) -> None:
    cipher = TokenCipher([KEY_B, KEY_A])
    blob = cipher.encrypt(owner, plaintext)
    assert cipher.decrypt(owner, blob) == plaintext
    position = data.draw(st.integers(min_value=0, max_value=len(blob) - 1), label="position")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="flip")
    tampered = bytearray(blob)
    tampered[position] ^= flip
    with pytest.raises(DecryptError):
        cipher.decrypt(owner, bytes(tampered))
