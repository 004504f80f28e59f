"""haif.store.tokens: the token format, its lookup prefix and its hash."""

from __future__ import annotations

import pytest

from haif.exceptions import InvalidRequest
from haif.store.tokens import hash_token, lookup_prefix, new_token, parse_scopes, same_hash

pytestmark = pytest.mark.unit


def test_new_tokens_are_unique_and_carry_their_prefix() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    token, prefix = tokens.pop()
    assert token.startswith(f"haif_{prefix}_") and len(prefix) == 12
    assert lookup_prefix(token) == prefix
    assert len(token.split("_", 2)[2]) >= 43  # 256 random bits


@pytest.mark.parametrize(
    "value",
    [
        "",
        "short",
        "x" * 513,
        "haif_ABCDEFGHIJKL_" + "a" * 43,
        "haif_abc_" + "a" * 43,
        "haif_abcdefghijkl_tooshort",
        "has space in it 0123456789",
        "ключ-ключ-ключ-ключ",
        "tab\there-0123456789",
        "haif_abcdefghijkl_" + "é" * 40,
    ],
)
def test_malformed_keys_have_no_prefix(value: str) -> None:
    assert lookup_prefix(value) is None


def test_foreign_shaped_keys_get_a_derived_prefix() -> None:
    key = "integration-test-key-0123456789"
    assert lookup_prefix(key) == "k-" + hash_token(key)[:16]
    assert lookup_prefix(key) != lookup_prefix(key + "x")


def test_hash_comparison() -> None:
    token, _ = new_token()
    stored = hash_token(token)
    assert stored != token and len(stored) == 64
    assert same_hash(stored, token) and not same_hash(
        stored, token[:-1] + ("B" if token.endswith("A") else "A")
    )


def test_scopes() -> None:
    assert parse_scopes(None) == ("inference",)
    assert parse_scopes(["admin,inference", "admin"]) == ("admin", "inference")
    with pytest.raises(InvalidRequest):
        parse_scopes(["superuser"])
