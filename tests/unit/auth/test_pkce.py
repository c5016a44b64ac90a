"""PKCE verifier/challenge and state helpers (RFC 7636)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrelay.auth.core.pkce import (
    VERIFIER_MAX_LEN,
    VERIFIER_MIN_LEN,
    is_valid_verifier,
    new_state,
    new_verifier,
    s256_challenge,
    states_equal,
)

BASE64URL_43 = re.compile(r"[A-Za-z0-9_-]{43}")
UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


def test_rfc7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_limits_are_the_rfc_ones() -> None:
    assert (VERIFIER_MIN_LEN, VERIFIER_MAX_LEN) == (43, 128)


def test_default_verifier_is_43_chars_and_valid() -> None:
    verifier = new_verifier()
    assert len(verifier) == 43
    assert is_valid_verifier(verifier)


def test_verifiers_are_random() -> None:
    assert len({new_verifier() for _ in range(50)}) == 50


@pytest.mark.parametrize(("nbytes", "length"), [(32, 43), (33, 44), (95, 127), (96, 128)])
def test_verifier_lengths_at_the_edges(nbytes: int, length: int) -> None:
    verifier = new_verifier(nbytes)
    assert len(verifier) == length
    assert is_valid_verifier(verifier)


@pytest.mark.parametrize("nbytes", [-1, 0, 1, 31, 97, 128])
def test_verifier_sizes_outside_the_rfc_are_refused(nbytes: int) -> None:
    with pytest.raises(ValueError, match="RFC 7636 needs 43-128"):
        new_verifier(nbytes)


@given(st.integers(min_value=32, max_value=96))
def test_every_new_verifier_is_valid_with_a_43_char_challenge(nbytes: int) -> None:
    verifier = new_verifier(nbytes)
    assert is_valid_verifier(verifier)
    assert BASE64URL_43.fullmatch(s256_challenge(verifier))


@pytest.mark.parametrize(
    ("verifier", "valid"),
    [
        ("a" * 42, False),
        ("a" * 43, True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("A-._~" * 9, True),
        ("a" * 42 + "+", False),
        ("a" * 42 + "/", False),
        ("a" * 42 + "=", False),
        ("a" * 42 + " ", False),
        ("a" * 42 + "é", False),  # \w-style classes would admit this
        ("a" * 42 + "٣", False),  # a non-ASCII digit
        ("a" * 43 + "\n", False),  # "$" would match before a trailing newline
    ],
)
def test_is_valid_verifier(verifier: str, valid: bool) -> None:
    assert is_valid_verifier(verifier) is valid


@given(st.text(alphabet=UNRESERVED, min_size=43, max_size=128))
def test_any_unreserved_string_of_valid_length_is_a_verifier(verifier: str) -> None:
    assert is_valid_verifier(verifier)
    assert BASE64URL_43.fullmatch(s256_challenge(verifier))


@given(st.text(max_size=200))
def test_validity_matches_the_grammar(verifier: str) -> None:
    expected = 43 <= len(verifier) <= 128 and all(c in UNRESERVED for c in verifier)
    assert is_valid_verifier(verifier) is expected


@pytest.mark.parametrize("verifier", ["short-secret", "s" * 129, "x" * 42 + "!"])
def test_challenge_of_an_invalid_verifier_is_refused_without_echoing_it(verifier: str) -> None:
    with pytest.raises(ValueError, match="not a valid PKCE verifier") as info:
        s256_challenge(verifier)
    assert verifier not in str(info.value)


def test_challenges_differ_for_different_verifiers() -> None:
    assert s256_challenge("a" * 43) != s256_challenge("a" * 42 + "b")


def test_new_state_is_random_and_url_safe() -> None:
    states = {new_state() for _ in range(50)}
    assert len(states) == 50
    assert all(BASE64URL_43.fullmatch(s) for s in states)


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("abc", "abc", True),
        ("abc", "abd", False),
        ("abc", "abcd", False),
        ("", "", True),
        ("", "a", False),
        ("é", "é", True),
        ("é", "e\u0301", False),  # no Unicode normalisation: bytes must match
        ("\ud800", "\ud800", True),  # a lone surrogate neither raises nor mismatches
        ("\ud800", "\ud801", False),
    ],
)
def test_states_equal(a: str, b: str, equal: bool) -> None:
    assert states_equal(a, b) is equal


@given(st.text(), st.text())
def test_states_equal_is_string_equality(a: str, b: str) -> None:
    assert states_equal(a, b) is (a == b)
    assert states_equal(a, a)
